//! Concurrency: N interactive sessions open at once, each typing one key at a time (a pause of
//! 100–500 ms between an echo and the next key) and timing its echo, through the gateway and
//! through OpenSSH's own sshd on the host, in the same run, interleaved for each N. The sessions
//! come from a load generator built on russh's client, in a process of its own (this binary run
//! again with `--drive`), so its cost is never counted as the server's. Reports the server's
//! memory per session, echo latency p50/p99, and the server's CPU while typing; prints a table
//! and the gateway/sshd ratios, and writes JSON.
//!
//! `cargo run --release -p shale-bench --features system --bin shale-bench-load -- [N ...] [--secs S] [--ramp R] [--json OUT.json] [--smoke]`
//!
//! N defaults to 10 100 1000, S (seconds of typing per run) to 15, R (handshakes in flight while
//! ramping up) to 20; `--smoke` is N = 5 for 3 s.
//!
//! What is counted:
//! - memory: anonymous PSS (`Pss_Anon` + `Pss_Shmem` in `/proc/PID/smaps_rollup`; code, mapped
//!   files and kernel memory such as sockets, PTYs and page tables are left out) with the
//!   sessions open, after typing, minus the same before they opened, divided by the sessions
//!   open. Gateway: this process (it runs the gateway in-process; glibc's free lists are trimmed
//!   before each reading). sshd: the listener and every `sshd` process below it. The session's
//!   own process (`cat`) is left out on both sides; the gateway's containerd shims (which hold
//!   the container side of each PTY) are reported apart, as are sshd's `cat` processes.
//! - CPU: user + system time of the same processes over the typing phase.
//!
//! The gateway admits at most `SessionConfig::max_per_order` connections per order, so the
//! gateway's sessions are spread over as many orders (one container each) as that requires.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use shale_bench::load::driver::{self, DriveSpec, Event};
use shale_bench::load::procfs::{self, CpuSnapshot, ProcStat};
use shale_bench::load::{pss_of, ServerProcs};
use shale_bench::reference::ReferenceSshd;
use shale_tests::ssh::{ClientKey, Target};
use shale_tests::{OrderOptions, Stack};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

/// The command line.
struct Options {
    sessions: Vec<usize>,
    secs: f64,
    ramp: usize,
    json: Option<PathBuf>,
}

impl Options {
    fn parse() -> anyhow::Result<Self> {
        let mut opts = Self {
            sessions: Vec::new(),
            secs: 15.0,
            ramp: 20,
            json: None,
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--secs" => opts.secs = value()?.parse()?,
                "--ramp" => opts.ramp = value()?.parse()?,
                "--json" => opts.json = Some(value()?.into()),
                "--smoke" => (opts.sessions, opts.secs) = (vec![5], 3.0),
                n => opts.sessions.push(
                    n.parse()
                        .with_context(|| format!("{n:?} is not a session count"))?,
                ),
            }
        }
        if opts.sessions.is_empty() {
            opts.sessions = vec![10, 100, 1000];
        }
        Ok(opts)
    }
}

/// One server as the generator reaches it and as `/proc` sees it.
struct Server {
    name: &'static str,
    procs: ServerProcs,
    host: String,
    port: u16,
    key: PathBuf,
    host_key: String,
    /// Processes that serve the sessions outside the server and are reported apart (the
    /// gateway's containerd shims).
    relay: Option<String>,
}

/// One run: N sessions on one server.
#[derive(Debug, Serialize)]
struct Row {
    n: usize,
    server: &'static str,
    sessions: usize,
    failed: usize,
    first_error: Option<String>,
    ramp_secs: f64,
    orders: usize,
    mem_base_kib: u64,
    mem_open_kib: u64,
    mem_typed_kib: u64,
    mem_per_session_kib: f64,
    relay_mem_per_session_kib: Option<f64>,
    session_procs_mem_per_session_kib: Option<f64>,
    keystrokes: u64,
    lost: u64,
    died: usize,
    first_death: Option<String>,
    echo_p50_ms: f64,
    echo_p99_ms: f64,
    echo_max_ms: f64,
    typing_secs: f64,
    cpu_secs: f64,
    cpu_pct_of_core: f64,
    cpu_ms_per_1k_keys: f64,
    relay_cpu_secs: Option<f64>,
    generator_cpu_secs: f64,
}

