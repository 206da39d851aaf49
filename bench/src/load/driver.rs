//! The load generator: N interactive SSH sessions from one process, built on russh's client.
//!
//! It runs in a process of its own (the bench re-executes itself) so that its memory and CPU are
//! never counted as the server's. It speaks to the parent over stdin and stdout in lines: it
//! prints [`Event::Established`] once every session is open, waits for `go`, types for the
//! agreed time, prints [`Event::Steady`], waits for `close`, then hangs up.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use russh::client;
use russh::keys::{PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, Disconnect};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, watch, Semaphore};

/// The command each session runs behind its PTY: the terminal goes raw and quiet, as a shell's
/// line editor puts it, so every echo is the process reading a key and writing it back; `R`
/// says the terminal is ready.
pub const ECHO_COMMAND: &str = "stty raw -echo && printf R && exec cat";

/// How long one echo may take before the keystroke counts as lost.
const ECHO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a new session may take to start its process and echo its first key: while a
/// thousand sessions ramp up on a small machine, starting a process is slow on both servers.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// What the parent asks of the generator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DriveSpec {
    /// Server address.
    pub host: String,
    /// Server port.
    pub port: u16,
    /// Logins; session `i` logs in as `users[i % users.len()]`.
    pub users: Vec<String>,
    /// The client's OpenSSH private key.
    pub key: PathBuf,
    /// The server's host key (`ssh-ed25519 AAAA...`); any other key is refused.
    pub host_key: String,
    /// Sessions to hold open at once.
    pub sessions: usize,
    /// Handshakes in flight at once while ramping up.
    pub ramp: usize,
    /// How long to type, in seconds.
    pub secs: f64,
    /// Pause between a key's echo and the next key: uniform in this range, in milliseconds.
    pub think_ms: (u64, u64),
}

/// What the generator reports, one JSON object per line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Every session has either opened (and echoed one key) or failed.
    Established {
        /// Sessions open.
        sessions: usize,
        /// Sessions that failed to open.
        failed: usize,
        /// Why the first failure failed.
        first_error: Option<String>,
        /// Seconds from the first connect to the last session ready.
        ramp_secs: f64,
    },
    /// The typing phase is over; sessions are still open.
    Steady {
        /// Keys whose echo came back.
        keystrokes: u64,
        /// Keys whose echo never came (timeout or a session that died).
        lost: u64,
        /// Sessions that died while typing.
        died: usize,
        /// Why the first of them died.
        first_death: Option<String>,
        /// Echo latency percentiles over all keys of all sessions, in microseconds.
        p50_us: u64,
        /// 99th percentile.
        p99_us: u64,
        /// The slowest echo.
        max_us: u64,
    },
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

/// One open interactive session.
struct Session {
    handle: client::Handle<PinnedHost>,
    channel: russh::Channel<client::Msg>,
}

/// What one session measured while typing.
#[derive(Default)]
struct Typed {
    latencies_us: Vec<u64>,
    lost: u64,
    death: Option<String>,
}

async fn open(
    spec: &DriveSpec,
    user: &str,
    key: Arc<russh::keys::PrivateKey>,
    host_key: &PublicKey,
    config: Arc<client::Config>,
) -> anyhow::Result<Session> {
    let mut handle = client::connect(
        config,
        (spec.host.as_str(), spec.port),
        PinnedHost(host_key.clone()),
    )
    .await
    .context("connecting")?;
    let auth = handle
        .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key, None))
        .await
        .context("authenticating")?;
    ensure!(auth.success(), "the server refused the key for {user}");
    let mut channel = handle.channel_open_session().await?;
    channel
        .request_pty(false, "xterm", 80, 24, 0, 0, &[])
        .await?;
    channel.exec(true, ECHO_COMMAND).await?;
    wait_for(&mut channel, b'R', READY_TIMEOUT).await?;
    // One key typed and echoed: the session is ready for load, not merely open.
    channel.data(&b"."[..]).await?;
    wait_for(&mut channel, b'.', READY_TIMEOUT).await?;
    Ok(Session { handle, channel })
}

/// Reads the channel until `byte` arrives.
async fn wait_for(
    channel: &mut russh::Channel<client::Msg>,
    byte: u8,
    within: Duration,
) -> anyhow::Result<()> {
    tokio::time::timeout(within, async {
        loop {
            match channel.wait().await {
                Some(ChannelMsg::Data { data }) if data.contains(&byte) => return Ok(()),
                Some(ChannelMsg::Failure) => anyhow::bail!("the server refused a request"),
                Some(ChannelMsg::ExitStatus { exit_status }) => {
                    anyhow::bail!("the session's process exited with {exit_status}")
                }
                Some(ChannelMsg::Eof | ChannelMsg::Close) | None => {
                    anyhow::bail!("the channel closed")
                }
                Some(_) => {}
            }
        }
    })
    .await
    .context("no echo within the timeout")?
}

/// A small deterministic generator for think times: sessions must not type in lock-step.
struct Jitter(u64);

impl Jitter {
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        lo + self.0 % (hi - lo + 1)
    }
}

