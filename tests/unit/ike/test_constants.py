"""Spot checks of the IANA registries against RFC 7296 §3 and the IANA IKEv2 parameters."""

from appliance.ike.constants import (
    DhId,
    EncrId,
    ExchangeType,
    IntegId,
    NotifyType,
    PayloadType,
    PrfId,
    TransformType,
    notify_is_error,
)


def test_core_values_from_rfc7296():
    assert ExchangeType.IKE_SA_INIT == 34 and ExchangeType.INFORMATIONAL == 37
    assert PayloadType.SA == 33 and PayloadType.SK == 46 and PayloadType.SKF == 53
    assert TransformType.ENCR == 1 and TransformType.ESN == 5 and TransformType.KE is TransformType.DH
    assert EncrId.AES_GCM_16 == 20 and EncrId.CHACHA20_POLY1305 == 28
    assert PrfId.HMAC_SHA2_384 == 6 and IntegId.HMAC_SHA2_512_256 == 14
    assert DhId.X25519 is DhId.CURVE25519 and DhId.CURVE25519 == 31 and DhId.ECP_521 == 21


def test_notify_error_and_status():
    assert NotifyType.NO_PROPOSAL_CHOSEN == 14 and NotifyType.NO_PROPOSAL_CHOSEN.is_error
    assert NotifyType.NAT_DETECTION_SOURCE_IP == 16388
    assert NotifyType.IKEV2_FRAGMENTATION_SUPPORTED == 16430
    assert NotifyType.SIGNATURE_HASH_ALGORITHMS == 16431
    assert not NotifyType.MOBIKE_SUPPORTED.is_error
    assert notify_is_error(8191) and not notify_is_error(16384)


def test_no_accidental_duplicate_values():
    # Aliases are declared deliberately (KE/DH, X25519/CURVE25519); nothing else may collide.
    for enum, allowed in ((NotifyType, set()), (PayloadType, set()), (EncrId, set()),
                          (DhId, {"X25519", "X448"}), (TransformType, {"KE"})):
        aliases = {n for n, m in enum.__members__.items() if m.name != n}
        assert aliases == allowed, enum
