//! Devices through CDI: a spec written by the test exposes a harmless device node and env vars
//! as "GPUs"; a real NVIDIA GPU is tested where one (and its CDI spec) exists.

mod common;

use common::*;
use shale_provisioner::{ExitStatus, ProvisionError};

const SPEC: &str = r#"
cdiVersion: "0.6.0"
kind: shale.test/gpu
containerEdits:
  env: [SHALE_CDI=1]
devices:
  - name: "0"
    containerEdits:
      env: [SHALE_TEST_GPU=0]
      deviceNodes:
        - path: /dev/shale-gpu0
          hostPath: /dev/zero
  - name: "1"
    containerEdits:
      env: [SHALE_TEST_GPU=1]
      deviceNodes:
        - path: /dev/shale-gpu1
          hostPath: /dev/zero
  - name: all
    containerEdits:
      env: [SHALE_TEST_GPU=all]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdi_devices_are_injected_and_never_shared() {
    let cdi = tempfile::tempdir().unwrap();
    std::fs::write(cdi.path().join("shale-test.yaml"), SPEC).unwrap();
    let cdi_dir = cdi.path().to_path_buf();
    let h = Harness::start(TestImage::Busybox, |c| {
        c.cdi_dirs = vec![cdi_dir];
        c.gpu_kind = "shale.test/gpu".into();
    })
    .await;

    let mut one = lease(41);
    one.gpus = 1;
    let first = h.prov.ensure(&one).await.expect("ensure with a GPU");
    assert_eq!(first.gpus, vec!["shale.test/gpu=0"]);
    let (out, _, st) = sh(
        &h.prov,
        41,
        "echo $SHALE_CDI $SHALE_TEST_GPU; head -c 4 /dev/shale-gpu0 | od -An -tx1",
    )
    .await;
    assert_eq!(st, ExitStatus::Code(0));
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        vec!["1", "0", "00", "00", "00", "00"]
    );
    // The device the order was not given is not there.
    let (_, _, st) = sh(&h.prov, 41, "test -e /dev/shale-gpu1").await;
    assert_ne!(st, ExitStatus::Code(0));

    let mut two = lease(42);
    two.gpus = 2;
    let err = h.prov.ensure(&two).await.expect_err("only one GPU left");
    assert!(
        matches!(
            err,
            ProvisionError::GpusUnavailable {
                wanted: 2,
                available: 1
            }
        ),
        "{err:?}"
    );

    let mut another = lease(43);
    another.gpus = 1;
    let second = h.prov.ensure(&another).await.expect("the other GPU");
    assert_eq!(second.gpus, vec!["shale.test/gpu=1"]);
    h.prov.release(41).await.expect("release");
    let mut later = lease(44);
    later.gpus = 1;
    assert_eq!(
        h.prov.ensure(&later).await.expect("freed GPU").gpus,
        vec!["shale.test/gpu=0"]
    );
    // A stopped order (out of escrow) holds no GPU: the next order gets it, and the stopped
    // one cannot start again on a GPU that is now someone else's.
    h.prov.stop(44).await.expect("stop");
    let mut next = lease(46);
    next.gpus = 1;
    assert_eq!(
        h.prov
            .ensure(&next)
            .await
            .expect("the stopped order's GPU")
            .gpus,
        vec!["shale.test/gpu=0"]
    );
    let mut again = lease(44);
    again.gpus = 1;
    let err = h.prov.ensure(&again).await.expect_err("its GPU is taken");
    assert!(
        matches!(
            err,
            ProvisionError::GpusUnavailable {
                wanted: 1,
                available: 0
            }
        ),
        "{err:?}"
    );
    h.prov.release(46).await.expect("release");
    assert!(
        h.prov
            .ensure(&again)
            .await
            .expect("its GPU is free again")
            .running
    );
    h.prov.release(43).await.expect("release");
    h.prov.release(44).await.expect("release");
}

/// Runs only where an NVIDIA GPU and its CDI spec (`nvidia-ctk cdi generate`) exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nvidia_smi_runs_inside_an_order_with_a_gpu() {
    let dirs = shale_provisioner::ProvisionerConfig::default().cdi_dirs;
    let registry = shale_provisioner::CdiRegistry::load(&dirs).unwrap_or_default();
    if !std::path::Path::new("/dev/nvidiactl").exists()
        || registry.devices_of_kind("nvidia.com/gpu").is_empty()
    {
        eprintln!("skipped: no NVIDIA GPU with a CDI spec on this machine");
        return;
    }
    let h = Harness::start(TestImage::Default, |c| c.cdi_dirs = dirs).await;
    let mut spec = lease(45);
    spec.gpus = 1;
    h.prov.ensure(&spec).await.expect("ensure with a GPU");
    let (out, err, st) = run(&h.prov, 45, &["nvidia-smi", "-L"]).await;
    assert_eq!(st, ExitStatus::Code(0), "{err}");
    assert!(out.contains("GPU 0"), "{out}");
    h.prov.release(45).await.expect("release");
}