/// What Shale runs beside the gateway for the stack's containers: the containerd shims of its
/// namespace (one per order's container) and the containers' agents (one per container that
/// has one: the processes' parent, out of the byte path but counted all the same).
fn shims(namespace: &str) -> Vec<ProcStat> {
    let mut procs = procfs::with_cmdline("containerd-shim", &["-namespace", namespace]);
    let socket = format!(
        "{}/{}",
        shale_agent::CONTAINER_LINK_DIR,
        shale_agent::LINK_SOCKET
    );
    procs.extend(procfs::with_cmdline("agent", &[&socket]));
    procs
}

/// The server's memory in use: for the in-process gateway, after handing the allocator's free
/// lists back, so that pages freed by an earlier run (or by set-up) count on neither side.
fn server_memory(server: &Server) -> u64 {
    if matches!(server.procs, ServerProcs::InProcess) {
        procfs::release_free_heap();
    }
    pss_of(&server.procs.processes())
}

fn cpu(procs: &[ProcStat]) -> CpuSnapshot {
    procfs::cpu_snapshot(procs)
}

async fn next_event(
    lines: &mut Lines<BufReader<ChildStdout>>,
    wait: Duration,
) -> anyhow::Result<Event> {
    let line = tokio::time::timeout(wait, lines.next_line())
        .await
        .context("the load generator went quiet")??
        .context("the load generator exited")?;
    serde_json::from_str(&line).with_context(|| format!("from the load generator: {line}"))
}

fn spawn_driver(spec: &DriveSpec) -> anyhow::Result<Child> {
    Ok(tokio::process::Command::new(std::env::current_exe()?)
        .arg("--drive")
        .arg(serde_json::to_string(spec)?)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?)
}

/// Opens `n` sessions on `server`, lets them type for `opts.secs`, and measures.
async fn measure(
    server: &Server,
    users: &[String],
    n: usize,
    opts: &Options,
) -> anyhow::Result<Row> {
    // Tokio's idle blocking threads (set-up ran some) exit after 10 s; their stacks must not
    // sit in the gateway's baseline.
    let settle = match server.procs {
        ServerProcs::InProcess => 11,
        ServerProcs::SshdTree { .. } => 1,
    };
    tokio::time::sleep(Duration::from_secs(settle)).await;
    let mem_base = server_memory(server);
    let relay_base = server.relay.as_deref().map(|ns| pss_of(&shims(ns)));
    let session_procs_base = pss_of(&server.procs.session_processes());

    let spec = DriveSpec {
        host: server.host.clone(),
        port: server.port,
        users: users.to_vec(),
        key: server.key.clone(),
        host_key: server.host_key.clone(),
        sessions: n,
        ramp: opts.ramp,
        secs: opts.secs,
        think_ms: (100, 500),
    };
    let mut child = spawn_driver(&spec)?;
    let generator = child.id().context("the load generator has no pid")?;
    let mut stdin = child.stdin.take().context("piped stdin")?;
    let mut lines = BufReader::new(child.stdout.take().context("piped stdout")?).lines();

    let ramp_wait = Duration::from_secs(120 + n as u64);
    let Event::Established {
        sessions,
        failed,
        first_error,
        ramp_secs,
    } = next_event(&mut lines, ramp_wait).await?
    else {
        bail!("the load generator skipped establishing");
    };
    // Let connection set-up settle (lease bookkeeping, first meter ticks) before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mem_open = server_memory(server);

    let cpu_before = cpu(&server.procs.processes());
    let relay_before = server.relay.as_deref().map(|ns| cpu(&shims(ns)));
    let generator_before = cpu(&procfs::stat(generator).into_iter().collect::<Vec<_>>());
    let started = Instant::now();
    stdin.write_all(b"go\n").await?;
    let steady = next_event(
        &mut lines,
        Duration::from_secs_f64(opts.secs) + Duration::from_secs(60),
    )
    .await?;
    let typing_secs = started.elapsed().as_secs_f64();
    let cpu_secs = procfs::cpu_secs_between(&cpu_before, &cpu(&server.procs.processes()));
    let relay_cpu_secs = server
        .relay
        .as_deref()
        .zip(relay_before)
        .map(|(ns, before)| procfs::cpu_secs_between(&before, &cpu(&shims(ns))));
    let generator_cpu_secs = procfs::cpu_secs_between(
        &generator_before,
        &cpu(&procfs::stat(generator).into_iter().collect::<Vec<_>>()),
    );
    let mem_typed = server_memory(server);
    let relay_typed = server.relay.as_deref().map(|ns| pss_of(&shims(ns)));
    let session_procs_typed = pss_of(&server.procs.session_processes());

    stdin.write_all(b"close\n").await?;
    drop(stdin);
    let _ = tokio::time::timeout(Duration::from_secs(60), child.wait()).await;

    let Event::Steady {
        keystrokes,
        lost,
        died,
        first_death,
        p50_us,
        p99_us,
        max_us,
    } = steady
    else {
        bail!("the load generator skipped typing");
    };
    let per_session =
        |after: u64, before: u64| (after as f64 - before as f64) / sessions.max(1) as f64;
    Ok(Row {
        n,
        server: server.name,
        sessions,
        failed,
        first_error,
        ramp_secs,
        orders: users.len(),
        mem_base_kib: mem_base,
        mem_open_kib: mem_open,
        mem_typed_kib: mem_typed,
        mem_per_session_kib: per_session(mem_typed, mem_base),
        relay_mem_per_session_kib: relay_typed.zip(relay_base).map(|(a, b)| per_session(a, b)),
        session_procs_mem_per_session_kib: matches!(server.procs, ServerProcs::SshdTree { .. })
            .then(|| per_session(session_procs_typed, session_procs_base)),
        keystrokes,
        lost,
        died,
        first_death,
        echo_p50_ms: p50_us as f64 / 1e3,
        echo_p99_ms: p99_us as f64 / 1e3,
        echo_max_ms: max_us as f64 / 1e3,
        typing_secs,
        cpu_secs,
        cpu_pct_of_core: 100.0 * cpu_secs / typing_secs,
        cpu_ms_per_1k_keys: 1e6 * cpu_secs / keystrokes.max(1) as f64,
        relay_cpu_secs,
        generator_cpu_secs,
    })
}

