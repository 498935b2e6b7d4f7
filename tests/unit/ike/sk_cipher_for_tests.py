"""Stand-in for crypto.SkCipher until crypto.py lands on main (TODO: switch to crypto.SkCipher).

AES-GCM-16 per RFC 5282: key material = key | 4-octet salt, nonce = salt | 8-octet IV,
AAD = IKE header | SK generic header, output IV | ciphertext | 16-octet ICV.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


class IntegrityError(Exception):
    pass


class _Gcm:
    block_size = 1
    iv_size = 8
    icv_size = 16

    def __init__(self, keymat: bytes) -> None:
        self._aead = AESGCM(keymat[:-4])
        self._salt = keymat[-4:]

    def encrypt(self, plaintext_with_pad: bytes, aad: bytes, iv: bytes) -> bytes:
        return iv + self._aead.encrypt(self._salt + iv, plaintext_with_pad, aad)

    def decrypt(self, iv_ct_icv: bytes, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(self._salt + iv_ct_icv[:8], iv_ct_icv[8:], aad)
        except InvalidTag as e:
            raise IntegrityError("ICV mismatch") from e


def sk_cipher_gcm(keymat: bytes) -> _Gcm:
    return _Gcm(keymat)
