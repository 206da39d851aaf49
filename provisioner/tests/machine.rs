//! The order's container is a machine to work on: root that installs packages and compiles,
//! a writable system and a disk of the ordered size, both private to the order, released
//! without a trace, adopted unchanged, and never handed to another marketplace's order.

mod common;

use common::*;
use shale_provisioner::{ExitStatus, Provisioner};

/// Runs a script under `set -e`; panics with its output when it fails.
async fn script(prov: &Provisioner, order: u64, body: &str) -> String {
    let (out, err, st) = run(prov, order, &["/bin/sh", "-ec", body]).await;
    assert_eq!(
        st,
        ExitStatus::Code(0),
        "script failed:\n{body}\n--- stdout\n{out}\n--- stderr\n{err}"
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_installs_packages_offline_and_compiles() {
    let h = Harness::start(TestImage::Default, |_| {}).await;
    let mut spec = lease(61);
    spec.disk_bytes = 512 << 20;
    spec.memory_bytes = 1 << 30;
    let l = h.prov.ensure(&spec).await.expect("ensure");

    // A package the test builds, installed with dpkg, then removed.
    let out = script(
        &h.prov,
        61,
        r#"
mkpkg() { # name, output
  d=/work/pkg/$1; mkdir -p $d/DEBIAN $d/usr/bin
  printf 'Package: %s\nVersion: 1.0\nArchitecture: all\nMaintainer: Shale <t@example.com>\nDescription: test\n' $1 > $d/DEBIAN/control
  printf '#!/bin/sh\necho hello from %s\n' $1 > $d/usr/bin/$1; chmod 755 $d/usr/bin/$1
  dpkg-deb --build --root-owner-group $d $2 >/dev/null
}
mkpkg shale-hello /work/shale-hello.deb
dpkg -i /work/shale-hello.deb >/dev/null
shale-hello
dpkg -r shale-hello >/dev/null
test ! -e /usr/bin/shale-hello
mkdir -p /work/repo
mkpkg shale-greet /work/repo/shale-greet_1.0_all.deb
cd /work/repo && dpkg-scanpackages . /dev/null 2>/dev/null > Packages
echo 'deb [trusted=yes] file:/work/repo ./' > /etc/apt/sources.list.d/local.list
only_local='-o Dir::Etc::SourceList=/etc/apt/sources.list.d/local.list -o Dir::Etc::SourceParts=-'
apt-get $only_local update -qq >/dev/null 2>&1
apt-get $only_local install -y -qq shale-greet >/dev/null 2>&1
shale-greet
"#,
    )
    .await;
    assert_eq!(out, "hello from shale-hello\nhello from shale-greet\n");

    // A wheel the test builds, installed system-wide by pip.
    let out = script(
        &h.prov,
        61,
        r#"
mkdir -p /work/py/shale_hi
echo 'def hi(): return "hi from a wheel"' > /work/py/shale_hi/__init__.py
printf 'from setuptools import setup\nsetup(name="shale-hi", version="1.0", packages=["shale_hi"])\n' > /work/py/setup.py
cd /work/py && pip wheel -q --no-deps --no-build-isolation --no-index -w /work/wheels . 2>/dev/null
pip install -q --no-index /work/wheels/shale_hi-1.0-py3-none-any.whl 2>/dev/null
cd / && python3 -c 'import shale_hi; print(shale_hi.hi())'
"#,
    )
    .await;
    assert_eq!(out, "hi from a wheel\n");

    // gcc compiles and runs; chown and su work as on any machine.
    let out = script(
        &h.prov,
        61,
        r#"
printf '#include <stdio.h>\nint main(void){puts("compiled");return 0;}\n' > /work/c.c
gcc -O2 -o /work/c /work/c.c && /work/c
touch /work/owned && chown 1234:4321 /work/owned && stat -c %u:%g /work/owned
su -s /bin/sh nobody -c 'id -u'
"#,
    )
    .await;
    assert_eq!(out, "compiled\n1234:4321\n65534\n");
    // On the host, the order's uid 1234 is its range's 1234th id.
    let ids = l.ids.expect("range");
    let meta = std::fs::metadata(l.volume.join("owned")).expect("the file on the host");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (meta.uid(), meta.gid()),
        (ids.host_id(1234), ids.host_id(4321))
    );
    h.prov.release(61).await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_is_the_ordered_size_and_full_means_enospc_inside_only() {
    let h = Harness::busybox().await;
    let mut small = lease(62);
    small.disk_bytes = 64 << 20;
    h.prov.ensure(&small).await.expect("ensure");
    h.prov.ensure(&lease(63)).await.expect("ensure a neighbour");

    // df shows the order's disk, for / as for /work: the 64 MiB it ordered.
    let out = script(&h.prov, 62, "df -k / /work | tail -n 2 | awk '{print $2}'").await;
    for kib in out.split_whitespace() {
        let kib: u64 = kib.parse().unwrap();
        assert!(
            (63 * 1024..=66 * 1024).contains(&kib),
            "df shows {kib} KiB for a 64 MiB disk"
        );
    }
    // Past the disk, writes fail with ENOSPC, in /work and in the root filesystem alike.
    for path in ["/work/big", "/big"] {
        let (_, err, st) = sh(
            &h.prov,
            62,
            &format!("dd if=/dev/zero of={path} bs=1M count=100"),
        )
        .await;
        assert_ne!(st, ExitStatus::Code(0));
        assert!(err.contains("No space left on device"), "{path}: {err}");
    }
    // Meanwhile the neighbour and the host keep writing.
    script(
        &h.prov,
        63,
        "dd if=/dev/zero of=/work/f bs=1M count=16 2>/dev/null; sync",
    )
    .await;
    let host_file = h.config.state_dir.join("host-still-writes");
    std::fs::write(&host_file, vec![0u8; 16 << 20]).expect("the host's disk is not full");
    std::fs::remove_file(host_file).unwrap();
    // Freeing space inside makes room again.
    script(&h.prov, 62, "rm -f /work/big /big; echo ok > /work/after").await;
    h.prov.release(62).await.expect("release");
    h.prov.release(63).await.expect("release");
}

/// Every mount on the host whose line names `needle`.
fn host_mounts_naming(needle: &std::path::Path) -> Vec<String> {
    let needle = needle.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(needle.as_ref()))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_leaves_nothing_and_the_range_goes_to_the_next_order() {
    let h = Harness::busybox().await;
    let first = h.prov.ensure(&lease(64)).await.expect("ensure");
    script(&h.prov, 64, "echo mine > /etc/note; echo mine > /work/note").await;
    let ids = first.ids.expect("range");
    let ours = h.dir.path().to_path_buf();
    assert!(
        host_mounts_naming(&ours).len() >= 2,
        "the disk and the root filesystem"
    );

    h.prov.release(64).await.expect("release");
    assert_eq!(h.prov.lease(64).await.expect("lease"), None);
    assert_eq!(
        host_mounts_naming(&ours),
        Vec::<String>::new(),
        "the disk and the root filesystem are unmounted"
    );
    for dir in ["disks", "idmap", "orders", "fifo"] {
        let left: Vec<_> = std::fs::read_dir(h.config.state_dir.join(dir))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "{dir} keeps {left:?}");
    }
    // The range is free again: the next order gets it, with nothing of the old one.
    let next = h.prov.ensure(&lease(65)).await.expect("ensure");
    assert_eq!(next.ids, Some(ids));
    let (_, _, st) = sh(&h.prov, 65, "test -e /etc/note || test -e /work/note").await;
    assert_ne!(st, ExitStatus::Code(0));
    h.prov.release(65).await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gateway_adopts_the_same_range_disk_and_files() {
    let h = Harness::busybox().await;
    let mut spec = lease(66);
    spec.disk_bytes = 96 << 20;
    let before = h.prov.ensure(&spec).await.expect("ensure");
    script(&h.prov, 66, "echo sys > /etc/note; echo home > /work/note").await;

    let restarted = h.reconnect().await;
    assert_eq!(restarted.adopt(|_| true).await.expect("adopt"), vec![66]);
    let after = restarted.ensure(&spec).await.expect("ensure after restart");
    assert!(after.reused);
    assert_eq!(after.pid, before.pid, "the running container is kept");
    assert_eq!((after.ids, after.disk_bytes), (before.ids, 96 << 20));
    let out = script(&restarted, 66, "cat /etc/note /work/note").await;
    assert_eq!(out, "sys\nhome\n");
    // A stopped task (as after a reboot) comes back with the same range and files.
    restarted.stop(66).await.expect("stop");
    let again = restarted.ensure(&spec).await.expect("ensure after stop");
    assert_eq!(again.ids, before.ids);
    assert_eq!(
        script(&restarted, 66, "cat /etc/note /work/note").await,
        "sys\nhome\n"
    );
    restarted.release(66).await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_marketplace_never_sees_this_ones_order_of_the_same_number() {
    let h = Harness::busybox().await;
    h.prov.ensure(&lease(1)).await.expect("ensure");
    script(&h.prov, 1, "echo secret > /work/secret").await;

    let other = Provisioner::connect(shale_provisioner::ProvisionerConfig {
        scope: "314159:0x00000000000000000000000000000000000000b2".into(),
        ..h.config.clone()
    })
    .await
    .expect("connect");
    let theirs = other
        .ensure(&lease(1))
        .await
        .expect("ensure in the other scope");
    assert!(!theirs.reused, "a container of its own");
    let (_, _, st) = sh(&other, 1, "test -e /work/secret").await;
    assert_ne!(
        st,
        ExitStatus::Code(0),
        "the other marketplace's order 1 sees the files"
    );
    assert_ne!(theirs.ids, h.prov.lease(1).await.unwrap().unwrap().ids);
    // Adoption in one scope releases nothing of the other.
    assert_eq!(
        other.adopt(|_| false).await.expect("adopt"),
        Vec::<u64>::new()
    );
    assert_eq!(script(&h.prov, 1, "cat /work/secret").await, "secret\n");
    h.prov.release(1).await.expect("release");
}
