//! The gateway under attack, on loopback: silent and stalled sockets, a flood of usernames, one
//! connection that opens far too much, while stock `ssh` users keep logging in. Counts are kept
//! small enough for CI; `scripts/bench.sh attack` runs them larger.
//!
//! The gateway runs in this test's process, so the memory figure is this process's resident set:
//! the gateway plus the attacking client plus the test, an upper bound for the gateway's share.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use russh::client;
use russh::keys::{PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::ChannelMsg;
use shale_gateway::config::SessionConfig;
use shale_tests::ssh::{run, Target};
use shale_tests::{OrderOptions, Stack, StackOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// `n` from the environment (so `scripts/bench.sh` can run larger), else `default`.
fn scale(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A value of a metric series on the `/metrics` page (0 when absent).
fn metric(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// This process's resident memory, in bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Samples [`rss_bytes`] until dropped and keeps the peak.
struct RssPeak {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl RssPeak {
    fn start() -> Self {
        let peak = Arc::new(AtomicU64::new(rss_bytes()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss_bytes(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Self { peak, stop }
    }

    fn peak(&self) -> u64 {
        self.peak
            .fetch_max(rss_bytes(), Ordering::Relaxed)
            .max(rss_bytes())
    }
}

impl Drop for RssPeak {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// `ssh … echo ok` as a script runs it; true when it printed `ok` and exited 0.
async fn logs_in(target: &Target) -> anyhow::Result<bool> {
    let mut cmd = target.ssh();
    cmd.arg("echo ok");
    let out = tokio::task::spawn_blocking(move || run(cmd)).await??;
    if out.code != Some(0) || out.stdout != "ok\n" {
        eprintln!("login failed: {out:?}");
    }
    Ok(out.code == Some(0) && out.stdout == "ok\n")
}

/// A TCP connection to `to` from the loopback address `from` (any of 127.0.0.0/8 is local).
async fn connect_from(from: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((from, 0)))?;
    socket.connect(to).await
}

/// Reads until the gateway closes `socket` or `deadline` passes; what it sent, and whether it
/// closed in time.
async fn read_until_closed(mut socket: TcpStream, deadline: Instant) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, socket.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (got, false),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_and_stalled_sockets_are_closed_within_the_grace_time_while_ssh_logs_in(
) -> anyhow::Result<()> {
    let grace = Duration::from_secs(5);
    let stack = Stack::start_with(StackOptions {
        sessions: SessionConfig {
            login_grace_time: grace,
            ..SessionConfig::default()
        },
        ..StackOptions::default()
    })
    .await?;
    let key = stack.key("alice", "ed25519")?;
    let order = stack.order(&key, OrderOptions::default()).await?;
    let target = stack.target(order.to_string(), &key);
    let n = scale("SHALE_ATTACK_SOCKETS", 1000);
    let per_source = SessionConfig::default().max_startups_per_source as f64;

    let opened = Instant::now();
    let mut sockets = Vec::with_capacity(2 * n);
    for _ in 0..n {
        sockets.push(connect_from([127, 0, 0, 2], stack.gateway).await?);
    }
    for _ in 0..n {
        let mut s = connect_from([127, 0, 0, 3], stack.gateway).await?;
        // A version line, then nothing: no key exchange ever comes.
        let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2 stall\r\n").await;
        sockets.push(s);
    }
    // Every socket is open (or already refused) before the real user tries.
    let page = stack.scrape().await?;
    let waiting = metric(&page, "shale_gateway_unauthenticated_connections");
    ensure!(
        waiting <= 2.0 * per_source,
        "at most max_startups_per_source ({per_source}) from each of the two sources wait: {waiting}"
    );
    ensure!(
        logs_in(&target).await?,
        "stock ssh logs in among {} attacking sockets",
        2 * n
    );

    // Every socket is closed by the gateway: the excess at once (most with a reason), the
    // admitted ones when the grace time runs out.
    let deadline = opened + grace + Duration::from_secs(10);
    let reads = sockets
        .into_iter()
        .map(|s| tokio::spawn(read_until_closed(s, deadline)));
    let mut open = 0;
    let mut told = 0;
    for read in reads {
        let (bytes, closed) = read.await?;
        if !closed {
            open += 1;
        }
        if String::from_utf8_lossy(&bytes).contains("shale: too many connections from your address")
        {
            told += 1;
        }
    }
    ensure!(open == 0, "{open} sockets still open after the grace time");
    ensure!(told > 0, "refused sockets are told why");
    let page = stack.scrape().await?;
    eprintln!(
        "attack sockets={} refused_per_source={} grace_closed={} told={told}",
        2 * n,
        metric(
            &page,
            "shale_gateway_preauth_refused_total{reason=\"per_source\"}"
        ),
        metric(
            &page,
            "shale_gateway_preauth_refused_total{reason=\"login_grace_time\"}"
        ),
    );
    ensure!(
        metric(
            &page,
            "shale_gateway_preauth_refused_total{reason=\"login_grace_time\"}"
        ) >= 2.0 * per_source,
        "the admitted sockets were closed by the grace time"
    );
    ensure!(metric(&page, "shale_gateway_unauthenticated_connections") == 0.0);
    ensure!(logs_in(&target).await?, "and logs in afterwards");
    stack.stop().await
}

/// Accepts exactly the pinned host key.
struct PinnedHost(PublicKey);

impl client::Handler for PinnedHost {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        offered: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(
            matches!(offered, PublicKeyOrCertificate::PublicKey { key, .. }
            if key.key_data() == self.0.key_data()),
        )
    }
}

fn host_key(stack: &Stack) -> anyhow::Result<PublicKey> {
    Ok(PublicKey::from_openssh(&stack.host_key)?)
}

/// A small deterministic generator, so a failing run can be replayed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn random_usernames_cost_bounded_chain_calls_and_a_valid_user_from_the_same_address_logs_in(
) -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let key = stack.key("alice", "ed25519")?;
    let order = stack.order(&key, OrderOptions::default()).await?;
    let target = stack.target(order.to_string(), &key);
    ensure!(logs_in(&target).await?);
    // 10,000 under `scripts/bench.sh attack`; fewer in CI, where each handshake of this debug
    // build costs both ends' CPU in one process.
    let attempts = scale("SHALE_ATTACK_USERNAMES", 2_000);

    let before = stack.scrape().await?;
    let lookups = |page: &str| {
        metric(page, "shale_gateway_chain_lookups_total{kind=\"order\"}")
            + metric(
                page,
                "shale_gateway_chain_lookups_total{kind=\"order_count\"}",
            )
    };
    let started = Instant::now();
    let config = Arc::new(client::Config::default());
    let host = host_key(&stack)?;
    let next = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    // Four at once: under the per-source cap, so the valid user's connection gets a place.
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (config, host, next, refused) =
                (config.clone(), host.clone(), next.clone(), refused.clone());
            let addr = stack.gateway;
            tokio::spawn(async move {
                let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ (w + 1));
                while next.fetch_add(1, Ordering::Relaxed) < attempts as u64 {
                    let r = rng.next();
                    let user = match r % 4 {
                        0 => format!("u{:x}", rng.next()),
                        1 => rng.next().to_string(),
                        2 => format!("order-{}", 1000 + rng.next() % 1_000_000),
                        _ => format!("{:#x}", rng.next() | 1),
                    };
                    let Ok(mut handle) =
                        client::connect(config.clone(), addr, PinnedHost(host.clone())).await
                    else {
                        continue;
                    };
                    if !matches!(handle.authenticate_none(user).await, Ok(r) if r.success()) {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();

    let mut logins = 0;
    while workers.iter().any(|w| !w.is_finished()) {
        ensure!(
            logs_in(&target).await?,
            "the order's own key logs in while {} usernames were tried",
            next.load(Ordering::Relaxed)
        );
        logins += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for w in workers {
        w.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = stack.scrape().await?;
    let calls = lookups(&after) - lookups(&before);
    eprintln!(
        "usernames={attempts} refused={} secs={elapsed:.1} chain_calls={calls} \
         (order={} order_count={}) valid_logins={logins}",
        refused.load(Ordering::Relaxed),
        metric(&after, "shale_gateway_chain_lookups_total{kind=\"order\"}")
            - metric(&before, "shale_gateway_chain_lookups_total{kind=\"order\"}"),
        metric(
            &after,
            "shale_gateway_chain_lookups_total{kind=\"order_count\"}"
        ) - metric(
            &before,
            "shale_gateway_chain_lookups_total{kind=\"order_count\"}"
        ),
    );
    ensure!(refused.load(Ordering::Relaxed) >= attempts as u64 - 4);
    ensure!(logins >= 2, "the valid user logged in throughout");
    // The bound depends on time, not on the attack: one order-count read per
    // `order_count_refresh` (2 s) at most, the watcher's re-read of the live order each poll
    // (0.5 s in tests), the valid user's own reads (one per `order_cache`, 30 s), and 10 of
    // slack. Without the count and the split caches, every numeric id is a call.
    let bound = 10.0 + elapsed / 2.0 + elapsed / 0.5 + elapsed / 30.0;
    ensure!(
        calls <= bound,
        "{calls} chain calls for {attempts} usernames (bound {bound:.0})"
    );
    stack.stop().await
}

/// A never-reading TCP listener on the container's loopback: it never accepts, so connections
/// sit in its backlog and whatever is sent to them fills kernel buffers, then stalls.
const STALLED_LISTENER: &str = "exec python3 -c \"import socket,time; s=socket.socket(); \
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', 9000)); \
s.listen(4096); print('listening', flush=True); time.sleep(3600)\"";

#[tokio::test(flavor = "multi_thread")]
async fn one_connection_past_its_caps_is_refused_and_the_gateway_stays_small() -> anyhow::Result<()>
{
    let stack = Stack::start().await?;
    let alice = stack.key("alice", "ed25519")?;
    let bob = stack.key("bob", "ed25519")?;
    let order = stack.order(&alice, OrderOptions::default()).await?;
    let other = stack.order(&bob, OrderOptions::default()).await?;
    let bob_target = stack.target(other.to_string(), &bob);
    let alice_target = stack.target(order.to_string(), &alice);
    ensure!(logs_in(&bob_target).await?);
    let defaults = SessionConfig::default();

    let key = Arc::new(russh::keys::load_secret_key(&alice.path, None)?);
    let mut handle = client::connect(
        Arc::new(client::Config::default()),
        stack.gateway,
        PinnedHost(host_key(&stack)?),
    )
    .await?;
    let auth = handle
        .authenticate_publickey(order.to_string(), PrivateKeyWithHashAlg::new(key, None))
        .await?;
    ensure!(auth.success());

    let baseline = rss_bytes();
    let peak = RssPeak::start();

    // The first channel runs the stalled listener.
    let mut listener = handle.channel_open_session().await?;
    listener.exec(true, STALLED_LISTENER).await?;
    tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            match listener.wait().await {
                Some(ChannelMsg::Data { data }) if data.starts_with(b"listening") => break Ok(()),
                Some(ChannelMsg::Eof) | Some(ChannelMsg::Close) | None => {
                    break Err(anyhow::anyhow!("the listener did not start"))
                }
                _ => {}
            }
        }
    })
    .await
    .context("waiting for the listener")??;

    // 1,000 session channels: max_channels are let in, the rest refused with a reason.
    let channels_tried = scale("SHALE_ATTACK_CHANNELS", 1000);
    let mut channels = vec![];
    let mut refused_channels = 0;
    let mut channel_reason = String::new();
    for _ in 1..channels_tried {
        match handle.channel_open_session().await {
            Ok(c) => channels.push(c),
            Err(e) => {
                refused_channels += 1;
                channel_reason = e.to_string();
            }
        }
    }
    eprintln!("channel refusal: {channel_reason}");
    ensure!(
        channels.len() + 1 == defaults.max_channels,
        "{} session channels open",
        channels.len() + 1
    );
    ensure!(refused_channels == channels_tried - defaults.max_channels);

    // 100,000 env requests on one channel: the first MAX_ENV_VARS kept, the rest refused.
    let envs = scale("SHALE_ATTACK_ENVS", 100_000);
    let env_channel = channels.pop().context("an open channel")?;
    for i in 0..envs {
        env_channel
            .set_env(false, format!("LC_X{i}"), "0123456789")
            .await?;
    }
    env_channel.exec(true, "env | grep -c '^LC_X'").await?;
    let mut env_channel = env_channel;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(msg) = env_channel.wait().await {
            match msg {
                ChannelMsg::Data { data } => out.extend_from_slice(&data),
                ChannelMsg::Eof | ChannelMsg::Close => break,
                _ => {}
            }
        }
    })
    .await
    .context("the env channel's command")?;
    let kept: usize = String::from_utf8_lossy(&out).trim().parse()?;
    ensure!(
        kept == shale_gateway::policy::MAX_ENV_VARS,
        "{kept} of {envs} variables kept"
    );

    // 200 forwards to the stalled listener: max_forwards_per_order let in, the rest refused.
    let forwards_tried = scale("SHALE_ATTACK_FORWARDS", 200);
    let mut forwards = vec![];
    let mut refused_forwards = 0;
    let mut forward_reason = String::new();
    for _ in 0..forwards_tried {
        match handle
            .channel_open_direct_tcpip("127.0.0.1", 9000, "127.0.0.1", 50000)
            .await
        {
            Ok(c) => forwards.push(c),
            Err(e) => {
                refused_forwards += 1;
                forward_reason = e.to_string();
            }
        }
    }
    eprintln!("forward refusal: {forward_reason}");
    let allowed = defaults.max_forwards_per_order.min(forwards_tried);
    ensure!(
        forwards.len() == allowed,
        "{} forwards open",
        forwards.len()
    );
    ensure!(refused_forwards == forwards_tried - allowed);

    // Push 8 MiB into every forward the listener never reads, for a bounded time: the gateway
    // must stop taking it (SSH and TCP flow control), not buffer it.
    let push = Duration::from_secs(10);
    let chunk = vec![0x5au8; 32 * 1024];
    let writers: Vec<_> = forwards
        .into_iter()
        .map(|c| {
            let chunk = chunk.clone();
            tokio::spawn(async move {
                let mut sent = 0usize;
                let _ = tokio::time::timeout(push, async {
                    while sent < 8 << 20 {
                        if c.data(&chunk[..]).await.is_err() {
                            break;
                        }
                        sent += chunk.len();
                    }
                })
                .await;
                (c, sent)
            })
        })
        .collect();
    // Meanwhile another order's user, and this order's own user on a fresh connection, log in.
    ensure!(logs_in(&bob_target).await?, "another order is unaffected");
    ensure!(
        logs_in(&alice_target).await?,
        "the order's own new connection is unaffected"
    );
    let mut offered = 0usize;
    let mut held = vec![];
    for w in writers {
        let (c, sent) = w.await?;
        offered += sent;
        held.push(c);
    }
    let grown = peak.peak().saturating_sub(baseline);
    let page = stack.scrape().await?;
    eprintln!(
        "channels={channels_tried} forwards={forwards_tried} envs={envs} \
         forward_bytes_accepted_by_client_window={offered} rss_baseline={} rss_growth={grown} \
         refused: channels={} forwards={}",
        baseline,
        metric(
            &page,
            "shale_gateway_channels_refused_total{reason=\"max_channels\"}"
        ),
        metric(
            &page,
            "shale_gateway_channels_refused_total{reason=\"max_forwards\"}"
        ),
    );
    // The bound: russh's per-channel queue (16 messages of 32 KiB from this client) for each of
    // the 138 open channels is 69 MiB; with the tasks' buffers, the client's side and what the
    // allocator keeps after hundreds of MiB went through, 320 MiB. Before the caps, 1,200
    // channels × 256 queued messages could hold gigabytes.
    ensure!(
        grown < 320 << 20,
        "this process grew by {} MiB under the attack",
        grown >> 20
    );
    drop(held);
    drop(channels);
    // The connection is stalled by design: its client may not get a disconnect out.
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        handle.disconnect(russh::Disconnect::ByApplication, "", "en"),
    )
    .await;
    drop(handle);
    ensure!(logs_in(&bob_target).await?, "and afterwards");
    stack.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_reach_batch_mode_scripts_and_opensshs_default_algorithms_log_in(
) -> anyhow::Result<()> {
    let stack = Stack::start_with(StackOptions {
        sessions: SessionConfig {
            max_per_order: 1,
            max_startups_per_source: 2,
            ..SessionConfig::default()
        },
        ..StackOptions::default()
    })
    .await?;
    let key = stack.key("alice", "ed25519")?;
    let order = stack.order(&key, OrderOptions::default()).await?;
    let target = stack.target(order.to_string(), &key);
    // ssh prints auth banners and disconnect reasons at its default LogLevel (INFO).
    let batch = |extra: &[&str], command: &str| {
        let mut cmd = std::process::Command::new("ssh");
        cmd.args(target.options().into_iter().map(|o| {
            if o == "LogLevel=ERROR" {
                "LogLevel=INFO".into()
            } else {
                o
            }
        }))
        .args(extra)
        .args(["-p", &stack.gateway.port().to_string(), "-l", &target.user])
        .arg(stack.gateway.ip().to_string())
        .arg(command)
        .stdin(std::process::Stdio::null());
        cmd
    };

    for (kind, value) in [
        ("Ciphers", "aes128-gcm@openssh.com"),
        ("KexAlgorithms", "ecdh-sha2-nistp256"),
        ("KexAlgorithms", "ecdh-sha2-nistp384"),
        ("KexAlgorithms", "ecdh-sha2-nistp521"),
    ] {
        let cmd = batch(&["-o", &format!("{kind}={value}")], "echo ok");
        let out = tokio::task::spawn_blocking(move || run(cmd)).await??;
        ensure!(out.stdout == "ok\n", "{kind}={value}: {out:?}");
    }

    // One session open: the next is let in to be told why, with a non-zero exit. The holder
    // is seated once it prints; with max_per_order 1, a holder that logged in while an earlier
    // session was still closing is itself refused (and exits), so it simply tries again.
    let mut seated = None;
    for _ in 0..20 {
        let mut child = batch(&[], "echo seated; exec sleep 120")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().expect("piped stdout");
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
                .map(|_| line)
        })
        .await??;
        if line.trim() == "seated" {
            seated = Some(child);
            break;
        }
        let _ = child.wait();
    }
    let mut holder =
        seated.ok_or_else(|| anyhow::anyhow!("the holder session was never seated"))?;
    let full = tokio::task::spawn_blocking({
        let cmd = batch(&[], "true");
        move || run(cmd)
    })
    .await??;
    let _ = holder.kill();
    let _ = holder.wait();
    ensure!(full.code == Some(255), "{full:?}");
    ensure!(
        full.stderr
            .contains(&format!("order {order} already has 1 open sessions")),
        "{full:?}"
    );

    // Past max_startups_per_source the client reads why before the socket closes.
    let idle: Vec<TcpStream> = idle_connections(stack.gateway, 2).await?;
    let out = tokio::task::spawn_blocking({
        let cmd = batch(&[], "true");
        move || run(cmd)
    })
    .await??;
    drop(idle);
    ensure!(out.code == Some(255), "{out:?}");
    ensure!(
        out.stderr
            .contains("too many connections from your address are still logging in"),
        "{out:?}"
    );
    stack.stop().await
}

/// `n` idle connections from 127.0.0.1.
async fn idle_connections(to: SocketAddr, n: usize) -> anyhow::Result<Vec<TcpStream>> {
    let mut out = vec![];
    for _ in 0..n {
        out.push(TcpStream::connect(to).await?);
    }
    // Let the gateway accept them before the next client comes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(out)
}
