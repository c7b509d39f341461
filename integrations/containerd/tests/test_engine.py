"""A real containerd on our layers: ``ctr image import`` and ``ctr run`` through the proxy.

containerd 1.6 (Debian's) runs with the README's own configuration (version 2) and a private
root, state and sockets; ``graphdriver serve containerd`` serves the store beside it, overlay on
loop-xfs, btrfs on loop-btrfs and vfs on loop-ext4. The image is built offline by umoci from
busybox-static: three layers, the second deleting a file and a directory of the first
(whiteouts).
"""

from __future__ import annotations

import contextlib
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from containerd_engine import (
    DOCUMENTED_ADDRESS,
    README,
    Engine,
    ReadmeConfigMissing,
    build_image,
    engine,
    engine_config,
    missing_tools,
    readme_config,
)

from graphdriver.testing import Backing, backing_or_skip, host_lacks

pytestmark = pytest.mark.privileged

IMAGE = "localhost/gd-engine:test"
#: the command the container runs, and what it prints on our layers
SCRIPT = (
    "cat /etc/lowest.txt; cat /etc/top.txt; "
    "test -e /removeme.txt && echo removeme.txt is back; "
    "test -e /data/old && echo data/old is back; "
    "ls /data; "
    "echo written in the container > /written.txt; cat /written.txt"
)
EXPECTED = "from the lowest layer\nfrom the top layer\nwritten in the container\n"

#: overlay hands containerd overlay mounts to make; btrfs and vfs have containerd bind a mount
#: the proxy holds (a subvolume, a copied directory)
DRIVERS = [("overlay", "loop-xfs"), ("btrfs", "loop-btrfs"), ("vfs", "loop-ext4")]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lacking = missing_tools()
    if lacking is not None:
        host_lacks(f"containerd end to end needs {lacking}", "containerd")
    return build_image(tmp_path_factory.mktemp("image"))


@pytest.fixture(scope="module", params=DRIVERS, ids=[f"{d}-{b}" for d, b in DRIVERS])
def backed(request: pytest.FixtureRequest, image: Path) -> Iterator[tuple[str, Backing]]:
    driver, kind = request.param
    for backing in backing_or_skip(kind):
        yield driver, backing


@pytest.fixture
def eng(backed: tuple[str, Backing], request: pytest.FixtureRequest) -> Iterator[Engine]:
    driver, backing = backed
    base = backing.root / request.node.name.split("[")[0]
    with engine(base, driver) as e:
        yield e
        # pytest shows a test's captured output only when it failed: the daemons' last words
        for log in (e.proxy.log, e.containerd.log):
            print(f"--- {log.name} (end)\n{log.read_text(errors='replace')[-4000:]}")


def _import(eng: Engine, archive: Path) -> None:
    eng.ctr(
        "images", "import", "--base-name", IMAGE.rsplit(":", 1)[0],
        "--snapshotter", eng.snapshotter, str(archive),
    )  # fmt: skip


def _run(eng: Engine, name: str, attempts: int = 1) -> str:
    argv = [
        "run", "--rm", "--snapshotter", eng.snapshotter,
        # runc's state and the IO fifos in the temp dir, not under /run/containerd
        "--runc-root", str(eng.base / "runc"), "--fifo-dir", str(eng.base / "fifo"),
        IMAGE, name, "sh", "-c", SCRIPT,
    ]  # fmt: skip
    for attempt in range(attempts):
        try:
            return eng.ctr(*argv, timeout=120)
        except AssertionError as exc:
            if attempt == attempts - 1:
                raise
            print(f"ctr run, attempt {attempt + 1}: {exc}")
            with contextlib.suppress(AssertionError):  # a container the attempt left
                eng.ctr("containers", "delete", name)
            time.sleep(0.5)
    raise AssertionError("unreachable")


