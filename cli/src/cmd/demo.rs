//! `shale demo`: the whole story on the local stack, as a newcomer sees it.
//!
//! A client finds the demo SP, orders a container with the digits dataset and pays escrow; the
//! SP accepts; the client runs a real training job with the stock `ssh` client on the mounted
//! dataset, copies the model back with `scp`, watches the cost, ends the lease; the SP claims
//! (when the settler runs beside the gateway) and settles; the client checks its receipts and
//! rates the SP; a table shows who paid whom, from balances read on chain.
//!
//! Every step uses the same code as the matching command (`order create`, `sp accept`,
//! `watch`, `receipts --verify`, `rate`), with the dev accounts' keys.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use shale_contracts::{Address, Marketplace, OrderState, U256};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::cmd::dev::{self, DevState, CLIENT, DATASET, SP};
use crate::cmd::{market, order, receipts, sp, watch};
use crate::exit::Failure;
use crate::money::{format_fil, Fil};
use crate::settings::Settings;
use crate::spconfig::SpConfig;
use crate::sshcfg::SshFiles;
use crate::view::table;

/// The training job run inside the order's container.
const TRAIN_PY: &str = include_str!("../demo/train.py");

/// What the demo did, for the end-to-end test to check.
#[derive(Debug, Clone, Serialize)]
pub struct DemoOutcome {
    pub order: u64,
    pub accuracy_line: String,
    pub model_bytes: u64,
    pub paid_to_sp_wei: String,
    pub receipts_checked: bool,
    pub client: Party,
    pub sp: Party,
    pub marketplace: Party,
}

/// One account's balances around the demo.
#[derive(Debug, Clone, Serialize)]
pub struct Party {
    pub address: String,
    pub before_wei: String,
    pub after_wei: String,
    /// All gas the account paid: its balance change less what it paid or got for the lease.
    pub gas_wei: String,
    /// Gas of the transactions the demo sent itself (the settler's claims are not among them).
    pub known_gas_wei: String,
}

fn heading(n: u32, text: &str) {
    println!(
        "\n── {n}. {text} {}",
        "─".repeat(60usize.saturating_sub(text.len()))
    );
}

