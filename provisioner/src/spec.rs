//! The OCI runtime spec of an order's container: limits, mounts, and the hardening defaults,
//! built with `oci-spec`'s typed builders so that every field is checked by the compiler.
//!
//! Hardening, and why each part is there:
//! - no privileged mode, no host namespaces: each order has its own user, pid, ipc, uts, mount,
//!   cgroup and network namespace (loopback only, so one order can never reach another);
//! - the user namespace maps the order's uid 0 to a host range of its own (see `userns.rs`), never
//!   0 and never a host account: root inside, so `apt-get`, `dpkg` and `chown` work, and nobody
//!   outside. Capabilities exist only in that namespace; the bounding set is Docker's default set,
//!   and `no_new_privileges` stays on, so setuid binaries in the image raise nothing;
//! - a seccomp allowlist equivalent to containerd's default profile (see `seccomp.rs`: no mounts,
//!   namespaces, modules, kexec, keyrings, bpf, ...);
//! - runc's default masked and read-only `/proc` and `/sys` paths; only the default device nodes
//!   (and CDI devices the order was given) are allowed by the devices cgroup;
//! - the root filesystem is the image with the order's own writable layer on top, on the order's
//!   own disk (see `disk.rs`), like `/work`; `/tmp` and `/run` are tmpfs counted against the
//!   memory limit; datasets are recursively read-only, nosuid, nodev;
//! - memory without swap, a CPU quota, and a pids limit in the order's own cgroup;
//! - containerd's socket and the host's filesystems are never mounted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Capabilities, Capability, HookBuilder, Hooks, HooksBuilder, LinuxBuilder,
    LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDeviceCgroupBuilder, LinuxDeviceType,
    LinuxIdMapping, LinuxIdMappingBuilder, LinuxMemoryBuilder, LinuxNamespaceBuilder,
    LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder, Mount, MountBuilder, Process,
    ProcessBuilder, RootBuilder, Spec, SpecBuilder, UserBuilder,
};

use crate::cdi::ContainerEdits;
use crate::dataset::DatasetMount;
use crate::userns::IdRange;
use crate::{ProvisionError, ProvisionerConfig};

/// The container's long-running init: waits forever, reaps orphans (the shell's `wait`), and
/// exits on SIGTERM so that `stop` is graceful. It needs only `/bin/sh` and `sleep`.
pub(crate) const INIT_SCRIPT: &str =
    "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done";

/// CPU period for the CFS quota; one CPU is one full period of runtime per period.
const CPU_PERIOD_US: u64 = 100_000;

/// The bounding capability set: Docker's default set, less `CAP_MKNOD` (a device node made in a
/// user namespace cannot be opened anyway) and `CAP_NET_RAW` (raw sockets wait for the network).
/// `CAP_SETFCAP` is added because package scripts set file capabilities (`setcap` in postinst of
/// e.g. iputils-ping). All of them act only inside the order's user namespace.
const BOUNDING_CAPS: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setpcap,
    Capability::Setfcap,
    Capability::NetBindService,
    Capability::Kill,
    Capability::AuditWrite,
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
    pub ids: IdRange,
    pub home: &'a Path,
    pub etc_dir: &'a Path,
    pub dataset: Option<&'a DatasetMount>,
    pub edits: &'a ContainerEdits,
    /// The agent's binary on the host and the directory its broker listens in, when the fast
    /// path is on.
    pub agent: Option<(&'a Path, PathBuf)>,
}

fn invalid(e: oci_spec::OciSpecError) -> ProvisionError {
    ProvisionError::Config(format!("the container spec is invalid: {e}"))
}

fn capabilities(uid: u32) -> Result<oci_spec::runtime::LinuxCapabilities, ProvisionError> {
    let bounding: Capabilities = BOUNDING_CAPS.iter().copied().collect();
    // A non-root user keeps no effective capabilities, as outside any namespace.
    let effective = if uid == 0 {
        bounding.clone()
    } else {
        Capabilities::new()
    };
    LinuxCapabilitiesBuilder::default()
        .bounding(bounding)
        .effective(effective.clone())
        .permitted(effective)
        .inheritable(Capabilities::new())
        .ambient(Capabilities::new())
        .build()
        .map_err(invalid)
}

