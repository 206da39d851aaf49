//! Shale's CommP against an independent implementation: `@web3-storage/data-segment`
//! (FRC-0058), run by node over the same files, at sizes around every padding boundary.

use std::path::Path;
use std::process::Command;

mod reference;

use reference::{node_modules, noise};
use shale_provisioner::piece::{commp_file, PieceCid};

/// The sizes to check: just below, at and above every Fr32 and power-of-two boundary up to
/// `max`, across the hasher's 1 MiB chunks, plus the smallest payload.
fn sizes(max: u64) -> Vec<u64> {
    let mut sizes = vec![65, 66, 100, 126];
    let mut unpadded = 127u64;
    while unpadded <= max {
        sizes.extend([unpadded - 1, unpadded, unpadded + 1]);
        sizes.push(unpadded + unpadded / 3);
        unpadded *= 2;
    }
    // The hasher works in chunks of 8192 Fr32 blocks: around one, and an odd count of them.
    let chunk = 8192 * 127;
    sizes.extend([
        chunk - 1,
        chunk,
        chunk + 1,
        3 * chunk,
        3 * chunk + 127,
        5 * chunk - 3,
    ]);
    sizes.sort_unstable();
    sizes.dedup();
    sizes
}

#[test]
fn commp_agrees_with_data_segment_around_every_padding_boundary() {
    if !reference::available("@web3-storage/data-segment") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (seed, size) in sizes(8 << 20).into_iter().enumerate() {
        let path = dir.path().join(format!("payload-{size}"));
        // Every third file zeros, so zero-heavy payloads (sparse files, padding-like data) are
        // covered as well as noise.
        let bytes = if seed % 3 == 2 {
            vec![0; size as usize]
        } else {
            noise(seed as u64, size as usize)
        };
        std::fs::write(&path, bytes).unwrap();
        files.push((path, size));
    }

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js/commp.mjs");
    let out = Command::new("node")
        .arg(&script)
        .args(files.iter().map(|(p, _)| p))
        .env("SHALE_NODE_MODULES", node_modules())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs = String::from_utf8(out.stdout).unwrap();
    let theirs: Vec<&str> = theirs.lines().collect();
    assert_eq!(theirs.len(), files.len());

    for ((path, size), line) in files.iter().zip(theirs) {
        let ours = commp_file(path).unwrap();
        assert_eq!(ours.payload_size, *size);
        let want = format!("{} {} {}", path.display(), ours.cid(), ours.piece_size);
        assert_eq!(line, want, "payload of {size} bytes");
        // And their CID reads back as ours.
        let cid: PieceCid = line.split(' ').nth(1).unwrap().parse().unwrap();
        assert_eq!(cid.root(), ours.root);
    }
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let err = commp_file(Path::new("/nonexistent/payload.car")).unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/payload.car"),
        "{err}"
    );
}
