"""Two isthmusd with certificate authentication (issue 10 item 1): `auth: {certificate, key, ca,
crl}` accepted, the IKE SA negotiated with certificates, days left of both certificates in
`isthmus show tunnels` and the metrics, and a revoked certificate shown as the tunnel's state
`auth-failed` with the reason.

(The host kernel has no XFRM interfaces: the Child SA fails in the data plane after IKE_AUTH, as
in test_daemon_host.py; the IKE SA - where authentication happens - is what is checked here.)
"""

from __future__ import annotations

import json

import pytest

from tests.appliances import Appliance, wait_for
from tests.netns import Netns, veth_pair
from tests.peers.certs import TestPKI

pytestmark = pytest.mark.host


def config(tunnel: str, remote: str, local: str, start: bool, local_id: str, remote_id: str,
           crl: bool = False, name: str = "region") -> str:
    crls = ", crl: [pki/peer.crl]" if crl else ""
    return (f"appliance: {{name: {name}}}\ntunnels:\n  {tunnel}:\n    remote: {remote}\n    local: {local}\n"
            f"    local_id: {local_id}\n    remote_id: {remote_id}\n"
            f"    auth: {{certificate: pki/me.pem, key: pki/me.key, ca: [pki/root.pem]{crls}}}\n"
            f"    start: {'true' if start else 'false'}\n")


def install(app: Appliance, p: TestPKI, cred) -> None:
    d = app.etc / "pki"
    d.mkdir(exist_ok=True)
    (d / "me.pem").write_bytes(cred.bundle_pem)
    (d / "me.key").write_bytes(cred.key_pem)
    (d / "me.key").chmod(0o600)
    (d / "root.pem").write_bytes(p.root_pem)
    (d / "peer.crl").write_bytes(p.crl_pem())


@pytest.fixture
def pki():
    return TestPKI("ecdsa")


@pytest.fixture
def pair(tmp_path):
    with Netns("dca") as na, Netns("dcb") as nb:
        veth_pair(na, "wan", nb, "wan")
        na.run("ip addr add 192.0.2.1/24 dev wan")
        nb.run("ip addr add 192.0.2.2/24 dev wan")
        a = Appliance("A", na.name, tmp_path / "a", metrics_port=9481)
        b = Appliance("B", nb.name, tmp_path / "b", metrics_port=9482)
        try:
            yield a, b
        finally:
            for x in (a, b):
                x.kill()


def test_certificates_between_two_daemons_and_a_revoked_one(pair, pki):
    a, b = pair
    install(a, pki, pki.issue("a.example.net"))
    install(b, pki, pki.issue("b.example.net"))
    a.write_config(config("to-b", "192.0.2.2", "192.0.2.1", True, "a.example.net", "b.example.net", name="ra"))
    b.write_config(config("to-a", "192.0.2.1", "192.0.2.2", False, "b.example.net", "a.example.net", name="rb"))
    b.start()
    a.start()
    # IKE_AUTH with certificates succeeds (the host data plane then fails the Child SA)
    wait_for("B authenticated A's certificate", lambda: "authenticated with DIGITAL_SIGNATURE" in b.log_text(), 60,
             log_of=b)
    assert "authentication failed" not in a.log_text() + b.log_text()
    wait_for("A saw the IKE SA come up", lambda: "IKE SA up with" in a.log_text(), 30, log_of=a)
    rows = json.loads(a.cli("show", "tunnels", "--json").stdout)["tunnels"]
    assert rows[0]["cert_days_left"] == 29
    assert 'isthmus_certificate_days_left{tunnel="to-b",side="local"} 29' in a.metrics()
    text = a.cli("show", "tunnels").stdout
    assert "CERT DAYS" in text.splitlines()[0] and "PEER CERT DAYS" in text.splitlines()[0]
    # the peer's certificate as of its last authentication
    assert rows[0]["peer_cert_days_left"] == 29
    assert 'isthmus_certificate_days_left{tunnel="to-b",side="peer"} 29' in a.metrics()
    a.stop()
    b.stop()

    # A's certificate revoked in B's CRL: B refuses it, its tunnel state says so with the reason
    bad = pki.issue("a.example.net")
    pki.revoke(bad)
    install(a, pki, bad)
    install(b, pki, pki.issue("b.example.net"))
    b.write_config(config("to-a", "192.0.2.1", "192.0.2.2", False, "b.example.net", "a.example.net", crl=True,
                          name="rb"))
    b.start()
    a.start()
    row = wait_for("B's tunnel in state auth-failed",
                   lambda: (t := b.call("tunnels")["tunnels"][0])["state"] == "auth-failed" and t, 60, log_of=b)
    assert "(revoked)" in row["last_error"] and "keyCompromise" in row["last_error"]
    assert "(revoked)" in b.log_text()
    ra = wait_for("A's tunnel in state auth-failed",
                  lambda: (t := a.call("tunnels")["tunnels"][0])["state"] == "auth-failed" and t, 60, log_of=a)
    assert "AUTHENTICATION_FAILED" in ra["last_error"]
    out = b.cli("show", "tunnels").stdout
    assert "auth-failed" in out


def test_crl_from_the_distribution_point_refuses_a_revoked_peer(pair, pki, tmp_path):
    """A's certificate names a CRL distribution point on an HTTP server next to B (in B's
    namespace). B authenticates A once (nothing fetched yet), fetches the CRL the engine asked
    for, and refuses A's next attempt as revoked."""
    import subprocess
    import sys

    a, b = pair
    bad = pki.issue("a.example.net", cdp="http://192.0.2.2:8089/intermediate.crl")
    pki.revoke(bad)
    www = tmp_path / "www"
    www.mkdir()
    (www / "intermediate.crl").write_bytes(pki.crl_der())
    install(a, pki, bad)
    install(b, pki, pki.issue("b.example.net"))
    a.write_config(config("to-b", "192.0.2.2", "192.0.2.1", True, "a.example.net", "b.example.net", name="ra"))
    b.write_config(config("to-a", "192.0.2.1", "192.0.2.2", False, "b.example.net", "a.example.net", name="rb"))
    httpd = subprocess.Popen(["ip", "netns", "exec", b.ns, sys.executable, "-m", "http.server", "--bind", "192.0.2.2",
                              "--directory", str(www), "8089"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        b.start()
        a.start()
        wait_for("B authenticated A (no CRL yet)", lambda: "authenticated with DIGITAL_SIGNATURE" in b.log_text(), 60,
                 log_of=b)
        wait_for("B fetched the CRL", lambda: "intermediate.crl fetched" in b.log_text(), 30, log_of=b)
        a.stop()        # A initiates again at once (rather than after its back-off)
        a.start()
        row = wait_for("B refuses A as revoked",
                       lambda: (t := b.call("tunnels")["tunnels"][0])["state"] == "auth-failed" and t, 30, log_of=b)
        assert "(revoked)" in row["last_error"]
    finally:
        httpd.kill()
        httpd.wait(5)
