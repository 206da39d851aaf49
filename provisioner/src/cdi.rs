//! GPUs (and any other device) through the Container Device Interface: read the CDI spec files
//! the provider generated (e.g. `nvidia-ctk cdi generate`) and turn a device's edits into
//! OCI spec entries.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ProvisionError;

#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase")]
struct CdiSpec {
    kind: String,
    #[serde(default)]
    devices: Vec<CdiDevice>,
    #[serde(default)]
    container_edits: CdiEdits,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
struct CdiDevice {
    name: String,
    #[serde(default)]
    container_edits: CdiEdits,
}

#[derive(Deserialize, Debug, Default, Clone)]
#[serde(rename_all = "camelCase")]
struct CdiEdits {
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    device_nodes: Vec<CdiDeviceNode>,
    #[serde(default)]
    mounts: Vec<CdiMount>,
    #[serde(default)]
    hooks: Vec<CdiHook>,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
struct CdiDeviceNode {
    path: String,
    #[serde(default)]
    host_path: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    major: Option<i64>,
    #[serde(default)]
    minor: Option<i64>,
    #[serde(default)]
    file_mode: Option<u32>,
    #[serde(default)]
    permissions: Option<String>,
    #[serde(default)]
    uid: Option<u32>,
    #[serde(default)]
    gid: Option<u32>,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
struct CdiMount {
    host_path: String,
    container_path: String,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    options: Vec<String>,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
struct CdiHook {
    hook_name: String,
    path: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    timeout: Option<i64>,
}

/// A device node to create in the container and allow in its devices cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNode {
    /// Where the node appears in the container.
    pub path: String,
    /// The host's node it stands for (`path` when the spec names no other).
    pub host_path: String,
    /// `c` or `b`.
    pub kind: String,
    pub major: i64,
    pub minor: i64,
    pub file_mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Cgroup access, e.g. `rwm`.
    pub permissions: String,
}

/// A mount a CDI device asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEdit {
    pub host_path: String,
    pub container_path: String,
    pub r#type: Option<String>,
    pub options: Vec<String>,
}

/// An OCI hook a CDI device asks for (e.g. NVIDIA's `update-ldcache`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookEdit {
    pub hook_name: String,
    pub path: String,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub timeout: Option<i64>,
}

/// All edits to apply to one container, merged from every injected device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerEdits {
    pub env: Vec<String>,
    pub device_nodes: Vec<DeviceNode>,
    pub mounts: Vec<MountEdit>,
    pub hooks: Vec<HookEdit>,
}

/// The devices found in CDI spec directories, by fully qualified name (`vendor.com/class=name`).
#[derive(Debug, Default)]
pub struct CdiRegistry {
    devices: BTreeMap<String, (PathBuf, CdiEdits, CdiEdits)>,
}

impl CdiRegistry {
    /// Reads every `*.yaml`, `*.yml` and `*.json` file in `dirs`; missing directories are empty.
    /// Later directories override earlier ones for the same device, as in the CDI spec.
    pub fn load(dirs: &[PathBuf]) -> Result<Self, ProvisionError> {
        let mut reg = CdiRegistry::default();
        for dir in dirs {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut files: Vec<PathBuf> =
                entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            files.sort();
            for path in files {
                let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
                if !matches!(ext, "yaml" | "yml" | "json") {
                    continue;
                }
                let invalid = |reason: String| ProvisionError::CdiInvalid {
                    path: path.clone(),
                    reason,
                };
                let text = std::fs::read_to_string(&path).map_err(|e| invalid(e.to_string()))?;
                // YAML is a superset of JSON, so one parser reads both kinds of file.
                let spec: CdiSpec =
                    serde_yaml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
                if !spec.kind.contains('/') {
                    return Err(invalid(format!("kind {:?} is not vendor/class", spec.kind)));
                }
                for dev in spec.devices {
                    reg.devices.insert(
                        format!("{}={}", spec.kind, dev.name),
                        (
                            path.clone(),
                            spec.container_edits.clone(),
                            dev.container_edits,
                        ),
                    );
                }
            }
        }
        Ok(reg)
    }

    /// Device names of one kind, sorted, leaving out the catch-all `all` device.
    pub fn devices_of_kind(&self, kind: &str) -> Vec<String> {
        let prefix = format!("{kind}=");
        self.devices
            .keys()
            .filter(|k| k.starts_with(&prefix) && !k.ends_with("=all"))
            .cloned()
            .collect()
    }

    /// Merges the edits of the named devices (and their specs' common edits, once per spec).
    pub fn edits_for(&self, names: &[String]) -> Result<ContainerEdits, ProvisionError> {
        let mut out = ContainerEdits::default();
        let mut specs_done: Vec<PathBuf> = Vec::new();
        for name in names {
            let (path, common, own) =
                self.devices
                    .get(name)
                    .ok_or_else(|| ProvisionError::CdiInvalid {
                        path: PathBuf::from(name),
                        reason: "no such CDI device".into(),
                    })?;
            if !specs_done.contains(path) {
                apply(&mut out, common, path)?;
                specs_done.push(path.clone());
            }
            apply(&mut out, own, path)?;
        }
        Ok(out)
    }
}

