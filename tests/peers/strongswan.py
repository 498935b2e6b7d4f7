"""A real strongSwan (Debian's charon-systemd 5.9.8) as a test peer.

Each `StrongSwan` instance is one charon daemon with a private directory: its own strongswan.conf
(pointed to by STRONGSWAN_CONF), its own vici socket, file log, swanctl directory (SWANCTL_DIR)
and optionally its own network namespace, so several run side by side. Tunnels are described
with `Conn`/`Child`, rendered to swanctl.conf and loaded with `swanctl --load-all`; control and
queries go over vici (tests/peers/vici.py): initiate, terminate, rekey, list_sas, and events.

Where Child SAs go (see tests/peers/README.md for the reasoning):

- `kernel="libipsec"` (the default on the host, whose kernel has no ESP): the kernel-libipsec
  plugin keeps SAs in charon's own userspace ESP over a TUN device. strongSwan then *requires*
  UDP encapsulation and fakes NAT detection (RFC 7296 §2.23 NAT_DETECTION_SOURCE_IP with a
  random hash), so every Child SA it negotiates is ESP-in-UDP on port 4500 (`encap=True`).
- `kernel="netlink"` (the default inside the lab guest): SAs go into the Linux XFRM state with
  their `if_id`, as on a production gateway; no encapsulation unless there is a real NAT.

Child SA keys: with `log_keys=True` charon logs KEYMAT (RFC 7296 §2.17) at level 4 in its CHD
group; `list_sas()` attaches them to each Child SA as `keys` (inbound/outbound). These are test
keys of a test daemon; they live only in the instance's work directory.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

from tests.peers import vici

CHARON = os.environ.get("ISTHMUS_CHARON", "/usr/sbin/charon-systemd")
SWANCTL = os.environ.get("ISTHMUS_SWANCTL", "/usr/sbin/swanctl")
IN_LAB = os.environ.get("ISTHMUS_IN_LAB") == "1"

# Plugins charon loads: crypto (openssl has X25519/X448/ECP/MODP, AES-GCM, ChaCha20-Poly1305),
# credentials, the kernel backend, sockets and vici. Nothing else, so start-up is quick.
_BASE_PLUGINS = "random nonce openssl pem pkcs1 pkcs8 x509 pubkey constraints revocation gcm aes sha2 hmac kdf"
_SWANCTL_PLUGINS = "random nonce openssl pem pkcs1 pkcs8 x509 pubkey"

T = TypeVar("T")


class StrongSwanError(AssertionError):
    """A strongSwan operation failed; the message carries charon's own words (log excerpt)."""


# ---------------------------------------------------------------------------------------------
# Configuration: swanctl.conf (connections + secrets) and strongswan.conf (the daemon)
# ---------------------------------------------------------------------------------------------

@dataclass
class Child:
    """A CHILD_SA configuration (swanctl.conf `connections.<conn>.children.<name>`)."""

    name: str = "c"
    local_ts: Sequence[str] = ("0.0.0.0/0", "::/0")
    remote_ts: Sequence[str] = ("0.0.0.0/0", "::/0")
    esp_proposals: Sequence[str] = ("aes256gcm16",)
    if_id_in: int | None = 42
    if_id_out: int | None = 42
    rekey_time: int | None = None     # seconds; None = strongSwan's default (1 h)
    life_time: int | None = None
    rand_time: int | None = None
    start_action: str = "none"        # none | trap | start
    dpd_action: str | None = None     # clear | trap | restart (what to do when DPD declares the peer dead)
    close_action: str | None = None
    mode: str = "tunnel"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        s: dict[str, Any] = {
            "local_ts": list(self.local_ts), "remote_ts": list(self.remote_ts),
            "esp_proposals": list(self.esp_proposals), "mode": self.mode,
            "start_action": self.start_action,
        }
        for k in ("if_id_in", "if_id_out", "rekey_time", "life_time", "rand_time", "dpd_action", "close_action"):
            v = getattr(self, k)
            if v is not None:
                s[k] = v
        s.update(self.extra)
        return s


