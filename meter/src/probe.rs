//! Session-quality probes: what the client really gets, seen from inside its container.
//!
//! A [`Probe`] names a command to run inside the order's container and parses its output into
//! typed [`Reading`]s. The gateway runs the command through the provisioner (at lease start and
//! periodically), hands the output to [`Probe::parse`], and records the readings with
//! [`crate::Ledger::record_probe`]; the metrics layer exports them. The commands use only
//! `/bin/sh`, `cat` and `sed`, so they work in minimal images, and print
//! `key=value` lines so parsing does not depend on the image's tool versions.

use crate::ledger::{now_ms, Ledger};
use crate::MeterError;
use serde::{Deserialize, Serialize};
use std::fmt::Display;
use std::future::Future;

/// One typed observation of what the container gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reading {
    /// CPUs the container's processes may run on, and the cgroup CPU quota if one is set.
    CpuCount {
        /// CPUs in the process's affinity mask (what `nproc` reports).
        online: u32,
        /// The cgroup bandwidth limit in thousandths of a CPU (`quota / period * 1000`), or
        /// `None` when unlimited.
        quota_millicpus: Option<u64>,
    },
    /// The container's memory limit.
    MemoryLimit {
        /// The cgroup memory limit in bytes, or `None` when unlimited.
        limit_bytes: Option<u64>,
        /// Physical memory the kernel reports (`MemTotal`), the cap when unlimited.
        total_bytes: u64,
    },
    /// One GPU visible inside the container.
    Gpu {
        /// The GPU's index as `nvidia-smi` numbers it.
        index: u32,
        /// Its model name.
        model: String,
        /// Its total memory in MiB.
        memory_mib: u64,
    },
    /// A session round-trip time measured by the gateway with SSH keepalives.
    RoundTrip {
        /// Microseconds from keepalive sent to reply received.
        micros: u64,
    },
    /// Bytes through the order's network interface (its own way to the internet, not the SSH
    /// channels), as the host end counts them, summed over the container's restarts since the
    /// gateway started watching it. Recorded for quality and audit; today's tariff bills SSH
    /// channel bytes only.
    Network {
        /// Bytes the order sent out.
        egress_bytes: u64,
        /// Bytes the order received.
        ingress_bytes: u64,
    },
}

/// What a probe's command produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeOutput {
    /// The exit status, `None` if the process was killed by a signal.
    pub exit_code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// A check of one resource, run inside the container.
pub trait Probe: Send + Sync {
    /// A short stable name, used as the ledger's `probe` column and a metrics label.
    fn name(&self) -> &'static str;

    /// The argv to execute inside the container.
    fn command(&self) -> Vec<String>;

    /// Turns the command's output into readings. An empty list means "nothing to report"
    /// (e.g. no GPU), an error means the output could not be understood.
    fn parse(&self, output: &ProbeOutput) -> Result<Vec<Reading>, MeterError>;
}

/// The probes every lease runs: CPU, memory and GPUs.
pub fn default_probes() -> Vec<Box<dyn Probe>> {
    vec![
        Box::new(CpuProbe),
        Box::new(MemoryProbe),
        Box::new(GpuProbe),
    ]
}

/// What one probe run gave: its readings (recorded in the ledger) or why it gave none.
#[derive(Debug)]
pub struct ProbeResult {
    /// The probe's name.
    pub probe: &'static str,
    /// The readings, or the error that stopped the probe.
    pub outcome: Result<Vec<Reading>, MeterError>,
}

