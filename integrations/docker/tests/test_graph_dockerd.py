"""A real dockerd (Debian's 20.10) keeps its images and containers in our store through the
GraphDriver plugin, on overlay over loop-xfs and on btrfs over loop-btrfs.

dockerd's configuration is the README's ``<!-- docker-graphdriver-config -->`` daemon.json block
(``experimental`` and ``storage-driver NAME``), with NAME the plugin's unique per-run name; the
rest (private paths, no bridge, no iptables) is :mod:`dockerd`'s. The cases run in order on one
daemon per driver, and the last one empties the store.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from hashlib import sha256
from pathlib import Path
from typing import Any

import pytest
from dockerd import (
    CONTAINERD,
    DOCKER,
    DOCKERD_FLAGS,
    IMAGE,
    PLUGIN_DIR,
    Docker,
    _remove_containers,
    _rootfs_tar,
    _start,
    containerd_config,
    missing_tools,
    release,
    restarter,
    start_dockerd,
    stop,
)
from plugin_proc import GraphPlugin, running_graph

from graphdriver.linux.mount import unmount_all_under
from graphdriver.testing import backing_or_skip
from graphdriver.testing.require import host_lacks

pytestmark = pytest.mark.privileged

README = Path(__file__).resolve().parents[3] / "README.md"
CONFIG_MARKER = "<!-- docker-graphdriver-config -->"
DRIVERS = {"overlay": "loop-xfs", "btrfs": "loop-btrfs"}


def readme_config(name: str, readme: Path = README) -> dict[str, Any]:
    """The README's daemon.json for the plugin *name*: the JSON block after the marker."""
    text = readme.read_text()
    found = re.search(re.escape(CONFIG_MARKER) + r"\s*```json\n(.*?)\n```", text, re.S)
    if found is None:
        raise AssertionError(f"{readme} has no ```json block after {CONFIG_MARKER}")
    config = json.loads(found.group(1))
    assert config.get("storage-driver") == "NAME", config
    return {**config, "storage-driver": name}


@contextlib.contextmanager
def graph_dockerd(
    base: Path, store: Path, driver: str, options: dict[str, str]
) -> Iterator[Docker]:
    """containerd, our graphdriver plugin on *store* and dockerd configured from the README,
    with the test image imported; everything stopped and unmounted at the end, and the
    containers' parent cgroup removed."""
    ctd = base / "containerd"
    ctd.mkdir(parents=True)
    (ctd / "config.toml").write_text(containerd_config(ctd))
    name = f"gd-graph-{secrets.token_hex(4)}"
    config = base / "daemon.json"
    config.write_text(
        json.dumps({**readme_config(name), "deprecated-key-path": str(base / "key.json")})
    )
    flags = [f for f in DOCKERD_FLAGS if not f.startswith("--storage-driver")]
    api = base / "docker.sock"
    made_plugin_dir = not PLUGIN_DIR.parent.exists()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(
            _start(
                [CONTAINERD, "--config", str(ctd / "config.toml")],
                base / "containerd.log",
                ctd / "containerd.sock",
            )
        )
        PLUGIN_DIR.mkdir(parents=True, exist_ok=True)
        socket = PLUGIN_DIR / f"{name}.sock"
        with running_graph(store, driver, name, socket, options) as plugin:
            try:

                def start() -> subprocess.Popen[bytes]:
                    return start_dockerd(base, config, ctd / "containerd.sock", api, flags, name)

                procs.append(start())
                docker = Docker(base, api, plugin, restarter(procs, api, start))
                try:
                    yield docker
                finally:
                    _remove_containers(docker)
            finally:
                for proc in reversed(procs[1:]):
                    stop(proc)
                del procs[1:]
    finally:
        release(base, procs, ctd / "containerd.sock", name, made_plugin_dir)


@pytest.fixture(scope="module", params=sorted(DRIVERS))
def docker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Docker]:
    if os.geteuid() != 0:
        host_lacks("dockerd and the plugin's socket in /run/docker/plugins need root", "root")
    missing = missing_tools()
    if missing is not None:
        host_lacks(f"dockerd end to end needs {missing}", "docker")
    driver: str = request.param
    for backing in backing_or_skip(DRIVERS[driver]):
        base = tmp_path_factory.mktemp(f"dockerd-{driver}")
        store = backing.root / "store"
        try:
            with graph_dockerd(base, store, driver, backing.options) as docker:
                yield docker
        finally:
            unmount_all_under(backing.root / "store")


def plugin(docker: Docker) -> GraphPlugin:
    assert isinstance(docker.plugin, GraphPlugin)
    return docker.plugin


