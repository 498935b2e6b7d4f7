"""XFRM netlink messages as pyroute2 message classes.

pyroute2 creates xfrm *interfaces* (rtnetlink) but has no class for the NETLINK_XFRM family that
carries SAs and policies. This module describes that family with pyroute2's own framework:
every C structure of ``include/uapi/linux/xfrm.h`` becomes an ``nlmsg`` (message body) or ``nla``
(attribute) subclass whose ``fields`` follow the kernel layout byte for byte, and
:class:`MarshalXfrm` maps message types to classes the way pyroute2's ``MarshalRtnl`` does for
rtnetlink.

The structures are laid out for the x86-64/arm64 ABI the appliance runs on: ``struct
xfrm_lifetime_cfg`` holds ``__u64`` members, so every structure that embeds it is padded to a
multiple of 8 (``xfrm_usersa_info`` is 224 bytes, ``xfrm_userpolicy_info`` 168). pyroute2 encodes
each field on its own (no implicit C alignment), so the padding is written out as ``x`` fields
named ``__pad*``. tests/unit/test_xfrm_messages.py checks every size against the kernel's.

Addresses are kept as the raw 16-byte ``xfrm_address_t`` union; :mod:`appliance.xfrm.kernel`
turns them into :mod:`ipaddress` objects using the family that travels next to them.
"""

from __future__ import annotations

import struct

from pyroute2.netlink import NotInitialized, nla, nlmsg
from pyroute2.netlink.marshal import Marshal

# --- message types (enum in xfrm.h, XFRM_MSG_BASE = 0x10) -------------------------------------
XFRM_MSG_NEWSA = 0x10
XFRM_MSG_DELSA = 0x11
XFRM_MSG_GETSA = 0x12
XFRM_MSG_NEWPOLICY = 0x13
XFRM_MSG_DELPOLICY = 0x14
XFRM_MSG_GETPOLICY = 0x15
XFRM_MSG_ALLOCSPI = 0x16
XFRM_MSG_ACQUIRE = 0x17
XFRM_MSG_EXPIRE = 0x18
XFRM_MSG_UPDPOLICY = 0x19
XFRM_MSG_UPDSA = 0x1A
XFRM_MSG_POLEXPIRE = 0x1B
XFRM_MSG_FLUSHSA = 0x1C
XFRM_MSG_FLUSHPOLICY = 0x1D
XFRM_MSG_NEWAE = 0x1E
XFRM_MSG_GETAE = 0x1F

# --- multicast groups (enum xfrm_nlgroups) ------------------------------------------------------
XFRMNLGRP_ACQUIRE = 1
XFRMNLGRP_EXPIRE = 2
XFRMNLGRP_SA = 3
XFRMNLGRP_POLICY = 4

# --- constants -----------------------------------------------------------------------------------
XFRM_INF = (1 << 64) - 1
XFRM_MODE_TRANSPORT = 0
XFRM_MODE_TUNNEL = 1
XFRM_POLICY_IN = 0
XFRM_POLICY_OUT = 1
XFRM_POLICY_FWD = 2
XFRM_POLICY_ALLOW = 0
XFRM_POLICY_BLOCK = 1
XFRM_POLICY_TYPE_MAIN = 0
XFRM_SHARE_ANY = 0
# xfrm_usersa_info.flags
XFRM_STATE_NOECN = 1
XFRM_STATE_DECAP_DSCP = 2
XFRM_STATE_NOPMTUDISC = 4
XFRM_STATE_WILDRECV = 8
XFRM_STATE_ICMP = 16
XFRM_STATE_AF_UNSPEC = 32
XFRM_STATE_ALIGN4 = 64
XFRM_STATE_ESN = 128
XFRMA_REPLAY_ESN_MAX = 4096  # bits of replay bitmap the kernel accepts
# include/uapi/linux/udp.h
UDP_ENCAP_ESPINUDP = 2
IPPROTO_ESP = 50

# --- shared field layouts -------------------------------------------------------------------------


def _selector(prefix: str) -> tuple[tuple[str, str], ...]:
    """struct xfrm_selector (56 bytes)."""
    return (
        (f"{prefix}daddr", "16s"),
        (f"{prefix}saddr", "16s"),
        (f"{prefix}dport", ">H"),
        (f"{prefix}dport_mask", ">H"),
        (f"{prefix}sport", ">H"),
        (f"{prefix}sport_mask", ">H"),
        (f"{prefix}family", "H"),
        (f"{prefix}prefixlen_d", "B"),
        (f"{prefix}prefixlen_s", "B"),
        (f"{prefix}proto", "B"),
        (f"__{prefix}pad", "3x"),
        (f"{prefix}ifindex", "i"),
        (f"{prefix}user", "I"),
    )


