"""pytest plugin shipped with graphdriver: markers, GRAPHDRIVER_REQUIRE, and the conformance
classes that run a subset of the case groups.

It is loaded in every pytest session of a project that installs graphdriver, so it changes
nothing there (no environment variable, no file): what the suite's cases need, they get from
their own fixtures (:class:`~graphdriver.testing.base.ConformanceBase`). A GRAPHDRIVER_REQUIRE
that names something unknown stops the run before any test (a typo must not quietly require
nothing). A conformance class that sets ``groups`` has the other groups' cases deselected at
collection (see :mod:`.groups`), and one line per such class says so.
"""

from __future__ import annotations

from collections import Counter

import pytest

from .groups import GROUPS, MARKER, BadGroups, group_of, selected
from .require import ENV, UnknownRequirement, required

_LEFT_OUT = pytest.StashKey[list[str]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "privileged: needs root, loop devices and mounts")
    config.addinivalue_line(
        "markers",
        f"{MARKER}(group): a graphdriver conformance case of that group ({', '.join(GROUPS)})",
    )
    try:
        required()
    except UnknownRequirement as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_report_header(config: pytest.Config) -> str:
    names = ",".join(sorted(required())) or "nothing (a host that lacks something skips)"
    return f"graphdriver: {ENV} = {names}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the cases of the groups a conformance class does not run."""
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    dropped: dict[type, Counter[str]] = {}
    for item in items:
        cls = getattr(item, "cls", None)
        name = group_of(item)
        try:
            chosen = selected(cls) if cls is not None and name is not None else None
        except BadGroups as exc:
            raise pytest.UsageError(str(exc)) from None
        if chosen is None or name in chosen:
            keep.append(item)
            continue
        assert cls is not None and name is not None
        drop.append(item)
        dropped.setdefault(cls, Counter())[name] += 1
    lines = []
    for cls, counts in dropped.items():
        runs = ", ".join(sorted(selected(cls) or ()))
        left = ", ".join(f"{g} {n}" for g, n in sorted(counts.items()))
        lines.append(
            f"graphdriver: {cls.__qualname__} runs the conformance groups {runs}; "
            f"{sum(counts.values())} cases deselected ({left}): {getattr(cls, 'groups_why', '')}"
        )
    config.stash[_LEFT_OUT] = lines
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_report_collectionfinish(config: pytest.Config) -> list[str]:
    return config.stash.get(_LEFT_OUT, [])
