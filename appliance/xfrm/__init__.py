"""The kernel data plane: XFRM SAs and policies over netlink, one XFRM interface per tunnel, the
tunnel hook (MTU, MSS clamp, user hooks) and reconciliation at start.

The daemon uses :class:`Dataplane` with the dataclasses of :mod:`appliance.xfrm.model`; the
lower layers (:mod:`~appliance.xfrm.kernel`, :mod:`~appliance.xfrm.link`, :mod:`~appliance.xfrm.nft`)
are there for tests, benchmarks and tools.
"""

# Names are resolved lazily (PEP 562) so that importing the light modules (e.g. model, for the
# config validator's if_id rules) does not load pyroute2 and the netlink layers.
_EXPORTS = {
    "appliance.xfrm.dataplane": ("ChildSaCounters", "ChildSaExpire", "Dataplane", "DataplaneError", "DataplaneEvents",
                                 "ReconcileReport", "SaCounters", "TunnelAcquire", "TunnelStatus"),
    "appliance.xfrm.hook": ("HookResult", "TunnelMtu"),
    "appliance.xfrm.model": ("IF_ID_MAX", "IF_ID_MIN", "ChildSa", "DataplaneInputError", "Endpoints", "EspAlgorithms",
                             "Lifetime", "SaKeys", "TunnelInterface", "UdpEncap", "derive_if_id"),
    "appliance.xfrm.natt": ("enable_espinudp",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'appliance.xfrm' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
