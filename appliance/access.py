"""Who may do what on the control socket, and the audit line of every state change.

The daemon learns who is on the other end of a control connection from the kernel, never from the
request: ``SO_PEERCRED`` (pid, uid, gid of the connecting process) and ``SO_PEERGROUPS`` (its
supplementary groups), both taken when the client called ``connect()``.

Roles (:func:`role_of`):

- ``admin``: root, or a member of the group ``isthmus-admin`` — every method;
- ``read``: a member of ``isthmus-read`` — only what reads state (``status``, ``tunnels``,
  ``sas``, ``routes``, ``bgp``, ``version``, ``subscribe``: the CLI's ``show``/``status``/``events``);
- no role: nothing (answered with ``forbidden``).

Without an :class:`AccessPolicy` (the role groups do not exist on this system) the control socket
stays root-only by its file modes (0600 in a 0700 directory) and every peer is root. With one
(:func:`policy_from_system`: the image creates both groups) the socket is opened up to every local
user and this module decides.

Every state-changing request (:data:`STATE_CHANGING`) is written to the log ``isthmus.audit``
(the daemon's stdout, hence the journal) as one line saying who (uid, user name, pid, role), what
(method, tunnel), when (UTC) and the outcome, refused requests included. Parameters other than
the tunnel name are not logged.
"""

from __future__ import annotations

import array
import grp
import logging
import pwd
import socket
import struct
from dataclasses import dataclass
from typing import Any, Mapping

from appliance.control import ControlError, utc_timestamp

audit_log = logging.getLogger("isthmus.audit")

READ_GROUP = "isthmus-read"
ADMIN_GROUP = "isthmus-admin"
E_FORBIDDEN = "forbidden"

#: Methods a read-only peer may call: they report state and change nothing.
READ_ONLY = frozenset({"version", "status", "tunnels", "sas", "routes", "bgp", "subscribe"})
#: Methods that change state: admin only, and audited.
STATE_CHANGING = frozenset({"initiate", "terminate", "rekey", "reload"})
#: What the CLI calls each method (for messages an operator reads).
_VERB = {"initiate": "up", "terminate": "down", "rekey": "rekey", "reload": "reload"}

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13
_MAX_GROUPS = 256  # CPython reads at most 1024 bytes of an option


@dataclass(frozen=True)
class Peer:
    """The credentials of the process on the other end of a unix socket."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]

    @property
    def user(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)

    @classmethod
    def of_socket(cls, sock: socket.socket) -> Peer:
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))
        groups: set[int] = {gid}
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * _MAX_GROUPS)
            groups.update(array.array("I", raw[: len(raw) - len(raw) % 4]))
        except OSError:  # an older kernel, or more than 256 groups (ERANGE): the primary group only
            pass
        return cls(pid=pid, uid=uid, gid=gid, groups=frozenset(groups))


@dataclass(frozen=True)
class AccessPolicy:
    """The gids of the two role groups."""

    read_gid: int | None
    admin_gid: int | None


def policy_from_system() -> AccessPolicy | None:
    """The policy for this system: the gids of ``isthmus-read`` and ``isthmus-admin``, or None
    (root only) when neither group exists."""
    gids = []
    for name in (READ_GROUP, ADMIN_GROUP):
        try:
            gids.append(grp.getgrnam(name).gr_gid)
        except KeyError:
            gids.append(None)
    if gids == [None, None]:
        return None
    return AccessPolicy(read_gid=gids[0], admin_gid=gids[1])


def role_of(peer: Peer, policy: AccessPolicy | None) -> str | None:
    """``admin``, ``read`` or None (see the module's doc)."""
    if peer.uid == 0:
        return "admin"
    if policy is None:
        return None
    if policy.admin_gid is not None and policy.admin_gid in peer.groups:
        return "admin"
    if policy.read_gid is not None and policy.read_gid in peer.groups:
        return "read"
    return None


def authorize(peer: Peer, method: str, policy: AccessPolicy | None) -> str:
    """Return the peer's role if it may call ``method``; raise ``forbidden`` otherwise.

    A method this module does not know is treated as state-changing (admin only), so a handler
    added later is never open to read-only users by accident."""
    role = role_of(peer, policy)
    if role == "admin":
        return role
    if role == "read" and method in READ_ONLY:
        return role
    if role == "read":
        raise ControlError(E_FORBIDDEN, f"permission denied: '{_VERB.get(method, method)}' changes state and "
                                        f"needs the group {ADMIN_GROUP}; user {peer.user} (uid {peer.uid}) "
                                        f"is only in {READ_GROUP}")
    raise ControlError(E_FORBIDDEN, f"permission denied: user {peer.user} (uid {peer.uid}) is in neither "
                                    f"{READ_GROUP} (read) nor {ADMIN_GROUP} (change)")


def audit_line(peer: Peer, role: str | None, method: str, params: Mapping[str, Any], outcome: str,
               when: float | None = None) -> str:
    """One audit line: ``audit: when=... user=NAME uid=N pid=N role=R action=A tunnel=T outcome=O``."""
    tunnel = params.get("tunnel") if isinstance(params, Mapping) else None
    fields = [f"when={utc_timestamp(when)}", f"user={_token(peer.user)}", f"uid={peer.uid}",
              f"pid={peer.pid}", f"role={role or 'none'}", f"action={_token(_VERB.get(method, method))}"]
    if isinstance(tunnel, str):
        fields.append(f"tunnel={_token(tunnel)}")
    fields.append(f"outcome={_token(outcome)}")
    return "audit: " + " ".join(fields)


def audit(peer: Peer, role: str | None, method: str, params: Mapping[str, Any], outcome: str) -> None:
    """Log the audit line of a state-changing request (any other method is not audited)."""
    if method in READ_ONLY:
        return
    level = logging.INFO if outcome == "ok" else logging.WARNING
    audit_log.log(level, audit_line(peer, role, method, params, outcome))


def _token(text: str) -> str:
    """A value that cannot break the line: printable, no spaces, at most 64 characters."""
    clean = "".join(c if c.isprintable() and not c.isspace() and c not in "\"'=" else "?" for c in str(text))
    return clean[:64] or "-"
