//! A simulated internet for the network tests: network namespaces on TEST-NET-3 that an order's
//! container reaches through the host, as it would reach the real internet, and a "private"
//! namespace holding the LAN, CGNAT and cloud-metadata addresses an order must never reach.
//!
//! Each [`Internet`] has its own /28 of 203.0.113.0/24: `.1` on the host, `.2` in its upstream
//! namespace (an HTTP server with a PyPI simple index, a VS Code server tarball and a large file,
//! the same server on TCP port 25, a DNS responder and a UDP sink); `.9` on the host and `.10` in
//! the private namespace. The private namespace holds fixed addresses (10.77.0.1, 172.16.77.1,
//! 192.168.77.1, 100.64.77.1, 169.254.169.254), so one of it serves every [`Internet`] of the
//! process; the host routes each of them to it. Both namespaces drop anything they would send
//! outside 203.0.113.0/24: no test traffic leaves the machine.
//!
//! Everything is removed on drop, panics included; what a killed test process left behind is
//! removed by the next one.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Once, Weak};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use serde_json::Value;
use tempfile::TempDir;

/// The name the DNS responder resolves to the upstream server, for plain downloads.
pub const FILES_HOST: &str = "files.shale.test";
/// The name of the package index, resolved the same way.
pub const PYPI_HOST: &str = "pypi.shale.test";
/// Size of `/files/big.bin` on the upstream server.
pub const BIG_FILE_BYTES: u64 = 4 << 20;
/// The upstream UDP port that counts what it receives.
pub const UDP_SINK_PORT: u16 = 9999;
/// The port every private address serves besides 80 (a "LAN mirror" an SP may allow).
pub const MIRROR_PORT: u16 = 3141;
/// The addresses of the private namespace, each serving HTTP on 80 and [`MIRROR_PORT`].
pub const PRIVATE_ADDRS: [Ipv4Addr; 5] = [
    Ipv4Addr::new(10, 77, 0, 1),
    Ipv4Addr::new(172, 16, 77, 1),
    Ipv4Addr::new(192, 168, 77, 1),
    Ipv4Addr::new(100, 64, 77, 1),
    Ipv4Addr::new(169, 254, 169, 254),
];
/// Where the fake cloud metadata service answers with credentials.
pub const METADATA_PATH: &str = "/latest/meta-data/iam/security-credentials/";

/// Why the simulated internet cannot be built here (not root, a tool missing), if it cannot.
pub fn missing() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("the simulated internet needs root (network namespaces)".into());
    }
    for (tool, package) in [
        ("ip", "iproute2"),
        ("nft", "nftables"),
        ("python3", "python3"),
    ] {
        let found = Command::new(tool)
            .arg(if tool == "python3" { "--version" } else { "-V" })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("`{tool}` not found; apt-get install {package}"));
        }
    }
    None
}

/// Runs `program args...`, failing with its stderr when it fails; returns stdout.
pub fn sh(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    ensure!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `nft -f -` with `rules` on stdin, in namespace `netns` (the host's when `None`).
fn nft(netns: Option<&str>, rules: &str) -> anyhow::Result<()> {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "nft", "-f", "-"]);
            c
        }
        None => {
            let mut c = Command::new("nft");
            c.args(["-f", "-"]);
            c
        }
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft")?;
    child.stdin.take().unwrap().write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The names this process gives its links and namespaces: `tn<pid>x<n>{u,p}` on the host (not
/// `sh...`, which is the provisioner's), `shale-test-net-<pid>-<n>-{up,pv}` for namespaces.
fn link_name(instance: &str, side: char) -> String {
    format!("tn{}x{instance}{side}", std::process::id())
}

fn netns_name(instance: &str, side: &str) -> String {
    format!("shale-test-net-{}-{instance}-{side}", std::process::id())
}

/// Removes the links and namespaces of test processes that are gone (killed before their drop
/// ran), with the servers still running inside them. Once per process.
fn remove_leftovers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // This process has made nothing yet: a name with its pid is a dead process's whose pid
        // it was given again.
        let own = std::process::id().to_string();
        let alive = |pid: &str| pid != own && Path::new(&format!("/proc/{pid}")).exists();
        if let Ok(list) = sh("ip", &["netns", "list"]) {
            for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
                let Some(pid) = ns
                    .strip_prefix("shale-test-net-")
                    .and_then(|r| r.split('-').next())
                else {
                    continue;
                };
                if alive(pid) {
                    continue;
                }
                // The servers a dead test process started there (and nothing else runs there).
                if let Ok(pids) = sh("ip", &["netns", "pids", ns]) {
                    for p in pids
                        .split_whitespace()
                        .filter_map(|p| p.parse::<i32>().ok())
                    {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(p),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
                eprintln!("internet: removing namespace {ns} of a dead test process");
                let _ = sh("ip", &["netns", "del", ns]);
            }
        }
        for link in host_links().unwrap_or_default() {
            let Some(rest) = link.strip_prefix("tn") else {
                continue;
            };
            let Some((pid, _)) = rest.split_once('x') else {
                continue;
            };
            if pid.chars().all(|c| c.is_ascii_digit()) && !alive(pid) {
                eprintln!("internet: removing link {link} of a dead test process");
                let _ = sh("ip", &["link", "del", &link]);
            }
        }
    });
}

