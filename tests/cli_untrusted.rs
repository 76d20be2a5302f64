//! Images made by someone else, through the binary: a qcow2 backing file may not lead
//! out of the store's directory unless the URL says `?backing=any`.

mod common;

use common::*;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_backing_file_outside_the_store_is_refused_unless_the_url_allows_any() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let img = images.join("passwd.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "../../../../../../../../etc/passwd",
        "-F",
        "raw",
        img.to_str().unwrap(),
        "64K",
    ]);
    qemu_img(&["snapshot", "-c", "s1", img.to_str().unwrap()]);
    let repo = init_repo(dir.path(), &[]);
    let url = format!("qcow2://{}", images.display());
    for args in [
        vec!["list", url.as_str()],
        vec!["replicate", url.as_str(), repo.as_str()],
    ] {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("passwd.qcow2") && err.contains("etc/passwd") && err.contains("outside"),
            "{args:?}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    assert_eq!(
        ok(&["list", &repo, "--json"]).trim(),
        r#"{"skipped":[],"volumes":[]}"#,
        "nothing was replicated"
    );

    let trusted = format!("{url}?backing=any");
    ok(&["list", &trusted]);
    ok(&["replicate", &trusted, &repo]);
    assert!(ok(&["list", &repo]).contains("passwd"));
}

/// The file offset of entry `index` of `img`'s snapshot table (walking the entries as
/// the qcow2 specification lays them out).
fn snapshot_entry_offset(img: &std::path::Path, index: usize) -> u64 {
    let bytes = std::fs::read(img).unwrap();
    let be64 = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
    let be32 = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as u64;
    let be16 = |at: usize| u16::from_be_bytes(bytes[at..at + 2].try_into().unwrap()) as u64;
    let mut pos = be64(64);
    for _ in 0..index {
        let p = pos as usize;
        let len = 40 + be32(p + 36) + be16(p + 12) + be16(p + 14);
        pos += len.div_ceil(8) * 8;
    }
    pos
}

#[test]
fn a_damaged_snapshot_entry_is_skipped_and_named_and_the_others_stay_readable() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let img = images.join("vm.qcow2");
    let i = img.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", i, "1M"]);
    for (k, name) in ["s1", "s2", "s3"].iter().enumerate() {
        qemu_write(&img, "qcow2", k as u64 * 65536, &random(k as u64, 65536));
        qemu_img(&["snapshot", "-c", name, i]);
    }
    // Entry 1 (s2): its L1 table at an offset that is not cluster-aligned.
    let entry = snapshot_entry_offset(&img, 1);
    let file = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    file.write_all_at(&12_345u64.to_be_bytes(), entry).unwrap();
    drop(file);
    // qemu-img still lists the image and its snapshots.
    let info = qemu_img(&["snapshot", "-l", i]);
    assert!(
        info.contains("s1") && info.contains("s2") && info.contains("s3"),
        "{info}"
    );

    let url = format!("qcow2://{}", images.display());
    let out = run(&["list", &url, "--json"]);
    let listed = success(&["list", &url, "--json"], &out);
    let warning = stderr(&out);
    assert!(
        warning.contains("warning: skipped") && warning.contains("\\\"s2\\\""),
        "{warning}"
    );
    let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let names: Vec<&str> = v["volumes"][0]["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["s1", "s3"]);
    let skipped = v["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{v}");
    assert!(skipped[0]["what"].as_str().unwrap().contains("#1"), "{v}");
    assert!(
        skipped[0]["reason"]
            .as_str()
            .unwrap()
            .contains("cluster-aligned"),
        "{v}"
    );

    let repo = init_repo(dir.path(), &[]);
    let out = run(&["replicate", &url, &repo]);
    success(&["replicate"], &out);
    assert!(
        stderr(&out).contains("warning: skipped"),
        "{}",
        stderr(&out)
    );
    for snap in ["s1", "s3"] {
        let restored = dir.path().join(format!("{snap}.raw"));
        ok(&[
            "restore",
            &repo,
            &format!("vm@{snap}"),
            restored.to_str().unwrap(),
        ]);
        assert!(
            std::fs::read(&restored).unwrap() == qemu_raw(&img, Some(snap), 1 << 20),
            "{snap} differs from qemu-img's"
        );
    }
}

#[test]
fn raw_images_whose_names_do_not_fit_are_reported_not_dropped_in_silence() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    write_image(&src, "v", "mon", &random(1, 65536), 1_000);
    write_image(&src, "v", "mon day", &random(2, 65536), 2_000);
    write_image(&src, "w", "dienstag-ü", &random(3, 65536), 3_000);
    write_image(&src, "bad vol", "s1", &random(4, 65536), 4_000);
    std::fs::write(src.join("loose.img"), b"x").unwrap();
    std::fs::create_dir(src.join("v/dir.img")).unwrap();
    // Not images: no report.
    std::fs::write(src.join("v/notes.txt"), b"x").unwrap();
    std::fs::write(src.join("v/.partial.img"), b"x").unwrap();

    let url = format!("raw:{}", src.display());
    let out = run(&["list", &url, "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&success(&["list"], &out)).unwrap();
    let skipped: Vec<(String, String)> = listed["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["what"].as_str().unwrap().to_string(),
                s["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let what: Vec<&str> = skipped
        .iter()
        .map(|(w, _)| w.strip_prefix(src.to_str().unwrap()).unwrap())
        .collect();
    assert_eq!(
        what,
        [
            "/bad vol",
            "/loose.img",
            "/v/dir.img",
            "/v/mon day.img",
            "/w/dienstag-ü.img"
        ],
        "{skipped:?}"
    );
    assert!(skipped.iter().all(|(_, reason)| !reason.is_empty()));
    let warnings = stderr(&out);
    assert_eq!(
        warnings
            .lines()
            .filter(|l| l.starts_with("warning: skipped"))
            .count(),
        5,
        "{warnings}"
    );
    assert_eq!(listed["volumes"].as_array().unwrap().len(), 1, "{listed}");

    let repo = init_repo(dir.path(), &[]);
    let out = run(&["replicate", &url, &repo]);
    success(&["replicate"], &out);
    assert!(stderr(&out).contains("mon day.img"), "{}", stderr(&out));
    assert!(ok(&["list", &repo]).contains("mon"));
}

#[test]
fn a_raw_image_written_while_it_is_read_commits_nothing_and_the_rerun_succeeds() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let img = write_image(&src, "vm", "live", &random(5, 32 << 20), 1_000);
    let repo = init_repo(dir.path(), &[]);
    let url = format!("raw:{}", src.display());

    // Append while replicate runs: at least once before it starts, then every 2 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let writer = {
        let stop = stop.clone();
        let img = img.clone();
        std::thread::spawn(move || {
            let mut f = std::fs::OpenOptions::new().append(true).open(&img).unwrap();
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                f.write_all(&random(100 + k, 4096)).unwrap();
                if k == 0 {
                    started_tx.send(()).unwrap();
                }
                k += 1;
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        })
    };
    started_rx.recv().unwrap();
    let out = run(&["replicate", &url, &repo]);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("changed while it was read"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        ok(&["list", &repo]).contains("no volumes"),
        "nothing committed"
    );

    // Still now: the rerun succeeds, and restores what the image holds.
    ok(&["replicate", &url, &repo]);
    let restored = dir.path().join("restored.img");
    ok(&["restore", &repo, "vm@live", restored.to_str().unwrap()]);
    assert!(std::fs::read(&restored).unwrap() == std::fs::read(&img).unwrap());
}
