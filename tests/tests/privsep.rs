//! `shale gateway` as an SP runs it, started by `shale dev up`: the SSH-facing process runs
//! unprivileged and without the wallet key, and the supervisor starts it again when it dies.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use shale_broker::BrokerClient;
use shale_provisioner::{ExecRequest, LeaseSpec, Machines, ProvisionError};
use shale_tests::client::shale_exe;
use tokio::io::AsyncReadExt;

/// A `shale dev up` stack in a directory of its own, taken down on drop.
struct DevStack {
    dir: tempfile::TempDir,
    exe: PathBuf,
}

impl DevStack {
    fn up() -> anyhow::Result<DevStack> {
        let exe = shale_exe()?;
        let dir = tempfile::Builder::new()
            .prefix("shale-privsep-")
            .tempdir()?;
        // The SSH process's user must reach its state under here.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        let stack = DevStack { dir, exe };
        let out = stack.shale(&["dev", "up"]).output()?;
        ensure!(
            out.status.success(),
            "shale dev up failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(stack)
    }

    fn shale(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.args(args)
            .env("SHALE_DEV_DIR", self.dir.path().join("dev"))
            .env("PATH", tools_path());
        cmd
    }

    fn state(&self) -> anyhow::Result<serde_json::Value> {
        let text = std::fs::read(self.dir.path().join("dev/dev.json"))?;
        Ok(serde_json::from_slice(&text)?)
    }
}

impl Drop for DevStack {
    fn drop(&mut self) {
        let _ = self.shale(&["dev", "down"]).output();
    }
}

fn tools_path() -> String {
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin");
    format!(
        "{}:{}",
        tools.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// The children of `parent` whose command line has `--role ROLE`.
fn children_with_role(parent: u32, role: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The field after the parenthesised name: state, then the parent's pid.
        let ppid = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(parent) {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args
            .windows(2)
            .any(|w| w[0] == b"--role" && w[1] == role.as_bytes())
        {
            found.push(pid);
        }
    }
    found
}

fn status_field(pid: u32, field: &str) -> anyhow::Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|v| v.trim().to_string())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

fn env_value(pid: u32, name: &str) -> anyhow::Result<Option<String>> {
    let environ = std::fs::read(format!("/proc/{pid}/environ"))?;
    Ok(environ.split(|b| *b == 0).find_map(|kv| {
        let kv = String::from_utf8_lossy(kv);
        kv.strip_prefix(&format!("{name}=")).map(str::to_string)
    }))
}

async fn wait_for_ssh_child(supervisor: u32, not: Option<u32>) -> anyhow::Result<u32> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(pid) = children_with_role(supervisor, "ssh")
            .into_iter()
            .find(|p| Some(*p) != not)
        {
            return Ok(pid);
        }
        if Instant::now() > deadline {
            bail!("no SSH process under the supervisor {supervisor}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads the gateway's SSH version line: the SSH process is up and accepting.
async fn banner(addr: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Ok(mut tcp)) =
            tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await
        {
            let mut buf = [0u8; 64];
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await
            {
                if n > 0 {
                    return Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string());
                }
            }
        }
        if Instant::now() > deadline {
            bail!("the gateway at {addr} sends no SSH banner");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn the_ssh_process_is_unprivileged_keyless_and_restarted_when_it_dies() -> anyhow::Result<()>
{
    if !nix::unistd::geteuid().is_root() {
        ensure!(std::env::var("CI").is_err(), "CI runs as root");
        eprintln!("SKIPPED: shale gateway starts as root");
        return Ok(());
    }
    let stack = tokio::task::spawn_blocking(DevStack::up).await??;
    let state = stack.state()?;
    let supervisor = state["gateway_pid"].as_u64().context("gateway_pid")? as u32;
    let addr = state["gateway"].as_str().context("gateway")?.to_string();
    let key = env_value(supervisor, "SHALE_PRIVATE_KEY")?
        .context("the supervisor signs with SHALE_PRIVATE_KEY")?;
    let key_hex = key.trim_start_matches("0x").to_lowercase();

    let broker = children_with_role(supervisor, "broker");
    ensure!(
        broker.len() == 1,
        "one broker under the supervisor: {broker:?}"
    );
    ensure!(
        env_value(broker[0], "SHALE_PRIVATE_KEY")?.is_none(),
        "the broker has no wallet key"
    );

    let ssh = wait_for_ssh_child(supervisor, None).await?;
    banner(&addr).await?;
    let uids = status_field(ssh, "Uid:")?;
    ensure!(
        uids.split_whitespace().all(|u| u != "0"),
        "real, effective, saved and filesystem uid are not root: {uids}"
    );
    let gids = status_field(ssh, "Gid:")?;
    ensure!(
        gids.split_whitespace().all(|g| g != "0"),
        "no root group: {gids}"
    );
    for caps in ["CapEff:", "CapPrm:", "CapAmb:"] {
        ensure!(
            status_field(ssh, caps)? == "0000000000000000",
            "{caps} of the SSH process is {}",
            status_field(ssh, caps)?
        );
    }
    ensure!(
        status_field(ssh, "NoNewPrivs:")? == "1",
        "no_new_privs is set"
    );
    let environ = std::fs::read(format!("/proc/{ssh}/environ"))?;
    let cmdline = std::fs::read(format!("/proc/{ssh}/cmdline"))?;
    for (what, bytes) in [("environment", &environ), ("arguments", &cmdline)] {
        let text = String::from_utf8_lossy(bytes).to_lowercase();
        ensure!(
            !text.contains(&key_hex),
            "the wallet key is in the SSH process's {what}"
        );
        ensure!(
            !text.contains("shale_private_key"),
            "SHALE_PRIVATE_KEY in its {what}"
        );
    }

    // What the SSH process's user can read: not the supervisor's environment, and no file of
    // the stack (config, state, ledger, logs) holds the key.
    let uid = uids.split_whitespace().next().unwrap().to_string();
    let gid = gids.split_whitespace().next().unwrap().to_string();
    let as_user = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid", &uid, "--regid", &gid, "--clear-groups", "--"])
            .args(args)
            .output()
    };
    let environ_read = as_user(&["cat", &format!("/proc/{supervisor}/environ")])?;
    ensure!(
        !environ_read.status.success(),
        "the SSH process's user can read the supervisor's environment"
    );
    let dev_dir = stack.dir.path().join("dev");
    let grep = as_user(&["grep", "-rlis", &key_hex, dev_dir.to_str().unwrap()])?;
    ensure!(
        grep.stdout.is_empty(),
        "files the SSH process's user can read hold the wallet key: {}",
        String::from_utf8_lossy(&grep.stdout)
    );

    // A client in the middle of a session when the SSH process is killed.
    let session = open_session(&stack, &state).await?;
    let ledger_path = dev_dir.join("gateway/ledger.db");
    let checkpointed = wait_for_checkpoint(&ledger_path).await?;
    a_lying_ssh_process_gets_only_what_the_chain_allows(&dev_dir.join("gateway/broker.sock"))
        .await?;

    // A crash of the SSH process: the supervisor starts another, which serves again.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(ssh as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let again = wait_for_ssh_child(supervisor, Some(ssh)).await?;
    let line = banner(&addr).await?;
    ensure!(
        line.starts_with("SSH-2.0-"),
        "a banner after the restart: {line}"
    );
    ensure!(
        status_field(again, "Uid:")?
            .split_whitespace()
            .all(|u| u != "0"),
        "the restarted SSH process is unprivileged too"
    );
    // The new SSH process ended the session the dead one left open, at its last checkpoint.
    let ended = session_row(&ledger_path, &checkpointed.id).await?;
    ensure!(
        ended.outcome.as_deref() == Some("gateway_lost"),
        "the interrupted session's outcome: {ended:?}"
    );
    ensure!(
        ended.ended_at_ms.is_some() && ended.bytes_out >= checkpointed.bytes_out,
        "ended at its checkpoint with its bytes: {ended:?} after {checkpointed:?}"
    );
    drop(session);
    drop(stack);
    Ok(())
}

/// Speaks to the real broker as a compromised SSH process would (the broker serves root too):
/// order 1 is live with 1 CPU, 512 MiB and 1 GiB of disk; nothing else is.
async fn a_lying_ssh_process_gets_only_what_the_chain_allows(socket: &Path) -> anyhow::Result<()> {
    let broker = BrokerClient::connect(socket).await?;
    ensure!(
        broker.orders().await?.contains(&1),
        "order 1's container is up"
    );
    let terms = LeaseSpec {
        order: 1,
        cpus: 1,
        memory_bytes: 512 << 20,
        gpus: 0,
        dataset: None,
        expires_at: std::time::SystemTime::now() + Duration::from_secs(600),
        pids_limit: None,
        disk_bytes: 1 << 30,
        image: None,
        image_repository: None,
    };
    let not_allowed = |e: ProvisionError, words: &str| match e {
        ProvisionError::NotAllowed { reason, .. } if reason.contains(words) => Ok(()),
        other => Err(anyhow::anyhow!(
            "expected a refusal naming {words:?}: {other}"
        )),
    };
    let greedy = LeaseSpec {
        cpus: 2,
        memory_bytes: 8 << 30,
        ..terms.clone()
    };
    not_allowed(
        broker.ensure(&greedy).await.unwrap_err(),
        "2 CPUs (terms: 1)",
    )?;
    let invented = LeaseSpec {
        order: 99,
        ..terms.clone()
    };
    not_allowed(broker.ensure(&invented).await.unwrap_err(), "99")?;
    let shell = ExecRequest {
        argv: vec!["true".into()],
        ..ExecRequest::default()
    };
    match broker.exec(99, shell).await {
        Err(e) => not_allowed(e, "99")?,
        Ok(_) => bail!("the broker ran a process for an order nobody placed"),
    }
    not_allowed(broker.release(1).await.unwrap_err(), "live on chain")?;
    ensure!(
        broker.orders().await?.contains(&1),
        "order 1's container survived the release it was refused"
    );
    // Pulls: only by digest, only from a registry the SP's config allows (the dev stack allows
    // none), before anything reaches the network.
    let digest = format!("sha256:{}", "ab".repeat(32));
    match broker.pull_image("203.0.113.7:5000/x/y", &digest).await {
        Err(ProvisionError::ClientImageRefused { reason, .. }) => ensure!(
            reason.contains("only the images of its catalog"),
            "{reason}"
        ),
        other => bail!("a pull from a registry nobody allowed: {other:?}"),
    }
    match broker.pull_image("203.0.113.7:5000/x/y", "latest").await {
        Err(e) => ensure!(e.to_string().contains("sha256 digest"), "{e}"),
        Ok(()) => bail!("a pull by tag was served"),
    }
    Ok(())
}

/// A client's order on the dev stack (accepted by the dev SP), with an ssh session into it that
/// printed something and then waits.
async fn open_session(
    stack: &DevStack,
    state: &serde_json::Value,
) -> anyhow::Result<tokio::process::Child> {
    let dev = stack.dir.path().join("dev");
    let key = stack.dir.path().join("id_ed25519");
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", ""])
        .arg("-f")
        .arg(&key)
        .status()?;
    ensure!(made.success(), "ssh-keygen failed");
    let keys = state["dev_keys"].as_array().context("dev_keys")?;
    let (sp_key, client_key) = (
        keys[1].as_str().context("the SP key")?,
        keys[2].as_str().context("the client key")?,
    );
    let provider = state["provider"].as_str().context("provider")?;
    let mut create = stack.shale(&["order", "create", "--provider", provider, "--key"]);
    create
        .arg(key.with_extension("pub"))
        .args([
            "--cpus", "1", "--memory", "512MiB", "--disk", "1GiB", "--hours", "1",
        ])
        .args(["--deposit", "0.1FIL"])
        .env("SHALE_CONFIG", dev.join("client.toml"))
        .env("SHALE_PRIVATE_KEY", client_key);
    let create = tokio::process::Command::from(create).output();
    // The SP accepts, as `shale sp accept` does, once the order is on chain (id 1, a fresh chain).
    let accept = async {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut accept = stack.shale(&["sp", "accept", "1", "--config"]);
            accept
                .arg(dev.join("gateway.toml"))
                .env("SHALE_PRIVATE_KEY", sp_key);
            let out = tokio::process::Command::from(accept).output().await?;
            if out.status.success() {
                return Ok::<_, anyhow::Error>(());
            }
            if Instant::now() > deadline {
                bail!("shale sp accept: {}", String::from_utf8_lossy(&out.stderr));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let (created, accepted) = tokio::join!(create, accept);
    accepted?;
    let created = created?;
    ensure!(
        created.status.success(),
        "shale order create: {}{}",
        String::from_utf8_lossy(&created.stdout),
        String::from_utf8_lossy(&created.stderr)
    );
    let session = tokio::process::Command::new("ssh")
        .arg("-F")
        .arg(dev.join("ssh/shale/config"))
        .args(["-o", "BatchMode=yes", "shale-1", "echo seated; sleep 300"])
        .env("SHALE_CONFIG", dev.join("client.toml"))
        .env("SHALE_PRIVATE_KEY", client_key)
        .env("PATH", tools_path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    Ok(session)
}

/// A session's record in the gateway's ledger.
#[derive(Debug)]
struct SessionRow {
    id: String,
    ended_at_ms: Option<i64>,
    bytes_out: i64,
    outcome: Option<String>,
}

async fn rows(ledger: &Path) -> anyhow::Result<Vec<(SessionRow, Option<i64>)>> {
    use sqlx::Row;
    let url = format!("sqlite://{}?mode=ro", ledger.display());
    let mut db = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url).await?;
    let found = sqlx::query(
        "SELECT session_id, ended_at_ms, bytes_out, outcome, last_seen_ms FROM sessions",
    )
    .fetch_all(&mut db)
    .await?;
    found
        .iter()
        .map(|r| {
            Ok((
                SessionRow {
                    id: r.try_get("session_id")?,
                    ended_at_ms: r.try_get("ended_at_ms")?,
                    bytes_out: r.try_get("bytes_out")?,
                    outcome: r.try_get("outcome")?,
                },
                r.try_get("last_seen_ms")?,
            ))
        })
        .collect()
}

/// Waits until the open session's bytes have been checkpointed into the ledger.
async fn wait_for_checkpoint(ledger: &Path) -> anyhow::Result<SessionRow> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(found) = rows(ledger).await {
            if let Some((row, _)) = found
                .into_iter()
                .find(|(r, seen)| r.ended_at_ms.is_none() && seen.is_some() && r.bytes_out > 0)
            {
                return Ok(row);
            }
        }
        if Instant::now() > deadline {
            bail!("no open session was checkpointed in {}", ledger.display());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn session_row(ledger: &Path, id: &str) -> anyhow::Result<SessionRow> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = rows(ledger).await?;
        let row = found
            .into_iter()
            .map(|(r, _)| r)
            .find(|r| r.id == id)
            .with_context(|| format!("session {id} is not in the ledger"))?;
        if row.ended_at_ms.is_some() || Instant::now() > deadline {
            return Ok(row);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
