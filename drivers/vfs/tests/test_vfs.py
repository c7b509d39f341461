"""What the vfs driver promises beyond the suite: its home is root's alone."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from graphdriver_vfs import VfsDriver


def test_recover_tightens_a_looser_home_made_by_an_older_version(tmp_path: Path) -> None:
    home = tmp_path / "vfs"
    (home / "dir").mkdir(parents=True)
    for folder in (home, home / "dir"):
        os.chmod(folder, 0o755)
    driver = VfsDriver(home, {})
    assert stat.S_IMODE(os.stat(home / "dir").st_mode) == 0o755  # __init__ changes nothing
    driver.recover([])
    for folder in (home, home / "dir"):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700, folder
