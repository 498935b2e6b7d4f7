"""Proposal strings (strongSwan spelling), the weak-algorithm policy and §2.7 selection."""

import pytest

from appliance.ike.constants import DhId, EncrId, EsnId, IntegId, PrfId, ProtocolId, TransformType
from appliance.ike.proposals import (
    DEFAULT_ESP_PROPOSAL,
    DEFAULT_IKE_PROPOSAL,
    Proposal,
    ProposalError,
    Transform,
    accepts_selection,
    format_proposal,
    parse_proposal,
    parse_proposals,
    select_proposal,
)

E, P, I, D, S = (TransformType.ENCR, TransformType.PRF, TransformType.INTEG, TransformType.DH,
                 TransformType.ESN)


def test_default_ike_proposal_shape():
    p = parse_proposal(DEFAULT_IKE_PROPOSAL, "ike")
    assert p.protocol == ProtocolId.IKE
    assert p.transforms == (
        Transform(E, EncrId.AES_GCM_16, 256),
        Transform(P, PrfId.HMAC_SHA2_384),
        Transform(D, DhId.CURVE25519),
    )
    assert p.is_aead


def test_default_esp_proposal_gets_no_esn():
    p = parse_proposal(DEFAULT_ESP_PROPOSAL, "esp")
    assert p.protocol == ProtocolId.ESP
    assert p.transforms == (Transform(E, EncrId.AES_GCM_16, 256), Transform(S, EsnId.NO_ESN))


def test_cbc_ike_proposal_derives_prf_from_integrity():
    p = parse_proposal("aes256-sha256-modp3072", "ike")
    assert [t.id for t in p.encr] == [EncrId.AES_CBC] and p.encr[0].key_length == 256
    assert [t.id for t in p.integ] == [IntegId.HMAC_SHA2_256_128]
    assert [t.id for t in p.prf] == [PrfId.HMAC_SHA2_256]
    assert [t.id for t in p.dh] == [DhId.MODP_3072]


def test_several_algorithms_of_one_type_keep_order():
    p = parse_proposal("aes128gcm16-aes256gcm16-prfsha256-prfsha384-x25519-ecp256", "ike")
    assert [(t.id, t.key_length) for t in p.encr] == [(EncrId.AES_GCM_16, 128),
                                                      (EncrId.AES_GCM_16, 256)]
    assert [t.id for t in p.prf] == [PrfId.HMAC_SHA2_256, PrfId.HMAC_SHA2_384]
    assert [t.id for t in p.dh] == [DhId.CURVE25519, DhId.ECP_256]


def test_aliases_parse_to_the_same_transform():
    assert parse_proposal("AES256GCM128-prfsha384-curve25519", "ike") == \
        parse_proposal("aes256gcm16-prfsha384-x25519", "ike")
    assert parse_proposal("aes256-sha2_256", "esp") == parse_proposal("aes256-sha256", "esp")


@pytest.mark.parametrize("text,kind", [
    ("aes256gcm16-prfsha384-x25519", "ike"),
    ("aes128gcm16-prfsha256-ecp256", "ike"),
    ("aes256-sha256-prfsha256-modp3072", "ike"),
    ("aes128-sha512-prfsha512-ecp521-x448", "ike"),
    ("chacha20poly1305-prfsha256-x25519", "ike"),
    ("aes128gcm16-aes256gcm16-prfsha256-prfsha384-x25519-ecp256", "ike"),
    ("aes256gcm16", "esp"),
    ("aes256gcm16-x25519", "esp"),
    ("aes128-sha256", "esp"),
    ("aes256gcm16-esn", "esp"),
    ("aes256gcm16-esn-noesn", "esp"),
    ("chacha20poly1305", "esp"),
    ("aes192-sha384-modp4096", "esp"),
])
def test_format_round_trip(text, kind):
    p = parse_proposal(text, kind)
    assert format_proposal(p) == text
    assert parse_proposal(format_proposal(p), kind) == p
    assert str(p) == text


