"""The appliance's nftables table: TCP MSS clamping on each tunnel interface.

Isthmus owns one table, ``inet isthmus``, and nothing else in the ruleset. Its only chain hooks
``forward`` at the mangle priority and clamps the MSS option of TCP SYNs (and SYN-ACKs) crossing a
tunnel interface, in both directions, to what fits the tunnel's inner MTU:

    oifname "xfrm-b" meta nfproto ipv4 tcp flags syn / syn,rst
        tcp option maxseg size > 1406 tcp option maxseg size set 1406

The table is always rewritten whole, in one ``nft -f`` transaction (create it, delete it, define
it again): the kernel swaps old for new atomically, so no SYN ever sees a half-written table. Each
rule's comment names its tunnel (``isthmus:<tunnel> out|in``), which is how :func:`read_clamps`
finds what an earlier run left behind.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from typing import Iterable

FAMILY = "inet"
TABLE = "isthmus"
CHAIN = "mss_clamp"
COMMENT_PREFIX = "isthmus:"


class NftError(RuntimeError):
    """nft refused the ruleset or could not run; the message carries nft's own words."""


@dataclass(frozen=True)
class MssClamp:
    """Clamp TCP MSS on `ifname` (both directions) to `mss4` (IPv4) and `mss6` (IPv6)."""

    tunnel: str
    ifname: str
    mss4: int
    mss6: int


def render(clamps: Iterable[MssClamp]) -> str:
    """The whole table as one nft script that replaces any previous version atomically."""
    lines = [
        f"table {FAMILY} {TABLE}",
        f"delete table {FAMILY} {TABLE}",
        f"table {FAMILY} {TABLE} {{",
        f"\tchain {CHAIN} {{",
        "\t\ttype filter hook forward priority mangle; policy accept;",
    ]
    for c in sorted(clamps, key=lambda c: (c.ifname, c.tunnel)):
        for direction, match in (("out", "oifname"), ("in", "iifname")):
            for proto, mss in (("ipv4", c.mss4), ("ipv6", c.mss6)):
                lines.append(
                    f'\t\t{match} "{c.ifname}" meta nfproto {proto} tcp flags syn / syn,rst '
                    f"tcp option maxseg size > {mss} tcp option maxseg size set {mss} "
                    f'comment "{COMMENT_PREFIX}{c.tunnel} {direction}"')
    lines += ["\t}", "}", ""]
    return "\n".join(lines)


def _netns_prefix(netns: str | None) -> list[str]:
    if netns is None:
        return []
    path = netns if "/" in netns else f"/var/run/netns/{netns}"
    return ["nsenter", f"--net={path}", "--"]


def _nft(args: list[str], netns: str | None, stdin: str | None = None) -> str:
    argv = _netns_prefix(netns) + ["nft", *args]
    try:
        r = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    except FileNotFoundError as e:
        raise NftError(f"cannot run {argv[0]}: {e}") from None
    except subprocess.TimeoutExpired:
        raise NftError(f"nft {' '.join(args)} did not finish in 30 s") from None
    if r.returncode != 0:
        raise NftError((r.stderr or r.stdout).strip() or f"nft exited with status {r.returncode}")
    return r.stdout


def apply(clamps: Iterable[MssClamp], netns: str | None = None) -> None:
    """Replace the table with one that clamps exactly `clamps`."""
    _nft(["-f", "-"], netns, stdin=render(clamps))


def remove(netns: str | None = None) -> None:
    """Delete the table (nothing else) if it exists."""
    _nft(["-f", "-"], netns, stdin=f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n")


def read_clamps(netns: str | None = None) -> list[MssClamp] | None:
    """The clamps the table holds now (None: there is no table)."""
    try:
        out = _nft(["-j", "list", "table", FAMILY, TABLE], netns)
    except NftError as e:
        if "No such file" in str(e) or "does not exist" in str(e):
            return None
        raise
    return parse_clamps(json.loads(out))


def parse_clamps(doc: dict) -> list[MssClamp]:
    """Clamps from ``nft -j list table inet isthmus`` output (rules with our comment)."""
    found: dict[tuple[str, str], dict] = {}
    for item in doc.get("nftables", []):
        rule = item.get("rule")
        if not rule or not str(rule.get("comment", "")).startswith(COMMENT_PREFIX):
            continue
        tunnel = rule["comment"][len(COMMENT_PREFIX):].rsplit(" ", 1)[0]
        ifname = proto = None
        mss = None
        for e in rule.get("expr", []):
            match = e.get("match")
            if match:
                key = match.get("left", {}).get("meta", {}).get("key") if isinstance(match.get("left"), dict) else None
                if key in ("oifname", "iifname"):
                    ifname = match.get("right")
                elif key == "nfproto":
                    proto = match.get("right")
            mangle = e.get("mangle")
            if mangle:
                mss = mangle.get("value")
        if ifname and proto and mss:
            entry = found.setdefault((tunnel, ifname), {})
            entry[proto] = int(mss)
    return [MssClamp(tunnel=t, ifname=i, mss4=v.get("ipv4", 0), mss6=v.get("ipv6", 0))
            for (t, i), v in sorted(found.items())]
