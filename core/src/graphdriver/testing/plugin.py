"""pytest plugin shipped with graphdriver: markers and a private entry-point cache.

stevedore caches entry points under $XDG_CACHE_HOME; a test run that installs driver packages
must not see a stale cache, so an unset XDG_CACHE_HOME is pointed at a fresh directory.
"""

from __future__ import annotations

import os
import tempfile

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "privileged: needs root, loop devices and mounts")
    if "XDG_CACHE_HOME" not in os.environ:
        os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="graphdriver-xdg-")
