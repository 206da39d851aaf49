//! The order's network at the provisioner: a link made before the first process runs, egress
//! to a simulated internet (a namespace on TEST-NET-3), the host refused, the rules and link
//! restored after they are deleted by hand, and nothing of either left after release.

mod common;

use std::process::Command;

use common::*;
use shale_provisioner::ExitStatus;

/// A namespace standing in for the internet: `203.0.113.<base+2>` behind a veth whose host
/// end is `203.0.113.<base+1>/30`, serving files over HTTP. Removed on drop.
struct Upstream {
    ns: String,
    host_if: String,
    addr: String,
    host_addr: String,
    server: std::process::Child,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Upstream {
    fn start(base: u8) -> Upstream {
        let tag = format!("{}{}", std::process::id() % 10000, base);
        let ns = format!("shpu{tag}");
        let host_if = format!("shpuh{tag}");
        let host_addr = format!("203.0.113.{}", base + 1);
        let addr = format!("203.0.113.{}", base + 2);
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        ip(&["netns", "add", &ns]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "up0", "netns", &ns,
        ]);
        ip(&["addr", "add", &format!("{host_addr}/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/30"),
            "dev",
            "up0",
        ]);
        ip(&["-n", &ns, "link", "set", "up0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&["-n", &ns, "route", "add", "default", "via", &host_addr]);
        let root = tempfile::tempdir().expect("dir").keep();
        std::fs::write(root.join("hello.txt"), "hello from the internet\n").unwrap();
        let server = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "python3",
                "-m",
                "http.server",
                "-b",
                &addr,
                "8000",
            ])
            .current_dir(&root)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("http server");
        // Ready when the host can fetch from it.
        for _ in 0..100 {
            let ok = Command::new("curl")
                .args([
                    "-sf",
                    "--max-time",
                    "1",
                    &format!("http://{addr}:8000/hello.txt"),
                ])
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Upstream {
            ns,
            host_if,
            addr,
            host_addr,
            server,
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

fn host_links_with(prefix: &str) -> Vec<String> {
    let out = Command::new("ip").args(["-o", "link"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split(": ")
                .nth(1)
                .map(|n| n.split('@').next().unwrap().to_string())
        })
        .filter(|n| n.starts_with(prefix))
        .collect()
}

fn nft_has_table(name: &str) -> bool {
    Command::new("nft")
        .args(["list", "table", "inet", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

async fn curl(prov: &shale_provisioner::Provisioner, order: u64, url: &str) -> (String, i32) {
    let (out, err, st) = sh(
        prov,
        order,
        &format!("curl -sS --max-time 5 {url} 2>&1; echo \"rc=$?\""),
    )
    .await;
    assert_eq!(st, ExitStatus::Code(0), "{err}");
    let rc = out
        .rsplit("rc=")
        .next()
        .and_then(|r| r.trim().parse().ok())
        .unwrap_or(-1);
    (out, rc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_reaches_the_internet_not_the_host_and_its_network_is_restored_then_removed() {
    if !am_root_with_network() {
        return;
    }
    let up = Upstream::start(200);
    let dns: std::net::Ipv4Addr = up.addr.parse().unwrap();
    let h = Harness::start(TestImage::Default, |c| c.network.dns = vec![dns]).await;
    let table = h.prov.network_table();
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let host_port = listener.local_addr().unwrap().port();

    h.prov.ensure(&lease(71)).await.expect("ensure");
    let hello = format!("http://{}:8000/hello.txt", up.addr);
    let (out, rc) = curl(&h.prov, 71, &hello).await;
    assert_eq!(rc, 0, "egress to the simulated internet: {out}");
    assert!(out.contains("hello from the internet"));
    let (conf, _, _) = sh(&h.prov, 71, "cat /etc/resolv.conf").await;
    assert!(conf.contains(&format!("nameserver {dns}")), "{conf}");
    let (v6, _, _) = sh(
        &h.prov,
        71,
        "cat /proc/net/if_inet6 2>/dev/null | grep -v ' lo$' | wc -l",
    )
    .await;
    assert_eq!(v6.trim(), "0", "no IPv6 address outside loopback");

    // The host, on any of its addresses, is refused at once (curl's 7: could not connect).
    for host in [up.host_addr.as_str(), "10.255.255.254"] {
        let (out, rc) = curl(&h.prov, 71, &format!("http://{host}:{host_port}/")).await;
        assert!(rc == 7, "the host at {host} must be refused fast: {out}");
    }
    // This provisioner's links only: other tests' containers may still run with theirs.
    let instance = &table["shale_".len()..];
    let prefix = format!("sh{}-", &instance[..6]);
    let ours = host_links_with(&prefix);
    assert!(nft_has_table(&table), "the rules are in place");

    // Intact, a reconcile writes nothing (a rewrite would restart the rate limit's bucket).
    let fixed = h.prov.reconcile_network().await.expect("reconcile");
    assert_eq!(fixed, Default::default(), "an intact network is left alone");
    // One denied range deleted by hand is noticed and put back.
    assert!(Command::new("nft")
        .args([
            "delete",
            "element",
            "inet",
            &table,
            "denied",
            "{ 169.254.0.0/16 }"
        ])
        .status()
        .unwrap()
        .success());
    let fixed = h.prov.reconcile_network().await.expect("reconcile");
    assert!(fixed.rules_rewritten, "{fixed:?}");

    // Deleted by hand: the next reconcile writes the rules and the link again.
    assert!(Command::new("nft")
        .args(["delete", "table", "inet", &table])
        .status()
        .unwrap()
        .success());
    let fixed = h.prov.reconcile_network().await.expect("reconcile");
    assert!(fixed.rules_rewritten, "{fixed:?}");
    assert!(nft_has_table(&table));
    let (out, rc) = curl(
        &h.prov,
        71,
        &format!("http://{}:{host_port}/", up.host_addr),
    )
    .await;
    assert_eq!(rc, 7, "still refused after the repair: {out}");
    let host_if = ours
        .iter()
        .find(|l| {
            Command::new("ip")
                .args(["link", "show", l])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("the order's host link")
        .clone();
    ip(&["link", "del", &host_if]);
    let fixed = h.prov.reconcile_network().await.expect("reconcile");
    assert_eq!(fixed.restored, vec![71], "{fixed:?}");
    let (out, rc) = curl(&h.prov, 71, &hello).await;
    assert_eq!(rc, 0, "egress is back: {out}");
    let traffic = h.prov.traffic(71).await.unwrap().expect("counters");
    assert!(
        traffic.egress_bytes > 0 && traffic.ingress_bytes > 0,
        "{traffic:?}"
    );

    // After a restart of the gateway's provisioner: adopted, same link, nothing rebuilt.
    let again = h.reconnect().await;
    again.adopt(|_| true).await.expect("adopt");
    let (_, rc) = curl(&again, 71, &hello).await;
    assert_eq!(rc, 0);

    again.release(71).await.expect("release");
    assert!(
        !nft_has_table(&table),
        "no rules left after the last release"
    );
    assert!(
        host_links_with(&host_if).is_empty(),
        "no link left after release"
    );
    drop(listener);
}

fn am_root_with_network() -> bool {
    let root = nix::unistd::geteuid().is_root();
    let nft = Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if root && nft {
        return true;
    }
    eprintln!("SKIPPED: needs root and nftables");
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI must run the network tests: root and nftables are required"
    );
    false
}
