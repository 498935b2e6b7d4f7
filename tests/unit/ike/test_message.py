"""The RFC 7296 §3 codec: strongSwan's real datagrams, round trips of every payload, strictness."""

from __future__ import annotations

import re
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.ike import message as M
from appliance.ike.constants import (
    ExchangeType,
    NotifyType,
    PayloadType,
    ProtocolId,
    TransformType,
)
from appliance.ike.crypto import IkeKeys, IntegrityError, SkCipher, sk_ciphers
from appliance.ike.constants import EncrId
from appliance.ike.proposals import Proposal, Transform


def sk_cipher_gcm(keymat: bytes) -> SkCipher:
    return SkCipher(EncrId.AES_GCM_16, 256, None, keymat)
from tests.vectors import STRONGSWAN_PSK_X25519, dumps, recorded_vectors

# strongSwan's abbreviations in "parsed ... [ ... ]" log lines -> our payload classes/notifies.
_SWAN_PAYLOAD = {"SA": "SA", "KE": "KE", "No": "NONCE", "IDi": "IDi", "IDr": "IDr", "AUTH": "AUTH",
                 "TSi": "TSi", "TSr": "TSr", "D": "DELETE", "V": "VENDOR_ID", "CERT": "CERT",
                 "CERTREQ": "CERTREQ"}
_SWAN_NOTIFY = {"NATD_S_IP": "NAT_DETECTION_SOURCE_IP", "NATD_D_IP": "NAT_DETECTION_DESTINATION_IP",
                "FRAG_SUP": "IKEV2_FRAGMENTATION_SUPPORTED", "HASH_ALG": "SIGNATURE_HASH_ALGORITHMS",
                "REDIR_SUP": "REDIRECT_SUPPORTED", "CHDLESS_SUP": "CHILDLESS_IKEV2_SUPPORTED",
                "MULT_AUTH": "MULTIPLE_AUTH_SUPPORTED", "INIT_CONTACT": "INITIAL_CONTACT",
                "MOBIKE_SUP": "MOBIKE_SUPPORTED", "NO_ADD_ADDR": "NO_ADDITIONAL_ADDRESSES",
                "EAP_ONLY": "EAP_ONLY_AUTHENTICATION", "MSG_ID_SYN_SUP": "IKEV2_MESSAGE_ID_SYNC_SUPPORTED",
                "REKEY_SA": "REKEY_SA"}

ALL_VECTORS = [STRONGSWAN_PSK_X25519] + recorded_vectors()


def _swan_lines() -> list[tuple[str, str, int, list[str]]]:
    """What charon A generated and parsed, in order: (exchange, request|response, mid, payloads)."""
    out = []
    pat = re.compile(r"\[ENC\] (?:generating|parsed) (\w+) (request|response) (\d+) \[ (.*?) ?\]")
    for line in (STRONGSWAN_PSK_X25519.directory / "charon-A.log").read_text().splitlines():
        m = pat.search(line)
        if m:
            names = []
            for tok in m.group(4).split():
                if tok.startswith("N("):
                    names.append("N(" + _SWAN_NOTIFY[tok[2:-1]] + ")")
                else:
                    names.append(_SWAN_PAYLOAD[tok])
            out.append((m.group(1), m.group(2), int(m.group(3)), names))
    return out


def _our_names(msg: M.Message) -> list[str]:
    return [f"N({NotifyType(p.notify_type).name})" if isinstance(p, M.Notify)
            else PayloadType(p.payload_type).name for p in msg.payloads]


def _ciphers(vector) -> dict[bytes, tuple[SkCipher, SkCipher]]:
    """(initiator's, responder's) SK cipher of each IKE SA of a vector, by SPIi."""
    log = vector.log("initiator")
    grams = vector.datagrams()
    proposal = M.parse_message(grams[1].message)[0].get(M.SA).proposals[0]
    spis = []
    for d in grams:
        if d.header.spi_i not in spis:
            spis.append(d.header.spi_i)
    out = {}
    for gen, spi in enumerate(spis):
        def key(label):
            ks = dumps(log, label)
            return ks[gen] if ks else b""
        keys = IkeKeys(key("Sk_d secret"), key("Sk_ai secret"), key("Sk_ar secret"), key("Sk_ei secret"),
                       key("Sk_er secret"), key("Sk_pi secret"), key("Sk_pr secret"))
        out[spi] = sk_ciphers(proposal, keys)
    return out