LIFETIME_CFG_NAMES = (
    "soft_byte_limit",
    "hard_byte_limit",
    "soft_packet_limit",
    "hard_packet_limit",
    "soft_add_expires_seconds",
    "hard_add_expires_seconds",
    "soft_use_expires_seconds",
    "hard_use_expires_seconds",
)
LIFETIME_CUR_NAMES = ("bytes", "packets", "add_time", "use_time")


def _lifetime_cfg(prefix: str) -> tuple[tuple[str, str], ...]:
    """struct xfrm_lifetime_cfg (64 bytes)."""
    return tuple((f"{prefix}{n}", "Q") for n in LIFETIME_CFG_NAMES)


def _lifetime_cur(prefix: str) -> tuple[tuple[str, str], ...]:
    """struct xfrm_lifetime_cur (32 bytes)."""
    return tuple((f"{prefix}{n}", "Q") for n in LIFETIME_CUR_NAMES)


def _xfrm_id(prefix: str) -> tuple[tuple[str, str], ...]:
    """struct xfrm_id (24 bytes): daddr, SPI (network order), proto."""
    return ((f"{prefix}daddr", "16s"), (f"{prefix}spi", ">I"), (f"{prefix}proto", "B"), (f"__{prefix}pad", "3x"))


USERSA_INFO_FIELDS = (
    _selector("sel_")
    + _xfrm_id("id_")
    + (("saddr", "16s"),)
    + _lifetime_cfg("lft_")
    + _lifetime_cur("curlft_")
    + (
        ("stats_replay_window", "I"),
        ("stats_replay", "I"),
        ("stats_integrity_failed", "I"),
        ("seq", "I"),
        ("reqid", "I"),
        ("family", "H"),
        ("mode", "B"),
        ("replay_window", "B"),
        ("flags", "B"),
        ("__pad_tail", "7x"),
    )
)

USERPOLICY_INFO_FIELDS = (
    _selector("sel_")
    + _lifetime_cfg("lft_")
    + _lifetime_cur("curlft_")
    + (
        ("priority", "I"),
        ("index", "I"),
        ("dir", "B"),
        ("action", "B"),
        ("flags", "B"),
        ("share", "B"),
        ("__pad_tail", "4x"),
    )
)

# struct xfrm_user_tmpl (64 bytes); XFRMA_TMPL carries one or more of them back to back.
USER_TMPL_FIELDS = (
    _xfrm_id("id_")
    + (
        ("family", "H"),
        ("__pad_family", "2x"),
        ("saddr", "16s"),
        ("reqid", "I"),
        ("mode", "B"),
        ("share", "B"),
        ("optional", "B"),
        ("__pad_optional", "x"),
        ("aalgos", "I"),
        ("ealgos", "I"),
        ("calgos", "I"),
    )
)

def fields_size(fields: tuple[tuple[str, str], ...]) -> int:
    """Size in bytes of a field list encoded the way pyroute2 encodes it (each field on its own)."""
    return sum(struct.calcsize(f) for _, f in fields)


def _pack_fields(fields: tuple[tuple[str, str], ...], values: dict) -> bytes:
    out = bytearray()
    for name, fmt in fields:
        if fmt.endswith("x"):
            out += struct.pack(fmt)
        else:
            out += struct.pack(fmt, values.get(name, 0 if not fmt.endswith("s") else b""))
    return bytes(out)


def _unpack_fields(fields: tuple[tuple[str, str], ...], data: bytes | bytearray, offset: int) -> dict:
    values = {}
    for name, fmt in fields:
        size = struct.calcsize(fmt)
        if not fmt.endswith("x"):
            (values[name],) = struct.unpack_from(fmt, data, offset)
        offset += size
    return values


TMPL_SIZE = fields_size(USER_TMPL_FIELDS)

# --- attributes (enum xfrm_attr_type_t) -----------------------------------------------------------