@dataclass
class Conn:
    """An IKE_SA configuration (swanctl.conf `connections.<name>`) plus its PSK, if any.

    `auth="psk"` needs `psk`; `auth="pubkey"` needs `cert` (file name in x509/, see
    tests/peers/certs.py) and trusts the CAs placed in x509ca/.
    """

    name: str = "p"
    local_addrs: Sequence[str] = ("%any",)
    remote_addrs: Sequence[str] = ("%any",)
    local_id: str | None = None
    remote_id: str | None = None
    auth: str = "psk"
    psk: str | None = field(default=None, repr=False)
    cert: str | None = None
    proposals: Sequence[str] = ("aes256gcm16-prfsha384-x25519",)
    children: Sequence[Child] = (Child(),)
    rekey_time: int | None = None     # IKE SA rekey (seconds); None = default (4 h)
    over_time: int | None = None
    rand_time: int | None = None
    reauth_time: int | None = None
    dpd_delay: int | None = None      # seconds of idleness before an empty INFORMATIONAL (RFC 7296 §2.4)
    local_port: int | None = None
    remote_port: int | None = None
    encap: bool | None = None
    mobike: bool | None = None
    fragmentation: str | None = None
    keyingtries: int | None = 1
    unique: str | None = None
    send_certreq: bool | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        s: dict[str, Any] = {"version": 2, "local_addrs": list(self.local_addrs),
                             "remote_addrs": list(self.remote_addrs), "proposals": list(self.proposals)}
        for k in ("rekey_time", "over_time", "rand_time", "reauth_time", "dpd_delay", "local_port",
                  "remote_port", "encap", "mobike", "fragmentation", "keyingtries", "unique", "send_certreq"):
            v = getattr(self, k)
            if v is not None:
                s[k] = v
        local: dict[str, Any] = {"auth": self.auth}
        remote: dict[str, Any] = {"auth": self.auth}
        if self.local_id:
            local["id"] = self.local_id
        if self.remote_id:
            remote["id"] = self.remote_id
        if self.auth == "pubkey":
            if not self.cert:
                raise ValueError(f"connection {self.name!r}: auth=pubkey needs `cert` (a file name in x509/)")
            local["certs"] = self.cert
        elif self.auth == "psk":
            if self.psk is None:
                raise ValueError(f"connection {self.name!r}: auth=psk needs `psk`")
        else:
            raise ValueError(f"connection {self.name!r}: auth must be 'psk' or 'pubkey', not {self.auth!r}")
        s["local"] = local
        s["remote"] = remote
        s["children"] = {c.name: c.settings() for c in self.children}
        s.update(self.extra)
        return s

    def mirrored(self, **changes: Any) -> "Conn":
        """The same tunnel seen from the other end (addresses, IDs and ports swapped)."""
        import dataclasses
        base = dataclasses.replace(
            self, local_addrs=self.remote_addrs, remote_addrs=self.local_addrs,
            local_id=self.remote_id, remote_id=self.local_id,
            local_port=self.remote_port, remote_port=self.local_port,
            children=tuple(dataclasses.replace(c, local_ts=c.remote_ts, remote_ts=c.local_ts)
                           for c in self.children))
        return dataclasses.replace(base, **changes)


_BARE = re.compile(r"^[A-Za-z0-9_.:/%@*=+-]+$")


