//! Packing and extracting our own trees, and hostile CARs built block by block.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use prost::Message;

use super::format::{self, sha256_cid, DAG_PB, RAW};
use super::pb::{Kind, PbLink, PbNode, UnixfsData};
use super::*;

/// Deterministic bytes that look random.
fn noise(seed: u8, len: usize) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut out = Vec::with_capacity(len + 32);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(&Sha256::digest([&[seed][..], &i.to_le_bytes()].concat()));
        i += 1;
    }
    out.truncate(len);
    out
}

/// Every path under `root` with its contents (`None` for a directory), sorted.
fn tree(root: &Path) -> Vec<(String, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if path.is_dir() {
                out.push((rel, None));
                stack.push(path);
            } else {
                out.push((rel, Some(std::fs::read(&path).unwrap())));
            }
        }
    }
    out.sort();
    out
}

fn sample_tree(root: &Path) {
    std::fs::create_dir_all(root.join("a/b/c")).unwrap();
    std::fs::create_dir_all(root.join("empty")).unwrap();
    std::fs::write(root.join("empty-file"), b"").unwrap();
    std::fs::write(root.join(".hidden"), b"dot").unwrap();
    std::fs::write(root.join("a/b/c/big"), noise(1, 3 * (1 << 20) + 12345)).unwrap();
    std::fs::write(root.join("a/one-mib"), noise(2, 1 << 20)).unwrap();
    std::fs::write(root.join("a/b/small"), b"hello").unwrap();
}

/// A CAR of `blocks` under `root`, each block's CID computed unless given.
fn car_of(root: &Cid, blocks: &[(Cid, Vec<u8>)]) -> Vec<u8> {
    let mut car = format::header(root);
    for (cid, bytes) in blocks {
        format::write_section(&mut car, cid, bytes).unwrap();
    }
    car
}

fn dir_node(links: &[(&str, Cid)]) -> Vec<u8> {
    pb_node(Kind::Directory, links, UnixfsData::default())
}

fn pb_node(kind: Kind, links: &[(&str, Cid)], data: UnixfsData) -> Vec<u8> {
    PbNode {
        data: Some(
            UnixfsData {
                kind: Some(kind.code()),
                ..data
            }
            .encode_to_vec(),
        ),
        links: links
            .iter()
            .map(|(name, cid)| PbLink {
                hash: Some(cid.to_bytes()),
                name: Some(name.to_string()),
                tsize: Some(0),
            })
            .collect(),
    }
    .encode_canonical()
}

fn block(codec: u64, bytes: Vec<u8>) -> (Cid, Vec<u8>) {
    (sha256_cid(codec, &bytes), bytes)
}

/// Extracts a CAR held in memory into `work/out`, checking that a failure leaves nothing.
fn extract_bytes(work: &Path, car: &[u8]) -> Result<ExtractSummary, CarError> {
    let path = work.join("hostile.car");
    std::fs::write(&path, car).unwrap();
    let dest = work.join("out");
    let result = extract(&path, &dest);
    if result.is_err() {
        let left: Vec<_> = std::fs::read_dir(work)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != "hostile.car")
            .collect();
        assert!(left.is_empty(), "a failed extract left {left:?}");
    }
    result
}

#[test]
fn pack_then_extract_gives_the_same_tree() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    sample_tree(&src);
    let car = work.path().join("x.car");
    let root = pack_dir(&src, &car).unwrap();
    let dest = work.path().join("dest");
    let summary = extract(&car, &dest).unwrap();
    assert_eq!(summary.root, root);
    assert_eq!(summary.files, 5);
    assert_eq!(summary.directories, 5);
    assert_eq!(summary.bytes, 3 * (1 << 20) + 12345 + (1 << 20) + 5 + 3);
    assert_eq!(tree(&src), tree(&dest));
    let mode = std::fs::metadata(dest.join("a/b/small"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o644);
}

#[test]
fn packing_one_tree_twice_gives_one_car() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    sample_tree(&src);
    let (one, two) = (work.path().join("1.car"), work.path().join("2.car"));
    assert_eq!(pack_dir(&src, &one).unwrap(), pack_dir(&src, &two).unwrap());
    assert_eq!(std::fs::read(one).unwrap(), std::fs::read(two).unwrap());
}