@pytest.mark.parametrize("text,kind,token,words", [
    ("3des-sha256-modp2048", "ike", "3des", ["weak algorithm", "refused", "aes256gcm16"]),
    ("des-sha256-modp2048", "ike", "des", ["weak algorithm", "refused"]),
    ("aes256-md5-modp2048", "ike", "md5", ["weak algorithm", "refused", "sha256"]),
    ("aes256-sha1-modp2048", "ike", "sha1", ["weak algorithm", "refused", "sha384"]),
    ("aes256gcm16-prfsha1-x25519", "ike", "prfsha1", ["weak algorithm", "prfsha256"]),
    ("aes256gcm16-prfmd5-x25519", "ike", "prfmd5", ["weak algorithm"]),
    ("aes256gcm16-prfsha256-modp1024", "ike", "modp1024", ["weak algorithm", "modp2048"]),
    ("aes256gcm16-prfsha256-modp1536", "ike", "modp1536", ["weak algorithm"]),
    ("aes256gcm16-modp768", "esp", "modp768", ["weak algorithm"]),
    ("aes128-sha1", "esp", "sha1", ["weak algorithm"]),
    ("null-sha256", "esp", "null", ["weak algorithm"]),
])
def test_weak_algorithms_refused_in_config(text, kind, token, words):
    with pytest.raises(ProposalError) as ei:
        parse_proposal(text, kind)
    e = ei.value
    assert e.token == token and e.text == text
    msg = str(e)
    assert repr(text) in msg and repr(token) in msg
    for w in words:
        assert w in msg


@pytest.mark.parametrize("text,kind,token,words", [
    ("aes256gcm16-prfsha384-x25519-foo", "ike", "foo", ["unknown algorithm 'foo'", "x25519"]),
    ("aes256gcm16-ecp224", "esp", "ecp224", ["not supported", "ecp256"]),
    ("aes256ccm16", "esp", "aes256ccm16", ["not supported"]),
    ("aes256gcm16-prfsha256", "esp", "prfsha256", ["PRF is not allowed in ESP"]),
    ("aes256gcm16-esn-prfsha256-x25519", "ike", "esn", ["ESN is not allowed in IKE"]),
])
def test_bad_tokens(text, kind, token, words):
    with pytest.raises(ProposalError) as ei:
        parse_proposal(text, kind)
    assert ei.value.token == token
    for w in words:
        assert w in str(ei.value)


@pytest.mark.parametrize("text,kind,words", [
    ("", "ike", ["empty algorithm name"]),
    ("aes256--sha256", "esp", ["empty algorithm name"]),
    ("prfsha256-x25519", "ike", ["no encryption algorithm", "aes256gcm16"]),
    ("aes256-x25519", "ike", ["needs an integrity algorithm", "sha256"]),
    ("aes256", "esp", ["needs an integrity algorithm"]),
    ("aes256gcm16-sha256", "esp", ["not allowed with AEAD"]),
    ("aes256gcm16-x25519", "ike", ["explicit PRF", "prfsha384"]),
    ("aes256gcm16-prfsha384", "ike", ["key exchange method", "x25519"]),
    ("aes256-aes256gcm16-sha256-x25519", "ike", ["cannot share a proposal", "separate"]),
])
def test_structural_errors(text, kind, words):
    with pytest.raises(ProposalError) as ei:
        parse_proposal(text, kind)
    for w in words:
        assert w in str(ei.value)


def test_parse_proposals_numbers_them():
    ps = parse_proposals("aes256gcm16-prfsha384-x25519, aes128gcm16-prfsha256-ecp256", "ike")
    assert [p.number for p in ps] == [1, 2]
    with pytest.raises(ProposalError, match="empty proposal"):
        parse_proposals("aes256gcm16,,aes128gcm16", "esp")


