#!/usr/bin/env bash
# Incrementals of raw images on btrfs (issue 20): the diff from shared extents against
# hashing, b3sum and `btrfs send -p`, for one image with a few percent changed.
#
#   bash bench/cow.sh [SIZE_MiB=2048] [PCT=1] [WORK=/tmp/snapsync-cow]
#
# Needs root (a btrfs file system on a loop device under WORK, removed at the end) and
# btrfs-progs and b3sum (installed where missing). Builds nothing: uses
# $CARGO_TARGET_DIR/release/snapsync (run bench/run.sh or cargo build --release first),
# or $SNAPSYNC. Each timed run starts with the page cache dropped. What is timed:
#   extents  `snapsync replicate` of s2 onto s1 from a directory of btrfs snapshots
#   hash     the same from plain copies of the images (no shared extents, no hash cache)
#   b3sum    b3sum of both images (what hashing has to read, at b3sum's speed)
#   send     `btrfs send -p s1 s2 > /dev/null` (btrfs's own incremental stream)
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-2048}
pct=${2:-1}
work=${3:-/tmp/snapsync-cow}
bin="${SNAPSYNC:-${CARGO_TARGET_DIR:-$PWD/target}/release/snapsync}"
[ -x "$bin" ] || { echo "no $bin: build it first" >&2; exit 1; }
bin=$(realpath "$bin")
[ "$(id -u)" = 0 ] || { echo "bench/cow.sh mounts a loop device: run it as root" >&2; exit 1; }
need_apt=()
command -v mkfs.btrfs >/dev/null 2>&1 || need_apt+=(btrfs-progs)
command -v b3sum >/dev/null 2>&1 || need_apt+=(b3sum)
if [ ${#need_apt[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

rm -rf "$work"; mkdir -p "$work/mnt"
truncate -s $((size_mib * 5 + 1024))M "$work/fs.img"
mkfs.btrfs -q "$work/fs.img" 2>/dev/null
loop=$(losetup -f --show "$work/fs.img")
cleanup() { cd /; umount "$work/mnt" 2>/dev/null || umount -l "$work/mnt"; losetup -d "$loop"; rm -rf "$work"; }
trap cleanup EXIT
mount "$loop" "$work/mnt"
cd "$work/mnt"

btrfs -q subvolume create live
mkdir snaps plain plain/vm
head -c "${size_mib}M" /dev/urandom > live/vm.img
btrfs -q subvolume snapshot -r live snaps/s1
python3 - "$size_mib" "$pct" <<'PY'
import os, random, sys
size, pct = int(sys.argv[1]) << 20, float(sys.argv[2])
f = os.open("live/vm.img", os.O_RDWR); r = random.Random(1)
for _ in range(max(1, int(size * pct / 100 / 102400))):   # scattered 100 KiB writes
    os.pwrite(f, os.urandom(102400), r.randint(0, (size - 102400) // 4096) * 4096)
os.fsync(f)
PY
btrfs -q subvolume snapshot -r live snaps/s2
cp --reflink=never snaps/s1/vm.img plain/vm/s1.img
cp --reflink=never snaps/s2/vm.img plain/vm/s2.img
touch -d '-2 hours' plain/vm/s1.img; touch -d '-1 hours' plain/vm/s2.img
sync

drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
# Seconds taken by a command, page cache dropped first; its output goes to $2.
timed() {
    local out=$1; shift
    drop
    local t0 t1; t0=$(date +%s.%N)
    "$@" > "$out"
    t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc -l
}
"$bin" init "$work/repo-x" >/dev/null
"$bin" init "$work/repo-h" >/dev/null
"$bin" replicate "raw:snaps?layout=by-snapshot" "$work/repo-x" --snapshot s1 >/dev/null
"$bin" replicate raw:plain "$work/repo-h" --snapshot s1 >/dev/null
rm -rf plain/.snapsync/hashes   # hashing from scratch, as without a cache
t_ext=$(timed "$work/ext.json" "$bin" replicate "raw:snaps?layout=by-snapshot" "$work/repo-x" --snapshot s2 --json)
t_hash=$(timed "$work/hash.json" "$bin" replicate raw:plain "$work/repo-h" --snapshot s2 --json)
t_b3=$(timed /dev/null b3sum snaps/s1/vm.img snaps/s2/vm.img)
t_send=$(timed /dev/null btrfs -q send -p snaps/s1 snaps/s2 -f /dev/null)

echo "== ${size_mib} MiB image, ${pct}% changed in 100 KiB writes, btrfs, cache dropped"
echo "extents: $(cat "$work/ext.json")"
echo "hash:    $(cat "$work/hash.json")"
printf '%-28s %8.3f s\n' "snapsync, extents" "$t_ext" "snapsync, hashing" "$t_hash" \
    "b3sum of both images" "$t_b3" "btrfs send -p > /dev/null" "$t_send"
printf 'hashing / extents: %.1fx   b3sum / extents: %.1fx   send / extents: %.2fx\n' \
    "$(echo "$t_hash / $t_ext" | bc -l)" "$(echo "$t_b3 / $t_ext" | bc -l)" \
    "$(echo "$t_send / $t_ext" | bc -l)"