def _chain(eng: Engine) -> list[tuple[str, str, str]]:
    """``ctr snapshots ls``: (key, parent, kind) of every snapshot containerd records."""
    out = eng.ctr("snapshots", "--snapshotter", eng.snapshotter, "ls")
    rows = []
    for line in out.splitlines()[1:]:
        fields = line.split()
        if len(fields) == 3:
            rows.append((fields[0], fields[1], fields[2]))
        elif len(fields) == 2:
            rows.append((fields[0], "", fields[1]))
    return rows


def _walk(parents: dict[str, str]) -> list[str]:
    """The snapshots of *parents* (name -> parent, "" for none) from the one top down to the
    bottom; an error unless they are a single chain."""
    tops = set(parents) - set(parents.values())
    assert len(tops) == 1, f"not one chain: {parents}"
    walked = [tops.pop()]
    while parents[walked[-1]]:
        walked.append(parents[walked[-1]])
    return walked


def test_readme_has_the_tested_containerd_config(tmp_path: Path) -> None:
    snippet = readme_config()
    config = engine_config(snippet, tmp_path / "gd.sock", tmp_path)
    assert f'address = "{tmp_path / "gd.sock"}"' in config
    readme = tmp_path / "README.md"
    readme.write_text(README.read_text().replace("<!-- containerd-config-v2 -->", ""))
    with pytest.raises(ReadmeConfigMissing):
        readme_config(readme)
    # containerd 2.x's form is not run here (Debian has 1.6); it must at least say the same
    v3 = tomllib.loads(readme_config(marker="<!-- containerd-config-v3 -->"))
    assert v3["version"] == 3
    proxy = {
        "type": "snapshot",
        "address": DOCUMENTED_ADDRESS,
        "exports": {"root": "/var/lib/graphdriver"},  # CRI's image filesystem, for kubelet
    }
    assert v3["proxy_plugins"]["graphdriver"] == proxy
    assert v3["plugins"]["io.containerd.cri.v1.images"]["snapshotter"] == "graphdriver"
    v2 = tomllib.loads(snippet)
    assert v2["proxy_plugins"]["graphdriver"] == proxy
    assert v2["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["snapshotter"] == "graphdriver"


def test_import_run_and_garbage_collect(eng: Engine, image: Path) -> None:
    _import(eng, image)

    chain = _chain(eng)
    assert [kind for _, _, kind in chain] == ["Committed"] * 3, chain
    assert len(_walk({key: parent for key, parent, _ in chain})) == 3, chain
    # the store holds the same three layers, one image layer on another
    records = eng.proxy.records()
    assert not [r["id"] for r in records if r["rw"]], records
    assert len(_walk({r["id"]: r["parent"] or "" for r in records})) == 3, records
    image_layers = eng.proxy.layers()

    out = _run(eng, "gd-run-1")
    assert out == EXPECTED

    # `run --rm` removed the container and its snapshot from containerd's records; the
    # container's layer itself goes at containerd's next garbage collection
    assert len(_chain(eng)) == 3
    assert set(image_layers) <= set(eng.proxy.layers())
    assert eng.mounts() == []

    eng.ctr("images", "rm", "--sync", IMAGE)
    assert _chain(eng) == []
    assert eng.proxy.layers() == []
    assert eng.mounts() == []


def test_proxy_restarted_under_a_running_containerd(eng: Engine, image: Path) -> None:
    _import(eng, image)
    image_layers = eng.proxy.layers()
    assert eng.proxy.stop() == 0
    assert not eng.proxy.socket.exists(), "the proxy left its socket behind"
    eng.proxy.start()
    # containerd's first call on the new socket may fail UNAVAILABLE while it reconnects
    assert _run(eng, "gd-run-2", attempts=5) == EXPECTED
    assert len(_chain(eng)) == 3
    assert set(image_layers) <= set(eng.proxy.layers())
    eng.ctr("images", "rm", "--sync", IMAGE)
    assert eng.proxy.layers() == []
    assert eng.mounts() == []