fn host_links() -> anyhow::Result<Vec<String>> {
    let links: Vec<Value> = serde_json::from_str(&sh("ip", &["-j", "link"])?)?;
    Ok(links
        .iter()
        .filter_map(|l| l["ifname"].as_str().map(String::from))
        .collect())
}

/// Every IPv4 address on the host, with its interface.
pub fn host_ipv4() -> anyhow::Result<Vec<(String, Ipv4Addr)>> {
    let links: Vec<Value> = serde_json::from_str(&sh("ip", &["-j", "-4", "addr"])?)?;
    let mut out = Vec::new();
    for link in &links {
        let name = link["ifname"].as_str().unwrap_or_default();
        for a in link["addr_info"].as_array().into_iter().flatten() {
            if let Some(ip) = a["local"].as_str().and_then(|s| s.parse().ok()) {
                out.push((name.to_string(), ip));
            }
        }
    }
    Ok(out)
}

/// Picks a free /28 of 203.0.113.0/24: one no host address or route is in yet.
fn allocate_block() -> anyhow::Result<u8> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let routes = sh("ip", &["-4", "route", "show", "table", "all"])?;
    let used: BTreeSet<u8> = host_ipv4()?
        .into_iter()
        .map(|(_, ip)| ip)
        .chain(
            routes
                .split_whitespace()
                .filter_map(|w| w.split('/').next()?.parse::<Ipv4Addr>().ok()),
        )
        .filter(|ip| ip.octets()[..3] == [203, 0, 113])
        .map(|ip| ip.octets()[3] & 0xf0)
        .collect();
    for _ in 0..16 {
        let block = ((NEXT.fetch_add(1, Ordering::Relaxed) % 16) * 16) as u8;
        if !used.contains(&block) {
            return Ok(block);
        }
    }
    bail!("no free /28 left in 203.0.113.0/24 (in use: {used:?})")
}

/// One namespace joined to the host by a veth pair: `host/29` on the host, `inner/29` inside,
/// the inner side's default route via the host. Dropping it removes both.
struct Netns {
    name: String,
    host_link: String,
}

