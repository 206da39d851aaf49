//! `shale sp commp FILE` and `shale sp datasets`: the piece CID an SP makes a deal for, and what
//! the broker's last checks found of each dataset.

use std::io::Read;
use std::path::Path;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use shale_provisioner::piece::PieceHasher;
use shale_provisioner::{DatasetSource, Verification};

use crate::spconfig::SpConfig;

/// What `shale sp commp` prints.
#[derive(Serialize)]
struct PieceView {
    file: String,
    piece_cid: String,
    piece_size: u64,
    payload_size: u64,
}

/// Prints the v1 piece CID, piece size and payload size of a file, reading it once.
pub fn commp(path: &Path, json: bool) -> anyhow::Result<()> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let size = file.metadata()?.len();
    // Hidden when stderr is not a terminal, so scripts get the result alone.
    let bar = ProgressBar::new(size).with_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("a valid template"),
    );
    let mut hasher = PieceHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    let piece = hasher
        .finish()
        .with_context(|| format!("{} has no piece", path.display()))?;
    let view = PieceView {
        file: path.display().to_string(),
        piece_cid: piece.cid().to_string(),
        piece_size: piece.piece_size,
        payload_size: piece.payload_size,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        println!("piece CID     {}", view.piece_cid);
        println!("piece size    {} bytes (padded)", view.piece_size);
        println!("payload size  {} bytes", view.payload_size);
    }
    Ok(())
}

/// One row of `shale sp datasets`.
#[derive(Serialize)]
pub struct DatasetRow {
    pub id: String,
    source: String,
    piece_cid: Option<String>,
    /// `verified`, `MISMATCH`, `not yet checked` or `directory (not a piece)`.
    pub state: String,
    found: Option<String>,
    pub checked_at: Option<u64>,
}

/// The `state` of a dataset whose bytes the broker's last check found to be its piece.
pub const VERIFIED: &str = "verified";

/// The config's datasets and what the broker's last hash of each found (from its state).
pub fn datasets(config: &SpConfig, json: bool) -> anyhow::Result<()> {
    let rows = dataset_rows(config)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::NOTHING);
    table.set_header(["DATASET", "PIECE CID", "STATE", "CHECKED", "SOURCE"]);
    for r in &rows {
        let checked = r.checked_at.map_or("-".to_string(), ago);
        let state = match (&r.found, r.state.as_str()) {
            (Some(found), "MISMATCH") => format!("MISMATCH: bytes are {found}"),
            _ => r.state.clone(),
        };
        table.add_row([
            r.id.as_str(),
            r.piece_cid.as_deref().unwrap_or("-"),
            &state,
            &checked,
            &r.source,
        ]);
    }
    println!("{table}");
    Ok(())
}

/// The config's datasets with the broker's last check of each.
pub fn dataset_rows(config: &SpConfig) -> anyhow::Result<Vec<DatasetRow>> {
    let record = config
        .gateway
        .containers
        .state_dir
        .join("datasets/verified.json");
    let kept: std::collections::BTreeMap<String, Verification> = match std::fs::read(&record) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a dataset record", record.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", record.display())),
    };
    let rows: Vec<DatasetRow> = config
        .gateway
        .containers
        .datasets
        .iter()
        .map(|(id, source)| match source {
            DatasetSource::Directory(dir) => DatasetRow {
                id: id.clone(),
                source: dir.display().to_string(),
                piece_cid: None,
                state: "directory (not a piece)".into(),
                found: None,
                checked_at: None,
            },
            DatasetSource::Piece(p) => {
                let last = kept.get(id).filter(|v| v.piece_cid == p.piece_cid);
                DatasetRow {
                    id: id.clone(),
                    source: p.source.display().to_string(),
                    piece_cid: Some(p.piece_cid.to_string()),
                    state: match last {
                        None => "not yet checked".into(),
                        Some(v) if v.matches() => VERIFIED.into(),
                        Some(_) => "MISMATCH".into(),
                    },
                    found: last.map(|v| v.found.to_string()),
                    checked_at: last.map(|v| v.checked_at),
                }
            }
        })
        .collect();
    Ok(rows)
}

/// `3h ago` for a Unix time.
fn ago(at: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let secs = now.saturating_sub(at);
    match secs {
        0..=119 => format!("{secs}s ago"),
        120..=7199 => format!("{}m ago", secs / 60),
        7200..=172_799 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// What `shale sp dataset pack` prints.
#[derive(Serialize)]
struct PackView {
    car: String,
    root_cid: String,
    piece_cid: String,
    piece_size: u64,
    payload_size: u64,
}

/// Packs `dir` as a UnixFS CAR at `out` and prints its root CID and the piece CID a deal for
/// the CAR names, with the config line that serves it as a tree.
pub fn pack(dir: &Path, out: &Path, json: bool) -> anyhow::Result<()> {
    let spinner = ProgressBar::new_spinner().with_message(format!("packing {}", dir.display()));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let root = shale_provisioner::car::pack_dir(dir, out)
        .with_context(|| format!("cannot pack {}", dir.display()))?;
    spinner.set_message(format!("computing the piece CID of {}", out.display()));
    let piece = shale_provisioner::piece::commp_file(out)
        .with_context(|| format!("{} has no piece", out.display()))?;
    spinner.finish_and_clear();
    let view = PackView {
        car: out.display().to_string(),
        root_cid: root.to_string(),
        piece_cid: piece.cid().to_string(),
        piece_size: piece.piece_size,
        payload_size: piece.payload_size,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(());
    }
    println!("CAR           {}", view.car);
    println!("root CID      {}", view.root_cid);
    println!("piece CID     {}", view.piece_cid);
    println!("piece size    {} bytes (padded)", view.piece_size);
    println!("payload size  {} bytes", view.payload_size);
    let id = dir
        .file_name()
        .map_or("dataset".into(), |n| n.to_string_lossy().into_owned());
    println!();
    println!("Serve it as its directory tree, once a deal for the piece is made:");
    println!("  [containers.datasets]");
    println!(
        "  {id} = {{ piece_cid = \"{}\", source = \"{}\", present = \"tree\" }}",
        view.piece_cid, view.car
    );
    Ok(())
}