def _decrypt_vector(vector, data: bytes, ciphers) -> tuple[M.Message, M.Encrypted | None, object]:
    msg, enc = M.parse_message(data)
    if enc is None:
        return msg, None, None
    c_i, c_r = ciphers[msg.spi_i]
    cipher = c_i if msg.is_initiator else c_r
    return M.decrypt_message(data, msg, enc, cipher), enc, cipher


def test_every_strongswan_datagram_parses_decrypts_and_matches_charons_view():
    datagrams = STRONGSWAN_PSK_X25519.datagrams()
    ciphers = _ciphers(STRONGSWAN_PSK_X25519)
    swan = _swan_lines()
    assert len(datagrams) == len(swan) == 14
    for i, (d, (xchg, kind, mid, names)) in enumerate(zip(datagrams, swan)):
        msg, _enc, _c = _decrypt_vector(STRONGSWAN_PSK_X25519, d.message, ciphers)
        assert ExchangeType(msg.exchange_type).name == xchg
        assert msg.is_response == (kind == "response")
        assert msg.message_id == mid
        assert _our_names(msg) == names, f"datagram {i}"


@pytest.mark.parametrize("vector", ALL_VECTORS, ids=lambda v: v.directory.name)
def test_strongswan_datagrams_reencode_byte_for_byte(vector):
    """Every datagram of every recorded conversation (AES-GCM, AES-CBC + HMAC-SHA2,
    ChaCha20-Poly1305) decodes and encodes back to the same octets (same IV, same padding)."""
    ciphers = _ciphers(vector)
    grams = vector.datagrams()
    assert len(grams) >= 14
    for i, d in enumerate(grams):
        msg, enc, cipher = _decrypt_vector(vector, d.message, ciphers)
        if enc is None:
            assert M.encode_message(msg) == d.message
            continue
        body = d.message[enc.body_start:]
        iv = body[:cipher.iv_size]
        plain = cipher.decrypt(body, d.message[:enc.body_start])
        pad_len = plain[-1]
        again = M.encode_message(msg, cipher, iv)
        if plain[-1 - pad_len:-1] == bytes(pad_len):
            assert again == d.message, f"datagram {i}"
        else:   # strongSwan's padding bytes are not zeros; everything else must match
            assert len(again) == len(d.message)
            assert M.decrypt_message(again, *M.parse_message(again), cipher).payloads == msg.payloads


def test_strongswan_ike_sa_init_contents():
    d = STRONGSWAN_PSK_X25519.datagrams()[0]
    msg, _ = M.parse_message(d.message)
    sa = msg.get(M.SA)
    (prop,) = sa.proposals
    assert prop.protocol == ProtocolId.IKE and prop.number == 1 and prop.spi == b""
    assert [(t.type, t.id, t.key_length) for t in prop.transforms] == [
        (TransformType.ENCR, 20, 256), (TransformType.PRF, 6, None), (TransformType.DH, 31, None)]
    ke = msg.get(M.KE)
    assert ke.dh_group == 31 and len(ke.data) == 32
    assert 16 <= len(msg.get(M.Nonce).data) <= 256


def test_strongswan_child_sa_payloads():
    v = STRONGSWAN_PSK_X25519
    datagrams, ciphers = v.datagrams(), _ciphers(v)
    auth_req, _, _ = _decrypt_vector(v, datagrams[2].message, ciphers)
    idi = auth_req.get(M.IDi)
    assert idi.id_type == 2 and idi.data == b"a.example.net"
    tsi = auth_req.get(M.TSi)
    assert tsi.selectors == [M.TrafficSelector.any(4)]
    sa = auth_req.get(M.SA)
    assert sa.proposals[0].protocol == ProtocolId.ESP and len(sa.proposals[0].spi) == 4
    delete, _, _ = _decrypt_vector(v, datagrams[6].message, ciphers)
    d = delete.get(M.Delete)
    assert d.protocol_id == ProtocolId.ESP and len(d.spis) == 1
    final, _, _ = _decrypt_vector(v, datagrams[12].message, ciphers)
    assert final.get(M.Delete) == M.Delete(ProtocolId.IKE, [])