fn apply(
    out: &mut ContainerEdits,
    edits: &CdiEdits,
    spec_path: &Path,
) -> Result<(), ProvisionError> {
    out.env.extend(edits.env.iter().cloned());
    for node in &edits.device_nodes {
        let resolved = resolve_node(node).map_err(|reason| ProvisionError::CdiInvalid {
            path: spec_path.to_path_buf(),
            reason,
        })?;
        if !out.device_nodes.contains(&resolved) {
            out.device_nodes.push(resolved);
        }
    }
    for m in &edits.mounts {
        out.mounts.push(MountEdit {
            host_path: m.host_path.clone(),
            container_path: m.container_path.clone(),
            r#type: m.kind.clone(),
            options: m.options.clone(),
        });
    }
    for h in &edits.hooks {
        out.hooks.push(HookEdit {
            hook_name: h.hook_name.clone(),
            path: h.path.clone(),
            args: h.args.clone(),
            env: h.env.clone(),
            timeout: h.timeout,
        });
    }
    Ok(())
}

/// Fills in type, numbers and mode of a device node from the host's node when the spec omits them.
fn resolve_node(node: &CdiDeviceNode) -> Result<DeviceNode, String> {
    let host = node.host_path.clone().unwrap_or_else(|| node.path.clone());
    let needs_stat = node.kind.is_none()
        || node.major.is_none()
        || node.minor.is_none()
        || node.file_mode.is_none();
    let meta = if needs_stat {
        Some(std::fs::metadata(&host).map_err(|e| format!("device node {host}: {e}"))?)
    } else {
        None
    };
    let kind = match (&node.kind, &meta) {
        (Some(k), _) => k.clone(),
        (None, Some(m)) if m.file_type().is_char_device() => "c".into(),
        (None, Some(m)) if m.file_type().is_block_device() => "b".into(),
        _ => return Err(format!("{host} is not a device node")),
    };
    let rdev = meta.as_ref().map(|m| m.rdev()).unwrap_or(0);
    Ok(DeviceNode {
        path: node.path.clone(),
        host_path: host,
        kind,
        major: node.major.unwrap_or(nix::sys::stat::major(rdev) as i64),
        minor: node.minor.unwrap_or(nix::sys::stat::minor(rdev) as i64),
        file_mode: node
            .file_mode
            .unwrap_or_else(|| meta.as_ref().map(|m| m.mode() & 0o777).unwrap_or(0o666)),
        uid: node.uid.unwrap_or(0),
        gid: node.gid.unwrap_or(0),
        permissions: node.permissions.clone().unwrap_or_else(|| "rwm".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_yaml_and_json_specs_and_resolves_device_numbers_from_the_host() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("test.yaml"),
            "cdiVersion: \"0.5.0\"\nkind: example.com/gpu\ncontainerEdits:\n  env: [COMMON=1]\n\
             devices:\n  - name: \"0\"\n    containerEdits:\n      env: [GPU=0]\n      deviceNodes:\n        - path: /dev/null\n\
             \x20 - name: \"1\"\n    containerEdits:\n      env: [GPU=1]\n\
             \x20 - name: all\n    containerEdits:\n      env: [GPU=all]\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("other.json"),
            r#"{"cdiVersion":"0.5.0","kind":"example.com/nic","devices":[{"name":"a","containerEdits":{"mounts":[{"hostPath":"/etc","containerPath":"/x","options":["ro"]}]}}]}"#,
        )
        .unwrap();
        let reg =
            CdiRegistry::load(&[dir.path().to_path_buf(), PathBuf::from("/nonexistent")]).unwrap();
        assert_eq!(
            reg.devices_of_kind("example.com/gpu"),
            vec!["example.com/gpu=0", "example.com/gpu=1"]
        );
        let edits = reg
            .edits_for(&["example.com/gpu=0".into(), "example.com/gpu=1".into()])
            .unwrap();
        assert_eq!(edits.env, vec!["COMMON=1", "GPU=0", "GPU=1"]);
        assert_eq!(edits.device_nodes.len(), 1);
        assert_eq!(
            (
                edits.device_nodes[0].kind.as_str(),
                edits.device_nodes[0].major,
                edits.device_nodes[0].minor
            ),
            ("c", 1, 3)
        );
        let nic = reg.edits_for(&["example.com/nic=a".into()]).unwrap();
        assert_eq!(nic.mounts[0].container_path, "/x");
    }

    #[test]
    fn a_broken_spec_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bad.yaml"), "kind: [").unwrap();
        let err = CdiRegistry::load(&[dir.path().to_path_buf()]).unwrap_err();
        assert!(err.to_string().contains("bad.yaml"), "{err}");
    }
}
