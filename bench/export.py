#!/usr/bin/env python3
"""The NBD export (instant restore) side by side with `snapsync restore` (issue 16).

    python3 bench/export.py --snapsync target/release/snapsync --size 2GiB

One run, on the same data: a repository holding one snapshot of an incompressible
image with a zero region, then
  - `snapsync restore` of it to a file (the baseline),
  - `qemu-img convert` of the export to a file (sequential read through NBD),
  - random 4 KiB reads through the export with qemu-io (reads per second),
printing times, throughput ratios and the export's peak RSS (VmHWM). The page cache is
dropped before each timed run when permitted (root). Other load on the machine is shown
(loadavg) so that ratios from shared cores can be judged.
"""

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from side_by_side import parse_size, timed


def vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--snapsync", required=True)
    ap.add_argument("--size", type=parse_size, default=parse_size("2GiB"))
    ap.add_argument("--random-reads", type=int, default=2000)
    ap.add_argument("--block-size", type=int, default=65536,
                    help="the repository's block size (512 simulates a volume 128x larger)")
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="snapsync-export-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    s = a.snapsync
    try:
        img = work / "images" / "vm" / "s1.img"
        img.parent.mkdir(parents=True, exist_ok=True)
        with open(img, "wb") as f:
            left = a.size
            while left:
                n = min(left, 16 << 20)
                f.write(os.urandom(n))
                left -= n
            # A zero region of an eighth of the image: holes the export reports.
            f.seek(a.size // 2)
            f.write(b"\0" * (a.size // 8))
        repo = work / "repo"
        subprocess.run([s, "init", str(repo), "--block-size", str(a.block_size)], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run([s, "replicate", f"raw:{work / 'images'}", str(repo)], check=True,
                       stdout=subprocess.DEVNULL)

        restore_t, _ = timed([s, "restore", str(repo), "vm@s1", str(work / "restored.raw")])

        sock = work / "nbd.sock"
        export = subprocess.Popen([s, "export", str(repo), "vm@s1", "--listen", f"unix:{sock}"],
                                  stdout=subprocess.PIPE, text=True)
        export.stdout.readline()
        url = f"nbd+unix:///vm@s1?socket={sock}"
        convert_t, _ = timed(["qemu-img", "convert", "-f", "raw", "-O", "raw", url,
                           str(work / "converted.raw")])
        same = subprocess.run(["cmp", "-s", str(work / "restored.raw"),
                               str(work / "converted.raw")]).returncode == 0

        rng = random.Random(7)
        blocks = a.size // 4096
        cmds = []
        for _ in range(a.random_reads):
            cmds += ["-c", f"read {rng.randrange(blocks) * 4096} 4096"]
        rand_t, _ = timed(["qemu-io", "-r", "-f", "raw", *cmds, url])
        hwm = vm_hwm(export.pid)
        export.terminate()
        export.wait(timeout=30)

        mib = a.size / (1 << 20)
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()}")
        print(f"image {mib:.0f} MiB (1/8 zero), repository on {work}")
        print(f"snapsync restore            {restore_t:7.2f} s  {mib / restore_t:7.1f} MiB/s")
        print(f"qemu-img convert via export {convert_t:7.2f} s  {mib / convert_t:7.1f} MiB/s"
              f"  = {restore_t / convert_t:.2f}x restore's throughput"
              f"  (identical: {same})")
        print(f"random 4 KiB reads          {a.random_reads / rand_t:7.0f} reads/s"
              f" ({a.random_reads} reads with qemu-io)")
        print(f"export peak RSS             {hwm / (1 << 20):7.1f} MiB")
        sys.exit(0 if same else 1)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
