//! Datasets are Filecoin pieces: stock `ssh` into an order sees the piece it was promised, and
//! a dataset whose bytes are not its piece is refused with the reason, and alerted on.

use std::time::Duration;

use shale_tests::ssh::run;
use shale_tests::{OrderOptions, Stack, DATASET_TEXT};

/// A value of a metric series on the `/metrics` page.
fn metric(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_reads_the_verified_piece_and_a_tampered_one_is_refused() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let payload = stack.dir.path().join("dataset/README");
    let piece = shale_provisioner::piece::commp_file(&payload)?;
    let key = stack.key("erin", "ed25519")?;

    // Both orders first: the gateway's cached order count would refuse a later one for a while.
    let order = stack.order(&key, OrderOptions::default()).await?;
    let other = stack.order(&key, OrderOptions::default()).await?;

    // The piece, its record and its CID, as the client's job sees them.
    let mut cmd = stack.target(order.to_string(), &key).ssh();
    cmd.arg("cat /data/demo/README; cat /data/demo/.piece; echo cid=$SHALE_DATASET_PIECE_CID");
    let out = tokio::task::spawn_blocking(move || run(cmd)).await??;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.starts_with(DATASET_TEXT), "{out:?}");
    assert!(
        out.stdout
            .contains(&format!("\"piece_cid\": \"{}\"", piece.cid())),
        "{out:?}"
    );
    assert!(
        out.stdout.contains(&format!("cid={}", piece.cid())),
        "{out:?}"
    );

    // One byte changed on the SP's disk: the next order's login is told why, and the SP's
    // alert is raised.
    let mut bytes = std::fs::read(&payload)?;
    bytes[10] ^= 0x20;
    std::fs::write(&payload, &bytes)?;
    let tampered = shale_provisioner::piece::commp_file(&payload)?.cid();
    let mut cmd = stack.target(other.to_string(), &key).ssh();
    cmd.arg("cat /data/demo/README");
    let out = tokio::task::spawn_blocking(move || run(cmd)).await??;
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(
        out.stderr.contains("failed its check")
            && out.stderr.contains(&piece.cid().to_string())
            && out.stderr.contains(&tampered.to_string()),
        "the client is told which piece it was promised and what the bytes are: {out:?}"
    );
    let series = "shale_gateway_dataset_mismatch{dataset=\"demo\"}";
    let mut page = String::new();
    for _ in 0..100 {
        page = stack.scrape().await?;
        if metric(&page, series) == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(metric(&page, series), Some(1.0), "{page}");
    stack.stop().await
}