# --------------------------------------------------------------------------- selection
def ike(text, number=1):
    return Proposal(ProtocolId.IKE, parse_proposal(text, "ike").transforms, number)


def esp(text, number=1, spi=b"\x01\x02\x03\x04"):
    return Proposal(ProtocolId.ESP, parse_proposal(text, "esp").transforms, number, spi)


def test_select_takes_peer_order_and_one_of_each():
    ours = [ike("aes128gcm16-aes256gcm16-prfsha256-prfsha384-x25519-ecp256")]
    theirs = [ike("aes256gcm16-aes128gcm16-prfsha384-prfsha256-ecp256-x25519", number=1)]
    got = select_proposal(ours, theirs)
    assert format_proposal(got) == "aes256gcm16-prfsha384-ecp256"
    assert got.number == 1
    assert accepts_selection(theirs, got) is theirs[0]


def test_select_first_acceptable_peer_proposal_wins():
    ours = [ike("aes128gcm16-prfsha256-ecp256"), ike("aes256gcm16-prfsha384-x25519", 2)]
    theirs = [ike("chacha20poly1305-prfsha256-x448", 1), ike("aes256gcm16-prfsha384-x25519", 2),
              ike("aes128gcm16-prfsha256-ecp256", 3)]
    got = select_proposal(ours, theirs)
    assert got.number == 2 and format_proposal(got) == "aes256gcm16-prfsha384-x25519"


def test_select_no_overlap_is_none():
    assert select_proposal([ike(DEFAULT_IKE_PROPOSAL)], [ike("aes128gcm16-prfsha256-ecp256")]) \
        is None


def test_select_ignores_weak_transforms_on_the_wire():
    # A peer offering SHA-1 / MODP-1024 first gets our strong choice, or nothing at all.
    weak_first = Proposal(ProtocolId.IKE, (
        Transform(E, EncrId.TRIPLE_DES), Transform(E, EncrId.AES_CBC, 256),
        Transform(I, IntegId.HMAC_SHA1_96), Transform(I, IntegId.HMAC_SHA2_256_128),
        Transform(P, PrfId.HMAC_SHA1), Transform(P, PrfId.HMAC_SHA2_256),
        Transform(D, DhId.MODP_1024), Transform(D, DhId.MODP_2048)))
    # Even if our own list were (wrongly) built to contain the weak ones, policy refuses them.
    ours_including_weak = [Proposal(ProtocolId.IKE, weak_first.transforms)]
    got = select_proposal(ours_including_weak, [weak_first])
    assert format_proposal(got) == "aes256-sha256-prfsha256-modp2048"
    only_weak = Proposal(ProtocolId.IKE, (
        Transform(E, EncrId.AES_CBC, 256), Transform(I, IntegId.HMAC_SHA1_96),
        Transform(P, PrfId.HMAC_SHA1), Transform(D, DhId.MODP_1024)))
    assert select_proposal([Proposal(ProtocolId.IKE, only_weak.transforms)], [only_weak]) is None


def test_select_refuses_unknown_transform_type_and_attributes():
    base = ike(DEFAULT_IKE_PROPOSAL)
    unknown_type = Proposal(ProtocolId.IKE, base.transforms + (Transform(13, 0),))
    assert select_proposal([base], [unknown_type]) is None  # RFC 7296 §3.3.6
    # transform types 6..12 are RFC 9370's additional key exchanges (tests/unit/ike/test_hybrid_pq.py):
    # NONE is acceptable to a proposal without one, ML-KEM-768 only to one that has it
    with_addke = Proposal(ProtocolId.IKE, base.transforms + (Transform(6, 0),))
    assert select_proposal([base], [with_addke]) is not None
    assert select_proposal([base], [Proposal(ProtocolId.IKE, base.transforms + (Transform(6, 36),))]) is None
    odd_attr = Proposal(ProtocolId.IKE, (
        Transform(E, EncrId.AES_GCM_16, 256, ((99, b"\x00\x01"),)),) + base.transforms[1:])
    assert select_proposal([base], [odd_attr]) is None
    wrong_len = Proposal(ProtocolId.IKE, (Transform(E, EncrId.AES_GCM_16, 512),)
                         + base.transforms[1:])
    assert select_proposal([Proposal(ProtocolId.IKE, wrong_len.transforms)], [wrong_len]) is None


