#!/usr/bin/env python3
"""Memory and metadata at scale (issue 19): snapsync beside its previous release and restic.

Run through bench/run.sh, which builds snapsync first:

    bash bench/run.sh --scale                          # 2 GiB and 8 GiB at 512 B blocks
    bash bench/run.sh --scale --sizes 1GiB,2GiB        # quicker
    bash bench/run.sh --scale --previous /path/to/old/snapsync
    bash bench/run.sh --scale --sizes 2GiB --big-repo 64M   # into a 64 M-block repository

Small blocks simulate large volumes: at `--block-size 512` a 2 GiB image has 4 M blocks
(a 256 GiB volume at 64 KiB) and 8 GiB has 16 M (1 TiB at 64 KiB). Every block holds data
and every block is different (8 unique bytes, the rest a fixed pattern that compresses),
so maps, indexes and manifests are as large as they get, while the repositories stay small
on disk. The second snapshot changes the same number of blocks at every size (scattered
4 KiB writes), so time and memory that follow the changes stay flat and those that
follow the volume grow 4x.

Each command runs under /usr/bin/time (peak RSS, wall time) with the page cache dropped,
side by side: this snapsync, the previous release (`--previous`, default the binary at
/work/prev-release/snapsync if present), and restic (backup, backup of the changed image,
restore, check; its index lives in memory). Images live on a btrfs loop file when
btrfs-progs is present (the second image a reflink copy, so an 8 GiB pair takes 8 GiB),
else in --work. Prints one table per size and writes docs/BENCHMARKS.md's "Scale" section
unless --no-doc. Nothing here asserts a time or a size.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from side_by_side import drop_caches, parse_size  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
REPO_ROOT = Path(__file__).resolve().parent.parent
# The measured table between these markers is rewritten; the prose around it is kept.
SECTION_BEGIN = "<!-- scale-table:begin (bench/run.sh --scale rewrites this table) -->"
SECTION_END = "<!-- scale-table:end -->"
PATTERN = (b"snapsync scale benchmark: a block of a large volume, mostly text. " * 8)


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def human(n: float) -> str:
    for unit in ["B", "KiB", "MiB", "GiB"]:
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def timed(cmd, env=None) -> dict:
    """Run under /usr/bin/time with the page cache dropped: wall seconds, peak RSS."""
    drop_caches()
    fd, tf = tempfile.mkstemp(prefix="scale-time-")
    os.close(fd)
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", tf] + [str(c) for c in cmd],
                       env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall, rss = Path(tf).read_text().strip().splitlines()[-1].split()
    os.unlink(tf)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {p.returncode}:\n{p.stderr[-2000:]}")
    return {"wall": float(wall), "rss": int(rss) * 1024, "stdout": p.stdout}


def gen_image(path: Path, size: int, bs: int, seed: int) -> None:
    """Every block different (8 unique bytes), the rest a pattern that compresses."""
    per = 8 * MiB
    template = bytearray((PATTERN * (per // len(PATTERN) + 1))[:per])
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        block = 0
        for _ in range(size // per):
            buf = bytearray(template)
            for off in range(0, per, bs):
                struct.pack_into("<QQ", buf, off, block, rnd.getrandbits(64))
                block += 1
            f.write(buf)


def change(path: Path, writes: int, bs: int, seed: int) -> None:
    """`writes` scattered 4 KiB writes of new unique content."""
    size = path.stat().st_size
    rnd = random.Random(seed)
    with open(path, "r+b") as f:
        for k in range(writes):
            off = rnd.randrange(size // 4096) * 4096
            buf = bytearray(PATTERN[:4096].ljust(4096, b"."))
            for b in range(0, 4096, bs):
                struct.pack_into("<QQ", buf, b, 1 << 63 | k, rnd.getrandbits(64))
            f.seek(off)
            f.write(buf)


class Images:
    """Two snapshots of one volume, on btrfs (reflink) when it can be made."""

    def __init__(self, work: Path, size: int):
        self.work = work
        self.mount = None
        self.loop_file = work / "images.btrfs"
        base = work / "images"
        if shutil.which("mkfs.btrfs") and os.geteuid() == 0:
            base.mkdir(parents=True, exist_ok=True)
            with open(self.loop_file, "wb") as f:
                f.truncate(size + size // 4 + 512 * MiB)
            subprocess.run(["mkfs.btrfs", "-q", "-f", str(self.loop_file)], check=True)
            subprocess.run(["mount", "-o", "loop", str(self.loop_file), str(base)], check=True)
            self.mount = base
        self.dir = base / "vm"
        self.dir.mkdir(parents=True, exist_ok=True)

    def s(self, n: int) -> Path:
        return self.dir / f"s{n}.img"

    def copy(self, src: Path, dst: Path) -> None:
        subprocess.run(["cp", "--reflink=auto", str(src), str(dst)], check=True)

    def close(self) -> None:
        if self.mount:
            subprocess.run(["umount", str(self.mount)], check=False)
            self.loop_file.unlink(missing_ok=True)


def scratch_dir(work: Path, need: int) -> Path:
    """Where a restore goes: /dev/shm when it has room (a restored 8 GiB image would not
    fit beside the images and repositories on this machine's disk; tmpfs pages are not in
    the restoring process's RSS), else the work directory."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > need + GiB:
        d = shm / "snapsync-scale"
        d.mkdir(exist_ok=True)
        return d
    return work


class Scale:
    def __init__(self, args):
        self.args = args
        self.rows: list[tuple] = []
        self.meta_rows: list[tuple] = []
        self.work = Path(args.work)

    def record(self, size_label, tool, command, m, note=""):
        self.rows.append((size_label, tool, command, m["wall"], m["rss"], note))
        log(f"{size_label} {tool:10} {command:28} {m['wall']:8.2f} s  {human(m['rss']):>10}  {note}")

    def snapsync(self, label, tool, exe, images: Images, blocks: int) -> None:
        repo = self.work / f"repo-{tool}"
        shutil.rmtree(repo, ignore_errors=True)
        src = f"raw:{images.dir.parent}"
        run = lambda *a: timed([exe, *a])  # noqa: E731
        subprocess.run([exe, "init", str(repo), "--block-size", str(self.args.block_size)],
                       check=True, stdout=subprocess.DEVNULL)
        self.record(label, tool, "replicate (full)",
                    run("replicate", src, str(repo), "--snapshot", "s1", "--json"))
        self.record(label, tool, "replicate (incremental)",
                    run("replicate", src, str(repo), "--json"))
        if self.args.replicate_only:
            shutil.rmtree(repo, ignore_errors=True)
            return
        self.record(label, tool, "list", run("list", str(repo)))
        self.record(label, tool, "diff (from the repository)",
                    run("diff", str(repo), "vm@s2", "--base", "s1", "--json"))
        restored = scratch_dir(self.work, blocks * self.args.block_size) / "restored.img"
        self.record(label, tool, "restore (newest)",
                    run("restore", str(repo), "vm@s2", str(restored)))
        restored.unlink(missing_ok=True)
        self.record(label, tool, "verify", run("verify", str(repo)))
        self.record(label, tool, "verify --read-data", run("verify", str(repo), "--read-data"))
        self.serve(label, tool, exe, repo)
        self.record(label, tool, "prune --keep-last 1", run("prune", str(repo), "--keep-last", "1"))
        self.record(label, tool, "gc", run("gc", str(repo)))
        meta = sum(f.stat().st_size for d in ("manifests", "mparts") if (repo / d).exists()
                   for f in (repo / d).rglob("*") if f.is_file())
        log(f"{label} {tool}: manifests {human(meta)} after prune+gc")
        shutil.rmtree(repo, ignore_errors=True)

    def serve(self, label, tool, exe, repo: Path) -> None:
        """`serve` while a client replicates the newest snapshot out of it: its peak RSS."""
        port_file = self.work / "serve.out"
        token = self.work / "token"
        token.write_text("scale-bench-token\n")
        with open(port_file, "w") as out:
            p = subprocess.Popen([exe, "serve", "--store", f"repo={repo}", "--listen",
                                  "127.0.0.1:0", "--token-file", str(token),
                                  "--insecure-plaintext"],
                                 stdout=out, stderr=subprocess.STDOUT)
        try:
            addr = None
            for _ in range(200):
                text = port_file.read_text()
                for word in text.split():
                    if word.startswith("127.0.0.1:"):
                        addr = word.strip(",")
                if addr:
                    break
                time.sleep(0.05)
            if not addr:
                raise RuntimeError(f"serve did not say where it listens: {port_file.read_text()}")
            dst = self.work / f"pulled-{tool}"
            shutil.rmtree(dst, ignore_errors=True)
            subprocess.run([exe, "init", str(dst), "--block-size", str(self.args.block_size)],
                           check=True, stdout=subprocess.DEVNULL)
            t0 = time.monotonic()
            subprocess.run([exe, "replicate", f"snapsync+http://{addr}/repo", str(dst),
                            "--snapshot", "s2",
                            "--token-file", str(token)], check=True, stdout=subprocess.DEVNULL)
            wall = time.monotonic() - t0
            hwm = 0
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
            self.record(label, tool, "serve (a full pull)", {"wall": wall, "rss": hwm})
            shutil.rmtree(dst, ignore_errors=True)
        finally:
            p.send_signal(signal.SIGTERM)
            p.wait(30)

    def chain(self, label, tool, exe, images: Images, base: Path, blocks: int) -> None:
        """`--chain` snapshots, each 0.1% of the blocks changed from the one before: the
        manifest bytes written per snapshot, and restoring the newest against the first."""
        repo = self.work / f"chain-{tool}"
        shutil.rmtree(repo, ignore_errors=True)
        subprocess.run([exe, "init", str(repo), "--block-size", str(self.args.block_size)],
                       check=True, stdout=subprocess.DEVNULL)
        src = f"raw:{images.dir.parent}"
        vm = images.dir
        images.copy(base, vm / "c000.img")
        os.utime(vm / "c000.img", (1_700_000_000, 1_700_000_000))
        subprocess.run([exe, "replicate", src, str(repo)], check=True, stdout=subprocess.DEVNULL)

        def meta() -> int:
            return sum(f.stat().st_size for d in ("manifests", "mparts") if (repo / d).exists()
                       for f in (repo / d).rglob("*") if f.is_file())

        writes = max(1, blocks // 1000 // (4096 // self.args.block_size))
        before = meta()
        per, wall = [], 0.0
        for k in range(1, self.args.chain):
            prev, cur = vm / f"c{k - 1:03}.img", vm / f"c{k:03}.img"
            images.copy(prev, cur)
            change(cur, writes, self.args.block_size, seed=100 + k)
            os.utime(cur, (1_700_000_000 + k, 1_700_000_000 + k))
            m = timed([exe, "replicate", src, str(repo)])
            wall += m["wall"]
            after = meta()
            per.append(after - before)
            before = after
            if k >= 2:
                (vm / f"c{k - 2:03}.img").unlink()
        n = self.args.chain - 1
        note = (f"{n} incrementals of {writes} x 4 KiB: manifests {human(sum(per) / n)} per "
                f"snapshot on average, {human(max(per))} at most")
        self.record(label, tool, f"chain of {self.args.chain}: one incremental",
                    {"wall": wall / n, "rss": 0}, note)
        out = scratch_dir(self.work, blocks * self.args.block_size) / "r.img"
        first = timed([exe, "restore", str(repo), "vm@c000", str(out)])
        out.unlink(missing_ok=True)
        newest = timed([exe, "restore", str(repo), f"vm@c{n:03}", str(out)])
        out.unlink(missing_ok=True)
        self.record(label, tool, "restore the first of the chain", first)
        self.record(label, tool, "restore the newest of the chain", newest)
        self.meta_rows.append((label, tool, n, writes, sum(per) / n, max(per)))
        shutil.rmtree(repo, ignore_errors=True)
        for f in vm.glob("c*.img"):
            f.unlink()

    def big_repo(self, label, images: Images) -> None:
        """Replication into a repository that already holds `--big-repo` blocks over many
        volumes (issue 19: the block index of a ~4 TiB repository at 64 KiB). The filling
        volumes are generated one at a time in /dev/shm and removed once stored."""
        exe = self.args.snapsync
        repo = self.work / "big-repo"
        shutil.rmtree(repo, ignore_errors=True)
        subprocess.run([exe, "init", str(repo), "--block-size", str(self.args.block_size)],
                       check=True, stdout=subprocess.DEVNULL)
        fill = scratch_dir(self.work, self.args.fill_size) / "fill"
        per = self.args.fill_size // self.args.block_size
        stored = 0
        k = 0
        while stored < self.args.big_repo:
            vol = fill / f"fill{k:02}"
            vol.mkdir(parents=True, exist_ok=True)
            gen_image(vol / "s1.img", self.args.fill_size, self.args.block_size, seed=1000 + k)
            m = timed([exe, "replicate", f"raw:{fill}", str(repo), "--volume", vol.name])
            stored += per
            log(f"filled {vol.name}: repository holds {stored >> 20} M blocks "
                f"({m['wall']:.0f} s, {human(m['rss'])})")
            shutil.rmtree(vol)
            k += 1
        shutil.rmtree(fill, ignore_errors=True)
        held = f"into a repository of {stored >> 20} M blocks"
        src = f"raw:{images.dir.parent}"
        run = lambda *a, env=None: timed([exe, *a], env)  # noqa: E731
        self.record(label, "snapsync", f"replicate (full) {held}",
                    run("replicate", src, str(repo), "--snapshot", "s1", "--json"))
        self.record(label, "snapsync", f"replicate (incremental) {held}",
                    run("replicate", src, str(repo), "--json"))
        # A first run on another machine: no index cache, every pack index read.
        cold = self.work / "cold-cache"
        shutil.rmtree(cold, ignore_errors=True)
        images.copy(images.s(2), images.s(3))
        change(images.s(3), self.args.writes, self.args.block_size, seed=9)
        os.utime(images.s(3), (1_700_000_200, 1_700_000_200))
        self.record(label, "snapsync", f"replicate (incremental, no index cache) {held}",
                    run("replicate", src, str(repo), "--json",
                        env={"SNAPSYNC_CACHE_DIR": str(cold)}))
        shutil.rmtree(cold, ignore_errors=True)
        images.s(3).unlink()
        self.record(label, "snapsync", f"verify {held}", run("verify", str(repo)))
        shutil.rmtree(repo, ignore_errors=True)

    def restic(self, label, images: Images) -> None:
        repo = self.work / "restic"
        shutil.rmtree(repo, ignore_errors=True)
        env = {"RESTIC_REPOSITORY": str(repo), "RESTIC_PASSWORD": "scale"}
        subprocess.run(["restic", "init", "--quiet"], env={**os.environ, **env}, check=True)
        self.record(label, "restic", "backup (full)",
                    timed(["restic", "backup", "--quiet", str(images.s(1))], env))
        self.record(label, "restic", "backup (incremental)",
                    timed(["restic", "backup", "--quiet", str(images.s(2))], env))
        out = scratch_dir(self.work, images.s(1).stat().st_size) / "restic-restore"
        self.record(label, "restic", "restore (newest)",
                    timed(["restic", "restore", "latest", "--target", str(out)], env))
        shutil.rmtree(out, ignore_errors=True)
        self.record(label, "restic", "check", timed(["restic", "check", "--quiet"], env))
        self.record(label, "restic", "check --read-data",
                    timed(["restic", "check", "--quiet", "--read-data"], env))
        shutil.rmtree(repo, ignore_errors=True)

    def size(self, size: int) -> None:
        bs = self.args.block_size
        blocks = size // bs
        count = f"{blocks >> 20} M" if blocks >= 1 << 20 else f"{blocks >> 10} K"
        label = f"{size // GiB if size >= GiB else size // MiB}{'GiB' if size >= GiB else 'MiB'}" \
                f" ({count} blocks)"
        self.work.mkdir(parents=True, exist_ok=True)
        images = Images(self.work, size)
        try:
            log(f"generating {label}")
            gen_image(images.s(1), size, bs, seed=size)
            images.copy(images.s(1), images.s(2))
            change(images.s(2), self.args.writes, bs, seed=7)
            os.utime(images.s(1), (1_700_000_000, 1_700_000_000))
            os.utime(images.s(2), (1_700_000_100, 1_700_000_100))
            if self.args.big_repo:
                self.big_repo(label, images)
                return
            for tool, exe in self.tools():
                if self.args.chain_only:
                    continue
                if tool == "restic":
                    self.restic(label, images)
                else:
                    self.snapsync(label, tool, exe, images, blocks)
            if self.args.chain > 1 and size == self.sizes[0]:
                # The base out of the store's sight (a name no volume may have).
                hidden = images.dir.parent / ".chain-base"
                hidden.mkdir(exist_ok=True)
                images.s(1).rename(hidden / "base.img")
                images.s(2).unlink()
                for tool, exe in self.tools():
                    if tool != "restic":
                        self.chain(label, tool, exe, images, hidden / "base.img", blocks)
        finally:
            images.close()

    def tools(self):
        out = []
        for t in self.args.tools.split(","):
            if t == "snapsync":
                out.append(("snapsync", self.args.snapsync))
            elif t == "previous" and self.args.previous and Path(self.args.previous).exists():
                out.append(("previous", self.args.previous))
            elif t == "restic" and shutil.which("restic"):
                out.append(("restic", "restic"))
            else:
                log(f"skipping {t}: not available")
        return out

    def table(self) -> str:
        lines = [
            f"Block size {self.args.block_size} B, every block holding different data; the "
            f"incremental changes {self.args.writes} scattered 4 KiB writes at every size. "
            f"Peak RSS from /usr/bin/time (serve: VmHWM while a client pulls the newest "
            f"snapshot), page cache dropped before each command. Run {time.strftime('%Y-%m-%d')} "
            f"on {os.cpu_count()} cores; nothing else ran but the shared host.",
            "",
            "| volume | tool | command | wall | peak RSS |",
            "| --- | --- | --- | ---: | ---: |",
        ]
        for size, tool, command, wall, rss, note in self.rows:
            rss_text = human(rss) if rss else "–"
            lines.append(f"| {size} | {tool} | {command} | {wall:.2f} s | {rss_text} |")
        if self.meta_rows:
            lines += ["", "Metadata written per incremental snapshot (manifests and their "
                      "parts), over a chain:", "",
                      "| volume | tool | incrementals | changed 4 KiB writes each | "
                      "manifest bytes per snapshot (mean) | largest |",
                      "| --- | --- | ---: | ---: | ---: | ---: |"]
            for label, tool, n, writes, mean, most in self.meta_rows:
                lines.append(f"| {label} | {tool} | {n} | {writes} | {human(mean)} | "
                             f"{human(most)} |")
        return "\n".join(lines)

    def write_doc(self) -> None:
        path = REPO_ROOT / "docs" / "BENCHMARKS.md"
        text = path.read_text()
        section = f"{SECTION_BEGIN}\n{self.table()}\n{SECTION_END}"
        if SECTION_BEGIN in text:
            a = text.index(SECTION_BEGIN)
            b = text.index(SECTION_END) + len(SECTION_END)
            text = text[:a] + section + text[b:]
        else:
            text += "\n## Scale\n\n" + section + "\n"
        path.write_text(text)


def parse_count(text: str) -> int:
    """A block count: a number with an optional K or M (binary: 64M = 64 * 2^20)."""
    units = {"K": 1 << 10, "M": 1 << 20}
    if text[-1:].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--snapsync", required=True)
    ap.add_argument("--previous", default="/work/prev-release/snapsync",
                    help="the previous release's binary (skipped when missing)")
    ap.add_argument("--sizes", default="2GiB,8GiB")
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--writes", type=int, default=1000,
                    help="scattered 4 KiB writes between the two snapshots (default 1000)")
    ap.add_argument("--tools", default="snapsync,previous,restic")
    ap.add_argument("--chain", type=int, default=48,
                    help="incrementals of 0.1%% in the metadata chain, at the first size "
                         "(0 skips; default 48)")
    ap.add_argument("--replicate-only", action="store_true",
                    help="only the full and the incremental replication")
    ap.add_argument("--chain-only", action="store_true",
                    help="only the chain of incrementals (at the first size)")
    ap.add_argument("--big-repo", type=parse_count, default=0,
                    help="only: replicate each size into a repository first filled with "
                         "this many blocks over many volumes (e.g. 64M)")
    ap.add_argument("--fill-size", type=parse_size, default=4 * GiB,
                    help="size of each volume that fills --big-repo (default 4GiB)")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "snapsync-scale"))
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args([a for a in sys.argv[1:] if a != "--scale"])
    s = Scale(args)
    s.sizes = [parse_size(x) for x in args.sizes.split(",") if x]
    for size in s.sizes:
        s.size(size)
    print(s.table())
    if not args.no_doc:
        s.write_doc()


if __name__ == "__main__":
    main()
