#!/bin/bash
# Is `thin_delta` + a block->file map faster than the walk, for 3 changed files on minbase?
# (issue #15 item 3, devmapper; the result is bench/results/2026-11-30-devmapper-thin-delta.md)
#
#   vm/run --timeout 1200 --memory 3G --share /var/tmp/graphdriver-bench -- \
#       bash drivers/btrfs/scripts/measure_thin_delta.sh
#
# In the guest: a thin pool on loop devices, thin 0 = ext4 (devmapper's default dm.fs) holding
# minbase, thin 1 = a snapshot of it with bench_all's 3-file change. Times, each 3 times: the
# walk (graphdriver.archive.tree_changes of the two mounted trees), then the parts of the
# block-map way: reserve a metadata snapshot + thin_delta + release, debugfs icheck (blocks ->
# inodes), debugfs ncheck (inodes -> names).
set -euo pipefail
export DM_DISABLE_UDEV=1
TIMEFORMAT="%R s wall, %U s user, %S s sys"
PY=${PY:-$PWD/.venv/bin/python}
TAR=/var/tmp/graphdriver-bench/debian-minbase.tar
if [ ! -e "$TAR" ]; then
    # vm/run mounts a --share after the guest's fresh /var/tmp hid its mountpoint: mount it here
    mkdir -p "${TAR%/*}"
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 share0 "${TAR%/*}"
fi
W=$(mktemp -d /var/tmp/gd-thin.XXXXXX)
D="" M=""
cleanup() {
    set +e
    umount "$W/child" "$W/base" 2>/dev/null
    for dev in gdthin1 gdthin0 gdpool; do dmsetup remove "$dev" 2>/dev/null; done
    [ -n "$D" ] && losetup -d "$D"
    [ -n "$M" ] && losetup -d "$M"
    rm -rf "$W"
}
trap cleanup EXIT
truncate -s 2G "$W/data"
truncate -s 64M "$W/meta"
D=$(losetup -f --show "$W/data")
M=$(losetup -f --show "$W/meta")
dd if=/dev/zero of="$M" bs=4096 count=1 conv=notrunc status=none
# 64 KiB pool blocks (128 sectors), as devmapper's default
dmsetup create gdpool --table "0 $((4 * 1024 * 1024)) thin-pool $M $D 128 32768 1 skip_block_zeroing"
dmsetup message gdpool 0 "create_thin 0"
dmsetup create gdthin0 --table "0 $((2 * 1024 * 1024)) thin /dev/mapper/gdpool 0"
mkfs.ext4 -q -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 /dev/mapper/gdthin0
mkdir "$W/base" "$W/child"
mount /dev/mapper/gdthin0 "$W/base"
tar -C "$W/base" -xf "$TAR"
umount "$W/base"
dmsetup suspend gdthin0
dmsetup message gdpool 0 "create_snap 1 0"
dmsetup resume gdthin0
dmsetup create gdthin1 --table "0 $((2 * 1024 * 1024)) thin /dev/mapper/gdpool 1"
mount -o ro /dev/mapper/gdthin0 "$W/base"
mount /dev/mapper/gdthin1 "$W/child"
echo changed > "$W/child/etc/hostname"
head -c 4096 /dev/zero | tr '\0' n > "$W/child/new-file"
rm "$W/child/etc/motd"
sync
echo "== files in minbase: $(find "$W/base" | wc -l)"
echo "== the walk (tree_changes of both mounted trees), 3 runs"
for _ in 1 2 3; do
    "$PY" - "$W/child" "$W/base" <<'PYEOF'
import sys, time
from graphdriver.archive import tree_changes
t, c = time.perf_counter(), time.process_time()
found = tree_changes(sys.argv[1], sys.argv[2])
print(f"walk: {len(found)} changes, {time.perf_counter() - t:.3f} s wall, "
      f"{time.process_time() - c:.3f} s cpu: {[(x.path, x.kind.letter) for x in found]}")
PYEOF
done
echo "== python -c pass (the interpreter's own start, for scale)"
time "$PY" -c pass
echo "== reserve_metadata_snap + thin_delta + release_metadata_snap, 3 runs"
for _ in 1 2 3; do
    time {
        dmsetup message gdpool 0 reserve_metadata_snap
        thin_delta --metadata-snap --snap1 0 --snap2 1 "$M" > "$W/delta.xml"
        dmsetup message gdpool 0 release_metadata_snap
    }
done
grep -v "same" "$W/delta.xml" | head -20
# pool blocks of 64 KiB -> ext4 blocks of 4 KiB: 16 each
blocks=$("$PY" - "$W/delta.xml" <<'PYEOF'
import re, sys
out = []
for kind, begin, length in re.findall(r'<(different|right_only|left_only) begin="(\d+)" length="(\d+)"', open(sys.argv[1]).read()):
    for b in range(int(begin), int(begin) + int(length)):
        out.extend(range(b * 16, b * 16 + 16))
print(" ".join(map(str, out)))
PYEOF
)
echo "== changed pool blocks x16 = $(echo "$blocks" | wc -w) ext4 blocks"
echo "== debugfs icheck (ext4 blocks -> inodes), 3 runs"
for _ in 1 2 3; do
    time debugfs -R "icheck $blocks" /dev/mapper/gdthin1 > "$W/icheck.txt" 2>/dev/null
done
inodes=$(awk 'NR > 1 && $2 ~ /^[0-9]+$/ {print $2}' "$W/icheck.txt" | sort -un | tr '\n' ' ')
echo "inodes on them: $(echo "$inodes" | wc -w); blocks with no inode: $(grep -c 'not found' "$W/icheck.txt" || true)"
echo "== debugfs ncheck (inodes -> names), 3 runs"
for _ in 1 2 3; do
    time debugfs -R "ncheck $inodes" /dev/mapper/gdthin1 > "$W/ncheck.txt" 2>/dev/null
done
head -30 "$W/ncheck.txt"
echo "== ext4 inode-table blocks in the changed set (owned by no inode; which inodes they hold needs the group descriptors)"
dumpe2fs /dev/mapper/gdthin1 2>/dev/null | grep -c "Inode table at" || true
