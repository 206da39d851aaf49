//! Measures the tick-batch circuit: constraints, setup and proving time, proof size.
//!
//! ```text
//! cargo run --release -p shale-circuits --example measure -- 16 64 256
//! ```

use std::time::Instant;

use rand::SeedableRng;
use shale_circuits::{
    constraint_count, setup_from_seed, Head, OrderKey, TickBatch, TickFields, PROOF_LEN,
};

fn main() -> anyhow::Result<()> {
    let capacities: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let per_tick = constraint_count(2)? - constraint_count(1)?;
    println!(
        "constraints per tick: {per_tick}; threads: {}",
        rayon_threads()
    );
    for capacity in capacities {
        let constraints = constraint_count(capacity)?;
        let t = Instant::now();
        let (pk, vk) = setup_from_seed(capacity, 1)?;
        let setup = t.elapsed();
        let ticks = (0..capacity as u64)
            .map(|seq| TickFields {
                order: 3,
                seq,
                seconds: 10,
                bytes_in: 1 << 20,
                bytes_out: 1 << 24,
            })
            .collect();
        let batch = TickBatch::new(OrderKey::new(31337, [1; 20], 3), Head::GENESIS, None, ticks)?;
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(2);
        // The first proof also builds the constraint matrices the key then keeps.
        let t = Instant::now();
        let mut proof = pk.prove(&batch, &mut rng)?;
        let first = t.elapsed();
        let runs = 3;
        let (t, cpu) = (Instant::now(), cpu_seconds());
        for _ in 0..runs {
            proof = pk.prove(&batch, &mut rng)?;
        }
        let prove = t.elapsed() / runs;
        let prove_cpu = (cpu_seconds() - cpu) / f64::from(runs);
        let t = Instant::now();
        assert!(vk.verify(&batch.inputs(), &proof)?);
        let verify = t.elapsed();
        println!(
            "capacity {capacity}: {constraints} constraints, setup {:.2}s, first proof {:.2}s, prove {:.2}s ({:.0} ticks/s; {:.2} CPU-s, {:.0} ticks per core-second), verify {:.1}ms, proof {} bytes",
            setup.as_secs_f64(),
            first.as_secs_f64(),
            prove.as_secs_f64(),
            capacity as f64 / prove.as_secs_f64(),
            prove_cpu,
            capacity as f64 / prove_cpu,
            verify.as_secs_f64() * 1e3,
            PROOF_LEN
        );
    }
    Ok(())
}

/// User + system CPU time of this process so far (Linux `/proc/self/stat`, 100 ticks per second).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th of them.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    fields.iter().sum::<u64>() as f64 / 100.0
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
