"""IANA IKEv2 registries ("Internet Key Exchange Version 2 (IKEv2) Parameters") as IntEnums.

Names follow the RFCs/IANA spelling (upper case, RFC wording) so that code reads like the
specification. Sources: RFC 7296 §3 (core), RFC 4555 (MOBIKE), RFC 5685 (redirect), RFC 7383
(fragmentation), RFC 7427 (signature authentication), RFC 6311 (message ID sync), RFC 5903/8031
(ECP/Curve25519/Curve448 groups), RFC 9242/9370 (intermediate exchange, multiple key exchanges).

Other developers may ADD members to these enums; do not rename existing ones.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

IKE_MAJOR_VERSION = 2
IKE_MINOR_VERSION = 0
IKE_PORT = 500
IKE_NATT_PORT = 4500
#: RFC 3948 §2.2: four zero octets before an IKE message sent on port 4500.
NON_ESP_MARKER = b"\x00\x00\x00\x00"
#: Length of the fixed IKE header (RFC 7296 §3.1) and of a generic payload header (§3.2).
IKE_HEADER_LEN = 28
GENERIC_PAYLOAD_HEADER_LEN = 4
#: Critical bit in the generic payload header flags octet (RFC 7296 §3.2).
PAYLOAD_CRITICAL = 0x80


class HeaderFlag(IntFlag):
    """IKE header Flags field (RFC 7296 §3.1)."""

    NONE = 0x00
    INITIATOR = 0x08  # I
    VERSION = 0x10  # V
    RESPONSE = 0x20  # R


class ExchangeType(IntEnum):
    """IKEv2 Exchange Types (RFC 7296 §3.1 and later RFCs)."""

    IKE_SA_INIT = 34
    IKE_AUTH = 35
    CREATE_CHILD_SA = 36
    INFORMATIONAL = 37
    IKE_SESSION_RESUME = 38  # RFC 5723
    GSA_AUTH = 39  # RFC 9838
    GSA_REGISTRATION = 40
    GSA_REKEY = 41
    IKE_INTERMEDIATE = 43  # RFC 9242
    IKE_FOLLOWUP_KE = 44  # RFC 9370


class PayloadType(IntEnum):
    """IKEv2 Payload Types ("Next Payload" values, RFC 7296 §3.2)."""

    NONE = 0  # No Next Payload
    SA = 33
    KE = 34
    IDi = 35
    IDr = 36
    CERT = 37
    CERTREQ = 38
    AUTH = 39
    NONCE = 40  # Ni / Nr
    NOTIFY = 41  # N
    DELETE = 42  # D
    VENDOR_ID = 43  # V
    TSi = 44
    TSr = 45
    SK = 46  # Encrypted and Authenticated
    CP = 47  # Configuration
    EAP = 48
    GSPM = 49  # RFC 6467
    IDg = 50  # RFC 9838
    GSA = 51
    KD = 52
    SKF = 53  # Encrypted and Authenticated Fragment, RFC 7383
    PS = 54  # Puzzle Solution, RFC 8019


class ProtocolId(IntEnum):
    """Security Protocol Identifiers (RFC 7296 §3.3.1; 0 is used by IKE-SA notifies, §3.10)."""

    NONE = 0
    IKE = 1
    AH = 2
    ESP = 3
    FC_ESP_HEADER = 4  # RFC 4595
    FC_CT_AUTHENTICATION = 5


class NotifyType(IntEnum):
    """Notify Message Types (RFC 7296 §3.10.1). Values < 16384 are errors, >= 16384 status."""

    # --- error types ---
    UNSUPPORTED_CRITICAL_PAYLOAD = 1
    INVALID_IKE_SPI = 4
    INVALID_MAJOR_VERSION = 5
    INVALID_SYNTAX = 7
    INVALID_MESSAGE_ID = 9
    INVALID_SPI = 11
    NO_PROPOSAL_CHOSEN = 14
    INVALID_KE_PAYLOAD = 17
    AUTHENTICATION_FAILED = 24
    SINGLE_PAIR_REQUIRED = 34
    NO_ADDITIONAL_SAS = 35
    INTERNAL_ADDRESS_FAILURE = 36
    FAILED_CP_REQUIRED = 37
    TS_UNACCEPTABLE = 38
    INVALID_SELECTORS = 39
    UNACCEPTABLE_ADDRESSES = 40  # RFC 4555
    UNEXPECTED_NAT_DETECTED = 41  # RFC 4555
    USE_ASSIGNED_HoA = 42  # RFC 5026
    TEMPORARY_FAILURE = 43
    CHILD_SA_NOT_FOUND = 44
    INVALID_GROUP_ID = 45  # RFC 9838
    AUTHORIZATION_FAILED = 46  # RFC 9838
    STATE_NOT_FOUND = 47  # RFC 9370

    # --- status types ---
    INITIAL_CONTACT = 16384
    SET_WINDOW_SIZE = 16385
    ADDITIONAL_TS_POSSIBLE = 16386
    IPCOMP_SUPPORTED = 16387
    NAT_DETECTION_SOURCE_IP = 16388
    NAT_DETECTION_DESTINATION_IP = 16389
    COOKIE = 16390
    USE_TRANSPORT_MODE = 16391
    HTTP_CERT_LOOKUP_SUPPORTED = 16392
    REKEY_SA = 16393
    ESP_TFC_PADDING_NOT_SUPPORTED = 16394
    NON_FIRST_FRAGMENTS_ALSO = 16395
    MOBIKE_SUPPORTED = 16396  # RFC 4555
    ADDITIONAL_IP4_ADDRESS = 16397  # RFC 4555
    ADDITIONAL_IP6_ADDRESS = 16398  # RFC 4555
    NO_ADDITIONAL_ADDRESSES = 16399  # RFC 4555
    UPDATE_SA_ADDRESSES = 16400  # RFC 4555
    COOKIE2 = 16401  # RFC 4555
    NO_NATS_ALLOWED = 16402  # RFC 4555
    AUTH_LIFETIME = 16403  # RFC 4478
    MULTIPLE_AUTH_SUPPORTED = 16404  # RFC 4739
    ANOTHER_AUTH_FOLLOWS = 16405  # RFC 4739
    REDIRECT_SUPPORTED = 16406  # RFC 5685
    REDIRECT = 16407  # RFC 5685
    REDIRECTED_FROM = 16408  # RFC 5685
    TICKET_LT_OPAQUE = 16409  # RFC 5723
    TICKET_REQUEST = 16410
    TICKET_ACK = 16411
    TICKET_NACK = 16412
    TICKET_OPAQUE = 16413
    LINK_ID = 16414  # RFC 5739
    USE_WESP_MODE = 16415  # RFC 5840
    ROHC_SUPPORTED = 16416  # RFC 5857
    EAP_ONLY_AUTHENTICATION = 16417  # RFC 5998
    CHILDLESS_IKEV2_SUPPORTED = 16418  # RFC 6023
    QUICK_CRASH_DETECTION = 16419  # RFC 6290
    IKEV2_MESSAGE_ID_SYNC_SUPPORTED = 16420  # RFC 6311
    IPSEC_REPLAY_COUNTER_SYNC_SUPPORTED = 16421  # RFC 6311
    IKEV2_MESSAGE_ID_SYNC = 16422  # RFC 6311
    IPSEC_REPLAY_COUNTER_SYNC = 16423  # RFC 6311
    SECURE_PASSWORD_METHODS = 16424  # RFC 6467
    PSK_PERSIST = 16425  # RFC 6631
    PSK_CONFIRM = 16426  # RFC 6631
    ERX_SUPPORTED = 16427  # RFC 6867
    IFOM_CAPABILITY = 16428
    SENDER_REQUEST_ID = 16429
    IKEV2_FRAGMENTATION_SUPPORTED = 16430  # RFC 7383
    SIGNATURE_HASH_ALGORITHMS = 16431  # RFC 7427
    CLONE_IKE_SA_SUPPORTED = 16432  # RFC 7791
    CLONE_IKE_SA = 16433  # RFC 7791
    PUZZLE = 16434  # RFC 8019
    USE_PPK = 16435  # RFC 8784
    PPK_IDENTITY = 16436  # RFC 8784
    NO_PPK_AUTH = 16437  # RFC 8784
    INTERMEDIATE_EXCHANGE_SUPPORTED = 16438  # RFC 9242
    IP4_ALLOWED = 16439  # RFC 8983
    IP6_ALLOWED = 16440  # RFC 8983
    ADDITIONAL_KEY_EXCHANGE = 16441  # RFC 9370
    USE_AGGFRAG = 16442  # RFC 9347

    @property
    def is_error(self) -> bool:
        """RFC 7296 §3.10.1: types below 16384 report errors."""
        return self.value < 16384


#: First status notify type; anything below is an error type (RFC 7296 §3.10.1).
NOTIFY_STATUS_MIN = 16384


def notify_is_error(notify_type: int) -> bool:
    """True for an error notify type, including unknown ones (RFC 7296 §3.10.1)."""
    return notify_type < NOTIFY_STATUS_MIN


class TransformType(IntEnum):
    """Transform Type Values (RFC 7296 §3.3.2; RFC 9370 renames 4 to Key Exchange Method)."""

    ENCR = 1
    PRF = 2
    INTEG = 3
    DH = 4  # "Key Exchange Method (KE)" since RFC 9370
    ESN = 5
    ADDKE1 = 6  # RFC 9370
    ADDKE2 = 7
    ADDKE3 = 8
    ADDKE4 = 9
    ADDKE5 = 10
    ADDKE6 = 11
    ADDKE7 = 12

    KE = 4  # alias of DH


class TransformAttribute(IntEnum):
    """Transform Attribute Types (RFC 7296 §3.3.5). Key Length is TV format (AF bit set)."""

    KEY_LENGTH = 14


#: Attribute Format bit: set means TV (2-octet value inline), clear means TLV (§3.3.5).
ATTRIBUTE_FORMAT_TV = 0x8000


class EncrId(IntEnum):
    """Transform Type 1 - Encryption Algorithm Transform IDs."""

    DES_IV64 = 1
    DES = 2
    TRIPLE_DES = 3  # ENCR_3DES
    RC5 = 4
    IDEA = 5
    CAST = 6
    BLOWFISH = 7
    THREE_IDEA = 8  # ENCR_3IDEA
    DES_IV32 = 9
    NULL = 11
    AES_CBC = 12
    AES_CTR = 13  # RFC 5930
    AES_CCM_8 = 14  # RFC 5282
    AES_CCM_12 = 15
    AES_CCM_16 = 16
    AES_GCM_8 = 18  # RFC 5282
    AES_GCM_12 = 19
    AES_GCM_16 = 20
    NULL_AUTH_AES_GMAC = 21  # RFC 4543 (ESP only)
    CAMELLIA_CBC = 23  # RFC 5529
    CAMELLIA_CTR = 24
    CAMELLIA_CCM_8 = 25
    CAMELLIA_CCM_12 = 26
    CAMELLIA_CCM_16 = 27
    CHACHA20_POLY1305 = 28  # RFC 7634
    AES_CCM_8_IIV = 29  # RFC 8750
    AES_GCM_16_IIV = 30  # RFC 8750
    CHACHA20_POLY1305_IIV = 31  # RFC 8750
    KUZNYECHIK_MGM_KTREE = 32  # RFC 9227
    MAGMA_MGM_KTREE = 33
    KUZNYECHIK_MGM_MAC_KTREE = 34
    MAGMA_MGM_MAC_KTREE = 35


class PrfId(IntEnum):
    """Transform Type 2 - Pseudorandom Function Transform IDs."""

    HMAC_MD5 = 1
    HMAC_SHA1 = 2
    HMAC_TIGER = 3
    AES128_XCBC = 4  # RFC 4434
    HMAC_SHA2_256 = 5  # RFC 4868
    HMAC_SHA2_384 = 6
    HMAC_SHA2_512 = 7
    AES128_CMAC = 8  # RFC 4615
    HMAC_STREEBOG_512 = 9  # RFC 9385


class IntegId(IntEnum):
    """Transform Type 3 - Integrity Algorithm Transform IDs."""

    NONE = 0
    HMAC_MD5_96 = 1
    HMAC_SHA1_96 = 2
    DES_MAC = 3
    KPDK_MD5 = 4
    AES_XCBC_96 = 5
    HMAC_MD5_128 = 6  # RFC 4595
    HMAC_SHA1_160 = 7  # RFC 4595
    AES_CMAC_96 = 8  # RFC 4494
    AES_128_GMAC = 9  # RFC 4543
    AES_192_GMAC = 10
    AES_256_GMAC = 11
    HMAC_SHA2_256_128 = 12  # RFC 4868
    HMAC_SHA2_384_192 = 13
    HMAC_SHA2_512_256 = 14


class DhId(IntEnum):
    """Transform Type 4 - Key Exchange Method (Diffie-Hellman group) Transform IDs."""

    NONE = 0
    MODP_768 = 1
    MODP_1024 = 2
    MODP_1536 = 5  # RFC 3526
    MODP_2048 = 14  # RFC 3526
    MODP_3072 = 15
    MODP_4096 = 16
    MODP_6144 = 17
    MODP_8192 = 18
    ECP_256 = 19  # RFC 5903
    ECP_384 = 20
    ECP_521 = 21
    MODP_1024_160 = 22  # RFC 5114
    MODP_2048_224 = 23
    MODP_2048_256 = 24
    ECP_192 = 25  # RFC 5114
    ECP_224 = 26
    BRAINPOOL_P224 = 27  # RFC 6954
    BRAINPOOL_P256 = 28
    BRAINPOOL_P384 = 29
    BRAINPOOL_P512 = 30
    CURVE25519 = 31  # RFC 8031
    CURVE448 = 32  # RFC 8031
    GOST3410_2012_256 = 33  # RFC 9385
    GOST3410_2012_512 = 34
    ML_KEM_512 = 35  # draft-ietf-ipsecme-ikev2-mlkem
    ML_KEM_768 = 36
    ML_KEM_1024 = 37

    X25519 = 31  # alias of CURVE25519
    X448 = 32  # alias of CURVE448


class EsnId(IntEnum):
    """Transform Type 5 - Extended Sequence Numbers Transform IDs."""

    NO_ESN = 0
    ESN = 1


class IdType(IntEnum):
    """IKEv2 Identification Payload ID Types (RFC 7296 §3.5)."""

    ID_IPV4_ADDR = 1
    ID_FQDN = 2
    ID_RFC822_ADDR = 3
    ID_IPV6_ADDR = 5
    ID_DER_ASN1_DN = 9
    ID_DER_ASN1_GN = 10
    ID_KEY_ID = 11
    ID_FC_NAME = 12  # RFC 4595
    ID_NULL = 13  # RFC 7619


class AuthMethod(IntEnum):
    """IKEv2 Authentication Method (RFC 7296 §3.8)."""

    RSA_DIGITAL_SIGNATURE = 1
    SHARED_KEY_MIC = 2  # PSK
    DSS_DIGITAL_SIGNATURE = 3
    ECDSA_SHA256_P256 = 9  # RFC 4754
    ECDSA_SHA384_P384 = 10
    ECDSA_SHA512_P521 = 11
    GENERIC_SECURE_PASSWORD = 12  # RFC 6467
    NULL_AUTH = 13  # RFC 7619
    DIGITAL_SIGNATURE = 14  # RFC 7427


class HashAlgorithm(IntEnum):
    """IKEv2 Hash Algorithms for the SIGNATURE_HASH_ALGORITHMS notify (RFC 7427 §4)."""

    SHA1 = 1
    SHA2_256 = 2
    SHA2_384 = 3
    SHA2_512 = 4
    IDENTITY = 5  # RFC 8420
    STREEBOG_256 = 6  # RFC 9385
    STREEBOG_512 = 7


class TsType(IntEnum):
    """IKEv2 Traffic Selector Types (RFC 7296 §3.13.1)."""

    TS_IPV4_ADDR_RANGE = 7
    TS_IPV6_ADDR_RANGE = 8
    TS_FC_ADDR_RANGE = 9  # RFC 4595
    TS_SECLABEL = 10  # RFC 9478


class CertEncoding(IntEnum):
    """IKEv2 Certificate Encodings (RFC 7296 §3.6)."""

    PKCS7_X509 = 1
    PGP = 2
    DNS_SIGNED_KEY = 3
    X509_SIGNATURE = 4
    KERBEROS_TOKEN = 6
    CRL = 7
    ARL = 8
    SPKI = 9
    X509_ATTRIBUTE = 10
    RAW_RSA_KEY = 11  # deprecated by RFC 7296
    HASH_URL_X509_CERT = 12
    HASH_URL_X509_BUNDLE = 13
    OCSP_CONTENT = 14  # RFC 4806
    RAW_PUBLIC_KEY = 15  # RFC 7670


class CfgType(IntEnum):
    """IKEv2 Configuration Payload CFG Types (RFC 7296 §3.15)."""

    CFG_REQUEST = 1
    CFG_REPLY = 2
    CFG_SET = 3
    CFG_ACK = 4


class CfgAttribute(IntEnum):
    """IKEv2 Configuration Payload Attribute Types (RFC 7296 §3.15.1)."""

    INTERNAL_IP4_ADDRESS = 1
    INTERNAL_IP4_NETMASK = 2
    INTERNAL_IP4_DNS = 3
    INTERNAL_IP4_NBNS = 4
    INTERNAL_IP4_DHCP = 6
    APPLICATION_VERSION = 7
    INTERNAL_IP6_ADDRESS = 8
    INTERNAL_IP6_DNS = 10
    INTERNAL_IP6_DHCP = 12
    INTERNAL_IP4_SUBNET = 13
    SUPPORTED_ATTRIBUTES = 14
    INTERNAL_IP6_SUBNET = 15


__all__ = [
    "ATTRIBUTE_FORMAT_TV",
    "GENERIC_PAYLOAD_HEADER_LEN",
    "IKE_HEADER_LEN",
    "IKE_MAJOR_VERSION",
    "IKE_MINOR_VERSION",
    "IKE_NATT_PORT",
    "IKE_PORT",
    "NON_ESP_MARKER",
    "NOTIFY_STATUS_MIN",
    "PAYLOAD_CRITICAL",
    "AuthMethod",
    "CertEncoding",
    "CfgAttribute",
    "CfgType",
    "DhId",
    "EncrId",
    "EsnId",
    "ExchangeType",
    "HashAlgorithm",
    "HeaderFlag",
    "IdType",
    "IntegId",
    "NotifyType",
    "PrfId",
    "ProtocolId",
    "TransformAttribute",
    "TransformType",
    "TsType",
    "notify_is_error",
]