class _TrailingBytesNla(nla):
    """An attribute made of fixed fields followed by a variable byte string (``char x[0]``)."""

    __slots__ = ()
    trailing = "value_bytes"

    def ft_encode(self, offset):
        offset, diff = super().ft_encode(offset)
        tail = bytes(self.get(self.trailing) or b"")
        self.data.extend(tail)
        pad = (-len(tail)) % 4
        self.data.extend(b"\0" * pad)
        # the NLA length covers the payload, not the padding after it
        return offset + len(tail) + pad, diff + pad

    def ft_decode(self, offset):
        super().ft_decode(offset)
        start = self.offset + 4 + fields_size(self.fields)
        end = self.offset + self.length
        self[self.trailing] = bytes(self.data[start:end])


class _StructCodec:
    """The fixed C structure of a message body packed and unpacked in one ``struct`` call.

    pyroute2's generic codec handles each field on its own (a dictionary walk per field); the
    XFRM bodies have 30-60 fields, which made encoding the larger part of installing an SA. The
    layout is still the class's ``fields``; network-order fields travel as byte strings.
    tests/unit/test_xfrm_messages.py checks the bytes equal pyroute2's generic encoder's.
    """

    __slots__ = ()
    _codecs: dict = {}

    @classmethod
    def _codec(cls):
        codec = _StructCodec._codecs.get(cls)
        if codec is None:
            fmt, plan = "=", []
            for name, f in cls.fields:
                if f.endswith("x"):
                    fmt += f
                elif f.startswith(">"):
                    size = struct.calcsize(f)
                    fmt += f"{size}s"
                    plan.append((name, size, True))
                else:
                    fmt += f
                    plan.append((name, f, False))
            codec = (struct.Struct(fmt), plan)
            _StructCodec._codecs[cls] = codec
        return codec

    def ft_encode(self, offset):
        st, plan = self._codec()
        defaults = self.defaults
        values = []
        for name, f, network in plan:
            v = dict.get(self, name)
            if v is None:
                v = defaults.get(name, 0)
            values.append(v.to_bytes(f, "big") if network else v)
        self.data.extend(st.pack(*values))
        offset += st.size
        diff = (-offset) % self.align if self.align > 0 else 0
        self.data.extend(b"\0" * diff)
        return offset + diff, diff

    def ft_decode(self, offset):
        st, plan = self._codec()
        for (name, _f, network), v in zip(plan, st.unpack_from(self.data, offset)):
            self[name] = int.from_bytes(v, "big") if network else v
        offset += st.size
        if self.nla_map:
            self.decode_nlas((offset + 3) & ~3)
        else:
            del self["attrs"]
        if self["value"] is NotInitialized:
            del self["value"]