#[test]
fn a_symlink_in_the_packed_dir_is_refused_by_path() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", src.join("sub/link")).unwrap();
    let out = work.path().join("x.car");
    let err = pack_dir(&src, &out).unwrap_err();
    assert!(
        matches!(&err, CarError::UnsupportedFile { path, kind: "symlink" } if path.ends_with("sub/link")),
        "{err}"
    );
    assert!(err.to_string().contains("sub/link"), "{err}");
    assert_eq!(
        std::fs::read_dir(work.path()).unwrap().count(),
        1,
        "no CAR left"
    );
}

#[test]
fn a_fifo_in_the_packed_dir_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    nix::unistd::mkfifo(&src.join("pipe"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let err = pack_dir(&src, &work.path().join("x.car")).unwrap_err();
    assert!(
        matches!(err, CarError::UnsupportedFile { kind: "FIFO", .. }),
        "{err}"
    );
}

#[test]
fn a_car_inside_the_packed_dir_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let err = pack_dir(work.path(), &work.path().join("x.car")).unwrap_err();
    assert!(matches!(err, CarError::OutputInsideInput { .. }), "{err}");
}

#[test]
fn a_block_whose_bytes_do_not_match_its_cid_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let leaf = block(RAW, b"honest".to_vec());
    let (root, dir) = block(DAG_PB, dir_node(&[("f", leaf.0)]));
    let forged = (leaf.0, b"forged".to_vec());
    let err = extract_bytes(work.path(), &car_of(&root, &[forged, (root, dir)])).unwrap_err();
    assert!(
        matches!(&err, CarError::HashMismatch { cid } if **cid == leaf.0),
        "{err}"
    );
}

#[test]
fn an_unreferenced_bad_block_is_refused_too() {
    let work = tempfile::tempdir().unwrap();
    let (root, dir) = block(DAG_PB, dir_node(&[]));
    let stray = (sha256_cid(RAW, b"a"), b"b".to_vec());
    let err = extract_bytes(work.path(), &car_of(&root, &[(root, dir), stray])).unwrap_err();
    assert!(matches!(err, CarError::HashMismatch { .. }), "{err}");
}

#[test]
fn a_tampered_packed_car_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    sample_tree(&src);
    let car = work.path().join("x.car");
    pack_dir(&src, &car).unwrap();
    let mut bytes = std::fs::read(&car).unwrap();
    bytes[1000] ^= 1;
    std::fs::remove_dir_all(&src).unwrap();
    std::fs::remove_file(&car).unwrap();
    let err = extract_bytes(work.path(), &bytes).unwrap_err();
    assert!(matches!(err, CarError::HashMismatch { .. }), "{err}");
}

#[test]
fn names_that_are_not_one_path_component_are_refused() {
    for name in ["../x", "..", ".", "", "a/b", "/etc", "a\0b"] {
        let work = tempfile::tempdir().unwrap();
        let leaf = block(RAW, b"escape".to_vec());
        let (root, dir) = block(DAG_PB, dir_node(&[(name, leaf.0)]));
        let err = extract_bytes(work.path(), &car_of(&root, &[leaf, (root, dir)])).unwrap_err();
        assert!(
            matches!(&err, CarError::BadName { name: n, .. } if n == name),
            "{name:?}: {err}"
        );
        assert!(!work.path().parent().unwrap().join("x").exists());
    }
}

#[test]
fn a_missing_block_is_named() {
    let work = tempfile::tempdir().unwrap();
    let absent = sha256_cid(RAW, b"not in the car");
    let (root, dir) = block(DAG_PB, dir_node(&[("f", absent)]));
    let err = extract_bytes(work.path(), &car_of(&root, &[(root, dir)])).unwrap_err();
    assert!(
        matches!(&err, CarError::MissingBlock { cid } if **cid == absent),
        "{err}"
    );
    assert!(err.to_string().contains(&absent.to_string()));
}

#[test]
fn two_entries_of_one_name_are_refused() {
    let work = tempfile::tempdir().unwrap();
    let leaf = block(RAW, b"twice".to_vec());
    let (root, dir) = block(DAG_PB, dir_node(&[("f", leaf.0), ("f", leaf.0)]));
    let err = extract_bytes(work.path(), &car_of(&root, &[leaf, (root, dir)])).unwrap_err();
    assert!(matches!(err, CarError::DuplicateName { .. }), "{err}");
}

