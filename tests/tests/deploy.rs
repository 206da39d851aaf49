//! `shale deploy` against a node that says it is Calibration: anvil with chain id 314159, the
//! real `shale` binary with a dev key, the real Groth16 set-up (capacity 1, the smallest
//! circuit) and the verifier compiled by solc-js. What a real Calibration node adds (Lotus's gas
//! model, 30-second blocks) is not here: this machine reaches no outside network.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use anyhow::{ensure, Context};
use shale_contracts::devnet::{Devnet, DevnetOptions};
use shale_contracts::{Address, Marketplace, PrivateKeySigner};
use shale_tests::client::shale_exe;

const CALIBRATION: u64 = 314_159;

/// Whether anvil and solc-js are installed; under `CI=true` their absence fails the test.
fn tools_present() -> bool {
    let missing = if shale_contracts::devnet::find_anvil().is_none() {
        Some("anvil not found")
    } else if shale_circuits::solc::SolcJs::find().is_err() {
        Some("solc-js (or node) not found")
    } else {
        None
    };
    let Some(reason) = missing else {
        return true;
    };
    eprintln!("SKIPPED: {reason}; run scripts/setup.sh");
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true: the reason above fails the test"
    );
    false
}

/// `shale deploy ARGS` in `dir`, signing with `key`, with none of the caller's Shale settings.
fn deploy(dir: &Path, rpc_url: &str, key: &PrivateKeySigner, args: &[&str]) -> Output {
    let mut all = vec!["deploy", "--rpc-url", rpc_url];
    all.extend_from_slice(args);
    shale(dir, key, &all)
}

/// `shale ARGS` in `dir`, signing with `key`, with none of the caller's Shale settings.
fn shale(dir: &Path, key: &PrivateKeySigner, args: &[&str]) -> Output {
    Command::new(shale_exe().expect("the shale binary"))
        .current_dir(dir)
        .env_remove("SHALE_RPC_URL")
        .env_remove("SHALE_MARKETPLACE")
        .env_remove("SHALE_CONFIG")
        .env_remove("SHALE_KEYSTORE")
        .env("SHALE_HOME", dir.join("home"))
        .env("SHALE_PRIVATE_KEY", format!("{:x}", key.to_bytes()))
        .args(args)
        .output()
        .expect("running shale")
}

fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The value of `key = "…"` in a TOML file, as written (the tests crate has no TOML parser).
fn toml_string(file: &str, key: &str) -> Option<String> {
    file.lines()
        .find_map(|l| l.strip_prefix(&format!("{key} = \"")))
        .and_then(|rest| rest.strip_suffix('"'))
        .map(str::to_string)
}

