"""From the config model to what `isthmusd` runs, and from a negotiated Child SA to the kernel.

A configured tunnel (:class:`appliance.config.Tunnel`) becomes a :class:`TunnelPlan`: the IKE
engine's :class:`~appliance.ike.policy.TunnelConfig`, the data plane's
:class:`~appliance.xfrm.TunnelInterface` and the tunnel's static routes. :func:`plan_tunnels`
builds every plan of a config or none: a tunnel the engine or the data plane cannot take is
reported as a config :class:`~appliance.config.Issue` (file, line, field), so `isthmusd` refuses
to start with it and `isthmus reload` refuses it without changing anything.

:func:`kernel_child` maps the engine's ChildSaInstalled (RFC 7296 §2.17 KEYMAT already split per
direction) onto the data plane's :class:`~appliance.xfrm.ChildSa` with the kernel's algorithm
names.
"""

from __future__ import annotations

import dataclasses

import errno
import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from appliance.config import CertAuth, Config, ConfigError, Issue, PskAuth, Tunnel
from appliance.ike.constants import EncrId, IntegId, TransformType
from appliance.ike.events import ChildSaInstalled, IkeSaAddressesUpdated
from appliance.ike.policy import DpdConfig, FragmentationConfig, Identity, PolicyError, TunnelConfig
from appliance.ike.proposals import Proposal
from appliance.xfrm.model import (ChildSa, DataplaneInputError, Endpoints, EspAlgorithms, Lifetime, SaKeys,
                                  TunnelInterface, UdpEncap, check_unique_if_ids)
from appliance.xfrm.mtu import esp_inner_mtu

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Seconds a kernel SA outlives the engine's hard lifetime: the engine deletes it first; the
#: kernel's own limit only catches an SA the daemon lost track of.
KERNEL_LIFETIME_SLACK = 60

LocalResolver = Callable[[IPAddress], "IPAddress | None"]


@dataclass(frozen=True)
class TunnelPlan:
    """Everything the daemon runs for one configured tunnel."""

    name: str
    tunnel: Tunnel               # the config model (PSK inside, never shown)
    ike: TunnelConfig            # the engine's view (psk repr=False)
    interface: TunnelInterface   # the data plane's view
    routes: tuple[IPNetwork, ...]

    def same_as(self, other: "TunnelPlan") -> bool:
        """True when a reload can leave the running tunnel alone. The bgp block is not part of
        it: the route manager applies a changed neighbor or policy without touching the SAs."""
        return (dataclasses.replace(self.tunnel, bgp=None) == dataclasses.replace(other.tunnel, bgp=None)
                and self.ike.local_addr == other.ike.local_addr)


def route_source(remote: IPAddress) -> IPAddress | None:
    """The source address the routing table picks towards `remote` (no packet is sent: a
    connected UDP socket only looks the route up), or None without a route."""
    family = socket.AF_INET6 if remote.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((str(remote), 500))
        except OSError as e:
            if e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL, errno.EINVAL):
                return None
            raise
        return ipaddress.ip_address(s.getsockname()[0])


def plan_tunnels(config: Config, resolve_local: LocalResolver = route_source) -> dict[str, TunnelPlan]:
    """The plans of every tunnel of `config`, in file order. Raises ConfigError listing every
    tunnel the engine or the data plane cannot take (nothing is half-planned)."""
    file = str(config.path)
    issues: list[Issue] = []
    plans: dict[str, TunnelPlan] = {}
    for name, t in config.tunnels.items():
        try:
            plans[name] = _plan(t, resolve_local)
        except _Refused as r:
            issues.append(Issue(file, t.line, f"tunnels.{name}.{r.field}" if r.field else f"tunnels.{name}",
                                r.message, name))
    if not issues:
        try:
            check_unique_if_ids([p.interface for p in plans.values()])
        except DataplaneInputError as e:
            issues.append(Issue(file, 0, "tunnels", str(e)))
    if issues:
        raise ConfigError(issues)
    return plans