/// The process spec shared by the init and every exec.
pub(crate) fn process(
    config: &ProvisionerConfig,
    args: &[String],
    env: &[String],
    cwd: &str,
    terminal: Option<(u16, u16)>,
) -> Result<Process, ProvisionError> {
    let (uid, gid) = config.user;
    let user = UserBuilder::default()
        .uid(uid)
        .gid(gid)
        .additional_gids(vec![gid])
        .build()
        .map_err(invalid)?;
    let mut p = ProcessBuilder::default()
        .terminal(terminal.is_some())
        .user(user)
        .args(args.to_vec())
        .env(env.to_vec())
        .cwd(cwd)
        .capabilities(capabilities(uid)?)
        .no_new_privileges(true)
        // Inherited from the shim, as before the typed spec: no rlimit is set here.
        .rlimits(Vec::new())
        // Under memory pressure on the host, an order's processes go before the host's own.
        .oom_score_adj(500)
        .build()
        .map_err(invalid)?;
    if let Some((cols, rows)) = terminal {
        let size = oci_spec::runtime::BoxBuilder::default()
            .width(u64::from(cols.max(1)))
            .height(u64::from(rows.max(1)))
            .build()
            .map_err(invalid)?;
        p.set_console_size(Some(size));
    }
    Ok(p)
}

fn mount(
    destination: impl AsRef<Path>,
    kind: &str,
    source: impl AsRef<Path>,
    options: &[&str],
) -> Result<Mount, ProvisionError> {
    MountBuilder::default()
        .destination(destination.as_ref())
        .typ(kind)
        .source(source.as_ref())
        .options(options.iter().map(|o| o.to_string()).collect::<Vec<_>>())
        .build()
        .map_err(invalid)
}

fn id_mapping(ids: IdRange) -> Result<Vec<LinuxIdMapping>, ProvisionError> {
    Ok(vec![LinuxIdMappingBuilder::default()
        .container_id(0u32)
        .host_id(ids.host_base)
        .size(ids.size)
        .build()
        .map_err(invalid)?])
}

fn mounts(
    config: &ProvisionerConfig,
    shape: &ContainerShape<'_>,
) -> Result<Vec<Mount>, ProvisionError> {
    let tmp_size = format!("size={}", config.tmp_size_bytes);
    let mut mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        )?,
        // With a cgroup namespace the container sees its own cgroup as the root of this tree.
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", "ro"],
        )?,
        mount(
            "/run",
            "tmpfs",
            "tmpfs",
            &["nosuid", "nodev", "mode=755", "size=65536k"],
        )?,
        mount(
            "/tmp",
            "tmpfs",
            "tmpfs",
            &["nosuid", "nodev", "mode=1777", &tmp_size],
        )?,
        mount(
            &config.work_dir,
            "bind",
            shape.home,
            &["rbind", "rw", "nosuid", "nodev"],
        )?,
        mount(
            "/etc/hosts",
            "bind",
            shape.etc_dir.join("hosts"),
            &["rbind", "ro", "nosuid", "nodev", "noexec"],
        )?,
        mount(
            "/etc/hostname",
            "bind",
            shape.etc_dir.join("hostname"),
            &["rbind", "ro", "nosuid", "nodev", "noexec"],
        )?,
        // The provider's resolvers; the image's own file is empty.
        mount(
            "/etc/resolv.conf",
            "bind",
            shape.etc_dir.join("resolv.conf"),
            &["rbind", "ro", "nosuid", "nodev", "noexec"],
        )?,
    ];
    if let Some(dataset) = shape.dataset {
        // `rro`: read-only all the way down, submounts of the dataset included (runc ≥ 1.1).
        // A piece is its directory first, then its payload file bound onto the mount point
        // inside it; runc mounts in this order.
        for (target, host) in &dataset.binds {
            mounts.push(mount(
                target,
                "bind",
                host,
                &["rbind", "rro", "nosuid", "nodev"],
            )?);
        }
    }
    if let Some((binary, link_dir)) = &shape.agent {
        // Under /run, a fresh tmpfs: nothing of the image is shadowed, nothing is written to it.
        mounts.push(mount(
            shale_agent::CONTAINER_BINARY,
            "bind",
            binary,
            &["rbind", "ro", "nosuid", "nodev"],
        )?);
        mounts.push(mount(
            shale_agent::CONTAINER_LINK_DIR,
            "bind",
            link_dir,
            &["rbind", "ro", "nosuid", "nodev", "noexec"],
        )?);
    }
    for m in &shape.edits.mounts {
        let kind = m.r#type.as_deref().unwrap_or("bind");
        let options: Vec<&str> = m.options.iter().map(String::as_str).collect();
        mounts.push(mount(&m.container_path, kind, &m.host_path, &options)?);
    }
    Ok(mounts)
}

