"""Secrets kept out of the YAML: PSK files and private keys.

A secret is only ever read from its own file, which must be a regular file that neither group
nor others can read (``mode & 0o077 == 0``) and that belongs to root or to the user the daemon
runs as. Its bytes are held in :class:`Secret`, whose repr/str never show them; the daemon
calls :meth:`Secret.reveal` where it needs the key material (AUTH payload computation,
RFC 7296 §2.15).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from collections.abc import Iterable
from pathlib import Path


class Secret:
    """Secret bytes whose repr and str never show them."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        if not isinstance(value, bytes):
            raise TypeError("Secret holds bytes")
        self._value = value

    def reveal(self) -> bytes:
        """The secret bytes. Never log, print or put them in an exception."""
        return self._value

    def __len__(self) -> int:
        return len(self._value)

    def __repr__(self) -> str:
        return "Secret(<redacted>)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(hashlib.sha256(b"isthmus-secret" + self._value).digest())

    def __reduce__(self):  # no pickling a secret into some cache by accident
        raise TypeError("Secret objects cannot be pickled")


class SecretFileError(Exception):
    """A secret file is missing, not a regular file, too open or owned by the wrong user."""


def default_secret_owners() -> frozenset[int]:
    """root and the user this process runs as (the daemon's user when the daemon loads)."""
    return frozenset({0, os.geteuid()})


def check_secret_file(path: Path, owners: Iterable[int], what: str) -> os.stat_result:
    """Check that ``path`` may hold a secret; return its stat. Raises SecretFileError."""
    owners = frozenset(owners)
    try:
        st = path.stat()  # follows symlinks: the target is what gets read
    except FileNotFoundError:
        raise SecretFileError(f"{what} '{path}' does not exist") from None
    except PermissionError:
        raise SecretFileError(f"{what} '{path}' cannot be accessed (permission denied)") from None
    except OSError as exc:
        raise SecretFileError(f"{what} '{path}' cannot be accessed ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise SecretFileError(f"{what} '{path}' is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise SecretFileError(
            f"{what} '{path}' has mode {mode:04o}, readable or writable by group/others; "
            f"allowed: no group/other permissions (e.g. chmod 600 '{path}')")
    if st.st_uid not in owners:
        names = ", ".join(str(uid) for uid in sorted(owners))
        raise SecretFileError(
            f"{what} '{path}' is owned by uid {st.st_uid}; allowed owners: uid {names} "
            f"(root or the daemon's user)")
    return st


_READ: dict[tuple, Secret] = {}


def read_secret_file(path: Path, owners: Iterable[int], what: str) -> Secret:
    """Check and read a secret file. A single trailing newline (LF or CRLF) is not part of it.
    The file is checked every time; within one parse of the config (until forget_read_secrets)
    its bytes are read again only when its stat changed: many tunnels often share one PSK file."""
    st = check_secret_file(path, owners, what)
    key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    known = _READ.get(key)
    if known is not None:
        return known
    secret = _read_secret(path, what)
    if len(_READ) >= 1024:
        _READ.clear()
    _READ[key] = secret
    return secret


def forget_read_secrets() -> None:
    """Drop the reads kept by read_secret_file (parse_config does after each parse)."""
    _READ.clear()


def _read_secret(path: Path, what: str) -> Secret:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SecretFileError(f"{what} '{path}' cannot be read ({exc.strerror})") from None
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise SecretFileError(f"{what} '{path}' is empty")
    return Secret(data)
