#!/usr/bin/env bash
# Run the whole snapsync test suite on a fresh machine: install what the tests need,
# then build and run every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v qemu-img >/dev/null 2>&1 || need_apt+=(qemu-utils)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "installing: ${need_apt[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

cargo --version
cargo test --workspace --all-targets --locked "$@"
