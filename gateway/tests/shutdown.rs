//! Graceful shutdown of a whole gateway with its real parts: anvil with the marketplace and an
//! accepted order, containerd with the busybox image, the SQLite ledger, `/metrics`, and stock
//! OpenSSH as the client. A logged-in session running a process, a socket that never speaks SSH
//! and an open `/metrics` connection are all live when the gateway is told to stop; afterwards
//! every task it spawned has finished, both listeners are closed, the user was told why, and the
//! session's end record carries the reason and its bytes.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use shale_contracts::devnet::{self, Devnet};
use shale_contracts::{Marketplace, NewOrder, Offer, U256};
use shale_gateway::admission::key_digest;
use shale_gateway::config::{AuthConfig, ChainConfig, MetricsConfig, SessionConfig};
use shale_gateway::{hostkey, Gateway, GatewayConfig};
use shale_provisioner::daemon::LocalContainerd;
use shale_provisioner::{image_build, NetworkConfig, Provisioner, ProvisionerConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

const SP_ACCOUNT: usize = 1;
const CLIENT_ACCOUNT: usize = 2;

/// A generous bound for the whole shutdown (drain time plus the margins): not a timing claim.
const SHUTDOWN_BOUND: Duration = Duration::from_secs(60);

/// `false` (after saying why) when a component the test needs is missing; in CI that fails.
fn components_present() -> bool {
    let containerd = std::process::Command::new("containerd")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let missing = match (devnet::find_anvil().is_some(), containerd) {
        (true, true) => return true,
        (false, _) => "anvil (run scripts/setup.sh)",
        (true, false) => "containerd (apt-get install containerd runc)",
    };
    eprintln!("SKIPPED: {missing} not found");
    // In CI a missing component is a failure, never a skipped pass.
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true: the reason above fails the test"
    );
    false
}

