"""Malformed input from ExaBGP's side of the API pipe: truncated JSON, unknown message types,
junk bytes, a 20 MB line, a 100,000-ASN AS_PATH. ExaBGP itself never writes those, so a stand-in
(tests/data/bgp/bad_exabgp.py) takes its place and talks to the route manager through the real
relay and socket; everything else (RIB, policy, FIB in a namespace) is real. Each bad line is
logged and ignored, the manager keeps running and uses the good lines that follow."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from bgp import exabgp
from tests.host.route_manager_env import Appliance, tunnel_yaml
from tests.host.test_route_manager import POLICIES, config

BAD_EXABGP = Path(__file__).resolve().parent.parent / "data" / "bgp" / "bad_exabgp.py"


def test_malformed_api_input_is_logged_and_ignored(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="isthmus")
    text = config(tunnel_yaml("to-b", 1, 65002, imp="from-peer", exp="to-peer"), POLICIES)
    before = (exabgp.STATS.malformed, exabgp.STATS.unknown, exabgp.STATS.huge_as_paths)
    with Appliance(tmp_path, text, [("to-b", 1)], exabgp_argv=[sys.executable, str(BAD_EXABGP)]) as app:
        app.start()
        app.tunnel_up("to-b")
        log = tmp_path / "bgp" / "exabgp.log"
        app.wait(lambda: log.exists() and "all lines written" in log.read_text(), 30, "the stand-in's lines")
        app.wait_fib({"10.2.0.0/16": {("169.254.21.2", "xfrm-b")}})
        sp = app.mgr.speaker
        app.wait(lambda: sp.acks_error == 1 and sp.pending_acks == 0, 10, "the acknowledgement read")
        assert sp.connected and sp.restarts == 0 and sp.pid is not None
        assert app.neighbor("to-b")["state"] == "established"
        malformed, unknown, huge = (exabgp.STATS.malformed - before[0], exabgp.STATS.unknown - before[1],
                                    exabgp.STATS.huge_as_paths - before[2])
        print(f"\nignored: {malformed} malformed, {unknown} unknown, {huge} huge AS_PATH")
        assert malformed >= 4 and unknown >= 1 and huge == 1
        assert "10.2.1.0/24" not in app.fib()
        text = caplog.text
        assert "malformed JSON ignored" in text and "longer than" in text and "treated as withdrawn" in text
        assert "ignored a non-JSON line: '[]'" in text and "message of type 'flowspec-magic'" in text
        assert "ExaBGP refused a command: neighbor 169.254.21.2 announce route 10.1.0.0/16" in text


def test_a_speaker_that_keeps_dying_is_restarted_with_back_off(tmp_path, monkeypatch):
    """ExaBGP exiting at once, again and again: restarted each time, the delays doubling; the
    manager answers all the while."""
    from bgp import speaker
    monkeypatch.setattr(speaker, "RESTART_FIRST", 0.1)
    text = config(tunnel_yaml("to-b", 1, 65002, imp="from-peer", exp="to-peer"), POLICIES)
    dying = [sys.executable, "-c", "import sys; sys.exit(3)"]
    with Appliance(tmp_path, text, [("to-b", 1)], exabgp_argv=dying) as app:
        app.start()
        starts = []
        app.wait(lambda: starts.append(app.mgr.speaker.starts) or app.mgr.speaker.starts >= 5, 20,
                 "five starts")
        t = time.monotonic()
        app.wait(lambda: app.mgr.speaker.starts >= 6, 20, "a sixth start")
        gap = time.monotonic() - t
        print(f"\n6 starts; the gap before the 6th: {gap:.2f} s (0.1 s doubling: 1.6 s)")
        assert gap >= 0.5                      # backing off, not spinning
        assert app.show_bgp()["speaker"]["connected"] is False
        app.tunnel_up("to-b")                  # still answering
        assert app.neighbor("to-b")["state"] in ("active", "opensent")
