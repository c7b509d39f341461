"""A private dockerd (Debian's docker.io 20.10) beside our volume plugin, for end-to-end tests.

Everything lives under one temp directory: containerd's root, state and sockets, dockerd's
--data-root, --exec-root, --pidfile, API socket and configuration file (whose
``deprecated-key-path`` keeps its identity key out of /etc/docker), the plugin's store and log.
Only the plugin's socket is outside: dockerd finds unmanaged plugins in /run/docker/plugins and
nowhere else, so each run takes a unique plugin name. dockerd gets no bridge, no iptables, no
IP forwarding or masquerading (the host's network is untouched) and containers run with
``--network none``. Every process started here is stopped, SIGKILLed after a timeout, and
everything mounted under the directory unmounted, also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from plugin_proc import VolumePlugin, running

from graphdriver.linux.mount import unmount_all_under
from graphdriver.testing.leftovers import kill_shims, remove_cgroup

DOCKERD = "/usr/sbin/dockerd"
#: Debian's client, as old as the daemon (the one first on PATH may speak a newer API)
DOCKER = "/usr/bin/docker"
CONTAINERD = "/usr/bin/containerd"
PLUGIN_DIR = Path("/run/docker/plugins")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
IMAGE = "gd-volume-test:1"
BUSYBOX_APPLETS = ("sh", "cat", "ls", "echo", "sleep", "true", "test", "grep")

#: dockerd's flags besides the private paths: no bridge, no iptables, no forwarding
DOCKERD_FLAGS = (
    "--iptables=false",
    "--ip6tables=false",
    "--ip-masq=false",
    "--ip-forward=false",
    "--bridge=none",
    "--userland-proxy=false",
    "--storage-driver=vfs",
)


def missing_tools() -> str | None:
    """What this host lacks to run dockerd end to end, or None."""
    for tool, package in (
        (DOCKERD, "docker.io"),
        (DOCKER, "docker.io"),
        (CONTAINERD, "containerd"),
        ("containerd-shim-runc-v2", "containerd"),
        ("runc", "runc"),
        ("/bin/busybox", "busybox-static"),
    ):
        if shutil.which(tool) is None:
            return f"{tool} (apt-get install {package})"
    return None


def stop(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM, then SIGKILL if *proc* is still there after *timeout*; its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


def _start(argv: list[str], log: Path, ready: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + START_TIMEOUT
    while not ready.is_socket():
        if proc.poll() is not None:
            raise RuntimeError(
                f"{argv[0]} exited with {proc.returncode}: {log.read_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"{ready} did not appear in {START_TIMEOUT} s")
        time.sleep(0.05)
    return proc


def containerd_config(base: Path) -> str:
    return f"""version = 2
root = "{base / "root"}"
state = "{base / "state"}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{base / "containerd.sock"}"
[ttrpc]
  address = "{base / "containerd.sock.ttrpc"}"
[debug]
  address = "{base / "debug.sock"}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{base / "opt"}"