/// Runs `probes` one after another through `exec` (which runs an argv inside the order's
/// container, e.g. the provisioner's exec), parses their output and records the readings of
/// each in the ledger. A probe that fails does not stop the others; its error is returned in
/// its [`ProbeResult`] (and nothing is recorded for it).
pub async fn run_probes<E, F, Err>(
    ledger: &Ledger,
    order: u64,
    session_id: Option<&str>,
    probes: &[Box<dyn Probe>],
    mut exec: E,
) -> Vec<ProbeResult>
where
    E: FnMut(Vec<String>) -> F,
    F: Future<Output = Result<ProbeOutput, Err>>,
    Err: Display,
{
    let mut results = Vec::with_capacity(probes.len());
    for probe in probes {
        let name = probe.name();
        let taken_at_ms = now_ms();
        let outcome = match exec(probe.command()).await {
            Ok(output) => match probe.parse(&output) {
                Ok(readings) => ledger
                    .record_probe(order, session_id, name, taken_at_ms, &readings)
                    .await
                    .map(|()| readings),
                Err(e) => Err(e),
            },
            Err(e) => Err(MeterError::ProbeExec {
                probe: name,
                detail: e.to_string(),
            }),
        };
        if let Err(e) = &outcome {
            tracing::warn!(order, probe = name, error = %e, "probe gave no reading");
        }
        results.push(ProbeResult {
            probe: name,
            outcome,
        });
    }
    results
}

fn sh(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

/// Fails unless the command exited 0.
fn require_success(probe: &'static str, output: &ProbeOutput) -> Result<(), MeterError> {
    match output.exit_code {
        Some(0) => Ok(()),
        other => Err(MeterError::ProbeOutput {
            probe,
            detail: format!(
                "command ended with {}: {}",
                other.map_or_else(|| "a signal".to_string(), |c| format!("status {c}")),
                output.stderr.trim()
            ),
        }),
    }
}

/// The value of the first `key=value` line with this key.
fn value<'a>(stdout: &'a str, key: &str) -> Option<&'a str> {
    stdout.lines().find_map(|line| {
        let (k, v) = line.split_once('=')?;
        (k.trim() == key).then(|| v.trim())
    })
}

fn number(probe: &'static str, key: &str, text: &str) -> Result<u64, MeterError> {
    text.parse().map_err(|_| MeterError::ProbeOutput {
        probe,
        detail: format!("{key} is {text:?}, not a number"),
    })
}

/// CPU count (affinity) and cgroup CPU quota, cgroup v2 or v1.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuProbe;

impl Probe for CpuProbe {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn command(&self) -> Vec<String> {
        // getconf/nproc may be missing from a minimal image; count the affinity list from
        // /proc/self/status instead ("Cpus_allowed_list: 0-3,8").
        sh(concat!(
            "echo \"cpus_allowed=$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' /proc/self/status)\"; ",
            "if [ -r /sys/fs/cgroup/cpu.max ]; then ",
            "read q p < /sys/fs/cgroup/cpu.max; echo \"quota=$q\"; echo \"period=$p\"; ",
            "elif [ -r /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]; then ",
            "echo \"quota=$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us)\"; ",
            "echo \"period=$(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)\"; ",
            "fi"
        ))
    }

    fn parse(&self, output: &ProbeOutput) -> Result<Vec<Reading>, MeterError> {
        require_success(self.name(), output)?;
        let list = value(&output.stdout, "cpus_allowed").ok_or(MeterError::ProbeOutput {
            probe: self.name(),
            detail: "no cpus_allowed line".into(),
        })?;
        let online = count_cpu_list(list).ok_or_else(|| MeterError::ProbeOutput {
            probe: self.name(),
            detail: format!("cpu list {list:?} is not a list like 0-3,8"),
        })?;
        let quota_millicpus = match (
            value(&output.stdout, "quota"),
            value(&output.stdout, "period"),
        ) {
            // v2 writes "max", v1 writes -1 for no limit.
            (Some("max") | Some("-1") | None, _) => None,
            (Some(q), Some(p)) => {
                let q = number(self.name(), "quota", q)?;
                let p = number(self.name(), "period", p)?;
                q.saturating_mul(1000).checked_div(p)
            }
            (Some(_), None) => {
                return Err(MeterError::ProbeOutput {
                    probe: self.name(),
                    detail: "a CPU quota without a period".into(),
                })
            }
        };
        Ok(vec![Reading::CpuCount {
            online,
            quota_millicpus,
        }])
    }
}

