"""Kubernetes through containerd: a pod's whole life through containerd's CRI plugin, as
kubelet drives it, with the README's configuration (CRI's snapshotter: ours).

A private containerd 1.6 (Debian's) with its CRI plugin on (pods on the host's network, no CNI
set up: nothing of the host's network is configured; CRI's stream server listens on a free port
of the loopback, and containerd 1.6 keeps its shims' sockets in the host's /run/containerd/s
whatever its state directory), our proxy beside it, and a CRI client
generated at the start from ``cri/runtime_v1.proto`` (the part of the interface the test
calls). The images are the engine test's, built offline by umoci from busybox-static, and a
pause image of the same layers whose entrypoint sleeps; ``ctr -n k8s.io image import`` puts
them in CRI's namespace, unpacked through the proxy.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from containerd_engine import Engine, build_image, engine, missing_tools
from test_engine import EXPECTED, SCRIPT

from graphdriver.testing import backing_or_skip, host_lacks

pytestmark = pytest.mark.privileged

BASE = "localhost/gd-cri"
APP, PAUSE = f"{BASE}:test", f"{BASE}:pause"
#: overlay: containerd mounts what the proxy describes; vfs: it binds what the proxy mounted
DRIVERS = [("overlay", "loop-xfs"), ("vfs", "loop-ext4")]
PROTO = Path(__file__).parent / "cri"


@pytest.fixture(scope="module")
def cri(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, ModuleType]:
    """The CRI client's modules, generated from the proto by grpcio-tools."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("cri-client")
    argv = ["protoc", f"-I{PROTO}", f"--python_out={out}", f"--grpc_python_out={out}"]
    assert protoc.main([*argv, "runtime_v1.proto"]) == 0, "protoc failed on runtime_v1.proto"
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("runtime_v1_pb2"), importlib.import_module(
            "runtime_v1_pb2_grpc"
        )
    finally:
        sys.path.remove(str(out))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI archive with two refs on the same three layers: ``test`` and ``pause``."""
    lacking = missing_tools()
    if lacking is not None:
        host_lacks(f"containerd's CRI end to end needs {lacking}", "containerd")
    work = tmp_path_factory.mktemp("cri-image")
    build_image(work)
    layout = work / "layout"
    subprocess.run(
        ["umoci", "config", "--image", f"{layout}:test", "--tag", "pause",
         "--config.entrypoint", "/bin/sleep", "--config.cmd", "1000000"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    archive = work / "cri.tar"
    subprocess.run(["tar", "-C", str(layout), "-cf", str(archive), "."], check=True, timeout=60)
    return archive


@pytest.fixture(params=DRIVERS, ids=[f"{d}-{b}" for d, b in DRIVERS])
def kube(request: pytest.FixtureRequest, images: Path) -> Iterator[Engine]:
    driver, kind = request.param
    for backing in backing_or_skip(kind):
        base = backing.root / f"cri-{driver}"
        with engine(base, driver, sandbox_image=PAUSE) as e:
            e.ctr("images", "import", "--base-name", BASE, "--snapshotter", e.snapshotter,
                  str(images))  # fmt: skip
            yield e
            for log in (e.proxy.log, e.containerd.log):
                print(f"--- {log.name} (end)\n{log.read_text(errors='replace')[-4000:]}")


class Kubelet:
    """What kubelet asks containerd's CRI, over its socket."""

    def __init__(self, eng: Engine, pb: ModuleType, pb_grpc: ModuleType) -> None:
        self.eng, self.pb = eng, pb
        self.channel = grpc.insecure_channel(f"unix://{eng.containerd.socket}")
        self.runtime = pb_grpc.RuntimeServiceStub(self.channel)
        self.images = pb_grpc.ImageServiceStub(self.channel)
        host = pb.NamespaceOption(network=pb.NODE, pid=pb.POD, ipc=pb.POD)
        self.sandbox = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name="pod", uid="uid-1", namespace="gd", attempt=0),
            log_directory=str(eng.base / "pod-logs"),
            linux=pb.LinuxPodSandboxConfig(
                cgroup_parent=f"/{eng.ctr.cgroup}",
                security_context=pb.LinuxSandboxSecurityContext(namespace_options=host),
            ),
        )
        self.host = host

    def container(self, pod: str, name: str, readonly: bool = False) -> str:
        pb = self.pb
        config = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name, attempt=0),
            image=pb.ImageSpec(image=APP),
            command=["/bin/sleep"],
            args=["1000000"],
            log_path=f"{name}.log",
            linux=pb.LinuxContainerConfig(
                security_context=pb.LinuxContainerSecurityContext(
                    namespace_options=self.host, readonly_rootfs=readonly
                )
            ),
        )
        req = pb.CreateContainerRequest(
            pod_sandbox_id=pod, config=config, sandbox_config=self.sandbox
        )
        cid: str = self.runtime.CreateContainer(req, timeout=120).container_id
        self.runtime.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)
        return cid

    def exec(self, cid: str, script: str) -> Any:
        req = self.pb.ExecSyncRequest(container_id=cid, cmd=["/bin/sh", "-c", script], timeout=60)
        return self.runtime.ExecSync(req, timeout=90)

    def writable_layer(self, cid: str, at_least: int) -> Any:
        """The container's writable layer as CRI's stats say, once they count *at_least*
        bytes (CRI asks the snapshotter's Usage every second here)."""
        deadline = time.monotonic() + 30
        while True:
            req = self.pb.ContainerStatsRequest(container_id=cid)
            layer = self.runtime.ContainerStats(req, timeout=30).stats.writable_layer
            if layer.used_bytes.value >= at_least or time.monotonic() > deadline:
                return layer
            time.sleep(0.5)

    def tags(self) -> set[str]:
        listed = self.images.ListImages(self.pb.ListImagesRequest(), timeout=30).images
        return {tag for image in listed for tag in image.repo_tags}

    def listing(self, wanted: set[str]) -> set[str]:
        """The tags CRI lists, once it lists *wanted* (it learns of imported images from
        containerd's events, a moment after the import)."""
        deadline = time.monotonic() + 30
        while not wanted <= (tags := self.tags()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return tags


def _reconnected(eng: Engine) -> None:
    """Once containerd's client of the proxy has connected again (grpc-go's backoff, at most
    3 s in containerd's proxy plugins): calls meanwhile fail UNAVAILABLE, a garbage
    collection's too, whose snapshots then wait for the next one."""
    deadline = time.monotonic() + 30
    while True:
        try:
            eng.ctr("snapshots", "--snapshotter", eng.snapshotter, "ls", timeout=30)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_pod_lives_and_goes_through_cri(kube: Engine, cri: tuple[ModuleType, ModuleType]) -> None:
    pb, pb_grpc = cri
    k = Kubelet(kube, pb, pb_grpc)
    try:
        assert {APP, PAUSE} <= k.listing({APP, PAUSE})
        status = k.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=APP)))
        assert status.image.size > 0
        assert k.images.ImageFsInfo(pb.ImageFsInfoRequest(), timeout=30).image_filesystems
        pod = k.runtime.RunPodSandbox(
            pb.RunPodSandboxRequest(config=k.sandbox), timeout=120
        ).pod_sandbox_id
        app = k.container(pod, "app")
        ran = k.exec(app, SCRIPT)
        assert (ran.exit_code, ran.stdout.decode()) == (0, EXPECTED), ran.stderr
        # a 1 GiB hole and 4 MiB of data: the pod's ephemeral storage counts the data
        ran = k.exec(app, "truncate -s 1G /hole && dd if=/dev/zero of=/data4m bs=1M count=4")
        assert ran.exit_code == 0, ran.stderr
        layer = k.writable_layer(app, 4 << 20)
        assert 4 << 20 <= layer.used_bytes.value < 64 << 20, layer
        assert layer.inodes_used.value >= 3, layer  # /written.txt, /hole, /data4m
        # a read-only root filesystem: the same layers, no write
        frozen = k.container(pod, "frozen", readonly=True)
        ran = k.exec(frozen, "cat /etc/top.txt && ! touch /nope")
        assert (ran.exit_code, ran.stdout.decode()) == (0, "from the top layer\n"), ran.stderr
        # the proxy stopped and started again under a running pod: CRI goes on
        kube.proxy.stop()
        kube.proxy.start()
        _reconnected(kube)
        assert k.exec(app, "cat /written.txt").stdout == b"written in the container\n"
        assert k.writable_layer(app, 4 << 20).used_bytes.value >= 4 << 20
        # three image layers, the sandbox's and two containers' read-write layers
        assert len(kube.proxy.layers()) == 3 + 3
        for cid in (app, frozen):
            k.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=10))
            k.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=60)
        k.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=60)
        k.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=60)
        for tag in (APP, PAUSE):
            k.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=tag)), timeout=60)
        # CRI removes images synchronously: containerd's collector has removed every snapshot
        assert not {APP, PAUSE} & k.tags()
        assert kube.proxy.layers() == []
        assert kube.mounts() == []
    finally:
        k.channel.close()
