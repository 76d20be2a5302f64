//! Helpers shared by the integration tests: drive real qemu-img/qemu-io
//! and compare our reader against QEMU's own conversions.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use snapsync_qcow2::{DiffExtent, ExtentKind, Qcow2Image, View};

/// Run a command, panic with its output if it fails; returns stdout.
pub fn run(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

/// Run several qemu-io commands in one invocation.
pub fn qemu_io(img: &Path, fmt: &str, cmds: &[String]) {
    // cache=unsafe: no flush per write (much faster; qemu-io still flushes on exit).
    let mut args: Vec<String> = vec!["-t".into(), "unsafe".into(), "-f".into(), fmt.into()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(img.display().to_string());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("qemu-io", &refs);
    assert!(
        !out.contains("error") && !out.contains("failed"),
        "qemu-io reported a problem: {out}"
    );
}

/// `qemu-img convert -O raw` of an image (optionally an internal snapshot), read back.
pub fn to_raw(img: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let out = img.with_extension(format!(
        "{}.raw",
        snapshot.unwrap_or("active").replace('/', "_")
    ));
    let mut args = vec!["convert".to_string()];
    if let Some(s) = snapshot {
        args.push("-l".into());
        args.push(format!("snapshot.name={s}"));
    }
    args.extend([
        "-O".into(),
        "raw".into(),
        img.display().to_string(),
        out.display().to_string(),
    ]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    qemu_img(&refs);
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

/// Read a whole view through our reader, in odd-sized chunks to exercise
/// unaligned reads.
pub fn read_view(img: &Qcow2Image, view: View) -> Vec<u8> {
    let size = img.view_size(view).unwrap();
    let mut out = vec![0u8; size as usize];
    let step = (img.cluster_size() * 3 + 1234) as usize;
    let mut pos = 0usize;
    while pos < out.len() {
        let n = step.min(out.len() - pos);
        img.read_at(view, pos as u64, &mut out[pos..pos + n])
            .unwrap();
        pos += n;
    }
    out
}

pub fn assert_same(ours: &[u8], theirs: &[u8], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: length differs");
    if let Some(i) = ours.iter().zip(theirs).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: ours {:#x}, qemu {:#x}",
            ours[i], theirs[i]
        );
    }
}

/// Check that extents are sorted, non-overlapping, coalesced and within `size`.
pub fn assert_well_formed(ext: &[DiffExtent], size: u64) {
    for w in ext.windows(2) {
        assert!(w[0].end() <= w[1].offset, "overlap/unsorted: {w:?}");
        assert!(
            !(w[0].end() == w[1].offset && w[0].kind == w[1].kind),
            "not coalesced: {w:?}"
        );
    }
    for e in ext {
        assert!(
            e.len > 0 && e.end() <= size,
            "bad extent {e:?} (size {size})"
        );
    }
}

/// Diff extents must cover every changed byte (with Zero extents really
/// reading zeros in `new`), and - when `minimal` - every cluster touched by
/// an extent must contain a changed byte. `old` is zero-extended or
/// truncated to the length of `new`. Uses slice comparisons (memcmp) so it
/// stays fast in debug builds.
pub fn check_diff(
    old: &[u8],
    new: &[u8],
    ext: &[DiffExtent],
    cluster: u64,
    minimal: bool,
    what: &str,
) {
    assert_well_formed(ext, new.len() as u64);
    let mut old = old.to_vec();
    old.resize(new.len(), 0);
    let zeros = vec![0u8; new.len()];
    let mut pos = 0usize;
    for e in ext {
        let (s, t) = (e.offset as usize, e.end() as usize);
        if new[pos..s] != old[pos..s] {
            let i = pos + (pos..s).position(|i| new[i] != old[i]).unwrap();
            panic!("{what}: byte {i} changed but no extent covers it; extents {ext:?}");
        }
        if e.kind == ExtentKind::Zero {
            assert!(
                new[s..t] == zeros[s..t],
                "{what}: Zero extent {e:?} has data"
            );
        }
        pos = t;
    }
    if new[pos..] != old[pos..] {
        let i = pos + (pos..new.len()).position(|i| new[i] != old[i]).unwrap();
        panic!("{what}: byte {i} changed after the last extent; extents {ext:?}");
    }
    if minimal {
        let c = cluster as usize;
        for e in ext {
            let first = e.offset as usize / c;
            let last = (e.end() as usize - 1) / c;
            for k in first..=last {
                let s = k * c;
                let t = ((k + 1) * c).min(new.len());
                assert!(
                    new[s..t] != old[s..t],
                    "{what}: extent {e:?} covers unchanged cluster {k}"
                );
            }
        }
    }
}

pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub fn p(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

pub fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Set the date of internal snapshot `name` of `img` by patching its entry in the
/// snapshot table (qemu-img offers no way to choose it). No checksum covers the
/// table, so QEMU still accepts the image.
pub fn set_snapshot_date(img: &Path, name: &str, secs: u32, nanos: u32) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let mut h = [0u8; 72];
    f.read_exact_at(&mut h, 0).unwrap();
    let n = u32::from_be_bytes(h[60..64].try_into().unwrap());
    let mut off = u64::from_be_bytes(h[64..72].try_into().unwrap());
    for _ in 0..n {
        let mut e = [0u8; 40];
        f.read_exact_at(&mut e, off).unwrap();
        let id_len = u64::from(u16::from_be_bytes([e[12], e[13]]));
        let name_len = u64::from(u16::from_be_bytes([e[14], e[15]]));
        let extra = u64::from(u32::from_be_bytes(e[36..40].try_into().unwrap()));
        let mut nm = vec![0u8; name_len as usize];
        f.read_exact_at(&mut nm, off + 40 + extra + id_len).unwrap();
        if nm == name.as_bytes() {
            f.write_all_at(&secs.to_be_bytes(), off + 16).unwrap();
            f.write_all_at(&nanos.to_be_bytes(), off + 20).unwrap();
            return;
        }
        off += (40 + extra + id_len + name_len).div_ceil(8) * 8;
    }
    panic!("no snapshot {name:?} in {}", img.display());
}

/// Make `img` (already `prev.len()` bytes of virtual size, reading `prev`) read `next`:
/// grow it if needed, then rewrite only the clusters that differ, whole (zero clusters
/// with `write -z`), so that metadata diffs see exactly those clusters.
pub fn apply_clusters(img: &Path, prev: &[u8], next: &[u8], cluster: usize) {
    assert!(next.len() >= prev.len() && next.len().is_multiple_of(512));
    if next.len() > prev.len() {
        qemu_img(&["resize", "-q", &s(img), &next.len().to_string()]);
    }
    let dir = img.parent().unwrap();
    let mut cmds = Vec::new();
    let mut k = 0;
    let changed = |k: usize| {
        let (a, b) = (k * cluster, ((k + 1) * cluster).min(next.len()));
        let old = prev.get(a..b.min(prev.len())).unwrap_or(&[]);
        let new = &next[a..b];
        old != &new[..old.len()] || new[old.len()..].iter().any(|x| *x != 0)
    };
    let is_zero = |k: usize| {
        next[k * cluster..((k + 1) * cluster).min(next.len())]
            .iter()
            .all(|x| *x == 0)
    };
    let clusters = next.len().div_ceil(cluster);
    while k < clusters {
        if !changed(k) {
            k += 1;
            continue;
        }
        let zero = is_zero(k);
        let mut e = k + 1;
        while e < clusters && changed(e) && is_zero(e) == zero {
            e += 1;
        }
        let (a, b) = (k * cluster, (e * cluster).min(next.len()));
        if zero {
            cmds.push(format!("write -q -z {a} {}", b - a));
        } else {
            let pat = dir.join(format!(".pattern-{a}"));
            std::fs::write(&pat, &next[a..b]).unwrap();
            cmds.push(format!("write -q -s {} {a} {}", pat.display(), b - a));
        }
        k = e;
    }
    if !cmds.is_empty() {
        qemu_io(img, "qcow2", &cmds);
    }
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".pattern-")
        {
            std::fs::remove_file(p).unwrap();
        }
    }
}