impl Netns {
    fn create(
        name: String,
        host_link: String,
        host: Ipv4Addr,
        inner: Ipv4Addr,
    ) -> anyhow::Result<Self> {
        sh("ip", &["netns", "add", &name])?;
        // From here on a failure removes what exists.
        let ns = Netns { name, host_link };
        let name = ns.name.as_str();
        let link = ns.host_link.as_str();
        let exec = |args: &[&str]| -> anyhow::Result<String> {
            let mut all = vec!["netns", "exec", name];
            all.extend_from_slice(args);
            sh("ip", &all)
        };
        exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
        exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"])?;
        sh(
            "ip",
            &[
                "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", name,
            ],
        )?;
        sh(
            "sysctl",
            &["-qw", &format!("net.ipv6.conf.{link}.disable_ipv6=1")],
        )?;
        sh("ip", &["addr", "add", &format!("{host}/29"), "dev", link])?;
        sh("ip", &["link", "set", link, "up"])?;
        exec(&["ip", "addr", "add", &format!("{inner}/29"), "dev", "eth0"])?;
        exec(&["ip", "link", "set", "eth0", "up"])?;
        exec(&["ip", "link", "set", "lo", "up"])?;
        exec(&["ip", "route", "add", "default", "via", &host.to_string()])?;
        // Whatever the test provokes, nothing from here leaves the simulated world: it answers
        // only TEST-NET-3, where the host's ends are (orders arrive masqueraded as the host).
        // `spoofed` counts what arrives from TEST-NET-2 (the tests' spoofed source), `foreign`
        // anything else from outside TEST-NET-3; both are dropped.
        nft(
            Some(name),
            "table inet guard {
                counter spoofed {}
                counter foreign {}
                chain input {
                    type filter hook input priority 0; policy accept;
                    iif lo accept
                    ip saddr 198.51.100.0/24 counter name spoofed drop
                    ip saddr != 203.0.113.0/24 counter name foreign drop
                }
                chain output {
                    type filter hook output priority 0; policy accept;
                    oif lo accept
                    meta nfproto ipv6 drop
                    ip daddr != 203.0.113.0/24 drop
                }
            }",
        )?;
        Ok(ns)
    }

    /// `ip netns exec NAME program args...` as a command to spawn.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Packets the guard's counter `name` (`spoofed` or `foreign`) has seen (and dropped).
    fn counted(&self, name: &str) -> anyhow::Result<u64> {
        let out = sh(
            "ip",
            &[
                "netns", "exec", &self.name, "nft", "-j", "list", "counter", "inet", "guard", name,
            ],
        )?;
        let v: Value = serde_json::from_str(&out)?;
        v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|o| o["counter"]["packets"].as_u64())
            .with_context(|| format!("no counter {name}"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh("ip", &["link", "del", &self.host_link]);
        let _ = sh("ip", &["netns", "del", &self.name]);
    }
}

/// A server process inside a namespace, killed (by its pid) on drop.
struct Server {
    child: Child,
}

