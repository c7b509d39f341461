"""pytest plugin shipped with graphdriver: markers, GRAPHDRIVER_REQUIRE, a private entry-point
cache.

stevedore caches entry points under $XDG_CACHE_HOME; a test run that installs driver packages
must not see a stale cache, so an unset XDG_CACHE_HOME is pointed at a fresh directory.
A GRAPHDRIVER_REQUIRE that names something unknown stops the run before any test (a typo must
not quietly require nothing).
"""

from __future__ import annotations

import os
import tempfile

import pytest

from .require import ENV, UnknownRequirement, required


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "privileged: needs root, loop devices and mounts")
    if "XDG_CACHE_HOME" not in os.environ:
        os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="graphdriver-xdg-")
    try:
        required()
    except UnknownRequirement as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_report_header(config: pytest.Config) -> str:
    names = ",".join(sorted(required())) or "nothing (a host that lacks something skips)"
    return f"graphdriver: {ENV} = {names}"
