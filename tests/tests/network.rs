//! The order's network, end to end: a real order's container reaches a simulated internet
//! (network namespaces on TEST-NET-3, see `shale_tests::internet`) through the host, installs
//! a package from a PyPI index and runs a VS Code style server over stock OpenSSH multiplexing,
//! while the host, other orders, private ranges, cloud metadata, SMTP and multicast stay out of
//! reach; the links and rules survive a gateway restart, come back after being deleted by hand,
//! and leave nothing behind.
//!
//! No test sends anything outside 203.0.113.0/24 and the private test ranges it routes itself.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use serde_json::{json, Value};
use shale_provisioner::{NetRule, NetworkConfig};
use shale_tests::internet::{
    self, HostListener, HostSnapshot, Internet, BIG_FILE_BYTES, FILES_HOST, METADATA_PATH,
    MIRROR_PORT, PRIVATE_ADDRS, PYPI_HOST, UDP_SINK_PORT,
};
use shale_tests::ssh::{run, Target};
use shale_tests::{OrderOptions, SshOutput, Stack, StackOptions};

/// Whether this machine can run the network tests; prints why not and, under `CI=true`, fails.
fn can_run(needs_stack: bool) -> bool {
    let mut reason = internet::missing();
    if reason.is_none() && needs_stack {
        if shale_contracts::devnet::find_anvil().is_none() {
            reason = Some("anvil not found; run scripts/setup.sh".into());
        } else if std::env::var_os("SHALE_CONTAINERD_SOCKET").is_none()
            && Command::new("containerd")
                .arg("--version")
                .output()
                .map_or(true, |o| !o.status.success())
        {
            reason = Some("containerd not found; run scripts/setup.sh".into());
        }
    }
    let Some(reason) = reason else {
        return true;
    };
    eprintln!("SKIPPED: {reason}");
    // In CI a missing component is a failure, never a skipped pass.
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true: the reason above fails the test"
    );
    false
}

/// A stack whose orders resolve through the simulated internet's DNS, with `tweak` applied.
async fn stack(net: &Internet, tweak: impl FnOnce(&mut NetworkConfig)) -> anyhow::Result<Stack> {
    let mut network = NetworkConfig {
        dns: vec![net.upstream()],
        ..NetworkConfig::default()
    };
    tweak(&mut network);
    Stack::start_with(StackOptions {
        network: Some(network),
        ..StackOptions::default()
    })
    .await
}

/// Removes a stack's nftables table if a test ends early (an error or a panic drops the stack
/// without releasing its orders, and no provisioner of that instance comes back to clean up).
/// Declare it before the stack, so that it goes after it.
#[derive(Default)]
struct TableGuard(Option<String>);

impl TableGuard {
    fn watch(&mut self, stack: &Stack) {
        self.0 = Some(stack.provisioner.network_table());
    }
}

impl Drop for TableGuard {
    fn drop(&mut self) {
        if let Some(table) = &self.0 {
            let _ = internet::sh("nft", &["delete", "table", "inet", table]);
        }
    }
}

/// An accepted order and how to reach it.
struct Order {
    id: u64,
    target: Target,
}

async fn order(stack: &Stack, name: &str) -> anyhow::Result<Order> {
    let key = stack.key(name, "ed25519")?;
    let id = stack.order(&key, OrderOptions::default()).await?;
    Ok(Order {
        id,
        target: stack.target(id.to_string(), &key),
    })
}

/// Runs `script` (by `/bin/sh -c`) in the order's container.
async fn exec(target: &Target, script: &str) -> anyhow::Result<SshOutput> {
    let mut cmd = target.ssh();
    cmd.arg(script);
    tokio::task::spawn_blocking(move || run(cmd)).await?
}

/// Like [`exec`], but the script must succeed.
async fn exec_ok(target: &Target, script: &str) -> anyhow::Result<String> {
    let out = exec(target, script).await?;
    ensure!(out.code == Some(0), "`{script:.200}` failed: {out:?}");
    Ok(out.stdout)
}

/// The order's end of its link, the host's end, and the host's interface for it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OrderNet {
    addr: Ipv4Addr,
    gateway: Ipv4Addr,
    host_link: String,
    host_ifindex: u64,
}

impl OrderNet {
    async fn of(target: &Target) -> anyhow::Result<Self> {
        let out = exec(
            target,
            "ip -4 -o addr show dev eth0; ip -4 route show default",
        )
        .await?;
        let addr = out
            .stdout
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next()?.parse().ok())
            .with_context(|| format!("the order has no eth0 address (loopback only?): {out:?}"))?;
        let gateway = out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("default via "))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("the order has no default route: {out:?}"))?;
        let host_link = internet::host_ipv4()?
            .into_iter()
            .find(|(_, ip)| *ip == gateway)
            .map(|(name, _)| name)
            .with_context(|| format!("no host interface holds the order's gateway {gateway}"))?;
        let link: Value = serde_json::from_str(&internet::sh(
            "ip",
            &["-j", "link", "show", "dev", &host_link],
        )?)?;
        let host_ifindex = link[0]["ifindex"].as_u64().context("no ifindex")?;
        Ok(Self {
            addr,
            gateway,
            host_link,
            host_ifindex,
        })
    }

    /// The provisioner's link-name prefix (`sh1a2b-`), shared by all its orders' links.
    fn link_prefix(&self) -> &str {
        self.host_link
            .split_once('-')
            .map_or(self.host_link.as_str(), |(p, _)| {
                &self.host_link[..p.len() + 1]
            })
    }
}

