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
