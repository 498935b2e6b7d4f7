"""A real ControlServer on a temporary socket, run by its own event loop in a thread, so the
synchronous ControlClient and the CLI (CliRunner) can talk to it from the test's thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from appliance.control import ControlServer, EventBus, Handler, socket_path


class ServerThread:
    """``with ServerThread(run_dir, handlers) as srv:`` — a listening ControlServer."""

    def __init__(self, run_dir: Path, handlers: Mapping[str, Handler], **server_kw: Any) -> None:
        self.run_dir = Path(run_dir)
        self.handlers = handlers
        self.server_kw = server_kw
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="control-server", daemon=True)
        self.server: ControlServer | None = None
        self.bus = EventBus(**{k: server_kw.pop(k) for k in ("queue_size",) if k in server_kw})

    @property
    def path(self) -> Path:
        return socket_path(self.run_dir)

    def run(self, coro_or_fn: Any, timeout: float = 10.0) -> Any:
        """Run a coroutine (or a plain callable) in the server's loop and return its result."""
        if asyncio.iscoroutine(coro_or_fn):
            return asyncio.run_coroutine_threadsafe(coro_or_fn, self.loop).result(timeout)

        async def wrap() -> Any:
            return coro_or_fn()
        return asyncio.run_coroutine_threadsafe(wrap(), self.loop).result(timeout)

    def publish(self, type: str, tunnel: str | None = None, **fields: Any) -> dict[str, Any]:
        return self.run(lambda: self.bus.publish(type, tunnel, **fields))

    def __enter__(self) -> ServerThread:
        self.thread.start()
        self.server = ControlServer(self.path, self.handlers, events=self.bus, **self.server_kw)
        self.run(self.server.start())
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.run(self.server.close())
            self.server = None

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``pred`` (test synchronisation across threads, not a timing assertion)."""
    import time
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("condition not reached within the wait limit")
        time.sleep(0.01)
