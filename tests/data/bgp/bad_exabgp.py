"""A stand-in for `exabgp server CONF` that misbehaves on its API side (tests/host/
test_route_manager_faults.py): it starts the API process of CONF's `run` line (our relay) like
ExaBGP does, waits for the first reload signal (the route manager configured the neighbor),
then writes garbage mixed with real ExaBGP 5 JSON: truncated lines, unknown message types,
binary junk, a 20 MB line, an update with a 100,000-ASN AS_PATH, and a good update. It answers
every command with `done` (the first with `error`) and logs what it got to its log file."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

conf = open(sys.argv[-1]).read()
run = re.search(r"^\s*run (.+);$", conf, re.M).group(1).split()
log_path = os.environ.get("exabgp_log_destination", "/dev/null")
reloaded = threading.Event()


def log(text):
    with open(log_path, "a") as f:
        f.write(text + "\n")


def on_usr1(*_):
    log("performing reload of exabgp (stand-in)")
    reloaded.set()


signal.signal(signal.SIGUSR1, on_usr1)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
relay = subprocess.Popen(run, stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def answer():
    first = True
    for line in relay.stdout:
        log("command: " + line.decode().strip())
        relay.stdin.write(b"error\n" if first else b"done\n")
        relay.stdin.flush()
        first = False


threading.Thread(target=answer, daemon=True).start()
peer = {"address": {"local": "169.254.21.1", "peer": "169.254.21.2"}, "asn": {"local": 65001, "peer": 65002}}


def update(prefix, as_path):
    return {"exabgp": "5.0.0", "time": time.time(), "type": "update", "neighbor": {
        **peer, "direction": "receive", "message": {"update": {
            "attribute": {"origin": "igp", "as-path": {"0": {"element": "as-sequence", "value": as_path}}},
            "announce": {"ipv4 unicast": {"169.254.21.2": [{"nlri": prefix}]}}}}}}


good = json.dumps(update("10.2.0.0/16", [65002]))
lines = [
    json.dumps({"type": "state", "neighbor": {**peer, "state": "up"}}),
    good[: len(good) // 2],                                           # truncated
    json.dumps({"type": "flowspec-magic", "neighbor": peer}),         # unknown message type
    json.dumps({"type": "update", "neighbor": {**peer, "message": {"update": {"announce": {
        "ipv4 unicast": {"169.254.21.2": [{"nlri": "10.2.9.0/33"}, {"nlri": None}]}}}}}}),
    "\x00\x01\x02 not json at all \xff",
    "x" * (20 << 20),                                                 # longer than the reader's limit
    json.dumps(update("10.2.1.0/24", list(range(1, 100_001)))),       # a 100,000-ASN AS_PATH
    "[]",
    good,
    json.dumps({"type": "update", "neighbor": {**peer, "direction": "receive",
                                               "message": {"eor": {"afi": "ipv4", "safi": "unicast"}}}}),
]
reloaded.wait(30)
time.sleep(0.5)
for line in lines:
    relay.stdin.write(line.encode("utf-8", "surrogateescape") + b"\n")
    relay.stdin.flush()
log("stand-in: all lines written")
while relay.poll() is None:
    time.sleep(0.2)