# ------------------------------------------------------------------ round trips (hypothesis)

_u8 = st.integers(0, 255)
_u16 = st.integers(0, 0xFFFF)
_blob = st.binary(min_size=1, max_size=64)


@st.composite
def _transforms(draw):
    ttype = draw(st.integers(1, 12))
    tid = draw(_u16)
    key_length = draw(st.none() | _u16)
    extra = draw(st.lists(st.one_of(
        st.tuples(st.integers(0x8000, 0xFFFF).filter(lambda a: a != 0x800E), st.binary(min_size=2, max_size=2)),
        st.tuples(st.integers(0, 0x7FFF).filter(lambda a: a != 14), st.binary(max_size=8))), max_size=2))
    return Transform(ttype, tid, key_length, tuple(extra))


@st.composite
def _sa(draw):
    n = draw(st.integers(1, 3))
    props = []
    for i in range(1, n + 1):
        proto = draw(st.sampled_from([ProtocolId.IKE, ProtocolId.ESP, ProtocolId.AH]))
        spi_len = draw(st.sampled_from([0, 8])) if proto == ProtocolId.IKE else 4
        spi = draw(st.binary(min_size=spi_len, max_size=spi_len))
        props.append(Proposal(proto, tuple(draw(st.lists(_transforms(), min_size=1, max_size=5))), i, spi))
    return M.SA(props)


@st.composite
def _ts(draw):
    v = draw(st.sampled_from([4, 16]))
    return M.TrafficSelector(M.TS_IPV4_ADDR_RANGE if v == 4 else M.TS_IPV6_ADDR_RANGE,
                             draw(st.binary(min_size=v, max_size=v)), draw(st.binary(min_size=v, max_size=v)),
                             draw(_u8), draw(_u16), draw(_u16))


@st.composite
def _notify(draw):
    proto = draw(st.sampled_from([0, ProtocolId.IKE, ProtocolId.ESP]))
    spi = b"" if proto == 0 else draw(st.sampled_from([b"", b"\x01\x02\x03\x04", bytes(range(8))]))
    return M.Notify(draw(_u16), proto, spi, draw(st.binary(max_size=40)))


@st.composite
def _delete(draw):
    if draw(st.booleans()):
        return M.Delete(ProtocolId.IKE, [])
    return M.Delete(draw(st.sampled_from([ProtocolId.ESP, ProtocolId.AH])),
                    draw(st.lists(st.binary(min_size=4, max_size=4), min_size=1, max_size=5)))


_payloads = st.one_of(
    _sa(),
    st.builds(M.KE, _u16, _blob),
    st.builds(M.IDi, _u8, _blob),
    st.builds(M.IDr, _u8, _blob),
    st.builds(M.CERT, _u8, st.binary(max_size=64)),
    st.builds(M.CERTREQ, _u8, st.binary(max_size=64)),
    st.builds(M.AUTH, _u8, _blob),
    st.builds(M.Nonce, st.binary(min_size=16, max_size=256)),
    _notify(),
    _delete(),
    st.builds(M.VendorID, _blob),
    st.builds(M.TSi, st.lists(_ts(), min_size=1, max_size=4)),
    st.builds(M.TSr, st.lists(_ts(), min_size=1, max_size=4)),
    # an unknown, non-critical payload type is kept verbatim
    st.builds(M.Unknown, st.integers(55, 255), st.just(False), st.binary(max_size=32)),
)


@st.composite
def _messages(draw, encrypted: bool):
    return M.Message(draw(st.binary(min_size=8, max_size=8)), draw(st.binary(min_size=8, max_size=8)),
                     draw(st.sampled_from(list(ExchangeType))), draw(st.integers(0, 2**32 - 1)),
                     draw(st.booleans()), draw(st.booleans()),
                     draw(st.lists(_payloads, max_size=8)), encrypted=encrypted)


