"""graphdriver.lazy: a package's names imported on first use, then kept in the package (as the
toolkit keeps its own), so that a loop reading one pays for the import machinery once."""

from __future__ import annotations

import pytest

import graphdriver
import graphdriver.archive as archive
from graphdriver.archive import changes
from graphdriver.lazy import LazyModule


def test_a_lazy_name_is_kept_in_its_package_once_read() -> None:
    assert archive.ChangeKind is changes.ChangeKind
    # the next read finds it in the package: the module __getattr__ does not run again
    assert vars(archive)["ChangeKind"] is changes.ChangeKind
    assert graphdriver.open_store is vars(graphdriver)["open_store"]
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        archive.no_such_name  # noqa: B018
    assert "no_such_name" not in vars(archive)


def test_a_lazy_module_reads_the_module_it_stands_for() -> None:
    tar = LazyModule("graphdriver.archive.tar")
    assert repr(tar) == "<lazy module 'graphdriver.archive.tar'>"
    from graphdriver.archive import tar as real

    assert tar.BLOCK == real.BLOCK == 512
    assert tar.encode_header is real.encode_header
    assert vars(tar)["_module"] is real  # imported once, then kept


def test_every_protocol_and_type_of_the_driver_contract_is_exported() -> None:
    """What driver.py's contract names (its Protocols, dataclasses and the Driver class) is
    importable from ``graphdriver`` itself, as the README's driver-writing section says."""
    import dataclasses
    import inspect
    from typing import Protocol

    from graphdriver import driver

    contract = {
        name
        for name, obj in vars(driver).items()
        if inspect.isclass(obj)
        and obj.__module__ == driver.__name__
        and not name.startswith("_")
        and (Protocol in obj.__mro__ or dataclasses.is_dataclass(obj) or obj is driver.Driver)
    }
    assert {"ApplyLowers", "KernelMounts", "MountSpec", "MountEntry"} <= contract
    missing = sorted(contract - set(graphdriver.__all__))
    assert missing == [], f"graphdriver does not export {missing}"
    for name in contract:
        assert getattr(graphdriver, name) is getattr(driver, name)
