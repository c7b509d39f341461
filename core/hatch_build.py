"""Build hook: compile ``graphdriver.archive._fastpath`` (``src/graphdriver/archive/_fastpath.c``:
the archive engine's loops in C, the apply sandbox's plain files and an exact diff's replay)
with the compiler and headers of the Python that builds the wheel (``$CC`` and ``$CFLAGS`` if
set), next to its source, so that an editable install imports it too. Where that fails (no C
compiler or no Python headers) the wheel is built without it, saying so, and no older build of
it is left: the archive engine then runs the same loops in Python
(``graphdriver.archive.fastpath.ENABLED`` is False)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = Path("src/graphdriver/archive/_fastpath.c")


class FastPathHook(BuildHookInterface):  # type: ignore[misc]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        root = Path(self.root)
        target = SOURCE.with_name("_fastpath" + sysconfig.get_config_var("EXT_SUFFIX"))
        problem = compile_extension(root / SOURCE, root / target)
        if problem:
            # an older build's module must not outlive its source (an editable install
            # imports what is next to the source)
            (root / target).unlink(missing_ok=True)
            print(f"graphdriver: building without the C fast path: {problem}", file=sys.stderr)
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        build_data["artifacts"].append(target.as_posix())


def compile_extension(source: Path, target: Path) -> str | None:
    """Compile *source* into the extension module *target*; None, or why it could not."""
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    flags = shlex.split(os.environ.get("CFLAGS", ""))
    include = sysconfig.get_paths()["include"]
    if not Path(include, "Python.h").exists():
        return f"no Python.h in {include} (for Debian's python3: apt-get install python3-dev)"
    fd, temp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    command = [*cc, "-shared", "-fPIC", "-O2", "-Wall", "-pthread", *flags, "-I", include]
    command += [str(source), "-o", temp]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        os.unlink(temp)
        return f"cannot run {cc[0]}: {exc.strerror}"
    if done.returncode != 0:
        os.unlink(temp)
        return f"{shlex.join(command)} failed:\n{done.stderr}"
    os.replace(temp, target)  # atomic: a process importing the old one keeps its own
    return None