fn device_type(kind: &str) -> Result<LinuxDeviceType, ProvisionError> {
    match kind {
        "c" | "u" => Ok(LinuxDeviceType::C),
        "b" => Ok(LinuxDeviceType::B),
        "p" => Ok(LinuxDeviceType::P),
        other => Err(ProvisionError::Config(format!(
            "a CDI device has type {other:?}; expected c, b or p"
        ))),
    }
}

fn hooks(edits: &ContainerEdits) -> Result<Option<Hooks>, ProvisionError> {
    if edits.hooks.is_empty() {
        return Ok(None);
    }
    let mut by_name: HashMap<&str, Vec<oci_spec::runtime::Hook>> = HashMap::new();
    for h in &edits.hooks {
        let mut hook = HookBuilder::default()
            .path(&h.path)
            .args(h.args.clone())
            .env(h.env.clone());
        if let Some(t) = h.timeout {
            hook = hook.timeout(t);
        }
        by_name
            .entry(h.hook_name.as_str())
            .or_default()
            .push(hook.build().map_err(invalid)?);
    }
    let mut hooks = HooksBuilder::default();
    for (name, list) in by_name {
        hooks = match name {
            "prestart" =>
            {
                #[allow(deprecated)]
                hooks.prestart(list)
            }
            "createRuntime" => hooks.create_runtime(list),
            "createContainer" => hooks.create_container(list),
            "startContainer" => hooks.start_container(list),
            "poststart" => hooks.poststart(list),
            "poststop" => hooks.poststop(list),
            other => {
                return Err(ProvisionError::Config(format!(
                    "a CDI spec names the unknown hook {other:?}"
                )))
            }
        };
    }
    Ok(Some(hooks.build().map_err(invalid)?))
}

