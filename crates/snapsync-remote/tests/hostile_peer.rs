//! A peer that speaks the protocol by hand, over plain HTTP/1.1 on 127.0.0.1, without
//! the snapsync client: whatever it sends, a receive that had a refused request never
//! commits, and what the server already holds stays intact.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use snapsync_core::{SnapshotId, SnapshotInfo, Timestamp};
use snapsync_remote::proto::{SEQUENCE_HEADER, VERSION_HEADER};
use snapsync_remote::{ServedStore, Server, ServerConfig, Tokens, PROTOCOL_VERSION};
use snapsync_store::memory::MemoryStore;
use snapsync_store::Store;

const TOKEN: &str = "hostile-peer-token-0123456789";

fn serve(store: Arc<MemoryStore>) -> u16 {
    let server = Server::bind(
        ServerConfig::plaintext(
            vec![("dest".to_string(), store as Arc<dyn ServedStore>)],
            Tokens::parse(TOKEN).unwrap(),
        ),
        "127.0.0.1:0",
    )
    .unwrap();
    server.spawn().unwrap().port()
}

/// One request on its own connection; the status and the body.
fn post(port: u16, path: &str, headers: &[(&str, String)], body: &[u8]) -> (u16, String) {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut head = format!(
        "POST /v1/stores/dest/{path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\
         authorization: Bearer {TOKEN}\r\n{VERSION_HEADER}: {PROTOCOL_VERSION}\r\n\
         content-length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes()).unwrap();
    conn.write_all(body).unwrap();
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn begin(port: u16, name: &str, size: u64) -> String {
    let created = Timestamp::new(1_700_000_000, 0);
    let snapshot = SnapshotInfo {
        name: name.into(),
        id: SnapshotId::derive("hostile", "vol", name, created),
        created,
        size,
    };
    let body = serde_json::json!({
        "volume": "vol",
        "snapshot": snapshot,
        "base": null,
        "source_system": "hostile",
        "source_volume": "vol",
        "source_snapshot": name,
        "origin": null,
    });
    let (status, answer) = post(port, "receive", &[], body.to_string().as_bytes());
    assert_eq!(status, 200, "begin: {answer}");
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
    v["session"].as_str().unwrap().to_string()
}

#[test]
fn a_commit_after_a_malformed_write_is_refused() {
    let store = Arc::new(MemoryStore::new("hostile-dest", 4096));
    let port = serve(store.clone());
    let session = begin(port, "s1", 1 << 20);
    let (status, answer) = post(
        port,
        &format!("receive/{session}/write"),
        &[(SEQUENCE_HEADER, "0".into())],
        b"this is not a block batch",
    );
    assert_eq!(status, 400, "a malformed write: {answer}");
    let (status, answer) = post(port, &format!("receive/{session}/commit"), &[], b"");
    assert_eq!(status, 409, "a commit after a refused write: {answer}");
    assert!(
        answer.contains("refused"),
        "the answer names the refusal: {answer}"
    );
    assert!(
        store.list().unwrap().iter().all(|v| v.snapshots.is_empty()),
        "a refused receive became visible"
    );
}

#[test]
fn a_commit_after_a_write_without_a_sequence_is_refused() {
    let store = Arc::new(MemoryStore::new("hostile-dest", 4096));
    let port = serve(store.clone());
    let session = begin(port, "s1", 1 << 20);
    let (status, _) = post(port, &format!("receive/{session}/write"), &[], b"");
    assert_eq!(status, 400);
    let (status, answer) = post(port, &format!("receive/{session}/commit"), &[], b"");
    assert_eq!(status, 409, "{answer}");
    // A rerun of the same snapshot begins afresh and can commit.
    let session = begin(port, "s1", 0);
    let (status, answer) = post(port, &format!("receive/{session}/commit"), &[], b"");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(store.volume("vol").unwrap().snapshots.len(), 1);
}

#[test]
fn an_impossible_time_is_refused_at_begin() {
    let store = Arc::new(MemoryStore::new("hostile-dest", 4096));
    let port = serve(store.clone());
    let body = serde_json::json!({
        "volume": "vol",
        "snapshot": {
            "name": "s1",
            "id": SnapshotId::derive("hostile", "vol", "s1", Timestamp::new(0, 0)),
            "created": {"secs": 1_700_000_000, "nanos": 3_000_000_000u64},
            "size": 4096,
        },
        "base": null,
        "source_system": "hostile",
        "source_volume": "vol",
        "source_snapshot": "s1",
        "origin": null,
    });
    let (status, answer) = post(port, "receive", &[], body.to_string().as_bytes());
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("invalid_argument"), "{answer}");
}
