"""Cloud-peer presets: ``peer_profile: aws | azure | gcp`` on a tunnel.

A preset does two things: it changes the *defaults* of a tunnel to values the cloud gateway
accepts, and it *checks* the tunnel against the limits the provider documents. Only documented
limits are enforced; each is cited below. Where the stored documentation corpus had no page for
a figure, that is said and nothing is enforced for it.

Sources (consulted through the project's documentation search, 2026):

AWS Site-to-Site VPN, tunnel options (EC2 API ``VpnTunnelOptionsSpecification`` /
``ModifyVpnTunnelOptionsSpecification``):
  [AWS-1] https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_ModifyVpnTunnelOptionsSpecification.html
          (DPD timeout >= 30 s, default 40; DPD action clear|none|restart; Phase 1 DH groups
          2, 14-24; Phase 1 encryption AES128, AES256, AES128-GCM-16, AES256-GCM-16)
  [AWS-2] https://docs.aws.amazon.com/AWSCloudFormation/latest/UserGuide/aws-properties-ec2-vpnconnection-vpntunneloptionsspecification.html
          (TunnelInsideCidr: a /30 in 169.254.0.0/16 except 169.254.0.0/30 ... 169.254.5.0/30
          and 169.254.169.252/30; PreSharedKey: 8-64 characters, alphanumerics, '.' and '_',
          not starting with '0')
  [AWS-3] https://docs.aws.amazon.com/sdk-for-kotlin/api/latest/ec2/aws.sdk.kotlin.services.ec2.model/-vpn-tunnel-options-specification/
          phase1-lifetime-seconds (900-28800, default 28800), phase2-lifetime-seconds
          (900-3600, less than Phase 1, default 3600), rekey-margin-time-seconds (60 .. half of
          Phase 2, default 270), phase2-dh-group-numbers (2, 5, 14-24),
          tunnel-inside-ipv6-cidr (a /126 from fd00::/8)
  [AWS-4] https://www.repost.aws/knowledge-center/vpn-custom-psk-inside-tunnel-ip
          (same /30 and reserved-block rule, from AWS's knowledge center)
  Phase 1/2 integrity: SHA1, SHA2-256, SHA2-384, SHA2-512 ([AWS-1]). AWS documents no separate
  PRF list; we accept prfsha256/384/512, the PRFs of the same hash family (our inference).
  X25519 (group 31) is *not* in AWS's DH lists, so the AWS preset's default IKE proposal uses
  ECP-384 (group 20).

Azure VPN Gateway, custom IPsec/IKE policy:
  [AZ-1] https://learn.microsoft.com/en-us/azure/vpn-gateway/ipsec-ike-policy-howto
          ("You must specify all algorithms and parameters for both IKE (Main Mode) and IPsec
          (Quick Mode). Partial policy specification isn't allowed."; one policy combination
          per connection; table of algorithms)
  [AZ-2] MicrosoftDocs/azure-docs includes/vpn-gateway-ipsec-ike-algorithm-include.md and
          includes/vpn-gateway-faq-ipsecikepolicy-include.md (IKEv2 encryption GCMAES256,
          GCMAES128, AES256, AES192, AES128; IKEv2 integrity SHA384, SHA256 (SHA1, MD5);
          DH group DHGroup24, ECP384, ECP256, DHGroup14/DHGroup2048 (...); IPsec encryption
          GCMAES256/192/128, AES256/192/128 (...); IPsec integrity GCMAES*, SHA256 (SHA1, MD5);
          PFS group PFS24, ECP384, ECP256, PFS2048 (...), None; QM SA lifetime minimum 300 s,
          default 27000 s; DPD timeout 9-3600 s, default 45; IKE Main Mode SA lifetime fixed at
          28800 s on the Azure side; SA lifetimes are local and need not match)
  The brief for this work mentions a QM SA lifetime maximum of 172799 s; no page in the corpus
  states a maximum (the Azure pages and the New-AzIpsecPolicy reference give only the minimum
  and the default), so no maximum is enforced.

Google Cloud VPN:
  [GCP-1] https://docs.cloud.google.com/network-connectivity/docs/vpn/concepts/mtu-considerations
          (the peer must pre-fragment: Cloud VPN does not support fragmentation after
          encapsulation; Cloud VPN gateway MTU 1460 bytes, 1440 over Cloud Interconnect)
  [GCP-2] https://docs.cloud.google.com/network-connectivity/docs/vpn/concepts/advanced
          (only one-to-one NAT, with UDP encapsulation for NAT-T; one-to-many NAT and
          port-based translation are not supported)
  [GCP-3] https://docs.cloud.google.com/distributed-cloud/hosted/docs/latest/gdcag/platform/pa-user/vpn/gdc-vpn-overview
          (GDC VPN, the same family: behind 1:1 NAT the peer must identify itself with its
          static external IPv4 address, not its internal one)
  [GCP-4] GoogleCloudPlatform community tutorial "How to Set Up VPN between Juniper SRX and
          Cloud VPN" (IKE lifetime 36,000 seconds (10 hours))
  The Cloud VPN "Supported IKE ciphers" page
  (https://cloud.google.com/network-connectivity/docs/vpn/concepts/supported-ike-ciphers) is in
  the corpus but its cipher tables could not be read, so the GCP preset restricts no algorithm
  and its Child SA lifetime default of 10800 s (3 h) comes from the project brief, not from a page
  we could read. The default IKE proposal uses ECP-384 rather than X25519 for the same reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network
from typing import Any

# --- proposals as the presets see them ---

def classify(proposal: Any) -> dict[str, list[str]]:
    """Canonical strongSwan tokens of a parsed proposal (appliance.ike.proposals.Proposal), by role.

    ESN is not judged (no provider documents a limit on it); an INTEG of NONE is not an algorithm.
    """
    from appliance.ike.constants import IntegId, TransformType
    from appliance.ike.proposals import transform_token

    roles = {TransformType.ENCR: "encr", TransformType.INTEG: "integ", TransformType.PRF: "prf",
             TransformType.DH: "dh"}
    out: dict[str, list[str]] = {"encr": [], "integ": [], "prf": [], "dh": []}
    for t in proposal.transforms:
        role = roles.get(t.type)
        if role is None or (t.type == TransformType.INTEG and t.id == IntegId.NONE):
            continue
        out[role].append(transform_token(t))
    return out


# --- what a preset gets and returns ---

@dataclass
class TunnelFacts:
    """The values a preset judges, plus which keys the YAML spelled out (``explicit``).

    A value is None when it is absent or already refused by the general rules; checks skip it.
    """

    explicit: set[str]
    ike_proposals: list[Any] | None      # parsed Proposals; None: already reported as a problem
    esp_proposals: list[Any] | None
    ike_lifetime: int | None
    esp_lifetime: int | None
    esp_rekey_margin: int | None
    dpd_timeout: int | None
    address: IPv4Interface | None
    address6: IPv6Interface | None
    mtu: int | None
    outer_mtu: int | None
    psk: bytes | None = field(default=None, repr=False)   # read from psk_file; never echoed
    local_id_kind: str | None = None
    local_id_value: str | None = None


Problem = tuple[str, str]   # (field path relative to the tunnel, message)


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    defaults: dict[str, Any]            # field path -> default value used by the validator
    required: tuple[str, ...]           # field paths that must be written in the YAML
    check: Callable[[TunnelFacts], list[Problem]]


def _fmt(seconds: int) -> str:
    return f"{seconds} s"


def _algorithms(problems: list[Problem], where: str, proposals: list[Any], allowed: dict[str, set[str]],
                provider: str) -> None:
    for i, proposal in enumerate(proposals):
        for kind, values in classify(proposal).items():
            for value in values:
                if value not in allowed.get(kind, set()):
                    names = {"encr": "encryption", "integ": "integrity", "prf": "PRF",
                             "dh": "key exchange (DH group)"}[kind]
                    problems.append((f"{where}[{i}]",
                                     f"{names} '{value}' is not accepted by {provider}; allowed {names}: "
                                     f"{', '.join(sorted(allowed[kind]))}"))


# --- AWS ---

AWS_INSIDE_SUPERNET = IPv4Network("169.254.0.0/16")
AWS_RESERVED_INSIDE = tuple(IPv4Network(n) for n in (
    "169.254.0.0/30", "169.254.1.0/30", "169.254.2.0/30", "169.254.3.0/30",
    "169.254.4.0/30", "169.254.5.0/30", "169.254.169.252/30"))           # [AWS-2]
AWS_INSIDE6_SUPERNET = IPv6Network("fd00::/8")                           # [AWS-3]
_AWS_PSK_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._")
_AWS_ENCR = {"aes128", "aes256", "aes128gcm16", "aes256gcm16"}           # [AWS-1]
_AWS_INTEG = {"sha256", "sha384", "sha512"}                              # [AWS-1] (sha1 refused by us)
_AWS_PRF = {"prfsha256", "prfsha384", "prfsha512"}                       # inferred, see above
_AWS_DH1 = {"modp2048", "modp3072", "modp4096", "modp6144", "modp8192", "ecp256", "ecp384",
            "ecp521", "modp1024s160", "modp2048s224", "modp2048s256"}   # groups 14-24 [AWS-1]
_AWS_DH2 = _AWS_DH1                                                      # 2, 5, 14-24 [AWS-3]; 2, 5 weak


def _check_aws(f: TunnelFacts) -> list[Problem]:
    p: list[Problem] = []
    if f.address is not None:   # its presence is required separately (Preset.required)
        net = f.address.network
        if net.prefixlen != 30:
            p.append(("interface.address", f"AWS inside CIDR must be a /30 in 169.254.0.0/16, not a "
                                           f"/{net.prefixlen} ({net})"))
        if not net.subnet_of(AWS_INSIDE_SUPERNET):
            p.append(("interface.address", f"AWS inside CIDR must be inside 169.254.0.0/16, not {net}"))
        for reserved in AWS_RESERVED_INSIDE:
            if net.overlaps(reserved):
                p.append(("interface.address",
                          f"{net} overlaps {reserved}, which AWS reserves; reserved: "
                          f"{', '.join(str(r) for r in AWS_RESERVED_INSIDE)}"))
    if f.address6 is not None:
        net6 = f.address6.network
        if net6.prefixlen != 126 or not net6.subnet_of(AWS_INSIDE6_SUPERNET):
            p.append(("interface.address6", f"AWS inside IPv6 CIDR must be a /126 inside fd00::/8, not {net6}"))
    if f.psk is not None:
        psk = f.psk
        if not 8 <= len(psk) <= 64 or any(chr(b) not in _AWS_PSK_CHARS for b in psk) \
                or psk.startswith(b"0"):
            p.append(("auth.psk_file",
                      "AWS pre-shared keys must be 8-64 characters of letters, digits, '.' and '_', "
                      "not starting with '0' (the key itself is not shown)"))
    if f.ike_lifetime is not None and not 900 <= f.ike_lifetime <= 28800:
        p.append(("ike.lifetime", f"AWS Phase 1 lifetime must be 900-28800 s, not {_fmt(f.ike_lifetime)}"))
    if f.esp_lifetime is not None:
        if not 900 <= f.esp_lifetime <= 3600:
            p.append(("esp.lifetime", f"AWS Phase 2 lifetime must be 900-3600 s, not {_fmt(f.esp_lifetime)}"))
        if f.ike_lifetime is not None and f.esp_lifetime >= f.ike_lifetime:
            p.append(("esp.lifetime", f"AWS Phase 2 lifetime ({_fmt(f.esp_lifetime)}) must be less than "
                                      f"the Phase 1 lifetime ({_fmt(f.ike_lifetime)})"))
        if f.esp_rekey_margin is not None:
            half = f.esp_lifetime // 2
            if not 60 <= f.esp_rekey_margin <= half:
                p.append(("esp.rekey_margin", f"AWS rekey margin must be between 60 s and half the Phase 2 "
                                              f"lifetime ({half} s), not {_fmt(f.esp_rekey_margin)}"))
    if f.dpd_timeout is not None and f.dpd_timeout < 30:
        p.append(("dpd.timeout", f"AWS DPD timeout must be at least 30 s, not {_fmt(f.dpd_timeout)}"))
    if f.ike_proposals:
        _algorithms(p, "ike.proposals", f.ike_proposals,
                    {"encr": _AWS_ENCR, "integ": _AWS_INTEG, "prf": _AWS_PRF, "dh": _AWS_DH1}, "AWS")
    if f.esp_proposals:
        _algorithms(p, "esp.proposals", f.esp_proposals,
                    {"encr": _AWS_ENCR, "integ": _AWS_INTEG, "dh": _AWS_DH2}, "AWS")
    return p


# --- Azure ---

_AZ_IKE_ENCR = {"aes256gcm16", "aes128gcm16", "aes256", "aes192", "aes128"}   # [AZ-2]
_AZ_IKE_INTEG = {"sha384", "sha256"}                                          # [AZ-2]
_AZ_IKE_PRF = {"prfsha384", "prfsha256"}                                      # same hashes
_AZ_DH = {"ecp384", "ecp256", "modp2048", "modp2048s256"}                     # 24, 20, 19, 14
_AZ_ESP_ENCR = {"aes256gcm16", "aes192gcm16", "aes128gcm16", "aes256", "aes192", "aes128"}
_AZ_ESP_INTEG = {"sha256"}


def _one_combination(p: list[Problem], where: str, proposals: list[Any]) -> None:
    """Azure takes exactly one policy combination per connection [AZ-1]."""
    if len(proposals) != 1:
        p.append((where, f"Azure accepts exactly one policy combination per connection; "
                         f"give one proposal, not {len(proposals)}"))
        return
    tokens = classify(proposals[0])
    for kind in ("encr", "integ", "prf", "dh"):
        if len(tokens[kind]) > 1:
            p.append((f"{where}[0]", f"Azure accepts one algorithm per role; this proposal lists "
                                     f"{len(tokens[kind])}: {', '.join(tokens[kind])}"))


def _check_azure(f: TunnelFacts) -> list[Problem]:
    p: list[Problem] = []
    if f.ike_proposals and "ike.proposals" in f.explicit:
        _one_combination(p, "ike.proposals", f.ike_proposals)
        _algorithms(p, "ike.proposals", f.ike_proposals,
                    {"encr": _AZ_IKE_ENCR, "integ": _AZ_IKE_INTEG, "prf": _AZ_IKE_PRF, "dh": _AZ_DH}, "Azure")
    if f.esp_proposals and "esp.proposals" in f.explicit:
        _one_combination(p, "esp.proposals", f.esp_proposals)
        _algorithms(p, "esp.proposals", f.esp_proposals,
                    {"encr": _AZ_ESP_ENCR, "integ": _AZ_ESP_INTEG, "dh": _AZ_DH}, "Azure")
    if f.esp_lifetime is not None and f.esp_lifetime < 300:
        p.append(("esp.lifetime", f"Azure QM SA lifetime must be at least 300 s, not {_fmt(f.esp_lifetime)}"))
    if f.dpd_timeout is not None and not 9 <= f.dpd_timeout <= 3600:
        p.append(("dpd.timeout", f"Azure DPD timeout must be 9-3600 s, not {_fmt(f.dpd_timeout)}"))
    return p


# --- GCP ---

GCP_GATEWAY_MTU = 1460   # [GCP-1]


def _check_gcp(f: TunnelFacts) -> list[Problem]:
    p: list[Problem] = []
    if f.outer_mtu is not None and f.outer_mtu > GCP_GATEWAY_MTU:
        p.append(("interface.outer_mtu",
                  f"Cloud VPN does not fragment after encapsulation, so encrypted packets must fit its "
                  f"gateway MTU of {GCP_GATEWAY_MTU} bytes; outer_mtu {f.outer_mtu} is larger"))
    if f.mtu is not None and f.mtu >= GCP_GATEWAY_MTU:
        p.append(("interface.mtu",
                  f"Cloud VPN needs pre-fragmentation: the tunnel MTU must leave room for ESP inside "
                  f"the {GCP_GATEWAY_MTU}-byte gateway MTU; use mtu: auto (derived from outer_mtu "
                  f"{GCP_GATEWAY_MTU}) or a smaller value than {f.mtu}"))
    if f.local_id_kind is not None and f.local_id_kind != "ipv4":
        p.append(("local_id", "Cloud VPN supports only 1:1 NAT and expects the peer to identify itself "
                              "with its external IPv4 address; allowed: an IPv4 address (or leave "
                              "local_id unset)"))
    elif f.local_id_kind == "ipv4" and f.local_id_value is not None:
        from ipaddress import IPv4Address
        if not IPv4Address(f.local_id_value).is_global:
            p.append(("local_id", f"Cloud VPN supports only 1:1 NAT: local_id must be this appliance's "
                                  f"external (public) IPv4 address, not {f.local_id_value}"))
    return p


PRESETS: dict[str, Preset] = {
    "aws": Preset(
        name="aws", title="AWS Site-to-Site VPN",
        defaults={
            "ike.proposals": ["aes256gcm16-prfsha384-ecp384"],   # no X25519 at AWS [AWS-1]
            "esp.proposals": ["aes256gcm16-ecp384"],             # PFS with a Phase 2 group [AWS-3]
            "ike.lifetime": 28800,                               # AWS default [AWS-3]
            "esp.lifetime": 3600,                                # AWS default [AWS-3]
            "esp.rekey_margin": 270,                             # AWS default [AWS-3]
            "dpd.timeout": 40,                                   # AWS default [AWS-1]
        },
        required=("interface.address",),
        check=_check_aws),
    "azure": Preset(
        name="azure", title="Azure VPN Gateway",
        defaults={
            "dpd.timeout": 45,                                   # Azure default [AZ-2]
        },
        # "You must specify all algorithms and parameters" [AZ-1]: nothing is left to a default.
        required=("ike.proposals", "ike.lifetime", "esp.proposals", "esp.lifetime"),
        check=_check_azure),
    "gcp": Preset(
        name="gcp", title="Google Cloud VPN",
        defaults={
            "ike.proposals": ["aes256gcm16-prfsha384-ecp384"],
            "ike.lifetime": 36000,                               # [GCP-4]
            "esp.lifetime": 10800,                               # project brief (see above)
            "interface.outer_mtu": GCP_GATEWAY_MTU,              # [GCP-1]
        },
        required=(),
        check=_check_gcp),
}
