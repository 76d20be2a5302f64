#!/usr/bin/env python3
"""A running VM's disk (issue 15): snapsync's incremental from its dirty bitmaps beside
reading the whole disk, on the same data in one run.

    python3 bench/qemu.py --snapsync target/release/snapsync --size 2GiB --changed 1

A qcow2 disk of incompressible data served by qemu-storage-daemon (its writable NBD
export stands in for the guest); a full replication into a local repository; the guest
then writes --changed percent of the disk in scattered 64 KiB blocks; then, timed with
the page cache dropped before each:
  - `snapsync replicate qemu:///...` (the incremental: checkpoint, bitmap, changed blocks),
  - `qemu-img convert` of the whole disk from the export (what a tool without bitmaps
    reads),
  - `b3sum` of the image file (the least any hashing approach reads),
and prints the ratios, read bytes and load average.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from side_by_side import parse_size, timed

BLOCK = 65536


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--snapsync", required=True)
    ap.add_argument("--size", type=parse_size, default=parse_size("2GiB"))
    ap.add_argument("--changed", type=float, default=1.0, help="percent of the disk written")
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="snapsync-qemu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    s = a.snapsync
    daemon = None
    try:
        raw = work / "initial.raw"
        with open(raw, "wb") as f:
            left = a.size
            while left:
                n = min(left, 16 << 20)
                f.write(os.urandom(n))
                left -= n
        img = work / "disk.qcow2"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(img)],
                       check=True)
        raw.unlink()
        qmp, guest = work / "qmp.sock", work / "guest.sock"
        daemon = subprocess.Popen([
            "qemu-storage-daemon",
            "--blockdev", f"driver=qcow2,node-name=disk0,file.driver=file,file.filename={img}",
            "--chardev", f"socket,path={qmp},server=on,wait=off,id=qmp", "--monitor", "chardev=qmp",
            "--nbd-server", f"addr.type=unix,addr.path={guest}",
            "--export", "type=nbd,id=guest,node-name=disk0,name=guest,writable=on"])
        while not (qmp.exists() and guest.exists()):
            time.sleep(0.02)
        url = f"qemu://{qmp}?nbd={guest}"
        repo = work / "repo"
        subprocess.run([s, "init", str(repo)], check=True, stdout=subprocess.DEVNULL)
        full_t, _ = timed([s, "replicate", url, str(repo), "--snapshot", "c1", "--json"])

        blocks = a.size // BLOCK
        n = max(1, int(blocks * a.changed / 100))
        rng = random.Random(5)
        cmds = []
        for b in rng.sample(range(blocks), n):
            cmds += ["-c", f"write -P {rng.randrange(1, 255)} {b * BLOCK} {BLOCK}"]
        export = f"nbd+unix:///guest?socket={guest}"
        for i in range(0, len(cmds), 2000):
            subprocess.run(["qemu-io", "-f", "raw", *cmds[i:i + 2000], export], check=True,
                           stdout=subprocess.DEVNULL)

        incr_t, out = timed([s, "replicate", url, str(repo), "--snapshot", "c2", "--json"])
        report = json.loads(out.strip().splitlines()[0])
        convert_t, _ = timed(["qemu-img", "convert", "-f", "raw", "-O", "raw", export,
                              str(work / "whole.raw")])
        (work / "whole.raw").unlink()
        b3_t = None
        if shutil.which("b3sum"):
            b3_t, _ = timed(["b3sum", str(img)])

        # What the guest sees: 4 KiB writes every 5 ms, alone and then through a whole
        # replication (c3), each write's latency from qemu-io's own timing. No cache
        # drop here: its sync would stall the writes and be counted against snapsync.
        def guest_writes(during=None):
            wcmds = []
            for _ in range(400):
                wcmds += ["-c", f"write -P 9 {rng.randrange(blocks) * BLOCK} 4096",
                          "-c", "sleep 5"]
            writer = subprocess.Popen(["qemu-io", "-f", "raw", *wcmds, export],
                                      stdout=subprocess.PIPE, text=True)
            took = None
            if during:
                time.sleep(0.2)
                t = time.monotonic()
                subprocess.run(during, check=True, stdout=subprocess.DEVNULL)
                took = time.monotonic() - t
            wout, _ = writer.communicate()
            lat = sorted(1000.0 / float(line.rsplit(" and ", 1)[1].split()[0])
                         for line in wout.splitlines() if "ops/sec" in line)
            return lat, took

        alone, _ = guest_writes()
        lat, c3_t = guest_writes([s, "replicate", url, str(repo), "--snapshot", "c3"])

        mib = a.size / (1 << 20)
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()}")
        print(f"disk {mib:.0f} MiB qcow2, {n} scattered 64 KiB blocks written ({a.changed}%)")
        print(f"snapsync full replicate (qemu://)      {full_t:7.2f} s")
        print(f"snapsync incremental (qemu://)         {incr_t:7.2f} s"
              f"  read {report['read_bytes'] / (1 << 20):.1f} MiB for {n * BLOCK / (1 << 20):.1f} MiB dirty"
              f" (base {report['base']})")
        print(f"qemu-img convert of the whole export   {convert_t:7.2f} s"
              f"  = {convert_t / incr_t:.1f}x the incremental's time")
        if lat and alone:
            print(f"guest 4 KiB writes alone:            median {alone[len(alone) // 2]:.2f} ms,"
                  f" max {alone[-1]:.2f} ms ({len(alone)} writes)")
            print(f"... during a {c3_t:.2f} s replication:   median {lat[len(lat) // 2]:.2f} ms,"
                  f" max {lat[-1]:.2f} ms ({len(lat)} writes)")
        if b3_t is not None:
            print(f"b3sum of the image file                {b3_t:7.2f} s"
                  f"  = {b3_t / incr_t:.1f}x the incremental's time")
    finally:
        if daemon:
            daemon.kill()
            daemon.wait()
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