/// Accepted orders for `key`, each with its container started, grown to `count`.
async fn grow_orders(
    stack: &Stack,
    key: &ClientKey,
    orders: &mut Vec<u64>,
    count: usize,
) -> anyhow::Result<()> {
    let first_new = orders.len();
    while orders.len() < count {
        orders.push(stack.order(key, OrderOptions::default()).await?);
    }
    // A first login starts each container, so that no run pays for a cold start.
    let targets: Vec<Target> = orders[first_new..]
        .iter()
        .map(|id| stack.target(id.to_string(), key))
        .collect();
    tokio::task::block_in_place(|| {
        for batch in targets.chunks(8) {
            let children = batch
                .iter()
                .map(|t| t.ssh().arg("true").stdout(Stdio::null()).spawn())
                .collect::<Result<Vec<_>, _>>()?;
            for mut c in children {
                anyhow::ensure!(c.wait()?.success(), "the first login to an order failed");
            }
        }
        Ok(())
    })
}

/// The namespace `Stack` gives the stack's containers (derived from its scratch directory).
fn print_row(r: &Row) {
    let relay_mem = r
        .relay_mem_per_session_kib
        .map_or(String::from("-"), |m| format!("{m:.0}"));
    let relay_cpu = r.relay_cpu_secs.map_or(String::from("-"), |c| {
        format!("{:.1}", 100.0 * c / r.typing_secs)
    });
    println!(
        "{:>5} {:<8} {:>9} {:>11.0} {:>8} {:>8.2} {:>8.2} {:>7} {:>6.1} {:>9.1} {:>9}",
        r.n,
        r.server,
        format!("{}/{}", r.sessions, r.n),
        r.mem_per_session_kib,
        relay_mem,
        r.echo_p50_ms,
        r.echo_p99_ms,
        r.keystrokes,
        r.cpu_pct_of_core,
        r.cpu_ms_per_1k_keys,
        relay_cpu,
    );
    if let Some(e) = &r.first_error {
        println!("      {} failures, first: {e}", r.failed);
    }
    if let Some(e) = &r.first_death {
        println!("      {} sessions died while typing, first: {e}", r.died);
    }
}