"""


@dataclass
class Docker:
    """dockerd, its containerd, and our volume plugin registered as :attr:`plugin_name`."""

    base: Path
    socket: Path
    plugin: VolumePlugin
    #: SIGKILL dockerd and start it again (where the fixture gives one)
    kill_and_restart: Callable[[], None] | None = None

    @property
    def plugin_name(self) -> str:
        return self.plugin.name

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        """``docker -H unix://SOCKET ARGS``: its stdout; AssertionError with stderr on failure
        (or the stderr when *check* is false and it failed)."""
        proc = subprocess.run(
            [DOCKER, "-H", f"unix://{self.socket}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            if not check:
                return proc.stderr
            raise AssertionError(f"docker {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        if not check:
            raise AssertionError(f"docker {' '.join(args)} succeeded: {proc.stdout}")
        return proc.stdout

    def container(self, *args: str, timeout: float = 120) -> str:
        """``docker run --network none ARGS``: the output of a container."""
        return self.run("run", "--network", "none", *args, timeout=timeout)


def _rootfs_tar(work: Path) -> Path:
    rootfs = work / "rootfs"
    for d in ("bin", "tmp", "data", "etc"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    (rootfs / "tmp").chmod(0o1777)
    shutil.copy2("/bin/busybox", rootfs / "bin/busybox")
    for applet in BUSYBOX_APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "data/from-image").write_text("in the image\n")
    tar = work / "rootfs.tar"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], check=True, timeout=60)
    shutil.rmtree(rootfs)
    return tar


def _remove_containers(docker: Docker) -> None:
    with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
        ids = docker.run("ps", "-aq", timeout=60).split()
        if ids:
            docker.run("rm", "-f", "-v", *ids, timeout=120)


def start_dockerd(
    base: Path, config: Path, containerd: Path, api: Path, flags: list[str], cgroup: str
) -> subprocess.Popen[bytes]:
    """dockerd with its data, exec root, pidfile and log under *base*, *config* as its
    daemon.json, the containerd on *containerd*, serving on *api*, its containers' cgroups
    under the top-level *cgroup* (the caller removes it: :func:`remove_cgroup`); up when this
    returns."""
    return _start(
        [
            DOCKERD,
            # cgroupfs: with systemd's driver (a systemd host on cgroup v2) a parent must be
            # a slice, and its cgroups are systemd's to remove
            "--exec-opt",
            "native.cgroupdriver=cgroupfs",
            "--cgroup-parent",
            f"/{cgroup}",
            "--config-file",
            str(config),
            "--data-root",
            str(base / "data"),
            "--exec-root",
            str(base / "exec"),
            "--pidfile",
            str(base / "dockerd.pid"),
            "--host",
            f"unix://{api}",
            "--containerd",
            str(containerd),
            *flags,
        ],
        base / "dockerd.log",
        api,
    )


def restarter(
    procs: list[subprocess.Popen[bytes]], api: Path, start: Callable[[], subprocess.Popen[bytes]]
) -> Callable[[], None]:
    """What SIGKILLs dockerd (the last of *procs*) and starts it again with *start*."""

    def kill_and_restart() -> None:
        procs[-1].kill()
        procs[-1].wait()
        api.unlink(missing_ok=True)  # (left by the killed one: no sign of life)
        procs[-1] = start()

    return kill_and_restart


def release(
    base: Path,
    procs: list[subprocess.Popen[bytes]],
    containerd: Path,
    cgroup: str,
    made_plugin_dir: bool,
) -> None:
    """Stop *procs* (dockerd and its containerd, last first) and the runc shims of the
    containerd at *containerd*, kill and remove what is in the containers' parent *cgroup*,
    unmount what is under *base*, and (*made_plugin_dir*: /run/docker was made by this
    dockerd) remove /run/docker/plugins and /run/docker; each step also when one before it
    failed (its error raised after the last)."""

    def remove_plugin_dir() -> None:
        with contextlib.suppress(OSError):
            PLUGIN_DIR.rmdir()
            PLUGIN_DIR.parent.rmdir()

    with contextlib.ExitStack() as steps:  # (its callbacks run last in, first out)
        if made_plugin_dir:
            steps.callback(remove_plugin_dir)
        steps.callback(unmount_all_under, base)
        steps.callback(remove_cgroup, cgroup)  # (first: a process left in it keeps mounts busy)
        steps.callback(kill_shims, containerd)
        for proc in procs:
            steps.callback(stop, proc)


@contextlib.contextmanager
def dockerd(base: Path) -> Iterator[Docker]:
    """containerd, dockerd and the volume plugin under *base*, with the test image imported;
    everything stopped and unmounted at the end, and the containers' parent cgroup removed."""
    base.mkdir(parents=True, exist_ok=True)
    ctd = base / "containerd"
    ctd.mkdir()
    (ctd / "config.toml").write_text(containerd_config(ctd))
    config = base / "daemon.json"
    config.write_text(json.dumps({"deprecated-key-path": str(base / "key.json")}))
    api = base / "docker.sock"
    name = f"gd-test-{secrets.token_hex(4)}"
    made_plugin_dir = not PLUGIN_DIR.parent.exists()
    procs: list[subprocess.Popen[bytes]] = []
    docker: Docker | None = None
    try:
        procs.append(
            _start(
                [CONTAINERD, "--config", str(ctd / "config.toml")],
                base / "containerd.log",
                ctd / "containerd.sock",
            )
        )
        with running(base / "store", name, PLUGIN_DIR / f"{name}.sock") as plugin:

            def start() -> subprocess.Popen[bytes]:
                sock = ctd / "containerd.sock"
                return start_dockerd(base, config, sock, api, list(DOCKERD_FLAGS), name)

            procs.append(start())
            docker = Docker(base, api, plugin, restarter(procs, api, start))
            docker.run("import", str(_rootfs_tar(base)), IMAGE)
            try:
                yield docker
            finally:
                _remove_containers(docker)
                stop(procs.pop())
    finally:
        release(base, procs, ctd / "containerd.sock", name, made_plugin_dir)
