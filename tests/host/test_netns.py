"""The host tier's ground: two network namespaces joined by veth exchange UDP."""

import subprocess

from tests.netns import Netns, veth_pair

SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('192.0.2.2', 5500))
print('ready', flush=True)
s.settimeout(10)
d, peer = s.recvfrom(100)
s.sendto(d.upper(), peer)
"""

CLIENT = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(b'isthmus', ('192.0.2.2', 5500))
d, peer = s.recvfrom(100)
print(d.decode(), peer[0])
"""


def test_udp_between_namespaces():
    with Netns("a") as a, Netns("b") as b:
        veth_pair(a, "va", b, "vb")
        a.run("ip addr add 192.0.2.1/24 dev va")
        b.run("ip addr add 192.0.2.2/24 dev vb")
        server = subprocess.Popen(["ip", "netns", "exec", b.name, "python3", "-c", SERVER],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "ready"
            r = a.run(["python3", "-c", CLIENT])
            assert r.stdout.split() == ["ISTHMUS", "192.0.2.2"]
        finally:
            server.kill()
            server.wait()


def test_namespaces_are_isolated():
    """No route between namespaces without a link: the same client fails."""
    with Netns("a") as a, Netns("b") as b:
        a.run("ip addr add 192.0.2.1/24 dev lo")
        r = a.run(["python3", "-c", CLIENT.replace("settimeout(5)", "settimeout(1)")], check=False)
        assert r.returncode != 0