class _Refused(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _credentials(auth: CertAuth):
    """The engine's certificate credentials (RFC 7427) from the config model's files."""
    from appliance.ike.certificates import CertCredentials

    try:
        return CertCredentials.from_pem(auth.certificate_pem, auth.key_pem.reveal(), list(auth.ca_pem),
                                        list(auth.crl_data))
    except PolicyError as e:
        raise _Refused("auth", str(e)) from None


def _plan(t: Tunnel, resolve_local: LocalResolver) -> TunnelPlan:
    cert = _credentials(t.auth) if isinstance(t.auth, CertAuth) else None
    psk = t.auth.psk.reveal() if isinstance(t.auth, PskAuth) else b""
    local = t.local
    if local is None:
        local = resolve_local(t.remote)
        if local is None:
            raise _Refused("local", f"no route to remote {t.remote} to choose our address from; set local: "
                                    f"to this appliance's address towards the peer")
    local_id = (Identity.from_config(t.local_id.kind, t.local_id.value) if t.local_id is not None
                else Identity.parse(str(local)))
    remote_id = Identity.from_config(t.remote_id.kind, t.remote_id.value)
    if cert is not None:
        from appliance.ike.certificates import id_matches

        if not id_matches(cert.certificate, local_id):
            raise _Refused("local_id", f"local_id {local_id} is not in our certificate "
                                       f"'{t.auth.certificate}' (subjectAltName dNSName / rfc822Name / "
                                       f"iPAddress, or the subject DN): the peer would refuse it; set "
                                       f"local_id to one of the certificate's names")
    try:
        ike = TunnelConfig(
            name=t.name, local_addr=str(local), remote_addr=str(t.remote), local_id=local_id, remote_id=remote_id,
            psk=psk, cert=cert, ike_proposals=t.ike.proposals, esp_proposals=t.esp.proposals,
            if_id=t.interface.if_id, start=t.start,
            ike_lifetime=float(t.ike.lifetime), ike_rekey_margin=float(max(1, t.ike.rekey_margin)),
            child_lifetime=float(t.esp.lifetime), child_rekey_margin=float(max(1, t.esp.rekey_margin)),
            rekey_jitter=_jitter(t), dpd=DpdConfig(float(t.dpd.interval), float(t.dpd.timeout), t.dpd.action),
            fragmentation=_fragmentation(t), nat_traversal=t.nat_traversal,
            nat_keepalive=float(t.nat_keepalive), mobike=t.mobike)
    except PolicyError as e:
        raise _Refused("", str(e)) from None
    mtu = t.interface.mtu
    if mtu is None and t.interface.outer_mtu is not None:
        mtu = outer_mtu_limit(t.esp.proposals, t.remote.version, t.interface.outer_mtu)
    addresses = tuple(a for a in (t.interface.address, t.interface.address6) if a is not None)
    try:
        iface = TunnelInterface(tunnel=t.name, ifname=t.interface.name, if_id=t.interface.if_id,
                                addresses=addresses, mtu=mtu)
    except DataplaneInputError as e:
        raise _Refused("interface", str(e)) from None
    return TunnelPlan(name=t.name, tunnel=t, ike=ike, interface=iface, routes=tuple(t.routes))


def _fragmentation(t: Tunnel) -> FragmentationConfig:
    """ike.fragmentation / ike.fragment_size (one size: a tunnel has one address family)."""
    size = t.ike.fragment_size
    if size is None:
        return FragmentationConfig(enabled=t.ike.fragmentation)
    return FragmentationConfig(enabled=t.ike.fragmentation, size_ipv4=size, size_ipv6=size)


def _jitter(t: Tunnel) -> float:
    """The engine rekeys `margin` plus up to `jitter` x margin before expiry; keep that inside the
    lifetime whatever margin the config allows (margin < lifetime)."""
    worst = 1.0
    for life, margin in ((t.ike.lifetime, t.ike.rekey_margin), (t.esp.lifetime, t.esp.rekey_margin)):
        margin = max(1, margin)
        worst = min(worst, 0.5 * (life - margin) / margin)
    return max(0.0, worst)


def outer_mtu_limit(proposals: Iterable[Proposal], outer_version: int, outer_mtu: int) -> int:
    """The interface MTU for a path of `outer_mtu` bytes (a peer that does not fragment, GCP's
    1460): the smallest inner MTU over the configured ESP transforms, with UDP encapsulation
    (the NAT-T case costs 8 bytes more) - the transform is not known before negotiation."""
    out = []
    for p in proposals:
        for alg in proposal_algorithms(p):
            out.append(esp_inner_mtu(alg, outer_version, True, outer_mtu))
    return max(576, min(out)) if out else max(576, outer_mtu - 100)


def proposal_algorithms(p: Proposal) -> list[EspAlgorithms]:
    out = []
    integs = [t.id for t in p.of_type(TransformType.INTEG) if t.id != IntegId.NONE] or [None]
    for encr in p.of_type(TransformType.ENCR):
        for integ in integs:
            try:
                out.append(esp_algorithms(int(encr.id), encr.key_length, None if integ is None else int(integ)))
            except DataplaneInputError:
                continue
    return out


_AEAD = {
    EncrId.AES_GCM_16: ("rfc4106(gcm(aes))", 128),
    EncrId.AES_GCM_12: ("rfc4106(gcm(aes))", 96),
    EncrId.AES_GCM_8: ("rfc4106(gcm(aes))", 64),
    EncrId.CHACHA20_POLY1305: ("rfc7539esp(chacha20,poly1305)", 128),
}
_INTEG = {
    IntegId.HMAC_SHA2_256_128: "hmac(sha256)",
    IntegId.HMAC_SHA2_384_192: "hmac(sha384)",
    IntegId.HMAC_SHA2_512_256: "hmac(sha512)",
}


def esp_algorithms(encr_id: int, key_bits: int | None, integ_id: int | None) -> EspAlgorithms:
    """The kernel's names for a negotiated ESP transform (RFC 4106, RFC 7634, RFC 3602 + RFC 4868)."""
    if encr_id in _AEAD:
        name, icv = _AEAD[EncrId(encr_id)]
        return EspAlgorithms(name, key_bits=key_bits or (256 if encr_id == EncrId.CHACHA20_POLY1305 else None),
                             icv_bits=icv)
    if encr_id == EncrId.AES_CBC:
        if integ_id not in _INTEG:
            raise DataplaneInputError(f"ESP integrity transform {integ_id} is not supported by the data plane; "
                                      f"allowed with AES-CBC: sha256, sha384, sha512")
        return EspAlgorithms("cbc(aes)", key_bits=key_bits, integrity=_INTEG[IntegId(integ_id)])
    try:
        name = EncrId(encr_id).name
    except ValueError:
        name = str(encr_id)
    raise DataplaneInputError(f"ESP encryption transform {name} is not supported by the data plane; allowed: "
                              f"AES-GCM, ChaCha20-Poly1305, AES-CBC with SHA-2")


def endpoints_of(e: IkeSaAddressesUpdated) -> Endpoints:
    """The data plane's Endpoints for the IKE SA's current addresses (ESP in UDP between its
    ports when it encapsulates, RFC 3948)."""
    encap = UdpEncap(e.local[1], e.remote[1]) if e.udp_encap else None
    return Endpoints(e.local[0], e.remote[0], encap)


def kernel_child(e: ChildSaInstalled) -> ChildSa:
    """The data plane's ChildSa for a negotiated pair (keys per direction, salt included)."""
    alg = esp_algorithms(e.encr_id, e.encr_key_bits, e.integ_id)
    encap = UdpEncap(e.local_port, e.remote_port) if e.udp_encap else None
    hard = int(e.lifetime_hard) + KERNEL_LIFETIME_SLACK if e.lifetime_hard > 0 else None
    return ChildSa(spi_in=e.spi_in, spi_out=e.spi_out, algorithms=alg,
                   keys_in=SaKeys(e.encr_key_in, e.integ_key_in), keys_out=SaKeys(e.encr_key_out, e.integ_key_out),
                   endpoints=Endpoints(e.local_addr, e.remote_addr, encap), esn=e.esn,
                   lifetime=Lifetime(hard_seconds=hard))


@dataclass(frozen=True)
class PlanDiff:
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    unchanged: tuple[str, ...]


def diff_plans(old: dict[str, TunnelPlan], new: dict[str, TunnelPlan]) -> PlanDiff:
    return PlanDiff(added=tuple(n for n in new if n not in old),
                    removed=tuple(n for n in old if n not in new),
                    changed=tuple(n for n in new if n in old and not new[n].same_as(old[n])),
                    unchanged=tuple(n for n in new if n in old and new[n].same_as(old[n])))