impl Server {
    /// Starts `cmd` and waits for it to print `ready`.
    fn start(mut cmd: Command, what: &str) -> anyhow::Result<Self> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting the {what} servers"))?;
        let stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let server = Server { child };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.trim() == "ready" => Ok(server),
            got => {
                drop(server);
                let mut err = String::new();
                let _ = stderr.read_to_string(&mut err);
                bail!("the {what} servers did not start ({got:?}): {err}")
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The private namespace, one per process (its addresses are fixed), alive while any
/// [`Internet`] uses it.
struct Private {
    // Field order is drop order: the servers go before their namespace.
    _server: Server,
    netns: Netns,
    host: Ipv4Addr,
    _dir: TempDir,
}

impl Private {
    fn shared() -> anyhow::Result<Arc<Private>> {
        static SHARED: Mutex<Weak<Private>> = Mutex::new(Weak::new());
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = shared.upgrade() {
            return Ok(p);
        }
        let p = Arc::new(Private::create()?);
        *shared = Arc::downgrade(&p);
        Ok(p)
    }

    fn create() -> anyhow::Result<Self> {
        let routes = sh("ip", &["-4", "route", "show", "table", "all"])?;
        for a in PRIVATE_ADDRS {
            ensure!(
                !routes.lines().any(|l| l.starts_with(&format!("{a} "))),
                "the host already routes {a}: another test process holds the private namespace"
            );
        }
        let block = allocate_block()?;
        let host = Ipv4Addr::new(203, 0, 113, block + 1);
        let inner = Ipv4Addr::new(203, 0, 113, block + 2);
        let netns = Netns::create(netns_name("0", "pv"), link_name("pv", 'h'), host, inner)?;
        for a in PRIVATE_ADDRS {
            sh(
                "ip",
                &[
                    "netns",
                    "exec",
                    &netns.name,
                    "ip",
                    "addr",
                    "add",
                    &format!("{a}/32"),
                    "dev",
                    "eth0",
                ],
            )?;
            sh(
                "ip",
                &[
                    "route",
                    "add",
                    &format!("{a}/32"),
                    "via",
                    &inner.to_string(),
                    "dev",
                    &netns.host_link,
                ],
            )?;
        }
        let dir = tempfile::Builder::new().prefix("shale-net-pv-").tempdir()?;
        let script = dir.path().join("world.py");
        std::fs::write(&script, WORLD_PY)?;
        let mut cmd = netns.command("python3");
        cmd.arg("-u")
            .arg(&script)
            .arg("private")
            .arg(MIRROR_PORT.to_string());
        cmd.args(PRIVATE_ADDRS.iter().map(|a| a.to_string()));
        let server = Server::start(cmd, "private")?;
        Ok(Private {
            _server: server,
            netns,
            host,
            _dir: dir,
        })
    }
}

/// A simulated internet: an upstream namespace with its servers, and the shared private one.
/// Dropping it removes its namespace, links and routes.
pub struct Internet {
    // Field order is drop order.
    _server: Server,
    upstream_ns: Netns,
    private: Arc<Private>,
    host: Ipv4Addr,
    upstream: Ipv4Addr,
    dir: TempDir,
}

impl Internet {
    /// Builds it and checks from the host that every server answers, so that a test that finds
    /// a destination unreachable from an order proves a rule, not a missing route.
    pub fn start() -> anyhow::Result<Self> {
        remove_leftovers();
        static INSTANCE: AtomicU32 = AtomicU32::new(0);
        let instance = INSTANCE.fetch_add(1, Ordering::Relaxed).to_string();
        let private = Private::shared()?;
        let block = allocate_block()?;
        let host = Ipv4Addr::new(203, 0, 113, block + 1);
        let upstream = Ipv4Addr::new(203, 0, 113, block + 2);
        let upstream_ns = Netns::create(
            netns_name(&instance, "up"),
            link_name(&instance, 'u'),
            host,
            upstream,
        )?;
        let dir = tempfile::Builder::new().prefix("shale-net-up-").tempdir()?;
        let script = dir.path().join("world.py");
        std::fs::write(&script, WORLD_PY)?;
        let root = dir.path().join("www");
        let mut cmd = upstream_ns.command("python3");
        cmd.arg("-u")
            .arg(&script)
            .arg("upstream")
            .arg(upstream.to_string())
            .arg(&root)
            .arg(BIG_FILE_BYTES.to_string())
            .arg(format!("{FILES_HOST}={upstream}"))
            .arg(format!("{PYPI_HOST}={upstream}"));
        let server = Server::start(cmd, "upstream")?;
        let internet = Internet {
            _server: server,
            upstream_ns,
            private,
            host,
            upstream,
            dir,
        };
        internet.check_from_host()?;
        Ok(internet)
    }

    fn check_from_host(&self) -> anyhow::Result<()> {
        let hello = http_get(SocketAddr::from((self.upstream, 80)), "/files/hello.txt")?;
        ensure!(
            hello.contains("simulated internet"),
            "upstream answered {hello}"
        );
        http_get(SocketAddr::from((self.upstream, 25)), "/files/hello.txt")
            .context("upstream port 25")?;
        ensure!(
            dns_query(self.upstream, FILES_HOST)? == Some(self.upstream),
            "the DNS responder does not resolve {FILES_HOST}"
        );
        ensure!(dns_query(self.upstream, "nowhere.example")?.is_none());
        for a in PRIVATE_ADDRS {
            for port in [80, MIRROR_PORT] {
                let body = http_get(SocketAddr::from((a, port)), "/")
                    .with_context(|| format!("the host cannot reach {a}:{port}"))?;
                ensure!(body.starts_with("private"), "{a}:{port} answered {body}");
            }
        }
        let creds = http_get(SocketAddr::from((PRIVATE_ADDRS[4], 80)), METADATA_PATH)?;
        ensure!(creds.contains("AccessKeyId"), "metadata answered {creds}");
        Ok(())
    }

    /// The upstream server's address (HTTP on 80 and 25, DNS on 53, the UDP sink).
    pub fn upstream(&self) -> Ipv4Addr {
        self.upstream
    }

    /// The host's address on the upstream link (a host address an order must not reach).
    pub fn host_upstream(&self) -> Ipv4Addr {
        self.host
    }

    /// The host's address on the private link.
    pub fn host_private(&self) -> Ipv4Addr {
        self.private.host
    }

    /// `http://UPSTREAM/path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.upstream)
    }

    /// What the upstream servers have seen: `requests` (`path`, `client`, `port`), `dns`
    /// (`name`, `type`) and `udp` (`bytes`, `packets`, `first`, `last` as Unix seconds).
    pub fn stats(&self) -> anyhow::Result<Value> {
        Ok(serde_json::from_str(&http_get(
            SocketAddr::from((self.upstream, 80)),
            "/_stats",
        )?)?)
    }

    /// The requests the private servers have answered (`path`, `client`, `server`, `port`).
    pub fn private_requests(&self) -> anyhow::Result<Vec<Value>> {
        let stats: Value = serde_json::from_str(&http_get(
            SocketAddr::from((PRIVATE_ADDRS[0], 80)),
            "/_stats",
        )?)?;
        Ok(stats["requests"].as_array().cloned().unwrap_or_default())
    }

    /// Packets that reached the upstream and private namespaces from 198.51.100.0/24
    /// (TEST-NET-2, the source the tests spoof), all dropped there.
    pub fn spoofed_packets(&self) -> anyhow::Result<u64> {
        Ok(self.upstream_ns.counted("spoofed")? + self.private.netns.counted("spoofed")?)
    }

    /// Packets that reached the upstream and private namespaces from any other address outside
    /// 203.0.113.0/24 (an order not masqueraded, say), all dropped there.
    pub fn foreign_packets(&self) -> anyhow::Result<u64> {
        Ok(self.upstream_ns.counted("foreign")? + self.private.netns.counted("foreign")?)
    }

    /// The name of its upstream namespace and of the host end of its link.
    pub fn names(&self) -> (String, String) {
        (
            self.upstream_ns.name.clone(),
            self.upstream_ns.host_link.clone(),
        )
    }

    /// Scratch space of this instance.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// `GET path` over HTTP/1.0 from the host; the body, or an error for anything but a 200.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(tcp, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut reply = String::new();
    tcp.read_to_string(&mut reply)?;
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    ensure!(head.starts_with("HTTP/1.0 200"), "{addr}{path}: {head}");
    Ok(body.to_string())
}

/// An A query to `server`:53 from the host: the address, or `None` for NXDOMAIN.
pub fn dns_query(server: Ipv4Addr, name: &str) -> anyhow::Result<Option<Ipv4Addr>> {
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    sock.send_to(&q, (server, 53))?;
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).context("no DNS answer")?;
    let rcode = buf[3] & 0x0f;
    let answers = u16::from_be_bytes([buf[6], buf[7]]);
    match (rcode, answers) {
        (3, _) => Ok(None),
        (0, 1) if n >= 4 => Ok(Some(Ipv4Addr::new(
            buf[n - 4],
            buf[n - 3],
            buf[n - 2],
            buf[n - 1],
        ))),
        _ => bail!("DNS answered rcode {rcode} with {answers} answers"),
    }
}

