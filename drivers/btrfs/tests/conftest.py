"""The btrfs driver's own tests: one loop-backed btrfs per module, a store per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from graphdriver import LayerStore, open_store
from graphdriver.testing import Backing, backing_or_skip


@pytest.fixture(scope="module")
def fs() -> Iterator[Backing]:
    yield from backing_or_skip("loop-btrfs")


@pytest.fixture
def store(fs: Backing, request: pytest.FixtureRequest) -> Iterator[LayerStore]:
    s = open_store(fs.root / request.node.name, "btrfs")
    yield s
    for layer in reversed(s.layers()):
        s.remove(layer)
    s.close()
