"""systemd readiness notification (sd_notify(3)), without a library.

Under systemd with ``Type=notify`` (or ``notify-reload``) ``$NOTIFY_SOCKET`` names a unix datagram
socket - a path, or an abstract name written with a leading ``@``; the service sends newline-
separated ``KEY=VALUE`` assignments: ``READY=1`` once it serves, ``RELOADING=1`` (with
``MONOTONIC_USEC``) when a reload starts and ``READY=1`` again when it is done, ``STOPPING=1``
when it shuts down, ``STATUS=...`` free text for ``systemctl status``. Outside systemd nothing is
sent.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("isthmus.daemon")


def notify(*assignments: str, environ: dict[str, str] | None = None) -> bool:
    """Send `assignments` (``"READY=1"``, ...) to the service manager; False when not under one."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.debug("NOTIFY_SOCKET %r is not a unix socket path; not notifying", address)
        return False
    payload = "\n".join(assignments).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(payload)
    except OSError as e:
        log.warning("systemd notification failed (NOTIFY_SOCKET): %s", e.strerror or e)
        return False
    return True


def ready(status: str | None = None) -> bool:
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def reloading() -> bool:
    # Type=notify-reload wants the monotonic time the reload started, in microseconds
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def stopping(status: str | None = None) -> bool:
    return notify("STOPPING=1", *([f"STATUS={status}"] if status else []))
