#!/usr/bin/env python3
"""snapsync side by side with rsync, restic, borg and qemu-img (issue 7).

Run through bench/run.sh, which installs the tools and builds snapsync first:

    bash bench/run.sh --size 2GiB

Generates its own data under --work, runs every scenario with every tool (initial copy,
then the incremental one), prints one table per scenario and rewrites docs/BENCHMARKS.md
(keeping its hand-written findings section). Nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import math
import mmap
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

KiB = 1024
MiB = KiB * KiB
GiB = MiB * KiB
BLOCK = 64 * KiB          # snapsync's default block size
WRITE = 100 * KiB         # one scattered write
ALIGN = 4 * KiB           # scattered writes are 4 KiB aligned (like a filesystem's)
CHUNK = 8 * MiB           # generation buffer

REPO_ROOT = Path(__file__).resolve().parent.parent
FINDINGS_BEGIN = "<!-- findings:begin (kept when the command regenerates this file) -->"
FINDINGS_END = "<!-- findings:end -->"

ALL_SCENARIOS = [
    "raw-incomp-1pct",
    "raw-incomp-10pct",
    "raw-incomp-append",
    "raw-half-1pct",
    "qcow2-incomp-1pct",
    "qcow2-incomp-10pct",
    "repo-incomp-1pct",
]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_size(s: str) -> int:
    s = s.strip()
    units = {"": 1, "B": 1, "K": KiB, "KIB": KiB, "M": MiB, "MIB": MiB, "G": GiB, "GIB": GiB,
             "KB": 1000, "MB": 1000**2, "GB": 1000**3}
    num = s.rstrip("KkMmGgIiBb")
    unit = s[len(num):].upper()
    if unit not in units:
        raise argparse.ArgumentTypeError(f"bad size {s!r} (e.g. 256MiB, 2GiB)")
    return int(float(num) * units[unit])


def human(n: float | None) -> str:
    if n is None:
        return "–"
    n = float(n)
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def size_label(n: int) -> str:
    if n % GiB == 0:
        return f"{n // GiB} GiB"
    if n % MiB == 0:
        return f"{n // MiB} MiB"
    return human(n)


# ---------------------------------------------------------------------------------------
# data generation


def gen_data(n: int, kind: str) -> bytes:
    """n bytes of data: 'incomp' = random, 'half' = each 4 KiB is 2 KiB random + 2 KiB zeros
    (zstd/lz4 halve it; the dedup tools see no repeats)."""
    if kind == "incomp":
        return os.urandom(n)
    assert kind == "half"
    buf = bytearray(n)
    rnd = os.urandom((n + 1) // 2 + 2 * KiB)
    for i, off in enumerate(range(0, n, 4 * KiB)):
        k = min(2 * KiB, n - off)
        buf[off:off + k] = rnd[i * 2 * KiB:i * 2 * KiB + k]
    return bytes(buf)


def gen_image(path: Path, size: int, kind: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(CHUNK, left)
            f.write(gen_data(n, kind))
            left -= n
    log(f"generated {path} ({size_label(size)}, {kind}) in {time.time() - t0:.1f} s")


def scattered_offsets(size: int, pct: float, seed: int) -> list[int]:
    rng = random.Random(seed)
    n = max(1, math.ceil(size * pct / 100 / WRITE))
    hi = (size - WRITE) // ALIGN
    return sorted(rng.randint(0, hi) * ALIGN for _ in range(n))


def changed_blocks(offsets: list[int], length: int = WRITE) -> int:
    """Bytes of the distinct 64 KiB blocks the writes touch."""
    blocks = set()
    for off in offsets:
        blocks.update(range(off // BLOCK, (off + length - 1) // BLOCK + 1))
    return len(blocks) * BLOCK


def copy_file(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "--reflink=auto", "--sparse=never", str(src), str(dst)], check=True)


def make_s2_scattered(s1: Path, s2: Path, offsets: list[int], kind: str) -> None:
    copy_file(s1, s2)
    with open(s2, "r+b") as f:
        for off in offsets:
            os.pwrite(f.fileno(), gen_data(WRITE, kind), off)


def make_s2_append(s1: Path, s2: Path, n: int, kind: str) -> None:
    copy_file(s1, s2)
    with open(s2, "ab") as f:
        left = n
        while left:
            k = min(CHUNK, left)
            f.write(gen_data(k, kind))
            left -= k


def set_mtime(p: Path, t: float) -> None:
    os.utime(p, (t, t))


# ---------------------------------------------------------------------------------------
# measurement


# How a measurement read its input, for tables.
CACHE_LABEL = {"drop": "from disk", "warm": "from page cache"}


def free_page_reporting() -> bool:
    """Whether this (virtual) machine hands the memory it frees back to its host
    (virtio-balloon with VIRTIO_BALLOON_F_REPORTING, feature bit 5)."""
    for f in Path("/sys/bus/virtio/drivers/virtio_balloon").glob("virtio*/features"):
        bits = f.read_text().strip()
        if len(bits) > 5 and bits[5] == "1":
            return True
    return False


class Runner:
    def __init__(self, args):
        self.args = args
        self.cache_mode = args.cache
        if self.cache_mode == "auto":
            self.cache_mode = "drop" if self._can_drop() else "warm"
        # On a guest that reports freed memory to its host, touching such memory again
        # costs the host's page faults, charged to whoever touches it first: measured
        # here, writing 1 GiB into fresh page cache took 3.5 s of system time instead of
        # 0.25 s. Which timed run meets that memory is luck (in the loopback comparison
        # the local runs met it three times in four), so before every timed run from
        # page cache the harness touches and frees this much (see prepare_cache).
        self.warm_memory = args.warm_memory if args.warm_memory >= 0 else \
            (2 * GiB if free_page_reporting() else 0)

    @staticmethod
    def _can_drop() -> bool:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3")
            return True
        except OSError:
            return False

    def prepare_cache(self, inputs) -> None:
        if self.cache_mode == "drop":
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3")
        else:
            for p in inputs:
                with open(p, "rb") as f:
                    while f.read(CHUNK):
                        pass
            # Only where the page cache stays warm: with it dropped, touching memory
            # first steadied the local replications of a loopback comparison but slowed
            # others (a 2 GiB raw incremental 0.97 -> 1.47 s, b3sum not), reading from
            # disk is the larger noise, and a run mostly reuses the pages just dropped.
            self.touch_memory()

    def touch_memory(self) -> None:
        """Touch and free `warm_memory` bytes (see __init__)."""
        n = self.warm_memory
        if n <= 0:
            return
        m = mmap.mmap(-1, n)
        buf = (ctypes.c_char * n).from_buffer(m)
        ctypes.memset(buf, 1, n)
        del buf
        m.close()

    def timed(self, cmd, inputs=(), env=None, cwd=None) -> dict:
        """Run cmd under /usr/bin/time after treating the page cache the one way."""
        self.prepare_cache(inputs)
        fd, tf = tempfile.mkstemp(prefix="bench-time-")
        os.close(fd)
        full = ["/usr/bin/time", "-f", "%e %U %S %M %O", "-o", tf] + [str(c) for c in cmd]
        e = dict(os.environ)
        if env:
            e.update(env)
        p = subprocess.run(full, env=e, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
        lines = Path(tf).read_text().strip().splitlines()
        os.unlink(tf)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, cmd))} exited {p.returncode}:\n"
                               f"{p.stderr[-3000:]}")
        wall, user, sys_, maxrss, oublock = lines[-1].split()
        return {
            "wall": float(wall),
            "cpu": float(user) + float(sys_),
            "rss": int(maxrss) * KiB,
            "written": int(oublock) * 512,
            "stdout": p.stdout,
        }


def disk_usage(path: Path) -> int:
    """Allocated bytes under path (du -sB1), hardlinks counted once."""
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_blocks * 512
    seen, total = set(), 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def rmtree(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# S3 (moto)


class Moto:
    def __init__(self, work: Path):
        self.proc = None
        self.port = None
        self.log = work / "moto.log"

    def start(self) -> str | None:
        exe = shutil.which("moto_server")
        if not exe:
            return "moto_server is not installed (bash scripts/test.sh installs it)"
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        for _ in range(300):
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=1)
                return None
            except Exception:
                if self.proc.poll() is not None:
                    return f"moto_server exited: {self.log.read_text()[-500:]}"
                time.sleep(0.2)
        return "moto_server did not answer within 60 s"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ALLOW_HTTP": "true",
                "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing"}

    def create_bucket(self, name: str) -> None:
        req = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT", data=b"")
        urllib.request.urlopen(req, timeout=30).read()

    def bucket_bytes(self, name: str) -> int:
        total, token = 0, None
        ns = "{http://s3.amazonaws.com/doc/2006-03-01/}"
        while True:
            url = f"{self.endpoint}/{name}?list-type=2&max-keys=1000"
            if token:
                url += "&continuation-token=" + urllib.request.quote(token)
            root = ET.fromstring(urllib.request.urlopen(url, timeout=60).read())
            for c in root.iter(ns + "Contents"):
                total += int(c.find(ns + "Size").text)
            t = root.find(ns + "NextContinuationToken")
            if t is None or not t.text:
                return total
            token = t.text

    def delete_bucket(self, name: str) -> None:
        # moto keeps objects in memory: drop them (reset clears every bucket)
        try:
            req = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST",
                                         data=b"")
            urllib.request.urlopen(req, timeout=60).read()
        except Exception:
            pass

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# ---------------------------------------------------------------------------------------
# the benchmark


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.snapsync = str(Path(args.snapsync).resolve())
        self.r = Runner(args)
        self.rows: list[dict] = []       # one per (scenario, tool, phase)
        self.scen_info: dict[str, dict] = {}
        self.notes: list[str] = []
        self.mem_rows: list[dict] = []
        self.chain: dict = {}
        self.remote_rows: list[dict] = []
        self.moto = Moto(self.work)
        self.s3_skip: str | None = None
        self.qcow2_skip: str | None = None
        self.bucket_n = 0

    # -- helpers -------------------------------------------------------------------------

    def note(self, msg: str) -> None:
        log("NOTE: " + msg)
        self.notes.append(msg)

    def record(self, scen: str, tool: str, phase: str, m: dict, stored: int | None,
               extra: dict | None = None) -> dict:
        row = {"scenario": scen, "tool": tool, "phase": phase, "wall": m["wall"],
               "cpu": m["cpu"], "rss": m["rss"], "written": m["written"], "stored": stored}
        if extra:
            row.update(extra)
        self.rows.append(row)
        log(f"{scen:20} {tool:22} {phase:11} wall {m['wall']:7.2f} s  cpu {m['cpu']:7.2f} s  "
            f"rss {human(m['rss']):>10}  stored {human(stored):>10}  written {human(m['written'])}")
        return row

    def snapsync_json(self, out: str) -> dict:
        objs = [json.loads(l) for l in out.splitlines() if l.strip().startswith("{")]
        keys = ("changed_bytes", "read_bytes", "sent_bytes", "dedup_bytes", "duration_ms")
        return {k: sum(o.get(k, 0) for o in objs) for k in keys} | {"replicated": len(objs)}

    def check_stores(self) -> None:
        probe = subprocess.run([self.snapsync, "list", "qcow2:///nonexistent/x.qcow2", "--json"],
                               capture_output=True, text=True)
        if "unknown scheme" in probe.stderr:
            self.qcow2_skip = "the qcow2: store is not wired into the snapsync binary yet"
        if self.args.no_s3:
            self.s3_skip = "--no-s3 given"
            return
        probe = subprocess.run([self.snapsync, "list", "s3://probe/x", "--json"],
                               capture_output=True, text=True,
                               env=dict(os.environ, AWS_ENDPOINT_URL="http://127.0.0.1:9"))
        if "unknown scheme" in probe.stderr:
            self.s3_skip = "the s3:// store is not wired into the snapsync binary yet"
            return
        err = self.moto.start()
        if err:
            self.s3_skip = err

    def new_bucket(self) -> str:
        self.bucket_n += 1
        name = f"bench-{os.getpid()}-{self.bucket_n}"
        self.moto.create_bucket(name)
        return name

    # -- tools ---------------------------------------------------------------------------
    # Each takes the scenario dir and runs "initial" then "incremental".

    def run_snapsync(self, scen: str, tool: str, source: str, inputs1, inputs2, dest: str,
                     s3_bucket: str | None, clear_cache_dir: Path | None) -> None:
        env = self.moto.env() if s3_bucket else None
        if clear_cache_dir:
            rmtree(clear_cache_dir / ".snapsync")   # per-image hash cache: start cold
        subprocess.run([self.snapsync, "init", dest], check=True, capture_output=True, env=(
            dict(os.environ, **env) if env else None))

        def stored():
            return self.moto.bucket_bytes(s3_bucket) if s3_bucket else disk_usage(Path(dest))

        before = stored()
        for phase, snap, inputs in (("initial", "s1", inputs1), ("incremental", "s2", inputs2)):
            m = self.r.timed([self.snapsync, "replicate", source, dest, "--volume", "vm",
                              "--snapshot", snap, "--json"], inputs=inputs, env=env)
            after = stored()
            self.record(scen, tool, phase, m, after - before, self.snapsync_json(m["stdout"]))
            before = after

    def run_rsync(self, scen, flat: Path, s1: Path, s2: Path, name: str) -> None:
        dest = self.work / "dest-rsync"
        rmtree(dest)
        dest.mkdir()
        before = 0
        for phase, img in (("initial", s1), ("incremental", s2)):
            self._point(flat / name, img)
            m = self.r.timed(["rsync", "--inplace", "--no-whole-file", str(flat / name),
                              str(dest / name)], inputs=[img])
            after = disk_usage(dest)
            self.record(scen, "rsync --inplace", phase, m, after - before)
            before = after
        rmtree(dest)

    @staticmethod
    def _point(link: Path, target: Path) -> None:
        """Make link a hardlink of target (the tools back up one stable path)."""
        tmp = link.with_name(link.name + ".tmp")
        if tmp.exists():
            tmp.unlink()
        os.link(target, tmp)
        os.replace(tmp, link)

    def run_restic(self, scen, flat: Path, s1: Path, s2: Path, name: str) -> None:
        repo = self.work / "dest-restic"
        rmtree(repo)
        env = {"RESTIC_PASSWORD": "bench", "RESTIC_REPOSITORY": str(repo),
               "RESTIC_CACHE_DIR": str(self.work / "restic-cache")}
        rmtree(self.work / "restic-cache")
        subprocess.run(["restic", "init"], check=True, capture_output=True,
                       env=dict(os.environ, **env))
        before = disk_usage(repo)
        for phase, img in (("initial", s1), ("incremental", s2)):
            self._point(flat / name, img)
            m = self.r.timed(["restic", "backup", "--quiet", "--host", "bench", str(flat / name)],
                             inputs=[img], env=env)
            after = disk_usage(repo)
            self.record(scen, "restic", phase, m, after - before)
            before = after
        rmtree(repo)
        rmtree(self.work / "restic-cache")

    def run_borg(self, scen, flat: Path, s1: Path, s2: Path, name: str) -> None:
        repo = self.work / "dest-borg"
        rmtree(repo)
        env = {"BORG_BASE_DIR": str(self.work / "borg-base"),
               "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
               "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}
        rmtree(self.work / "borg-base")
        subprocess.run(["borg", "init", "-e", "none", str(repo)], check=True,
                       capture_output=True, env=dict(os.environ, **env))
        before = disk_usage(repo)
        for phase, snap, img in (("initial", "s1", s1), ("incremental", "s2", s2)):
            self._point(flat / name, img)
            m = self.r.timed(["borg", "create", f"{repo}::{snap}", str(flat / name)],
                             inputs=[img], env=env)
            after = disk_usage(repo)
            self.record(scen, "borg -e none", phase, m, after - before)
            before = after
        rmtree(repo)
        rmtree(self.work / "borg-base")

    def run_refs(self, scen, img: Path) -> None:
        dest = self.work / "dest-cp"
        rmtree(dest)
        dest.mkdir()
        # cp then fsync the copy: snapsync and borg fsync what they write
        m = self.r.timed(["sh", "-c", 'cp "$1" "$2" && sync "$2"', "cp", str(img),
                          str(dest / img.name)], inputs=[img])
        self.record(scen, "cp (+fsync)", "reference", m, disk_usage(dest))
        rmtree(dest)
        m = self.r.timed(["b3sum", str(img)], inputs=[img])
        self.record(scen, "b3sum", "reference", m, 0)

    # -- scenarios -------------------------------------------------------------------------

    def base_image(self, kind: str, size: int) -> Path:
        p = self.work / "base" / f"{kind}-{size}.img"
        if not p.exists():
            gen_image(p, size, kind)
        return p

    def scenario(self, scen: str) -> None:
        src_kind, kind, change = scen.split("-")
        size = self.args.size
        sdir = self.work / scen
        rmtree(sdir)
        base = self.base_image(kind, size)
        seed = sum(map(ord, scen))
        if change == "append":
            append = max(ALIGN, (size // 100) // ALIGN * ALIGN)
            offsets, changed = [], math.ceil(append / BLOCK) * BLOCK
            desc = f"sequential append of {human(append)} ({size_label(size)} → " \
                   f"{human(size + append)})"
        else:
            pct = float(change.removesuffix("pct"))
            offsets = scattered_offsets(size, pct, seed)
            changed = changed_blocks(offsets)
            desc = f"{len(offsets)} scattered 100 KiB writes ({pct:g}% of {size_label(size)})"
        info = {"size": size, "kind": kind, "source": src_kind, "change": desc,
                "changed_block_bytes": changed, "written_bytes": len(offsets) * WRITE
                if offsets else append}
        self.scen_info[scen] = info
        log(f"=== {scen}: {desc}; changed 64 KiB blocks: {human(changed)}")
        if src_kind == "raw":
            self.raw_scenario(scen, sdir, base, kind, offsets, append if change ==
                              "append" else 0)
        elif src_kind == "repo":
            self.repo_scenario(scen, sdir, base, kind, offsets)
        else:
            if self.qcow2_skip:
                self.note(f"{scen} skipped: {self.qcow2_skip}")
                info["skipped"] = self.qcow2_skip
                return
            self.qcow2_scenario(scen, sdir, base, kind, offsets)
        rmtree(sdir)

    @staticmethod
    def raw_images(sdir: Path, base: Path, kind, offsets, append=0):
        """SDIR/raw/vm/s1.img (the base image) and s2.img (s1 changed at `offsets`, or
        with `append` bytes appended), an hour apart; and the empty SDIR/flat the file
        tools back up from."""
        raw = sdir / "raw"
        (raw / "vm").mkdir(parents=True)
        s1, s2 = raw / "vm" / "s1.img", raw / "vm" / "s2.img"
        os.link(base, s1)   # s1 is never written; s2 is a modified copy
        if append:
            make_s2_append(s1, s2, append, kind)
        else:
            make_s2_scattered(s1, s2, offsets, kind)
        now = time.time()
        set_mtime(s1, now - 7200)
        set_mtime(s2, now - 3600)
        flat = sdir / "flat"
        flat.mkdir()
        return raw, s1, s2, flat

    def raw_scenario(self, scen, sdir: Path, base: Path, kind, offsets, append) -> None:
        raw, s1, s2, flat = self.raw_images(sdir, base, kind, offsets, append)
        tools = self.args.tools
        if "snapsync" in tools:
            repo = self.work / "dest-snapsync"
            rmtree(repo)
            self.run_snapsync(scen, "snapsync raw→file", f"raw:{raw}", [s1], [s2], str(repo),
                              None, raw)
            rmtree(repo)
            if self.s3_skip:
                self.note(f"{scen}: snapsync raw→s3 skipped: {self.s3_skip}")
            else:
                b = self.new_bucket()
                self.run_snapsync(scen, "snapsync raw→s3", f"raw:{raw}", [s1], [s2],
                                  f"s3://{b}/repo", b, raw)
                self.moto.delete_bucket(b)
        if "rsync" in tools:
            self.run_rsync(scen, flat, s1, s2, "vm.img")
        if "restic" in tools:
            self.run_restic(scen, flat, s1, s2, "vm.img")
        if "borg" in tools:
            self.run_borg(scen, flat, s1, s2, "vm.img")
        if "refs" in tools:
            self.run_refs(scen, s2)

    def repo_scenario(self, scen, sdir: Path, base: Path, kind, offsets) -> None:
        """A backup repository copied off-site (a cascade). The source repositories are
        filled, untimed, with s1 (then s2) of a raw image; then snapsync replicates its
        repository into another, rsync copies the repository's files, and restic copies
        its snapshots from one restic repository into another."""
        raw, s1, s2, flat = self.raw_images(sdir, base, kind, offsets)
        tools = self.args.tools
        src_repo, dst_repo = sdir / "repo-a", self.work / "dest-snapsync"
        rsync_dst = self.work / "dest-rsync"
        restic_src, restic_dst = sdir / "restic-a", self.work / "dest-restic"
        pw = sdir / "restic-password"
        pw.write_text("bench\n")
        restic_env = {"RESTIC_PASSWORD_FILE": str(pw), "RESTIC_CACHE_DIR":
                      str(self.work / "restic-cache")}
        for d in (dst_repo, rsync_dst, restic_dst, self.work / "restic-cache"):
            rmtree(d)
        rsync_dst.mkdir(parents=True)

        def run(cmd, env=None):
            subprocess.run([str(c) for c in cmd], check=True, capture_output=True,
                           env=dict(os.environ, **(env or {})))

        run([self.snapsync, "init", src_repo])
        if "snapsync" in tools:
            run([self.snapsync, "init", dst_repo])
        if "restic" in tools:
            for r in (restic_src, restic_dst):
                run(["restic", "-r", r, "init"], restic_env)
        for phase, snap, img in (("initial", "s1", s1), ("incremental", "s2", s2)):
            run([self.snapsync, "replicate", f"raw:{raw}", src_repo, "--volume", "vm",
                 "--snapshot", snap])
            files = [p for p in src_repo.rglob("*") if p.is_file()]
            if "snapsync" in tools:
                before = disk_usage(dst_repo)
                m = self.r.timed([self.snapsync, "replicate", src_repo, dst_repo, "--volume",
                                  "vm", "--snapshot", snap, "--json"], inputs=files)
                self.record(scen, "snapsync repo→file", phase, m,
                            disk_usage(dst_repo) - before, self.snapsync_json(m["stdout"]))
            if "rsync" in tools:
                before = disk_usage(rsync_dst)
                m = self.r.timed(["rsync", "-a", "--delete", f"{src_repo}/", f"{rsync_dst}/"],
                                 inputs=files)
                self.record(scen, "rsync -a of the repository", phase, m,
                            disk_usage(rsync_dst) - before)
            if "restic" in tools:
                self._point(flat / "vm.img", img)
                run(["restic", "-r", restic_src, "backup", "--quiet", "--host", "bench",
                     flat / "vm.img"], restic_env)
                before = disk_usage(restic_dst)
                m = self.r.timed(["restic", "-r", restic_dst, "copy", "--from-repo",
                                  restic_src, "--from-password-file", pw],
                                 inputs=[p for p in restic_src.rglob("*") if p.is_file()],
                                 env=restic_env)
                self.record(scen, "restic copy", phase, m, disk_usage(restic_dst) - before)
        for d in (dst_repo, rsync_dst, restic_dst, self.work / "restic-cache"):
            rmtree(d)

    def qcow2_scenario(self, scen, sdir: Path, base: Path, kind, offsets) -> None:
        (sdir / "A").mkdir(parents=True)
        (sdir / "B").mkdir()
        # the volume is named after the file: vm
        qa, qb = sdir / "A" / "vm.qcow2", sdir / "B" / "vm.qcow2"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(base), str(qa)],
                       check=True)
        subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(qa)], check=True)
        copy_file(qa, qb)
        pat = sdir / "patterns"
        pat.mkdir()
        cmds = []
        for i, off in enumerate(offsets):
            pf = pat / f"{i}.bin"
            pf.write_bytes(gen_data(WRITE, kind))
            cmds.append(f"write -q -s {pf} {off} {WRITE}")
        for i in range(0, len(cmds), 400):
            args = ["qemu-io", "-f", "qcow2"]
            for c in cmds[i:i + 400]:
                args += ["-c", c]
            subprocess.run(args + [str(qb)], check=True, stdout=subprocess.DEVNULL)
        rmtree(pat)
        subprocess.run(["qemu-img", "snapshot", "-c", "s2", str(qb)], check=True)
        now = time.time()
        set_mtime(qa, now - 7200)
        set_mtime(qb, now - 3600)
        log(f"qcow2 images: A {human(qa.stat().st_size)} (snapshot s1), "
            f"B {human(qb.stat().st_size)} (snapshots s1, s2)")
        flat = sdir / "flat"
        flat.mkdir()
        tools = self.args.tools
        if "snapsync" in tools:
            # snapsync reads the snapshots inside the image (B holds s1 and s2, as the one
            # image would in place); the file tools copy the image file as it was after s1
            # (A) and after s2 (B).
            repo = self.work / "dest-snapsync"
            rmtree(repo)
            self.run_snapsync(scen, "snapsync qcow2→file", f"qcow2://{qb}", [qb], [qb],
                              str(repo), None, None)
            rmtree(repo)
            if self.s3_skip:
                self.note(f"{scen}: snapsync qcow2→s3 skipped: {self.s3_skip}")
            else:
                b = self.new_bucket()
                self.run_snapsync(scen, "snapsync qcow2→s3", f"qcow2://{qb}", [qb], [qb],
                                  f"s3://{b}/repo", b, None)
                self.moto.delete_bucket(b)
        if "qemu-img" in tools:
            dest = self.work / "dest-qemu"
            rmtree(dest)
            dest.mkdir()
            d1, d2 = dest / "s1.qcow2", dest / "s2.qcow2"
            m = self.r.timed(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", "-l",
                              "snapshot.name=s1", str(qb), str(d1)], inputs=[qb])
            self.record(scen, "qemu-img convert", "initial", m, disk_usage(dest))
            before = disk_usage(dest)
            # qemu-img has no incremental copy out of an internal snapshot (convert -B
            # still writes every allocated cluster): the "incremental" is another full copy
            before = disk_usage(dest)
            m = self.r.timed(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", "-l",
                              "snapshot.name=s2", str(qb), str(d2)], inputs=[qb])
            self.record(scen, "qemu-img convert", "incremental", m, disk_usage(dest) - before,
                        {"how": "full copy of s2"})
            rmtree(dest)
        if "rsync" in tools:
            self.run_rsync(scen, flat, qa, qb, "vm.qcow2")
        if "restic" in tools:
            self.run_restic(scen, flat, qa, qb, "vm.qcow2")
        if "borg" in tools:
            self.run_borg(scen, flat, qa, qb, "vm.qcow2")
        if "refs" in tools:
            self.run_refs(scen, qb)

    # -- memory scaling -------------------------------------------------------------------

    def mem_scaling(self) -> None:
        for size in self.args.mem_sizes:
            log(f"=== memory scaling: {size_label(size)}")
            d = self.work / f"mem-{size}"
            rmtree(d)
            (d / "vm").mkdir(parents=True)
            s1, s2 = d / "vm" / "s1.img", d / "vm" / "s2.img"
            shared = self.work / "base" / f"incomp-{size}.img"
            if shared.exists():
                copy_file(shared, s1)
            else:
                gen_image(s1, size, "incomp")
            make_s2_scattered(s1, s2, scattered_offsets(size, 1, 7), "incomp")
            now = time.time()
            set_mtime(s1, now - 7200)
            set_mtime(s2, now - 3600)
            repo = self.work / "dest-mem"
            rmtree(repo)
            subprocess.run([self.snapsync, "init", str(repo)], check=True, capture_output=True)
            row = {"size": size}
            for phase, snap, inp in (("initial", "s1", s1), ("incremental", "s2", s2)):
                m = self.r.timed([self.snapsync, "replicate", f"raw:{d}", str(repo), "--volume",
                                  "vm", "--snapshot", snap, "--json"], inputs=[inp])
                row[phase] = {k: m[k] for k in ("wall", "cpu", "rss")}
                log(f"mem {size_label(size)} {phase}: wall {m['wall']:.2f} s rss {human(m['rss'])}")
            m = self.r.timed([self.snapsync, "restore", str(repo), "vm@s2", str(d / "out.img")])
            row["restore"] = {k: m[k] for k in ("wall", "cpu", "rss")}
            log(f"mem {size_label(size)} restore: wall {m['wall']:.2f} s rss {human(m['rss'])}")
            self.mem_rows.append(row)
            rmtree(repo)
            rmtree(d)

    # -- remote over loopback (issue 6) ----------------------------------------------------

    def remote_loopback(self) -> None:
        """The same full replication of one image into a local repository; pushed over
        `snapsync+http://` on 127.0.0.1 into a repository `snapsync serve` holds; and
        pulled from the image served the same way into a local repository. Client and
        server share this machine's cores. Median of --remote-runs each."""
        size = self.args.remote_size
        d = self.work / "remote"
        rmtree(d)
        (d / "src" / "vm").mkdir(parents=True)
        token = "bench-token-0123456789abcdef"
        (d / "tokens").write_text(token + "\n")
        # TLS is the default: a self-signed certificate as an operator makes one, which the
        # client pins with --ca.
        self.remote_tls = None
        cert, key = d / "cert.pem", d / "key.pem"
        made = shutil.which("openssl") and subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out", str(cert),
             "-days", "2", "-subj", "/CN=snapsync-bench"], capture_output=True).returncode == 0
        if made:
            self.remote_tls = (cert, key)
        else:
            self.note("remote over loopback: no openssl to make a certificate; TLS not measured")
        # From disk is how a replication usually reads; from page cache (an image just
        # written, or small enough to stay cached) leaves only CPU, which client and
        # server then share. Both are reported when the cache can be dropped.
        modes = ["drop", "warm"] if self.r.cache_mode == "drop" else [self.r.cache_mode]
        try:
            for mode in modes:
                self.r.cache_mode = mode
                for kind in ("incomp", "half"):
                    self.remote_one(d, size, kind, mode, token)
        finally:
            self.r.cache_mode = modes[0]
        rmtree(d)

    def remote_one(self, d: Path, size: int, kind: str, cache: str, token: str) -> None:
        """One row of the loopback comparison: local, push and pull of one image."""
        log(f"=== remote over loopback: {size_label(size)} {kind}, page cache {cache}")
        img = self.base_image(kind, size)
        s1 = d / "src" / "vm" / "s1.img"
        if s1.exists():
            s1.unlink()
        os.link(img, s1)
        runs: dict[str, list[dict]] = {"local": [], "push": [], "pull": []}
        if self.remote_tls:
            runs.update({"push_tls": [], "pull_tls": []})
        for _ in range(self.args.remote_runs):
            for where in runs:
                rmtree(d / "src" / ".snapsync")
                repo = d / f"repo-{where}"
                rmtree(repo)
                subprocess.run([self.snapsync, "init", str(repo)], check=True,
                               capture_output=True)
                src = f"raw:{d / 'src'}"
                if where == "local":
                    m = self.r.timed([self.snapsync, "replicate", src, str(repo), "--json"],
                                     inputs=[s1])
                    m["server_cpu"] = 0.0
                elif where.startswith("push"):
                    m = self.timed_remote(
                        lambda url: [self.snapsync, "replicate", src, f"{url}/r", "--json"],
                        f"r=file://{repo}", d / "tokens", token, s1, where.endswith("tls"))
                else:
                    m = self.timed_remote(
                        lambda url: [self.snapsync, "replicate", f"{url}/s", str(repo),
                                     "--json"],
                        f"s={src}", d / "tokens", token, s1, where.endswith("tls"))
                runs[where].append(m)
                log(f"remote {kind} {where}: wall {m['wall']:.2f} s cpu {m['cpu']:.2f} "
                    f"+ server {m['server_cpu']:.2f}")
        row = {"kind": kind, "size": size, "cache": cache}
        for where, ms in runs.items():
            ms.sort(key=lambda m: m["wall"])
            med = ms[len(ms) // 2]
            row[where] = {k: med[k] for k in ("wall", "cpu", "server_cpu", "rss")}
        for where in runs:
            row[f"{where}_ratio"] = row["local"]["wall"] / row[where]["wall"]
        self.remote_rows.append(row)

    def timed_remote(self, cmd, store: str, tokens: Path, token: str, img: Path,
                     tls: bool) -> dict:
        """Run `cmd(url)` against `snapsync serve --store STORE` on a free loopback port,
        over TLS (the certificate pinned with --ca) or in plain text."""
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        if tls:
            cert, key = self.remote_tls
            how = ["--tls-cert", str(cert), "--tls-key", str(key)]
            url, extra = f"snapsync://127.0.0.1:{port}", ["--ca", str(cert)]
        else:
            how = ["--insecure-plaintext"]
            url, extra = f"snapsync+http://127.0.0.1:{port}", []
        server = subprocess.Popen(
            [self.snapsync, "serve", "--listen", f"127.0.0.1:{port}", "--store", store,
             "--token-file", str(tokens)] + how,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(200):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if server.poll() is not None:
                        raise RuntimeError("snapsync serve exited at start")
                    time.sleep(0.05)
            def cpu() -> float:
                f = Path(f"/proc/{server.pid}/stat").read_text().rsplit(")", 1)[1].split()
                return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
            before = cpu()
            m = self.r.timed(cmd(url) + extra, inputs=[img], env={"SNAPSYNC_TOKEN": token})
            m["server_cpu"] = cpu() - before
            return m
        finally:
            server.terminate()
            server.wait()

    # -- chain depth ------------------------------------------------------------------------

    def chain_depth(self) -> None:
        depth, size = self.args.chain_depth, self.args.chain_size
        log(f"=== chain depth: {depth} snapshots of a {size_label(size)} volume")
        d = self.work / "chain"
        rmtree(d)
        (d / "src" / "vm").mkdir(parents=True)
        repo = d / "repo"
        subprocess.run([self.snapsync, "init", str(repo)], check=True, capture_output=True)
        t0 = time.time() - depth - 3600
        name = lambda k: f"s{k:03d}"
        first = d / "src" / "vm" / f"{name(1)}.img"
        gen_image(first, size, "incomp")
        set_mtime(first, t0 + 1)
        keep_first = d / "first.img"
        copy_file(first, keep_first)
        rep_wall = []
        prev = first
        for k in range(1, depth + 1):
            cur = d / "src" / "vm" / f"{name(k)}.img"
            if k > 1:
                make_s2_scattered(prev, cur, scattered_offsets(size, 1, k), "incomp")
                set_mtime(cur, t0 + k)
            t = time.time()
            subprocess.run([self.snapsync, "replicate", f"raw:{d / 'src'}", str(repo),
                            "--volume", "vm", "--snapshot", name(k), "--json"], check=True,
                           capture_output=True)
            rep_wall.append(time.time() - t)
            if k > 1:
                prev.unlink()   # keep the source small: the current and the next image only
            prev = cur
            if k % 50 == 0:
                log(f"chain: {k}/{depth} replicated")
        res = {"depth": depth, "size": size, "repo_bytes": disk_usage(repo),
               "replicate_mean_s": sum(rep_wall) / len(rep_wall)}
        for label, k, ref in (("first", 1, keep_first), ("last", depth, prev)):
            out = d / f"restored-{k}.img"
            m = self.r.timed([self.snapsync, "restore", str(repo), f"vm@{name(k)}", str(out)])
            same = (subprocess.run(["b3sum", "--no-names", str(out)], capture_output=True,
                                   text=True).stdout ==
                    subprocess.run(["b3sum", "--no-names", str(ref)], capture_output=True,
                                   text=True).stdout)
            res[label] = {"snapshot": name(k), "wall": m["wall"], "cpu": m["cpu"],
                          "rss": m["rss"], "identical": same}
            log(f"chain restore {name(k)}: wall {m['wall']:.2f} s cpu {m['cpu']:.2f} s "
                f"rss {human(m['rss'])} identical={same}")
            out.unlink()
        self.chain = res
        rmtree(d)

    # -- output -------------------------------------------------------------------------------

    def ref_row(self, scen: str, phase: str) -> dict | None:
        src = self.scen_info[scen]["source"]
        for r in self.rows:
            if r["scenario"] == scen and r["tool"] == f"snapsync {src}→file" and \
                    r["phase"] == phase:
                return r
        return None

    def scenario_table(self, scen: str) -> list[str]:
        info = self.scen_info[scen]
        out = [f"### {scen}", "",
               f"{info['source']} source, {size_label(info['size'])} "
               f"{'incompressible' if info['kind'] == 'incomp' else 'half-compressible'} image; "
               f"change: {info['change']}; changed 64 KiB blocks: "
               f"{human(info['changed_block_bytes'])}.", ""]
        if info.get("skipped"):
            return out + [f"Skipped: {info['skipped']}.", ""]
        out += ["| tool | phase | wall s | CPU s | peak RSS | stored Δ | written | "
                "tool ÷ snapsync: wall / CPU / RSS / stored |",
                "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in self.rows:
            if r["scenario"] != scen:
                continue
            phase = r["phase"]
            cmp_phase = {"reference": "initial" if r["tool"].startswith("cp") else
                         "incremental"}.get(phase, phase)
            ref = self.ref_row(scen, cmp_phase)
            ratio = ""
            if ref and ref is not r:
                def q(a, b):
                    if a is None or b is None or b <= 0:
                        return "–"
                    return f"{a / b:.2f}x"
                parts = [q(r["wall"], ref["wall"]), q(r["cpu"], ref["cpu"]),
                         q(r["rss"], ref["rss"])]
                parts.append(q(r["stored"], ref["stored"]) if phase != "reference" or
                             r["tool"].startswith("cp") else "–")
                ratio = " / ".join(parts)
                if phase == "reference":
                    ratio += f" (vs snapsync {cmp_phase})"
            elif ref is r:
                extra = ""
                if "sent_bytes" in r:
                    extra = (f"snapsync: read {human(r['read_bytes'])}, changed "
                             f"{human(r['changed_bytes'])}, sent {human(r['sent_bytes'])}")
                ratio = extra
            else:
                if "sent_bytes" in r:
                    ratio = (f"read {human(r['read_bytes'])}, changed "
                             f"{human(r['changed_bytes'])}, sent {human(r['sent_bytes'])}")
            out.append(f"| {r['tool']} | {phase} | {r['wall']:.2f} | {r['cpu']:.2f} | "
                       f"{human(r['rss'])} | {human(r['stored'])} | {human(r['written'])} | "
                       f"{ratio} |")
        out.append("")
        return out

    def find(self, scen, tool, phase):
        for r in self.rows:
            if r["scenario"] == scen and r["tool"] == tool and r["phase"] == phase:
                return r
        return None

    def targets(self) -> list[str]:
        out = ["| measure | target | measured | verdict |", "| --- | --- | --- | --- |"]

        def verdict(ok):
            return "meets" if ok else "**misses**"

        s = "qcow2-incomp-1pct"
        sq = self.find(s, "snapsync qcow2→file", "incremental")
        others = [self.find(s, t, "incremental") for t in ("rsync --inplace", "restic",
                                                          "borg -e none")]
        if sq and all(others):
            ratios = [o["wall"] / sq["wall"] for o in others]
            out.append(f"| incremental from qcow2, 1% | ≥ 20x faster than rsync, restic, borg | "
                       f"snapsync {sq['wall']:.2f} s; rsync {others[0]['wall']:.2f} s "
                       f"({ratios[0]:.1f}x), restic {others[1]['wall']:.2f} s "
                       f"({ratios[1]:.1f}x), borg {others[2]['wall']:.2f} s ({ratios[2]:.1f}x) | "
                       f"{verdict(min(ratios) >= 20)} |")
        else:
            out.append("| incremental from qcow2, 1% | ≥ 20x faster than rsync, restic, borg | "
                       "not measured | – |")
        s = "raw-incomp-1pct"
        sr = self.find(s, "snapsync raw→file", "incremental")
        b3 = self.find(s, "b3sum", "reference")
        if sr and b3:
            out.append(f"| incremental from raw, 1% | ≤ b3sum read + 30% | snapsync "
                       f"{sr['wall']:.2f} s, b3sum {b3['wall']:.2f} s "
                       f"({sr['wall'] / b3['wall']:.2f}x) | {verdict(sr['wall'] <= 1.3 * b3['wall'])} |")
        if sr:
            cb = self.scen_info[s]["changed_block_bytes"]
            out.append(f"| incremental bytes stored, 1% incompressible | ≤ 1.2x the changed "
                       f"64 KiB blocks ({human(cb)}) | {human(sr['stored'])} "
                       f"({sr['stored'] / cb:.2f}x) | {verdict(sr['stored'] <= 1.2 * cb)} |")
            for t in ("restic", "borg -e none", "rsync --inplace"):
                o = self.find(s, t, "incremental")
                if o:
                    out.append(f"| (for comparison: {t}) | | {human(o['stored'])} stored "
                               f"({o['stored'] / cb:.1f}x), {human(o['written'])} written | |")
        si = self.find(s, "snapsync raw→file", "initial")
        cp = self.find(s, "cp (+fsync)", "reference")
        if si and cp:
            out.append(f"| full replication, incompressible raw | within 1.5x of cp | snapsync "
                       f"{si['wall']:.2f} s, cp+fsync {cp['wall']:.2f} s "
                       f"({si['wall'] / cp['wall']:.2f}x) | {verdict(si['wall'] <= 1.5 * cp['wall'])} |")
        if self.mem_rows:
            # "Independent of size": every phase's peak at the largest size within 1.25x of
            # its peak at the smallest, besides staying under 256 MiB.
            rows = sorted(self.mem_rows, key=lambda r: r["size"])
            phases = [p for p in ("initial", "incremental", "restore") if p in rows[0]]
            parts, ok = [], True
            for p in phases:
                small, large = rows[0][p]["rss"], rows[-1][p]["rss"]
                growth = large / small if small else float("inf")
                ok = ok and all(r[p]["rss"] < 256 * MiB for r in rows) and growth <= 1.25
                parts.append(f"{p} " + " → ".join(human(r[p]["rss"]) for r in rows)
                             + f" ({growth:.2f}x)")
            sizes = " → ".join(size_label(r["size"]) for r in rows)
            out.append(f"| peak memory | < 256 MiB, independent of size | {sizes}: "
                       f"{'; '.join(parts)} | {verdict(ok)} |")
        for r in self.remote_rows:
            label = {"incomp": "incompressible", "half": "half-compressible"}[r["kind"]]
            label += f", {CACHE_LABEL[r.get('cache', 'drop')]}"
            for where in ("push", "pull", "push_tls", "pull_tls"):
                if where not in r:
                    continue
                ratio = r[f"{where}_ratio"]
                what = where.replace("_tls", " over loopback with TLS") \
                    if where.endswith("tls") else f"{where} over loopback"
                out.append(f"| (issue 6) {what}, {label} | ≥ 80% of the local "
                           f"replication's throughput | {r[where]['wall']:.2f} s, "
                           f"local {r['local']['wall']:.2f} s ({100 * ratio:.0f}%) | "
                           f"{verdict(ratio >= 0.8)} |")
        return out + [""]

    def memory_note(self) -> str:
        if self.r.warm_memory <= 0:
            return "taken as it comes."
        return (f"this machine hands memory it frees back to its host (virtio-balloon free "
                f"page reporting), and touching such memory again costs the host's page "
                f"faults (writing 1 GiB into fresh page cache: 3.5 s of system time instead "
                f"of 0.25 s), charged to whichever run meets it first. Before every timed "
                f"run from page cache the harness touches and frees "
                f"{human(self.r.warm_memory)}, so that every such run gets memory in use a "
                f"moment ago; runs from disk mostly reuse the page cache just dropped.")

    def machine(self) -> list[str]:
        def cmd(c):
            try:
                return subprocess.run(c, capture_output=True, text=True, shell=True,
                                      timeout=30).stdout.strip()
            except Exception:
                return "?"
        cpu = cmd("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip()
        mem = cmd("awk '/MemTotal/ {printf \"%.1f GiB\", $2/1048576}' /proc/meminfo")
        dev = cmd(f"df --output=source {self.work} | tail -1")
        fstype = cmd(f"df --output=fstype {self.work} | tail -1")
        parts = cmd(f"lsblk -dno NAME,SIZE,ROTA {dev} 2>/dev/null").split()
        model = cmd(f"lsblk -dno MODEL {dev} 2>/dev/null")
        disk = (f"{parts[0]}, {parts[1]}{', ' + model if model else ''}, rotational="
                f"{parts[2]}" if len(parts) == 3 else dev)
        vers = {
            "snapsync": cmd(f"{self.snapsync} --version") + " (git " +
            cmd(f"git -C {REPO_ROOT} rev-parse --short HEAD") +
            (", dirty tree" if cmd(f"git -C {REPO_ROOT} status --porcelain -uno") else "") + ")",
            "rsync": cmd("rsync --version | head -1"),
            "restic": cmd("restic version"),
            "borg": cmd("borg --version"),
            "b3sum": cmd("b3sum --version"),
            "qemu-img": cmd("qemu-img --version | head -1"),
            "cp": cmd("cp --version | head -1"),
        }
        return [
            f"- CPU: {cpu}; `nproc` = {os.cpu_count()}",
            f"- memory: {mem}",
            f"- disk: {disk}, {fstype}, work dir `{self.work}`",
            f"- kernel: {platform.release()}",
            f"- load average at start / end: {self.load_start} / {self.load_end} "
            f"(other engineers' builds and tests share the machine)",
            "- tools: " + "; ".join(f"{k} `{v}`" for k, v in vers.items()),
            "",
        ]

    def render(self) -> str:
        a = self.args
        cache = ("dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`) before every timed run, "
                 "so every tool reads its input from disk" if self.r.cache_mode == "drop" else
                 "not droppable here: every input image was read once (warmed) before every "
                 "timed run, so every tool reads it from page cache")
        lines = [
            "# Benchmarks",
            "",
            "snapsync side by side with rsync, restic, borg and qemu-img on the same generated "
            "data in the same run (issue 7). **This file is regenerated by**",
            "",
            "```sh",
            f"bash bench/run.sh {' '.join(self.argv)}".rstrip(),
            "```",
            "",
            "(`bash bench/run.sh --help` for the options; the findings section at the end is "
            "hand-written and kept across regenerations.)",
            "",
            f"Generated {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}.",
            "",
            "## Machine",
            "",
        ] + self.machine() + [
            "## Method",
            "",
            f"- Page cache: {cache}.",
            f"- Memory: {self.memory_note()}",
            "- Each tool gets a fresh destination; the initial copy (snapshot s1) then the "
            "incremental one (s2). Wall, CPU (user+sys) and peak RSS from `/usr/bin/time -f "
            "'%e %U %S %M %O'`; *stored Δ* is the growth of the destination (allocated bytes "
            "of the directory or repository; for S3 the bucket's object bytes); *written* is "
            "what the process wrote to the filesystem (`%O` × 512, i.e. rusage oublock).",
            "- snapsync: `snapsync replicate SOURCE DEST --volume vm --snapshot sN --json` into "
            "a fresh repository (`init`, default 64 KiB blocks); its per-image hash cache "
            "(`DIR/.snapsync`) is emptied before each tool's initial run, so the incremental "
            "run may use only what the initial one cached. S3: moto_server on loopback "
            "(its CPU and memory are not in snapsync's numbers).",
            "- rsync: `rsync --inplace --no-whole-file IMG DEST/IMG`. restic: local repository, "
            "`restic backup` (default compression). borg: `borg init -e none`, `borg create` "
            "(default lz4). The file tools back up one stable path, hard-linked to s1's image "
            "then to s2's.",
            "- qcow2: one image with internal snapshots s1 and s2 (`qemu-img convert -f raw -O "
            "qcow2`, `qemu-img snapshot -c s1`, `qemu-io -c 'write -s PATTERN OFF 100k'` …, "
            "`snapshot -c s2`; the written data is random, like the raw scenarios). snapsync "
            "reads the snapshots inside the image; rsync/restic/borg copy the image file as it "
            "was after s1 and after s2; `qemu-img convert -l snapshot.name=sN`, whose "
            "\"incremental\" is a second full convert (qemu-img has no incremental copy out of "
            "an internal snapshot: `convert -B s1.qcow2` still writes every allocated cluster).",
            "- repo (a cascade, e.g. off-site): a snapsync repository holding s1, then also s2, "
            "replicated into another (`snapsync replicate REPO DEST --volume vm --snapshot "
            "sN`); `rsync -a --delete` of the repository's files; `restic copy` between two "
            "restic repositories, the source one holding `restic backup`s of the same images. "
            "The sources are filled untimed.",
            "- References: `cp` of the s2 image followed by `sync FILE` (the machine's "
            "copy limit, with the same durability as snapsync's fsync), and `b3sum` of it "
            "(read + hash limit, all cores). Their ratio columns compare them with snapsync's "
            "initial (cp) and incremental (b3sum) runs.",
            "- Ratios are *tool ÷ snapsync* for the same phase: above 1 means snapsync is "
            "faster / leaner.",
            "- Timing numbers from a shared 2-core machine are noisy; rerun on a quiet machine "
            "for numbers to quote.",
            "",
        ]
        if self.notes:
            lines += ["Notes from this run:", ""] + [f"- {n}" for n in self.notes] + [""]
        lines += ["## Where snapsync stands (issue 7's targets)", ""] + self.targets()
        lines += ["## Scenarios", ""]
        for scen in self.scen_info:
            lines += self.scenario_table(scen)
        if self.mem_rows:
            lines += ["## Peak memory against image size", "",
                      "Incompressible raw image, full replication then 1% scattered change, "
                      "into a local repository; then a restore of s2.", "",
                      "| image | initial: wall / peak RSS | incremental: wall / peak RSS | "
                      "restore: wall / peak RSS |", "| --- | --- | --- | --- |"]
            for r in self.mem_rows:
                cells = [f"{r[p]['wall']:.2f} s / {human(r[p]['rss'])}"
                         for p in ("initial", "incremental", "restore")]
                lines.append(f"| {size_label(r['size'])} | " + " | ".join(cells) + " |")
            lines.append("")
        if self.remote_rows:
            lines += ["## Remote over loopback", "",
                      f"Full replication of one {size_label(self.remote_rows[0]['size'])} raw "
                      "image into a fresh local repository (local); the same pushed over "
                      "`snapsync+http://127.0.0.1` into a fresh repository served by "
                      "`snapsync serve --insecure-plaintext` (push); and pulled from the image "
                      "served that way into a fresh local repository (pull). Client and server "
                      "share this machine's cores. Each image is read from disk (page cache "
                      "dropped before every run) and from page cache (read once before every "
                      "run), where only CPU limits. Median wall of "
                      f"{self.args.remote_runs} runs each; CPU is user+sys.", "",
                      "| data | read | local: wall / CPU | push: wall / client + server CPU | "
                      "push ÷ local | pull: wall / client + server CPU | pull ÷ local |",
                      "| --- | --- | --- | --- | --- | --- | --- |"]
            for r in self.remote_rows:
                lo = r["local"]
                label = {"incomp": "incompressible", "half": "half-compressible"}[r["kind"]]
                label += f" | {CACHE_LABEL[r.get('cache', 'drop')]}"
                cells = [f"{lo['wall']:.2f} s / {lo['cpu']:.2f} s"]
                for where in ("push", "pull"):
                    m = r[where]
                    cells += [f"{m['wall']:.2f} s / {m['cpu']:.2f} s + {m['server_cpu']:.2f} s",
                              f"{100 * r[where + '_ratio']:.0f}%"]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            lines.append("")
            tls_rows = [r for r in self.remote_rows if "push_tls" in r]
            if tls_rows:
                lines += ["With TLS, the default (a self-signed certificate pinned with "
                          "`--ca`; `snapsync://`), the same runs interleaved with those above:",
                          "", "| data | read | push TLS: wall / client + server CPU | "
                          "push TLS ÷ local | pull TLS: wall / client + server CPU | "
                          "pull TLS ÷ local |", "| --- | --- | --- | --- | --- | --- |"]
                for r in tls_rows:
                    label = {"incomp": "incompressible", "half": "half-compressible"}[r["kind"]]
                    label += f" | {CACHE_LABEL[r.get('cache', 'drop')]}"
                    cells = []
                    for where in ("push_tls", "pull_tls"):
                        m = r[where]
                        cells += [f"{m['wall']:.2f} s / {m['cpu']:.2f} s + "
                                  f"{m['server_cpu']:.2f} s", f"{100 * r[where + '_ratio']:.0f}%"]
                    lines.append(f"| {label} | " + " | ".join(cells) + " |")
                lines.append("")
        if self.chain:
            c = self.chain
            lines += ["## Chain depth", "",
                      f"{c['depth']} snapshots of a {size_label(c['size'])} incompressible "
                      f"volume, each 1% scattered 100 KiB writes after the previous one, "
                      f"replicated one by one into a local repository (mean "
                      f"{c['replicate_mean_s']:.2f} s each; repository "
                      f"{human(c['repo_bytes'])}). Then:", "",
                      "| restore | wall s | CPU s | peak RSS | bit-identical |",
                      "| --- | ---: | ---: | ---: | --- |"]
            for k in ("first", "last"):
                x = c[k]
                lines.append(f"| {x['snapshot']} ({k} of the chain) | {x['wall']:.2f} | "
                             f"{x['cpu']:.2f} | {human(x['rss'])} | {x['identical']} |")
            lines += ["", f"Restoring the {c['depth']}th snapshot takes "
                      f"{c['last']['wall'] / max(c['first']['wall'], 1e-3):.2f}x the time of "
                      "the 1st.", ""]
        return "\n".join(lines)

    def write_doc(self) -> None:
        doc = Path(self.args.out)
        findings = (f"{FINDINGS_BEGIN}\n## Findings\n\n(none written yet)\n{FINDINGS_END}\n")
        if doc.exists():
            old = doc.read_text()
            if FINDINGS_BEGIN in old and FINDINGS_END in old:
                a = old.index(FINDINGS_BEGIN)
                b = old.index(FINDINGS_END) + len(FINDINGS_END)
                findings = old[a:b] + "\n"
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(self.render() + "\n" + findings)
        log(f"wrote {doc}")

    def run(self, argv) -> None:
        self.argv = argv
        self.load_start = Path("/proc/loadavg").read_text().split()[0]
        log(f"page cache: {self.r.cache_mode}; work dir {self.work}; snapsync {self.snapsync}")
        self.check_stores()
        if self.qcow2_skip:
            self.note(self.qcow2_skip)
        if self.s3_skip:
            self.note(f"S3 scenarios skipped: {self.s3_skip}")
        try:
            for scen in self.args.scenarios:
                self.scenario(scen)
                print("\n".join(self.scenario_table(scen)), flush=True)
            if self.args.mem_sizes:
                self.mem_scaling()
            if self.args.remote_runs > 0:
                self.remote_loopback()
            if self.args.chain_depth > 0:
                self.chain_depth()
        finally:
            self.moto.stop()
            self.load_end = Path("/proc/loadavg").read_text().split()[0]
            (self.work / "results.json").write_text(json.dumps(
                {"rows": self.rows, "scenarios": self.scen_info, "mem": self.mem_rows,
                 "remote": self.remote_rows, "chain": self.chain, "notes": self.notes},
                indent=1))
            if self.rows or self.mem_rows or self.chain or self.remote_rows:
                print("\n".join(["## Where snapsync stands"] + self.targets()), flush=True)
                if not self.args.no_doc:
                    self.write_doc()
            if not self.args.keep:
                rmtree(self.work / "base")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=parse_size("2GiB"),
                    help="image size of the scenarios (default 2GiB)")
    ap.add_argument("--work", default=None,
                    help="work dir for generated data and destinations (default /tmp/snapsync-bench)")
    ap.add_argument("--snapsync", required=True, help="the snapsync binary (run.sh passes it)")
    ap.add_argument("--scenarios", default=",".join(ALL_SCENARIOS),
                    help="comma-separated subset of: " + ", ".join(ALL_SCENARIOS))
    ap.add_argument("--tools", default="snapsync,rsync,restic,borg,qemu-img,refs",
                    help="comma-separated subset of snapsync,rsync,restic,borg,qemu-img,refs")
    ap.add_argument("--mem-sizes", default="2GiB,8GiB",
                    help="image sizes for the peak-memory scaling run ('' to skip; default 2GiB,8GiB)")
    ap.add_argument("--no-mem-scaling", action="store_true", help="skip the memory scaling run")
    ap.add_argument("--remote-runs", type=int, default=5,
                    help="runs (median taken) of the loopback remote-vs-local comparison (0 skips; "
                         "default 5)")
    ap.add_argument("--remote-size", type=parse_size, default=parse_size("1GiB"),
                    help="image size of the loopback remote-vs-local comparison (default 1GiB)")
    ap.add_argument("--chain-depth", type=int, default=200,
                    help="snapshots in the chain-depth benchmark (0 skips; default 200)")
    ap.add_argument("--chain-size", type=parse_size, default=parse_size("64MiB"),
                    help="volume size of the chain-depth benchmark (default 64MiB)")
    ap.add_argument("--cache", choices=["auto", "drop", "warm"], default="auto",
                    help="page cache policy: drop before every run (auto: when permitted), or "
                         "warm every input by reading it once")
    ap.add_argument("--warm-memory", type=parse_size, default=-1,
                    help="memory to touch and free before every timed run (default: 2GiB "
                         "on a guest with free page reporting, else 0)")
    ap.add_argument("--no-s3", action="store_true", help="skip the S3 (moto) runs")
    ap.add_argument("--out", default=str(REPO_ROOT / "docs" / "BENCHMARKS.md"),
                    help="results file (default docs/BENCHMARKS.md)")
    ap.add_argument("--no-doc", action="store_true", help="print only; leave docs/BENCHMARKS.md")
    ap.add_argument("--keep", action="store_true", help="keep the generated base images")
    argv = sys.argv[1:]
    args = ap.parse_args(argv)
    args.work = args.work or os.path.join(tempfile.gettempdir(), "snapsync-bench")
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    for s in args.scenarios:
        if s not in ALL_SCENARIOS:
            ap.error(f"unknown scenario {s!r}")
    args.tools = set(t for t in args.tools.split(",") if t)
    args.mem_sizes = [] if args.no_mem_scaling else \
        [parse_size(s) for s in args.mem_sizes.split(",") if s]
    # drop the binary path (run.sh adds it) from the command line shown in the doc
    i = 0
    clean = []
    while i < len(argv):
        if argv[i] == "--snapsync":
            i += 2
            continue
        if argv[i].startswith("--snapsync="):
            i += 1
            continue
        clean.append(argv[i])
        i += 1
    Bench(args).run(clean)


if __name__ == "__main__":
    main()
