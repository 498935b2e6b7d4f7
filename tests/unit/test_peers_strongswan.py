"""Pure parts of the strongSwan test harness: the vici codec, config rendering, key extraction."""

import pytest

from tests.peers import vici
from tests.peers.strongswan import Child, Conn, child_keys_from_log, render_swanctl_conf

# The encoding example of strongSwan's vici README (key1 = value1, section1 { sub-section { key2 =
# value2 }, list1 = [item1, item2] }), written out byte by byte.
SPEC_EXAMPLE = bytes(
    [3, 4, *b"key1", 0, 6, *b"value1",
     1, 8, *b"section1",
     1, 11, *b"sub-section",
     3, 4, *b"key2", 0, 6, *b"value2",
     2,
     4, 5, *b"list1",
     5, 0, 5, *b"item1",
     5, 0, 5, *b"item2",
     6,
     2])
SPEC_TREE = {"key1": "value1", "section1": {"sub-section": {"key2": "value2"}, "list1": ["item1", "item2"]}}


def test_vici_codec_matches_the_protocol_example():
    assert vici.encode_message(SPEC_TREE) == SPEC_EXAMPLE
    assert vici.decode_message(SPEC_EXAMPLE) == SPEC_TREE


def test_vici_packet_round_trip():
    raw = vici.encode_packet(vici.CMD_REQUEST, "list-sas", {"noblock": "yes"})
    assert raw[:4] == (len(raw) - 4).to_bytes(4, "big")
    assert vici.decode_packet(raw[4:]) == (vici.CMD_REQUEST, "list-sas", {"noblock": "yes"})


@pytest.mark.parametrize("bad", [
    SPEC_EXAMPLE[:-1],                 # section left open
    bytes([2]),                        # section end at root
    bytes([3, 4, *b"key1", 0, 9, *b"short"]),  # value shorter than its length
    bytes([5, 0, 1, 65]),              # list item outside a list
    bytes([9]),                        # unknown element type
])
def test_vici_rejects_malformed_messages(bad):
    with pytest.raises(vici.ViciError):
        vici.decode_message(bad)


def test_swanctl_conf_rendering_keeps_the_secret_out_of_reprs():
    conn = Conn(local_addrs=["192.0.2.1"], remote_addrs=["192.0.2.2"], local_id="a.example.net",
                remote_id="C=CH, O=Example, CN=b", psk='p"s k', dpd_delay=5,
                children=[Child(rekey_time=60, esp_proposals=["aes128gcm16", "aes256gcm16"])])
    text = render_swanctl_conf([conn])
    assert "id = \"C=CH, O=Example, CN=b\"" in text
    assert "esp_proposals = aes128gcm16, aes256gcm16" in text
    assert "local_ts = 0.0.0.0/0, ::/0" in text
    assert "secret = 0x" + b'p"s k'.hex() in text
    assert "dpd_delay = 5" in text and "rekey_time = 60" in text
    assert "p\"s k" not in repr(conn)


def test_pubkey_auth_needs_a_certificate():
    with pytest.raises(ValueError, match="auth=pubkey needs `cert`"):
        render_swanctl_conf([Conn(auth="pubkey")])


LOG = """\
10:00:00.000 07[IKE] <p|1> establishing CHILD_SA c{1}
10:00:00.010 09[CHD] <p|1> encryption initiator key => 20 bytes @ 0x7f00
10:00:00.010 09[CHD] <p|1>    0: 00 01 02 03 04 05 06 07 08 09 0A 0B 0C 0D 0E 0F  ................
10:00:00.010 11[CHD] <p|2> encryption initiator key => 4 bytes @ 0x7f00
10:00:00.010 09[CHD] <p|1>   16: 10 11 12 13                                      ....
10:00:00.010 11[CHD] <p|2>    0: AA AA AA AA                                      ....
10:00:00.010 09[CHD] <p|1> encryption responder key => 20 bytes @ 0x7f00
10:00:00.010 09[CHD] <p|1>    0: F0 F1 F2 F3 F4 F5 F6 F7 F8 F9 FA FB FC FD FE FF  ................
10:00:00.010 09[CHD] <p|1>   16: E0 E1 E2 E3                                      ....
10:00:00.011 11[CHD] <p|2> encryption responder key => 4 bytes @ 0x7f00
10:00:00.011 11[CHD] <p|2>    0: BB BB BB BB                                      ....
10:00:00.012 09[IKE] <p|1> CHILD_SA c{1} established with SPIs c1000001_i c2000002_o and TS 0.0.0.0/0 === 0.0.0.0/0
10:00:00.013 11[IKE] <p|2> inbound CHILD_SA c{7} established with SPIs c3000003_i c4000004_o and TS 0.0.0.0/0 === 0.0.0.0/0
"""


def test_child_keys_follow_thread_and_role():
    keys = child_keys_from_log(LOG)
    # c{1}: we initiated it, so we send with the initiator's key.
    assert keys[1].encr_out == bytes(range(20))
    assert keys[1].encr_in == bytes(range(0xF0, 0x100)) + bytes([0xE0, 0xE1, 0xE2, 0xE3])
    # c{7}: created by the peer (no "establishing" line): we send with the responder's key.
    assert keys[7].encr_out == b"\xbb" * 4 and keys[7].encr_in == b"\xaa" * 4
    assert "bb" not in repr(keys[7]).lower().replace("childkeys", "")
