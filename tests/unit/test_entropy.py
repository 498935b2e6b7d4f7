"""KernelRandom: bytes from the kernel, read in blocks, each handed out once."""

from __future__ import annotations

import os

import pytest

from appliance.entropy import KernelRandom


def test_bytes_are_handed_out_once_and_in_blocks(monkeypatch):
    calls = []
    real = os.urandom

    def counting(n):
        calls.append(n)
        return real(n)
    monkeypatch.setattr(os, "urandom", counting)
    r = KernelRandom(block=64)
    parts = [r(16) for _ in range(8)]          # 128 bytes from two blocks
    assert all(len(p) == 16 for p in parts)
    assert calls == [64, 64]
    assert len(set(parts)) == 8
    assert r(0) == b""
    assert len(r(100)) == 100 and calls[-1] == 100   # larger than a block: straight from the kernel
    with pytest.raises(ValueError):
        r(-1)


def test_a_forked_child_does_not_reuse_the_parents_bytes():
    r = KernelRandom(block=4096)
    r(8)
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(wr, r(32))
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(rd, 32)
    assert child != r(32)