/// The provisioner's nftables table (`inet shale_<hex>`): the one that names the order's link or
/// address.
fn shale_table(on: &OrderNet) -> anyhow::Result<String> {
    let tables: Value = serde_json::from_str(&internet::sh("nft", &["-j", "list", "tables"])?)?;
    let mut bodies = Vec::new();
    for t in tables["nftables"].as_array().into_iter().flatten() {
        let (Some(name), Some("inet")) =
            (t["table"]["name"].as_str(), t["table"]["family"].as_str())
        else {
            continue;
        };
        if name.starts_with("shale_") {
            let body = internet::sh("nft", &["-j", "list", "table", "inet", name])?;
            bodies.push((name.to_string(), body));
        }
    }
    // The other tests of this binary run stacks of their own at the same time, whose orders may
    // have the same address: the link's name (its prefix is the provisioner's) decides first,
    // and an address counts only as a whole JSON string.
    let link = format!("\"{}\"", on.host_link);
    let addr = format!("\"{}\"", on.addr);
    [link, addr]
        .iter()
        .find_map(|needle| {
            bodies
                .iter()
                .find(|(_, body)| body.contains(needle.as_str()))
                .map(|(name, _)| name.clone())
        })
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no inet shale_* table mentions {} or {}",
                on.host_link,
                on.addr
            )
        })
}

/// Tries destinations from inside a container and reports, per name, how each attempt ended:
/// `connected`, `refused`, `unreachable`, `timeout`, `permission`, `sent` or `errno N`.
const PROBE_PY: &str = r#"
import errno, json, socket, sys, threading, time
KINDS = {errno.ECONNREFUSED: "refused", errno.EHOSTUNREACH: "unreachable",
         errno.ENETUNREACH: "unreachable", errno.EACCES: "permission", errno.EPERM: "permission"}
def tcp(c):
    s = socket.socket()
    if c.get("spoof"):
        s.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND
        s.bind((c["spoof"], 0))
    s.settimeout(c.get("timeout", 5))
    s.connect((c["addr"], c["port"]))
    s.sendall(("GET %s HTTP/1.0\r\nHost: x\r\n\r\n" % c.get("path", "/from-order")).encode())
    s.recv(64)
    return "connected"
def multicast(c):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 8)
    for _ in range(20):
        s.sendto(b"shale multicast probe", (c["addr"], c["port"]))
    return "sent"
def raw(c):
    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    return "opened"
results = {}
def attempt(c):
    t0 = time.monotonic()
    try:
        r = {"tcp": tcp, "multicast": multicast, "raw": raw}[c["kind"]](c)
    except (socket.timeout, TimeoutError):
        r = "timeout"
    except PermissionError:
        r = "permission"
    except OSError as e:
        r = KINDS.get(e.errno, "errno %s" % e.errno)
    results[c["name"]] = {"result": r, "secs": round(time.monotonic() - t0, 2)}
threads = [threading.Thread(target=attempt, args=(c,)) for c in json.loads(sys.argv[1])]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(results))
"#;

/// One destination for [`probe`].
fn tcp(name: &str, addr: Ipv4Addr, port: u16) -> Value {
    json!({"name": name, "kind": "tcp", "addr": addr.to_string(), "port": port})
}

/// Runs the probes in the order's container; name → (result, seconds).
async fn probe(target: &Target, checks: &[Value]) -> anyhow::Result<Vec<(String, String, f64)>> {
    let spec = serde_json::to_string(checks)?;
    ensure!(!spec.contains('\''));
    let out = exec_ok(
        target,
        &format!("python3 - '{spec}' <<'EOF'\n{PROBE_PY}\nEOF\n"),
    )
    .await?;
    let results: Value = serde_json::from_str(out.trim()).with_context(|| out.clone())?;
    let mut list: Vec<_> = results
        .as_object()
        .context("probe output")?
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v["result"].as_str().unwrap_or_default().to_string(),
                v["secs"].as_f64().unwrap_or_default(),
            )
        })
        .collect();
    list.sort_by(|x, y| x.0.cmp(&y.0));
    for (name, result, secs) in &list {
        eprintln!("  probe {name:<28} {result:<12} {secs:>5.2}s");
    }
    Ok(list)
}

/// Every probe of `denied` was refused or unreachable: rejected by a rule, not left to time out.
fn assert_rejected(results: &[(String, String, f64)], denied: &[&str]) {
    for name in denied {
        let (_, result, _) = results
            .iter()
            .find(|(n, _, _)| n == name)
            .unwrap_or_else(|| panic!("no probe {name}"));
        assert!(
            result == "refused" || result == "unreachable",
            "{name}: {result} (expected refused or unreachable): {results:?}"
        );
    }
}

fn result_of<'a>(results: &'a [(String, String, f64)], name: &str) -> &'a str {
    results
        .iter()
        .find(|(n, _, _)| n == name)
        .map_or("missing", |(_, r, _)| r.as_str())
}

/// The private servers never answered a request that came from an order.
fn assert_private_untouched(net: &Internet) -> anyhow::Result<()> {
    let leaked: Vec<_> = net
        .private_requests()?
        .into_iter()
        .filter(|r| r["path"].as_str().is_some_and(|p| p.starts_with("/from-")))
        .collect();
    ensure!(
        leaked.is_empty(),
        "private servers answered orders: {leaked:?}"
    );
    Ok(())
}

