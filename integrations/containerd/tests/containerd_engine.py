"""A real containerd beside our proxy snapshotter, for the end-to-end tests (and bench/).

Everything lives under one directory (the loop-backed filesystem the store is on): containerd's
root, state, opt dir and sockets, the proxy's socket and the store. containerd's configuration
is the README's own version-2 snippet with only the socket address replaced and the private
paths added, so that the documented configuration is the tested one. Every process started
here is stopped with SIGTERM, then SIGKILL after a timeout, and every mount under the directory
is unmounted, also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graphdriver.linux.mount import mounts_under, unmount_all_under
from graphdriver.testing.leftovers import kill_shims, remove_cgroup

REPO = Path(__file__).resolve().parents[3]
README = REPO / "README.md"
#: the marker before the code block of containerd's version-2 configuration in README.md
CONFIG_MARKER = "<!-- containerd-config-v2 -->"
#: the socket the README's configuration names; the tests put their own in its place
DOCUMENTED_ADDRESS = "/run/graphdriver/containerd.sock"
CONTAINERD = "/usr/bin/containerd"
STOP_TIMEOUT = 10.0
START_TIMEOUT = 30.0
BUSYBOX_APPLETS = (
    "sh", "cat", "ls", "test", "echo", "mkdir", "rm", "stat", "true", "sleep", "dd", "truncate",
)  # fmt: skip


class ReadmeConfigMissing(Exception):
    """README.md lost the marked containerd configuration the tests run with."""


def readme_config(readme: Path = README, marker: str = CONFIG_MARKER) -> str:
    """The TOML code block that follows *marker* in *readme* (by default the version-2
    configuration the tests run)."""
    text = readme.read_text()
    found = re.search(re.escape(marker) + r"\s*\n```toml\n(.*?)\n```", text, re.DOTALL)
    if found is None:
        raise ReadmeConfigMissing(
            f"{readme} has no ```toml block right after {marker}: the tests run "
            "containerd with the configuration the README documents"
        )
    return found.group(1)


def engine_config(
    snippet: str, proxy_socket: Path, base: Path, sandbox_image: str | None = None
) -> str:
    """The README's *snippet* for a private containerd under *base*: the documented socket
    becomes *proxy_socket*; root, state, the opt dir and containerd's own sockets go under
    *base*. The CRI plugin is off, unless a *sandbox_image* (the pods' pause image) is given:
    then it serves Kubernetes' CRI, with runc's state, its CNI folders (empty: pods use the
    host's network, which nothing touches) under *base*, its stream server on the loopback's
    first free port, and the stats of snapshots collected every second."""
    if DOCUMENTED_ADDRESS not in snippet:
        raise ReadmeConfigMissing(
            f"the README's containerd configuration names no {DOCUMENTED_ADDRESS}"
        )
    lines = snippet.replace(DOCUMENTED_ADDRESS, str(proxy_socket)).splitlines()
    # top-level keys must come before the first table: right after `version = 2`
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("version"))
    lines[at + 1 : at + 1] = [
        f'root = "{base / "root"}"',
        f'state = "{base / "state"}"',
        *([] if sandbox_image else ['disabled_plugins = ["io.containerd.grpc.v1.cri"]']),
    ]
    if sandbox_image:
        cri = '[plugins."io.containerd.grpc.v1.cri"'
        lines += [
            "",
            f"{cri}]",
            f'  sandbox_image = "{sandbox_image}"',
            "  disable_apparmor = true",
            "  restrict_oom_score_adj = true",
            "  stats_collect_period = 1",
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            f"{cri}.containerd.runtimes.runc]",
            '  runtime_type = "io.containerd.runc.v2"',
            f"{cri}.containerd.runtimes.runc.options]",
            f'  Root = "{base / "runc"}"',
            f"{cri}.cni]",
            f'  bin_dir = "{base / "cni/bin"}"',
            f'  conf_dir = "{base / "cni/conf"}"',
        ]
    lines += [
        "",
        "[grpc]",
        f'  address = "{base / "containerd.sock"}"',
        "[ttrpc]",
        f'  address = "{base / "containerd.sock.ttrpc"}"',
        "[debug]",
        f'  address = "{base / "debug.sock"}"',
        '[plugins."io.containerd.internal.v1.opt"]',
        f'  path = "{base / "opt"}"',
    ]
    text = "\n".join(lines) + "\n"
    parsed = tomllib.loads(text)
    proxy = parsed.get("proxy_plugins", {}).get("graphdriver", {})
    declared = {k: proxy.get(k) for k in ("type", "address")}
    if parsed.get("version") != 2 or declared != {"type": "snapshot", "address": str(proxy_socket)}:
        raise ReadmeConfigMissing(
            "the README's version-2 configuration does not declare "
            f'[proxy_plugins.graphdriver] type = "snapshot" address = "{DOCUMENTED_ADDRESS}"'
        )
    return text


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


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not path.is_socket():
        if proc.poll() is not None:
            raise RuntimeError(
                f"{proc.args!r} exited with {proc.returncode}: {log.read_text()[-2000:]}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{path} did not appear in {START_TIMEOUT} s: {log.read_text()[-2000:]}"
            )
        time.sleep(0.05)


def graphdriver_command() -> list[str]:
    exe = shutil.which("graphdriver", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "graphdriver"]


class Proxy:
    """``graphdriver --root R --driver D serve containerd --address SOCKET`` in the background."""

    def __init__(self, store: Path, driver: str, socket: Path, log: Path) -> None:
        self.store, self.driver, self.socket, self.log = store, driver, socket, log
        self.proc: subprocess.Popen[bytes] | None = None

    def gd(self, *args: str) -> list[str]:
        return [*graphdriver_command(), "--root", str(self.store), "--driver", self.driver, *args]

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.gd("serve", "containerd", "--address", str(self.socket)),
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        _wait_for_socket(self.socket, self.proc, self.log)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        status = stop(self.proc)
        self.proc = None
        return status

    def layers(self) -> list[str]:
        """``graphdriver ls``: the store's layers, as the CLI lists them."""
        proc = subprocess.run(self.gd("ls"), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    def records(self) -> list[dict[str, Any]]:
        """``graphdriver --json ls``: what the store knows about each layer."""
        proc = subprocess.run(self.gd("--json", "ls"), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        got: list[dict[str, Any]] = json.loads(proc.stdout)
        return got


@dataclass
class Ctr:
    """``ctr`` against one containerd socket and namespace."""

    address: Path
    namespace: str
    #: the top-level cgroup its containers go in, where it is not the namespace's (CRI's pods)
    cgroup: str = ""

    def argv(self, *args: str) -> list[str]:
        return ["ctr", "--address", str(self.address), "--namespace", self.namespace, *args]

    def __call__(self, *args: str, timeout: float = 120) -> str:
        proc = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(
                f"ctr {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}"
            )
        return proc.stdout


class Containerd:
    """A private containerd started with ``/usr/bin/containerd --config CFG``."""

    def __init__(self, base: Path, config: str) -> None:
        self.base = base
        self.config = base / "config.toml"
        self.config.write_text(config)
        self.socket = base / "containerd.sock"
        self.log = base / "containerd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [CONTAINERD, "--config", str(self.config)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        _wait_for_socket(self.socket, self.proc, self.log)

    def ctr(self, namespace: str) -> Ctr:
        return Ctr(self.socket, namespace)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


def _kill_tasks(ctr: Ctr) -> None:
    """Kill and delete what a failed test left running in *ctr*'s namespace."""
    with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
        for task in ctr("tasks", "ls", "--quiet", timeout=30).split():
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                ctr("tasks", "kill", "--all", "--signal", "SIGKILL", task, timeout=30)
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                ctr("tasks", "delete", "--force", task, timeout=30)
        for container in ctr("containers", "ls", "--quiet", timeout=30).split():
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                ctr("containers", "delete", container, timeout=30)


@dataclass
class Engine:
    """containerd, the proxy beside it, and a private namespace; see :func:`engine`."""

    base: Path
    containerd: Containerd
    proxy: Proxy
    ctr: Ctr
    snapshotter: str = "graphdriver"

    def mounts(self) -> list[str]:
        """Mount points under the engine's directory (none once everything is released)."""
        return mounts_under(self.base)


@contextlib.contextmanager
def engine(base: Path, driver: str, sandbox_image: str | None = None) -> Iterator[Engine]:
    """containerd with the README's configuration and our proxy on a store under *base*
    (``base/store``, driver *driver*); everything stopped and unmounted at the end, and the
    namespace's cgroup removed. With a *sandbox_image*, containerd's CRI serves too (see
    :func:`engine_config`), and the namespace is CRI's, ``k8s.io``: its pods' cgroups go
    under the cgroup the test names in their ``cgroup_parent``, ``Engine.ctr.namespace``."""
    base.mkdir(parents=True, exist_ok=True)
    proxy = Proxy(base / "store", driver, base / "graphdriver.sock", base / "graphdriver.log")
    config = engine_config(readme_config(), proxy.socket, base, sandbox_image)
    containerd = Containerd(base, config)
    ctr = containerd.ctr(f"gd-engine-{secrets.token_hex(4)}")
    if sandbox_image:
        for folder in ("cni/bin", "cni/conf"):
            (base / folder).mkdir(parents=True, exist_ok=True)
        ctr = Ctr(containerd.socket, "k8s.io", cgroup=f"gd-cri-{secrets.token_hex(4)}")
    try:
        proxy.start()
        containerd.start()
        yield Engine(base, containerd, proxy, ctr)
    finally:
        # each step also when one before it failed (its error raised after the last); an
        # ExitStack runs them last in, first out
        with contextlib.ExitStack() as steps:
            steps.callback(unmount_all_under, base)
            # runc's parent of the containers' cgroups, before the unmount: a process left in
            # it keeps mounts busy
            steps.callback(remove_cgroup, ctr.cgroup or ctr.namespace)
            steps.callback(proxy.stop)
            steps.callback(kill_shims, containerd.socket)
            steps.callback(containerd.stop)
            if containerd.proc is not None and containerd.proc.poll() is None:
                steps.callback(_kill_tasks, ctr)


# ----------------------------------------------------------------------------- the test image


def _umoci(*args: str) -> None:
    proc = subprocess.run(["umoci", *args], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"umoci {' '.join(args)}: {proc.stderr.strip()}")


def build_image(work: Path) -> Path:
    """An OCI archive (``image.tar``, ref name ``test``) of three layers built by umoci from
    busybox-static, offline:

    1. /bin/busybox and applet links, /etc/lowest.txt, /data/old/{a,b}, /removeme.txt, /tmp;
    2. /removeme.txt and /data/old deleted (whiteouts);
    3. /etc/top.txt added.
    """
    layout = work / "layout"
    image = f"{layout}:test"
    _umoci("init", "--layout", str(layout))
    _umoci("new", "--image", image)

    def layer(n: int) -> Path:
        bundle = work / f"bundle{n}"
        _umoci("unpack", "--image", image, str(bundle))
        return bundle / "rootfs"

    rootfs = layer(1)
    for d in ("bin", "etc", "data/old", "tmp"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    (rootfs / "tmp").chmod(0o1777)
    shutil.copy2("/bin/busybox", rootfs / "bin/busybox")
    for applet in BUSYBOX_APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc/lowest.txt").write_text("from the lowest layer\n")
    (rootfs / "data/old/a").write_text("old a\n")
    (rootfs / "data/old/b").write_text("old b\n")
    (rootfs / "removeme.txt").write_text("deleted by layer 2\n")
    _umoci("repack", "--image", image, str(rootfs.parent))

    rootfs = layer(2)
    (rootfs / "removeme.txt").unlink()
    shutil.rmtree(rootfs / "data/old")
    _umoci("repack", "--image", image, str(rootfs.parent))

    rootfs = layer(3)
    (rootfs / "etc/top.txt").write_text("from the top layer\n")
    _umoci("repack", "--image", image, str(rootfs.parent))
    _umoci("config", "--image", image, "--config.cmd", "/bin/sh")
    _umoci("gc", "--layout", str(layout))

    archive = work / "image.tar"
    subprocess.run(["tar", "-C", str(layout), "-cf", str(archive), "."], check=True, timeout=60)
    return archive


def missing_tools() -> str | None:
    """What this host lacks to run containerd end to end, or None."""
    for tool, package in (
        (CONTAINERD, "containerd"),
        ("ctr", "containerd"),
        ("containerd-shim-runc-v2", "containerd"),
        ("runc", "runc"),
        ("umoci", "umoci"),
        ("/bin/busybox", "busybox-static"),
    ):
        if shutil.which(tool) is None:
            return f"{tool} (apt-get install {package})"
    return None
