"""The daemon's source of random bytes for the IKE engine: the kernel's CSPRNG, read in blocks.

The engine asks for randomness several times per IKE SA (SPIs, nonces, KE private keys,
IVs, cookie secrets), a few to a few dozen bytes each time. Every ``os.urandom`` call is a
``getrandom(2)`` system call, and in a virtual machine without hardware acceleration (the lab
guest, issue 13) a system call costs a millisecond or more. :class:`KernelRandom` reads
``BLOCK`` bytes at once and hands them out in order, each byte once; a block is never reused
and a forked child starts with an empty one, so no two processes share bytes. The bytes are the
kernel's: nothing here stretches or derives them. Requests larger than a block go straight to
the kernel.
"""

from __future__ import annotations

import os
import threading

BLOCK = 4096


class KernelRandom:
    """``random(n) -> n bytes`` from the kernel CSPRNG, read BLOCK bytes at a time."""

    def __init__(self, block: int = BLOCK):
        self.block = block
        self._buf = b""
        self._pos = 0
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._buf, self._pos = b"", 0

    def __call__(self, n: int) -> bytes:
        if n < 0:
            raise ValueError("negative length")
        if n > self.block:
            return os.urandom(n)
        with self._lock:
            if self._pos + n > len(self._buf):
                self._buf, self._pos = os.urandom(self.block), 0
            out = self._buf[self._pos:self._pos + n]
            self._pos += n
            return out
