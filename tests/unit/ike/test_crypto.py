"""appliance.ike.crypto against published test vectors, plus the RFC 6989 and policy checks.

Vectors: RFC 4231 (HMAC-SHA2), RFC 7539 §2.8.2 and RFC 7634 Appendix B (ChaCha20-Poly1305, the
latter a whole IKEv2 message), the GCM specification test cases 4 and 16 (McGrew/Viega, also in
NIST SP 800-38D examples), RFC 3602 §4 case 1 (AES-CBC), RFC 7748 §6.1/§6.2 (X25519/X448),
RFC 5903 §8.1 (ECP-256 with its IKEv2 encoding), RFC 3526 (MODP primes).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import os

import pytest

from appliance.ike import crypto
from appliance.ike.constants import DhId, EncrId, IntegId, PrfId, TransformType
from appliance.ike.crypto import (
    ChildKeys,
    CryptoError,
    IkeKeys,
    IkeSuite,
    IntegrityError,
    InvalidKeyExchange,
    KeyExchange,
    SkCipher,
    UnsupportedAlgorithm,
    child_keymat,
    derive_ike_keys,
    derive_rekeyed_ike_keys,
    prf,
    prf_plus,
)
from appliance.ike.proposals import allowed_tokens, parse_proposal

H = bytes.fromhex


def counter_random(seed: int = 0):
    """A deterministic random source (SHA-256 in counter mode) for tests."""
    ctr = itertools.count()

    def rnd(n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.sha256(seed.to_bytes(8, "big") + next(ctr).to_bytes(8, "big")).digest()
        return out[:n]

    return rnd


def fixed_random(value: bytes):
    def rnd(n: int) -> bytes:
        assert n == len(value), f"asked for {n} octets, the vector has {len(value)}"
        return value

    return rnd


# --------------------------------------------------------------------------- RFC 4231
RFC4231 = [
    # (key, data, HMAC-SHA-256, HMAC-SHA-384, HMAC-SHA-512); case 5 (truncation) below
    (b"\x0b" * 20, b"Hi There",
     "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
     "afd03944d84895626b0825f4ab46907f15f9dadbe4101ec682aa034c7cebc59c"
     "faea9ea9076ede7f4af152e8b2fa9cb6",
     "87aa7cdea5ef619d4ff0b4241a1d6cb02379f4e2ce4ec2787ad0b30545e17cde"
     "daa833b7d6b8a702038b274eaea3f4e4be9d914eeb61f1702e696c203a126854"),
    (b"Jefe", b"what do ya want for nothing?",
     "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
     "af45d2e376484031617f78d2b58a6b1b9c7ef464f5a01b47e42ec3736322445e"
     "8e2240ca5e69e2c78b3239ecfab21649",
     "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea250554"
     "9758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737"),
    (b"\xaa" * 20, b"\xdd" * 50,
     "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe",
     "88062608d3e6ad8a0aa2ace014c8a86f0aa635d947ac9febe83ef4e55966144b"
     "2a5ab39dc13814b94e3ab6e101a34f27",
     "fa73b0089d56a284efb0f0756c890be9b1b5dbdd8ee81a3655f83e33b2279d39"
     "bf3e848279a722c806b485a47e67c807b946a337bee8942674278859e13292fb"),
    (bytes(range(1, 26)), b"\xcd" * 50,
     "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
     "3e8a69b7783c25851933ab6290af6ca77a9981480850009cc5577c6e1f573b4e"
     "6801dd23c4a7d679ccf8a386c674cffb",
     "b0ba465637458c6990e5a8c5f61d4af7e576d97ff94b872de76f8050361ee3db"
     "a91ca5c11aa25eb4d679275cc5788063a5f19741120c4f2de2adebeb10a298dd"),
    (b"\xaa" * 131, b"Test Using Larger Than Block-Size Key - Hash Key First",
     "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
     "4ece084485813e9088d2c63a041bc5b44f9ef1012a2b588f3cd11f05033ac4c6"
     "0c2ef6ab4030fe8296248df163f44952",
     "80b24263c7c1a3ebb71493c1dd7be8b49b46d1f41b4aeec1121b013783f8f352"
     "6b56d037e05f2598bd0fd2215d6a1e5295e64f73f63f0aec8b915a985d786598"),
    (b"\xaa" * 131,
     b"This is a test using a larger than block-size key and a larger than block-size data. "
     b"The key needs to be hashed before being used by the HMAC algorithm.",
     "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
     "6617178e941f020d351e2f254e8fd32c602420feb0b8fb9adccebb82461e99c5"
     "a678cc31e799176d3860e6110c46523e",
     "e37b6a775dc87dbaa4dfa9f96e5e3ffddebd71f8867289865df5a32d20cdc944"
     "b6022cac3c4982b10d5eeb55c3e4de15134676fb6de0446065c97440fa8c6a58"),
]


@pytest.mark.parametrize("key,data,h256,h384,h512", RFC4231)
def test_prf_rfc4231(key, data, h256, h384, h512):
    assert prf(PrfId.HMAC_SHA2_256, key, data) == H(h256)
    assert prf(PrfId.HMAC_SHA2_384, key, data) == H(h384)
    assert prf(PrfId.HMAC_SHA2_512, key, data) == H(h512)


def test_rfc4231_case5_truncation():
    # Test Case 5 gives the first 128 bits: our integrity truncation is "the leftmost octets"
    key, data = b"\x0c" * 20, b"Test With Truncation"
    assert prf(PrfId.HMAC_SHA2_256, key, data)[:16] == H("a3b6167473100ee06e0c796c2955552b")
    assert prf(PrfId.HMAC_SHA2_384, key, data)[:16] == H("3abf34c3503b2a23a46efc619baef897")
    assert prf(PrfId.HMAC_SHA2_512, key, data)[:16] == H("415fad6271580a531d4179bc891d87a6")


def test_integ_checksum_is_truncated_hmac_rfc4868():
    for integ, h, klen, icv in ((IntegId.HMAC_SHA2_256_128, "sha256", 32, 16),
                                (IntegId.HMAC_SHA2_384_192, "sha384", 48, 24),
                                (IntegId.HMAC_SHA2_512_256, "sha512", 64, 32)):
        key = bytes(range(klen))
        assert crypto.integ_key_len(integ) == klen and crypto.integ_icv_len(integ) == icv
        assert crypto.integ_checksum(integ, key, b"msg") == hmac.digest(key, b"msg", h)[:icv]
        with pytest.raises(CryptoError):
            crypto.integ_checksum(integ, key[:-1], b"msg")


def test_prf_sizes():
    assert [crypto.prf_output_len(p) for p in (5, 6, 7)] == [32, 48, 64]
    assert [crypto.prf_key_len(p) for p in (5, 6, 7)] == [32, 48, 64]
    with pytest.raises(UnsupportedAlgorithm, match="HMAC_SHA1"):
        prf(PrfId.HMAC_SHA1, b"k", b"d")


# --------------------------------------------------------------------------- prf+
def test_prf_plus_definition_rfc7296_2_13():
    # T1 = prf(K, S | 0x01), T2 = prf(K, T1 | S | 0x02), ...  (restated independently here)
    k, s = b"K" * 48, b"seed" * 10
    t1 = hmac.digest(k, s + b"\x01", "sha384")
    t2 = hmac.digest(k, t1 + s + b"\x02", "sha384")
    t3 = hmac.digest(k, t2 + s + b"\x03", "sha384")
    assert prf_plus(PrfId.HMAC_SHA2_384, k, s, 48 * 3) == t1 + t2 + t3
    assert prf_plus(PrfId.HMAC_SHA2_384, k, s, 100) == (t1 + t2 + t3)[:100]
    assert prf_plus(PrfId.HMAC_SHA2_384, k, s, 0) == b""


def test_prf_plus_prefix_property_and_limit():
    k, s = b"k", b"s"
    long = prf_plus(PrfId.HMAC_SHA2_256, k, s, 255 * 32)  # the maximum: 255 blocks
    for n in (1, 31, 32, 33, 64, 1000):
        assert prf_plus(PrfId.HMAC_SHA2_256, k, s, n) == long[:n]
    with pytest.raises(CryptoError, match="at most 8160"):
        prf_plus(PrfId.HMAC_SHA2_256, k, s, 255 * 32 + 1)
    # the counter octet wraps nowhere: block 255 is the last
    t = b""
    for i in range(1, 256):
        t = hmac.digest(k, t + s + bytes((i,)), "sha256")
    assert long[-32:] == t


# --------------------------------------------------------------------------- key derivation
GCM256_384 = IkeSuite(EncrId.AES_GCM_16, 256, PrfId.HMAC_SHA2_384, None, DhId.CURVE25519)
CBC128_256 = IkeSuite(EncrId.AES_CBC, 128, PrfId.HMAC_SHA2_256, IntegId.HMAC_SHA2_256_128,
                      DhId.ECP_256)


def test_derive_ike_keys_layout_rfc7296_2_14():
    g, ni, nr, si, sr = b"g" * 32, b"i" * 32, b"r" * 32, b"I" * 8, b"R" * 8
    skeyseed, keys = derive_ike_keys(CBC128_256, g, ni, nr, si, sr)
    assert skeyseed == hmac.digest(ni + nr, g, "sha256")
    km = prf_plus(PrfId.HMAC_SHA2_256, skeyseed, ni + nr + si + sr, 32 * 3 + 32 * 2 + 16 * 2)
    assert keys.SK_d == km[:32]
    assert (keys.SK_ai, keys.SK_ar) == (km[32:64], km[64:96])
    assert (keys.SK_ei, keys.SK_er) == (km[96:112], km[112:128])
    assert (keys.SK_pi, keys.SK_pr) == (km[128:160], km[160:192])

    _, keys = derive_ike_keys(GCM256_384, g, ni, nr, si, sr)
    assert [len(getattr(keys, f)) for f in IkeKeys._FIELDS] == [48, 0, 0, 36, 36, 48, 48]
    _, keys = derive_ike_keys(parse_proposal("chacha20poly1305-prfsha512-x448", "ike"),
                              g, ni, nr, si, sr)
    assert [len(getattr(keys, f)) for f in IkeKeys._FIELDS] == [64, 0, 0, 36, 36, 64, 64]
    with pytest.raises(CryptoError, match="8 octets"):
        derive_ike_keys(GCM256_384, g, ni, nr, si[:4], sr)


def test_rekeyed_ike_keys_use_old_sk_d_and_old_prf_rfc7296_2_18():
    old_d, g, ni, nr, si, sr = b"d" * 32, b"g" * 56, b"i" * 16, b"r" * 16, b"I" * 8, b"R" * 8
    skeyseed, keys = derive_rekeyed_ike_keys(GCM256_384, old_d, g, ni, nr, si, sr,
                                             old_prf=PrfId.HMAC_SHA2_256)
    assert skeyseed == hmac.digest(old_d, g + ni + nr, "sha256")  # the OLD SA's PRF
    assert keys.SK_d == prf_plus(PrfId.HMAC_SHA2_384, skeyseed, ni + nr + si + sr, 48)
    skeyseed2, _ = derive_rekeyed_ike_keys(GCM256_384, old_d, g, ni, nr, si, sr)
    assert skeyseed2 == hmac.digest(old_d, g + ni + nr, "sha384")


def test_child_keymat_order_rfc7296_2_17():
    sk_d, ni, nr, g = b"d" * 48, b"i" * 32, b"r" * 32, b"g" * 32
    for g_ir in (None, g):
        km = prf_plus(PrfId.HMAC_SHA2_384, sk_d, (g_ir or b"") + ni + nr, 2 * (16 + 32))
        k = child_keymat(PrfId.HMAC_SHA2_384, sk_d, ni, nr, g_ir, 16, 32)
        assert (k.ei, k.ai, k.er, k.ar) == (km[:16], km[16:48], km[48:64], km[64:])
    # AES-GCM-16 256: 32-octet key + 4-octet salt each way, nothing for integrity
    esp = parse_proposal("aes256gcm16", "esp")
    k = crypto.child_keymat_for(PrfId.HMAC_SHA2_384, sk_d, ni, nr, None, esp)
    assert (len(k.ei), len(k.ai), len(k.er), len(k.ar)) == (36, 0, 36, 0)
    k = crypto.child_keymat_for(PrfId.HMAC_SHA2_384, sk_d, ni, nr, None,
                                parse_proposal("chacha20poly1305", "esp"))
    assert (len(k.ei), len(k.er)) == (36, 36)
    k = crypto.child_keymat_for(PrfId.HMAC_SHA2_384, sk_d, ni, nr, None,
                                parse_proposal("aes128-sha512", "esp"))
    assert (len(k.ei), len(k.ai), len(k.er), len(k.ar)) == (16, 64, 16, 64)


def test_key_holders_never_show_key_bytes():
    _, keys = derive_ike_keys(CBC128_256, b"g" * 32, b"i" * 32, b"r" * 32, b"I" * 8, b"R" * 8)
    text = repr(keys) + str(keys)
    for f in IkeKeys._FIELDS:
        v = getattr(keys, f)
        assert v.hex() not in text and repr(v) not in text
    assert "SK_ei=<16 bytes>" in text
    ck = ChildKeys(b"\x01" * 36, b"", b"\x02" * 36, b"")
    assert "0101" not in repr(ck) and "\\x01" not in repr(ck) and "ei=<36 bytes>" in repr(ck)
    sk = SkCipher(EncrId.AES_CBC, 128, IntegId.HMAC_SHA2_256_128, b"\x11" * 16, b"\x22" * 32)
    assert repr(sk) == "SkCipher(AES_CBC_128, HMAC_SHA2_256_128)"
    kx = KeyExchange.generate(DhId.CURVE25519, counter_random())
    assert repr(kx) == "KeyExchange(CURVE25519, public=32 bytes)"
    assert not hasattr(kx, "__dict__")  # no accidental attribute dumps


# --------------------------------------------------------------------------- SK payload ciphers
def _gcm(key_hex: str, salt_iv: str) -> tuple[SkCipher, bytes]:
    key, nonce = H(key_hex), H(salt_iv)
    return SkCipher(EncrId.AES_GCM_16, len(key) * 8, None, key + nonce[:4]), nonce[4:]


GCM_P60 = H("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
            "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39")
GCM_AAD = H("feedfacedeadbeeffeedfacedeadbeefabaddad2")


@pytest.mark.parametrize("key,ct,tag", [
    ("feffe9928665731c6d6a8f9467308308",  # GCM spec test case 4 (AES-128)
     "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e"
     "21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091",
     "5bc94fbc3221a5db94fae95ae7121a47"),
    ("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",  # test case 16
     "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
     "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662",
     "76fc6ece0f4e1768cddf8853bb2d551b"),
])
def test_aes_gcm_vectors_through_sk_cipher_rfc5282(key, ct, tag):
    # RFC 5282 §4: nonce = 4-octet salt (end of SK_e) | 8-octet explicit IV
    sk, iv = _gcm(key, "cafebabefacedbaddecaf888")
    out = sk.encrypt(GCM_P60, GCM_AAD, iv)
    assert out == iv + H(ct) + H(tag)
    assert sk.decrypt(out, GCM_AAD) == GCM_P60
    assert (sk.block_size, sk.iv_size, sk.icv_size) == (1, 8, 16)


def test_chacha20_poly1305_rfc7539_2_8_2_through_sk_cipher():
    key = bytes(range(0x80, 0xA0))
    salt_iv = H("070000004041424344454647")
    sk = SkCipher(EncrId.CHACHA20_POLY1305, None, None, key + salt_iv[:4])
    pt = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
          b"the future, sunscreen would be it.")
    aad = H("50515253c0c1c2c3c4c5c6c7")
    out = sk.encrypt(pt, aad, salt_iv[4:])
    assert out[8:-16] == H(
        "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6"
        "3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36"
        "92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
        "3ff4def08e4b7a9de576d26586cec64b6116")
    assert out[-16:] == H("1ae10b594f09e26a7e902ecbd0600691")
    assert sk.decrypt(out, aad) == pt


def test_chacha20_poly1305_ikev2_message_rfc7634_appendix_b():
    # An INFORMATIONAL request (message ID 9) carrying SET_WINDOW_SIZE(10) in an SK payload.
    sk = SkCipher(EncrId.CHACHA20_POLY1305, None, None, bytes(range(0x80, 0xA4)))
    inner = H("0000000c" "00004001" "0000000a")  # Notify, no next payload
    body_len = sk.sk_payload_len(len(inner))
    assert body_len == 0x29
    header = H("c0c1c2c3c4c5c6c7" "d0d1d2d3d4d5d6d7" "2e202500" "00000009") \
        + (28 + body_len).to_bytes(4, "big")
    aad = header + bytes((41, 0)) + body_len.to_bytes(2, "big")  # SK generic header, next=N
    msg = aad + sk.encrypt(sk.pad(inner), aad, H("1011121314151617"))
    assert msg == H(
        "c0c1c2c3c4c5c6c7d0d1d2d3d4d5d6d72e20250000000009000000452900002910111213141516176103"
        "94701f8d017f7c129248896b71bfe25236efd7cdc670669063 15b2".replace(" ", ""))
    assert crypto.unpad_plaintext(sk.decrypt(msg[len(aad):], aad)) == inner


def test_aes_cbc_rfc3602_case1_and_hmac_composition():
    key, iv = H("06a9214036b8a15b512e03d534120006"), H("3dafba429d9eb430b422da802c9fac41")
    mac_key = bytes(range(32))
    sk = SkCipher(EncrId.AES_CBC, 128, IntegId.HMAC_SHA2_256_128, key, mac_key)
    aad = b"IKE header and SK generic header"
    out = sk.encrypt(b"Single block msg", aad, iv)
    assert out[:16] == iv
    assert out[16:32] == H("e353779c1079aeb82708942dbe77181a")  # RFC 3602 §4 case #1
    # RFC 7296 §3.14: the checksum covers the message from the IKE header through the
    # ciphertext (here: aad | IV | ciphertext), truncated to 128 bits for HMAC-SHA2-256-128.
    assert out[32:] == hmac.digest(mac_key, aad + out[:32], "sha256")[:16]
    assert sk.decrypt(out, aad) == b"Single block msg"
    assert (sk.block_size, sk.iv_size, sk.icv_size) == (16, 16, 16)


SUITES = [
    (EncrId.AES_GCM_16, 128, None, 20, 0),
    (EncrId.AES_GCM_16, 256, None, 36, 0),
    (EncrId.CHACHA20_POLY1305, None, None, 36, 0),
    (EncrId.AES_CBC, 128, IntegId.HMAC_SHA2_256_128, 16, 32),
    (EncrId.AES_CBC, 256, IntegId.HMAC_SHA2_384_192, 32, 48),
    (EncrId.AES_CBC, 256, IntegId.HMAC_SHA2_512_256, 32, 64),
]


@pytest.mark.parametrize("encr,bits,integ,elen,alen", SUITES)
def test_sk_round_trip_and_tamper(encr, bits, integ, elen, alen):
    rnd = counter_random(int(encr) * 1000 + (bits or 0))
    sk = SkCipher(encr, bits, integ, rnd(elen), rnd(alen))
    for inner in (b"", b"x", rnd(15), rnd(16), rnd(200)):
        padded = sk.pad(inner)
        assert len(padded) % sk.block_size == 0 and len(padded) == sk.padded_len(len(inner))
        aad = b"H" * 28 + b"\x29\x00" + sk.sk_payload_len(len(inner)).to_bytes(2, "big")
        body = sk.encrypt(padded, aad, rnd(sk.iv_size))
        assert len(body) + 4 == sk.sk_payload_len(len(inner))
        assert crypto.unpad_plaintext(sk.decrypt(body, aad)) == inner
        # any flipped bit in IV, ciphertext, ICV or AAD is caught
        for pos in {0, sk.iv_size, len(body) // 2, len(body) - 1}:
            bad = bytearray(body)
            bad[pos] ^= 0x01
            with pytest.raises(IntegrityError):
                sk.decrypt(bytes(bad), aad)
        with pytest.raises(IntegrityError):
            sk.decrypt(body, aad[:-1] + bytes((aad[-1] ^ 1,)))
        with pytest.raises(IntegrityError):
            sk.decrypt(body[:-1], aad)


def test_sk_cipher_argument_errors():
    with pytest.raises(CryptoError, match="36-octet SK_e"):
        SkCipher(EncrId.AES_GCM_16, 256, None, b"k" * 32)
    with pytest.raises(CryptoError, match="32-octet SK_a"):
        SkCipher(EncrId.AES_CBC, 128, IntegId.HMAC_SHA2_256_128, b"k" * 16, b"a" * 20)
    with pytest.raises(UnsupportedAlgorithm, match="needs an integrity"):
        SkCipher(EncrId.AES_CBC, 128, None, b"k" * 16)
    with pytest.raises(UnsupportedAlgorithm, match="AEAD"):
        SkCipher(EncrId.AES_GCM_16, 128, IntegId.HMAC_SHA2_256_128, b"k" * 20, b"a" * 32)
    with pytest.raises(UnsupportedAlgorithm, match="TRIPLE_DES"):
        SkCipher(EncrId.TRIPLE_DES, None, IntegId.HMAC_SHA2_256_128, b"k" * 24, b"a" * 32)
    with pytest.raises(UnsupportedAlgorithm, match="HMAC_SHA1_96"):
        SkCipher(EncrId.AES_CBC, 128, IntegId.HMAC_SHA1_96, b"k" * 16, b"a" * 20)
    with pytest.raises(UnsupportedAlgorithm, match="key length 512"):
        SkCipher(EncrId.AES_GCM_16, 512, None, b"k" * 68)
    sk = SkCipher(EncrId.AES_CBC, 128, IntegId.HMAC_SHA2_256_128, b"k" * 16, b"a" * 32)
    with pytest.raises(CryptoError, match="16-octet IV"):
        sk.encrypt(b"\x00" * 16, b"", b"\x00" * 8)
    with pytest.raises(CryptoError, match="pad it first"):
        sk.encrypt(b"\x00" * 15, b"", b"\x00" * 16)
    with pytest.raises(IntegrityError, match="malformed"):
        sk.decrypt(b"\x00" * 40, b"")  # 40 - 16 - 16 = 8: not a whole block


def test_pad_and_unpad_rfc7296_3_14():
    assert crypto.pad_plaintext(b"abc", 1) == b"abc\x00"
    assert crypto.pad_plaintext(b"abc", 16) == b"abc" + bytes(12) + b"\x0c"
    assert crypto.pad_plaintext(b"x" * 15, 16) == b"x" * 15 + b"\x00"
    # receivers accept any padding content
    assert crypto.unpad_plaintext(b"abc" + b"\xff\xee" + b"\x02") == b"abc"
    with pytest.raises(IntegrityError, match="Pad Length 9"):
        crypto.unpad_plaintext(b"abc\x09")
    with pytest.raises(IntegrityError, match="empty"):
        crypto.unpad_plaintext(b"")


# --------------------------------------------------------------------------- key exchange
def test_x25519_rfc7748_6_1():
    a = KeyExchange.generate(DhId.CURVE25519, fixed_random(
        H("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")))
    b = KeyExchange.generate(DhId.CURVE25519, fixed_random(
        H("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")))
    assert a.public_bytes == H("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    assert b.public_bytes == H("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    shared = H("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    assert a.shared_secret(b.public_bytes) == shared == b.shared_secret(a.public_bytes)


def test_x448_rfc7748_6_2():
    a = KeyExchange.generate(DhId.CURVE448, fixed_random(H(
        "9a8f4925d1519f5775cf46b04b5800d4ee9ee8bae8bc5565d498c28d"
        "d9c9baf574a9419744897391006382a6f127ab1d9ac2d8c0a598726b")))
    b = KeyExchange.generate(DhId.CURVE448, fixed_random(H(
        "1c306a7ac2a0e2e0990b294470cba339e6453772b075811d8fad0d1d"
        "6927c120bb5ee8972b0d3e21374c9c921b09d1b0366f10b65173992d")))
    assert a.public_bytes == H("9b08f7cc31b7e3e67d22d5aea121074a273bd2b83de09c63faa73d2c"
                               "22c5d9bbc836647241d953d40c5b12da88120d53177f80e532c41fa0")
    assert b.public_bytes == H("3eb7a829b0cd20f5bcfc0b599b6feccf6da4627107bdb0d4f345b430"
                               "27d8b972fc3e34fb4232a13ca706dcb57aec3dae07bdc1c67bf33609")
    shared = H("07fff4181ac6cc95ec1c16a94a0f74d12da232ce40a77552281d282b"
               "b60c0b56fd2464c335543936521c24403085d59a449a5037514a879d")
    assert a.shared_secret(b.public_bytes) == shared == b.shared_secret(a.public_bytes)


RFC5903_I = 0xC88F01F510D9AC3F70A292DAA2316DE544E9AAB8AFE84049C62A9C57862D1433
RFC5903_R = 0xC6EF9C5D78AE012A011164ACB397CE2088685D8F06BF9BE0B283AB46476BEE53
RFC5903_GI = H("DAD0B65394221CF9B051E1FECA5787D098DFE637FC90B9EF945D0C3772581180"
               "5271A0461CDB8252D61F1C456FA3E59AB1F45B33ACCF5F58389E0577B8990BB3")
RFC5903_GR = H("D12DFB5289C8D4F81208B70270398C342296970A0BCCB74C736FC7554494BF63"
               "56FBF3CA366CC23E8157854C13C58D6AAC23F046ADA30F8353E74F33039872AB")


def _ecp256_with_scalar(d: int) -> KeyExchange:
    # generate() maps 40 random octets r to d = r mod (n-1) + 1; feed r = d - 1
    return KeyExchange.generate(DhId.ECP_256, fixed_random((d - 1).to_bytes(40, "big")))


def test_ecp256_rfc5903_8_1_ikev2_encoding():
    i, r = _ecp256_with_scalar(RFC5903_I), _ecp256_with_scalar(RFC5903_R)
    # §8.1: the KE payload data is gix | giy (no 0x04 prefix, RFC 5903 §7)
    assert i.public_bytes == RFC5903_GI and r.public_bytes == RFC5903_GR
    # the shared secret g^ir is the x coordinate only
    girx = H("D6840F6B42F6EDAFD13116E0E12565202FEF8E9ECE7DCE03812464D04B9442DE")
    assert i.shared_secret(RFC5903_GR) == girx == r.shared_secret(RFC5903_GI)


@pytest.mark.parametrize("group", sorted(crypto.SUPPORTED_KE))
def test_every_group_agrees_and_is_deterministic(group):
    a = KeyExchange.generate(group, counter_random(1))
    b = KeyExchange.generate(group, counter_random(2))
    assert len(a.public_bytes) == crypto.ke_public_len(group)
    assert a.shared_secret(b.public_bytes) == b.shared_secret(a.public_bytes)
    assert KeyExchange.generate(group, counter_random(1)).public_bytes == a.public_bytes
    with pytest.raises(InvalidKeyExchange, match="must be"):
        a.shared_secret(b.public_bytes + b"\x00")
    with pytest.raises(InvalidKeyExchange, match="must be"):
        a.shared_secret(b.public_bytes[:-1])


# RFC 7748 §6 / RFC 8031 §2.2: low-order points give an all-zero secret and must be refused
X25519_LOW_ORDER = [
    bytes(32),
    (1).to_bytes(32, "little"),
    H("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),  # order 8
    H("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),  # order 8
    ((1 << 255) - 19 - 1).to_bytes(32, "little"),  # p - 1: order 2
    ((1 << 255) - 19).to_bytes(32, "little"),      # p (non-canonical 0)
]


@pytest.mark.parametrize("point", X25519_LOW_ORDER)
def test_x25519_low_order_points_refused(point):
    a = KeyExchange.generate(DhId.CURVE25519, counter_random(3))
    with pytest.raises(InvalidKeyExchange, match="low-order"):
        a.shared_secret(point)


def test_x448_zero_point_refused():
    a = KeyExchange.generate(DhId.CURVE448, counter_random(4))
    for point in (bytes(56), (1).to_bytes(56, "little")):
        with pytest.raises(InvalidKeyExchange, match="low-order"):
            a.shared_secret(point)


P256_P = 2**256 - 2**224 + 2**192 + 2**96 - 1


def test_ecp_points_not_on_curve_refused_rfc6989_2_3():
    a = KeyExchange.generate(DhId.ECP_256, counter_random(5))
    x, y = RFC5903_GR[:32], int.from_bytes(RFC5903_GR[32:], "big")
    bad = [
        x + (y + 1).to_bytes(32, "big"),             # off the curve
        bytes(64),                                   # (0, 0): not a point
        P256_P.to_bytes(32, "big") + RFC5903_GR[32:],  # x = p: coordinate out of range
        x + (y + 2**255).to_bytes(33, "big")[1:],       # y changed in its top bit
    ]
    # the valid mirror point (x, p - y) is accepted
    assert a.shared_secret(x + (P256_P - y).to_bytes(32, "big"))
    for point in bad:
        with pytest.raises(InvalidKeyExchange, match="not a point on the curve"):
            a.shared_secret(point)
    for group in (DhId.ECP_384, DhId.ECP_521):
        k = KeyExchange.generate(group, counter_random(6))
        other = KeyExchange.generate(group, counter_random(7)).public_bytes
        flipped = other[:-1] + bytes((other[-1] ^ 1,))
        with pytest.raises(InvalidKeyExchange):
            k.shared_secret(flipped)


@pytest.mark.parametrize("group", [DhId.MODP_2048, DhId.MODP_3072, DhId.MODP_4096])
def test_modp_public_values_checked_rfc6989_2_2(group):
    p = crypto.modp_prime(group)
    n = crypto.ke_public_len(group)
    a = KeyExchange.generate(group, counter_random(8))
    for y in (0, 1, p - 1, p, p + 1, (1 << (8 * n)) - 1):
        with pytest.raises(InvalidKeyExchange, match=r"1 < y < p-1"):
            a.shared_secret(y.to_bytes(n, "big"))
    assert len(a.shared_secret((2).to_bytes(n, "big"))) == n  # g itself is a fine value


# RFC 3526: p = 2^n - 2^(n-64) - 1 + 2^64 * ([2^(n-130) pi] + k); the published hex ends so
MODP_TAILS = {
    DhId.MODP_2048: "15728E5A8AACAA68FFFFFFFFFFFFFFFF",
    DhId.MODP_3072: "4B82D120A93AD2CAFFFFFFFFFFFFFFFF",
    DhId.MODP_4096: "4DF435C934063199FFFFFFFFFFFFFFFF",
    DhId.MODP_6144: "E694F91E6DCC4024FFFFFFFFFFFFFFFF",
    DhId.MODP_8192: "60C980DD98EDD3DFFFFFFFFFFFFFFFFF",
}


@pytest.mark.parametrize("group", sorted(MODP_TAILS))
def test_modp_primes_rfc3526(group):
    p = crypto.modp_prime(group)
    bits = crypto.ke_public_len(group) * 8
    assert p.bit_length() == bits
    h = f"{p:X}"
    assert h.startswith("FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD1")
    assert h.endswith(MODP_TAILS[group])
    if bits <= 4096:  # Fermat checks of p and q = (p-1)/2 (safe prime); bigger ones are slow
        q = (p - 1) // 2
        assert pow(3, p - 1, p) == 1 and pow(3, q - 1, q) == 1


def test_unsupported_and_weak_groups():
    for group in (DhId.MODP_1024, DhId.MODP_1536, DhId.ECP_224, DhId.BRAINPOOL_P256):
        with pytest.raises(UnsupportedAlgorithm, match=group.name):
            KeyExchange.generate(group, os.urandom)


def test_random_source_must_deliver():
    with pytest.raises(CryptoError, match="random source returned 3 octets, 32 requested"):
        KeyExchange.generate(DhId.CURVE25519, lambda n: b"abc")


# --------------------------------------------------------------------------- PSK AUTH, NAT-D
def test_psk_auth_definition_rfc7296_2_15():
    octets = crypto.signed_octets(PrfId.HMAC_SHA2_256, b"MSG", b"NONCE", b"p" * 32, b"\x02\0\0\0a")
    assert octets == b"MSG" + b"NONCE" + hmac.digest(b"p" * 32, b"\x02\0\0\0a", "sha256")
    want = hmac.digest(hmac.digest(b"psk", b"Key Pad for IKEv2", "sha256"), octets, "sha256")
    assert crypto.psk_auth(PrfId.HMAC_SHA2_256, b"psk", octets) == want
    assert crypto.psk_auth_matches(PrfId.HMAC_SHA2_256, b"psk", octets, want)
    assert not crypto.psk_auth_matches(PrfId.HMAC_SHA2_256, b"psk2", octets, want)


def test_nat_detection_hash_rfc7296_2_23():
    spi_i, spi_r = H("0102030405060708"), bytes(8)
    assert crypto.nat_detection_hash(spi_i, spi_r, bytes([192, 0, 2, 1]), 500) == \
        hashlib.sha1(spi_i + spi_r + bytes([192, 0, 2, 1]) + b"\x01\xf4").digest()


# --------------------------------------------------------------------------- policy agreement
@pytest.mark.parametrize("kind", ["ike", "esp"])
def test_everything_policy_allows_is_implemented(kind):
    """Each algorithm parse_proposal accepts must work in crypto.py (and nothing weak does)."""
    for tok in allowed_tokens(TransformType.ENCR, kind):
        t = parse_proposal(tok + ("-sha256" if tok in ("aes128", "aes192", "aes256") else "")
                           + ("-prfsha256-x25519" if kind == "ike" else ""), kind).encr[0]
        n = crypto.encr_key_len(t.id, t.key_length)
        SkCipher(t.id, t.key_length, None if crypto.is_aead(t.id) else IntegId.HMAC_SHA2_256_128,
                 b"k" * n, b"" if crypto.is_aead(t.id) else b"a" * 32)
    for tok in allowed_tokens(TransformType.INTEG, kind):
        t = parse_proposal("aes128-" + tok + ("-x25519" if kind == "ike" else ""), kind).integ[0]
        assert crypto.integ_key_len(t.id) > 0
    if kind == "ike":
        for tok in allowed_tokens(TransformType.PRF, kind):
            t = parse_proposal("aes128gcm16-" + tok + "-x25519", kind).prf[0]
            assert crypto.prf_output_len(t.id) >= 32
    for tok in allowed_tokens(TransformType.DH, kind):
        t = parse_proposal("aes128gcm16-" + ("prfsha256-" if kind == "ike" else "") + tok,
                           kind).dh[0]
        assert t.id in crypto.SUPPORTED_KE
    for weak_prf in (PrfId.HMAC_MD5, PrfId.HMAC_SHA1):
        with pytest.raises(UnsupportedAlgorithm):
            crypto.prf_output_len(weak_prf)
    for weak_integ in (IntegId.HMAC_MD5_96, IntegId.HMAC_SHA1_96):
        with pytest.raises(UnsupportedAlgorithm):
            crypto.integ_key_len(weak_integ)
    for weak_encr in (EncrId.DES, EncrId.TRIPLE_DES, EncrId.NULL):
        with pytest.raises(UnsupportedAlgorithm):
            crypto.encr_key_len(weak_encr, None)


def test_suite_from_selected_proposal():
    s = IkeSuite.from_proposal(parse_proposal("aes256-sha384-modp3072", "ike"))
    assert s == IkeSuite(EncrId.AES_CBC, 256, PrfId.HMAC_SHA2_384, IntegId.HMAC_SHA2_384_192,
                         DhId.MODP_3072)
    assert (s.sk_e_len, s.sk_a_len) == (32, 48)
    with pytest.raises(ValueError, match="expected one"):
        IkeSuite.from_proposal(parse_proposal("aes256gcm16-prfsha384-x25519-ecp256", "ike"))
    ci, cr = crypto.sk_ciphers(s, derive_ike_keys(s, b"g", b"n" * 16, b"m" * 16, b"I" * 8,
                                                  b"R" * 8)[1])
    body = ci.encrypt(ci.pad(b"hello"), b"aad", b"\x00" * 16)
    with pytest.raises(IntegrityError):
        cr.decrypt(body, b"aad")  # the other direction's keys
    assert crypto.unpad_plaintext(ci.decrypt(body, b"aad")) == b"hello"
