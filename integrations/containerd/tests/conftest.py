"""Fixtures of the proxy tests: a proxy on vfs in a temp dir, and on overlay on loop-xfs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from ctd_proxy import Proxy, running

from graphdriver.testing import Backing, backing_or_skip


@pytest.fixture
def vfs(tmp_path: Path) -> Iterator[Proxy]:
    with running(tmp_path / "store", "vfs") as proxy:
        yield proxy


@pytest.fixture(scope="module")
def xfs() -> Iterator[Backing]:
    yield from backing_or_skip("loop-xfs")


@pytest.fixture
def overlay(xfs: Backing, request: pytest.FixtureRequest) -> Iterator[Proxy]:
    root = xfs.root / request.node.name
    root.mkdir()
    with running(root / "store", "overlay", xfs.options) as proxy:
        yield proxy
