"""An engine fuzzer for appliance/ike (issue 12): hostile datagrams against snapshots of live
simnet conversations, with three oracles. See docs/ike-engine.md ("Fuzzing") and
``python -m tests.fuzz --help``."""
