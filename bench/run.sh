#!/usr/bin/env bash
# snapsync side by side with rsync, restic, borg and qemu-img (issue 7).
#
#   bash bench/run.sh --size 2GiB            # the real run; rewrites docs/BENCHMARKS.md
#   bash bench/run.sh --size 256MiB --mem-sizes 256MiB,512MiB --chain-depth 20   # quick
#   bash bench/run.sh --help                 # every option
#   bash bench/run.sh --scale                # memory and metadata at 4 M and 16 M blocks
#                                            # beside the previous release and restic
#                                            # (bench/scale.py; --help there)
#
# Installs the tools it compares against (Debian packages) where missing, builds snapsync
# in release mode (honours CARGO_TARGET_DIR), then runs bench/bench.py. Generated data goes
# under --work (default /tmp/snapsync-bench): a 2 GiB run needs about 12 GiB free there,
# the 8 GiB memory-scaling image about 17 GiB more. Drops the page cache before every
# timed run when permitted (root), else warms every input identically.
set -euo pipefail
cd "$(dirname "$0")/.."
for a in "$@"; do
    case "$a" in -h|--help) exec python3 bench/bench.py --snapsync /dev/null --help ;; esac
done

need_apt=()
command -v rsync >/dev/null 2>&1 || need_apt+=(rsync)
command -v restic >/dev/null 2>&1 || need_apt+=(restic)
command -v borg >/dev/null 2>&1 || need_apt+=(borgbackup)
command -v b3sum >/dev/null 2>&1 || need_apt+=(b3sum)
command -v qemu-img >/dev/null 2>&1 || need_apt+=(qemu-utils)
command -v qemu-io >/dev/null 2>&1 || need_apt+=(qemu-utils)
[ -x /usr/bin/time ] || need_apt+=(time)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "installing: ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(printf '%s\n' "${need_apt[@]}" | sort -u)
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
echo "building snapsync (release) in $CARGO_TARGET_DIR"
cargo build --release --bin snapsync
for a in "$@"; do
    if [ "$a" = --scale ]; then
        exec python3 bench/scale.py --snapsync "$CARGO_TARGET_DIR/release/snapsync" "$@"
    fi
done
exec python3 bench/bench.py --snapsync "$CARGO_TARGET_DIR/release/snapsync" "$@"
