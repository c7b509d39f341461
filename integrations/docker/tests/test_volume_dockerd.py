"""A real dockerd (Debian's 20.10) keeps its volumes in our store through the volume plugin."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from dockerd import IMAGE, Docker, dockerd, missing_tools

from graphdriver.testing.require import host_lacks

pytestmark = pytest.mark.privileged

#: a container that runs until `docker stop`, logging each start into the volume
SERVE = 'trap "exit 0" TERM; echo started >> /data/log; while true; do sleep 1; done'


@pytest.fixture(scope="module")
def docker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Docker]:
    if os.geteuid() != 0:
        host_lacks("dockerd and the plugin's socket in /run/docker/plugins need root", "root")
    missing = missing_tools()
    if missing is not None:
        host_lacks(f"dockerd end to end needs {missing}", "docker")
    with dockerd(tmp_path_factory.mktemp("dockerd")) as docker:
        yield docker


def store_volumes(docker: Docker) -> list[str]:
    return docker.plugin.volumes()


def test_run_volumes_from_and_ls(docker: Docker) -> None:
    """`docker volume create -d NAME`, a container writing into it, a second one reading it
    with --volumes-from; the data is in our store and `docker volume ls` lists the volume."""
    name = docker.plugin_name
    assert docker.plugin.socket == Path("/run/docker/plugins") / f"{name}.sock"
    assert docker.run("volume", "create", "-d", name, "v1").strip() == "v1"
    assert "v1" in store_volumes(docker)
    docker.container("--rm", "-v", "v1:/data", IMAGE, "sh", "-c", "echo x > /data/f")
    data = docker.plugin.root / "volumes" / "v1" / "_data"
    assert (data / "f").read_text() == "x\n"

    docker.run("create", "--name", "holder", "--network", "none", "-v", "v1:/data", IMAGE, "true")
    try:
        out = docker.container("--rm", "--volumes-from", "holder", IMAGE, "cat", "/data/f")
        assert out == "x\n"
    finally:
        docker.run("rm", "holder")

    listed = docker.run("volume", "ls", "--format", "{{.Driver}} {{.Name}}").splitlines()
    assert f"{name} v1" in listed
    inspect = docker.run("volume", "inspect", "--format", "{{.Mountpoint}}", "v1").strip()
    assert inspect == str(data)


def test_data_kept_across_stop_and_start(docker: Docker) -> None:
    """A container's volume data survives `docker stop` and `docker start`; while it runs the
    plugin counts its mount, after the stop it counts none."""
    docker.run("volume", "create", "-d", docker.plugin_name, "v2")
    docker.run("run", "-d", "--name", "svc", "--network", "none", "-v", "v2:/data", IMAGE,
               "sh", "-c", SERVE)  # fmt: skip
    try:
        log = docker.plugin.root / "volumes" / "v2" / "_data" / "log"
        docker.run("exec", "svc", "test", "-f", "/data/log")
        docker.run("stop", "-t", "20", "svc")
        assert mount_count(docker, "v2") == 0
        docker.run("start", "svc")
        docker.run("exec", "svc", "sh", "-c", "test $(grep -c started /data/log) = 2")
        assert log.read_text() == "started\nstarted\n"
        assert mount_count(docker, "v2") == 1
    finally:
        docker.run("rm", "-f", "svc")
    assert mount_count(docker, "v2") == 0


def mount_count(docker: Docker, volume: str) -> int:
    out = docker.run("volume", "inspect", "--format", "{{.Status.MountCount}}", volume)
    return int(out)


def test_volume_rm(docker: Docker) -> None:
    """`docker volume rm` removes the volume and its data from our store; while a container
    uses it, dockerd refuses and the data stays."""
    docker.run("volume", "create", "-d", docker.plugin_name, "v3")
    docker.container("--name", "user", "-v", "v3:/data", IMAGE, "sh", "-c", "echo y > /data/g")
    assert "volume is in use" in docker.run("volume", "rm", "v3", check=False)
    assert "v3" in store_volumes(docker)
    docker.run("rm", "user")
    docker.run("volume", "rm", "v3")
    assert "v3" not in store_volumes(docker)
    assert not (docker.plugin.root / "volumes" / "v3").exists()
    assert "v3" not in docker.run("volume", "ls", "-q").split()


def test_tmpfs_volume_through_local_driver_options(docker: Docker) -> None:
    """`--opt type=tmpfs --opt device=tmpfs --opt o=size=8m` reach the store's local driver:
    the container sees a tmpfs of that size at the volume's path."""
    docker.run("volume", "create", "-d", docker.plugin_name, "-o", "type=tmpfs",
               "-o", "device=tmpfs", "-o", "o=size=8m", "t1")  # fmt: skip
    try:
        out = docker.container("--rm", "-v", "t1:/data", IMAGE, "sh", "-c",
                               "grep ' /data ' /proc/mounts")  # fmt: skip
        assert out.split()[2] == "tmpfs" and "size=8192k" in out
    finally:
        docker.run("volume", "rm", "t1")


def test_plugin_killed_and_restarted_while_a_container_runs(docker: Docker) -> None:
    """SIGKILL the plugin while a container holds a volume, start it again: dockerd's next
    calls work, the mount count was kept, and the volume is removed once the container is."""
    docker.run("volume", "create", "-d", docker.plugin_name, "v4")
    docker.run("run", "-d", "--name", "held", "--network", "none", "-v", "v4:/data", IMAGE,
               "sh", "-c", SERVE)  # fmt: skip
    try:
        docker.run("exec", "held", "test", "-f", "/data/log")
        assert docker.plugin.stop(signal.SIGKILL) == -signal.SIGKILL
        docker.plugin.start()
        assert mount_count(docker, "v4") == 1
        docker.run("stop", "-t", "20", "held")
        assert mount_count(docker, "v4") == 0
    finally:
        docker.run("rm", "-f", "held")
    docker.run("volume", "rm", "v4")
    assert "v4" not in store_volumes(docker)


def test_a_volume_mounted_when_dockerd_was_killed_can_be_removed(docker: Docker) -> None:
    """dockerd SIGKILLed while a container holds a volume: as it starts again it stops that
    container and never sends its Unmount. The container and then the volume are removed all
    the same (the plugin's count, kept in SQLite, refused the removal for ever: dockerd's own
    local driver keeps its counts in memory)."""
    assert docker.kill_and_restart is not None
    docker.run("volume", "create", "-d", docker.plugin_name, "v5")
    docker.run("run", "-d", "--name", "orphan", "--network", "none", "-v", "v5:/data", IMAGE,
               "sh", "-c", SERVE)  # fmt: skip
    try:
        docker.run("exec", "orphan", "test", "-f", "/data/log")
        docker.kill_and_restart()
        assert mount_count(docker, "v5") == 1  # its Unmount never comes
    finally:
        docker.run("rm", "-f", "orphan")
    docker.run("volume", "rm", "v5")
    assert "v5" not in store_volumes(docker)
    assert "releasing dockerd mount ID" in docker.plugin.output()