async fn type_until(session: &mut Session, spec: &DriveSpec, seed: u64, until: Instant) -> Typed {
    let mut jitter = Jitter(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let (lo, hi) = spec.think_ms;
    let mut typed = Typed::default();
    // Start at a random phase of the think time.
    tokio::time::sleep(Duration::from_millis(jitter.between(0, hi))).await;
    let mut key = b'a';
    while Instant::now() < until {
        let sent = Instant::now();
        let echoed = async {
            session.channel.data(&[key][..]).await?;
            wait_for(&mut session.channel, key, ECHO_TIMEOUT).await
        };
        match echoed.await {
            Ok(()) => typed.latencies_us.push(sent.elapsed().as_micros() as u64),
            Err(e) => {
                typed.lost += 1;
                typed.death = Some(format!("{e:#}"));
                break;
            }
        }
        key = if key == b'z' { b'a' } else { key + 1 };
        tokio::time::sleep(Duration::from_millis(jitter.between(lo, hi))).await;
    }
    typed
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[i - 1]
}

fn emit(event: &Event) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(event)?);
    Ok(())
}

/// Runs the generator: opens the sessions, types on `go`, hangs up on `close`.
pub async fn drive(spec: DriveSpec) -> anyhow::Result<()> {
    crate::load::procfs::raise_open_files()?;
    let key = Arc::new(
        russh::keys::load_secret_key(&spec.key, None)
            .with_context(|| format!("loading {}", spec.key.display()))?,
    );
    let host_key = PublicKey::from_openssh(spec.host_key.trim())
        .with_context(|| format!("parsing the host key {:?}", spec.host_key))?;
    let config = Arc::new(client::Config {
        nodelay: true,
        inactivity_timeout: None,
        ..Default::default()
    });
    let spec = Arc::new(spec);
    let handshakes = Arc::new(Semaphore::new(spec.ramp.max(1)));
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let (typed_tx, mut typed_rx) = mpsc::unbounded_channel::<Typed>();
    let (go_tx, go_rx) = watch::channel::<Option<Instant>>(None);
    let (close_tx, close_rx) = watch::channel(false);

    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..spec.sessions {
        let (spec, key, host_key, config) =
            (spec.clone(), key.clone(), host_key.clone(), config.clone());
        let (handshakes, ready_tx, typed_tx) =
            (handshakes.clone(), ready_tx.clone(), typed_tx.clone());
        let (mut go_rx, mut close_rx) = (go_rx.clone(), close_rx.clone());
        tasks.spawn(async move {
            let user = &spec.users[i % spec.users.len()];
            let opened = {
                let _permit = handshakes.acquire().await;
                open(&spec, user, key, &host_key, config).await
            };
            let mut session = match opened {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("session {i} as {user}: {e:#}")));
                    return;
                }
            };
            let Ok(until) = go_rx.wait_for(Option::is_some).await.map(|u| u.unwrap()) else {
                return;
            };
            let typed = type_until(&mut session, &spec, i as u64 + 1, until).await;
            let _ = typed_tx.send(typed);
            let _ = close_rx.wait_for(|c| *c).await;
            let _ = session.channel.eof().await;
            let _ = session
                .handle
                .disconnect(Disconnect::ByApplication, "", "en")
                .await;
        });
    }
    drop((ready_tx, typed_tx));

    let (mut open_count, mut failed, mut first_error) = (0, 0, None);
    for _ in 0..spec.sessions {
        match ready_rx.recv().await {
            Some(Ok(())) => open_count += 1,
            Some(Err(e)) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
            None => break,
        }
    }
    emit(&Event::Established {
        sessions: open_count,
        failed,
        first_error,
        ramp_secs: started.elapsed().as_secs_f64(),
    })?;

    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    ensure!(
        stdin.next_line().await?.as_deref() == Some("go"),
        "expected go"
    );
    go_tx.send(Some(Instant::now() + Duration::from_secs_f64(spec.secs)))?;
    let (mut all, mut lost, mut died, mut first_death) = (Vec::new(), 0, 0, None);
    for _ in 0..open_count {
        let Some(t) = typed_rx.recv().await else {
            break;
        };
        all.extend(t.latencies_us);
        lost += t.lost;
        if let Some(why) = t.death {
            died += 1;
            first_death.get_or_insert(why);
        }
    }
    all.sort_unstable();
    emit(&Event::Steady {
        keystrokes: all.len() as u64,
        lost,
        died,
        first_death,
        p50_us: percentile(&all, 0.50),
        p99_us: percentile(&all, 0.99),
        max_us: all.last().copied().unwrap_or(0),
    })?;

    // Hang up when told (or when the parent goes away).
    let _ = stdin.next_line().await;
    close_tx.send(true)?;
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_range_and_varies() {
        let mut j = Jitter(7);
        let draws: Vec<u64> = (0..1000).map(|_| j.between(100, 500)).collect();
        assert!(draws.iter().all(|d| (100..=500).contains(d)));
        assert!(draws.iter().any(|&d| d < 200) && draws.iter().any(|&d| d > 400));
    }

    #[test]
    fn events_round_trip_as_lines() {
        let e = Event::Established {
            sessions: 3,
            failed: 0,
            first_error: None,
            ramp_secs: 1.5,
        };
        let line = serde_json::to_string(&e).unwrap();
        assert!(line.starts_with(r#"{"event":"established""#));
        assert!(matches!(
            serde_json::from_str::<Event>(&line).unwrap(),
            Event::Established { sessions: 3, .. }
        ));
    }
}