/// A TCP listener on the host's 0.0.0.0 that records every connection it accepts: where a
/// test expects none, it proves nothing got through (rather than nothing tried).
pub struct HostListener {
    /// The port it listens on (on every host address).
    pub port: u16,
    accepted: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HostListener {
    /// Listens on `0.0.0.0:0`.
    pub fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("0.0.0.0:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (accepted, stop) = (accepted.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut s, peer)) => {
                            accepted.lock().unwrap().push(peer);
                            let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\nthe host\n");
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
        };
        Ok(Self {
            port,
            accepted,
            stop,
            thread: Some(thread),
        })
    }

    /// Every peer it accepted so far.
    pub fn accepted(&self) -> Vec<SocketAddr> {
        self.accepted.lock().unwrap().clone()
    }
}

impl Drop for HostListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What of the host's network state a test may leave behind: links, addresses, routes (every
/// table) and the nftables ruleset, normalized (no counters, handles or link statistics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSnapshot {
    /// One JSON line per link, address, route and nftables object.
    pub entries: BTreeSet<String>,
}

impl HostSnapshot {
    /// Reads the host's state now.
    pub fn take() -> anyhow::Result<Self> {
        let mut entries = BTreeSet::new();
        let links: Vec<Value> = serde_json::from_str(&sh("ip", &["-j", "link"])?)?;
        for l in &links {
            entries.insert(format!(
                "link {} {} {}",
                l["ifname"].as_str().unwrap_or_default(),
                l["link_type"].as_str().unwrap_or_default(),
                l["address"].as_str().unwrap_or_default()
            ));
        }
        for (ifname, ip) in host_ipv4()? {
            entries.insert(format!("addr {ifname} {ip}"));
        }
        let routes: Vec<Value> =
            serde_json::from_str(&sh("ip", &["-j", "-4", "route", "show", "table", "all"])?)?;
        for mut r in routes {
            if let Some(o) = r.as_object_mut() {
                o.remove("expires");
            }
            entries.insert(format!("route {r}"));
        }
        let ruleset: Value = serde_json::from_str(&sh("nft", &["-j", "list", "ruleset"])?)?;
        for mut obj in ruleset["nftables"].as_array().cloned().unwrap_or_default() {
            if obj.get("metainfo").is_some() {
                continue;
            }
            normalize_nft(&mut obj);
            entries.insert(format!("nft {obj}"));
        }
        Ok(Self { entries })
    }

