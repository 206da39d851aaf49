//! Measures the tick-batch circuit: constraints, setup and proving time, proof size.
//!
//! ```text
//! cargo run --release -p shale-circuits --example measure -- 16 64 256
//! ```

use std::time::Instant;

use rand::SeedableRng;
use shale_circuits::{constraint_count, setup_from_seed, Head, TickBatch, TickFields, PROOF_LEN};

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
        let batch = TickBatch::new(3, Head::GENESIS, None, ticks)?;
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(2);
        let t = Instant::now();
        let proof = pk.prove(&batch, &mut rng)?;
        let prove = t.elapsed();
        let t = Instant::now();
        assert!(vk.verify(&batch.inputs(), &proof)?);
        let verify = t.elapsed();
        println!(
            "capacity {capacity}: {constraints} constraints, setup {:.2}s, prove {:.2}s ({:.0} ticks/s), verify {:.1}ms, proof {} bytes",
            setup.as_secs_f64(),
            prove.as_secs_f64(),
            capacity as f64 / prove.as_secs_f64(),
            verify.as_secs_f64() * 1e3,
            PROOF_LEN
        );
    }
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