/// The whole runtime spec of an order's container.
pub(crate) fn container(
    config: &ProvisionerConfig,
    shape: &ContainerShape<'_>,
) -> Result<Spec, ProvisionError> {
    let init_args = vec![
        "/bin/sh".to_string(),
        "-c".to_string(),
        INIT_SCRIPT.to_string(),
    ];
    let mut env = shape.env.clone();
    env.extend(shape.edits.env.iter().cloned());

    let mut device_rules = vec![LinuxDeviceCgroupBuilder::default()
        .allow(false)
        .access("rwm")
        .build()
        .map_err(invalid)?];
    // In a user namespace no device node can be made (runc would bind the container path from
    // the host instead): every CDI node is bound from its host node, and allowed in the cgroup.
    let mut device_mounts = Vec::new();
    for d in &shape.edits.device_nodes {
        let typ = device_type(&d.kind)?;
        device_mounts.push(mount(
            &d.path,
            "bind",
            &d.host_path,
            &["rbind", "nosuid", "noexec"],
        )?);
        device_rules.push(
            LinuxDeviceCgroupBuilder::default()
                .allow(true)
                .typ(typ)
                .major(d.major)
                .minor(d.minor)
                .access(&d.permissions)
                .build()
                .map_err(invalid)?,
        );
    }

    let namespaces = [
        LinuxNamespaceType::User,
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Cgroup,
        LinuxNamespaceType::Network,
    ]
    .into_iter()
    .map(|typ| LinuxNamespaceBuilder::default().typ(typ).build())
    .collect::<Result<Vec<_>, _>>()
    .map_err(invalid)?;

    let resources = LinuxResourcesBuilder::default()
        .devices(device_rules)
        // swap is memory+swap in OCI terms: equal to the limit means no swap at all.
        .memory(
            LinuxMemoryBuilder::default()
                .limit(i64::try_from(shape.memory_bytes).unwrap_or(i64::MAX))
                .swap(i64::try_from(shape.memory_bytes).unwrap_or(i64::MAX))
                .build()
                .map_err(invalid)?,
        )
        .cpu(
            LinuxCpuBuilder::default()
                .quota(i64::from(shape.cpus) * CPU_PERIOD_US as i64)
                .period(CPU_PERIOD_US)
                .build()
                .map_err(invalid)?,
        )
        .pids(
            LinuxPidsBuilder::default()
                .limit(i64::try_from(shape.pids_limit).unwrap_or(i64::MAX))
                .build()
                .map_err(invalid)?,
        )
        .build()
        .map_err(invalid)?;

    let linux = LinuxBuilder::default()
        .uid_mappings(id_mapping(shape.ids)?)
        .gid_mappings(id_mapping(shape.ids)?)
        .namespaces(namespaces)
        .cgroups_path(&shape.cgroups_path)
        .resources(resources)
        .devices(Vec::new())
        .seccomp(crate::seccomp::profile()?)
        .masked_paths(
            [
                "/proc/acpi",
                "/proc/asound",
                "/proc/kcore",
                "/proc/keys",
                "/proc/latency_stats",
                "/proc/timer_list",
                "/proc/timer_stats",
                "/proc/sched_debug",
                "/proc/scsi",
                "/sys/firmware",
            ]
            .map(String::from)
            .to_vec(),
        )
        .readonly_paths(
            [
                "/proc/bus",
                "/proc/fs",
                "/proc/irq",
                "/proc/sys",
                "/proc/sysrq-trigger",
            ]
            .map(String::from)
            .to_vec(),
        )
        .build()
        .map_err(invalid)?;

    let mut spec = SpecBuilder::default()
        .version("1.0.2")
        .process(process(config, &init_args, &env, &config.work_dir, None)?)
        // The order's own writable layer is on top of the image (see `rootfs.rs`).
        .root(
            RootBuilder::default()
                .path("rootfs")
                .readonly(false)
                .build()
                .map_err(invalid)?,
        )
        .hostname(shape.hostname.clone())
        .mounts([mounts(config, shape)?, device_mounts].concat())
        .annotations(HashMap::from([(
            "shale.order".to_string(),
            shape.order.to_string(),
        )]))
        .linux(linux)
        .build()
        .map_err(invalid)?;
    spec.set_hooks(hooks(shape.edits)?);
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape<'a>(edits: &'a ContainerEdits) -> ContainerShape<'a> {
        ContainerShape {
            order: 7,
            hostname: "order-7".into(),
            cgroups_path: "/shale/x-order-7".into(),
            env: vec!["PATH=/usr/bin:/bin".into()],
            cpus: 2,
            memory_bytes: 1 << 30,
            pids_limit: 512,
            ids: IdRange {
                host_base: 1 << 30,
                size: 65536,
            },
            home: Path::new("/state/disks/o-7/home"),
            etc_dir: Path::new("/state/orders/o-7"),
            // Leaked: a test's shape lives as long as the test.
            dataset: Some(Box::leak(Box::new(DatasetMount {
                id: "mnist".into(),
                binds: vec![("/data/mnist".into(), "/srv/mnist".into())],
                env: vec![],
            }))),
            edits,
            agent: Some((
                Path::new("/usr/lib/shale/shale-agent"),
                PathBuf::from("/state/orders/o-7/agent"),
            )),
        }
    }

    #[test]
    fn the_agent_and_its_link_are_bound_read_only_under_run() {
        let edits = ContainerEdits::default();
        let spec = container(&ProvisionerConfig::default(), &shape(&edits)).unwrap();
        let mounts = spec.mounts().as_ref().unwrap();
        let run = mounts
            .iter()
            .position(|m| m.destination() == Path::new("/run"))
            .unwrap();
        for (dest, source) in [
            (shale_agent::CONTAINER_BINARY, "/usr/lib/shale/shale-agent"),
            (shale_agent::CONTAINER_LINK_DIR, "/state/orders/o-7/agent"),
        ] {
            let at = mounts
                .iter()
                .position(|m| m.destination() == Path::new(dest))
                .unwrap_or_else(|| panic!("{dest} is not mounted"));
            assert!(at > run, "{dest} must be mounted after /run's tmpfs");
            let m = &mounts[at];
            assert_eq!(m.source().as_deref(), Some(Path::new(source)));
            let options = m.options().as_ref().unwrap();
            assert!(options.iter().any(|o| o == "ro"), "{dest}: {options:?}");
            assert!(options.iter().any(|o| o == "nosuid"), "{dest}: {options:?}");
        }
    }

    #[test]
    fn the_order_runs_as_root_in_its_own_user_and_cgroup_namespace() {
        let edits = ContainerEdits::default();
        let spec = container(&ProvisionerConfig::default(), &shape(&edits)).unwrap();
        let json = serde_json::to_value(&spec).unwrap();
        let linux = &json["linux"];
        let kinds: Vec<&str> = linux["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert!(kinds.contains(&"user") && kinds.contains(&"cgroup") && kinds.contains(&"network"));
        for map in ["uidMappings", "gidMappings"] {
            assert_eq!(linux[map][0]["containerID"], 0);
            assert_eq!(linux[map][0]["hostID"], 1 << 30);
            assert_eq!(linux[map][0]["size"], 65536);
        }
        assert_eq!(json["process"]["user"]["uid"], 0);
        assert_eq!(json["process"]["noNewPrivileges"], true);
        assert_eq!(json["root"]["readonly"], false);
        assert!(json.get("hooks").is_none());
        let caps = json["process"]["capabilities"]["effective"]
            .as_array()
            .unwrap();
        assert!(caps.iter().any(|c| c == "CAP_CHOWN"));
        assert!(!caps.iter().any(|c| c == "CAP_SYS_ADMIN"));
    }

    #[test]
    fn datasets_are_recursively_read_only_nosuid_nodev() {
        let edits = ContainerEdits::default();
        let spec = container(&ProvisionerConfig::default(), &shape(&edits)).unwrap();
        let data = spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.destination() == Path::new("/data/mnist"))
            .expect("dataset mount");
        let options = data.options().as_ref().unwrap();
        for o in ["rro", "nosuid", "nodev", "rbind"] {
            assert!(
                options.iter().any(|x| x == o),
                "{o} missing from {options:?}"
            );
        }
        assert!(!options.iter().any(|x| x == "rw"));
    }

    #[test]
    fn a_non_root_user_keeps_no_effective_capabilities() {
        let config = ProvisionerConfig {
            user: (1000, 1000),
            ..Default::default()
        };
        let p = process(&config, &["id".into()], &[], "/work", Some((0, 0))).unwrap();
        let caps = p.capabilities().as_ref().unwrap();
        assert!(caps.effective().as_ref().unwrap().is_empty());
        assert!(!caps.bounding().as_ref().unwrap().is_empty());
        let size = p.console_size().unwrap();
        assert_eq!(
            (size.width(), size.height()),
            (1, 1),
            "a 0x0 PTY is clamped"
        );
    }

    #[test]
    fn cdi_hooks_keep_their_stage_and_unknown_stages_are_refused() {
        let mut edits = ContainerEdits::default();
        edits.hooks.push(crate::cdi::HookEdit {
            hook_name: "createContainer".into(),
            path: "/usr/bin/nvidia-ctk".into(),
            args: vec!["nvidia-ctk".into(), "hook".into()],
            env: vec![],
            timeout: None,
        });
        let spec = container(&ProvisionerConfig::default(), &shape(&edits)).unwrap();
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(
            json["hooks"]["createContainer"][0]["path"],
            "/usr/bin/nvidia-ctk"
        );
        edits.hooks[0].hook_name = "sometime".into();
        assert!(container(&ProvisionerConfig::default(), &shape(&edits)).is_err());
    }
}
