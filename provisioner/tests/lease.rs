//! Leases: ensure/reuse/release, the volume, limits read back from cgroups, datasets, errors,
//! and adoption after a gateway restart.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use shale_provisioner::piece::commp_file;
use shale_provisioner::{
    DatasetSource, ExitStatus, ImageRef, PieceSource, Presentation, ProvisionError, Provisioner,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_is_idempotent_and_safe_under_concurrent_calls() {
    let h = Harness::busybox().await;
    let spec = lease(11);
    let calls = (0..4).map(|_| {
        let prov = h.prov.clone();
        let spec = spec.clone();
        tokio::spawn(async move { prov.ensure(&spec).await })
    });
    let mut leases = Vec::new();
    for c in calls.collect::<Vec<_>>() {
        leases.push(c.await.unwrap().expect("ensure"));
    }
    let pid = leases[0].pid;
    assert!(
        leases
            .iter()
            .all(|l| l.pid == pid && l.container_id.ends_with("-11")),
        "{leases:?}"
    );
    assert_eq!(
        leases.iter().filter(|l| !l.reused).count(),
        1,
        "exactly one call created the container"
    );
    let again = h.prov.ensure(&spec).await.expect("ensure again");
    assert!(again.reused);
    assert_eq!(again.pid, pid);
    h.prov.release(11).await.expect("release");
    // Releasing twice is fine; stopping what is gone is NotProvisioned.
    h.prov.release(11).await.expect("release again");
    assert!(matches!(
        h.prov.stop(11).await,
        Err(ProvisionError::NotProvisioned { order: 11 })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_volume_survives_stop_and_goes_with_release() {
    let h = Harness::busybox().await;
    let first = h.prov.ensure(&lease(12)).await.expect("ensure");
    let (_, _, st) = sh(
        &h.prov,
        12,
        "echo kept > /work/note; mkdir -p /work/d && echo x > /work/d/y",
    )
    .await;
    assert_eq!(st, ExitStatus::Code(0));
    let (_, _, st) = sh(&h.prov, 12, "touch /tmp/x").await;
    assert_eq!(st, ExitStatus::Code(0));

    h.prov.stop(12).await.expect("stop");
    assert!(matches!(
        h.prov.exec(12, cmd(&["true"])).await.err(),
        Some(ProvisionError::NotProvisioned { order: 12 })
    ));
    let second = h.prov.ensure(&lease(12)).await.expect("ensure after stop");
    assert!(second.reused);
    assert_ne!(second.pid, first.pid, "a new task was started");
    let (out, _, _) = sh(&h.prov, 12, "cat /work/note /work/d/y").await;
    assert_eq!(out, "kept\nx\n");

    h.prov.release(12).await.expect("release");
    assert!(!first.volume.exists(), "volume removed on release");
    h.prov
        .ensure(&lease(12))
        .await
        .expect("ensure a fresh lease");
    let (out, _, _) = sh(&h.prov, 12, "ls -A /work").await;
    assert_eq!(out, "", "a new lease starts with an empty volume");
    h.prov.release(12).await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_enforced_in_the_orders_cgroup() {
    let h = Harness::busybox().await;
    let mut spec = lease(13);
    spec.cpus = 2;
    spec.memory_bytes = 96 << 20;
    spec.pids_limit = Some(77);
    h.prov.ensure(&spec).await.expect("ensure");
    let cg2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    // One host has one layout: say which one this run checked.
    eprintln!(
        "cgroup {} checked here; the {} branch runs on a host with that layout",
        if cg2 { "v2" } else { "v1" },
        if cg2 { "v1" } else { "v2" }
    );
    let line = if cg2 {
        "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory.swap.max /sys/fs/cgroup/cpu.max /sys/fs/cgroup/pids.max"
    } else {
        "cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/memory/memory.memsw.limit_in_bytes \
         /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu/cpu.cfs_period_us /sys/fs/cgroup/pids/pids.max"
    };
    let (out, err, st) = sh(&h.prov, 13, line).await;
    assert_eq!(st, ExitStatus::Code(0), "{err}");
    let values: Vec<&str> = out.split_whitespace().collect();
    let mem = (96u64 << 20).to_string();
    if cg2 {
        assert_eq!(values, vec![mem.as_str(), "0", "200000", "100000", "77"]);
    } else {
        // memsw = memory + swap; equal means no swap at all.
        assert_eq!(
            values,
            vec![mem.as_str(), mem.as_str(), "200000", "100000", "77"]
        );
    }
    // The cgroup files are read-only inside.
    let (_, _, st) = sh(&h.prov, 13, "echo 999999999 > /sys/fs/cgroup/pids/pids.max").await;
    assert_ne!(st, ExitStatus::Code(0));
    h.prov.release(13).await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datasets_are_mounted_read_only_and_a_missing_one_is_refused() {
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("piece.txt"), "sealed bytes\n").unwrap();
    let data_path = data.path().to_path_buf();
    let h = Harness::start(TestImage::Busybox, |c| {
        c.datasets = BTreeMap::from([
            (
                "bafy-present".to_string(),
                DatasetSource::Directory(data_path),
            ),
            (
                "bafy-gone".to_string(),
                DatasetSource::Directory("/nonexistent/shale/dataset".into()),
            ),
        ]);
    })
    .await;
    let mut spec = lease(14);
    spec.dataset = Some("bafy-present".into());
    h.prov.ensure(&spec).await.expect("ensure");
    let (out, _, st) = sh(&h.prov, 14, "cat /data/bafy-present/piece.txt").await;
    assert_eq!((out.as_str(), st), ("sealed bytes\n", ExitStatus::Code(0)));
    let (_, _, st) = sh(&h.prov, 14, "echo x > /data/bafy-present/new").await;
    assert_ne!(st, ExitStatus::Code(0), "a write to the dataset must fail");
    let (_, _, st) = sh(&h.prov, 14, "rm /data/bafy-present/piece.txt").await;
    assert_ne!(st, ExitStatus::Code(0));
    assert!(data.path().join("piece.txt").exists());
    h.prov.release(14).await.expect("release");

    for (order, id) in [(15, "bafy-gone"), (16, "bafy-unknown")] {
        let mut spec = lease(order);
        spec.dataset = Some(id.into());
        let err = h.prov.ensure(&spec).await.expect_err("missing dataset");
        assert!(
            matches!(&err, ProvisionError::DatasetMissing { dataset } if dataset == id),
            "{err:?}"
        );
        assert!(err.to_string().contains(id));
        assert!(
            matches!(
                h.prov.stop(order).await,
                Err(ProvisionError::NotProvisioned { .. })
            ),
            "nothing was created"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_piece_is_served_once_verified_and_one_changed_byte_refuses_it() {
    let data = tempfile::tempdir().unwrap();
    let payload = data.path().join("digits.csv");
    let bytes: Vec<u8> = (0..300_000u32)
        .flat_map(|i| (i % 97).to_le_bytes())
        .collect();
    std::fs::write(&payload, &bytes).unwrap();
    let piece = commp_file(&payload).unwrap();
    let source = payload.clone();
    let h = Harness::start(TestImage::Busybox, move |c| {
        c.datasets = BTreeMap::from([(
            "digits".to_string(),
            DatasetSource::Piece(PieceSource {
                piece_cid: piece.cid(),
                source,
                present: Default::default(),
            }),
        )]);
    })
    .await;
    let mut spec = lease(18);
    spec.dataset = Some("digits".into());
    h.prov.ensure(&spec).await.expect("ensure");
    // The payload, byte for byte, under its own name; the piece's record beside it.
    let (out, _, st) = sh(&h.prov, 18, "wc -c < /data/digits/digits.csv").await;
    assert_eq!(
        (out.trim(), st),
        (bytes.len().to_string().as_str(), ExitStatus::Code(0))
    );
    let (out, _, _) = sh(&h.prov, 18, "cat /data/digits/.piece").await;
    let record: serde_json::Value = serde_json::from_str(&out).expect(&out);
    assert_eq!(record["piece_cid"], piece.cid().to_string());
    assert_eq!(record["payload_size"], bytes.len());
    assert_eq!(record["piece_size"], piece.piece_size);
    let (out, _, _) = sh(&h.prov, 18, "echo $SHALE_DATASET_PIECE_CID").await;
    assert_eq!(out.trim(), piece.cid().to_string());
    let (_, _, st) = sh(&h.prov, 18, "echo x >> /data/digits/digits.csv").await;
    assert_ne!(st, ExitStatus::Code(0), "the payload is read-only");
    let (_, _, st) = sh(&h.prov, 18, "echo x > /data/digits/.piece").await;
    assert_ne!(st, ExitStatus::Code(0), "the record is read-only");
    h.prov.release(18).await.expect("release");
    assert_eq!(std::fs::read(&payload).unwrap(), bytes);

    // One byte changed on disk: the next order is refused with both CIDs, nothing created.
    let mut tampered = bytes.clone();
    tampered[123_456] ^= 0x01;
    std::fs::write(&payload, &tampered).unwrap();
    let mut spec = lease(19);
    spec.dataset = Some("digits".into());
    let err = h.prov.ensure(&spec).await.expect_err("tampered dataset");
    match &err {
        ProvisionError::DatasetMismatch {
            dataset,
            expected,
            found,
        } => {
            assert_eq!(dataset, "digits");
            assert_eq!(expected, &piece.cid().to_string());
            assert_eq!(found, &commp_file(&payload).unwrap().cid().to_string());
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("failed its check"), "{err}");
    assert!(matches!(
        h.prov.stop(19).await,
        Err(ProvisionError::NotProvisioned { .. })
    ));
    let status = &h.prov.dataset_statuses()[0];
    assert!(!status.last.as_ref().unwrap().matches(), "{status:?}");

    // Put back: served again, after one more hash.
    std::fs::write(&payload, &bytes).unwrap();
    h.prov.ensure(&spec).await.expect("ensure after repair");
    h.prov.release(19).await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_car_piece_is_served_as_its_directory_tree() {
    let data = tempfile::tempdir().unwrap();
    let tree = data.path().join("tree");
    std::fs::create_dir_all(tree.join("train")).unwrap();
    std::fs::write(tree.join("train/labels.csv"), "7,2,1\n").unwrap();
    std::fs::write(tree.join("README"), "the digits, as a CAR\n").unwrap();
    let car = data.path().join("digits.car");
    let root = shale_provisioner::car::pack_dir(&tree, &car).unwrap();
    let piece = commp_file(&car).unwrap();
    let h = Harness::start(TestImage::Busybox, move |c| {
        c.datasets = BTreeMap::from([(
            "digits".to_string(),
            DatasetSource::Piece(PieceSource {
                piece_cid: piece.cid(),
                source: car,
                present: Presentation::Tree,
            }),
        )]);
    })
    .await;
    let mut spec = lease(20);
    spec.dataset = Some("digits".into());
    h.prov.ensure(&spec).await.expect("ensure");
    let (out, _, st) = sh(
        &h.prov,
        20,
        "cat /data/digits/train/labels.csv /data/digits/README",
    )
    .await;
    assert_eq!(
        (out.as_str(), st),
        ("7,2,1\nthe digits, as a CAR\n", ExitStatus::Code(0))
    );
    let (out, _, _) = sh(
        &h.prov,
        20,
        "echo $SHALE_DATASET_ROOT_CID; cat /data/digits/.piece",
    )
    .await;
    assert!(out.starts_with(&format!("{root}\n")), "{out}");
    assert!(out.contains(&piece.cid().to_string()), "{out}");
    let (_, _, st) = sh(&h.prov, 20, "echo x > /data/digits/train/new").await;
    assert_ne!(st, ExitStatus::Code(0), "the tree is read-only");
    h.prov.release(20).await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_is_a_clear_error() {
    let h = Harness::busybox().await;
    let mut config = h.config.clone();
    config.image = ImageRef("shale/not-imported:1".into());
    let prov = Provisioner::connect(config).await.expect("connect");
    let err = prov.ensure(&lease(17)).await.expect_err("no such image");
    assert!(
        matches!(&err, ProvisionError::ImageMissing { image } if image == "shale/not-imported:1"),
        "{err:?}"
    );
    let err = h
        .prov
        .import_image(std::path::Path::new("/nonexistent/image.oci.tar"))
        .await
        .expect_err("no archive");
    assert!(
        matches!(err, ProvisionError::ImageInvalid { .. }),
        "{err:?}"
    );
    let junk = h.dir.path().join("junk.tar");
    std::fs::write(&junk, b"this is not a tar archive at all, not even close").unwrap();
    let err = h.prov.import_image(&junk).await.expect_err("junk archive");
    assert!(
        matches!(err, ProvisionError::ImageInvalid { .. }),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_is_not_there_is_reported_as_unreachable() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    // A stale socket file with no daemon behind it.
    let sock = dir.path().join("containerd.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let config = shale_provisioner::ProvisionerConfig {
        socket: sock.clone(),
        state_dir: dir.path().join("state"),
        ..Default::default()
    };
    let err = Provisioner::connect(config).await.err().expect("no daemon");
    assert!(err.is_daemon_unreachable(), "{err:?}");
    assert!(!shale_provisioner::daemon::answers(&sock).await);
    // LocalContainerd is not fooled by the stale socket: it starts a daemon of its own there.
    let daemon =
        shale_provisioner::daemon::LocalContainerd::connect_or_spawn(Some(&sock), dir.path())
            .await
            .expect("spawned");
    assert!(daemon.is_owned());
    assert!(shale_provisioner::daemon::answers(daemon.socket()).await);
    let socket = daemon.socket().to_path_buf();
    daemon.shutdown().await.expect("shutdown");
    assert!(!shale_provisioner::daemon::answers(&socket).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gateway_adopts_live_orders_and_releases_the_rest() {
    let h = Harness::busybox().await;
    for order in [21, 22, 23] {
        h.prov.ensure(&lease(order)).await.expect("ensure");
        sh(&h.prov, order, "echo mine > /work/f").await;
    }
    // Order 23's task stopped while the gateway was down (e.g. host reboot).
    h.prov.stop(23).await.expect("stop");

    let restarted = h.reconnect().await;
    let adopted = restarted.adopt(|order| order != 22).await.expect("adopt");
    assert_eq!(adopted, vec![21, 23]);
    let (out, _, _) = sh(&restarted, 21, "cat /work/f").await;
    assert_eq!(out, "mine\n");
    let (out, _, _) = sh(&restarted, 23, "cat /work/f").await;
    assert_eq!(
        out, "mine\n",
        "a stopped order is started again with its volume"
    );
    assert!(matches!(
        restarted.exec(22, cmd(&["true"])).await.err(),
        Some(ProvisionError::NotProvisioned { order: 22 })
    ));
    let disks: Vec<_> = std::fs::read_dir(h.config.state_dir.join("disks"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !disks.iter().any(|d| d.contains("-22")),
        "the released order's disk is gone: {disks:?}"
    );

    // Adopting again changes nothing.
    let again = restarted
        .adopt(|order| order != 22)
        .await
        .expect("adopt again");
    assert_eq!(again, vec![21, 23]);
    for order in [21, 23] {
        restarted.release(order).await.expect("release");
    }
    assert_eq!(
        restarted.adopt(|_| true).await.expect("adopt"),
        Vec::<u64>::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_ends_every_process_of_the_order_even_one_ignoring_sigterm() {
    let h = Harness::busybox().await;
    h.prov.ensure(&lease(24)).await.expect("ensure");
    let p = h
        .prov
        .exec(24, cmd(&["sh", "-c", "trap '' TERM; sleep 300"]))
        .await
        .expect("exec");
    tokio::time::timeout(Duration::from_secs(60), h.prov.stop(24))
        .await
        .expect("stop is bounded")
        .expect("stop");
    let st = tokio::time::timeout(Duration::from_secs(30), p.handle.wait())
        .await
        .expect("exec ends")
        .expect("wait");
    assert_eq!(st, ExitStatus::Signal(9));
    h.prov.release(24).await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writable_root_filesystem_is_private_to_the_order_and_kept_until_release() {
    let h = Harness::busybox().await;
    h.prov.ensure(&lease(25)).await.expect("ensure");
    h.prov.ensure(&lease(26)).await.expect("ensure");
    let (_, err, st) = sh(&h.prov, 25, "echo mine > /etc/order-note").await;
    assert_eq!(st, ExitStatus::Code(0), "{err}");
    let (_, _, st) = sh(&h.prov, 26, "test -e /etc/order-note").await;
    assert_ne!(
        st,
        ExitStatus::Code(0),
        "another order sees its own root filesystem"
    );
    h.prov.stop(25).await.expect("stop");
    h.prov.ensure(&lease(25)).await.expect("ensure again");
    let (out, _, _) = sh(&h.prov, 25, "cat /etc/order-note").await;
    assert_eq!(out, "mine\n");
    h.prov.release(25).await.expect("release");
    h.prov.ensure(&lease(25)).await.expect("fresh lease");
    let (_, _, st) = sh(&h.prov, 25, "test -e /etc/order-note").await;
    assert_ne!(
        st,
        ExitStatus::Code(0),
        "release dropped the order's snapshot"
    );
    h.prov.release(25).await.expect("release");
    h.prov.release(26).await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_status_reports_running_stopped_and_absent() {
    let h = Harness::busybox().await;
    assert_eq!(h.prov.lease(27).await.expect("status"), None);
    let made = h.prov.ensure(&lease(27)).await.expect("ensure");
    let seen = h.prov.lease(27).await.expect("status").expect("present");
    assert_eq!((seen.pid, seen.running), (made.pid, true));
    h.prov.stop(27).await.expect("stop");
    let seen = h.prov.lease(27).await.expect("status").expect("present");
    assert!(!seen.running);
    h.prov.release(27).await.expect("release");
    assert_eq!(h.prov.lease(27).await.expect("status"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_again_extends_the_recorded_expiry() {
    let h = Harness::busybox().await;
    let mut spec = lease(28);
    spec.expires_at = std::time::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
    assert_eq!(
        h.prov.ensure(&spec).await.expect("ensure").expires_at,
        Some(spec.expires_at)
    );
    spec.expires_at = std::time::UNIX_EPOCH + Duration::from_secs(2_000_003_600);
    assert_eq!(
        h.prov.ensure(&spec).await.expect("extend").expires_at,
        Some(spec.expires_at)
    );
    assert_eq!(
        h.prov.lease(28).await.unwrap().unwrap().expires_at,
        Some(spec.expires_at)
    );
    h.prov.release(28).await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_imports_of_one_archive_both_succeed() {
    let h = Harness::busybox().await;
    let archive = shale_provisioner::image_build::build_busybox_image(
        &shale_provisioner::image_build::default_cache_dir(),
    )
    .await
    .expect("archive");
    // A fresh namespace, so that the content is not there yet.
    let mut config = h.config.clone();
    config.namespace = format!("{}-again", config.namespace);
    let prov = Provisioner::connect(config).await.expect("connect");
    let (a, b) = tokio::join!(prov.import_image(&archive), prov.import_image(&archive));
    assert_eq!(a.expect("first import"), h.image);
    assert_eq!(b.expect("second import"), h.image);
    assert!(prov.has_image(&h.image).await.unwrap());
    prov.ensure(&lease(29)).await.expect("ensure");
    let (out, _, _) = run(&prov, 29, &["echo", "ok"]).await;
    assert_eq!(out, "ok\n");
    prov.release(29).await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_whose_init_died_is_not_provisioned_until_ensured_again() {
    let h = Harness::busybox().await;
    let first = h.prov.ensure(&lease(30)).await.expect("ensure");
    // SIGKILL from the host's side, as the OOM killer would.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut gone = false;
    for _ in 0..100 {
        if !h.prov.lease(30).await.unwrap().expect("container").running {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "the task stopped");
    let err = h
        .prov
        .exec(30, cmd(&["true"]))
        .await
        .err()
        .expect("no running task");
    assert!(
        matches!(err, ProvisionError::NotProvisioned { order: 30 }),
        "{err:?}"
    );
    let again = h.prov.ensure(&lease(30)).await.expect("ensure again");
    assert!(again.reused && again.pid != first.pid);
    let (out, _, _) = run(&h.prov, 30, &["echo", "back"]).await;
    assert_eq!(out, "back\n");
    h.prov.release(30).await.expect("release");
}
