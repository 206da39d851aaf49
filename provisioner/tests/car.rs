//! Shale's CAR packer and extractor against an independent implementation: the npm `ipfs-car`
//! 3.1 CLI, each packing what the other unpacks, over a tree with nested directories, an empty
//! file, a multi-chunk file, a file of exactly one chunk and non-ASCII names.

use std::path::{Path, PathBuf};
use std::process::Command;

mod reference;

use reference::{node_modules, noise};
use shale_provisioner::car::{extract, pack_dir};
use shale_provisioner::piece::commp_file;

fn ipfs_car() -> PathBuf {
    node_modules().join(".bin/ipfs-car")
}

/// A tree both tools pack alike. `ipfs-car` drops empty directories and names starting with
/// `.`, and packs the deepest directory that holds every file, so the tree has neither and
/// more than one entry at the top.
fn make_tree(root: &Path) {
    let write = |rel: &str, bytes: &[u8]| {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    };
    write("empty", b"");
    write("readme.txt", b"a dataset\n");
    write("data/one-mib.bin", &noise(1, 1 << 20));
    write(
        "data/nested/deeper/big.bin",
        &noise(2, 3 * (1 << 20) + 4321),
    );
    write("data/nested/small", b"small");
    write("données/résumé.txt", "é".repeat(1000).as_bytes());
    write("日本語/🚀 rocket", &noise(3, 70_000));
    write("Zebra", b"upper case sorts first");
}

/// Every path under `root` with its bytes (`None` for a directory), sorted.
fn tree(root: &Path) -> Vec<(String, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                out.push((rel, None));
                stack.push(path);
            } else {
                assert!(meta.is_file(), "{rel} is neither file nor directory");
                out.push((rel, Some(std::fs::read(&path).unwrap())));
            }
        }
    }
    out.sort();
    out
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_car_packed_by_ipfs_car_extracts_to_the_same_tree_and_root() {
    if !reference::available(".bin/ipfs-car") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_tree(&src);
    let car = work.path().join("theirs.car");
    let printed = run(Command::new(ipfs_car())
        .arg("pack")
        .arg(&src)
        .arg("--output")
        .arg(&car));

    let dest = work.path().join("dest");
    let summary = extract(&car, &dest).unwrap();
    assert_eq!(summary.root.to_string(), printed.trim());
    assert_eq!(summary.files, 8);
    assert_eq!(tree(&src), tree(&dest));

    // Both tools make the same DAG of one tree: the same root CID.
    let ours_car = work.path().join("ours.car");
    let ours = pack_dir(&src, &ours_car).unwrap();
    assert_eq!(ours.to_string(), printed.trim());

    // Their block order is their writer's, so the pieces are shown, not compared.
    let theirs = commp_file(&car).unwrap().cid();
    let ours = commp_file(&ours_car).unwrap().cid();
    eprintln!("piece of ipfs-car's CAR {theirs}, of Shale's {ours}");
}

#[test]
fn a_car_packed_by_shale_unpacks_with_ipfs_car_to_the_same_tree() {
    if !reference::available(".bin/ipfs-car") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_tree(&src);
    let car = work.path().join("ours.car");
    let root = pack_dir(&src, &car).unwrap();

    let roots = run(Command::new(ipfs_car()).arg("roots").arg(&car));
    assert_eq!(roots.trim(), root.to_string());
    let dest = work.path().join("dest");
    run(Command::new(ipfs_car())
        .arg("unpack")
        .arg(&car)
        .arg("--output")
        .arg(&dest));
    assert_eq!(tree(&src), tree(&dest));

    let piece = commp_file(&car).unwrap();
    assert_eq!(piece.payload_size, std::fs::metadata(&car).unwrap().len());
    eprintln!("Shale's CAR {root} is piece {}", piece.cid());
}
