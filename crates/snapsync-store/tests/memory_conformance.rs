//! The in-memory store runs the conformance suite first: it is the reference.

use snapsync_store::conformance::{check_sink, check_source, standard_fixture};
use snapsync_store::memory::MemoryStore;

#[test]
fn memory_store_is_a_conforming_source() {
    let fixture = standard_fixture();
    let store = MemoryStore::new("fixture", 4096);
    store.add_fixture(&fixture);
    check_source(&store, &fixture, 4096);
}

#[test]
fn memory_store_is_a_conforming_sink() {
    check_sink(&MemoryStore::new("dest", 4096));
}
