"""The kernel data plane: XFRM SAs and policies over netlink, one XFRM interface per tunnel, the
tunnel hook (MTU, MSS clamp, user hooks) and reconciliation at start.

The daemon uses :class:`Dataplane` with the dataclasses of :mod:`appliance.xfrm.model`; the
lower layers (:mod:`~appliance.xfrm.kernel`, :mod:`~appliance.xfrm.link`, :mod:`~appliance.xfrm.nft`)
are there for tests, benchmarks and tools.
"""

from appliance.xfrm.dataplane import (
    ChildSaCounters,
    ChildSaExpire,
    Dataplane,
    DataplaneError,
    DataplaneEvents,
    ReconcileReport,
    SaCounters,
    TunnelAcquire,
    TunnelStatus,
)
from appliance.xfrm.hook import HookResult, TunnelMtu
from appliance.xfrm.model import (
    IF_ID_MAX,
    IF_ID_MIN,
    ChildSa,
    DataplaneInputError,
    Endpoints,
    EspAlgorithms,
    Lifetime,
    SaKeys,
    TunnelInterface,
    UdpEncap,
    derive_if_id,
)
from appliance.xfrm.natt import enable_espinudp

__all__ = [
    "ChildSa", "ChildSaCounters", "ChildSaExpire", "Dataplane", "DataplaneError", "DataplaneEvents",
    "DataplaneInputError", "Endpoints", "EspAlgorithms", "HookResult", "IF_ID_MAX", "IF_ID_MIN", "Lifetime",
    "ReconcileReport", "SaCounters", "SaKeys", "TunnelAcquire", "TunnelInterface", "TunnelMtu", "TunnelStatus",
    "UdpEncap", "derive_if_id", "enable_espinudp",
]
