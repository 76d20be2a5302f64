//! The store conformance suite, run against in-memory stores served over the protocol
//! on 127.0.0.1: a `RemoteStore` must behave exactly like the store it fronts.

use std::sync::Arc;

use snapsync_remote::{ClientOptions, RemoteStore, ServedStore, Server, ServerConfig, Tokens};
use snapsync_store::conformance;
use snapsync_store::memory::MemoryStore;

const TOKEN: &str = "conformance-token-0123456789";

fn serve(stores: Vec<(String, MemoryStore)>) -> u16 {
    let server = Server::bind(
        ServerConfig::plaintext(
            stores
                .into_iter()
                .map(|(n, s)| (n, Arc::new(s) as Arc<dyn ServedStore>))
                .collect(),
            Tokens::parse(TOKEN).unwrap(),
        ),
        "127.0.0.1:0",
    )
    .unwrap();
    server.spawn().unwrap().port()
}

fn client(port: u16, name: &str) -> RemoteStore {
    RemoteStore::open(
        &format!("snapsync+http://127.0.0.1:{port}/{name}"),
        ClientOptions::new(TOKEN),
    )
    .unwrap()
}

#[test]
fn a_served_memory_store_passes_the_sink_suite() {
    let port = serve(vec![("sink".into(), MemoryStore::new("mem-sink", 4096))]);
    conformance::check_sink(&client(port, "sink"));
}

#[test]
fn a_served_memory_store_passes_the_source_suite() {
    let fixture = conformance::standard_fixture();
    let store = MemoryStore::new("mem-source", 4096);
    store.add_fixture(&fixture);
    let port = serve(vec![("src".into(), store)]);
    conformance::check_source(&client(port, "src"), &fixture, 4096);
}
