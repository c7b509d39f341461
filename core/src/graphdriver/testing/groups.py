"""Case groups: a conformance class may run a declared subset of the suite.

Every case belongs to one group (:data:`GROUPS`), marked with :func:`group`. A class runs every
group unless it sets ``groups`` (the names it runs) and ``groups_why`` (one line: where the
others are covered, e.g. by another class of the same driver). The cases of the other groups
are *deselected* at collection, never skipped: the run's header names the class, its groups,
the count left out and the reason, and pytest's summary counts them as deselected. A case
without a group (a driver class's own override, say) always runs.

A third-party driver package that sets nothing gets the whole suite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest

#: the marker every case carries: ``pytest -m "conformance(group='quota')"`` selects by it
MARKER = "conformance"

#: every group -> what its cases exercise
GROUPS = {
    "lifecycle": "creating, snapshotting, listing and removing layers on the driver's storage",
    "depth": "a long chain of layers read through its top (max_depth, mount data limits)",
    "mount": "mount references across calls, stores and processes; read-only image layers; "
    "who may reach a mounted layer",
    "quota": "size-limited rw layers, or their refusal by a driver without quota",
    "diff": "what a layer changed, and its diff applied back onto the same parent",
    "streams": "layer tars as real tools write them (compressed, GNU tar, sparse, ns times, "
    "root entries): the store's archive code writing into the driver's layers",
    "bad-input": "bad ids, parents and tars refused, and the layer rolled back",
}

F = TypeVar("F", bound=Callable[..., object])


def group(name: str) -> Callable[[F], F]:
    """Mark a conformance case as belonging to group *name* (one of :data:`GROUPS`)."""
    if name not in GROUPS:
        raise ValueError(f"unknown conformance group {name!r}; choose from {', '.join(GROUPS)}")
    mark: Callable[[F], F] = getattr(pytest.mark, MARKER)(group=name)
    return mark


class BadGroups(ValueError):
    """A class's ``groups`` names an unknown group, or restricts the suite without saying why."""


def selected(cls: type) -> frozenset[str] | None:
    """The groups *cls* runs, or None for all of them; raises :class:`BadGroups`."""
    names = getattr(cls, "groups", None)
    if names is None:
        return None
    if isinstance(names, str):
        raise BadGroups(f"{cls.__name__}.groups must be a set of group names, not a string")
    chosen = frozenset(names)
    unknown = sorted(chosen - GROUPS.keys())
    if unknown:
        raise BadGroups(
            f"{cls.__name__}.groups names unknown conformance groups {', '.join(unknown)}; "
            f"choose from {', '.join(GROUPS)}"
        )
    if chosen != GROUPS.keys() and not str(getattr(cls, "groups_why", "")).strip():
        raise BadGroups(
            f"{cls.__name__} runs only the conformance groups {', '.join(sorted(chosen))}: "
            "say in groups_why where the others are covered"
        )
    return chosen


def group_of(item: pytest.Item) -> str | None:
    """The group of a collected case, or None when it has none."""
    mark = item.get_closest_marker(MARKER)
    if mark is None:
        return None
    name = mark.kwargs.get("group")
    return name if isinstance(name, str) else None
