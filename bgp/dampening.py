"""Route flap dampening (RFC 2439), one :class:`Dampener` per neighbour; pure: ``now`` is passed in.

Each prefix a neighbour flaps carries a penalty (the RFC's figure of merit): +1000 when the
route is withdrawn, +500 when it is re-announced with different attributes (FRR's values; a
plain re-announcement after a withdrawal adds nothing). The penalty decays exponentially,
halving every ``half_life``. At ``suppress`` or above the route is suppressed: kept in the
Adj-RIB-In, not eligible for best path. It is reused once the penalty has decayed below
``reuse``. The penalty is capped at ``reuse * 2 ** (max_suppress / half_life)`` (RFC 2439 §4.2,
"ceiling"), so no route stays suppressed longer than ``max_suppress`` after its last flap.
A record whose penalty decays below ``reuse / 2`` and that is not suppressed is forgotten.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass

from appliance.config.model import Dampening

WITHDRAW_PENALTY = 1000
ATTRIBUTE_CHANGE_PENALTY = 500


@dataclass
class FlapRecord:
    penalty: float          # at ``updated``
    updated: float
    flaps: int = 0
    suppressed: bool = False
    suppressed_at: float | None = None


class Dampener:
    """Penalties of one neighbour's prefixes. Methods return whether the prefix is suppressed."""

    def __init__(self, params: Dampening) -> None:
        self.params = params
        self.ceiling = params.reuse * 2 ** (params.max_suppress / params.half_life)
        self._records: dict[Hashable, FlapRecord] = {}
        self._suppressed: set[Hashable] = set()

    def _decayed(self, rec: FlapRecord, now: float) -> float:
        dt = now - rec.updated
        if dt <= 0:
            return rec.penalty
        return rec.penalty * 2 ** (-dt / self.params.half_life)

    def _add(self, key: Hashable, amount: int, now: float) -> bool:
        rec = self._records.get(key)
        if rec is None:
            rec = self._records[key] = FlapRecord(penalty=0.0, updated=now)
        rec.penalty = min(self._decayed(rec, now) + amount, self.ceiling)
        rec.updated = max(rec.updated, now)
        rec.flaps += 1
        if not rec.suppressed and rec.penalty >= self.params.suppress:
            rec.suppressed, rec.suppressed_at = True, now
            self._suppressed.add(key)
        return rec.suppressed

    def withdrawn(self, key: Hashable, now: float) -> bool:
        return self._add(key, WITHDRAW_PENALTY, now)

    def attributes_changed(self, key: Hashable, now: float) -> bool:
        return self._add(key, ATTRIBUTE_CHANGE_PENALTY, now)

    def is_suppressed(self, key: Hashable) -> bool:
        """As of the last :meth:`tick` or flap (reuse happens only in :meth:`tick`)."""
        return key in self._suppressed

    def penalty(self, key: Hashable, now: float) -> float:
        rec = self._records.get(key)
        return 0.0 if rec is None else self._decayed(rec, now)

    def reuse_at(self, key: Hashable) -> float | None:
        """When a suppressed prefix's penalty reaches ``reuse`` (None if it is not suppressed)."""
        rec = self._records.get(key)
        if rec is None or not rec.suppressed:
            return None
        if rec.penalty <= self.params.reuse:
            return rec.updated
        return rec.updated + self.params.half_life * math.log2(rec.penalty / self.params.reuse)

    def next_reuse(self) -> float | None:
        """The earliest :meth:`reuse_at` of all suppressed prefixes: when to call :meth:`tick`."""
        times = [t for t in (self.reuse_at(k) for k in self._suppressed) if t is not None]
        return min(times) if times else None

    def tick(self, now: float) -> list[Hashable]:
        """Reuse every suppressed prefix whose penalty is now below ``reuse``; forget records
        that have decayed below ``reuse / 2``. Returns the reused keys."""
        reused = []
        for key in list(self._suppressed):
            rec = self._records[key]
            if self._decayed(rec, now) <= self.params.reuse * (1 + 1e-9):   # at reuse_at(): reused
                rec.suppressed, rec.suppressed_at = False, None
                self._suppressed.discard(key)
                reused.append(key)
        half = self.params.reuse / 2
        for key in [k for k, r in self._records.items() if not r.suppressed and self._decayed(r, now) < half]:
            del self._records[key]
        return reused

    def state(self, key: Hashable, now: float) -> dict | None:
        """For ``show routes``: penalty, flaps, suppressed, reuse time."""
        rec = self._records.get(key)
        if rec is None:
            return None
        return {"penalty": round(self._decayed(rec, now)), "flaps": rec.flaps, "suppressed": rec.suppressed,
                "reuse_at": self.reuse_at(key)}

    def forget(self, key: Hashable) -> None:
        self._records.pop(key, None)
        self._suppressed.discard(key)

    def __len__(self) -> int:
        return len(self._records)