async fn run(opts: Options) -> anyhow::Result<()> {
    let open_files = procfs::raise_open_files()?;
    let stack = Stack::start().await?;
    let key = stack.key("load", "ed25519")?;
    let sshd = ReferenceSshd::start(stack.dir.path(), &key.public)?;
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let reference_key = std::fs::read_to_string(&sshd.known_hosts)?
        .split_once(' ')
        .map(|(_, k)| k.trim().to_string())
        .context("reading the reference's known_hosts")?;
    let gateway = Server {
        name: "gateway",
        procs: ServerProcs::InProcess,
        host: stack.gateway.ip().to_string(),
        port: stack.gateway.port(),
        key: key.path.clone(),
        host_key: stack.host_key.clone(),
        relay: Some(stack.provisioner.config().namespace.clone()),
    };
    let reference = Server {
        name: "sshd",
        procs: ServerProcs::SshdTree { root: sshd.pid() },
        host: "127.0.0.1".into(),
        port: sshd.port,
        key: key.path.clone(),
        host_key: reference_key,
        relay: None,
    };
    let per_order = shale_gateway::config::SessionConfig::default().max_per_order;

    let machine = shale_bench::machine::Machine::this();
    println!("machine: {machine}; open files {open_files}");
    println!(
        "{}s of typing per run, a key every 100-500 ms after its echo; gateway: {per_order} sessions per order",
        opts.secs
    );
    println!(
        "{:>5} {:<8} {:>9} {:>11} {:>8} {:>8} {:>8} {:>7} {:>6} {:>9} {:>9}",
        "N",
        "server",
        "open",
        "KiB/session",
        "shim KiB",
        "p50 ms",
        "p99 ms",
        "keys",
        "CPU %",
        "ms/1k key",
        "shim CPU%"
    );
    let mut orders = Vec::new();
    let mut rows = Vec::new();
    let mut ratios = Vec::new();
    for &n in &opts.sessions {
        grow_orders(&stack, &key, &mut orders, n.div_ceil(per_order)).await?;
        let users: Vec<String> = orders[..n.div_ceil(per_order)]
            .iter()
            .map(u64::to_string)
            .collect();
        let g = measure(&gateway, &users, n, &opts).await?;
        print_row(&g);
        let r = measure(&reference, std::slice::from_ref(&user), n, &opts).await?;
        print_row(&r);
        let ratio = serde_json::json!({
            "n": n,
            "mem_per_session": g.mem_per_session_kib / r.mem_per_session_kib,
            "echo_p50": g.echo_p50_ms / r.echo_p50_ms,
            "echo_p99": g.echo_p99_ms / r.echo_p99_ms,
            "cpu_per_key": g.cpu_ms_per_1k_keys / r.cpu_ms_per_1k_keys,
            "cpu_per_key_with_shims": (g.cpu_secs + g.relay_cpu_secs.unwrap_or(0.0))
                / g.keystrokes.max(1) as f64
                / (r.cpu_secs / r.keystrokes.max(1) as f64),
        });
        println!(
            "      ratio gateway/sshd at N={n}: memory/session {:.2}, p50 {:.2}, p99 {:.2}, CPU/key {:.2} ({:.2} with shims)",
            ratio["mem_per_session"].as_f64().unwrap_or(f64::NAN),
            ratio["echo_p50"].as_f64().unwrap_or(f64::NAN),
            ratio["echo_p99"].as_f64().unwrap_or(f64::NAN),
            ratio["cpu_per_key"].as_f64().unwrap_or(f64::NAN),
            ratio["cpu_per_key_with_shims"].as_f64().unwrap_or(f64::NAN),
        );
        rows.push(g);
        rows.push(r);
        ratios.push(ratio);
    }
    if let Some(path) = &opts.json {
        let json = serde_json::json!({
            "machine": machine,
            "secs": opts.secs,
            "ramp": opts.ramp,
            "think_ms": [100, 500],
            "sessions_per_order": per_order,
            "echo_command": driver::ECHO_COMMAND,
            "counted": {
                "gateway_memory": "anonymous PSS (Pss_Anon + Pss_Shmem) of the bench process (the gateway runs in-process), with the sessions open after typing, minus before; containers and their shims apart",
                "sshd_memory": "anonymous PSS of the listening sshd and every sshd process below it, minus before; the sessions' cat processes apart",
                "cpu": "user+system time of the same processes over the typing phase",
                "relay": "containerd shims of the stack's namespace and the containers' agents (gateway only)",
            },
            "rows": rows,
            "ratios_gateway_over_sshd": ratios,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    drop(sshd);
    stack.stop().await
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.get(1).map(String::as_str) == Some("--drive") {
        let spec: DriveSpec = serde_json::from_str(args.get(2).context("--drive needs a spec")?)?;
        return runtime.block_on(driver::drive(spec));
    }
    runtime.block_on(run(Options::parse()?))
}
