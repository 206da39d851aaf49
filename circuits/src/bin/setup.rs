//! Generates the tick-batch keys and Solidity verifiers for a few batch capacities.
//!
//! ```text
//! shale-circuits-setup --out DIR --capacity 64,256 (--seed N | --os-rng)
//! ```
//!
//! For each capacity N it writes `DIR/tick-N.pk` (proving key, for the settler), `DIR/tick-N.vk`
//! (verifying key) and `DIR/TickVerifierN.sol` (the on-chain verifier).
//!
//! `--seed` gives reproducible keys for tests and the local stack; anyone who knows the seed can
//! forge proofs. Production keys are made by the marketplace deployer with `--os-rng`, never by a
//! storage provider.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use shale_circuits::{constraint_count, contract_name, setup_from_seed, setup_with_os_rng};

const USAGE: &str =
    "usage: shale-circuits-setup --out DIR --capacity N[,N...] (--seed SEED | --os-rng)";

enum Randomness {
    Seed(u64),
    Os,
}

struct Args {
    out: PathBuf,
    capacities: Vec<usize>,
    randomness: Randomness,
}

fn parse_args() -> Result<Args> {
    let mut out = None;
    let mut capacities = Vec::new();
    let mut randomness = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--out" => out = Some(PathBuf::from(value("--out")?)),
            "--capacity" => {
                for c in value("--capacity")?.split(',') {
                    let n: usize = c
                        .trim()
                        .parse()
                        .with_context(|| format!("capacity {c:?} is not a number"))?;
                    if n == 0 {
                        bail!("a capacity must be at least 1");
                    }
                    capacities.push(n);
                }
            }
            "--seed" => {
                let s = value("--seed")?;
                randomness = Some(Randomness::Seed(
                    s.parse()
                        .with_context(|| format!("seed {s:?} is not a u64"))?,
                ));
            }
            "--os-rng" => randomness = Some(Randomness::Os),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(Args {
        out: out.with_context(|| format!("--out is required\n{USAGE}"))?,
        capacities: if capacities.is_empty() {
            bail!("--capacity is required\n{USAGE}")
        } else {
            capacities
        },
        randomness: randomness.with_context(|| {
            format!("choose --seed (tests, local stack) or --os-rng (production)\n{USAGE}")
        })?,
    })
}

fn main() -> Result<()> {
    let args = parse_args()?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    for &capacity in &args.capacities {
        let started = Instant::now();
        let (pk, vk) = match args.randomness {
            Randomness::Seed(seed) => setup_from_seed(capacity, seed)?,
            Randomness::Os => setup_with_os_rng(capacity)?,
        };
        let pk_path = args.out.join(format!("tick-{capacity}.pk"));
        let vk_path = args.out.join(format!("tick-{capacity}.vk"));
        let sol_path = args.out.join(format!("{}.sol", contract_name(capacity)));
        pk.write(&pk_path)?;
        vk.write(&vk_path)?;
        std::fs::write(&sol_path, vk.solidity())
            .with_context(|| format!("writing {}", sol_path.display()))?;
        println!(
            "capacity {capacity}: {} constraints, setup {:.1}s -> {}, {}, {}",
            constraint_count(capacity)?,
            started.elapsed().as_secs_f64(),
            pk_path.display(),
            vk_path.display(),
            sol_path.display()
        );
    }
    Ok(())
}