/// Counts the CPUs in a kernel CPU list such as `0-3,8,10-11`.
fn count_cpu_list(list: &str) -> Option<u32> {
    let mut count = 0u32;
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        count += match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                b.checked_sub(a)? + 1
            }
            None => {
                part.parse::<u32>().ok()?;
                1
            }
        };
    }
    (count > 0).then_some(count)
}

/// cgroup memory limit (v2 or v1) and the kernel's MemTotal.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryProbe;

/// cgroup v1 reports "no limit" as a huge page-aligned number near i64::MAX; anything at or
/// above this is treated as unlimited.
const V1_UNLIMITED: u64 = 1 << 62;

impl Probe for MemoryProbe {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn command(&self) -> Vec<String> {
        sh(concat!(
            "echo \"mem_total_kib=$(sed -n 's/^MemTotal:[[:space:]]*\\([0-9]*\\) kB$/\\1/p' /proc/meminfo)\"; ",
            "if [ -r /sys/fs/cgroup/memory.max ]; then ",
            "echo \"limit=$(cat /sys/fs/cgroup/memory.max)\"; ",
            "elif [ -r /sys/fs/cgroup/memory/memory.limit_in_bytes ]; then ",
            "echo \"limit=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes)\"; ",
            "fi"
        ))
    }

    fn parse(&self, output: &ProbeOutput) -> Result<Vec<Reading>, MeterError> {
        require_success(self.name(), output)?;
        let total_kib = value(&output.stdout, "mem_total_kib").ok_or(MeterError::ProbeOutput {
            probe: self.name(),
            detail: "no mem_total_kib line".into(),
        })?;
        let total_bytes = number(self.name(), "mem_total_kib", total_kib)?.saturating_mul(1024);
        let limit_bytes = match value(&output.stdout, "limit") {
            None | Some("max") => None,
            Some(text) => {
                let limit = number(self.name(), "limit", text)?;
                (limit < V1_UNLIMITED).then_some(limit)
            }
        };
        Ok(vec![Reading::MemoryLimit {
            limit_bytes,
            total_bytes,
        }])
    }
}

/// GPUs by `nvidia-smi`; no `nvidia-smi` in the container means no GPU and no reading.
#[derive(Debug, Clone, Copy, Default)]
pub struct GpuProbe;

