"""Bad ids, parents and tars: refused, and nothing lost."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from .. import InvalidLayerId, LayerExists, LayerInUse, LayerNotFound, LayerStore
from .backings import Backing
from .base import ConformanceBase, _member, _tar, hostile_tars
from .trees import make_base, snapshot


class BadInputCases(ConformanceBase):
    """Bad ids, parents and tars: refused, and nothing lost."""

    # ------------------------------------------------------------------ bad input

    @pytest.mark.parametrize(
        "bad", ["../x", "/x", "", "a" * 129, "a\0b", ".hidden", "a/b", "-rf", "x y"]
    )
    def test_invalid_ids(self, store: LayerStore, bad: str) -> None:
        with pytest.raises(InvalidLayerId):
            store.create(bad)
        with pytest.raises(InvalidLayerId):
            store.create("ok", bad)
        assert store.layers() == []

    def test_unknown_parent_and_duplicate(self, store: LayerStore) -> None:
        with pytest.raises(LayerNotFound):
            store.create("orphan", "missing")
        assert store.layers() == []
        store.create("once")
        with pytest.raises(LayerExists):
            store.create("once")
        with pytest.raises(LayerNotFound):
            store.get("missing")
        with pytest.raises(LayerNotFound):
            store.remove("missing")
        assert store.layers() == ["once"]

    def test_max_id_length(self, store: LayerStore) -> None:
        store.create("a" * 128)
        assert store.exists("a" * 128)

    @pytest.mark.parametrize("case", sorted(hostile_tars()))
    def test_bad_tar_refused_and_rolled_back(
        self, store: LayerStore, case: str, gd_backing: Backing
    ) -> None:
        data, error = hostile_tars()[case]
        outside = gd_backing.root / "outside-sentinel"
        outside.mkdir(exist_ok=True)
        before_outside = snapshot(outside)
        self.base_with(store, make_base)
        store.create("sibling", "base")
        self.fill(store, "sibling", lambda r: (r / "mine").write_text("keep"))
        want_sibling = self.snap(store, "sibling")
        want_base = self.snap(store, "base")
        store.create("target", "base")
        with pytest.raises(error):
            store.apply("target", io.BytesIO(data))
        assert store.exists("target")
        assert store.changes("target") == []
        assert self.snap(store, "target") == want_base
        assert self.snap(store, "base") == want_base
        assert self.snap(store, "sibling") == want_sibling
        assert snapshot(outside) == before_outside
        assert not Path("/abs-escape").exists() and not Path("/etc/escape").exists()
        assert not (gd_backing.root / "escape").exists()
        # the rolled-back layer takes a good tar afterwards
        good = _tar(_member("good", data=b"good"))
        assert store.apply_diff("target", io.BytesIO(good)) == 4

    def test_apply_refused_on_used_layer(self, store: LayerStore) -> None:
        good = _tar(_member("f", data=b"data"))
        self.base_with(store, make_base)
        store.create("child", "base")
        with pytest.raises(LayerInUse):
            store.apply_diff("base", io.BytesIO(good))
        store.create("mounted")
        store.get("mounted")
        with pytest.raises(LayerInUse):
            store.apply_diff("mounted", io.BytesIO(good))
        store.put("mounted")
        store.create("fresh")
        assert store.apply_diff("fresh", io.BytesIO(good)) == 4
        with pytest.raises(LayerInUse):
            store.apply_diff("fresh", io.BytesIO(good))
