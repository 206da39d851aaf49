//! Hardening: no privileges inside, refused syscalls, masked paths, and one order's fork bomb
//! or memory hog neither takes down the host nor another order.

mod common;

use std::time::Duration;

use common::*;
use shale_provisioner::{ExitStatus, Lease};

fn status_field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key).map(str::trim))
        .unwrap_or_else(|| panic!("{key} missing from /proc/self/status"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_run_without_privileges() {
    let h = Harness::busybox().await;
    h.prov.ensure(&lease(31)).await.expect("ensure");
    let (status, _, _) = run(&h.prov, 31, &["cat", "/proc/self/status"]).await;
    assert_eq!(status_field(&status, "CapEff:"), "0000000000000000");
    assert_eq!(status_field(&status, "CapPrm:"), "0000000000000000");
    assert_eq!(status_field(&status, "NoNewPrivs:"), "1");
    assert_eq!(
        status_field(&status, "Seccomp:"),
        "2",
        "a seccomp filter is installed"
    );
    let bounding = u64::from_str_radix(status_field(&status, "CapBnd:"), 16).unwrap();
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    const CAP_NET_ADMIN: u64 = 1 << 12;
    const CAP_SYS_PTRACE: u64 = 1 << 19;
    assert_eq!(
        bounding & (CAP_SYS_ADMIN | CAP_NET_ADMIN | CAP_SYS_PTRACE),
        0,
        "bounding set {bounding:x}"
    );
    h.prov.release(31).await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escapes_are_refused() {
    let h = Harness::busybox().await;
    h.prov.ensure(&lease(32)).await.expect("ensure");
    for line in [
        "unshare -U -r true",                            // user namespaces (seccomp)
        "unshare -n true",                               // network namespaces
        "mkdir -p /tmp/m && mount -t tmpfs none /tmp/m", // mounts
        "echo 1 > /proc/sys/vm/drop_caches",             // read-only /proc/sys
        "echo b > /proc/sysrq-trigger",
        "ls /run/containerd", // the runtime's socket is not there
        "touch /bin/x",       // read-only root filesystem
        "nsenter -t 1 -n true",
    ] {
        let (_, _, st) = sh(&h.prov, 32, line).await;
        assert_ne!(st, ExitStatus::Code(0), "{line:?} succeeded");
    }
    // Masked paths read as empty (where the host kernel has them at all).
    for path in ["/proc/keys", "/proc/timer_list", "/proc/kcore"] {
        if std::path::Path::new(path).exists() {
            let (out, err, _) = sh(&h.prov, 32, &format!("wc -c < {path}")).await;
            assert_eq!(out.trim(), "0", "{path}: {err}");
        }
    }
    let (out, _, _) = sh(
        &h.prov,
        32,
        "ls -A /sys/firmware /proc/acpi 2>/dev/null | grep -v : | grep -c .",
    )
    .await;
    assert_eq!(out.trim(), "0");
    // Only the default device nodes.
    let (out, _, _) = sh(&h.prov, 32, "ls /dev").await;
    for d in out.split_whitespace() {
        assert!(
            [
                "console", "core", "fd", "full", "mqueue", "null", "ptmx", "pts", "random", "shm",
                "stderr", "stdin", "stdout", "tty", "urandom", "zero"
            ]
            .contains(&d),
            "unexpected device {d}"
        );
    }
    let (out, _, _) = run(&h.prov, 32, &["hostname"]).await;
    assert_eq!(out, "order-32\n");
    h.prov.release(32).await.expect("release");
}

/// The order's cgroup directory for a controller, on the host (v1 layout, or the v2 unified one).
fn host_cgroup(lease: &Lease, controller: &str) -> std::path::PathBuf {
    let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", lease.pid)).unwrap();
    let mut unified = None;
    for l in cgroups.lines() {
        let mut parts = l.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if ctrls.split(',').any(|c| c == controller) {
            return std::path::Path::new("/sys/fs/cgroup")
                .join(controller)
                .join(path.trim_start_matches('/'));
        }
        if ctrls.is_empty() {
            unified =
                Some(std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/')));
        }
    }
    unified.expect("the order's cgroup is listed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_is_contained_by_the_pids_limit() {
    let h = Harness::busybox().await;
    let mut bomb_spec = lease(33);
    bomb_spec.pids_limit = Some(64);
    let bomber = h.prov.ensure(&bomb_spec).await.expect("ensure");
    h.prov.ensure(&lease(34)).await.expect("ensure neighbour");

    let bomb = h
        .prov
        .exec(33, cmd(&["sh", "-c", "f() { f | f & }; f; sleep 300"]))
        .await
        .expect("exec bomb");
    tokio::time::sleep(Duration::from_secs(3)).await;

    let pids = host_cgroup(&bomber, "pids");
    let current: u64 = std::fs::read_to_string(pids.join("pids.current"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(current <= 64, "{current} pids in the order's cgroup");
    let events = std::fs::read_to_string(pids.join("pids.events")).unwrap_or_default();
    if let Some(n) = events.split_whitespace().nth(1) {
        assert!(n.parse::<u64>().unwrap() > 0, "the limit was hit: {events}");
    }
    // The neighbour and the host still start processes.
    let (out, _, _) = run(&h.prov, 34, &["echo", "fine"]).await;
    assert_eq!(out, "fine\n");
    assert!(std::process::Command::new("true")
        .status()
        .unwrap()
        .success());

    tokio::time::timeout(Duration::from_secs(60), h.prov.release(33))
        .await
        .expect("release is bounded")
        .unwrap();
    // Its exit depends on where the bomb was when its forks started failing; it must just end.
    tokio::time::timeout(Duration::from_secs(30), bomb.handle.wait())
        .await
        .expect("bomb ends")
        .expect("wait");
    assert_eq!(h.prov.lease(33).await.unwrap(), None);
    h.prov.release(34).await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_hog_is_killed_inside_its_own_order() {
    let h = Harness::busybox().await;
    let mut hog_spec = lease(35);
    hog_spec.memory_bytes = 48 << 20;
    let hog = h.prov.ensure(&hog_spec).await.expect("ensure");
    h.prov.ensure(&lease(36)).await.expect("ensure neighbour");

    // Grows a shell variable until the order's memory runs out (about 4x the limit at most).
    let (out, _, st) = tokio::time::timeout(
        Duration::from_secs(120),
        sh(
            &h.prov,
            35,
            "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived ${#x}",
        ),
    )
    .await
    .expect("bounded");
    assert_eq!(
        st,
        ExitStatus::Signal(9),
        "the hog was OOM-killed; output {out:?}"
    );
    let oom =
        std::fs::read_to_string(host_cgroup(&hog, "memory").join("memory.oom_control")).unwrap();
    let kills: u64 = oom
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .map(|n| n.trim().parse().unwrap())
        .unwrap_or(1);
    assert!(kills >= 1, "{oom}");

    // The order itself and its neighbour carry on.
    let (out, _, _) = run(&h.prov, 35, &["echo", "still up"]).await;
    assert_eq!(out, "still up\n");
    let (out, _, _) = run(&h.prov, 36, &["echo", "fine"]).await;
    assert_eq!(out, "fine\n");
    h.prov.release(35).await.expect("release");
    h.prov.release(36).await.expect("release");
}
