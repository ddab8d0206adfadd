//! Replays the committed fuzz corpus (tests/fuzz/corpus/<target>/*) through the same entry
//! points the cargo-fuzz targets call, so every `cargo test` checks that no input the
//! fuzzers found interesting (including the regressions of fixed findings) panics.
//! Running the fuzzers themselves: tests/fuzz/README.md.

use std::path::Path;

#[test]
fn every_target_has_a_corpus_and_none_of_it_panics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/corpus");
    for (name, run) in pgsluice::fuzzing::TARGETS {
        let dir = root.join(name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("directory entry").path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no corpus for fuzz target {name}");
        for file in files {
            let data = std::fs::read(&file).expect("corpus file");
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(
                outcome.is_ok(),
                "fuzz target {name} panics on {}",
                file.display()
            );
        }
    }
}

#[test]
fn every_target_has_a_cargo_fuzz_binary() {
    let manifest = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/Cargo.toml"),
    )
    .expect("tests/fuzz/Cargo.toml");
    for (name, _) in pgsluice::fuzzing::TARGETS {
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "tests/fuzz/Cargo.toml has no [[bin]] for {name}"
        );
    }
}