impl Probe for GpuProbe {
    fn name(&self) -> &'static str {
        "gpu"
    }

    fn command(&self) -> Vec<String> {
        sh(concat!(
            "command -v nvidia-smi >/dev/null 2>&1 || exit 0; ",
            "exec nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader,nounits"
        ))
    }

    fn parse(&self, output: &ProbeOutput) -> Result<Vec<Reading>, MeterError> {
        require_success(self.name(), output)?;
        let mut readings = Vec::new();
        for line in output.stdout.lines().filter(|l| !l.trim().is_empty()) {
            // The model name may itself contain commas; index is first, memory last.
            let bad = || MeterError::ProbeOutput {
                probe: "gpu",
                detail: format!("{line:?} is not 'index, name, memory'"),
            };
            let (index, rest) = line.split_once(',').ok_or_else(bad)?;
            let (model, memory) = rest.rsplit_once(',').ok_or_else(bad)?;
            let index = index.trim().parse().map_err(|_| bad())?;
            let memory = memory.trim();
            // "[N/A]" or "[Not Supported]" for memory: report the GPU with 0 MiB rather than
            // hide that it exists.
            let memory_mib = if memory.starts_with('[') {
                0
            } else {
                memory.parse().map_err(|_| bad())?
            };
            readings.push(Reading::Gpu {
                index,
                model: model.trim().to_string(),
                memory_mib,
            });
        }
        Ok(readings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(stdout: &str) -> ProbeOutput {
        ProbeOutput {
            exit_code: Some(0),
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }

    /// Runs a probe's command on this machine, standing in for a container's shell.
    fn run_here(probe: &dyn Probe) -> ProbeOutput {
        let argv = probe.command();
        let out = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .output()
            .unwrap();
        ProbeOutput {
            exit_code: out.status.code(),
            stdout: String::from_utf8(out.stdout).unwrap(),
            stderr: String::from_utf8(out.stderr).unwrap(),
        }
    }

    #[test]
    fn cpu_probe_on_this_machine_sees_the_cpus_the_process_may_use() {
        let readings = CpuProbe.parse(&run_here(&CpuProbe)).unwrap();
        let online = match readings.as_slice() {
            [Reading::CpuCount { online, .. }] => *online,
            other => panic!("unexpected readings {other:?}"),
        };
        let expected = std::thread::available_parallelism().unwrap().get() as u32;
        // available_parallelism also applies the cgroup quota, so it can only be lower.
        assert!(
            online >= expected,
            "probe saw {online}, std sees {expected}"
        );
    }

    #[test]
    fn memory_probe_on_this_machine_reports_memtotal() {
        let readings = MemoryProbe.parse(&run_here(&MemoryProbe)).unwrap();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
        let kib: u64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().strip_suffix(" kB"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap();
        match readings.as_slice() {
            [Reading::MemoryLimit { total_bytes, .. }] => assert_eq!(*total_bytes, kib * 1024),
            other => panic!("unexpected readings {other:?}"),
        }
    }

    #[test]
    fn gpu_probe_without_nvidia_smi_reports_nothing() {
        let here = run_here(&GpuProbe);
        let has_smi = std::process::Command::new("sh")
            .args(["-c", "command -v nvidia-smi"])
            .status()
            .unwrap()
            .success();
        let readings = GpuProbe.parse(&here).unwrap();
        if !has_smi {
            assert!(readings.is_empty());
        } else {
            assert!(!readings.is_empty(), "nvidia-smi present but no GPU read");
        }
    }

    #[test]
    fn cpu_probe_parses_v2_and_v1_quotas() {
        let v2 = CpuProbe
            .parse(&ok("cpus_allowed=0-7\nquota=150000\nperiod=100000\n"))
            .unwrap();
        assert_eq!(
            v2,
            vec![Reading::CpuCount {
                online: 8,
                quota_millicpus: Some(1500)
            }]
        );
        let unlimited = CpuProbe
            .parse(&ok("cpus_allowed=0,2,4-5\nquota=max\nperiod=100000"))
            .unwrap();
        assert_eq!(
            unlimited,
            vec![Reading::CpuCount {
                online: 4,
                quota_millicpus: None
            }]
        );
        let v1 = CpuProbe
            .parse(&ok("cpus_allowed=0-1\nquota=-1\nperiod=100000"))
            .unwrap();
        assert!(matches!(
            v1[0],
            Reading::CpuCount {
                online: 2,
                quota_millicpus: None
            }
        ));
        assert!(CpuProbe.parse(&ok("cpus_allowed=3-1\n")).is_err());
        assert!(CpuProbe.parse(&ok("quota=5\n")).is_err());
    }

    #[test]
    fn memory_probe_parses_limits_and_unlimited() {
        let limited = MemoryProbe
            .parse(&ok("mem_total_kib=16000000\nlimit=4294967296\n"))
            .unwrap();
        assert_eq!(
            limited,
            vec![Reading::MemoryLimit {
                limit_bytes: Some(4 << 30),
                total_bytes: 16_384_000_000
            }]
        );
        let v1_unlimited = MemoryProbe
            .parse(&ok("mem_total_kib=1\nlimit=9223372036854771712\n"))
            .unwrap();
        assert!(matches!(
            v1_unlimited[0],
            Reading::MemoryLimit {
                limit_bytes: None,
                ..
            }
        ));
        let v2_unlimited = MemoryProbe
            .parse(&ok("mem_total_kib=1\nlimit=max\n"))
            .unwrap();
        assert!(matches!(
            v2_unlimited[0],
            Reading::MemoryLimit {
                limit_bytes: None,
                ..
            }
        ));
        assert!(MemoryProbe.parse(&ok("limit=12\n")).is_err());
    }

    #[test]
    fn gpu_probe_parses_nvidia_smi_csv_including_commas_in_names() {
        let out = ok("0, NVIDIA H100 80GB HBM3, 81559\n1, Weird, Model, Name, [N/A]\n");
        assert_eq!(
            GpuProbe.parse(&out).unwrap(),
            vec![
                Reading::Gpu {
                    index: 0,
                    model: "NVIDIA H100 80GB HBM3".into(),
                    memory_mib: 81559
                },
                Reading::Gpu {
                    index: 1,
                    model: "Weird, Model, Name".into(),
                    memory_mib: 0
                },
            ]
        );
        assert!(GpuProbe.parse(&ok("garbage\n")).is_err());
    }

    #[test]
    fn a_failed_command_is_an_error_not_an_empty_reading() {
        let failed = ProbeOutput {
            exit_code: Some(9),
            stdout: String::new(),
            stderr: "NVIDIA-SMI has failed".into(),
        };
        let err = GpuProbe.parse(&failed).unwrap_err();
        assert!(err.to_string().contains("NVIDIA-SMI has failed"), "{err}");
        let killed = ProbeOutput {
            exit_code: None,
            ..failed
        };
        assert!(CpuProbe.parse(&killed).is_err());
    }

    #[tokio::test]
    async fn run_probes_executes_parses_and_records_each_probe() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open_sqlite(&dir.path().join("ledger.db"))
            .await
            .unwrap();
        // This machine's shell plays the container; a probe whose command cannot start
        // shows up as an error without stopping the others.
        struct Missing;
        impl Probe for Missing {
            fn name(&self) -> &'static str {
                "missing"
            }
            fn command(&self) -> Vec<String> {
                vec!["/nonexistent/probe".into()]
            }
            fn parse(&self, _: &ProbeOutput) -> Result<Vec<Reading>, MeterError> {
                Ok(vec![])
            }
        }
        let probes: Vec<Box<dyn Probe>> =
            vec![Box::new(Missing), Box::new(CpuProbe), Box::new(MemoryProbe)];
        let results = run_probes(&ledger, 12, Some("s-1"), &probes, |argv| async move {
            let out = tokio::process::Command::new(&argv[0])
                .args(&argv[1..])
                .output()
                .await?;
            Ok::<_, std::io::Error>(ProbeOutput {
                exit_code: out.status.code(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            })
        })
        .await;
        assert_eq!(results.len(), 3);
        assert!(matches!(
            results[0].outcome,
            Err(MeterError::ProbeExec {
                probe: "missing",
                ..
            })
        ));
        assert_eq!(results[1].outcome.as_ref().unwrap().len(), 1);
        let stored = ledger.probe_readings(12).await.unwrap();
        assert_eq!(stored.len(), 2);
        assert_eq!(stored[0].probe, "cpu");
        assert!(matches!(stored[0].reading, Reading::CpuCount { .. }));
        assert_eq!(stored[1].probe, "memory");
        assert_eq!(stored[1].session_id.as_deref(), Some("s-1"));
    }

    #[test]
    fn readings_serialize_with_a_kind_tag() {
        let r = Reading::RoundTrip { micros: 1234 };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"kind":"round_trip","micros":1234}"#
        );
        let n = Reading::Network {
            egress_bytes: 5,
            ingress_bytes: 7,
        };
        let json = serde_json::to_string(&n).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"network","egress_bytes":5,"ingress_bytes":7}"#
        );
        assert_eq!(serde_json::from_str::<Reading>(&json).unwrap(), n);
    }
}
