"""The check of a layer without a parent that replaces the tree walk (exact.unchanged_alone):
it agrees with the walk and :func:`exact.stale`, and it sees a name added to a directory even
when the directory's times say nothing changed (a write in the same timer tick as apply's
stat, where timestamps are coarse)."""

from __future__ import annotations

import os
from pathlib import Path

from graphdriver.archive import exact, tarsplit, tree_changes


def _noted(root: Path) -> tarsplit.Checks:
    """The checks an apply of everything now under *root* would have noted."""
    checks = tarsplit.Checks()
    for path in [""] + [str(p.relative_to(root)) for p in sorted(root.rglob("*"))]:
        st = os.lstat(root / path)
        checks.present[path] = (st.st_mode, st.st_mtime_ns, st.st_ctime_ns)
    return checks


def _agrees(checks: tarsplit.Checks, root: Path) -> bool:
    walked = [(c.path, False) for c in tree_changes(str(root), None)]
    alone = exact.unchanged_alone(checks, str(root))
    assert alone == (exact.stale(checks, str(root), walked) is None)
    return alone


def _tree(root: Path) -> None:
    (root / "etc" / "deep").mkdir(parents=True)
    (root / "etc" / "deep" / "f").write_bytes(b"f")
    (root / "etc" / "empty").write_bytes(b"")
    (root / "link").symlink_to("etc/deep/f")


def test_an_unchanged_layer_needs_no_walk(tmp_path: Path) -> None:
    _tree(tmp_path)
    assert _agrees(_noted(tmp_path), tmp_path)


def test_a_name_added_behind_unchanged_directory_times_is_seen(tmp_path: Path) -> None:
    _tree(tmp_path)
    for where in ("etc/deep", "", "etc"):
        checks = _noted(tmp_path)
        new = tmp_path / where / "new"
        new.mkdir()
        (new / "inner").write_bytes(b"x")
        # the directory noted as it is now: its times cannot tell
        st = os.lstat(tmp_path / where)
        checks.present[where] = (st.st_mode, st.st_mtime_ns, st.st_ctime_ns)
        assert not _agrees(checks, tmp_path), where
        (new / "inner").unlink()
        new.rmdir()


def test_a_file_removed_or_replaced_by_a_directory_is_seen(tmp_path: Path) -> None:
    _tree(tmp_path)
    checks = _noted(tmp_path)
    (tmp_path / "etc" / "empty").unlink()
    assert not _agrees(checks, tmp_path)
    (tmp_path / "etc" / "empty").mkdir()
    assert not _agrees(checks, tmp_path)


def test_a_directory_replaced_by_a_file_is_seen_not_raised(tmp_path: Path) -> None:
    _tree(tmp_path)
    checks = _noted(tmp_path)
    (tmp_path / "etc" / "deep" / "f").unlink()
    (tmp_path / "etc" / "deep").rmdir()
    (tmp_path / "etc" / "deep").write_bytes(b"now a file")
    assert not _agrees(checks, tmp_path)
    assert "/etc/deep/f" in str(exact.stale(checks, str(tmp_path), []))