/// Host IPv4 addresses that are the host's own uplink (not a test's or an order's link).
fn host_uplink_addrs() -> anyhow::Result<Vec<Ipv4Addr>> {
    Ok(internet::host_ipv4()?
        .into_iter()
        .filter(|(name, ip)| {
            !ip.is_loopback() && !name.starts_with("sh") && !name.starts_with("tn")
        })
        .map(|(_, ip)| ip)
        .collect())
}

/// A child ssh that the test ends (by its pid) when it is dropped.
struct Spawned(Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free local TCP port (bound and released: another process could take it, none does here).
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until something accepts on `127.0.0.1:port`.
async fn wait_listening(port: u16) -> anyhow::Result<()> {
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("nothing listens on 127.0.0.1:{port}")
}

/// Runs a host command to completion (curl, ssh -O ...), with its output.
async fn host(mut cmd: Command) -> anyhow::Result<SshOutput> {
    cmd.stdin(Stdio::null());
    tokio::task::spawn_blocking(move || run(cmd)).await?
}

/// The simulated internet answers from the host (each server, DNS, the private addresses and
/// the fake metadata), two instances run side by side, and dropping them leaves no link,
/// address, route or namespace of theirs behind.
#[test]
fn the_simulated_internet_builds_checks_itself_and_leaves_nothing() -> anyhow::Result<()> {
    if !can_run(false) {
        return Ok(());
    }
    let before = HostSnapshot::take()?;
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(Internet::start);
        let b = s.spawn(Internet::start);
        (a.join().unwrap(), b.join().unwrap())
    });
    let (a, b) = (a?, b?);
    assert_ne!(a.upstream(), b.upstream());
    let hello = internet::http_get(SocketAddr::from((b.upstream(), 80)), "/files/hello.txt")?;
    assert_eq!(hello, "hello from the simulated internet\n");
    let stats = a.stats()?;
    assert!(
        stats["dns"].as_array().is_some_and(|d| !d.is_empty()),
        "{stats}"
    );
    let during = HostSnapshot::take()?;
    let (mut names, mut namespaces) = (Vec::new(), Vec::new());
    for net in [&a, &b] {
        let (netns, link) = net.names();
        assert!(
            during.entries.iter().any(|e| e.contains(&link)),
            "no link {link}"
        );
        names.extend([
            link,
            format!("{}/", net.upstream()),
            format!("\"{}\"", net.upstream()),
        ]);
        namespaces.push(netns);
    }
    drop((a, b));
    // The private namespace may still serve a concurrently running test; upstreams may not.
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let left = before
        .only(&names)
        .diff(&HostSnapshot::take()?.only(&names));
    assert!(left.is_empty(), "left behind: {left:#?}");
    let netns = internet::sh("ip", &["netns", "list"])?;
    for ns in namespaces {
        assert!(!netns.contains(&ns), "{ns} is still there: {netns}");
    }
    Ok(())
}

