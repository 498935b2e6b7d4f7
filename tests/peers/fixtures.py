"""pytest fixtures for interop tests; import them into a test module:

    from tests.peers.fixtures import ns_pair, strongswan_factory  # noqa: F401

- `ns_pair`: (side_a, side_b), two namespaces joined by veth (tests/peers/topology.py).
- `strongswan_factory(side, name="strongswan", **kw)`: a started `StrongSwan` in that side's
  namespace with its work directory under tmp_path; every daemon made is closed at teardown.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.peers.strongswan import StrongSwan
from tests.peers.topology import Side, pair_of_namespaces


@pytest.fixture
def ns_pair():
    with pair_of_namespaces() as sides:
        yield sides


@pytest.fixture
def strongswan_factory(tmp_path: Path):
    made: list[StrongSwan] = []

    def make(side: Side, name: str = "strongswan", **kw) -> StrongSwan:
        d = StrongSwan(tmp_path / name, side.name, name=name, **kw)
        made.append(d)
        return d.start()

    yield make
    for d in reversed(made):
        d.close()
