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

/// Replicate a directory into a local repository, then through a server into a
/// second one, and read back, all called (and dropped) from inside async code.
fn from_async_code() {
    use snapsync_remote::{ServedStore, Server, ServerConfig, Tokens};
    let dir = tempfile::tempdir().unwrap();
    let vm = dir.path().join("images/vm");
    std::fs::create_dir_all(&vm).unwrap();
    let image: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 13 % 253) as u8).collect();
    std::fs::write(vm.join("s1.img"), &image).unwrap();
    let options = OpenOptions::default();
    let source = snapsync::open_source(
        &format!("raw:{}", dir.path().join("images").display()),
        &options,
    )
    .unwrap();
    let local = dir.path().join("local");
    Repository::init_with(
        snapsync::Location::Local(local.clone()),
        65536,
        &options.repo,
    )
    .unwrap();
    let dest = snapsync::open_sink(&format!("file://{}", local.display()), &options).unwrap();
    snapsync::replicate(
        source.as_ref(),
        dest.as_ref(),
        &ReplicateOptions::default(),
        &snapsync::NoProgress,
        &mut |_| {},
    )
    .unwrap();

    struct Served(Repository);
    impl ServedStore for Served {
        fn source(&self) -> &dyn snapsync::SnapshotSource {
            &self.0
        }
        fn sink(&self) -> Option<&dyn snapsync::SnapshotSink> {
            Some(&self.0)
        }
    }
    let remote_dir = dir.path().join("remote");
    let served =
        Repository::init_with(snapsync::Location::Local(remote_dir), 65536, &options.repo).unwrap();
    let token = "library-async-token-0123456789";
    let server = Server::bind(
        ServerConfig::plaintext(
            vec![(
                "r".to_string(),
                Arc::new(Served(served)) as Arc<dyn ServedStore>,
            )],
            Tokens::parse(token).unwrap(),
        ),
        "127.0.0.1:0",
    )
    .unwrap();
    let port = server.spawn().unwrap().port();
    let remote_options = OpenOptions::default().with_client(snapsync::ClientOptions::new(token));
    let remote = snapsync::open_sink(
        &format!("snapsync+http://127.0.0.1:{port}/r"),
        &remote_options,
    )
    .unwrap();
    let local_source =
        snapsync::open_source(&format!("file://{}", local.display()), &options).unwrap();
    let reports = snapsync::replicate(
        local_source.as_ref(),
        remote.as_ref(),
        &ReplicateOptions::default(),
        &snapsync::NoProgress,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(reports.len(), 1);
    let back = snapsync::open_source(
        &format!("snapsync+http://127.0.0.1:{port}/r"),
        &remote_options,
    )
    .unwrap();
    let mut reader = back.open_snapshot("vm", "s1").unwrap();
    let mut bytes = vec![0u8; image.len()];
    reader.read_at(0, &mut bytes).unwrap();
    assert!(bytes == image);
    drop(reader);
    // Every store (and its runtime) is dropped here, inside the caller's runtime.
}

#[tokio::test(flavor = "current_thread")]
async fn the_library_works_from_a_current_thread_runtime() {
    from_async_code();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_works_from_a_multi_thread_runtime() {
    from_async_code();
}
