#!/usr/bin/env bash
# Profile snapsync's full and incremental replication of a raw image (issue 7).
#
#   bash bench/profile.sh [SIZE_MiB=1024] [WORK=/tmp/snapsync-profile]
#
# Uses `perf record` (software cpu-clock when the VM has no hardware counters) and prints
# the top symbols and the per-thread split; falls back to valgrind --tool=callgrind when
# perf cannot record. Builds nothing: uses $CARGO_TARGET_DIR/release/snapsync (run
# bench/run.sh or cargo build --release first). The release profile keeps debug symbols.
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-1024}
work=${2:-/tmp/snapsync-profile}
bin="${CARGO_TARGET_DIR:-$PWD/target}/release/snapsync"
[ -x "$bin" ] || { echo "no $bin: build it first" >&2; exit 1; }
rm -rf "$work"; mkdir -p "$work/src/vm"; cd "$work"
head -c "${size_mib}M" /dev/urandom > src/vm/s1.img
cp src/vm/s1.img src/vm/s2.img
python3 - "$size_mib" <<'PY'
import os, random, sys
size = int(sys.argv[1]) << 20
f = os.open("src/vm/s2.img", os.O_RDWR); r = random.Random(1)
for _ in range(max(1, size // 100 // 102400)):   # 1% in scattered 100 KiB writes
    os.pwrite(f, os.urandom(102400), r.randint(0, (size - 102400) // 4096) * 4096)
PY
touch -d '-2 hours' src/vm/s1.img; touch -d '-1 hours' src/vm/s2.img
"$bin" init repo >/dev/null
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || cat src/vm/*.img > /dev/null; }
if perf record -o /dev/null -- true >/dev/null 2>&1; then
    for snap in s1 s2; do
        drop
        perf record -q -F 999 -g -o "$snap.data" -- "$bin" replicate raw:src repo --volume vm --snapshot "$snap" --json
        echo "== $snap ($( [ $snap = s1 ] && echo full || echo incremental )): top symbols"
        perf report -i "$snap.data" --no-children --sort symbol --stdio -g none 2>/dev/null | grep '%' | head -15
        echo "== $snap: samples per thread and its top symbol"
        perf script -i "$snap.data" -G -F tid,ip,sym 2>/dev/null | awk '{c[$1" "$3]++} END {for (k in c) print c[k], k}' | sort -rn | head -15
    done
else
    for snap in s1 s2; do
        drop
        valgrind --tool=callgrind --callgrind-out-file="$snap.callgrind" "$bin" replicate raw:src repo --volume vm --snapshot "$snap" --json
        callgrind_annotate "$snap.callgrind" 2>/dev/null | head -30
    done
fi
echo "profiles in $work"
