"""Structured logs: JSON lines, the human format, context fields — and no secret on any path."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
from dataclasses import dataclass, field

import pytest

from appliance import logs
from appliance.config import Secret, load_config
from appliance.ike.crypto import ChildKeys, IkeKeys, KeyExchange
from tests.unit.config_util import PSK, make_pki, tunnel, write_config, write_psk

FAKE_PSK = b"FAKE-psk-Zq9v!Xw2"        # registered with the log module, as the daemon does for PSKs
RAW_KEY = bytes(range(0x40, 0x60))      # key material that is only ever passed as bytes / key holders


def forms(secret: bytes) -> list[str]:
    """Every textual form a leak could take."""
    out = [secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode(), repr(secret)]
    try:
        out.append(secret.decode())
    except UnicodeDecodeError:
        pass
    out.append(secret.hex()[:16])  # even a part of the hex
    return out


@pytest.fixture
def capture():
    """The root logger writing to a buffer through setup_logging, plus a plain formatter on the
    same records as the control: it shows the secrets really went through the logging calls."""
    logs.forget_registered_secrets()
    added: list[logging.Handler] = []
    root_level = logging.getLogger().level

    def install(fmt: str):
        buf = io.StringIO()
        added.append(logs.setup_logging("debug", fmt, stream=buf))
        plain = io.StringIO()
        h = logging.StreamHandler(plain)
        h.setFormatter(logging.Formatter("%(message)s"))
        logging.getLogger().addHandler(h)
        added.append(h)
        return buf, plain
    yield install
    for h in added:
        logging.getLogger().removeHandler(h)
    logging.getLogger().setLevel(root_level)
    logging.captureWarnings(False)
    logs.forget_registered_secrets()


@dataclass
class TunnelState:
    name: str
    spi_in: int
    sk: bytes
    hidden: bytes = field(repr=False, default=b"")


def every_path(log: logging.Logger, psk_text: str) -> None:
    """Feed FAKE_PSK and RAW_KEY through every way a developer could hand them to a logger."""
    keys = IkeKeys(RAW_KEY, RAW_KEY, RAW_KEY, RAW_KEY, RAW_KEY, RAW_KEY, RAW_KEY)
    child = ChildKeys(RAW_KEY, b"", RAW_KEY, b"")
    ke = KeyExchange.generate(31, lambda n: RAW_KEY[:n])
    secret = Secret(FAKE_PSK)
    log.info("psk %s key %s keys %s child %r ke %s", FAKE_PSK, RAW_KEY, keys, child, ke)
    log.info("Secret %s %r %d", secret, secret, len(secret), extra={"value": secret, "items": [secret]})
    log.info(f"Secret in an f-string {secret} {secret!r} {secret:>30}")
    log.info("mapping %(a)s %(b)r", {"a": FAKE_PSK, "b": RAW_KEY})
    log.info(f"f-string repr {FAKE_PSK!r} {RAW_KEY!r}")
    log.info(f"f-string text {psk_text} hex {FAKE_PSK.hex()} HEX {FAKE_PSK.hex().upper()} "
             f"b64 {base64.b64encode(FAKE_PSK).decode()}")
    log.info(FAKE_PSK)  # bytes as the message itself
    log.info(keys)
    log.info("containers %s %s", [RAW_KEY, FAKE_PSK], {"k": RAW_KEY})
    log.info("dataclass %s", TunnelState("to-b", 5, RAW_KEY, FAKE_PSK))
    log.info("extra", extra={"psk": psk_text, "secret": "x" * 8, "private_key": RAW_KEY, "SK_d": RAW_KEY,
                             "blob": RAW_KEY, "nested": {"list": [RAW_KEY, {"password": psk_text}]},
                             "state": TunnelState("to-b", 5, RAW_KEY, FAKE_PSK), "keys": keys,
                             "note": f"psk was {psk_text}"})
    with logs.log_context(psk=psk_text, peer_key=RAW_KEY, tunnel="to-b"):
        log.warning("in context")
    logs.bind(log, auth={"psk": FAKE_PSK}, material=RAW_KEY).error("bound %s", psk_text)
    for exc in (ValueError(FAKE_PSK), KeyError(RAW_KEY), RuntimeError(f"bad psk {psk_text}"),
                RuntimeError("key", keys)):
        try:
            raise exc
        except Exception:
            log.exception("failed with %s", exc)
    log.debug("stack", stack_info=True, extra={"psk": FAKE_PSK})


@pytest.mark.parametrize("fmt", ["json", "human"])
def test_no_secret_on_any_path(capture, fmt):
    buf, plain = capture(fmt)
    logs.register_secret(FAKE_PSK)
    every_path(logging.getLogger("isthmus.test"), FAKE_PSK.decode())
    out = buf.getvalue()
    control = plain.getvalue()
    # the same records through a plain logging.Formatter do show the secrets: they were fed for real
    assert FAKE_PSK.decode() in control and repr(RAW_KEY) in control
    for secret in (FAKE_PSK, RAW_KEY):
        for form in forms(secret):
            assert form not in out, f"{form!r} leaked in the {fmt} log"
    assert "<redacted>" in out and "<32 bytes>" in out
    if fmt == "json":
        lines = out.splitlines()
        records = [json.loads(line) for line in lines]
        assert len(records) == 18
        for r in records:
            assert list(r)[:4] == ["time", "level", "logger", "message"]
        assert records[1]["message"] == "Secret <redacted> '<redacted>' 17"
        assert records[1]["value"] == "<redacted>" and records[1]["items"] == ["<redacted>"]
        assert records[4]["message"] == "f-string repr <bytes> <bytes>"
        assert records[5]["message"] == ("f-string text <redacted> hex <redacted> HEX <redacted> "
                                         "b64 <redacted>")
        ex = records[10]
        assert ex["psk"] == ex["secret"] == ex["private_key"] == ex["SK_d"] == ex["keys"] == "<redacted>"
        assert ex["blob"] == "<32 bytes>"
        assert ex["nested"] == {"list": ["<32 bytes>", {"password": "<redacted>"}]}
        assert ex["state"] == {"name": "to-b", "spi_in": "0x00000005", "sk": "<redacted>", "hidden": "<redacted>"}
        assert ex["note"] == "psk was <redacted>"


def test_unregistered_secret_text_is_still_hidden_in_named_fields(capture):
    buf, _ = capture("json")
    logging.getLogger("t").info("x", extra={"psk": "not-registered-1234", "ike_key": "abcd1234",
                                            "credentials": {"user": "u"}})
    r = json.loads(buf.getvalue())
    assert r["psk"] == r["ike_key"] == r["credentials"] == "<redacted>"


def test_json_fields_and_context(capture):
    buf, _ = capture("json")
    log = logging.getLogger("isthmus.ike")
    with logs.log_context(tunnel="to-b", peer="198.51.100.2"):
        logs.bind(log, spi_i=0x1A2B3C4D5E6F7081).info("IKE SA %s established in %.1f s", "#1", 0.5,
                                                      extra={"spi_in": 0xC1A2B3C4, "rekeys": 3})
    log.info("outside", extra={"message_id": 5})
    first, second = (json.loads(x) for x in buf.getvalue().splitlines())
    assert first["message"] == "IKE SA #1 established in 0.5 s"
    assert first["level"] == "info" and first["logger"] == "isthmus.ike"
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert first["tunnel"] == "to-b" and first["peer"] == "198.51.100.2"
    assert first["spi_i"] == "0x1a2b3c4d5e6f7081" and first["spi_in"] == "0xc1a2b3c4" and first["rekeys"] == 3
    assert "tunnel" not in second and second["message_id"] == 5


def test_context_does_not_leak_between_tasks(capture):
    buf, _ = capture("json")
    log = logging.getLogger("t")

    async def worker(name: str, gate: asyncio.Event, other: asyncio.Event):
        with logs.log_context(tunnel=name):
            other.set()
            await gate.wait()
            log.info("from %s", name)

    async def main():
        a, b = asyncio.Event(), asyncio.Event()
        await asyncio.gather(worker("a", a, b), worker("b", b, a))
    asyncio.run(main())
    records = [json.loads(x) for x in buf.getvalue().splitlines()]
    got = {r["message"]: r["tunnel"] for r in records if r["logger"] == "t"}
    assert got == {"from a": "a", "from b": "b"}


def test_human_format(capture):
    buf, _ = capture("human")
    logging.getLogger("isthmus.ike").warning("DPD timeout after %d s", 30,
                                             extra={"tunnel": "to-b", "reason": "no answer", "spi": 0xAB})
    line = buf.getvalue().rstrip("\n")
    assert "WARNING isthmus.ike: DPD timeout after 30 s  tunnel=to-b reason=\"no answer\" spi=0x000000ab" in line


def test_bad_arguments_do_not_crash():
    """Formatting errors become a note in the message (records built directly: pytest's own log
    capture would raise on them before our formatter runs)."""
    fmt = logs.JsonFormatter()

    def rec(msg, args):
        return logging.LogRecord("t", logging.INFO, __file__, 1, msg, args, None)
    a = json.loads(fmt.format(rec("%d things", ("not a number",))))
    b = json.loads(fmt.format(rec("%s and %s", (1,))))
    assert a["message"] == "%d things (log arguments did not fit the message)"
    assert b["message"].startswith("%s and %s")
    assert "things" in logs.HumanFormatter().format(rec("%d things", ("x",)))


def test_setup_logging_choices(monkeypatch, capture):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    h = logs.setup_logging("info", "auto", stream=io.StringIO())
    assert isinstance(h.formatter, logs.JsonFormatter)  # not a terminal: JSON
    assert h in logging.getLogger().handlers
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w", closefd=True) as tty:
            h2 = logs.setup_logging("info", "auto", stream=tty)
            assert isinstance(h2.formatter, logs.HumanFormatter)
            assert h not in logging.getLogger().handlers  # replaced, not stacked
            monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
            h3 = logs.setup_logging("info", "auto", stream=tty)
            assert isinstance(h3.formatter, logs.JsonFormatter)
            logging.getLogger().removeHandler(h3)
    finally:
        os.close(master)
    with pytest.raises(ValueError, match="allowed: debug"):
        logs.setup_logging("loud")
    with pytest.raises(ValueError, match="allowed: json"):
        logs.setup_logging("info", "xml")


def test_register_secret_inputs():
    logs.forget_registered_secrets()
    try:
        logs.register_secret("abcd-text")
        logs.register_secret(b"\x00\x01\x02\x03\x04")
        logs.register_secret(b"ab")  # too short to scrub: ignored
        assert logs.scrub("x abcd-text y 0001020304 ab") == "x <redacted> y <redacted> ab"
        with pytest.raises(TypeError):
            logs.register_secret(12345)
        assert "abcd" not in repr(logs._needles)
    finally:
        logs.forget_registered_secrets()


def test_is_secret_name():
    for name in ("psk", "PSK", "psk_file_content", "shared_secret", "private_key", "SK_d", "sk_ei", "key", "ike_key",
                 "password", "keymat", "SKEYSEED", "keys"):
        assert logs.is_secret_name(name), name
    for name in ("tunnel", "spi", "spi_in", "peer", "key_exchange", "keyring_size", "monkey", "state"):
        assert not logs.is_secret_name(name), name


@pytest.mark.parametrize("fmt", ["json", "human"])
def test_a_loaded_config_logs_without_its_secrets(capture, tmp_path, fmt):
    """The real config model (PSK tunnel + certificate tunnel) logged whole, as a daemon might."""
    buf, plain = capture(fmt)
    write_psk(tmp_path)
    pki = make_pki(tmp_path)
    path = write_config(tmp_path, tunnel("") + f"""\
  to-c:
    remote: 203.0.113.7
    auth: {{certificate: {pki['certificate']}, key: {pki['key']}, ca: {pki['ca']}}}