#[test]
fn symlinks_in_the_car_are_refused() {
    let work = tempfile::tempdir().unwrap();
    let link = block(
        DAG_PB,
        pb_node(
            Kind::Symlink,
            &[],
            UnixfsData {
                data: Some(b"/etc".to_vec()),
                ..Default::default()
            },
        ),
    );
    let (root, dir) = block(DAG_PB, dir_node(&[("l", link.0)]));
    let err = extract_bytes(work.path(), &car_of(&root, &[link, (root, dir)])).unwrap_err();
    assert!(
        matches!(
            err,
            CarError::UnsupportedNode {
                kind: "symlink",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn a_file_whose_size_lies_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let leaf = block(RAW, b"four".to_vec());
    let file = block(
        DAG_PB,
        pb_node(
            Kind::File,
            &[("", leaf.0)],
            UnixfsData {
                filesize: Some(5),
                ..Default::default()
            },
        ),
    );
    let (root, dir) = block(DAG_PB, dir_node(&[("f", file.0)]));
    let blocks = [leaf, file, (root, dir)];
    let err = extract_bytes(work.path(), &car_of(&root, &blocks)).unwrap_err();
    assert!(
        matches!(
            err,
            CarError::SizeMismatch {
                declared: 5,
                actual: 4,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn a_root_that_is_a_file_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let (cid, bytes) = block(RAW, b"just a file".to_vec());
    let err = extract_bytes(work.path(), &car_of(&cid, &[(cid, bytes)])).unwrap_err();
    assert!(matches!(err, CarError::RootNotDirectory { .. }), "{err}");
}

#[test]
fn a_dag_that_links_one_block_many_times_is_bounded() {
    let work = tempfile::tempdir().unwrap();
    // Eight levels of 16 links to the same directory: 16^8 files from a few blocks.
    let leaf = block(RAW, vec![1; 1000]);
    let mut blocks = vec![leaf.clone()];
    let mut below = leaf.0;
    for _ in 0..8 {
        let names: Vec<String> = (0..16).map(|i| format!("e{i}")).collect();
        let links: Vec<(&str, Cid)> = names.iter().map(|n| (n.as_str(), below)).collect();
        let dir = block(DAG_PB, dir_node(&links));
        below = dir.0;
        blocks.push(dir);
    }
    let path = work.path().join("bomb.car");
    std::fs::write(&path, car_of(&below, &blocks)).unwrap();
    let limits = ExtractLimits {
        max_entries: 1000,
        ..Default::default()
    };
    let err = extract_with_limits(&path, &work.path().join("out"), &limits).unwrap_err();
    assert!(matches!(err, CarError::LimitExceeded { .. }), "{err}");
    assert!(!work.path().join("out").exists());
}

#[test]
fn an_existing_destination_is_not_replaced() {
    let work = tempfile::tempdir().unwrap();
    let (root, dir) = block(DAG_PB, dir_node(&[]));
    let car = work.path().join("x.car");
    std::fs::write(&car, car_of(&root, &[(root, dir)])).unwrap();
    std::fs::create_dir(work.path().join("out")).unwrap();
    let err = extract(&car, &work.path().join("out")).unwrap_err();
    assert!(matches!(err, CarError::DestinationExists { .. }), "{err}");
}

#[test]
fn a_hamt_sharded_directory_is_read() {
    let work = tempfile::tempdir().unwrap();
    let a = block(RAW, b"a".to_vec());
    let b = block(RAW, b"b".to_vec());
    let hamt = |links: &[(&str, Cid)]| {
        pb_node(
            Kind::HamtShard,
            links,
            UnixfsData {
                fanout: Some(256),
                hash_type: Some(0x22),
                ..Default::default()
            },
        )
    };
    let sub = block(DAG_PB, hamt(&[("0Fb.txt", b.0)]));
    let (root, top) = block(DAG_PB, hamt(&[("1Aa.txt", a.0), ("C3", sub.0)]));
    let blocks = [a, b, sub, (root, top)];
    extract_bytes(work.path(), &car_of(&root, &blocks)).unwrap();
    let out = work.path().join("out");
    assert_eq!(std::fs::read(out.join("a.txt")).unwrap(), b"a");
    assert_eq!(std::fs::read(out.join("b.txt")).unwrap(), b"b");
}
