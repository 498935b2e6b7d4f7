"""Real peers for interop tests and benchmarks: strongSwan (strongswan.py), FRR and BIRD."""
