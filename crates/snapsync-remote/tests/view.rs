//! A served repository's size and chains (`stats`, `chains`: what the daemon's status
//! page shows of a `snapsync://` destination), over the protocol on 127.0.0.1: a client
//! with a read-only token is told exactly what the repository says of itself, manifests
//! it already knows are not read again, and a store that is not a repository says so.

use std::sync::Arc;

use snapsync_engine::{replicate, ReplicateOptions};
use snapsync_remote::{ClientOptions, RemoteStore, ServedStore, Server, ServerConfig, Tokens};
use snapsync_repo::{Location, Repository};
use snapsync_store::conformance::standard_fixture;
use snapsync_store::memory::MemoryStore;
use snapsync_store::view::{known, Known, RepositoryView};
use snapsync_store::{NoProgress, SnapshotSink, SnapshotSource, StoreError};

const READER: &str = "read-only-token-0123456789";

struct Repo(Repository);

impl ServedStore for Repo {
    fn source(&self) -> &dyn SnapshotSource {
        &self.0
    }
    fn sink(&self) -> Option<&dyn SnapshotSink> {
        Some(&self.0)
    }
    fn view(&self) -> Option<&dyn RepositoryView> {
        Some(&self.0)
    }
}

/// A store of images, not a repository: it has no view (the default).
struct Mem(MemoryStore);

impl ServedStore for Mem {
    fn source(&self) -> &dyn SnapshotSource {
        &self.0
    }
    fn sink(&self) -> Option<&dyn SnapshotSink> {
        None
    }
}

/// A repository holding the standard fixture (volumes alpha, three snapshots, and
/// beta), and a memory store holding it too, served as `repo` and `mem` to [`READER`],
/// read-only; the port and the repository's path.
fn serve(dir: &std::path::Path) -> (u16, std::path::PathBuf) {
    let fixture = standard_fixture();
    let mem = MemoryStore::new("mem-source", 4096);
    mem.add_fixture(&fixture);
    let path = dir.join("repo");
    let repo = Repository::init(Location::Local(path.clone()), 4096).unwrap();
    replicate(
        &mem,
        &repo,
        &ReplicateOptions::default(),
        &NoProgress,
        &mut |_| {},
    )
    .unwrap();
    let tokens = format!("{READER} repo ro\n{READER} mem ro\n");
    let server = Server::bind(
        ServerConfig::plaintext(
            vec![
                ("repo".into(), Arc::new(Repo(repo)) as Arc<dyn ServedStore>),
                ("mem".into(), Arc::new(Mem(mem)) as Arc<dyn ServedStore>),
            ],
            Tokens::parse(&tokens).unwrap(),
        ),
        "127.0.0.1:0",
    )
    .unwrap();
    let port = server.spawn().unwrap().port();
    (port, path)
}

fn client(port: u16, name: &str) -> RemoteStore {
    RemoteStore::open(
        &format!("snapsync+http://127.0.0.1:{port}/{name}"),
        ClientOptions::new(READER),
    )
    .unwrap()
}

fn volumes(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
fn a_read_only_client_is_told_what_the_served_repository_says_of_itself() {
    let dir = tempfile::tempdir().unwrap();
    let (port, path) = serve(dir.path());
    let remote = client(port, "repo");
    assert!(!remote.writable(), "the token is read-only");
    let here = Repository::open(Location::Local(path)).unwrap();

    let size = remote.size().unwrap();
    assert_eq!(size, here.size().unwrap());
    assert_eq!((size.volumes, size.snapshots), (2, 4));
    assert!(size.stored_bytes > 0 && size.stored_bytes < size.logical_bytes);

    // A volume it does not hold is left out, as a local repository does.
    let asked = volumes(&["alpha", "beta", "gamma"]);
    let chains = remote.chains(&asked, &Known::new()).unwrap();
    assert_eq!(chains, here.chains(&asked, &Known::new()).unwrap());
    let names: Vec<_> = chains.iter().map(|c| c.volume.as_str()).collect();
    assert_eq!(names, ["alpha", "beta"]);
    let alpha = &chains[0].snapshots;
    assert_eq!(
        alpha.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(),
        ["s1", "s2", "s3"]
    );
    assert!(alpha[0].full && !alpha[1].full && !alpha[2].full);
    assert_eq!(alpha[1].base.as_ref().unwrap().snapshot, "s1");

    // What the client knows is passed on, not read again: told another depth, the
    // server answers with it (a manifest it read would say its own).
    let mut told = known(&chains);
    for f in told.values_mut() {
        f.depth += 100;
    }
    let again = remote.chains(&asked, &told).unwrap();
    assert!(again
        .iter()
        .flat_map(|c| &c.snapshots)
        .all(|l| l.depth >= 100));
    assert_eq!(again, here.chains(&asked, &told).unwrap());

    // Names are checked before the repository is touched.
    let e = remote
        .chains(&volumes(&["../x"]), &Known::new())
        .unwrap_err();
    assert!(e.to_string().contains("../x"), "{e}");
}

#[test]
fn a_served_store_that_is_not_a_repository_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (port, _) = serve(dir.path());
    let remote = client(port, "mem");
    for e in [
        remote.size().map(|_| ()).unwrap_err(),
        remote
            .chains(&volumes(&["alpha"]), &Known::new())
            .map(|_| ())
            .unwrap_err(),
    ] {
        assert!(matches!(e, StoreError::Unsupported { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "unsupported: store \"mem\" is not a repository: it has no size or chains to show"
        );
    }
}
