"""Opt-in cProfile of isthmusd for performance work (issue 13): ``ISTHMUS_PROFILE=/path/prefix``.

The main (asyncio) thread and the data plane thread are profiled separately - cProfile follows
the thread that enabled it - and written at exit to ``<prefix>.main`` and ``<prefix>.dataplane``
(pstats files; ``python -m pstats FILE``). Off unless the variable is set; nothing else reads it.
"""

from __future__ import annotations

import atexit
import cProfile
import os
import threading

ENV = "ISTHMUS_PROFILE"
_lock = threading.Lock()


def prefix() -> str | None:
    return os.environ.get(ENV) or None


def profile_this_thread(name: str) -> None:
    """Start profiling the calling thread; its stats are written at exit as ``<prefix>.<name>``."""
    p = prefix()
    if p is None:
        return
    prof = cProfile.Profile()

    def dump() -> None:
        with _lock:
            try:
                prof.create_stats()
                prof.dump_stats(f"{p}.{name}")
            except Exception:  # noqa: BLE001 - a profile must never break the exit
                pass
    atexit.register(dump)
    prof.enable()