/// An order installs a package with pip from a PyPI simple index on the simulated internet and
/// imports it, and downloads files with curl and wget by name (through the SP's configured
/// resolver) and by address.
#[tokio::test(flavor = "multi_thread")]
async fn pip_install_and_curl_reach_the_simulated_internet() -> anyhow::Result<()> {
    if !can_run(true) {
        return Ok(());
    }
    let net = Internet::start()?;
    let mut tables = TableGuard::default();
    let stack = stack(&net, |_| {}).await?;
    tables.watch(&stack);
    let a = order(&stack, "pip").await?;
    let up = net.upstream();
    let steps = [
        "cat /etc/resolv.conf".to_string(),
        format!(
            "pip install --break-system-packages --no-cache-dir --index-url http://{PYPI_HOST}/simple \
             --trusted-host {PYPI_HOST} shaleprobe"
        ),
        "python3 -c 'import shaleprobe; print(shaleprobe.MESSAGE)'".into(),
        format!("curl -sS --max-time 20 http://{FILES_HOST}/files/hello.txt"),
        format!("wget -q -O - http://{FILES_HOST}/files/hello.txt"),
        format!(
            "curl -sS --max-time 30 -o /dev/null -w 'got %{{size_download}} bytes, HTTP %{{http_code}}\\n' \
             http://{up}/files/big.bin"
        ),
    ];
    let script: String = steps
        .iter()
        .map(|s| {
            format!(
                "echo '$ {}'; {s} 2>&1 || echo \"(exit $?)\"\n",
                s.replace('\'', "'\\''")
            )
        })
        .collect();
    let out = exec_ok(&a.target, &script).await?;
    println!(
        "--- transcript: pip and curl inside order {} ---\n{out}---",
        a.id
    );
    assert!(out.contains(&format!("nameserver {up}")), "{out}");
    assert!(
        out.contains("Successfully installed shaleprobe-0.1.0"),
        "{out}"
    );
    assert!(
        out.contains("shaleprobe from the simulated internet"),
        "{out}"
    );
    assert_eq!(
        out.matches("hello from the simulated internet").count(),
        2,
        "{out}"
    );
    assert!(
        out.contains(&format!("got {BIG_FILE_BYTES} bytes, HTTP 200")),
        "{out}"
    );
    assert!(!out.contains("(exit "), "{out}");
    // The order really asked the test's DNS and index, not anything else.
    let stats = net.stats()?;
    let asked: Vec<&str> = stats["dns"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|q| q["name"].as_str())
        .collect();
    assert!(
        asked.contains(&PYPI_HOST) && asked.contains(&FILES_HOST),
        "{asked:?}"
    );
    let paths: Vec<&str> = stats["requests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["path"].as_str())
        .collect();
    assert!(paths.contains(&"/simple/shaleprobe/"), "{paths:?}");
    assert!(
        paths.contains(&"/files/shaleprobe-0.1.0-py3-none-any.whl"),
        "{paths:?}"
    );
    stack.stop().await
}

/// What VS Code Remote-SSH does, with stock OpenSSH: one ControlMaster connection runs an
/// install script through `ssh -T host bash` (checks the architecture, downloads and unpacks a
/// server tarball from the internet, starts the server on a random loopback port and prints
/// it); then multiplexed `ssh -D` (SOCKS) and `ssh -L` sessions reach that server. Forwards to
/// the host's or private addresses are refused.
#[tokio::test(flavor = "multi_thread")]
async fn vscode_style_flow_over_controlmaster() -> anyhow::Result<()> {
    if !can_run(true) {
        return Ok(());
    }
    let net = Internet::start()?;
    let mut tables = TableGuard::default();
    let stack = stack(&net, |_| {}).await?;
    tables.watch(&stack);
    let a = order(&stack, "vscode").await?;
    let t = &a.target;
    let control = stack.dir.path().join("cm-%C");
    let mux = |extra: &[&str]| {
        let mut cmd = Command::new("ssh");
        cmd.args(t.options())
            .args(["-o", "ControlMaster=auto", "-o"])
            .arg(format!("ControlPath={}", control.display()))
            .args([
                "-o",
                "ControlPersist=60",
                "-p",
                &t.port.to_string(),
                "-l",
                &t.user,
            ])
            .args(extra.iter().take_while(|a| **a != "--"))
            .arg(&t.host)
            .args(extra.iter().skip_while(|a| **a != "--").skip(1));
        cmd
    };
    // Ends the master however the test ends.
    struct Master(Command);
    impl Drop for Master {
        fn drop(&mut self) {
            let _ = self.0.stdout(Stdio::null()).stderr(Stdio::null()).status();
        }
    }
    let _master = Master(mux(&["-O", "exit"]));
    let mut transcript = String::new();

    let install = format!(
        r#"set -e
echo "arch=$(uname -m)"
mkdir -p ~/.vscode-server && cd ~/.vscode-server
curl -fsS --max-time 20 -o vscode-server.tar.gz http://{FILES_HOST}/files/vscode-server.tar.gz \
  || wget -q -O vscode-server.tar.gz http://{FILES_HOST}/files/vscode-server.tar.gz
tar xzf vscode-server.tar.gz
cat vscode-server/product.json
setsid nohup ./vscode-server/bin/code-server > server.log 2>&1 < /dev/null &
for i in $(seq 100); do grep -q listeningOn= server.log && break; sleep 0.1; done
port=$(sed -n 's/^listeningOn=//p' server.log)
echo "listeningOn==$port=="
"#
    );
    let mut cmd = mux(&["-T", "--", "bash"]);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(install.as_bytes())?;
    }
    let out: SshOutput = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await??
        .into();
    transcript += &format!(
        "$ ssh -T -o ControlMaster=auto ... {} bash <<install script\n{}{}",
        a.id, out.stdout, out.stderr
    );
    ensure!(out.code == Some(0), "the install script failed: {out:?}");
    assert!(out.stdout.contains("arch=x86_64") || out.stdout.contains("arch=aarch64"));
    let port: u16 = out
        .stdout
        .split("listeningOn==")
        .nth(1)
        .and_then(|r| r.split("==").next()?.parse().ok())
        .with_context(|| format!("no port printed: {out:?}"))?;

    let check = host(mux(&["-O", "check"])).await?;
    transcript += &format!("$ ssh -O check\n{}", check.stderr);
    assert!(check.stderr.contains("Master running"), "{check:?}");

    // VS Code's dynamic forward, then its local forward, both through the master.
    let socks = free_port()?;
    let d = format!("127.0.0.1:{socks}");
    let _socks = Spawned(mux(&["-N", "-D", &d]).stdin(Stdio::null()).spawn()?);
    wait_listening(socks).await?;
    let mut curl = Command::new("curl");
    curl.args(["-sS", "--max-time", "10", "--socks5-hostname", &d])
        .arg(format!("http://127.0.0.1:{port}/"));
    let got = host(curl).await?;
    transcript += &format!(
        "$ curl --socks5-hostname {d} http://127.0.0.1:{port}/\n{}{}",
        got.stdout, got.stderr
    );
    assert_eq!(got.stdout, "shale vscode-server ok\n", "{got:?}");

    let local = free_port()?;
    let l = format!("127.0.0.1:{local}:127.0.0.1:{port}");
    let _local = Spawned(mux(&["-N", "-L", &l]).stdin(Stdio::null()).spawn()?);
    wait_listening(local).await?;
    let mut curl = Command::new("curl");
    curl.args(["-sS", "--max-time", "10"])
        .arg(format!("http://127.0.0.1:{local}/"));
    let got = host(curl).await?;
    transcript += &format!(
        "$ ssh -L {l} -N ... & curl http://127.0.0.1:{local}/\n{}{}",
        got.stdout, got.stderr
    );
    assert_eq!(got.stdout, "shale vscode-server ok\n", "{got:?}");

    // A second session on the same connection sees the server running.
    let again = host(mux(&[
        "--",
        "pgrep -af code-server; echo sessions-share-the-master",
    ]))
    .await?;
    transcript += &format!("$ ssh ... 'pgrep -af code-server'\n{}", again.stdout);
    assert!(
        again.stdout.contains("sessions-share-the-master"),
        "{again:?}"
    );

    // Forwards to anything but the container's own loopback reach nothing on the host side.
    let on = OrderNet::of(t).await?;
    eprintln!("order {} link: {on:?}", a.id);
    let listener = HostListener::start()?;
    let forbidden = [
        (on.gateway, listener.port),
        (net.host_upstream(), listener.port),
        (PRIVATE_ADDRS[0], 80),
        (PRIVATE_ADDRS[4], 80),
    ];
    for (addr, dport) in forbidden {
        let p = free_port()?;
        let spec = format!("127.0.0.1:{p}:{addr}:{dport}");
        let _fwd = Spawned(mux(&["-N", "-L", &spec]).stdin(Stdio::null()).spawn()?);
        wait_listening(p).await?;
        let mut curl = Command::new("curl");
        curl.args(["-sS", "--max-time", "5"])
            .arg(format!("http://127.0.0.1:{p}/from-forward"));
        let got = host(curl).await?;
        transcript += &format!(
            "$ ssh -L {spec} -N ... & curl http://127.0.0.1:{p}/\n{}{}",
            got.stdout, got.stderr
        );
        assert_ne!(
            got.code,
            Some(0),
            "a forward to {addr}:{dport} answered: {got:?}"
        );
        let mut curl = Command::new("curl");
        curl.args(["-sS", "--max-time", "5", "--socks5-hostname", &d])
            .arg(format!("http://{addr}:{dport}/from-forward"));
        let got = host(curl).await?;
        transcript += &format!(
            "$ curl --socks5-hostname {d} http://{addr}:{dport}/\n{}{}",
            got.stdout, got.stderr
        );
        assert_ne!(
            got.code,
            Some(0),
            "SOCKS to {addr}:{dport} answered: {got:?}"
        );
    }
    assert!(listener.accepted().is_empty(), "{:?}", listener.accepted());
    assert_private_untouched(&net)?;
    println!(
        "--- transcript: VS Code style flow, order {} ---\n{transcript}---",
        a.id
    );
    drop(_master);
    stack.stop().await
}

