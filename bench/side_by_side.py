"""Helpers the side-by-side benchmark scripts share."""

import os
import subprocess
import time
from pathlib import Path


def parse_size(s: str) -> int:
    """A size with an optional K/M/G (or KiB/MiB/GiB) suffix, in bytes."""
    units = {"": 1, "K": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MIB": 1 << 20,
             "G": 1 << 30, "GIB": 1 << 30}
    s = s.strip().upper()
    num = "".join(c for c in s if c.isdigit())
    return int(num) * units[s[len(num):]]


def drop_caches() -> None:
    """Drop the page cache when permitted (root), so a timed run reads from disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def timed(cmd, **kw):
    """Run `cmd` with the page cache dropped first; (seconds, stdout)."""
    drop_caches()
    t = time.monotonic()
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, **kw)
    return time.monotonic() - t, out.stdout
