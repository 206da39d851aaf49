//! Every fuzz target over its committed corpus and a fixed number of deterministic mutations of
//! it: the bounded run CI does on every build (`scripts/fuzz.sh` runs libFuzzer for longer).
//! `SHALE_FUZZ_RUNS` sets the mutations per target (default: [`DEFAULT_RUNS`], about ten seconds
//! in all on a debug build); a failure prints the input, and the same count replays it.

use std::path::Path;
use std::time::Instant;

use shale_fuzz_targets::mutate::{mutate, Rng};
use shale_fuzz_targets::TARGETS;

/// The longest input tried: libFuzzer's default `-max_len` is 4 KiB for small corpora.
const MAX_LEN: usize = 4096;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the corpus {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            (path.display().to_string(), std::fs::read(&path).unwrap())
        })
        .collect();
    seeds.sort();
    assert!(
        !seeds.is_empty(),
        "target {target} has no seeds in {}",
        dir.display()
    );
    seeds.into_iter().map(|(_, bytes)| bytes).collect()
}

/// Mutations per target: the receipts target hashes up to 64 ticks with Poseidon per input, the
/// SSH server runs a session; the parsers are cheap.
const DEFAULT_RUNS: [(&str, usize); 5] = [
    ("login", 20_000),
    ("config", 20_000),
    ("ack_request", 20_000),
    ("receipts", 1_000),
    ("ssh_server", 5_000),
];

fn runs(target: &str) -> usize {
    std::env::var("SHALE_FUZZ_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .or_else(|| {
            DEFAULT_RUNS
                .iter()
                .find(|(t, _)| *t == target)
                .map(|(_, n)| *n)
        })
        .unwrap_or(2_000)
}

#[test]
fn every_target_holds_over_its_corpus_and_bounded_mutations() {
    for (name, run) in TARGETS {
        let seeds = corpus(name);
        let started = Instant::now();
        for seed in &seeds {
            run(seed);
        }
        let count = runs(name);
        let mut rng = Rng::new(0x5a1e ^ name.len() as u64);
        for i in 0..count {
            let seed = &seeds[rng.below(seeds.len())];
            let other = &seeds[rng.below(seeds.len())];
            let input = mutate(&mut rng, seed, other, MAX_LEN);
            if let Err(panic) = std::panic::catch_unwind(|| run(&input)) {
                panic!(
                    "fuzz target {name} failed on mutation {i} of {count} (input {:?}): {:?}",
                    String::from_utf8_lossy(&input),
                    panic
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| panic.downcast_ref::<&str>().copied())
                );
            }
        }
        eprintln!(
            "fuzz {name}: {} seeds and {count} mutations in {:.1} s",
            seeds.len(),
            started.elapsed().as_secs_f64()
        );
    }
}