/// From inside an order, everything but the internet fails at once, refused or unreachable
/// (never a silent timeout): every host address, even on a port the host listens on for all
/// addresses; another order's container; the LAN, CGNAT and link-local ranges with the cloud
/// metadata service; SMTP; multicast (nothing arrives). Raw sockets are refused, and a spoofed
/// source address gets nowhere.
#[tokio::test(flavor = "multi_thread")]
async fn denied_destinations_fail_fast() -> anyhow::Result<()> {
    if !can_run(true) {
        return Ok(());
    }
    let net = Internet::start()?;
    let mut tables = TableGuard::default();
    let stack = stack(&net, |_| {}).await?;
    tables.watch(&stack);
    let a = order(&stack, "alice").await?;
    let b = order(&stack, "bob").await?;
    let on = OrderNet::of(&a.target).await?;
    let bn = OrderNet::of(&b.target).await?;
    assert_ne!(on.addr, bn.addr);

    // Order B serves HTTP on all its addresses; it answers on its own address.
    let mut serve = b.target.ssh();
    serve.arg("exec python3 -m http.server --bind 0.0.0.0 8000 >/dev/null 2>&1");
    let _server = Spawned(serve.spawn()?);
    let mut up = false;
    for _ in 0..50 {
        let out = exec(
            &b.target,
            &format!(
                "curl -s -o /dev/null -w '%{{http_code}}' http://{}:8000/",
                bn.addr
            ),
        )
        .await?;
        if out.stdout == "200" {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(up, "order B's server does not answer on its own address");

    let listener = HostListener::start()?;
    let mcast_group = Ipv4Addr::new(239, 255, 77, 1);
    let mcast = UdpSocket::bind("0.0.0.0:0")?;
    mcast.join_multicast_v4(&mcast_group, &on.gateway)?;
    mcast.set_nonblocking(true)?;
    let mcast_port = mcast.local_addr()?.port();

    let mut checks = vec![
        tcp("internet", net.upstream(), 80),
        tcp("host-link", on.gateway, listener.port),
        tcp("host-upstream-side", net.host_upstream(), listener.port),
        tcp("host-private-side", net.host_private(), listener.port),
        tcp("other-order", bn.addr, 8000),
        tcp("other-order-host-end", bn.gateway, listener.port),
        tcp("smtp", net.upstream(), 25),
        json!({"name": "metadata", "kind": "tcp", "addr": PRIVATE_ADDRS[4].to_string(),
               "port": 80, "path": format!("/from-order{METADATA_PATH}")}),
        json!({"name": "multicast", "kind": "multicast", "addr": mcast_group.to_string(),
               "port": mcast_port}),
        json!({"name": "raw-socket", "kind": "raw"}),
        json!({"name": "spoofed-source", "kind": "tcp", "addr": net.upstream().to_string(),
               "port": 80, "spoof": "198.51.100.77", "timeout": 3}),
    ];
    for (i, ip) in host_uplink_addrs()?.into_iter().enumerate() {
        checks.push(tcp(&format!("host-uplink-{i}"), ip, listener.port));
    }
    for ip in PRIVATE_ADDRS {
        checks.push(tcp(&format!("private-{ip}"), ip, 80));
    }
    let results = probe(&a.target, &checks).await?;

    assert_eq!(result_of(&results, "internet"), "connected", "{results:?}");
    let mut denied: Vec<String> = results
        .iter()
        .map(|(n, _, _)| n.clone())
        .filter(|n| n.starts_with("host-") || n.starts_with("private-") || n.starts_with("other-"))
        .collect();
    denied.extend(["smtp".into(), "metadata".into()]);
    assert_rejected(
        &results,
        &denied.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert_eq!(
        result_of(&results, "raw-socket"),
        "permission",
        "{results:?}"
    );
    assert_ne!(
        result_of(&results, "spoofed-source"),
        "connected",
        "{results:?}"
    );

    std::thread::sleep(Duration::from_millis(500));
    let mut buf = [0u8; 64];
    assert!(
        mcast.recv_from(&mut buf).is_err(),
        "the host received the order's multicast"
    );
    assert!(listener.accepted().is_empty(), "{:?}", listener.accepted());
    assert_eq!(
        net.spoofed_packets()?,
        0,
        "a spoofed packet got through the host"
    );
    assert_eq!(
        net.foreign_packets()?,
        0,
        "an order's packet was not masqueraded"
    );
    assert_private_untouched(&net)?;
    let smtp_seen = net.stats()?["requests"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|r| r["port"] == 25 && r["path"] == "/from-order");
    assert!(!smtp_seen, "upstream port 25 answered an order");
    stack.stop().await
}

/// An SP's allow rule opens exactly one port of one LAN address (a package mirror) and nothing
/// around it; an SP's deny rule closes one internet port while the rest of that host (DNS) works.
#[tokio::test(flavor = "multi_thread")]
async fn an_sp_allow_rule_opens_a_lan_mirror() -> anyhow::Result<()> {
    if !can_run(true) {
        return Ok(());
    }
    let net = Internet::start()?;
    let mirror = PRIVATE_ADDRS[2];
    let upstream = net.upstream();
    let mut tables = TableGuard::default();
    let stack = stack(&net, |n| {
        n.allow = vec![NetRule {
            cidr: format!("{mirror}/32").parse().unwrap(),
            ports: vec![MIRROR_PORT],
        }];
        n.deny = vec![NetRule {
            cidr: format!("{upstream}/32").parse().unwrap(),
            ports: vec![80],
        }];
    })
    .await?;
    tables.watch(&stack);
    let a = order(&stack, "mirror").await?;
    let mut checks = vec![
        json!({"name": "mirror", "kind": "tcp", "addr": mirror.to_string(), "port": MIRROR_PORT,
               "path": "/simple/"}),
        tcp("mirror-port-80", mirror, 80),
        tcp("denied-internet-port", upstream, 80),
    ];
    for ip in PRIVATE_ADDRS.into_iter().filter(|ip| *ip != mirror) {
        checks.push(tcp(&format!("other-{ip}"), ip, MIRROR_PORT));
    }
    let results = probe(&a.target, &checks).await?;
    assert_eq!(result_of(&results, "mirror"), "connected", "{results:?}");
    let denied: Vec<&str> = results
        .iter()
        .map(|(n, _, _)| n.as_str())
        .filter(|n| *n != "mirror")
        .collect();
    assert_rejected(&results, &denied);
    let served: Vec<Value> = net
        .private_requests()?
        .into_iter()
        .filter(|r| r["path"] == "/simple/")
        .collect();
    assert_eq!(served.len(), 1, "{served:?}");
    assert_eq!(served[0]["server"], mirror.to_string());
    assert_eq!(served[0]["port"], MIRROR_PORT);
    // The deny names port 80 only: DNS on the same host still answers.
    let out = exec_ok(
        &a.target,
        &format!("python3 -c 'import socket; print(socket.gethostbyname(\"{FILES_HOST}\"))'"),
    )
    .await?;
    assert_eq!(out.trim(), upstream.to_string());
    stack.stop().await
}

/// Checks from inside `order` that the internet is reachable and the usual denied destinations
/// are rejected.
async fn egress_and_denies(
    order: &Order,
    net: &Internet,
    on: &OrderNet,
    listener: &HostListener,
) -> anyhow::Result<()> {
    let mut checks = vec![
        tcp("internet", net.upstream(), 80),
        tcp("host-link", on.gateway, listener.port),
        tcp("host-upstream-side", net.host_upstream(), listener.port),
        tcp("smtp", net.upstream(), 25),
    ];
    for ip in PRIVATE_ADDRS {
        checks.push(tcp(&format!("private-{ip}"), ip, 80));
    }
    let results = probe(&order.target, &checks).await?;
    ensure!(
        result_of(&results, "internet") == "connected",
        "no egress: {results:?}"
    );
    let denied: Vec<&str> = results
        .iter()
        .map(|(n, _, _)| n.as_str())
        .filter(|n| *n != "internet")
        .collect();
    assert_rejected(&results, &denied);
    Ok(())
}

/// A loop inside the container that keeps knocking on private addresses and the host while
/// the test breaks and restores the order's network; the private servers' request log (and the
/// host listener) shows whether anything ever got through.
const KNOCK_PY: &str = r#"
import os, socket, sys, time
targets = [(sys.argv[i], int(sys.argv[i + 1])) for i in range(1, len(sys.argv), 2)]
while not os.path.exists("/tmp/stop-knocking"):
    for addr in targets:
        s = socket.socket()
        s.settimeout(0.3)
        try:
            s.connect(addr)
            s.sendall(b"GET /from-order-knock HTTP/1.0\r\n\r\n")
            print("open", addr, flush=True)
        except OSError:
            pass
        finally:
            s.close()
    time.sleep(0.05)
"#;

/// The order's network outlives a gateway restart (the new gateway adopts the same link and
/// address); a link and table deleted by hand come back at the next reconcile with every deny
/// in place (a loop inside the container never gets through meanwhile); and releasing the order
/// leaves no link, address, route or nftables rule of the provisioner behind.
#[tokio::test(flavor = "multi_thread")]
async fn the_network_survives_a_gateway_restart_and_leaves_nothing_after_release(
) -> anyhow::Result<()> {
    if !can_run(true) {
        return Ok(());
    }
    let net = Internet::start()?;
    let mut tables = TableGuard::default();
    let mut stack = stack(&net, |_| {}).await?;
    tables.watch(&stack);
    let before = HostSnapshot::take()?;
    let a = order(&stack, "steady").await?;
    let hello = format!("curl -fsS --max-time 10 http://{FILES_HOST}/files/hello.txt");
    assert_eq!(
        exec_ok(&a.target, &hello).await?,
        "hello from the simulated internet\n"
    );
    let on = OrderNet::of(&a.target).await?;
    let table = shale_table(&on)?;
    assert_eq!(table, stack.provisioner.network_table());
    let listener = HostListener::start()?;
    egress_and_denies(&a, &net, &on, &listener).await?;

    stack.restart_gateway().await?;
    assert_eq!(
        exec_ok(&a.target, &hello).await?,
        "hello from the simulated internet\n"
    );
    let adopted = OrderNet::of(&a.target).await?;
    assert_eq!(adopted, on, "the restarted gateway's order link differs");

    // Knock from inside while the link and the rules go away and come back.
    let mut targets = vec![
        (on.gateway.to_string(), listener.port),
        (net.host_upstream().to_string(), listener.port),
    ];
    targets.extend(PRIVATE_ADDRS.iter().map(|ip| (ip.to_string(), 80)));
    let args: Vec<String> = targets
        .iter()
        .flat_map(|(a, p)| [a.clone(), p.to_string()])
        .collect();
    let mut knock = a.target.ssh();
    knock
        .arg(format!(
            "rm -f /tmp/stop-knocking; python3 - {} <<'EOF'\n{KNOCK_PY}\nEOF\n",
            args.join(" ")
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let knocker = knock.spawn()?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    internet::sh(
        "sh",
        &[
            "-c",
            &format!(
                "ip link del {} && nft delete table inet {table}",
                on.host_link
            ),
        ],
    )?;
    let reconciled = stack.provisioner.reconcile_network().await?;
    eprintln!(
        "reconcile after deleting link {} and table {table}: {reconciled:?}",
        on.host_link
    );
    let mut back = false;
    for _ in 0..30 {
        if exec(&a.target, &hello).await?.code == Some(0) {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        back,
        "egress did not come back after the reconcile: {reconciled:?}"
    );
    let restored = OrderNet::of(&a.target).await?;
    assert_eq!(
        (restored.addr, restored.gateway),
        (on.addr, on.gateway),
        "the order's address changed"
    );
    ensure!(
        shale_table(&restored)? == table,
        "the table came back under another name"
    );
    egress_and_denies(&a, &net, &restored, &listener).await?;

    exec_ok(&a.target, "touch /tmp/stop-knocking").await?;
    let knocked: SshOutput = tokio::task::spawn_blocking(move || knocker.wait_with_output())
        .await??
        .into();
    assert!(
        !knocked.stdout.contains("open"),
        "a denied destination was open meanwhile: {knocked:?}"
    );
    assert!(listener.accepted().is_empty(), "{:?}", listener.accepted());
    assert_private_untouched(&net)?;

    stack.provisioner.release(a.id).await?;
    let after = HostSnapshot::take()?;
    let ours = [on.link_prefix(), table.as_str()];
    let left = before.only(&ours).diff(&after.only(&ours));
    assert!(left.is_empty(), "left behind after release: {left:#?}");
    assert!(
        !internet::host_ipv4()?
            .iter()
            .any(|(_, ip)| *ip == on.gateway),
        "the order's host address is still on the host"
    );
    stack.stop().await
}

/// An order flooding UDP at the internet gets at most its egress limit through (plus one
/// second's burst), counted where it arrives; meanwhile another order downloads from the same
/// server and the gateway keeps serving its sessions.
#[tokio::test(flavor = "multi_thread")]
async fn a_flooding_order_slows_only_itself() -> anyhow::Result<()> {
    if !can_run(true) {
        return Ok(());
    }
    const RATE: u64 = 1_000_000;
    let net = Internet::start()?;
    let mut tables = TableGuard::default();
    let stack = stack(&net, |n| n.egress_bytes_per_sec = Some(RATE)).await?;
    tables.watch(&stack);
    let a = order(&stack, "flood").await?;
    let b = order(&stack, "calm").await?;
    let up = net.upstream();
    let before = net.stats()?["udp"]["bytes"].as_u64().unwrap_or(0);
    ensure!(before == 0, "the sink already counted {before} bytes");

    let flood = format!(
        r#"python3 - <<'EOF'
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
payload = b"x" * 1200
sent = 0
t0 = time.time()
for _ in range(20000):
    try:
        sent += s.sendto(payload, ("{up}", {UDP_SINK_PORT}))
    except OSError:
        pass
print(sent, t0, time.time())
EOF
"#
    );
    let ta = a.target.clone();
    let flooding = tokio::spawn(async move { exec_ok(&ta, &flood).await });
    let tb = b.target.clone();
    let download = tokio::spawn(async move {
        exec_ok(
            &tb,
            &format!(
                "curl -sS --max-time 60 -o /dev/null -w '%{{size_download}} %{{http_code}}' \
                 http://{FILES_HOST}/files/big.bin"
            ),
        )
        .await
    });
    let alive = exec_ok(&b.target, "echo alive").await?;
    assert_eq!(alive, "alive\n");
    let out = flooding.await??;
    let mut fields = out.split_whitespace();
    let sent: u64 = fields.next().context("sent")?.parse()?;
    let started: f64 = fields.next().context("start")?.parse()?;
    assert_eq!(
        download.await??,
        format!("{BIG_FILE_BYTES} 200"),
        "order B's download"
    );

    // Wait until nothing more arrives (a shaper may still drain its queue).
    let mut last = (0u64, Instant::now());
    loop {
        let got = net.stats()?["udp"]["bytes"].as_u64().unwrap_or(0);
        if got != last.0 {
            last = (got, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(2) {
            break;
        }
        if last.1.elapsed() > Duration::from_secs(20) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let stats = net.stats()?["udp"].clone();
    let received = stats["bytes"].as_u64().unwrap_or(0);
    let last_at = stats["last"].as_f64().unwrap_or(started);
    // A token bucket lets through at most rate × span + burst (one second's worth); the span
    // from the first packet sent to the last one received over-estimates it. Wire bytes carry
    // 28 bytes of headers per 1200 of payload; allow 10% for the limiter's granularity.
    let span = (last_at - started).max(0.0);
    let bound = ((RATE as f64) * (span + 1.0) * 1.1) as u64 + 10 * 1228;
    eprintln!(
        "flood: sent {sent} bytes, upstream received {received} in {span:.2}s (bound {bound})"
    );
    assert!(received > 0, "nothing of the flood arrived: {stats}");
    assert!(
        received <= bound,
        "upstream received {received} bytes over {span:.2}s at a limit of {RATE}/s: {stats}"
    );
    assert!(
        received < sent / 2,
        "the limit did not bite: sent {sent}, received {received}"
    );
    stack.stop().await
}

/// A download shows as the order's ingress in the provisioner's traffic counts and in the
/// gateway's per-order network metrics, and both directions grow.
#[tokio::test(flavor = "multi_thread")]
async fn traffic_shows_per_order_in_the_provisioner_and_the_metrics() -> anyhow::Result<()> {
    if !can_run(true) {
        return Ok(());
    }
    let net = Internet::start()?;
    let mut tables = TableGuard::default();
    let stack = stack(&net, |_| {}).await?;
    tables.watch(&stack);
    let a = order(&stack, "counted").await?;
    exec_ok(&a.target, "true").await?;
    let t0 = stack
        .provisioner
        .traffic(a.id)
        .await?
        .context("the running order has no traffic counts")?;
    let m0 = order_metrics(&stack.scrape().await?, a.id);
    exec_ok(
        &a.target,
        &format!("curl -fsS --max-time 30 -o /dev/null http://{FILES_HOST}/files/big.bin"),
    )
    .await?;
    let t1 = stack.provisioner.traffic(a.id).await?.context("traffic")?;
    eprintln!("traffic before {t0:?}, after {t1:?}");
    assert!(
        t1.ingress_bytes >= t0.ingress_bytes + BIG_FILE_BYTES,
        "{t0:?} → {t1:?}"
    );
    assert!(t1.egress_bytes > t0.egress_bytes, "{t0:?} → {t1:?}");

    let mut m1 = m0;
    for _ in 0..40 {
        m1 = order_metrics(&stack.scrape().await?, a.id);
        if m1.1.unwrap_or(0) >= m0.1.unwrap_or(0) + BIG_FILE_BYTES {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("metrics (egress, ingress) before {m0:?}, after {m1:?}");
    let (Some(egress), Some(ingress)) = m1 else {
        bail!(
            "the gateway's /metrics has no shale_order_network_egress_bytes / \
             shale_order_network_ingress_bytes for order {}",
            a.id
        );
    };
    assert!(
        ingress >= m0.1.unwrap_or(0) + BIG_FILE_BYTES,
        "{m0:?} → {m1:?}"
    );
    assert!(egress > m0.0.unwrap_or(0), "{m0:?} → {m1:?}");
    stack.stop().await
}

/// The order's (egress, ingress) byte counters on a `/metrics` page, where present.
fn order_metrics(page: &str, order: u64) -> (Option<u64>, Option<u64>) {
    let read = |name: &str| {
        page.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?;
            let rest = rest.strip_prefix("_total").unwrap_or(rest);
            if !rest.starts_with('{') || !rest.contains(&format!("order=\"{order}\"")) {
                return None;
            }
            rest.rsplit(' ')
                .next()?
                .parse::<f64>()
                .ok()
                .map(|v| v as u64)
        })
    };
    (
        read("shale_order_network_egress_bytes"),
        read("shale_order_network_ingress_bytes"),
    )
}
