#!/usr/bin/env bash
# Incrementals of raw images on btrfs (issue 20): the diff from shared extents against
# `btrfs send -p` of the same change, hashing and b3sum, for one image with a few
# percent changed.
#
#   bash bench/cow.sh [SIZE_MiB=2048] [PCT=1] [WORK=/tmp/snapsync-cow]
#
# Environment: REPS (default 5) runs of each timed command, median reported;
# BEFORE=<another snapsync binary> to time it too, in the same runs (same change, same
# repository state, the order of the three commands rotating), for before/after;
# DATA=random (default) or compressible for the image's content; HASH=auto (default:
# only when the disk has room for two plain copies), 1 or 0; BLOCK_SIZE=<bytes> for the
# repository's block size (default: snapsync's, 64 KiB); SMALL_BLOCKS=<bytes> (default
# 4096, 0 for none) for a second repository with that block size, timed in the same
# runs (`--block-size 4096` is the file systems' own extent unit: the change is read
# and stored with no unchanged remainder of a 64 KiB block); LOOP_DIRECT_IO=1 to attach
# the loop device with --direct-io=on (requests reach the disk in parallel, closer to
# a real device: there the 64 KiB floor from 8 threads was 0.048 s against 0.065 s
# from one, where without it both take the same).
#
# Needs root (a btrfs file system on a loop device under WORK, removed at the end) and
# btrfs-progs and b3sum (installed where missing). Builds nothing: uses
# $CARGO_TARGET_DIR/release/snapsync (run bench/run.sh or cargo build --release first),
# or $SNAPSYNC.
#
# The image: /dev/urandom, or with DATA=compressible 64 KiB blocks that all differ
# (their first 8 bytes are their number) and are otherwise a pattern, so that the
# repository holding the first snapshot stays small (for a small disk). The change is random data either way: PCT% of the image in scattered
# 100 KiB writes, on a writable snapshot of s1, made read-only as the next snapshot.
#
# Each repetition starts from the same state: the repository (and its block-index
# cache) as it was after s1 was replicated (hard-linked copies: objects are never
# written in place), and a new change (another seed) snapshotted
# next to s1; the order of the two commands alternates; the page cache is dropped
# before each. What is timed:
#   extents  `snapsync replicate` of the change onto s1 from the directory of btrfs
#            snapshots (`raw:DIR?layout=by-snapshot`), committed durably; and the same
#            into the SMALL_BLOCKS repository
#   send     `btrfs send -p s1 <change> -f /dev/null` (btrfs's own incremental stream,
#            written nowhere)
#   floor    reading, with pread at queue depth 1 and nothing else, the 64 KiB blocks
#            that hold the change (what snapsync reads) and, separately, only the
#            changed 4 KiB pages (the least any incremental must read), then the 64 KiB
#            blocks again from 8 threads (queue depth up to 8); timed inside
#            one Python process after it dropped the page cache, so no start-up is
#            counted: the time below which reading alone cannot go on this disk
# and once each:
#   hash     the same replicate from plain copies of the images (no shared extents, no
#            hash cache)
#   b3sum    b3sum of both images (what hashing has to read, at b3sum's speed)
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-2048}
pct=${2:-1}
work=${3:-/tmp/snapsync-cow}
reps=${REPS:-5}
data=${DATA:-random}
hash=${HASH:-auto}
small=${SMALL_BLOCKS:-4096}
bin="${SNAPSYNC:-${CARGO_TARGET_DIR:-$PWD/target}/release/snapsync}"
[ -x "$bin" ] || { echo "no $bin: build it first" >&2; exit 1; }
bin=$(realpath "$bin")
[ "$(id -u)" = 0 ] || { echo "bench/cow.sh mounts a loop device: run it as root" >&2; exit 1; }
case $data in compressible|random) ;; *) echo "DATA must be compressible or random" >&2; exit 1;; esac
need_apt=()
command -v mkfs.btrfs >/dev/null 2>&1 || need_apt+=(btrfs-progs)
command -v b3sum >/dev/null 2>&1 || need_apt+=(b3sum)
if [ ${#need_apt[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

rm -rf "$work"; mkdir -p "$work/mnt"
free_mib=$(( $(df -Pk "$work" | awk 'NR==2 {print $4}') / 1024 ))
if [ "$hash" = auto ]; then
    # Two plain copies on the loop file system besides the rest.
    copies=$([ "$data" = random ] && echo 6 || echo 4)
    need=$(( size_mib * copies + 1024 ))
    hash=$([ "$free_mib" -gt "$need" ] && echo 1 || echo 0)
fi
truncate -s $((size_mib * 4 + 2048))M "$work/fs.img"
mkfs.btrfs -q "$work/fs.img" >/dev/null 2>&1
loop=$(losetup -f --show ${LOOP_DIRECT_IO:+--direct-io=on} "$work/fs.img")
cleanup() { cd /; umount "$work/mnt" 2>/dev/null || umount -l "$work/mnt"; losetup -d "$loop"; rm -rf "$work"; }
trap cleanup EXIT
mount "$loop" "$work/mnt"
cd "$work/mnt"

btrfs -q subvolume create live
mkdir snaps
python3 - "$size_mib" "$data" <<'PY'
import os, sys
size, data = int(sys.argv[1]) << 20, sys.argv[2]
blk, pat = 65536, bytes(range(256)) * 256
with open("live/vm.img", "wb") as f:
    for start in range(0, size, 64 << 20):
        n = min(64 << 20, size - start)
        if data == "random":
            f.write(os.urandom(n))
            continue
        buf = bytearray(pat * (n // blk))
        for k in range(n // blk):
            buf[k * blk:k * blk + 8] = ((start // blk) + k).to_bytes(8, "little")
        f.write(buf)
    os.fsync(f.fileno())
PY
btrfs -q subvolume snapshot -r live snaps/s1
btrfs -q subvolume delete live >/dev/null
sync

# change SEED NAME: PCT% of s1 rewritten in scattered 100 KiB writes, as snapshot NAME.
change() {
    btrfs -q subvolume snapshot snaps/s1 "w-$2" >/dev/null
    python3 - "$size_mib" "$pct" "$1" "w-$2/vm.img" <<'PY'
import os, random, sys
size, pct, seed, path = int(sys.argv[1]) << 20, float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
f = os.open(path, os.O_RDWR); r = random.Random(seed)
for _ in range(max(1, int(size * pct / 100 / 102400))):
    os.pwrite(f, os.urandom(102400), r.randint(0, (size - 102400) // 4096) * 4096)
os.fsync(f)
PY
    btrfs -q subvolume snapshot -r "w-$2" "snaps/$2" >/dev/null
    btrfs -q subvolume delete "w-$2" >/dev/null
    sync
}

drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
# Seconds taken by a command, page cache dropped first; its output goes to $1.
timed() {
    local out=$1; shift
    drop
    local t0 t1; t0=$(date +%s.%N)
    "$@" > "$out"
    t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc -l
}
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

export SNAPSYNC_CACHE_DIR="$work/cache"
"$bin" init "$work/repo-s1" ${BLOCK_SIZE:+--block-size "$BLOCK_SIZE"} >/dev/null
"$bin" replicate "raw:snaps?layout=by-snapshot" "$work/repo-s1" --snapshot s1 >/dev/null
mv "$work/cache" "$work/cache-s1"
if [ "$small" != 0 ]; then
    "$bin" init "$work/repo-small-s1" --block-size "$small" >/dev/null
    "$bin" replicate "raw:snaps?layout=by-snapshot" "$work/repo-small-s1" --snapshot s1 >/dev/null
    mv "$work/cache" "$work/cache-small-s1"
fi

before=${BEFORE:+$(realpath "$BEFORE")}
ext=(); small_ext=(); send=(); old=(); floor64=(); floor4=(); floor64q8=()
# floor RANGES_JSON: seconds to read the 64 KiB blocks, then the 4 KiB pages, of a diff.
floor() {
    python3 - "$1" "snaps/$snap/vm.img" <<'PY'
import json, os, sys, time
d = json.load(open(sys.argv[1])); f = os.open(sys.argv[2], os.O_RDONLY)
def aligned(unit):
    out = []
    for off, n in d["extents"]:
        a, b = off // unit * unit, -(-(off + n) // unit) * unit
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out
def read(ranges):
    for a, b in ranges:
        while a < b:
            a += len(os.pread(f, min(b - a, 8 << 20), a))
for unit, depth in ((65536, 1), (4096, 1), (65536, 8)):
    ranges = aligned(unit)
    os.sync(); open("/proc/sys/vm/drop_caches", "w").write("3")
    t = time.monotonic()
    if depth == 1:
        read(ranges)
    else:  # `depth` threads, each reading every depth-th range (pread drops the GIL)
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(depth) as pool:
            list(pool.map(read, [ranges[k::depth] for k in range(depth)]))
    print(f"{time.monotonic() - t:.4f}", end=" ")
PY
}
for k in $(seq 1 "$reps"); do
    snap="c$k"
    change "$k" "$snap"
    # The repository and its index cache as they were after s1: each run does the same.
    fresh_repo() {  # fresh_repo [-small]
        rm -rf "$work/repo" "$work/cache"
        cp -al "$work/repo$1-s1" "$work/repo"; cp -al "$work/cache$1-s1" "$work/cache"
    }
    replicate() {  # replicate BIN OUT [-small]: seconds
        fresh_repo "${3:-}"
        timed "$2" "$1" replicate "raw:snaps?layout=by-snapshot" "$work/repo" --snapshot "$snap" --json
    }
    run_ext() { t_ext=$(replicate "$bin" "$work/ext.json"); }
    run_small() { [ "$small" = 0 ] || t_small=$(replicate "$bin" "$work/small.json" -small); }
    run_send() { t_send=$(timed /dev/null btrfs -q send -p snaps/s1 "snaps/$snap" -f /dev/null); }
    run_old() { [ -z "$before" ] || t_old=$(replicate "$before" "$work/old.json"); }
    case $((k % 3)) in
        1) run_ext; run_small; run_send; run_old ;;
        2) run_send; run_old; run_small; run_ext ;;
        0) run_old; run_ext; run_send; run_small ;;
    esac
    grep -q '"diff_method":"extents"' "$work/ext.json" || { echo "not diffed from extents: $(cat "$work/ext.json")" >&2; exit 1; }
    "$bin" diff "raw:snaps?layout=by-snapshot" "vm@$snap" --base s1 --json > "$work/diff.json"
    read -r t_f64 t_f4 t_f64q8 <<< "$(floor "$work/diff.json")"
    floor64+=("$t_f64"); floor4+=("$t_f4"); floor64q8+=("$t_f64q8")
    printf 'run %d: extents %.3f s, send %.3f s, floor %.3f s (64 KiB) %.3f s (4 KiB) %.3f s (64 KiB, 8 threads)' \
        "$k" "$t_ext" "$t_send" "$t_f64" "$t_f4" "$t_f64q8"
    [ "$small" = 0 ] || printf ', extents at %s-byte blocks %.3f s' "$small" "$t_small"
    [ -z "$before" ] || printf ', before %.3f s' "$t_old"
    printf '   %s\n' "$(cat "$work/ext.json")"
    ext+=("$t_ext"); send+=("$t_send"); [ "$small" = 0 ] || small_ext+=("$t_small"); [ -z "$before" ] || old+=("$t_old")
    [ "$k" = "$reps" ] || btrfs -q subvolume delete "snaps/$snap" >/dev/null
done
t_ext=$(median "${ext[@]}"); t_send=$(median "${send[@]}")
t_b3=$(timed /dev/null b3sum snaps/s1/vm.img "snaps/$snap/vm.img")

echo "== ${size_mib} MiB image ($data), block size ${BLOCK_SIZE:-default}, ${pct}% changed in 100 KiB writes, btrfs, cache dropped, median of $reps"
printf '%-28s %8.3f s   (%s)\n' "snapsync, extents" "$t_ext" "$(printf '%s ' "${ext[@]}")" \
    "btrfs send -p > /dev/null" "$t_send" "$(printf '%s ' "${send[@]}")"
printf '%-28s %8.3f s   (%s)\n' "floor: read 64 KiB blocks" "$(median "${floor64[@]}")" "$(printf '%s ' "${floor64[@]}")" \
    "floor: read 4 KiB pages" "$(median "${floor4[@]}")" "$(printf '%s ' "${floor4[@]}")" \
    "floor: 64 KiB, 8 threads" "$(median "${floor64q8[@]}")" "$(printf '%s ' "${floor64q8[@]}")"
[ "$small" = 0 ] || printf '%-28s %8.3f s   (%s)\n' "snapsync, extents, $small B" "$(median "${small_ext[@]}")" "$(printf '%s ' "${small_ext[@]}")"
[ -z "$before" ] || printf '%-28s %8.3f s   (%s)\n' "BEFORE, extents" "$(median "${old[@]}")" "$(printf '%s ' "${old[@]}")"
printf '%-28s %8.3f s\n' "b3sum of both images" "$t_b3"
if [ "$hash" = 1 ]; then
    # Volume vmh in another copy of the repository after s1: its s1 is all
    # duplicates, and the last change's blocks are new to it.
    mkdir -p plain/vmh
    cp --reflink=never snaps/s1/vm.img plain/vmh/s1.img
    cp --reflink=never "snaps/$snap/vm.img" plain/vmh/s2.img
    touch -d '-2 hours' plain/vmh/s1.img; touch -d '-1 hours' plain/vmh/s2.img
    sync
    rm -rf "$work/cache"; cp -al "$work/repo-s1" "$work/repo-h"; cp -al "$work/cache-s1" "$work/cache"
    "$bin" replicate raw:plain "$work/repo-h" --snapshot s1 >/dev/null
    rm -rf plain/.snapsync/hashes   # hashing from scratch, as without a cache
    t_hash=$(timed "$work/hash.json" "$bin" replicate raw:plain "$work/repo-h" --snapshot s2 --json)
    printf '%-28s %8.3f s   %s\n' "snapsync, hashing" "$t_hash" "$(cat "$work/hash.json")"
    printf 'hashing / extents: %.1fx   ' "$(echo "$t_hash / $t_ext" | bc -l)"
else
    echo "snapsync, hashing: skipped (HASH=0, or no room for two plain copies: ${free_mib} MiB free)"
fi
printf 'b3sum / extents: %.1fx   send / extents: %.2fx' \
    "$(echo "$t_b3 / $t_ext" | bc -l)" "$(echo "$t_send / $t_ext" | bc -l)"
[ "$small" = 0 ] || printf '   send / extents at %s-byte blocks: %.2fx' "$small" \
    "$(echo "$t_send / $(median "${small_ext[@]}")" | bc -l)"
echo