/// `shale demo`: brings the stack up if needed, then tells the story.
pub async fn run() -> anyhow::Result<()> {
    let outcome = story().await?;
    let path = dev::state_dir().join("demo/outcome.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&outcome)?)?;
    Ok(())
}

async fn story() -> anyhow::Result<DemoOutcome> {
    let started = Instant::now();
    let state = match DevState::load(&dev::state_dir()) {
        Ok(s) => s,
        Err(_) => {
            println!("The local stack is not up; starting it (`shale dev up`).");
            dev::up().await?
        }
    };
    let client_key = state.key(CLIENT)?;
    let sp_key = state.key(SP)?;
    let client = Marketplace::connect(&state.rpc_url, state.marketplace, Some(client_key)).await?;
    let sp_market = Marketplace::connect(&state.rpc_url, state.marketplace, Some(sp_key)).await?;
    let sp_config = SpConfig::load(&state.dir.join("gateway.toml"))?;
    let demo_dir = state.dir.join("demo");
    std::fs::create_dir_all(&demo_dir)?;
    let settings = Settings {
        rpc_url: state.rpc_url.clone(),
        marketplace: state.marketplace,
        keystore: None,
        ssh_dir: demo_dir.join("ssh"),
        fees: Default::default(),
    };
    let parties = [state.client, state.provider, state.marketplace];
    let before = balances(&client, &parties).await?;
    let (mut client_gas, mut sp_gas) = (U256::ZERO, U256::ZERO);

    heading(1, "A client looks at the market");
    println!("$ shale providers");
    market::providers(&settings, false, false).await?;

    heading(
        2,
        "The client orders a container next to the digits dataset",
    );
    let key = demo_dir.join("id_ed25519");
    make_key(&key)?;
    println!(
        "$ shale order create --provider {:#x} --key {}.pub --cpus 2 --memory 1GiB --disk 2GiB \\\n    --gpus 0 --dataset {DATASET} --hours 1 --deposit 0.5FIL",
        state.provider,
        key.display()
    );
    // The SP's side, concurrently: it sees the order and accepts it, as `shale sp accept` does.
    let first_new = client.order_count().await? + 1;
    let sp_task = {
        let (m, c) = (sp_market.clone(), sp_config.clone());
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while m.order_count().await? < first_new {
                if Instant::now() > deadline {
                    bail!("no order arrived");
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            print!("[SP] $ shale sp accept {first_new}\n[SP] ");
            sp::accept_with(&m, &c, first_new).await
        })
    };
    let req = order::CreateRequest {
        provider: state.provider,
        key: key.with_extension("pub"),
        cpus: Some(2),
        memory_mib: Some(1024),
        disk_mib: Some(2048),
        gpus: Some(0),
        dataset: Some(DATASET.into()),
        image: None,
        hours: 1,
        deposit: crate::money::parse_amount("0.5FIL")?,
        wait: Duration::from_secs(60),
        byte_allowance: shale_contracts::DEFAULT_BYTE_ALLOWANCE,
    };
    let created = order::create_with(&client, &settings, &req, true).await?;
    let accept_tx = sp_task.await.context("the SP task")??;
    sp_gas += accept_tx.fee;
    client_gas += created.fee_wei.parse::<U256>()?;
    let id = created.order;
    let files = SshFiles::new(&settings.ssh_dir);
    let ssh_base = |prog: &str| {
        let mut c = tokio::process::Command::new(prog);
        c.arg("-F")
            .arg(&files.config)
            .args(["-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]);
        c
    };

    heading(
        3,
        "The client trains a model on the dataset, over plain ssh",
    );
    let script = demo_dir.join("train.py");
    std::fs::write(&script, TRAIN_PY)?;
    println!("$ scp -F {} train.py shale-{id}:", files.config.display());
    run_quiet(
        ssh_base("scp").arg(&script).arg(format!("shale-{id}:")),
        "scp",
    )
    .await?;
    println!(
        "$ ssh -F {} shale-{id} python3 train.py",
        files.config.display()
    );
    let accuracy_line = stream(
        ssh_base("ssh")
            .arg(format!("shale-{id}"))
            .args(["python3", "train.py"]),
        "held-out accuracy",
    )
    .await?;

    heading(4, "The client copies the trained model back with scp");
    let model = demo_dir.join("model.npz");
    let _ = std::fs::remove_file(&model);
    println!(
        "$ scp -F {} shale-{id}:model.npz {}",
        files.config.display(),
        model.display()
    );
    run_quiet(
        ssh_base("scp")
            .arg(format!("shale-{id}:model.npz"))
            .arg(&model),
        "scp",
    )
    .await?;
    let model_bytes = std::fs::metadata(&model)
        .context("the model did not arrive")?
        .len();
    println!("model.npz: {model_bytes} bytes (softmax weights 64×10 + biases), here on the client");

    heading(
        5,
        "The live cost of the lease, while the SP's settler claims",
    );
    println!("$ shale watch {id}");
    let first_claim = watch_until_claim(&client, id, Duration::from_secs(40)).await?;
    if first_claim.is_zero() {
        println!("(no claim yet: the settler claims a batch once its oldest tick is 3 s old)");
    } else {
        println!(
            "[SP] The settler proved a batch of ticks and was paid {} on chain.",
            Fil(first_claim)
        );
    }

    heading(6, "The client verifies its receipts against the claims");
    println!("$ shale receipts {id} --verify");
    let receipts_checked = match receipts::run(&settings, id, true, false).await {
        Ok(_) => true,
        Err(e) if matches!(e.downcast_ref::<Failure>(), Some(Failure::Ssh(_))) => {
            println!("The gateway did not serve receipts ({e}); the check is skipped, not passed.");
            false
        }
        Err(e) => return Err(e),
    };

    println!("$ shale ack {id}");
    // What the payment tunnel does by itself every 30 s: check and sign the usage so far, so
    // the SP can be paid for bytes past the order's allowance.
    match crate::cmd::ack::run(&settings, id, false).await {
        Ok(_) => {}
        Err(e) if matches!(e.downcast_ref::<Failure>(), Some(Failure::ReceiptsMismatch(_))) => {
            return Err(e)
        }
        Err(e) => println!("The acknowledgment did not go through ({e:#}); bytes are paid only up to the allowance."),
    }

    heading(7, "The client ends the lease");
    println!("$ shale order terminate {id}");
    let paid_before_end = client.order(id).await?.paid;
    // What the lease had run up just before its end: the settler must claim at least this.
    let metered_before_end: u64 = receipts::fetch(&settings, id)
        .await
        .map(|r| {
            r.iter()
                .filter_map(|x| match x {
                    shale_meter::ledger::Receipt::Tick(t) => Some(t.seconds),
                    _ => None,
                })
                .sum()
        })
        .unwrap_or(0);
    let tx = client.terminate(id).await?;
    client_gas += tx.fee;
    println!("Order {id} terminated (fee {}).", Fil(tx.fee));

    heading(8, "The SP claims the rest with a Groth16 proof");
    let claimed = wait_for_claims(
        &client,
        id,
        paid_before_end,
        metered_before_end,
        Duration::from_secs(60),
    )
    .await?;
    let o = client.order(id).await?;
    if o.paid.is_zero() {
        println!(
            "No claim arrived: the settler did not claim (see {}); the SP is paid nothing for \
             usage and the whole escrow goes back to the client.",
            dev::state_dir().join("gateway.log").display()
        );
    } else {
        println!(
            "[SP] The settler's claims were verified on chain: {} paid for {} of lease and {} \
             bytes ({} after the end).",
            Fil(o.paid),
            crate::view::duration(o.claimed_seconds),
            o.claimed_bytes,
            Fil(claimed)
        );
        println!(
            "The client's acknowledgments cover {} bytes on chain; the order allows {} without one.",
            o.acked_bytes, o.byte_allowance
        );
    }

    heading(
        9,
        "The SP settles: escrow left to the client, collateral back to the SP",
    );
    println!("[SP] $ shale order settle {id}");
    let o = client.order(id).await?;
    let tx = sp_market.settle(id).await?;
    sp_gas += tx.fee;
    println!(
        "[SP] Order {id} settled: {} back to the client, {} collateral back to the SP.",
        Fil(o.escrow),
        Fil(o.collateral)
    );

    heading(10, "The client rates the SP");
    println!("$ shale rate {id} 5 --review \"fast, and the digits were right there\"");
    let tx = client
        .rate(id, 5, "fast, and the digits were right there")
        .await?;
    client_gas += tx.fee;
    let p = client.provider(state.provider).await?;
    println!("The SP's rating is now {}.", crate::view::rating_text(&p));

    heading(11, "Who paid whom (balances on chain)");
    let after = balances(&client, &parties).await?;
    let final_order = client.order(id).await?;
    if final_order.state != OrderState::Ended || !final_order.settled {
        bail!(
            "order {id} should be ended and settled, it is {}",
            final_order.state
        );
    }
    let paid = final_order.paid;
    let known_gas = [client_gas, sp_gas, U256::ZERO];
    // Every wei that moved is either the lease's price (claims) or gas: gas is the rest.
    let gas = [
        before[0].saturating_sub(after[0]).saturating_sub(paid),
        (before[1] + paid).saturating_sub(after[1]),
        U256::ZERO,
    ];
    let lease = [
        format!("-{}", format_fil(paid)),
        format!("+{}", format_fil(paid)),
        "0".to_string(),
    ];
    let names = ["client", "SP", "marketplace contract"];
    let mut t = table([
        "account",
        "before (FIL)",
        "after (FIL)",
        "change",
        "for the lease",
        "gas",
    ]);
    for i in 0..3 {
        t.add_row(vec![
            format!("{} {:#x}", names[i], parties[i]),
            format_fil(before[i]),
            format_fil(after[i]),
            crate::money::format_delta(before[i], after[i]),
            lease[i].clone(),
            format_fil(gas[i]),
        ]);
    }
    println!("{t}");
    println!(
        "The client paid the SP {} for {} of lease and {} bytes, proven tick by tick; each side \
         paid its own gas; the contract holds nothing for order {id} any more.\nDone in {}s.",
        Fil(paid),
        crate::view::duration(final_order.claimed_seconds),
        final_order.claimed_bytes,
        started.elapsed().as_secs()
    );
    let party = |i: usize| Party {
        address: format!("{:#x}", parties[i]),
        before_wei: before[i].to_string(),
        after_wei: after[i].to_string(),
        gas_wei: gas[i].to_string(),
        known_gas_wei: known_gas[i].to_string(),
    };
    Ok(DemoOutcome {
        order: id,
        accuracy_line,
        model_bytes,
        paid_to_sp_wei: final_order.paid.to_string(),
        receipts_checked,
        client: party(0),
        sp: party(1),
        marketplace: party(2),
    })
}

async fn balances(market: &Marketplace, who: &[Address]) -> anyhow::Result<Vec<U256>> {
    let mut out = Vec::new();
    for a in who {
        out.push(market.balance_of(*a).await?);
    }
    Ok(out)
}

/// A fresh ed25519 key for the demo's client.
fn make_key(path: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(path.with_extension("pub"));
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "shale-demo", "-f"])
        .arg(path)
        .status()
        .context("running ssh-keygen (is openssh-client installed?)")?;
    if !status.success() {
        bail!("ssh-keygen failed");
    }
    Ok(())
}

async fn run_quiet(cmd: &mut tokio::process::Command, what: &str) -> anyhow::Result<()> {
    let out = cmd.stdin(Stdio::null()).output().await?;
    if !out.status.success() {
        return Err(Failure::Ssh(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
        .into());
    }
    Ok(())
}

/// Runs `cmd`, echoing its output indented; returns the line containing `wanted`.
async fn stream(cmd: &mut tokio::process::Command, wanted: &str) -> anyhow::Result<String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("running ssh")?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let mut found = None;
    while let Some(line) = lines.next_line().await? {
        println!("  │ {line}");
        if line.contains(wanted) {
            found = Some(line);
        }
    }
    let status = child.wait().await?;
    if !status.success() {
        return Err(Failure::Ssh(format!("the job over ssh failed ({status})")).into());
    }
    found.with_context(|| format!("the job printed no {wanted:?} line"))
}

/// Waits for the provider's claims on a terminated order; returns what was paid.
/// Waits for the settler's claims on a terminated order: at least the `metered` seconds the
/// receipts showed before the end, then no new claim for a few seconds (the gateway writes the
/// lease's final partial tick when it sees the termination, and the settler claims it a few
/// seconds later). Settling before that would give the rest up. Returns what was paid after
/// `paid_before`.
async fn wait_for_claims(
    market: &Marketplace,
    id: u64,
    paid_before: U256,
    metered: u64,
    wait: Duration,
) -> anyhow::Result<U256> {
    const QUIET: Duration = Duration::from_secs(6);
    let deadline = Instant::now() + wait;
    // Without verifiers the marketplace cannot accept any claim: do not wait for one.
    if market.batch_capacities().await?.is_empty() {
        return Ok(U256::ZERO);
    }
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_message("[SP] the settler proves and claims the lease's last ticks…");
    spinner.enable_steady_tick(Duration::from_millis(120));
    let mut last = (U256::MAX, Instant::now());
    loop {
        let o = market.order(id).await?;
        if o.paid != last.0 {
            last = (o.paid, Instant::now());
        }
        let quiet = last.1.elapsed() >= QUIET;
        if (o.claimed_seconds >= metered && o.paid > paid_before && quiet)
            || Instant::now() > deadline
        {
            spinner.finish_and_clear();
            return Ok(o.paid - paid_before);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Shows the order live (one line a second) until the first claim is paid or `wait` passes;
/// returns what was paid.
async fn watch_until_claim(market: &Marketplace, id: u64, wait: Duration) -> anyhow::Result<U256> {
    let deadline = Instant::now() + wait;
    let capacities = market.batch_capacities().await?;
    loop {
        let snap = watch::read(market, id).await?;
        watch::print_snapshot(&snap);
        let paid: U256 = snap.paid_wei.parse()?;
        if !paid.is_zero() || capacities.is_empty() || Instant::now() > deadline {
            return Ok(paid);
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
}
