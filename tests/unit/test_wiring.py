"""The pieces the daemon plugs together, in one event loop the way isthmusd will hold them: the
control server with its event bus, the metrics server, JSON logs. A CLI command goes in; the
handler logs, counts and publishes; the event stream, /metrics and the log all show it — and the
PSK the tunnel holds shows up in none of them."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

from click.testing import CliRunner

from appliance import cli, logs
from appliance.config import Secret
from appliance.control import ControlServer, EventBus, check_params, format_spi, param, socket_path, unknown_tunnel
from appliance.metrics import IsthmusMetrics, MetricsServer, Registry
from tests.unit.control_util import wait_until

PSK = Secret(b"wiring-test-psk-9f8e7d")


class MiniDaemon:
    """What isthmusd's shell does with these pieces (without IKE)."""

    def __init__(self, run_dir):
        self.log = logging.getLogger("isthmus.daemon")
        self.bus = EventBus()
        self.metrics = IsthmusMetrics(Registry())
        self.tunnels = {"to-b": {"psk": PSK, "spi_in": 0xC1A2B3C4, "spi_out": 0xABCD}}
        self.control = ControlServer(socket_path(run_dir), {"rekey": self.rekey, "tunnels": self.list_tunnels},
                                     events=self.bus)
        self.http = MetricsServer(self.metrics.registry, "127.0.0.1", 0)
        self.metrics.registry.add_collector(self.collect)

    async def start(self):
        await self.control.start()
        await self.http.start()

    async def stop(self):
        await self.control.close()
        await self.http.close()

    async def collect(self):
        t = self.tunnels["to-b"]
        self.metrics.set_sa_traffic("to-b", spi_in=t["spi_in"], spi_out=t["spi_out"], bytes_in=2048, bytes_out=1024,
                                    packets_in=2, packets_out=1)

    async def list_tunnels(self, params):
        check_params(params, ())
        return {"tunnels": [{"name": n, "state": "up"} for n in self.tunnels]}

    async def rekey(self, params):
        check_params(params, {"tunnel", "kind"})
        name = param(params, "tunnel", str)
        if name not in self.tunnels:
            raise unknown_tunnel(name, self.tunnels)
        t = self.tunnels[name]
        old_in, old_out = t["spi_in"], t["spi_out"]
        t["spi_in"], t["spi_out"] = old_in + 1, old_out + 1
        with logs.log_context(tunnel=name):
            self.log.info("Child SA rekeyed with %s", t["psk"], extra={"spi_in": t["spi_in"], "auth": t})
        self.metrics.rekeys.inc(tunnel=name, kind=param(params, "kind", str))
        self.metrics.forget_sa(name, old_in, old_out)
        self.bus.publish("child_sa_rekeyed", name, old_spi_in=format_spi(old_in), old_spi_out=format_spi(old_out),
                         spi_in=format_spi(t["spi_in"]), spi_out=format_spi(t["spi_out"]))
        return {"tunnel": name, "state": "rekeyed", "message": None}


def test_one_loop_holds_control_metrics_and_logs(tmp_path):
    buf = io.StringIO()
    handler = logs.setup_logging("info", "json", stream=buf)
    logs.register_secret(PSK)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    d = MiniDaemon(tmp_path / "run")
    run = lambda coro: asyncio.run_coroutine_threadsafe(coro, loop).result(10)  # noqa: E731
    try:
        run(d.start())
        base = ["--run-dir", str(tmp_path / "run")]
        # the follower is the real console script (CliRunner swaps sys.stdout: one at a time)
        follower = subprocess.Popen([str(Path(sys.executable).parent / "isthmus"), *base, "events", "--json"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: d.bus.subscribers == 1, timeout=30)

        r = CliRunner().invoke(cli.main, [*base, "rekey", "to-b"])
        assert (r.exit_code, r.stdout) == (0, "to-b: rekeyed\n")
        r = CliRunner().invoke(cli.main, [*base, "rekey", "to-x"])
        assert r.exit_code == 1 and "no tunnel 'to-x'; configured: to-b" in r.stderr

        with urllib.request.urlopen(f"http://127.0.0.1:{d.http.port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        assert 'isthmus_rekeys_total{tunnel="to-b",kind="child"} 1' in text
        assert 'isthmus_child_sa_bytes_total{tunnel="to-b",spi="0xc1a2b3c5",direction="in"} 2048' in text
        assert "0xc1a2b3c4" not in text  # the old SA's series are gone

        run(d.stop())  # ends the event stream too
        out, err = follower.communicate(timeout=30)
        assert follower.returncode == 3 and "event stream ended" in err
        stream = [json.loads(x) for x in out.splitlines()]
        assert stream[0]["type"] == "child_sa_rekeyed"
        assert (stream[0]["old_spi_in"], stream[0]["spi_in"]) == ("0xc1a2b3c4", "0xc1a2b3c5")
        assert stream[-1]["error"]["code"] == "unreachable"

        log_lines = [json.loads(x) for x in buf.getvalue().splitlines()]
        rekeyed = next(x for x in log_lines if x["message"].startswith("Child SA rekeyed"))
        assert rekeyed["message"] == "Child SA rekeyed with <redacted>"
        assert rekeyed["tunnel"] == "to-b" and rekeyed["spi_in"] == "0xc1a2b3c5"
        assert rekeyed["auth"]["psk"] == "<redacted>"
        everything = buf.getvalue() + text + out + err
        assert PSK.reveal().decode() not in everything and PSK.reveal().hex() not in everything
    finally:
        logging.getLogger().removeHandler(handler)
        logs.forget_registered_secrets()
        logging.captureWarnings(False)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
