//! Generates the tick-batch keys and Solidity verifiers for a few batch capacities.
//!
//! ```text
//! shale-circuits-setup --out DIR --capacity 64,256 (--seed N | --os-rng)
//!     [--fixtures ORDER [--chain-id ID --marketplace ADDRESS]]
//! ```
//!
//! For each capacity N it writes `DIR/tick-N.pk` (proving key, for the settler), `DIR/tick-N.vk`
//! (verifying key) and `DIR/TickVerifierN.sol` (the on-chain verifier). With `--fixtures ORDER` it
//! also writes `DIR/claims-N.json`: two real consecutive claims of order ORDER (a full batch from
//! genesis, then a partly full one), each with its six public inputs and 256-byte proof, for
//! Solidity tests of the claim path against the real verifier. A proof holds on one deployment
//! only: the fixtures are for the marketplace at `--marketplace` on chain `--chain-id` (by default
//! the first contract anvil's first account deploys, on anvil's chain 31337).
//!
//! `--seed` gives reproducible keys for tests and the local stack; anyone who knows the seed can
//! forge proofs. Production keys are made by the marketplace deployer with `--os-rng`, never by a
//! storage provider.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use shale_circuits::{
    constraint_count, contract_name, setup_from_seed, setup_with_os_rng, Deployment, Head,
    OrderKey, ProvingKey, TickBatch, TickFields,
};

const USAGE: &str =
    "usage: shale-circuits-setup --out DIR --capacity N[,N...] (--seed SEED | --os-rng) \
     [--fixtures ORDER [--chain-id ID] [--marketplace 0xADDRESS]]";

/// Anvil's chain id.
const ANVIL_CHAIN_ID: u64 = 31337;
/// The first contract anvil's first account deploys (its nonce 0).
const ANVIL_FIRST_CONTRACT: &str = "0x5FbDB2315678afecb367f032d93F642f64180aa3";

enum Randomness {
    Seed(u64),
    Os,
}

struct Args {
    out: PathBuf,
    capacities: Vec<usize>,
    randomness: Randomness,
    fixtures: Option<u64>,
    deployment: Deployment,
}

fn parse_address(s: &str) -> Result<[u8; 20]> {
    let digits = s.strip_prefix("0x").unwrap_or(s);
    let mut out = [0u8; 20];
    hex::decode_to_slice(digits, &mut out)
        .with_context(|| format!("marketplace address {s:?} is not 0x and 40 hex digits"))?;
    Ok(out)
}

fn parse_args() -> Result<Args> {
    let mut out = None;
    let mut capacities = Vec::new();
    let mut randomness = None;
    let mut fixtures = None;
    let mut deployment = Deployment::new(ANVIL_CHAIN_ID, parse_address(ANVIL_FIRST_CONTRACT)?);
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
            "--fixtures" => {
                let s = value("--fixtures")?;
                fixtures = Some(
                    s.parse()
                        .with_context(|| format!("order id {s:?} is not a u64"))?,
                );
            }
            "--chain-id" => {
                let s = value("--chain-id")?;
                deployment.chain_id = s
                    .parse()
                    .with_context(|| format!("chain id {s:?} is not a u64"))?;
            }
            "--marketplace" => deployment.marketplace = parse_address(&value("--marketplace")?)?,
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
        fixtures,
        deployment,
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
        if let Some(order) = args.fixtures {
            let path = args.out.join(format!("claims-{capacity}.json"));
            let json =
                serde_json::to_string_pretty(&fixtures(&pk, args.deployment.order_key(order))?)?;
            std::fs::write(&path, json + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
        }
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

/// Two consecutive real claims of `key`'s order: a full batch from genesis, then a partly full
/// batch.
fn fixtures(pk: &ProvingKey, key: OrderKey) -> Result<serde_json::Value> {
    let capacity = pk.capacity() as u64;
    let order = key.order();
    let tick = |seq| TickFields {
        order,
        seq,
        seconds: 60,
        bytes_in: 1 << 20,
        bytes_out: 3 << 20,
    };
    let first = TickBatch::new(key, Head::GENESIS, None, (0..capacity).map(tick).collect())?;
    let rest = capacity.div_ceil(2);
    let second = TickBatch::new(
        key,
        first.next(),
        Some(first.next_anchor()),
        (capacity..capacity + rest).map(tick).collect(),
    )?;
    let mut claims = Vec::new();
    for batch in [&first, &second] {
        let inputs = batch.inputs();
        let proof = pk.prove_with_os_rng(batch)?;
        let words: Vec<String> = inputs
            .to_words()
            .iter()
            .map(|w| format!("0x{}", hex_encode(w)))
            .collect();
        claims.push(serde_json::json!({
            "ticks": batch.ticks().len(),
            "orderId": inputs.order(),
            "chainId": key.deployment().chain_id,
            "marketplace": format!("0x{}", hex_encode(&key.deployment().marketplace)),
            "prevHead": inputs.prev,
            "nextHead": inputs.next,
            "seconds": inputs.seconds as u64,
            "bytesIn": inputs.bytes_in as u64,
            "bytesOut": inputs.bytes_out as u64,
            "input": words,
            "proof": format!("0x{}", hex_encode(&proof.to_bytes())),
        }));
    }
    Ok(serde_json::json!({ "capacity": capacity, "claims": claims }))
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