def _conf_value(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return ", ".join(_conf_value(x) for x in v)
    s = str(v)
    if _BARE.match(s):
        return s
    if '"' in s or "\\" in s or "\n" in s:
        raise ValueError(f"cannot write {s!r} into swanctl.conf (quotes, backslashes, newlines)")
    return f'"{s}"'


def render_settings(tree: Mapping[str, Any], indent: int = 0) -> str:
    """Render a nested dict in the strongswan.conf/swanctl.conf syntax (`name { key = value }`)."""
    pad = "    " * indent
    out = []
    for k, v in tree.items():
        if v is None:
            continue
        if isinstance(v, Mapping):
            out.append(f"{pad}{k} {{\n{render_settings(v, indent + 1)}{pad}}}\n")
        else:
            out.append(f"{pad}{k} = {_conf_value(v)}\n")
    return "".join(out)


def render_swanctl_conf(conns: Iterable[Conn]) -> str:
    """swanctl.conf text for these connections and their PSKs (written as 0x-hex so that any
    byte string is safe in the file)."""
    conns = list(conns)
    connections = {c.name: c.settings() for c in conns}
    secrets: dict[str, Any] = {}
    for c in conns:
        if c.auth == "psk":
            ids = {f"id-{n}": i for n, i in (("local", c.local_id), ("remote", c.remote_id)) if i}
            secrets[f"ike-{c.name}"] = {**ids, "secret": "0x" + c.psk.encode().hex()}  # type: ignore[union-attr]
    return render_settings({"connections": connections, "secrets": secrets})


@dataclass
class Retransmit:
    """charon's retransmission schedule (RFC 7296 §2.1/§2.4): it also bounds how long DPD takes
    to declare a silent peer dead. Timeout n is `timeout * base**n`; give up after `tries`."""

    tries: int = 3
    timeout: float = 0.5
    base: float = 1.4
    jitter: int = 0

    def give_up_after(self) -> float:
        return sum(self.timeout * self.base ** n for n in range(self.tries + 1))


def render_strongswan_conf(*, workdir: Path, kernel: str, log_levels: Mapping[str, int],
                           retransmit: Retransmit, port: int, port_nat_t: int,
                           charon: Mapping[str, Any] | None = None) -> str:
    plugins = _BASE_PLUGINS + (" kernel-libipsec" if kernel == "libipsec" else "") + " kernel-netlink socket-default vici"
    log = {"path": str(workdir / "charon.log"), "append": False, "flush_line": True, "ike_name": True,
           "time_format": "%T", "time_add_ms": True, **log_levels}
    section: dict[str, Any] = {
        "load": plugins,
        "port": port,
        "port_nat_t": port_nat_t,
        "install_routes": False,
        "install_virtual_ip": False,
        "routing_table": 0,
        "retransmit_tries": retransmit.tries,
        "retransmit_timeout": retransmit.timeout,
        "retransmit_base": retransmit.base,
        "retransmit_jitter": retransmit.jitter,
        "plugins": {"vici": {"socket": f"unix://{workdir / 'charon.vici'}"}},
        "journal": {"default": -1},
        "syslog": {"daemon": {"default": -1}},
        "filelog": {"main": log},
    }
    if charon:
        section.update(charon)
    return render_settings({"charon-systemd": section, "swanctl": {"load": _SWANCTL_PLUGINS}})


# ---------------------------------------------------------------------------------------------
# What list_sas() returns
# ---------------------------------------------------------------------------------------------

@dataclass
class ChildKeys:
    """KEYMAT of one Child SA (RFC 7296 §2.17), split by direction. For AES-GCM the encryption
    key includes the 4-byte salt (RFC 4106 §8.1), as strongSwan and XFRM carry it."""

    encr_in: bytes = field(repr=False)
    encr_out: bytes = field(repr=False)
    integ_in: bytes = field(default=b"", repr=False)
    integ_out: bytes = field(default=b"", repr=False)


def _int(v: Any, base: int = 10) -> int | None:
    if v is None or v == "":
        return None
    return int(v, base)


def _yes(v: Any) -> bool:
    return v == "yes"


@dataclass
class ChildSa:
    name: str
    uniqueid: int
    reqid: int | None
    state: str
    mode: str
    protocol: str
    encap: bool
    spi_in: str
    spi_out: str
    encr_alg: str | None
    encr_keysize: int | None
    integ_alg: str | None
    dh_group: str | None
    esn: bool
    if_id_in: int | None
    if_id_out: int | None
    bytes_in: int
    bytes_out: int
    rekey_time: int | None
    life_time: int | None
    install_time: int | None
    local_ts: list[str]
    remote_ts: list[str]
    keys: ChildKeys | None = None

    @classmethod
    def from_vici(cls, d: Mapping[str, Any]) -> "ChildSa":
        return cls(
            name=d.get("name", ""), uniqueid=int(d["uniqueid"]), reqid=_int(d.get("reqid")),
            state=d.get("state", ""), mode=d.get("mode", ""), protocol=d.get("protocol", ""),
            encap=_yes(d.get("encap")), spi_in=d.get("spi-in", ""), spi_out=d.get("spi-out", ""),
            encr_alg=d.get("encr-alg"), encr_keysize=_int(d.get("encr-keysize")),
            integ_alg=d.get("integ-alg"), dh_group=d.get("dh-group"), esn=d.get("esn") == "1",
            if_id_in=_int(d.get("if-id-in"), 16), if_id_out=_int(d.get("if-id-out"), 16),
            bytes_in=_int(d.get("bytes-in")) or 0, bytes_out=_int(d.get("bytes-out")) or 0,
            rekey_time=_int(d.get("rekey-time")), life_time=_int(d.get("life-time")),
            install_time=_int(d.get("install-time")),
            local_ts=list(d.get("local-ts", [])), remote_ts=list(d.get("remote-ts", [])))

    @property
    def spi_in_int(self) -> int:
        return int(self.spi_in, 16)

    @property
    def spi_out_int(self) -> int:
        return int(self.spi_out, 16)

    @property
    def proposal(self) -> str:
        """strongSwan's own spelling, e.g. `AES_GCM_16-256` or `AES_CBC-256/HMAC_SHA2_256_128`."""
        p = f"{self.encr_alg}-{self.encr_keysize}" if self.encr_keysize else f"{self.encr_alg}"
        if self.integ_alg:
            p += f"/{self.integ_alg}"
        if self.dh_group:
            p += f"/{self.dh_group}"
        return p


@dataclass
class IkeSa:
    name: str
    uniqueid: int
    state: str
    local_host: str
    local_port: int | None
    local_id: str
    remote_host: str
    remote_port: int | None
    remote_id: str
    initiator: bool
    spi_i: str
    spi_r: str
    nat_local: bool
    nat_remote: bool
    nat_fake: bool
    nat_any: bool
    encr_alg: str | None
    encr_keysize: int | None
    integ_alg: str | None
    prf_alg: str | None
    dh_group: str | None
    established: int | None
    rekey_time: int | None
    tasks: dict[str, list[str]]
    children: list[ChildSa]

    @classmethod
    def from_vici(cls, name: str, d: Mapping[str, Any]) -> "IkeSa":
        children = [ChildSa.from_vici(c) for c in (d.get("child-sas") or {}).values()]
        return cls(
            name=name, uniqueid=int(d["uniqueid"]), state=d.get("state", ""),
            local_host=d.get("local-host", ""), local_port=_int(d.get("local-port")), local_id=d.get("local-id", ""),
            remote_host=d.get("remote-host", ""), remote_port=_int(d.get("remote-port")),
            remote_id=d.get("remote-id", ""), initiator=_yes(d.get("initiator")),
            spi_i=d.get("initiator-spi", ""), spi_r=d.get("responder-spi", ""),
            nat_local=_yes(d.get("nat-local")), nat_remote=_yes(d.get("nat-remote")),
            nat_fake=_yes(d.get("nat-fake")), nat_any=_yes(d.get("nat-any")),
            encr_alg=d.get("encr-alg"), encr_keysize=_int(d.get("encr-keysize")), integ_alg=d.get("integ-alg"),
            prf_alg=d.get("prf-alg"), dh_group=d.get("dh-group"), established=_int(d.get("established")),
            rekey_time=_int(d.get("rekey-time")),
            tasks={k: list(d.get(f"tasks-{k}", [])) for k in ("queued", "active", "passive")},
            children=children)

    @property
    def proposal(self) -> str:
        """strongSwan's spelling, e.g. `AES_GCM_16-256/PRF_HMAC_SHA2_384/CURVE_25519`."""
        e = f"{self.encr_alg}-{self.encr_keysize}" if self.encr_keysize else f"{self.encr_alg}"
        parts = [e] + ([self.integ_alg] if self.integ_alg else []) + [self.prf_alg or "", self.dh_group or ""]
        return "/".join(parts)

    def installed(self, name: str | None = None) -> list[ChildSa]:
        return [c for c in self.children if c.state == "INSTALLED" and (name is None or c.name == name)]


# ---------------------------------------------------------------------------------------------
# Child SA keys from charon's level-4 CHD log
# ---------------------------------------------------------------------------------------------

_LINE = re.compile(r"^\S+ (?P<thread>\d+)\[(?P<group>\w+)\] (?:<[^>]*> )?(?P<msg>.*)$")
_KEYHDR = re.compile(r"^(encryption|integrity) (initiator|responder) key => (\d+) bytes")
_DUMP = re.compile(r"^\s*\d+: ((?:[0-9A-F]{2} ?)+)")
_ESTABLISHED = re.compile(r"(?:(?:in|out)bound )?CHILD_SA \S+\{(\d+)\} established with SPIs ([0-9a-f]+)_i ([0-9a-f]+)_o")
_ESTABLISHING = re.compile(r"establishing CHILD_SA \S+\{(\d+)\}")


def child_keys_from_log(text: str) -> dict[int, ChildKeys]:
    """Map each Child SA's unique id to its keys, from a charon log with `chd = 4`.

    charon derives the keys and installs the SA within one job on one thread, logging
    "encryption initiator key => ..." (with a hex dump) and then "CHILD_SA name{N} established
    with SPIs ...". The initiator of the exchange that created the SA (it logged "establishing
    CHILD_SA name{N}") sends with the initiator's keys (RFC 7296 §2.17).
    """
    pending: dict[str, dict[str, bytes]] = {}   # per thread: the last keys seen
    dumping: dict[str, tuple[str, int, bytearray]] = {}
    initiated: set[int] = set()
    raw: dict[int, dict[str, bytes]] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        th, msg = m["thread"], m["msg"]
        if th in dumping:
            d = _DUMP.match(msg)
            if d:
                label, size, buf = dumping[th]
                buf += bytes.fromhex(d[1].replace(" ", ""))[: size - len(buf)]
                if len(buf) >= size:
                    pending.setdefault(th, {})[label] = bytes(buf)
                    del dumping[th]
                continue
            del dumping[th]
        k = _KEYHDR.match(msg)
        if k:
            label = f"{k[1][:5]}_{k[2][0]}"   # encry_i / integ_r ...
            size = int(k[3])
            if size == 0:
                pending.setdefault(th, {})[label] = b""
            else:
                dumping[th] = (label, size, bytearray())
            continue
        e = _ESTABLISHING.search(msg)
        if e:
            initiated.add(int(e[1]))
            continue
        s = _ESTABLISHED.search(msg)
        if s:
            uid = int(s[1])
            if uid not in raw and th in pending:
                raw[uid] = pending.pop(th)
    keys = {}
    for uid, r in raw.items():
        mine, theirs = ("i", "r") if uid in initiated else ("r", "i")
        keys[uid] = ChildKeys(encr_out=r.get(f"encry_{mine}", b""), encr_in=r.get(f"encry_{theirs}", b""),
                              integ_out=r.get(f"integ_{mine}", b""), integ_in=r.get(f"integ_{theirs}", b""))
    return keys


# ---------------------------------------------------------------------------------------------
# The daemon
# ---------------------------------------------------------------------------------------------

_RUNNING: set["StrongSwan"] = set()


@atexit.register
def _kill_leftovers() -> None:
    """Daemons run in their own session (Ctrl-C does not reach them): never leave one behind."""
    for d in list(_RUNNING):
        d.kill()


DEFAULT_LOG_LEVELS = {"default": 1, "ike": 2, "cfg": 2, "knl": 1, "net": 1, "enc": 1, "chd": 2}
EVENTS = ("ike-updown", "child-updown", "ike-rekey", "child-rekey")


class StrongSwan:
    """One charon-systemd daemon in network namespace `ns` (None: the current one).

    Usage::

        with StrongSwan(tmp_path / "a", ns="ist-a-...") as a:
            a.load(Conn(local_addrs=["192.0.2.1"], remote_addrs=["192.0.2.2"], local_id="a.example",
                        remote_id="b.example", psk="..."))
            a.initiate("c")
            sa = a.wait_ike_up()
    """

    def __init__(self, workdir: Path | str, ns: str | None = None, *, name: str = "charon",
                 kernel: str | None = None, log_keys: bool = True,
                 log_levels: Mapping[str, int] | None = None,
                 retransmit: Retransmit | None = None, port: int = 500, port_nat_t: int = 4500,
                 charon: Mapping[str, Any] | None = None):
        self.workdir = Path(workdir)
        self.ns = str(ns) if ns is not None else None
        self.name = name
        self.kernel = kernel or ("netlink" if IN_LAB else "libipsec")
        if self.kernel not in ("libipsec", "netlink"):
            raise ValueError(f"kernel must be 'libipsec' or 'netlink', not {self.kernel!r}")
        self.log_keys = log_keys
        self.log_levels = dict(DEFAULT_LOG_LEVELS)
        if log_keys:
            self.log_levels["chd"] = 4
        self.log_levels.update(log_levels or {})
        self.retransmit = retransmit or Retransmit()
        self.port, self.port_nat_t = port, port_nat_t
        self.charon_settings = dict(charon or {})
        self.proc: subprocess.Popen | None = None
        self.events: vici.EventListener | None = None
        self._session: vici.Session | None = None
        self.conns: list[Conn] = []

    # -- paths --------------------------------------------------------------------------------
    @property
    def conf_path(self) -> Path:
        return self.workdir / "strongswan.conf"

    @property
    def socket_path(self) -> Path:
        return self.workdir / "charon.vici"

    @property
    def log_path(self) -> Path:
        return self.workdir / "charon.log"

    @property
    def swanctl_dir(self) -> Path:
        return self.workdir / "swanctl"

    def _env(self) -> dict[str, str]:
        return {**os.environ, "STRONGSWAN_CONF": str(self.conf_path), "SWANCTL_DIR": str(self.swanctl_dir)}

    def _argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv] if self.ns else list(argv)

    # -- life cycle -----------------------------------------------------------------------------
    def start(self, timeout: float = 15.0) -> "StrongSwan":
        self.workdir.mkdir(parents=True, exist_ok=True)
        for sub in ("x509", "x509ca", "x509ocsp", "x509aa", "x509ac", "x509crl", "pubkey", "private",
                    "rsa", "ecdsa", "bliss", "pkcs8", "pkcs12", "conf.d"):
            (self.swanctl_dir / sub).mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(render_strongswan_conf(
            workdir=self.workdir, kernel=self.kernel, log_levels=self.log_levels, retransmit=self.retransmit,
            port=self.port, port_nat_t=self.port_nat_t, charon=self.charon_settings))
        for stale in (self.socket_path, self.log_path):
            stale.unlink(missing_ok=True)
        out = open(self.workdir / "charon.out", "wb")
        self.proc = subprocess.Popen(self._argv([CHARON]), env=self._env(), stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        _RUNNING.add(self)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise StrongSwanError(f"{self.name}: charon exited with status {self.proc.returncode} at start-up\n"
                                      + self.diagnostics())
            if self.socket_path.exists():
                try:
                    self._session = vici.Session(str(self.socket_path))
                    break
                except OSError:
                    pass
            if time.monotonic() > deadline:
                self.kill()
                raise StrongSwanError(f"{self.name}: no vici socket after {timeout} s\n" + self.diagnostics())
            time.sleep(0.05)
        self.events = vici.EventListener(str(self.socket_path), EVENTS)
        return self

    def __enter__(self) -> "StrongSwan":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _drop_clients(self) -> None:
        if self.events:
            self.events.close()
            self.events = None
        if self._session:
            self._session.close()
            self._session = None

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM: charon deletes its IKE SAs (sends INFORMATIONAL DELETE) and exits."""
        if self.proc is None:
            return 0
        self._drop_clients()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise StrongSwanError(f"{self.name}: charon did not exit within {timeout} s of SIGTERM\n"
                                      + self.log_tail())
        _RUNNING.discard(self)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: the peer vanishes without a word (for DPD tests)."""
        self._drop_clients()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        _RUNNING.discard(self)

    def close(self) -> None:
        try:
            if self.running:
                self.stop()
        finally:
            self.kill()

    # -- configuration --------------------------------------------------------------------------
    def swanctl(self, *args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run `swanctl ARGS --uri <this daemon's socket>` (in its namespace)."""
        argv = self._argv([SWANCTL, *args, "--uri", f"unix://{self.socket_path}"])
        r = subprocess.run(argv, env=self._env(), capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise StrongSwanError(f"{self.name}: swanctl {' '.join(args)} failed ({r.returncode})\n"
                                  f"{r.stdout}{r.stderr}\n" + self.log_tail(20))
        return r

    def load(self, conns: Conn | Iterable[Conn]) -> None:
        """Write swanctl.conf for these connections and load it (`swanctl --load-all`);
        connections loaded before but not listed now are unloaded."""
        self.conns = [conns] if isinstance(conns, Conn) else list(conns)
        path = self.swanctl_dir / "swanctl.conf"
        path.write_text(render_swanctl_conf(self.conns))
        path.chmod(0o600)
        r = self.swanctl("--load-all", "--file", str(path))
        for c in self.conns:
            if f"loaded connection '{c.name}'" not in r.stdout:
                raise StrongSwanError(f"{self.name}: connection {c.name!r} not loaded:\n{r.stdout}{r.stderr}")

    # -- control ------------------------------------------------------------------------------
    @property
    def session(self) -> vici.Session:
        if self._session is None:
            raise StrongSwanError(f"{self.name}: charon is not running")
        return self._session

    def _command(self, cmd: str, msg: Mapping[str, Any], *, check: bool, stream: str | None = None,
                 ) -> tuple[dict[str, Any], list[str]]:
        body, events = self.session.streamed(cmd, msg, stream)
        logs = [e.get("msg", "") for e in events]
        if check and body.get("success") != "yes":
            raise StrongSwanError(f"{self.name}: {cmd} {dict(msg)} failed: {body.get('errmsg', body)}\n"
                                  + "\n".join(logs[-30:]) + "\n--- charon log (tail) ---\n" + self.log_tail(30))
        return body, logs

    def initiate(self, child: str | None = "c", ike: str | None = None, *, timeout: float = 15.0,
                 check: bool = True) -> tuple[bool, list[str]]:
        """Start an IKE SA and its Child SA; waits for the outcome. Returns (success, control log)."""
        msg = {"child": child, "ike": ike, "timeout": int(timeout * 1000), "loglevel": 1}
        body, logs = self._command("initiate", msg, check=check, stream="control-log")
        return body.get("success") == "yes", logs

    def initiate_async(self, child: str | None = "c", ike: str | None = None) -> None:
        """Start initiating and return at once (outcome via events / list_sas)."""
        self._command("initiate", {"child": child, "ike": ike, "timeout": -1}, check=False)

    def terminate(self, *, ike: str | None = None, child: str | None = None, ike_id: int | None = None,
                  child_id: int | None = None, force: bool = False, timeout: float = 10.0,
                  check: bool = True) -> tuple[bool, list[str]]:
        """Delete an SA with an INFORMATIONAL DELETE (RFC 7296 §1.4.1) and wait for the answer."""
        msg = {"ike": ike, "child": child, "ike-id": ike_id, "child-id": child_id,
               "force": "yes" if force else None, "timeout": int(timeout * 1000), "loglevel": 1}
        body, logs = self._command("terminate", msg, check=check, stream="control-log")
        return body.get("success") == "yes", logs

    def rekey(self, *, ike: str | None = None, child: str | None = None, ike_id: int | None = None,
              child_id: int | None = None, reauth: bool = False) -> None:
        """Queue a rekey (CREATE_CHILD_SA, RFC 7296 §1.3.2/§1.3.3); returns before it completes."""
        msg = {"ike": ike, "child": child, "ike-id": ike_id, "child-id": child_id,
               "reauth": "yes" if reauth else None}
        self._command("rekey", msg, check=True)

    def list_sas(self, ike: str | None = None) -> list[IkeSa]:
        """Every IKE SA with its Child SAs; Child SAs carry `keys` when `log_keys` is on."""
        _, events = self.session.streamed("list-sas", {"noblock": "yes", "ike": ike}, "list-sa")
        sas = [IkeSa.from_vici(name, d) for e in events for name, d in e.items()]
        if self.log_keys:
            keys = self.child_keys()
            for sa in sas:
                for c in sa.children:
                    c.keys = keys.get(c.uniqueid)
        return sas

    def child_keys(self) -> dict[int, ChildKeys]:
        return child_keys_from_log(self.log_text())

    def version(self) -> dict[str, Any]:
        return self.session.request("version")

    def counters(self) -> dict[str, int]:
        body = self.session.request("get-counters", {"all": "yes"})
        return {k: int(v) for k, v in (body.get("counters") or {}).items()}

    # -- waiting ------------------------------------------------------------------------------
    def wait_for(self, fn: Callable[[list[IkeSa]], T], timeout: float = 10.0, what: str = "condition") -> T:
        """Poll list_sas() until fn(sas) is truthy; return that value or fail with the log tail."""
        deadline = time.monotonic() + timeout
        sas: list[IkeSa] = []
        while True:
            if self.running:
                sas = self.list_sas()
                got = fn(sas)
                if got:
                    return got
            if time.monotonic() > deadline:
                raise StrongSwanError(f"{self.name}: timed out after {timeout} s waiting for {what}\n"
                                      f"SAs: {sas}\n--- charon log (tail) ---\n{self.log_tail(40)}")
            time.sleep(0.1)

    def wait_ike_up(self, name: str | None = None, timeout: float = 10.0, child: str | None = "c") -> IkeSa:
        """The single ESTABLISHED IKE SA (of conn `name`) once it has an INSTALLED child `child`."""
        def up(sas: list[IkeSa]) -> IkeSa | None:
            est = [s for s in sas if s.state == "ESTABLISHED" and (name is None or s.name == name)]
            if len(est) == 1 and (child is None or est[0].installed(child)):
                return est[0]
            return None
        return self.wait_for(up, timeout, f"one ESTABLISHED IKE SA {name or ''} with child {child}")

    def wait_no_ike(self, timeout: float = 10.0) -> None:
        self.wait_for(lambda sas: not sas or None, timeout, "no IKE SA left")  # type: ignore[arg-type]

    def wait_event(self, name: str, pred: Callable[[dict[str, Any]], bool] = lambda b: True,
                   timeout: float = 10.0, since: int = 0) -> dict[str, Any]:
        """The first vici event `name` (ike-updown, child-updown, ike-rekey, child-rekey) at or
        after index `since` (see `mark()`) whose body satisfies pred."""
        if self.events is None:
            raise StrongSwanError(f"{self.name}: not listening to events (charon not running)")
        ev = self.events.wait(lambda e: e.name == name and pred(e.body), timeout, since)
        if ev is None:
            seen = [e.name for e in self.events.events[since:]]
            raise StrongSwanError(f"{self.name}: no {name} event within {timeout} s (saw {seen})\n"
                                  + self.log_tail(40))
        return ev.body

    def mark(self) -> int:
        return self.events.mark() if self.events else 0

    # -- logs ---------------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        lines = [l for l in self.log_text().splitlines() if not _is_dump(l)]
        return "\n".join(lines[-n:])

    def log_has(self, pattern: str) -> bool:
        return re.search(pattern, self.log_text()) is not None

    def diagnostics(self) -> str:
        out = ""
        try:
            out = (self.workdir / "charon.out").read_text(errors="replace")
        except FileNotFoundError:
            pass
        return f"--- charon stdout/stderr ---\n{out}\n--- charon log (tail) ---\n{self.log_tail()}"


def _is_dump(line: str) -> bool:
    m = _LINE.match(line)
    return bool(m and (_DUMP.match(m["msg"]) or "bytes @ 0x" in m["msg"]))


def spis_match(a: IkeSa, b: IkeSa) -> bool:
    """Both ends see the same IKE SPIs and crossed Child SA SPIs (a's inbound = b's outbound)."""
    if (a.spi_i, a.spi_r) != (b.spi_i, b.spi_r):
        return False
    ca = sorted((c.spi_in, c.spi_out) for c in a.installed())
    cb = sorted((c.spi_out, c.spi_in) for c in b.installed())
    return ca == cb