/// The skeleton as an SP completes it, with this test's folders instead of /var/lib/shale.
fn fill_in(skeleton: &str, dir: &Path, provider: Address) -> String {
    let mut offer = false;
    skeleton
        .lines()
        .map(|line| {
            if line.starts_with("# FILL-IN: what you offer") {
                offer = true;
                return String::new();
            }
            if offer {
                if line.is_empty() {
                    offer = false;
                }
                return line.trim_start_matches("# ").to_string();
            }
            match line.split_once(" = ").map(|(k, _)| k) {
                Some("provider") => format!("provider = \"{provider:#x}\""),
                Some("endpoint") => "endpoint = \"127.0.0.1:2222\"".into(),
                Some("host_key") => format!("host_key = \"{}/host_ed25519\"", dir.display()),
                Some("state_dir") => format!("state_dir = \"{}/state\"", dir.display()),
                _ => line.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn record(out: &Path) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_slice(&std::fs::read(
        out.join("deployment.json"),
    )?)?)
}

fn marketplace_of(record: &serde_json::Value) -> anyhow::Result<Address> {
    record["marketplace"]["address"]
        .as_str()
        .context("deployment.json has no marketplace address")?
        .parse()
        .context("the marketplace address")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_on_a_calibration_chain_writes_configs_that_reach_the_marketplace(
) -> anyhow::Result<()> {
    if !tools_present() {
        return Ok(());
    }
    let chain = Devnet::start_with(DevnetOptions {
        chain_id: CALIBRATION,
        ..DevnetOptions::default()
    })
    .await?;
    let rpc = chain.rpc_url().to_string();
    let deployer = chain.signer(0);
    let dir = tempfile::Builder::new().prefix("shale-deploy-").tempdir()?;
    let out = dir.path().join("out");
    let keys = dir.path().join("keys");
    let keys_arg = keys.to_str().context("temp path is not UTF-8")?;
    let out_arg = out.to_str().context("temp path is not UTF-8")?;
    let args = [
        "--chain",
        "calibration",
        "--capacities",
        "1",
        "--keys",
        keys_arg,
        "--out",
        out_arg,
    ];

    let started = Instant::now();
    let first = deploy(dir.path(), &rpc, &deployer, &args);
    ensure!(first.status.success(), "{}", text(&first));
    eprintln!(
        "first deploy (set-up of capacity 1 included) took {:.1} s:\n{}",
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&first.stderr)
    );
    let stderr = String::from_utf8_lossy(&first.stderr);
    ensure!(stderr.contains("single-party"), "{}", text(&first));

    // deployment.json names the deployment; the marketplace answers at its address.
    let rec = record(&out)?;
    ensure!(rec["chain_id"] == CALIBRATION, "{rec}");
    ensure!(rec["capacities"] == serde_json::json!([1]), "{rec}");
    ensure!(rec["keys"][0]["reused"] == false, "{rec}");
    ensure!(
        rec["keys"][0]["proving_key_keccak256"]
            .as_str()
            .is_some_and(|h| h.len() == 66),
        "{rec}"
    );
    ensure!(
        rec["deployer"]["address"]
            .as_str()
            .is_some_and(|a| a.eq_ignore_ascii_case(&format!("{:#x}", deployer.address()))),
        "{rec}"
    );
    let marketplace = marketplace_of(&rec)?;
    let f4 = rec["marketplace"]["filecoin"].as_str().unwrap_or_default();
    ensure!(f4.starts_with("t410f"), "{rec}");
    let stdout = String::from_utf8_lossy(&first.stdout);
    ensure!(
        stdout.contains(&format!("{marketplace:#x}")) && stdout.contains(f4),
        "{}",
        text(&first)
    );
    let market = Marketplace::connect(&rpc, marketplace, None).await?;
    ensure!(market.chain_id().await? == CALIBRATION);
    ensure!(market.batch_capacities().await? == vec![1]);
    ensure!(market.order_count().await? == 0);
    ensure!(rec["block"].as_u64().is_some_and(|b| b >= 1), "{rec}");

    // client.toml and gateway.toml point at it; the SP's proving key is where key_dir says.
    let client = std::fs::read_to_string(out.join("client.toml"))?;
    ensure!(
        toml_string(&client, "rpc_url").as_deref() == Some(rpc.as_str()),
        "{client}"
    );
    ensure!(
        toml_string(&client, "marketplace") == Some(format!("{marketplace:#x}")),
        "{client}"
    );
    ensure!(client.contains("chain id 314159"), "{client}");
    let gateway = std::fs::read_to_string(out.join("gateway.toml"))?;
    ensure!(
        toml_string(&gateway, "marketplace") == Some(format!("{marketplace:#x}")),
        "{gateway}"
    );
    ensure!(
        toml_string(&gateway, "rpc_url").as_deref() == Some(rpc.as_str()),
        "{gateway}"
    );
    let key_dir = PathBuf::from(toml_string(&gateway, "key_dir").context("no key_dir")?);
    ensure!(key_dir.join("tick-1.pk").is_file(), "{gateway}");
    ensure!(gateway.contains("capacities = [1]"), "{gateway}");
    ensure!(
        gateway.contains("provider = \"FILL-IN-provider-address\""),
        "{gateway}"
    );

    // The skeleton, filled in as the README says, registers the SP.
    let sp = chain.signer(1);
    let sp_config = dir.path().join("sp.toml");
    std::fs::write(&sp_config, fill_in(&gateway, dir.path(), sp.address()))?;
    let config_arg = sp_config.to_str().context("UTF-8")?;
    let registered = shale(dir.path(), &sp, &["sp", "register", "--config", config_arg]);
    ensure!(registered.status.success(), "{}", text(&registered));
    let provider = market.provider(sp.address()).await?;
    ensure!(provider.endpoint == "127.0.0.1:2222", "{provider:?}");

    // Existing files stay as they are without --force, and nothing is sent.
    let before = std::fs::read(out.join("deployment.json"))?;
    let balance = market.balance_of(deployer.address()).await?;
    let again = deploy(dir.path(), &rpc, &deployer, &args);
    ensure!(!again.status.success(), "{}", text(&again));
    let err = String::from_utf8_lossy(&again.stderr);
    ensure!(
        err.contains("already exist") && err.contains("--force"),
        "{}",
        text(&again)
    );
    ensure!(std::fs::read(out.join("deployment.json"))? == before);
    ensure!(std::fs::read_to_string(out.join("client.toml"))? == client);
    ensure!(market.balance_of(deployer.address()).await? == balance);

    // With --force: a second marketplace, with the keys of the first run reused.
    let forced_args: Vec<&str> = args.iter().copied().chain(["--force"]).collect();
    let forced = deploy(dir.path(), &rpc, &deployer, &forced_args);
    ensure!(forced.status.success(), "{}", text(&forced));
    let rec2 = record(&out)?;
    ensure!(rec2["keys"][0]["reused"] == true, "{rec2}");
    ensure!(
        rec2["keys"][0]["proving_key_keccak256"] == rec["keys"][0]["proving_key_keccak256"],
        "{rec2}"
    );
    let second = marketplace_of(&rec2)?;
    ensure!(second != marketplace);
    Marketplace::connect(&rpc, second, None).await?;

    // An account without FIL is refused before anything is sent.
    let pauper = PrivateKeySigner::random();
    let other_out = dir.path().join("pauper");
    let poor = deploy(
        dir.path(),
        &rpc,
        &pauper,
        &[
            "--chain",
            "calibration",
            "--capacities",
            "1",
            "--keys",
            keys_arg,
            "--out",
            other_out.to_str().context("UTF-8")?,
        ],
    );
    ensure!(!poor.status.success(), "{}", text(&poor));
    let err = String::from_utf8_lossy(&poor.stderr);
    ensure!(
        err.contains("holds 0 FIL") && err.contains("nothing was sent"),
        "{}",
        text(&poor)
    );
    ensure!(!other_out.join("deployment.json").exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_for_mainnet_is_refused_on_a_calibration_node() -> anyhow::Result<()> {
    if !tools_present() {
        return Ok(());
    }
    let chain = Devnet::start_with(DevnetOptions {
        chain_id: CALIBRATION,
        ..DevnetOptions::default()
    })
    .await?;
    let dir = tempfile::Builder::new().prefix("shale-deploy-").tempdir()?;
    let out = dir.path().join("out");
    let refused = deploy(
        dir.path(),
        chain.rpc_url(),
        &chain.signer(0),
        &[
            "--chain",
            "mainnet",
            "--yes",
            "--out",
            out.to_str().context("UTF-8")?,
        ],
    );
    ensure!(!refused.status.success(), "{}", text(&refused));
    let expected = format!(
        "--chain mainnet expects chain id 314, but {} is chain 314159",
        chain.rpc_url()
    );
    ensure!(
        String::from_utf8_lossy(&refused.stderr).contains(&expected),
        "expected {expected:?} in\n{}",
        text(&refused)
    );
    ensure!(!out.join("deployment.json").exists());
    // Without --yes the chain id is still what refuses it: the node is asked first.
    let refused = deploy(
        dir.path(),
        chain.rpc_url(),
        &chain.signer(0),
        &[
            "--chain",
            "mainnet",
            "--out",
            out.to_str().context("UTF-8")?,
        ],
    );
    ensure!(
        String::from_utf8_lossy(&refused.stderr).contains(&expected),
        "{}",
        text(&refused)
    );
    Ok(())
}