@settings(max_examples=300, deadline=None)
@given(_messages(encrypted=False))
def test_plaintext_messages_round_trip(msg):
    data = M.encode_message(msg)
    back, enc = M.parse_message(data)
    assert enc is None
    assert back == msg
    assert M.encode_message(back) == data


@settings(max_examples=150, deadline=None)
@given(_messages(encrypted=True), st.binary(min_size=8, max_size=8))
def test_encrypted_messages_round_trip(msg, iv):
    cipher = sk_cipher_gcm(bytes(range(36)))
    data = M.encode_message(msg, cipher, iv)
    parsed, enc = M.parse_message(data)
    assert enc is not None and parsed.payloads == []
    assert M.decrypt_message(data, parsed, enc, cipher) == msg


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_ever_raise_parse_error(data):
    try:
        M.parse_message(data)
    except M.ParseError:
        pass


@settings(max_examples=1000, deadline=None)
@given(_messages(encrypted=False), st.data())
def test_mutated_messages_only_ever_raise_parse_error(msg, data):
    raw = bytearray(M.encode_message(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(_u8)
    try:
        M.parse_message(bytes(raw))
    except M.ParseError:
        pass


# ------------------------------------------------------------------ strictness


def _plain(*payloads: M.Payload) -> bytes:
    return M.encode_message(M.Message(b"A" * 8, bytes(8), ExchangeType.IKE_SA_INIT, 0, False, True,
                                      list(payloads)))


def test_header_length_must_match_datagram():
    data = _plain(M.Nonce(b"n" * 16))
    with pytest.raises(M.ParseError, match="header length"):
        M.parse_message(data + b"\0")
    with pytest.raises(M.ParseError):
        M.parse_message(data[:-1])


def test_newer_major_version_asks_for_invalid_major_version():
    data = bytearray(_plain())
    data[17] = 0x30
    with pytest.raises(M.ParseError) as e:
        M.parse_message(bytes(data))
    assert e.value.notify == NotifyType.INVALID_MAJOR_VERSION


def test_unknown_critical_payload_is_refused_with_its_type():
    data = _plain(M.Nonce(b"n" * 16), M.Unknown(200, False, b"xyz"))
    # set the critical bit of the second payload's generic header
    pos = M.IKE_HEADER_LEN + 4 + 16
    data = data[:pos + 1] + b"\x80" + data[pos + 2:]
    with pytest.raises(M.ParseError) as e:
        M.parse_message(data)
    assert e.value.notify == NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD
    assert e.value.notify_data == bytes([200])


def test_critical_bit_on_a_known_payload_is_ignored():
    data = bytearray(_plain(M.Nonce(b"n" * 16)))
    data[M.IKE_HEADER_LEN + 1] = 0x80
    msg, _ = M.parse_message(bytes(data))
    assert msg.get(M.Nonce).data == b"n" * 16


def test_payload_length_overrun_is_refused():
    data = bytearray(_plain(M.Nonce(b"n" * 16)))
    struct.pack_into("!H", data, M.IKE_HEADER_LEN + 2, 100)
    with pytest.raises(M.ParseError, match="overruns"):
        M.parse_message(bytes(data))


@pytest.mark.parametrize("nonce_len", [15, 257])
def test_nonce_size_limits(nonce_len):
    with pytest.raises(M.ParseError, match="nonce"):
        M.parse_message(_plain(M.Nonce(b"n" * nonce_len)))


def test_proposal_numbers_must_start_at_one_and_increase():
    t = (Transform(TransformType.ENCR, 20, 256),)
    with pytest.raises(M.ParseError, match="proposal number"):
        M.parse_message(_plain(M.SA([Proposal(ProtocolId.IKE, t, 2), Proposal(ProtocolId.IKE, t, 3)])))
    with pytest.raises(M.ParseError, match="proposal number"):
        M.parse_message(_plain(M.SA([Proposal(ProtocolId.IKE, t, 1), Proposal(ProtocolId.IKE, t, 3)])))
    with pytest.raises(M.ParseError, match="proposal number"):
        M.parse_message(_plain(M.SA([Proposal(ProtocolId.IKE, t, 0)])))
    # a lone proposal is a response's selection: it keeps the selected proposal's number (§3.3.1)
    (sa,) = M.parse_message(_plain(M.SA([Proposal(ProtocolId.IKE, t, 2)])))[0].payloads
    assert sa.proposals[0].number == 2


def test_delete_spi_count_must_match_length():
    body = struct.pack("!BBH", ProtocolId.ESP, 4, 2) + b"\0\0\0\1"
    with pytest.raises(M.ParseError, match="SPI count"):
        M.Delete.from_body(body)


def test_ts_length_must_match_type():
    ts = M.TrafficSelector.any(4).encode()
    bad = ts[:2] + struct.pack("!H", 40) + ts[4:]
    with pytest.raises(M.ParseError):
        M.TSi.from_body(b"\x01\0\0\0" + bad)


def test_sk_payload_must_be_last():
    msg = M.Message(b"A" * 8, b"B" * 8, ExchangeType.INFORMATIONAL, 1, False, True, [], encrypted=True)
    cipher = sk_cipher_gcm(bytes(36))
    data = bytearray(M.encode_message(msg, cipher, bytes(8)))
    # Append a bogus trailing payload after SK and fix the lengths.
    data += b"\0\0\0\x04"
    struct.pack_into("!I", data, 24, len(data))
    with pytest.raises(M.ParseError):
        M.parse_message(bytes(data))


def test_tampered_sk_payload_fails_integrity():
    msg = M.Message(b"A" * 8, b"B" * 8, ExchangeType.INFORMATIONAL, 1, False, True,
                    [M.Delete(ProtocolId.IKE, [])], encrypted=True)
    cipher = sk_cipher_gcm(bytes(36))
    data = bytearray(M.encode_message(msg, cipher, bytes(8)))
    data[-1] ^= 1
    parsed, enc = M.parse_message(bytes(data))
    with pytest.raises(IntegrityError):
        M.decrypt_message(bytes(data), parsed, enc, cipher)


def test_auth_data_not_in_repr():
    assert "secretauth" not in repr(M.AUTH(2, b"secretauth"))


@pytest.mark.parametrize("cbc", [False, True], ids=["gcm", "cbc"])
@pytest.mark.parametrize("body_len", [0, 1, 8, 23, 24, 40])
def test_unverifiable_sk_payload_is_an_integrity_error_never_a_parse_error(cbc, body_len):
    """Issue 12 #1/#2: whatever fails before the ICV verified (an SK body too short for its IV
    and ICV included) is IntegrityError; only AuthenticParseError means "verified, malformed"."""
    if cbc:
        cipher = SkCipher(EncrId.AES_CBC, 128, 12, bytes(16), bytes(32))   # HMAC-SHA2-256-128
    else:
        cipher = sk_cipher_gcm(bytes(36))
    sk = struct.pack("!BBH", 0, 0, 4 + body_len) + bytes(body_len)
    data = b"A" * 8 + b"B" * 8 + struct.pack("!BBBBII", 46, 0x20, 37, 0x08, 1, 28 + len(sk)) + sk
    parsed, enc = M.parse_message(data)
    with pytest.raises(IntegrityError):
        M.decrypt_message(data, parsed, enc, cipher)


def test_verified_but_malformed_plaintext_is_an_authentic_parse_error():
    cipher = sk_cipher_gcm(bytes(36))
    msg = M.Message(b"A" * 8, b"B" * 8, ExchangeType.INFORMATIONAL, 1, False, True,
                    [M.Nonce(b"x")], encrypted=True)     # a 1-octet nonce only fails once decrypted
    data = M.encode_message(msg, cipher, bytes(8))
    parsed, enc = M.parse_message(data)
    with pytest.raises(M.AuthenticParseError) as e:
        M.decrypt_message(data, parsed, enc, cipher)
    assert e.value.notify == NotifyType.INVALID_SYNTAX
