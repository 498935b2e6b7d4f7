"""What one tunnel asks of the IKE engine: plain dataclasses the config layer fills in.

`TunnelConfig` is the engine's whole view of a tunnel; the YAML model maps onto it. Defaults
follow the project seed: IKE SA rekeyed after 24 h, Child SA after 1 h, each with up to 10 %
random jitter taken off the rekey time (so two peers rarely rekey at once), and a hard
lifetime 10 % past the rekey time.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Literal

from appliance.ike.constants import IdType
from appliance.ike.proposals import Proposal, parse_proposals

DpdAction = Literal["clear", "restart", "hold"]


class PolicyError(ValueError):
    """A tunnel setting the engine cannot use; the message says which and what is allowed."""


@dataclass(frozen=True)
class Identity:
    """An IKE identity (RFC 7296 §3.5): ID Type and Identification Data."""

    id_type: int
    data: bytes

    @classmethod
    def parse(cls, text: str) -> "Identity":
        """strongSwan-style identity text.

        `192.0.2.1` / `2001:db8::1` → ID_IPV4_ADDR / ID_IPV6_ADDR; `C=CH, O=Org, CN=gw` →
        ID_DER_ASN1_DN; `user@example.net` → ID_RFC822_ADDR; `gw.example.net` or `@gw` →
        ID_FQDN. A prefix forces the type: `fqdn:`, `email:`/`rfc822:`, `ipv4:`, `ipv6:`,
        `dn:`.
        """
        t = text.strip()
        if not t:
            raise PolicyError("empty identity; give an FQDN, an e-mail address, an IP "
                              "address or a DN")
        prefix, _, rest = t.partition(":")
        forced = prefix.lower()
        if rest and forced in ("fqdn", "email", "rfc822", "ipv4", "ipv6", "dn"):
            if forced == "fqdn":
                return cls(IdType.ID_FQDN, rest.encode())
            if forced in ("email", "rfc822"):
                return cls(IdType.ID_RFC822_ADDR, rest.encode())
            if forced in ("ipv4", "ipv6"):
                try:
                    ip = ipaddress.ip_address(rest)
                except ValueError:
                    raise PolicyError(f"identity {text!r}: {rest!r} is not an IP address") from None
                if (ip.version == 4) != (forced == "ipv4"):
                    raise PolicyError(f"identity {text!r}: address family does not match {forced}")
                return cls.parse(rest)
            return cls(IdType.ID_DER_ASN1_DN, _dn_der(rest, text))
        try:
            ip = ipaddress.ip_address(t)
        except ValueError:
            pass
        else:
            return cls(IdType.ID_IPV4_ADDR if ip.version == 4 else IdType.ID_IPV6_ADDR, ip.packed)
        if "=" in t:
            return cls(IdType.ID_DER_ASN1_DN, _dn_der(t, text))
        if t.startswith("@"):
            return cls(IdType.ID_FQDN, t[1:].encode())
        if "@" in t:
            return cls(IdType.ID_RFC822_ADDR, t.encode())
        return cls(IdType.ID_FQDN, t.encode())

    def __str__(self) -> str:
        if self.id_type in (IdType.ID_IPV4_ADDR, IdType.ID_IPV6_ADDR) and len(self.data) in (4, 16):
            return str(ipaddress.ip_address(self.data))
        if self.id_type in (IdType.ID_FQDN, IdType.ID_RFC822_ADDR):
            return self.data.decode("utf-8", "replace")
        if self.id_type == IdType.ID_DER_ASN1_DN:
            return _dn_text(self.data)
        return f"{self.id_type}:{self.data.hex()}"


def _dn_der(dn: str, original: str) -> bytes:
    """strongSwan writes DNs most-significant RDN first ("C=CH, O=Org, CN=gw"); RFC 4514
    strings are the other way round."""
    from cryptography import x509

    parts = [p.strip() for p in re.split(r"(?<!\\),", dn) if p.strip()]
    try:
        name = x509.Name.from_rfc4514_string(",".join(reversed(parts)))
        return name.public_bytes()
    except Exception as e:  # cryptography raises ValueError and friends
        raise PolicyError(f"identity {original!r} is not a distinguished name: {e}") from None


def _dn_text(der: bytes) -> str:
    try:
        from cryptography.x509 import Name  # noqa: F401
        from cryptography.x509.oid import NameOID  # noqa: F401
        # cryptography has no public DER -> Name parser outside certificates; show hex.
    except Exception:  # pragma: no cover
        pass
    return "dn:" + der.hex()


@dataclass(frozen=True)
class DpdConfig:
    """Liveness checks (RFC 7296 §2.4): after `interval` seconds without hearing from the
    peer, send an empty INFORMATIONAL request; if nothing answers within `timeout` seconds the
    peer is dead and `action` follows: clear (drop the SAs), restart (drop and initiate again),
    hold (drop the SAs, keep the tunnel waiting for the peer or an explicit connect)."""

    interval: float = 30.0
    timeout: float = 150.0
    action: DpdAction = "restart"

    def __post_init__(self) -> None:
        if self.interval < 0 or self.timeout <= 0:
            raise PolicyError("dpd interval must be >= 0 (0 disables) and timeout > 0 seconds")
        if self.action not in ("clear", "restart", "hold"):
            raise PolicyError(f"dpd action {self.action!r}: use clear, restart or hold")


@dataclass(frozen=True)
class RetransmitConfig:
    """Request retransmission (RFC 7296 §2.1): first after `timeout` s, then multiplied by
    `base` each time; after `tries` retransmissions and one more wait, give up."""

    timeout: float = 4.0
    base: float = 1.8
    tries: int = 5

    def schedule(self) -> list[float]:
        """Delays (relative to the previous send) of each retransmission, then the give-up wait."""
        return [self.timeout * self.base ** n for n in range(self.tries + 1)]


def _nets(values: tuple[str, ...], what: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(v, strict=False))
        except ValueError:
            raise PolicyError(f"{what} {v!r} is not a network (e.g. 0.0.0.0/0, ::/0, 10.0.0.0/8)") from None
    return tuple(out)


@dataclass(frozen=True)
class TunnelConfig:
    """Everything the engine needs for one tunnel (one IKE SA with one route-based Child SA).

    Addresses are IP address strings; `remote_addr=None` accepts the peer from any address
    (responder only). `psk` is the pre-shared key (never shown in repr). Proposals are
    proposals.Proposal lists in preference order; `ike_proposals` carry the key exchange
    method for IKE_SA_INIT, an ESP proposal with a DH transform asks for PFS on rekeys.
    Traffic selectors default to everything (0.0.0.0/0 and ::/0 both ways): the route-based
    tunnel decides by routing into the XFRM interface with `if_id`.
    """

    name: str
    local_addr: str | None
    remote_addr: str | None
    local_id: Identity
    remote_id: Identity | None
    psk: bytes = field(repr=False)
    ike_proposals: tuple[Proposal, ...] = ()
    esp_proposals: tuple[Proposal, ...] = ()
    if_id: int = 0
    start: bool = True
    local_port: int = 500
    remote_port: int = 500
    ike_lifetime: float = 24 * 3600.0
    child_lifetime: float = 3600.0
    rekey_jitter: float = 0.1
    dpd: DpdConfig = field(default_factory=DpdConfig)
    retransmit: RetransmitConfig = field(default_factory=RetransmitConfig)
    half_open_timeout: float = 30.0
    reconnect_delay: float = 5.0
    reconnect_max_delay: float = 300.0
    local_ts: tuple[str, ...] = ("0.0.0.0/0", "::/0")
    remote_ts: tuple[str, ...] = ("0.0.0.0/0", "::/0")

    def __post_init__(self) -> None:
        if not self.name:
            raise PolicyError("a tunnel needs a name")
        if not self.psk:
            raise PolicyError(f"tunnel {self.name}: empty pre-shared key")
        if not self.ike_proposals:
            object.__setattr__(self, "ike_proposals", tuple(parse_proposals("aes256gcm16-prfsha384-x25519", "ike")))
        if not self.esp_proposals:
            object.__setattr__(self, "esp_proposals", tuple(parse_proposals("aes256gcm16", "esp")))
        if self.ike_lifetime <= 0 or self.child_lifetime <= 0:
            raise PolicyError(f"tunnel {self.name}: lifetimes must be > 0 seconds")
        if not 0 <= self.rekey_jitter < 0.5:
            raise PolicyError(f"tunnel {self.name}: rekey_jitter is a fraction in [0, 0.5)")
        if not 0 <= self.if_id < 2**32:
            raise PolicyError(f"tunnel {self.name}: if_id must fit 32 bits")
        for a in (self.local_addr, self.remote_addr):
            if a is not None:
                try:
                    ipaddress.ip_address(a)
                except ValueError:
                    raise PolicyError(f"tunnel {self.name}: {a!r} is not an IP address") from None
        if self.start and self.remote_addr is None:
            raise PolicyError(f"tunnel {self.name}: an initiating tunnel needs remote_addr")
        _nets(self.local_ts, f"tunnel {self.name}: local_ts")
        _nets(self.remote_ts, f"tunnel {self.name}: remote_ts")

    @property
    def local_nets(self):
        return _nets(self.local_ts, "local_ts")

    @property
    def remote_nets(self):
        return _nets(self.remote_ts, "remote_ts")