def mounts_under(root: Path) -> list[str]:
    """Mount points strictly under *root* (mountinfo's fifth field)."""
    prefix = str(root) + "/"
    points = (line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines())
    return [p for p in points if p.startswith(prefix)]


def layers_of(docker: Docker, image: str) -> list[str]:
    out = docker.run("image", "inspect", "--format", "{{json .RootFS.Layers}}", image)
    return list(json.loads(out))


def cache_ids(docker: Docker, image: str) -> list[str]:
    """The ids under which dockerd keeps *image*'s layers in its storage driver: each layer's
    ``cache-id`` in dockerd's layer database, found by chain id (moby's layer.CreateChainID)."""
    layerdb = docker.base / "data" / "image" / docker.plugin_name / "layerdb" / "sha256"
    ids, chain = [], ""
    for diff_id in layers_of(docker, image):
        if chain:
            diff_id = "sha256:" + sha256(f"{chain} {diff_id}".encode()).hexdigest()
        chain = diff_id
        ids.append((layerdb / chain.removeprefix("sha256:") / "cache-id").read_text())
    return ids


def test_import_and_run_reads_and_writes(docker: Docker) -> None:
    """`docker import` puts the rootfs in a layer of our store; `docker run --rm` reads the
    image's file and writes one of its own; `docker info` names the plugin as the driver."""
    info = docker.run("info", "--format", "{{.Driver}}").strip()
    assert info == docker.plugin_name
    before = plugin(docker).layers()
    docker.run("import", str(_rootfs_tar(docker.base)), IMAGE)
    assert len(plugin(docker).layers()) == len(before) + 1
    out = docker.container(
        "--rm", IMAGE, "sh", "-c", "cat /data/from-image; echo w > /tmp/w; cat /tmp/w"
    )
    assert out == "in the image\nw\n"


def test_diff_and_commit(docker: Docker) -> None:
    """`docker diff` of a stopped container lists what it changed; `docker commit` of it makes
    an image with those changes, and of an unchanged container one with the image's files."""
    docker.container("--name", "changed", IMAGE, "sh", "-c",
                     "echo new > /tmp/new; rm /data/from-image")  # fmt: skip
    changes = set(docker.run("diff", "changed").splitlines())
    assert changes == {"C /tmp", "A /tmp/new", "C /data", "D /data/from-image"}
    docker.run("commit", "changed", "gd-changed:1")
    out = docker.container("--rm", "gd-changed:1", "sh", "-c",
                           "cat /tmp/new; test ! -e /data/from-image && echo gone")  # fmt: skip
    assert out == "new\ngone\n"
    assert len(layers_of(docker, "gd-changed:1")) == 2

    docker.container("--name", "unchanged", IMAGE, "true")
    assert docker.run("diff", "unchanged") == ""
    docker.run("commit", "unchanged", "gd-unchanged:1")
    out = docker.container("--rm", "gd-unchanged:1", "cat", "/data/from-image")
    assert out == "in the image\n"
    docker.run("rm", "-v", "changed", "unchanged")
    assert docker.run("ps", "-aq") == ""


def test_save_rmi_load_run(docker: Docker, tmp_path: Path) -> None:
    """`docker save`, `docker rmi`, `docker load`, `docker run` of a two-layer image: the
    layers dockerd verifies on save are our diffs, and the loaded image runs."""
    with plugin(docker).connect() as conn:
        _, answer = conn.call("GraphDriver.Capabilities")
    assert answer["Capabilities"]["ReproducesExactDiffs"] is True  # dockerd checks our diffs
    archive = tmp_path / "saved.tar"
    docker.run("save", "-o", str(archive), "gd-changed:1")
    docker.run("rmi", "gd-changed:1")
    assert "gd-changed" not in docker.run("images", "--format", "{{.Repository}}")
    assert "Loaded image: gd-changed:1" in docker.run("load", "-i", str(archive))
    out = docker.container("--rm", "gd-changed:1", "sh", "-c",
                           "cat /tmp/new; test ! -e /data/from-image && echo gone")  # fmt: skip
    assert out == "new\ngone\n"


