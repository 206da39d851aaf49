//! Shared harness for the meter's integration tests: real SQLite files and a throwaway
//! PostgreSQL cluster, both cleaned up on drop.

#![allow(dead_code)] // each test binary uses a different part of the harness

use alloy_primitives::U256;
use shale_meter::{Deployment, Ledger, Tariff, Tick, TickChain, Usage};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use tempfile::TempDir;

/// A SQLite ledger in a fresh temporary directory (removed when the `TempDir` drops).
/// The marketplace the tests' orders belong to (anvil's chain, its first contract's address).
pub const DEPLOYMENT: Deployment = Deployment::new(31337, [0x5f; 20]);

pub async fn sqlite_ledger() -> (TempDir, Ledger) {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open_sqlite(&dir.path().join("ledger.db"))
        .await
        .unwrap();
    (dir, ledger)
}

pub fn tariff() -> Tariff {
    Tariff::new(
        U256::from(1_000_000_000u64),
        U256::from(3_000_000_000_000u64),
    )
    .unwrap()
}

/// Builds `n` ticks continuing `chain`, committing each (no ledger involved).
pub fn next_ticks(chain: &mut TickChain, n: u64) -> Vec<Tick> {
    (0..n)
        .map(|i| {
            let seq = chain.next_seq();
            let t = chain.prepare(
                1_700_000_000_000 + seq * 5_000,
                Usage {
                    seconds: 5,
                    bytes_in: 1000 * seq + i,
                    bytes_out: 7 * seq,
                },
            );
            chain.commit(&t).unwrap();
            t
        })
        .collect()
}

/// A PostgreSQL cluster of its own: initdb into a temporary directory, started on a free
/// port as the `postgres` user, stopped and removed on drop.
pub struct PgCluster {
    bin: PathBuf,
    dir: TempDir,
    port: u16,
}

impl PgCluster {
    /// Starts a cluster, or returns `None` (after saying why) when Debian's PostgreSQL
    /// binaries are not installed.
    pub fn start() -> Option<PgCluster> {
        let Some(bin) = find_pg_bin() else {
            eprintln!(
                "SKIPPED: PostgreSQL ledger tests need Debian's postgresql \
                 (/usr/lib/postgresql/*/bin/initdb not found; apt-get install -y postgresql)"
            );
            // In CI a missing component is a failure, never a skipped pass.
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true: the reason above fails the test"
            );
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let as_root = run_capture("id", &["-u"]).trim() == "0";
        if as_root {
            // initdb refuses to run as root; the cluster belongs to the postgres user.
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success(), "chown of the cluster directory failed");
        }
        let data = dir.path().join("data");
        let pg = |tool: &str| {
            let mut cmd = if as_root {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
                c
            } else {
                Command::new(bin.join(tool))
            };
            cmd.current_dir(dir.path());
            cmd
        };
        let out = pg("initdb")
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // A port can be taken between probing and binding; retry a few times.
        for _ in 0..5 {
            let port = free_port();
            let opts = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                dir.path().display()
            );
            let status = pg("pg_ctl")
                .args(["-w", "-t", "60", "-D"])
                .arg(&data)
                .args(["-l"])
                .arg(dir.path().join("log"))
                .args(["-o", &opts, "start"])
                .stdout(Stdio::null())
                .status()
                .unwrap();
            if status.success() {
                return Some(PgCluster { bin, dir, port });
            }
        }
        let log = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
        panic!("PostgreSQL did not start:\n{log}");
    }

    /// The URL of database `db` on this cluster.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A new empty database named `name`, opened as a ledger.
    pub async fn fresh_ledger(&self, name: &str) -> Ledger {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-d", "postgres", "-v", "ON_ERROR_STOP=1", "-c"])
            .arg(format!("CREATE DATABASE {name}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "CREATE DATABASE failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ledger::open(&self.url(name)).await.unwrap()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let mut cmd = if run_capture("id", &["-u"]).trim() == "0" {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"])
                .arg(self.bin.join("pg_ctl"));
            c
        } else {
            Command::new(self.bin.join("pg_ctl"))
        };
        let _ = cmd
            .args(["-D"])
            .arg(&data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .status();
    }
}

fn find_pg_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run_capture(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}
