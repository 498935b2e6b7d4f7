"""ExaBGP's API process: a relay between ExaBGP's pipes and the route manager's unix socket.

ExaBGP runs ``python .../bgp/relay.py SOCKET`` (see :func:`bgp.exabgp.render_config`). The relay
connects to SOCKET (served by :class:`bgp.speaker.Speaker` inside isthmusd) and copies lines
both ways: ExaBGP's messages (its stdout to our stdin) to the socket, the route manager's
commands (from the socket) to ExaBGP (our stdout). Two threads, so neither direction ever waits
for the other: ExaBGP deadlocks when its API process stops reading (LAB.md).

It exits when either side closes: ExaBGP gone (stdin EOF) or the route manager gone (socket
EOF); the speaker restarts ExaBGP when the relay's connection drops. Standard library only: it
must start fast and without the project on its path.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

CONNECT_TIMEOUT = 10.0


def _connect(path: str) -> socket.socket:
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _to_socket(sock: socket.socket) -> None:
    stdin = sys.stdin.buffer
    try:
        while True:
            chunk = stdin.read1(65536)
            if not chunk:
                break
            sock.sendall(chunk)
    except OSError:
        pass
    finally:
        os._exit(0)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: relay.py SOCKET", file=sys.stderr)
        return 2
    try:
        sock = _connect(argv[1])
    except OSError as e:
        print(f"isthmus relay: cannot connect to {argv[1]}: {e}", file=sys.stderr)
        return 1
    threading.Thread(target=_to_socket, args=(sock,), daemon=True).start()
    out = sys.stdout.buffer
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            out.write(chunk)
            out.flush()
    except OSError:
        pass
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
