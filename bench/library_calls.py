"""The library figures: Python scripts run in one fresh process each (``bench_core.in_process``,
bench/ on their path), timing the calls inside it, so that Python's start-up is not in them.
Each prints one JSON object of lists of seconds."""

from __future__ import annotations

#: changes() and write_diff() of a small change, after one untimed call of each (imports)
SMALL_CHANGE = """
import json, sys
from figures import timed_calls
from graphdriver import open_store
store, driver, layer, out, runs = sys.argv[1:6]
s = open_store(store, driver)
def diff():
    with open(out, "wb") as f:
        s.write_diff(layer, f)
s.changes(layer); diff()
got = timed_calls({"changes": lambda: s.changes(layer), "diff": diff}, int(runs))
s.close()
print(json.dumps(got))
"""

#: changes() of a layer beside the tree compare of its mounted tree against its parent's (what
#: the store does where a driver lists no changes of its own, there with the layer's ctime
#: boundary, which spares it the content compare of a copied file: only for drivers whose
#: snapshots share inodes), the two held to the same list
CHANGES_VS_WALK = """
import json, sys
from figures import timed_calls
from graphdriver import open_store
from graphdriver.archive import tree_changes
store, driver, layer, parent, runs = sys.argv[1:6]
s = open_store(store, driver)
with s.mounted(layer) as top, s.mounted(parent) as below:
    def walk():
        return tree_changes(str(top), str(below))
    assert s.changes(layer) == walk(), "changes() and the walk disagree"
    got = timed_calls({"changes": lambda: s.changes(layer), "walk": walk}, int(runs))
s.close()
print(json.dumps(got))
"""

#: get + put of an overlay container layer beside mount(2) + umount2(2) of its directories
MOUNT = """
import json, sys
from figures import timed_calls
from graphdriver import open_store
from graphdriver.linux.mount import mount, unmount
store, layer, runs, opts, target = sys.argv[1:6]
s = open_store(store, "overlay")
s.get(layer); s.put(layer)  # warm: the first call opens the database and loads the driver
def raw():
    mount("overlay", target, "overlay", 0, opts); unmount(target)
got = timed_calls({"lib": lambda: (s.get(layer), s.put(layer)), "raw": raw}, int(runs))
s.close()
print(json.dumps(got))
"""

#: a 1 MiB read at the bottom of a deep chain, through the top's mount and in the bottom layer
DEEP_READ = """
import io, json, os, sys, tarfile, time
from graphdriver import open_store
store, driver, depth, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = open_store(store, driver)
def tar(name, size):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo(name); info.size = size
        tf.addfile(info, io.BytesIO(os.urandom(size)))
    buf.seek(0)
    return buf
parent = None
for i in range(depth):
    s.create(f"deep{i}", parent)
    s.apply(f"deep{i}", tar("bottom.bin" if i == 0 else f"f{i}", 1 << 20 if i == 0 else 16))
    parent = f"deep{i}"
deep, direct, mnt = [], [], []
def read(path):
    t = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass
    return time.perf_counter() - t
for _ in range(runs):
    bottom = s.get("deep0")
    direct.append(read(os.path.join(bottom, "bottom.bin")))
    s.put("deep0")
    t = time.perf_counter(); top = s.get(parent); mnt.append(time.perf_counter() - t)
    deep.append(read(os.path.join(top, "bottom.bin")))
    t = time.perf_counter(); s.put(parent); mnt[-1] += time.perf_counter() - t
for i in reversed(range(depth)):
    s.remove(f"deep{i}")
s.close()
print(json.dumps({"deep": deep, "direct": direct, "mount": mnt}))
"""

#: the bytes of a layer's exact-diff record (what `graphdriver inspect` shows)
RECORD_SIZE = """
import sys
from graphdriver import open_store
s = open_store(sys.argv[1], sys.argv[2])
print(s.metadata(sys.argv[3])["exact_diff_record"])
s.close()
"""

#: make ("create") or remove ("remove") N empty layers named many-0..many-N-1, in chains of 50
MANY_LAYERS = """
import sys
from graphdriver import open_store
s = open_store(sys.argv[1], sys.argv[2])
op, n = sys.argv[3], int(sys.argv[4])
names = [f"many-{i}" for i in range(n)]
if op == "create":
    for i, name in enumerate(names):
        s.create(name, names[i - 1] if i % 50 else None)
else:
    for name in reversed(names):
        s.remove(name)
s.close()
"""