def test_build_three_steps(docker: Docker, tmp_path: Path) -> None:
    """`docker build --network none` (the classic builder) of a RUN that deletes a lower file,
    an ENV-only step and a COPY; the image shows all three."""
    context = tmp_path / "context"
    context.mkdir()
    (context / "added").write_text("copied\n")
    (context / "Dockerfile").write_text(
        f"FROM {IMAGE}\nRUN rm /data/from-image\nENV GREETING=hello\nCOPY added /data/added\n"
    )
    proc = subprocess.run(
        ["/usr/bin/docker", "-H", f"unix://{docker.socket}", "build", "--network", "none",
         "-t", "gd-built:1", str(context)],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check = "test ! -e /data/from-image && cat /data/added && echo $GREETING"
    out = docker.container("--rm", "gd-built:1", "sh", "-c", check)
    assert out == "copied\nhello\n"
    assert len(layers_of(docker, "gd-built:1")) == 3


def test_rm_v(docker: Docker) -> None:
    """`docker rm -v` of a container with an anonymous volume removes its rw layer and mounts
    from our store."""
    before = plugin(docker).layers()
    docker.container("--name", "withvol", "-v", "/anon", IMAGE, "sh", "-c", "echo a > /anon/f")
    assert len(plugin(docker).layers()) == len(before) + 2  # the container's rw and -init
    docker.run("rm", "-v", "withvol")
    assert plugin(docker).layers() == before
    assert docker.run("volume", "ls", "-q") == ""


def test_plugin_killed_and_restarted_between_runs(docker: Docker) -> None:
    """SIGKILL the plugin after one `docker run`, start it again: the next `docker run` works."""
    assert docker.container("--rm", IMAGE, "cat", "/data/from-image") == "in the image\n"
    assert plugin(docker).stop(signal.SIGKILL) == -signal.SIGKILL
    plugin(docker).start()
    assert docker.container("--rm", IMAGE, "cat", "/data/from-image") == "in the image\n"


def test_a_layer_mounted_when_dockerd_was_killed_is_removed(docker: Docker) -> None:
    """dockerd SIGKILLed while a `docker export` streams a container's layer: the export's
    Get is never put back. `docker rm` removes the container all the same (the plugin's
    Remove refused "is mounted" until a clean dockerd stop, and the container stayed
    "Removal In Progress"; moby's drivers remove a mounted layer)."""
    assert docker.kill_and_restart is not None
    before = plugin(docker).layers()
    try:
        docker.container("--name", "exported", IMAGE, "busybox", "dd", "if=/dev/zero",
                         "of=/big", "bs=1M", "count=16")  # fmt: skip
        export = subprocess.Popen(  # its tar fills the pipe no one reads: the layer stays got
            [DOCKER, "-H", f"unix://{docker.socket}", "export", "exported"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            layer = next(layer for layer in plugin(docker).layers() if layer not in before and
                         not layer.endswith("-init"))  # fmt: skip
            deadline = time.monotonic() + 60
            while '"mount_count": 1' not in _inspect(docker, layer):
                assert time.monotonic() < deadline, "the export did not mount the layer"
                time.sleep(0.1)
            docker.kill_and_restart()
        finally:
            export.kill()
            export.wait()
    finally:
        docker.run("rm", "-f", "exported")
    assert plugin(docker).layers() == before
    assert mounts_under(plugin(docker).root) == []
    assert "never put back" in plugin(docker).output()


def _inspect(docker: Docker, layer: str) -> str:
    got = subprocess.run(plugin(docker).command("inspect", layer), capture_output=True, text=True)
    return got.stdout


def test_ls_then_everything_removed(docker: Docker) -> None:
    """`graphdriver ls` shows the images' layers; once every image is removed (`docker rmi`,
    `docker system prune -af`) the store has no layers and nothing under it is mounted."""
    layers = plugin(docker).layers()
    assert set(cache_ids(docker, "gd-built:1")) <= set(layers)
    assert set(cache_ids(docker, IMAGE)) <= set(cache_ids(docker, "gd-built:1"))
    tags = docker.run("images", "--format", "{{.Repository}}:{{.Tag}}").split()
    assert sorted(tags) == sorted([IMAGE, "gd-built:1", "gd-changed:1", "gd-unchanged:1"])
    docker.run("rmi", *tags)
    docker.run("system", "prune", "-af")
    assert docker.run("images", "-aq") == ""
    assert plugin(docker).layers() == []
    assert mounts_under(plugin(docker).root) == []


def test_readme_without_the_block_fails(tmp_path: Path) -> None:
    """The daemon configuration comes from the README: without its block the tests fail."""
    readme = tmp_path / "README.md"
    readme.write_text(README.read_text().replace(CONFIG_MARKER, ""))
    with pytest.raises(AssertionError, match="no ```json block"):
        readme_config("x", readme)
    assert readme_config("gd-x") == {"experimental": True, "storage-driver": "gd-x"}
