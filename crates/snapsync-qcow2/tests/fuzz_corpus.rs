//! Regression test: replay the minimized fuzz corpus (and any kept crash
//! inputs) through the same entry point as the fuzzer.

use std::path::Path;

use snapsync_qcow2::fuzzing::exercise;

fn replay(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_file() && path.file_name().is_some_and(|f| f != "README.md") {
            let data = std::fs::read(&path).unwrap();
            exercise(&data);
            n += 1;
        }
    }
    n
}

#[test]
fn fuzz_corpus_and_regressions_do_not_panic() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let corpus = replay(&fuzz.join("corpus/qcow2_parse"));
    let regressions = replay(&fuzz.join("regressions"));
    println!("replayed {corpus} corpus inputs and {regressions} regression inputs");
    assert!(corpus > 0, "fuzz corpus missing at {}", fuzz.display());
}