/// Stock `ssh` as a client with `key`, pinned to the gateway's host key.
fn ssh(dir: &Path, key: &Path, port: u16, user: u64, command: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.args(["-p", &port.to_string(), "-i"])
        .arg(key)
        .args([
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
        ])
        .arg(format!(
            "UserKnownHostsFile={}",
            dir.join("known_hosts").display()
        ))
        .args(["-o", "ConnectTimeout=20", "-F", "/dev/null"])
        .arg(format!("{user}@127.0.0.1"))
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_tells_users_ends_every_task_and_closes_the_listeners() {
    if !components_present() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("shale-gw-shutdown-")
        .tempdir()
        .unwrap();

    // The chain: a provider with an offer, and an accepted order for the client's key.
    let devnet = Devnet::start().await.expect("anvil starts");
    let marketplace = devnet
        .deploy_marketplace_with_test_verifier(&[16])
        .await
        .expect("the marketplace deploys");
    let sp = devnet
        .marketplace_as(marketplace, SP_ACCOUNT)
        .await
        .unwrap();
    let client = devnet
        .marketplace_as(marketplace, CLIENT_ACCOUNT)
        .await
        .unwrap();
    let client_key_path = dir.path().join("client_ed25519");
    let client_key = hostkey::load_or_generate(&client_key_path).unwrap();
    let provider = devnet.signer(SP_ACCOUNT).address();

    // containerd and the small image.
    let socket = std::env::var_os("SHALE_TEST_CONTAINERD").map(PathBuf::from);
    let containerd = LocalContainerd::connect_or_spawn(socket.as_deref(), &dir.path().join("ctd"))
        .await
        .expect("containerd");
    let archive = image_build::build_busybox_image(&image_build::default_cache_dir())
        .await
        .expect("the busybox image");
    let containers = ProvisionerConfig {
        socket: containerd.socket().to_path_buf(),
        namespace: format!("shale-test-gw-shutdown-{}", std::process::id()),
        state_dir: dir.path().join("containers"),
        provider: format!("{provider:#x}"),
        stop_grace: Duration::from_secs(2),
        cdi_dirs: vec![],
        scope: sp.scope().await.unwrap(),
        // The network is not what this test is about; the order's container runs without one.
        network: NetworkConfig {
            enabled: false,
            ..NetworkConfig::default()
        },
        ..ProvisionerConfig::default()
    };
    let probe = Provisioner::connect(containers.clone()).await.unwrap();
    let image = probe
        .import_image(&archive)
        .await
        .expect("the image imports");
    let containers = ProvisionerConfig {
        image,
        ..containers
    };
    let provisioner = Provisioner::connect(containers.clone()).await.unwrap();

    let config = GatewayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        host_key: dir.path().join("host_ed25519"),
        state_dir: dir.path().join("gateway"),
        chain: ChainConfig {
            rpc_url: devnet.rpc_url().to_string(),
            marketplace,
            provider,
            poll_interval: Duration::from_millis(200),
            fees: Default::default(),
        },
        containers,
        images: Default::default(),
        registries: Vec::new(),
        image_gc: Default::default(),
        sessions: SessionConfig {
            drain: Duration::from_secs(5),
            ..SessionConfig::default()
        },
        auth: AuthConfig::default(),
        meter: shale_meter::MeterConfig {
            tick_interval_secs: 1,
            ledger_url: None,
        },
        payment: Default::default(),
        acknowledgments: Default::default(),
        metrics: MetricsConfig {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            settler_listen: None,
        },
        log: Default::default(),
        privsep: Default::default(),
    };
    let reader = Marketplace::connect(devnet.rpc_url(), marketplace, None)
        .await
        .unwrap();
    let gateway = Gateway::bind(config, reader, std::sync::Arc::new(provisioner.clone()))
        .await
        .expect("the gateway binds");
    let addr = gateway.local_addr();
    let metrics_addr = gateway.metrics_addr().expect("metrics are served");
    std::fs::write(
        dir.path().join("known_hosts"),
        format!(
            "[127.0.0.1]:{} {}\n",
            addr.port(),
            gateway.host_public_key()
        ),
    )
    .unwrap();
    sp.register_provider(
        &addr.to_string(),
        &gateway.host_public_key(),
        &Offer {
            cpus: 1,
            memory_mib: 256,
            disk_mib: 64,
            max_disk_mib: 64,
            gpu_model: String::new(),
            gpu_count: 0,
            price_per_second: U256::from(1_000u64),
            price_per_gib: U256::from(1_000u64),
        },
        &[],
    )
    .await
    .expect("the provider registers");
    let order = NewOrder::for_offer(
        &sp.provider(provider).await.unwrap(),
        key_digest(client_key.public_key()),
        U256::from(10u64).pow(U256::from(18u64)),
        3_600,
    );
    let order = client.create_order(&order).await.expect("order placed");
    sp.accept(order).await.expect("order accepted");

    let ledger = gateway.ledger().clone();
    let tasks = gateway.tasks();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(gateway.run(async {
        let _ = stopped.await;
    }));

    // A logged-in session with a process in the order's container.
    let mut session = ssh(
        dir.path(),
        &client_key_path,
        addr.port(),
        order,
        "echo ready; sleep 600",
    )
    .spawn()
    .expect("ssh runs");
    let mut stdout = BufReader::new(session.stdout.take().unwrap());
    let mut first = String::new();
    let read = tokio::time::timeout(SHUTDOWN_BOUND, stdout.read_line(&mut first)).await;
    if !matches!(read, Ok(Ok(n)) if n > 0) {
        let mut err = String::new();
        let _ = session
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .await;
        panic!("the session did not start ({read:?}): {err}");
    }
    assert_eq!(first.trim(), "ready");
    // A socket that never speaks SSH, and an idle /metrics connection.
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut scrape = tokio::net::TcpStream::connect(metrics_addr).await.unwrap();
    // Connection, channel, pumps, watcher, /metrics, the order's acknowledgment check...
    assert!(tasks.running() >= 5, "{} tasks", tasks.running());
    assert!(!tasks.finished());

    stop.send(()).unwrap();
    tokio::time::timeout(SHUTDOWN_BOUND, running)
        .await
        .expect("the gateway stops within the bound")
        .unwrap()
        .expect("the gateway stops cleanly");

    assert!(tasks.finished(), "{} tasks still run", tasks.running());
    assert!(tasks.is_stopping());
    for listener in [addr, metrics_addr] {
        let refused = tokio::net::TcpStream::connect(listener).await;
        assert!(refused.is_err(), "{listener} still accepts");
    }
    // Both idle sockets were closed by the gateway, not left open.
    let mut buf = [0u8; 256];
    for socket in [&mut silent, &mut scrape] {
        let read = tokio::time::timeout(SHUTDOWN_BOUND, async {
            loop {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(read.is_ok(), "an idle socket was left open");
    }
    // The user was told why, and ssh ended.
    let status = tokio::time::timeout(SHUTDOWN_BOUND, session.wait())
        .await
        .expect("ssh ends")
        .unwrap();
    let mut err = String::new();
    session
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .await
        .unwrap();
    assert!(!status.success());
    assert!(err.contains("the gateway is restarting"), "stderr: {err}");
    // The session's end record: the real reason and its bytes.
    let records = ledger.sessions(order).await.unwrap();
    assert_eq!(records.len(), 1, "{records:?}");
    let record = &records[0];
    assert!(record.ended_at_ms.is_some(), "{record:?}");
    assert_eq!(
        record.outcome.as_deref(),
        Some("shutting_down"),
        "{record:?}"
    );
    assert!(record.bytes_out >= "ready\n".len() as u64, "{record:?}");

    let _ = provisioner.release(order).await;
    drop(containerd);
}
