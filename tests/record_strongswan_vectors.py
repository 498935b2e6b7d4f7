"""Record strongSwan <-> strongSwan IKEv2 conversations as conformance vectors (run by hand).

Two charon daemons (tests/peers/strongswan.py harness, kernel-libipsec on the host) in two
network namespaces; tcpdump captures the IKE datagrams on the responder's veth; both daemons log
IKE at level 4 (shared secrets, SKEYSEED, SK_*) and CHD at level 4 (Child SA keys). Each
scenario: A initiates, A rekeys the Child SA, S (the responder) rekeys the IKE SA, A rekeys the
Child SA again on the new IKE SA, A terminates.

    python tests/record_strongswan_vectors.py --out tests/data/strongswan [--peers-from DIR]

Certificate scenarios (cert-*) authenticate with a test PKI instead of the PSK and keep its
certificates (ca.pem, intermediate.pem, cert-A.pem, cert-S.pem; no private key).

NAT traversal scenarios (natt-*): A sits behind a masquerading middle namespace
(tests/peers/nat.py: A 10.0.0.1, the NAT's public address 192.0.2.254, S 192.0.2.2). The capture
is on S's veth, so it holds the translated source address and ports; the conversation floats to
UDP 4500 in IKE_AUTH (non-ESP marker), A sends NAT keepalives every 2 s (they are in the capture
too), and vector.json's "nat" records both sides of the NAT: A's inside endpoints and the public
ones the NAT mapped them to (its conntrack table while the IKE SA was up).

Writes one directory per scenario (charon-A.log, charon-S.log, ike.pcap, vector.json); the
unit tests in tests/unit/ike/ (test_strongswan_vectors.py, test_engine_vectors.py,
test_message.py) read them with tests/vectors.py. The charon logs are reduced to the lines the
tests read (the hex dumps of the IKE and CHD groups, the CHILD_SA/IKE_SA state lines) to keep
the files small.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PSK = "recorded-Vector-psk-0123456789"
SCENARIOS = {
    # name: (IKE proposal, ESP proposal)
    "aes128gcm16-prfsha256-ecp256_esp-aes128gcm16-ecp256": (
        "aes128gcm16-prfsha256-ecp256", "aes128gcm16-ecp256"),
    "aes256-sha384-modp3072_esp-aes256-sha512": (
        "aes256-sha384-modp3072", "aes256-sha512"),
    "chacha20poly1305-prfsha512-x448_esp-chacha20poly1305-x25519": (
        "chacha20poly1305-prfsha512-x448", "chacha20poly1305-x25519"),
}
# certificate authentication (RFC 7427 signatures, CERT/CERTREQ): name: (IKE, ESP, PKI kind).
# ECDSA only: with RSA-2048 certificates the IKE_AUTH messages exceed the veth MTU, go out as IP
# fragments, and tests/vectors.py's pcap reader does not reassemble IP fragments.
CERT_SCENARIOS = {
    "cert-ecdsa_aes256gcm16-prfsha384-x25519": ("aes256gcm16-prfsha384-x25519", "aes256gcm16", "ecdsa"),
}
# NAT traversal (RFC 7296 §2.23, RFC 3948): A behind a masquerading NAT. name: (IKE, ESP).
NAT_SCENARIOS = {
    "natt-psk_aes256gcm16-prfsha384-x25519": ("aes256gcm16-prfsha384-x25519", "aes256gcm16"),
}
NAT_KEEPALIVE = 2   # seconds (charon's keep_alive), so that keepalives are in the capture
_KEEP = re.compile(r"\[(IKE|CHD)\]|CHILD_SA .*established|IKE_SA .*(established|rekeyed)|"
                   r"establishing CHILD_SA|\d+: [0-9A-F]{2} ")


def reduce_log(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if _KEEP.search(line)) + "\n"


@contextlib.contextmanager
def _sides(natted: bool):
    """(A's side, S's side, the Nat or None)."""
    if natted:
        from tests.peers.nat import natted_namespaces

        with natted_namespaces("vecn") as (inside, nat, outside):
            yield inside, outside, nat
    else:
        from tests.peers.topology import pair_of_namespaces

        with pair_of_namespaces("vec") as (a, b):
            yield a, b, None


def record(name: str, ike: str, esp: str, out: Path, pki_kind: str | None = None,
           natted: bool = False) -> None:
    """With `pki_kind`, both sides authenticate with certificates of a test PKI (root ->
    intermediate -> end entity, tests/peers/certs.py); the certificates (no keys) are kept in
    the vector directory. With `natted`, A is behind a NAT (tests/peers/nat.py)."""
    from tests.peers.certs import TestPKI
    from tests.peers.nat import PUBLIC
    from tests.peers.strongswan import Child, Conn, StrongSwan

    out.mkdir(parents=True, exist_ok=True)
    levels = {"ike": 4, "chd": 4, "cfg": 1, "enc": 1, "net": 1, "knl": 1}
    nat_meta: dict | None = None
    with tempfile.TemporaryDirectory() as tmp, _sides(natted) as (a, b, nat):
        pcap = out / "ike.pcap"
        dump = subprocess.Popen(
            ["ip", "netns", "exec", b.name, "tcpdump", "-i", b.ifname, "-U", "-s", "0", "-w",
             str(pcap), "udp port 500 or udp port 4500"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        try:
            auth = dict(psk=PSK) if pki_kind is None else dict(auth="pubkey", cert="me.pem")
            conn = Conn(local_addrs=[a.addr4], remote_addrs=[b.addr4], local_id="a.example.net",
                        remote_id="b.example.net", proposals=[ike], **auth,
                        children=[Child(esp_proposals=[esp], local_ts=["0.0.0.0/0"],
                                        remote_ts=["0.0.0.0/0"])],
                        dpd_delay=None, mobike=False)
            # behind the NAT, S sees (and answers) A at the NAT's public address
            s_conn = conn.mirrored() if nat is None else conn.mirrored(remote_addrs=[PUBLIC])
            a_settings = {} if nat is None else {"keep_alive": NAT_KEEPALIVE}
            with StrongSwan(Path(tmp) / "A", a.name, name="A", log_levels=levels,
                            charon=a_settings) as sa, \
                    StrongSwan(Path(tmp) / "S", b.name, name="S", log_levels=levels) as ss:
                if pki_kind is not None:
                    pki = TestPKI(pki_kind)
                    for who, sw, ident in (("A", sa, "a.example.net"), ("S", ss, "b.example.net")):
                        cred = pki.issue(ident)
                        pki.write_strongswan(sw.swanctl_dir, cred, "me")
                        (out / f"cert-{who}.pem").write_bytes(cred.cert_pem)
                    (out / "ca.pem").write_bytes(pki.root_pem)
                    (out / "intermediate.pem").write_bytes(pki.intermediate_pem)
                ss.load(s_conn)
                sa.load(conn)
                sa.initiate("c")
                up = sa.wait_ike_up()
                if nat is not None:
                    seen = ss.wait_ike_up()
                    if not (up.nat_local and seen.nat_remote and up.local_port == 4500
                            and seen.remote_host == PUBLIC and up.installed()[0].encap):
                        raise RuntimeError(f"no NAT traversal: A {up}, S {seen}")
                    # A's inside endpoints and the public ones the NAT mapped them to
                    nat_meta = {
                        "public_addr": PUBLIC, "initiator_inside_addr": a.addr4,
                        "mappings": sorted(
                            ({"inside": [addr, port], "public": [PUBLIC, public]}
                             for addr, port, public in nat.mappings() if port in (500, 4500)),
                            key=lambda m: m["inside"][1]),
                        "keepalive_interval": NAT_KEEPALIVE,
                        # what each charon said over vici once the Child SA was up
                        "strongswan_state": {role: {
                            "local": [sa_.local_host, sa_.local_port],
                            "remote": [sa_.remote_host, sa_.remote_port],
                            "nat_local": sa_.nat_local, "nat_remote": sa_.nat_remote,
                            "nat_fake": sa_.nat_fake, "child_encap": sa_.installed()[0].encap,
                        } for role, sa_ in (("initiator", up), ("responder", seen))},
                    }
                    time.sleep(NAT_KEEPALIVE + 0.5)   # at least one keepalive in the capture
                m = sa.mark()
                sa.rekey(child="c")
                sa.wait_event("child-rekey", timeout=15, since=m)
                time.sleep(0.5)
                m = ss.mark()
                ss.rekey(ike="p")
                ss.wait_event("ike-rekey", timeout=15, since=m)
                time.sleep(0.5)
                m = sa.mark()
                sa.rekey(child="c")
                sa.wait_event("child-rekey", timeout=15, since=m)
                time.sleep(0.5)
                sa.terminate(ike="p")
                ss.wait_no_ike()
                time.sleep(0.5)
                for who, sw in (("A", sa), ("S", ss)):
                    (out / f"charon-{who}.log").write_text(reduce_log(sw.log_text()))
        finally:
            dump.send_signal(signal.SIGINT)
            dump.wait(10)
    (out / "vector.json").write_text(json.dumps({
        "psk": PSK if pki_kind is None else "", "auth": "psk" if pki_kind is None else "pubkey",
        "recorded_at": int(time.time()), "initiator_id": "a.example.net", "responder_id": "b.example.net",
        "initiator_addr": a.addr4, "responder_addr": b.addr4, "ike_proposal": ike,
        "esp_proposal": esp, "logs": {"initiator": "charon-A.log", "responder": "charon-S.log"},
        "sequence": "A initiates; A rekeys the Child SA; S rekeys the IKE SA; A rekeys the "
                    "Child SA; A terminates",
        "strongswan": subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "charon-systemd"],
                                     capture_output=True, text=True).stdout,
        "kernel_backend": "kernel-libipsec (host): Child SAs are UDP-encapsulated",
        **({} if nat_meta is None else {
            "nat": nat_meta,
            "capture": "on S's side of the NAT: A appears at the public address and ports",
            "sequence": "A (behind the NAT) initiates, IKE_AUTH floats to 4500; A sends NAT "
                        "keepalives; A rekeys the Child SA; S rekeys the IKE SA; A rekeys the "
                        "Child SA; A terminates"}),
    }, indent=2) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--peers-from", type=Path, default=Path(__file__).resolve().parent.parent,
                    help="repository root that has tests/peers (default: this one)")
    ap.add_argument("--only", action="append", help="scenario name(s) to record")
    args = ap.parse_args()
    sys.path.insert(0, str(args.peers_from))
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    for name, (ike, esp) in SCENARIOS.items():
        if args.only and name not in args.only:
            continue
        print(f"recording {name} ...", flush=True)
        record(name, ike, esp, args.out / name)
    for name, (ike, esp, kind) in CERT_SCENARIOS.items():
        if args.only and name not in args.only:
            continue
        print(f"recording {name} ...", flush=True)
        record(name, ike, esp, args.out / name, kind)
    for name, (ike, esp) in NAT_SCENARIOS.items():
        if args.only and name not in args.only:
            continue
        print(f"recording {name} ...", flush=True)
        record(name, ike, esp, args.out / name, natted=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
