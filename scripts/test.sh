#!/usr/bin/env bash
# Run the whole snapsync test suite on a fresh machine: install what the tests need,
# then build and run every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v qemu-img >/dev/null 2>&1 || need_apt+=(qemu-utils)
command -v qemu-storage-daemon >/dev/null 2>&1 || need_apt+=(qemu-utils)
command -v nbdkit >/dev/null 2>&1 || need_apt+=(nbdkit)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3 python3-pip)
# tests/cli_cow.rs makes btrfs and XFS file systems on loop devices (as root).
command -v mkfs.btrfs >/dev/null 2>&1 || need_apt+=(btrfs-progs)
command -v mkfs.xfs >/dev/null 2>&1 || need_apt+=(xfsprogs)
# tests/cli_daemon.rs checks the daemon's /metrics with Prometheus' own parser.
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
# tests/cli_web.rs loads the daemon's status page in headless Chromium (tests/web/page.py).
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "installing: ${need_apt[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

# The S3 tests need a real S3 server: moto, on loopback, for the whole run. (Tests run
# without this script start their own moto_server, or fail saying it is missing.)
MOTO_PIN='moto[server]==5.2.1'
# and tests/web/page.py drives Chromium with selenium.
SELENIUM_PIN='selenium==4.27.1'
if ! python3 -m pip install --quiet --disable-pip-version-check "$MOTO_PIN" "$SELENIUM_PIN" 2>/dev/null; then
    python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "$MOTO_PIN" "$SELENIUM_PIN"
fi
moto_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
moto_log=$(mktemp -t snapsync-moto.XXXXXX)
moto_server -H 127.0.0.1 -p "$moto_port" >"$moto_log" 2>&1 &
moto_pid=$!
trap 'kill "$moto_pid" 2>/dev/null || true; wait "$moto_pid" 2>/dev/null || true; rm -f "$moto_log"' EXIT
moto_ready=
for _ in $(seq 1 300); do
    if python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$moto_port/', timeout=1)" 2>/dev/null; then
        moto_ready=1; break
    fi
    if ! kill -0 "$moto_pid" 2>/dev/null; then
        echo "moto_server exited:"; cat "$moto_log"; exit 1
    fi
    sleep 0.2
done
[ -n "$moto_ready" ] || { echo "moto_server did not answer within 60 s:"; cat "$moto_log"; exit 1; }
echo "moto S3 server on 127.0.0.1:$moto_port"
export SNAPSYNC_TEST_S3_ENDPOINT="http://127.0.0.1:$moto_port"
export AWS_ENDPOINT_URL="$SNAPSYNC_TEST_S3_ENDPOINT" AWS_ALLOW_HTTP=true AWS_REGION=us-east-1
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing

# The binary caches block indexes between runs (SNAPSYNC_CACHE_DIR): the tests use one
# cache of their own, removed afterwards, so they exercise it without leaving it behind.
cache_dir=$(mktemp -d)
trap 'kill "$moto_pid" 2>/dev/null || true; wait "$moto_pid" 2>/dev/null || true; rm -f "$moto_log"; rm -rf "$cache_dir"' EXIT
export SNAPSYNC_CACHE_DIR="$cache_dir"

cargo --version
cargo test --workspace --all-targets --locked "$@"
