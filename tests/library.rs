//! The library with an object store the caller built: `s3://` URLs reach it instead of
//! one configured from `AWS_*`, with the URL's prefix applied inside it.

use std::sync::Arc;

use snapsync::object_store::memory::InMemory;
use snapsync::object_store::ObjectStore;
use snapsync::{OpenOptions, ReplicateOptions, Repository, StoreUrl};

#[test]
fn an_s3_url_reaches_the_callers_object_store_under_its_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let vm = dir.path().join("images/vm");
    std::fs::create_dir_all(&vm).unwrap();
    let image: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(vm.join("s1.img"), &image).unwrap();

    let bucket = Arc::new(InMemory::new());
    let options = OpenOptions::default().with_object_store(bucket.clone());
    let url = "s3://any-bucket/backups/site-a";
    let StoreUrl::Repo(location) = StoreUrl::parse(url).unwrap() else {
        panic!("{url} is a repository URL");
    };
    Repository::init_with(options.location(&location), 65536, &options.repo).unwrap();

    let source = snapsync::open_source(
        &format!("raw:{}", dir.path().join("images").display()),
        &options,
    )
    .unwrap();
    let dest = snapsync::open_sink(url, &options).unwrap();
    let reports = snapsync::replicate(
        source.as_ref(),
        dest.as_ref(),
        &ReplicateOptions::default(),
        &snapsync::NoProgress,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(reports.len(), 1);
    assert_eq!(dest.location(), url);

    // Every object is under the prefix, in the caller's store.
    let keys: Vec<String> = futures::executor::block_on(async {
        use futures::StreamExt;
        bucket
            .list(None)
            .map(|m| m.unwrap().location.to_string())
            .collect()
            .await
    });
    assert!(
        keys.iter().any(|k| k == "backups/site-a/config"),
        "{keys:?}"
    );
    assert!(
        keys.iter().all(|k| k.starts_with("backups/site-a/")),
        "{keys:?}"
    );

    // Read back through a second open of the same URL.
    let again = snapsync::open_source(url, &options).unwrap();
    let mut reader = again.open_snapshot("vm", "s1").unwrap();
    let mut back = vec![0u8; image.len()];
    reader.read_at(0, &mut back).unwrap();
    assert!(back == image);
}