    /// Only the entries that mention one of `names` (link names, a table name, addresses).
    pub fn only(&self, names: &[&str]) -> Self {
        Self {
            entries: self
                .entries
                .iter()
                .filter(|e| names.iter().any(|n| e.contains(n)))
                .cloned()
                .collect(),
        }
    }

    /// Entries in `later` and not here (`+`), and here and not in `later` (`-`).
    pub fn diff(&self, later: &HostSnapshot) -> Vec<String> {
        later
            .entries
            .difference(&self.entries)
            .map(|e| format!("+ {e}"))
            .chain(
                self.entries
                    .difference(&later.entries)
                    .map(|e| format!("- {e}")),
            )
            .collect()
    }
}

/// Drops what changes without anyone changing the rules: handles, counters, quota use.
fn normalize_nft(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.remove("handle");
            if let Some(Value::Object(c)) = map.get_mut("counter") {
                if c.contains_key("packets") {
                    c.insert("packets".into(), 0.into());
                    c.insert("bytes".into(), 0.into());
                }
            }
            if let Some(Value::Object(q)) = map.get_mut("quota") {
                q.remove("used");
            }
            for child in map.values_mut() {
                normalize_nft(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(normalize_nft),
        _ => {}
    }
}

/// The servers of the simulated world (see the docstring); written into each namespace's
/// scratch folder and run with `python3`.
const WORLD_PY: &str = r##""""The servers of Shale's simulated internet, run inside a test network namespace.

  world.py upstream ADDR ROOT BIG_BYTES NAME=ADDR...   HTTP on 80 and 25, DNS on 53/udp, a UDP sink
  world.py private MIRROR_PORT ADDR...                 HTTP on 80 and MIRROR_PORT of every ADDR

Every HTTP server answers GET /_stats with what the namespace has seen so far (JSON). Prints
"ready" once every socket is bound.
"""
import base64
import functools
import hashlib
import io
import json
import os
import socket
import socketserver
import struct
import sys
import tarfile
import threading
import time
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

UDP_SINK_PORT = 9999
LOCK = threading.Lock()
STATE = {
    "requests": [],
    "dns": [],
    "udp": {"bytes": 0, "packets": 0, "first": None, "last": None},
}
METADATA = {
    "Code": "Success",
    "Type": "AWS-HMAC",
    "AccessKeyId": "ASIASHALETESTKEY",
    "SecretAccessKey": "not-a-real-secret",
    "Token": "shale-test-token",
}


class Handler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *args):
        pass

    def send_body(self, body, kind="text/plain"):
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        server, port = self.server.server_address[:2]
        if self.path == "/_stats":
            with LOCK:
                body = json.dumps(STATE).encode()
            return self.send_body(body, "application/json")
        with LOCK:
            STATE["requests"].append(
                {"path": self.path, "client": self.client_address[0], "server": server, "port": port}
            )
        if MODE == "private":
            if self.path.startswith("/latest/meta-data/iam/security-credentials/"):
                return self.send_body(json.dumps(METADATA).encode(), "application/json")
            return self.send_body(f"private {server}:{port}\n".encode())
        return super().do_GET()


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self):
        # HTTPServer's own looks its address up in DNS (getfqdn): nothing here may ask the
        # host's resolver.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


def serve_http(addr, port, root=None):
    handler = functools.partial(Handler, directory=root) if root else Handler
    srv = Server((addr, port), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()


def serve_dns(addr, names):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((addr, 53))

    def loop():
        while True:
            query, peer = sock.recvfrom(4096)
            try:
                tid, flags = struct.unpack("!HH", query[:4])
                i, labels = 12, []
                while query[i]:
                    n = query[i]
                    labels.append(query[i + 1 : i + 1 + n].decode().lower())
                    i += 1 + n
                qtype = struct.unpack("!H", query[i + 1 : i + 3])[0]
                question = query[12 : i + 5]
            except (IndexError, struct.error, UnicodeDecodeError):
                continue
            name = ".".join(labels)
            with LOCK:
                STATE["dns"].append({"name": name, "type": qtype, "client": peer[0]})
            answer, count, rcode = b"", 0, 0
            if name not in names:
                rcode = 3
            elif qtype == 1:
                answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(names[name])
                count = 1
            header = struct.pack("!6H", tid, 0x8480 | (flags & 0x0100) | rcode, 1, count, 0, 0)
            sock.sendto(header + question + answer, peer)

    threading.Thread(target=loop, daemon=True).start()


def serve_udp_sink(addr):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    sock.bind((addr, UDP_SINK_PORT))

    def loop():
        buf = bytearray(65536)
        udp = STATE["udp"]
        while True:
            n = sock.recv_into(buf)
            now = time.time()
            with LOCK:
                udp["bytes"] += n
                udp["packets"] += 1
                if udp["first"] is None:
                    udp["first"] = now
                udp["last"] = now

    threading.Thread(target=loop, daemon=True).start()


def wheel():
    """A pure-Python wheel of `shaleprobe` 0.1.0, with the dist-info pip checks."""
    files = {
        "shaleprobe/__init__.py": b'MESSAGE = "shaleprobe from the simulated internet"\n',
        "shaleprobe-0.1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: shaleprobe\n"
        b"Version: 0.1.0\nSummary: A probe package for Shale's network tests\n",
        "shaleprobe-0.1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: shale-tests\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n",
        "shaleprobe-0.1.0.dist-info/top_level.txt": b"shaleprobe\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append("shaleprobe-0.1.0.dist-info/RECORD,,")
    files["shaleprobe-0.1.0.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for path, data in files.items():
            z.writestr(path, data)
    return out.getvalue()


CODE_SERVER = b'''#!/usr/bin/env python3
"""A stand-in for the VS Code server: serves on a random loopback port and says which."""
import http.server

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"shale vscode-server ok\\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print("listeningOn=%d" % srv.server_address[1], flush=True)
srv.serve_forever()
'''


def vscode_tarball():
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data, mode in [
            ("vscode-server/bin/code-server", CODE_SERVER, 0o755),
            ("vscode-server/product.json", b'{"commit": "shale-test"}\n', 0o644),
        ]:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def write(root, path, data):
    full = os.path.join(root, path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "wb") as f:
        f.write(data)


def upstream(addr, root, big, names):
    whl = wheel()
    name = "shaleprobe-0.1.0-py3-none-any.whl"
    write(root, "files/" + name, whl)
    write(root, "simple/index.html", b'<html><body><a href="shaleprobe/">shaleprobe</a></body></html>\n')
    sha = hashlib.sha256(whl).hexdigest()
    write(
        root,
        "simple/shaleprobe/index.html",
        f'<html><body><a href="/files/{name}#sha256={sha}">{name}</a></body></html>\n'.encode(),
    )
    write(root, "files/vscode-server.tar.gz", vscode_tarball())
    write(root, "files/hello.txt", b"hello from the simulated internet\n")
    write(root, "files/big.bin", os.urandom(big))
    for port in (80, 25):
        serve_http(addr, port, root)
    serve_dns(addr, names)
    serve_udp_sink(addr)


MODE = sys.argv[1]
if MODE == "upstream":
    names = dict(arg.split("=", 1) for arg in sys.argv[5:])
    upstream(sys.argv[2], sys.argv[3], int(sys.argv[4]), names)
elif MODE == "private":
    mirror = int(sys.argv[2])
    for a in sys.argv[3:]:
        for port in (80, mirror):
            serve_http(a, port)
else:
    sys.exit(f"unknown mode {MODE}")
print("ready", flush=True)
while True:
    time.sleep(3600)
"##;