class xfrm_attrs(_StructCodec, nlmsg):
    """Base of every XFRM message: the attribute map and the attribute classes."""

    __slots__ = ()
    prefix = "XFRMA_"
    nla_map = (
        (1, "XFRMA_ALG_AUTH", "xfrm_algo"),
        (2, "XFRMA_ALG_CRYPT", "xfrm_algo"),
        (3, "XFRMA_ALG_COMP", "xfrm_algo"),
        (4, "XFRMA_ENCAP", "xfrm_encap_tmpl"),
        (5, "XFRMA_TMPL", "xfrm_user_tmpls"),
        (6, "XFRMA_SA", "none"),
        (7, "XFRMA_POLICY", "none"),
        (8, "XFRMA_SEC_CTX", "none"),
        (9, "XFRMA_LTIME_VAL", "xfrm_lifetime_cur"),
        (10, "XFRMA_REPLAY_VAL", "xfrm_replay_state"),
        (11, "XFRMA_REPLAY_THRESH", "uint32"),
        (12, "XFRMA_ETIMER_THRESH", "uint32"),
        (13, "XFRMA_SRCADDR", "xfrm_address"),
        (14, "XFRMA_COADDR", "xfrm_address"),
        (15, "XFRMA_LASTUSED", "uint64"),
        (16, "XFRMA_POLICY_TYPE", "xfrm_userpolicy_type"),
        (17, "XFRMA_MIGRATE", "none"),
        (18, "XFRMA_ALG_AEAD", "xfrm_algo_aead"),
        (19, "XFRMA_KMADDRESS", "none"),
        (20, "XFRMA_ALG_AUTH_TRUNC", "xfrm_algo_auth"),
        (21, "XFRMA_MARK", "xfrm_mark"),
        (22, "XFRMA_TFCPAD", "uint32"),
        (23, "XFRMA_REPLAY_ESN_VAL", "xfrm_replay_state_esn"),
        (24, "XFRMA_SA_EXTRA_FLAGS", "uint32"),
        (25, "XFRMA_PROTO", "uint8"),
        (26, "XFRMA_ADDRESS_FILTER", "xfrm_address_filter"),
        (27, "XFRMA_PAD", "none"),
        (28, "XFRMA_OFFLOAD_DEV", "none"),
        (29, "XFRMA_SET_MARK", "uint32"),
        (30, "XFRMA_SET_MARK_MASK", "uint32"),
        (31, "XFRMA_IF_ID", "uint32"),
        (32, "XFRMA_MTIMER_THRESH", "uint32"),
    )

    class xfrm_algo(_TrailingBytesNla):
        """struct xfrm_algo: name, key length in bits, key."""

        __slots__ = ()
        fields = (("alg_name", "64s"), ("alg_key_len", "I"))
        trailing = "alg_key"

    class xfrm_algo_auth(_TrailingBytesNla):
        """struct xfrm_algo_auth: name, key length and truncation length in bits, key."""

        __slots__ = ()
        fields = (("alg_name", "64s"), ("alg_key_len", "I"), ("alg_trunc_len", "I"))
        trailing = "alg_key"

    class xfrm_algo_aead(_TrailingBytesNla):
        """struct xfrm_algo_aead: name, key length and ICV length in bits, key (with salt)."""

        __slots__ = ()
        fields = (("alg_name", "64s"), ("alg_key_len", "I"), ("alg_icv_len", "I"))
        trailing = "alg_key"

    class xfrm_encap_tmpl(nla):
        """struct xfrm_encap_tmpl (24 bytes); ports in network order."""

        __slots__ = ()
        fields = (
            ("encap_type", "H"),
            ("encap_sport", ">H"),
            ("encap_dport", ">H"),
            ("__pad", "2x"),
            ("encap_oa", "16s"),
        )

    class xfrm_user_tmpls(nla):
        """XFRMA_TMPL: an array of struct xfrm_user_tmpl, back to back; value = list of dicts."""

        __slots__ = ()
        fields = ()

        def ft_encode(self, offset):
            for tmpl in self.get("templates") or ():
                self.data.extend(_pack_fields(USER_TMPL_FIELDS, tmpl))
                offset += TMPL_SIZE
            return offset, 0

        def ft_decode(self, offset):
            end = self.offset + self.length
            templates = []
            while offset + TMPL_SIZE <= end:
                templates.append(_unpack_fields(USER_TMPL_FIELDS, self.data, offset))
                offset += TMPL_SIZE
            self["templates"] = templates
            self.pop("attrs", None)

    class xfrm_lifetime_cur(nla):
        __slots__ = ()
        fields = _lifetime_cur("")

    class xfrm_replay_state(nla):
        __slots__ = ()
        fields = (("oseq", "I"), ("seq", "I"), ("bitmap", "I"))

    class xfrm_replay_state_esn(nla):
        """struct xfrm_replay_state_esn with its bitmap of bmp_len 32-bit words."""

        __slots__ = ()
        fields = (
            ("bmp_len", "I"),
            ("oseq", "I"),
            ("seq", "I"),
            ("oseq_hi", "I"),
            ("seq_hi", "I"),
            ("replay_window", "I"),
        )

        def ft_encode(self, offset):
            bmp = list(self.get("bmp") or ())
            if not bmp:
                bmp = [0] * self["bmp_len"]
            if len(bmp) != self["bmp_len"]:
                raise ValueError(f"replay bitmap has {len(bmp)} words, bmp_len says {self['bmp_len']}")
            offset, diff = super().ft_encode(offset)
            self.data.extend(struct.pack(f"{len(bmp)}I", *bmp))
            return offset + 4 * len(bmp), diff

        def ft_decode(self, offset):
            super().ft_decode(offset)
            start = self.offset + 4 + fields_size(self.fields)
            end = self.offset + self.length
            words = min(self["bmp_len"], max(0, (end - start) // 4))
            self["bmp"] = list(struct.unpack_from(f"{words}I", self.data, start))

    class xfrm_address(nla):
        __slots__ = ()
        fields = (("value", "16s"),)

    class xfrm_mark(nla):
        __slots__ = ()
        fields = (("v", "I"), ("m", "I"))

    class xfrm_userpolicy_type(nla):
        __slots__ = ()
        fields = (("type", "B"), ("__pad", "x"), ("reserved1", "H"), ("reserved2", "B"), ("__pad2", "x"))

    class xfrm_address_filter(nla):
        __slots__ = ()
        fields = (("saddr", "16s"), ("daddr", "16s"), ("family", "H"), ("splen", "B"), ("dplen", "B"))


# --- message bodies -------------------------------------------------------------------------------


class xfrm_usersa_info(xfrm_attrs):
    """struct xfrm_usersa_info (224 bytes): XFRM_MSG_NEWSA / UPDSA, and every SA the kernel reports."""

    __slots__ = ()
    fields = USERSA_INFO_FIELDS


class xfrm_usersa_id(xfrm_attrs):
    """struct xfrm_usersa_id (24 bytes): XFRM_MSG_DELSA / GETSA."""

    __slots__ = ()
    fields = (("daddr", "16s"), ("spi", ">I"), ("family", "H"), ("proto", "B"), ("__pad", "x"))


class xfrm_userpolicy_info(xfrm_attrs):
    """struct xfrm_userpolicy_info (168 bytes): XFRM_MSG_NEWPOLICY / UPDPOLICY and policy dumps."""

    __slots__ = ()
    fields = USERPOLICY_INFO_FIELDS


class xfrm_userpolicy_id(xfrm_attrs):
    """struct xfrm_userpolicy_id (64 bytes): XFRM_MSG_DELPOLICY / GETPOLICY."""

    __slots__ = ()
    fields = _selector("sel_") + (("index", "I"), ("dir", "B"), ("__pad", "3x"))


class xfrm_user_expire(xfrm_attrs):
    """struct xfrm_user_expire (232 bytes): XFRM_MSG_EXPIRE, soft (hard=0) or hard."""

    __slots__ = ()
    fields = USERSA_INFO_FIELDS + (("hard", "B"), ("__pad_hard", "7x"))


class xfrm_user_polexpire(xfrm_attrs):
    """struct xfrm_user_polexpire (176 bytes): XFRM_MSG_POLEXPIRE."""

    __slots__ = ()
    fields = USERPOLICY_INFO_FIELDS + (("hard", "B"), ("__pad_hard", "7x"))


class xfrm_user_acquire(xfrm_attrs):
    """struct xfrm_user_acquire (280 bytes): XFRM_MSG_ACQUIRE (an outbound packet found no SA)."""

    __slots__ = ()
    fields = (
        _xfrm_id("id_")
        + (("saddr", "16s"),)
        + _selector("sel_")
        # the embedded struct xfrm_userpolicy_info, its padding included
        + tuple((f"__policy{n}" if n.startswith("__") else f"policy_{n}", f) for n, f in USERPOLICY_INFO_FIELDS)
        + (("aalgos", "I"), ("ealgos", "I"), ("calgos", "I"), ("seq", "I"))
    )


def _bytes_defaults(cls) -> None:
    """pyroute2 encodes a missing field as 0; byte-string fields need b"" instead."""
    cls.defaults = {name: b"" for name, fmt in cls.fields if fmt.endswith("s")}


for _cls in (xfrm_usersa_info, xfrm_usersa_id, xfrm_userpolicy_info, xfrm_userpolicy_id, xfrm_user_expire,
             xfrm_user_polexpire, xfrm_user_acquire, xfrm_attrs.xfrm_algo, xfrm_attrs.xfrm_algo_auth,
             xfrm_attrs.xfrm_algo_aead, xfrm_attrs.xfrm_encap_tmpl, xfrm_attrs.xfrm_address,
             xfrm_attrs.xfrm_address_filter):
    _bytes_defaults(_cls)


class MarshalXfrm(Marshal):
    """Message type -> class, for pyroute2's parser (the NETLINK_XFRM counterpart of MarshalRtnl)."""

    msg_map = {
        XFRM_MSG_NEWSA: xfrm_usersa_info,
        XFRM_MSG_UPDSA: xfrm_usersa_info,
        XFRM_MSG_DELSA: xfrm_usersa_id,
        XFRM_MSG_GETSA: xfrm_usersa_id,
        XFRM_MSG_NEWPOLICY: xfrm_userpolicy_info,
        XFRM_MSG_UPDPOLICY: xfrm_userpolicy_info,
        XFRM_MSG_DELPOLICY: xfrm_userpolicy_id,
        XFRM_MSG_GETPOLICY: xfrm_userpolicy_id,
        XFRM_MSG_EXPIRE: xfrm_user_expire,
        XFRM_MSG_POLEXPIRE: xfrm_user_polexpire,
        XFRM_MSG_ACQUIRE: xfrm_user_acquire,
    }
