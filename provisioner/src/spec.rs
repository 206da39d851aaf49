//! The OCI runtime spec of an order's container: limits, mounts, and the hardening defaults.
//!
//! Hardening, and why each part is there:
//! - no privileged mode, no host namespaces: each order has its own pid, ipc, uts, mount and
//!   network namespace (loopback only, so one order can never reach another);
//! - processes run as an unprivileged uid with no effective capabilities and `no_new_privileges`,
//!   so setuid binaries in the image cannot raise them; the bounding set is Docker's minimal one;
//! - a seccomp allowlist equivalent to containerd's default profile for a process without
//!   capabilities (see `seccomp.rs`: no mounts, namespaces, modules, kexec, keyrings, bpf, ...);
//! - runc's default masked and read-only `/proc` and `/sys` paths; only the default device nodes
//!   (and CDI devices the order was given) are allowed by the devices cgroup;
//! - the image's root filesystem is read-only by default (see `ProvisionerConfig::readonly_rootfs`);
//!   writable places are `/work` (the order's volume), `/tmp` and `/run` (tmpfs, counted against
//!   the memory limit), `/dev/shm`;
//! - memory without swap, a CPU quota, and a pids limit in the order's own cgroup;
//! - containerd's socket and the host's filesystems are never mounted.

use std::path::Path;

use serde_json::{json, Value};

use crate::cdi::ContainerEdits;
use crate::ProvisionerConfig;

/// The container's long-running init: waits forever, reaps orphans (the shell's `wait`), and
/// exits on SIGTERM so that `stop` is graceful. It needs only `/bin/sh` and `sleep`.
pub(crate) const INIT_SCRIPT: &str =
    "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done";

/// CPU period for the CFS quota; one CPU is one full period of runtime per period.
const CPU_PERIOD_US: u64 = 100_000;

/// The bounding capability set: Docker's minimal set. Effective sets stay empty for non-root.
const BOUNDING_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// The parts of an order's container that vary.
pub(crate) struct ContainerShape<'a> {
    pub order: u64,
    pub hostname: String,
    pub cgroups_path: String,
    pub env: Vec<String>,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub pids_limit: u64,
    pub volume: &'a Path,
    pub etc_dir: &'a Path,
    pub dataset: Option<(&'a str, &'a Path)>,
    pub edits: &'a ContainerEdits,
}

fn capabilities(uid: u32) -> Value {
    let effective: &[&str] = if uid == 0 { BOUNDING_CAPS } else { &[] };
    json!({
        "bounding": BOUNDING_CAPS,
        "effective": effective,
        "permitted": effective,
        "inheritable": [],
        "ambient": [],
    })
}

/// The process spec shared by the init and every exec.
pub(crate) fn process(
    config: &ProvisionerConfig,
    args: &[String],
    env: &[String],
    cwd: &str,
    terminal: Option<(u16, u16)>,
) -> Value {
    let (uid, gid) = config.user;
    let mut p = json!({
        "terminal": terminal.is_some(),
        "user": { "uid": uid, "gid": gid, "additionalGids": [gid] },
        "args": args,
        "env": env,
        "cwd": cwd,
        "capabilities": capabilities(uid),
        "noNewPrivileges": true,
        // Under memory pressure on the host, an order's processes go before the host's own.
        "oomScoreAdj": 500,
    });
    if let Some((cols, rows)) = terminal {
        p["consoleSize"] = json!({ "width": cols.max(1), "height": rows.max(1) });
    }
    p
}

pub(crate) fn container(config: &ProvisionerConfig, shape: &ContainerShape<'_>) -> Value {
    let init_args = vec![
        "/bin/sh".to_string(),
        "-c".to_string(),
        INIT_SCRIPT.to_string(),
    ];
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
        json!({"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=755", "size=65536k"]}),
        json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "nodev", "mode=1777", format!("size={}", config.tmp_size_bytes)]}),
        json!({"destination": config.work_dir, "type": "bind", "source": shape.volume,
               "options": ["rbind", "rw", "nosuid", "nodev"]}),
        json!({"destination": "/etc/hosts", "type": "bind", "source": shape.etc_dir.join("hosts"),
               "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]}),
        json!({"destination": "/etc/hostname", "type": "bind", "source": shape.etc_dir.join("hostname"),
               "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]}),
    ];
    if let Some((id, path)) = shape.dataset {
        mounts.push(json!({"destination": format!("{}/{id}", config.data_dir), "type": "bind", "source": path,
                           "options": ["rbind", "ro", "nosuid", "nodev"]}));
    }
    for m in &shape.edits.mounts {
        mounts.push(json!({"destination": m.container_path, "type": m.r#type.clone().unwrap_or_else(|| "bind".into()),
                           "source": m.host_path, "options": m.options}));
    }

    let mut env = shape.env.clone();
    env.extend(shape.edits.env.iter().cloned());

    let mut device_rules = vec![json!({"allow": false, "access": "rwm"})];
    let mut devices = Vec::new();
    for d in &shape.edits.device_nodes {
        devices.push(
            json!({"path": d.path, "type": d.kind, "major": d.major, "minor": d.minor,
                            "fileMode": d.file_mode, "uid": d.uid, "gid": d.gid}),
        );
        device_rules.push(
            json!({"allow": true, "type": d.kind, "major": d.major, "minor": d.minor,
                                 "access": d.permissions}),
        );
    }

    let mut spec = json!({
        "ociVersion": "1.0.2",
        "process": process(config, &init_args, &env, &config.work_dir, None),
        "root": { "path": "rootfs", "readonly": config.readonly_rootfs },
        "hostname": shape.hostname,
        "mounts": mounts,
        "annotations": { "shale.order": shape.order.to_string() },
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}],
            "cgroupsPath": shape.cgroups_path,
            "resources": {
                "devices": device_rules,
                // swap is memory+swap in OCI terms: equal to the limit means no swap at all.
                "memory": { "limit": shape.memory_bytes, "swap": shape.memory_bytes },
                "cpu": { "quota": u64::from(shape.cpus) * CPU_PERIOD_US, "period": CPU_PERIOD_US },
                "pids": { "limit": shape.pids_limit },
            },
            "devices": devices,
            "seccomp": crate::seccomp::profile(),
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
            ],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    });
    if !shape.edits.hooks.is_empty() {
        let mut hooks = serde_json::Map::new();
        for h in &shape.edits.hooks {
            let entry = json!({"path": h.path, "args": h.args, "env": h.env, "timeout": h.timeout});
            hooks
                .entry(h.hook_name.clone())
                .or_insert_with(|| json!([]))
                .as_array_mut()
                .expect("array")
                .push(entry);
        }
        spec["hooks"] = Value::Object(hooks);
    }
    spec
}
