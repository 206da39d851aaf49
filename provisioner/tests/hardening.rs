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
async fn processes_are_root_inside_and_nobody_outside() {
    let h = Harness::busybox().await;
    let first = h.prov.ensure(&lease(31)).await.expect("ensure");
    let second = h.prov.ensure(&lease(35)).await.expect("ensure a neighbour");
    let (status, _, _) = run(&h.prov, 31, &["cat", "/proc/self/status"]).await;
    assert_eq!(
        status_field(&status, "Uid:").split_whitespace().next(),
        Some("0")
    );
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
    const CAP_SYS_MODULE: u64 = 1 << 16;
    assert_eq!(
        bounding & (CAP_SYS_ADMIN | CAP_NET_ADMIN | CAP_SYS_PTRACE | CAP_SYS_MODULE),
        0,
        "bounding set {bounding:x}"
    );
    let effective = u64::from_str_radix(status_field(&status, "CapEff:"), 16).unwrap();
    assert_eq!(
        effective, bounding,
        "root holds its capabilities, in its namespace only"
    );

    // Outside, each order's root is a host uid of its own: never root, never an account.
    let mut host_uids = Vec::new();
    for (order, l) in [(31, &first), (35, &second)] {
        let ids = l.ids.expect("the lease records its range");
        let (map, _, _) = run(&h.prov, order, &["cat", "/proc/self/uid_map"]).await;
        assert_eq!(
            map.split_whitespace().collect::<Vec<_>>(),
            vec![
                "0".to_string(),
                ids.host_base.to_string(),
                ids.size.to_string()
            ]
        );
        let host = std::fs::read_to_string(format!("/proc/{}/status", l.pid)).unwrap();
        let uid: u32 = status_field(&host, "Uid:")
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let gid: u32 = status_field(&host, "Gid:")
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!((uid, gid), (ids.host_base, ids.host_base));
        assert!(
            uid > 65536,
            "host uid {uid} is in the range of host accounts"
        );
        host_uids.push(uid);
    }
    assert_ne!(host_uids[0], host_uids[1], "two orders share host uids");
    // The image's files belong to the order's root, without a copy of the image.
    let (out, _, _) = sh(&h.prov, 31, "stat -c %u:%g /bin/busybox /etc/passwd /").await;
    assert_eq!(out, "0:0\n0:0\n0:0\n");
    // The order's own cgroup is the root of the tree it sees.
    let (out, _, _) = run(&h.prov, 31, &["cat", "/proc/self/cgroup"]).await;
    for line in out.lines() {
        assert!(line.ends_with(":/"), "the host's cgroup tree shows: {line}");
    }
    h.prov.release(31).await.expect("release");
    h.prov.release(35).await.expect("release");
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
        "nsenter -t 1 -n true",
        "mknod /tmp/sda b 8 0 && head -c1 /tmp/sda", // no devices beyond the default ones
        // The limits are the SP's: the cgroup tree is read-only (v1 layout, then v2).
        "for f in /sys/fs/cgroup/pids/pids.max /sys/fs/cgroup/pids.max; do [ -f $f ] && echo 100000 > $f && exit 0; done; exit 1",
        "chroot / true", // CAP_SYS_CHROOT is not granted
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
    assert!(out.trim_end().ends_with("-32"), "hostname {out:?}");
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