""")
    config = load_config(path)
    key_pem = pki["key"].read_text()
    key_body = "".join(key_pem.strip().splitlines()[1:-1])
    log = logging.getLogger("isthmus.daemon")
    log.info("loaded %s", config)
    log.info(f"loaded {config!r}")
    log.info("tunnels", extra={"config": config, "auth": config.tunnels["to-c"].auth,
                               "to_b": config.tunnels["to-b"]})
    out, control = buf.getvalue(), plain.getvalue()
    assert "to-b" in out and "to-c" in out
    for leak in (PSK, PSK.encode().hex(), key_body[:40], key_body[-40:], "BEGIN PRIVATE KEY"):
        assert leak not in out, f"{leak!r} leaked"
    assert "BEGIN PRIVATE KEY" not in control  # the model's own repr already hides it; nothing to undo


def test_scrub_leaves_words_ending_in_b_alone():
    """A name such as "xfrm-b" before a quote is text, not a bytes literal (it mangled log lines)."""
    from appliance.logs import scrub

    assert scrub('reconciled: ["xfrm-b", "x"]') == 'reconciled: ["xfrm-b", "x"]'
    assert scrub("keys=[b'\\x01\\x02', b\"k\"]") == "keys=[<bytes>, <bytes>]"


def test_lines_logged_in_one_loop_round_are_flushed_once_and_outside_a_loop_each():
    import asyncio
    import io

    from appliance.logs import LineBatchingHandler

    class Stream(io.StringIO):
        flushes = 0

        def flush(self):
            Stream.flushes += 1
            super().flush()

    stream = Stream()
    h = LineBatchingHandler(stream)
    lg = logging.getLogger("isthmus.test.batching")
    lg.propagate = False
    lg.addHandler(h)
    lg.setLevel(logging.INFO)
    try:
        lg.info("one")
        assert Stream.flushes == 1 and stream.getvalue() == "one\n"

        async def burst():
            lg.info("two")
            lg.info("three")
            assert Stream.flushes == 1          # written, not yet flushed
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            return Stream.flushes

        assert asyncio.run(burst()) == 2
        assert stream.getvalue() == "one\ntwo\nthree\n"
    finally:
        lg.removeHandler(h)