def test_select_esp_pfs_and_esn():
    # We require PFS with x25519; a peer offering no DH is refused, one offering it is taken.
    ours = [esp("aes256gcm16-x25519")]
    assert select_proposal(ours, [esp("aes256gcm16")]) is None
    got = select_proposal(ours, [esp("aes256gcm16-ecp256-x25519", spi=b"\xc0\x01\x02\x03")])
    assert format_proposal(got) == "aes256gcm16-x25519" and got.spi == b"\xc0\x01\x02\x03"
    # ESN: they prefer esn, we only do noesn -> noesn
    got = select_proposal([esp("aes256gcm16")], [esp("aes256gcm16-esn-noesn")])
    assert [t.id for t in got.esn] == [EsnId.NO_ESN]
    # A peer proposal without an ESN transform counts as NO_ESN; nothing implied is echoed.
    bare = Proposal(ProtocolId.ESP, (Transform(E, EncrId.AES_GCM_16, 256),), 1, b"\0\0\0\1")
    got = select_proposal([esp("aes256gcm16")], [bare])
    assert got.transforms == (Transform(E, EncrId.AES_GCM_16, 256),)
    # protocol mismatch
    assert select_proposal([ike(DEFAULT_IKE_PROPOSAL)], [esp("aes256gcm16")]) is None


def test_select_aead_with_integ_none_is_fine():
    theirs = Proposal(ProtocolId.ESP, (Transform(E, EncrId.AES_GCM_16, 128),
                                       Transform(I, IntegId.NONE),
                                       Transform(S, EsnId.NO_ESN)), 1, b"\0\0\0\1")
    got = select_proposal([esp("aes128gcm16")], [theirs])
    assert got is not None and got.only(I).id == IntegId.NONE


def test_accepts_selection_rejects_bad_replies():
    offered = [ike("aes128gcm16-aes256gcm16-prfsha256-prfsha384-x25519-ecp256")]
    good = ike("aes256gcm16-prfsha384-x25519")
    assert accepts_selection(offered, good) is offered[0]
    # two transforms of a type
    assert accepts_selection(offered, ike("aes128gcm16-aes256gcm16-prfsha384-x25519")) is None
    # a transform we never offered
    assert accepts_selection(offered, ike("aes256gcm16-prfsha512-x25519")) is None
    # missing type
    assert accepts_selection(offered, Proposal(ProtocolId.IKE, good.transforms[:2])) is None
    # wrong proposal number
    assert accepts_selection(offered, ike("aes256gcm16-prfsha384-x25519", 2)) is None
    # ESP reply without ESN when we offered only noesn is fine; esn when not offered is not
    e_off = [esp("aes256gcm16")]
    bare = Proposal(ProtocolId.ESP, (Transform(E, EncrId.AES_GCM_16, 256),), 1)
    assert accepts_selection(e_off, bare) is e_off[0]
    assert accepts_selection(e_off, esp("aes256gcm16-esn")) is None


def test_proposal_only_and_with_spi():
    p = ike(DEFAULT_IKE_PROPOSAL)
    assert p.only(D).id == DhId.CURVE25519 and p.only(I) is None
    with pytest.raises(ValueError):
        ike("aes128gcm16-aes256gcm16-prfsha256-x25519").only(E)
    q = p.with_spi(b"\x11" * 8, number=3)
    assert q.spi == b"\x11" * 8 and q.number == 3 and q.transforms == p.transforms
