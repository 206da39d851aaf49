//! Leases: an order's container, created (or found) by `ensure`, stopped, released, adopted.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_client::services::v1::{
    container::Runtime, snapshots::MountsRequest, snapshots::RemoveSnapshotRequest,
    snapshots::ViewSnapshotRequest, Container, CreateContainerRequest, CreateTaskRequest,
    DeleteContainerRequest, DeleteTaskRequest, GetContainerRequest, GetRequest, KillRequest,
    ListContainersRequest, ListTasksRequest, StartRequest, UpdateContainerRequest, WaitRequest,
};
use containerd_client::types::v1::Status as TaskStatus;
use containerd_client::types::Mount;
use prost::Message;
use tracing::{debug, info, instrument, warn};

use crate::cdi::{CdiRegistry, ContainerEdits};
use crate::ctd::{is_already_exists, is_not_found, SNAPSHOTTER};
use crate::dataset::DatasetMount;
use crate::disk::MIN_DISK_BYTES;
use crate::image::ResolvedImage;
use crate::rootfs::{image_layers, IdmappedLayers};
use crate::spec::{self, ContainerShape};
use crate::userns::{self, IdRange};
use crate::{ImageRef, ProvisionError, Provisioner};

const LABEL_ORDER: &str = "shale.order";
const LABEL_PROVIDER: &str = "shale.provider";
const LABEL_EXPIRES: &str = "shale.expires_at";
const LABEL_GPUS: &str = "shale.gpus";
const LABEL_DATASET: &str = "shale.dataset";
/// The chain and marketplace the order belongs to (`ProvisionerConfig::scope`).
const LABEL_SCOPE: &str = "shale.scope";
/// The first host uid/gid of the order's user namespace: the allocator's only record.
pub(crate) const LABEL_UID_BASE: &str = "shale.uid_base";
/// The size of the order's disk in bytes.
const LABEL_DISK: &str = "shale.disk_bytes";
const RUNTIME: &str = "io.containerd.runc.v2";
const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// Below this an order's container cannot even start its init.
const MIN_MEMORY: u64 = 8 << 20;

/// What an order pays for: the shape of its container.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaseSpec {
    /// The order id on chain; with `ProvisionerConfig::scope` it names the container.
    pub order: u64,
    /// Whole CPUs, enforced as a CFS quota.
    pub cpus: u32,
    /// Memory limit in bytes; swap is not allowed on top of it.
    pub memory_bytes: u64,
    /// GPUs handed out through CDI (`ProvisionerConfig::gpu_kind`).
    pub gpus: u32,
    /// Dataset id mounted read-only at `<data_dir>/<id>`.
    pub dataset: Option<String>,
    /// When the lease ends; recorded on the container for adoption and operators.
    pub expires_at: SystemTime,
    /// Process limit; `ProvisionerConfig::default_pids_limit` when `None`.
    pub pids_limit: Option<u64>,
    /// The order's disk: everything it writes (root filesystem changes, `/work`) fits in it.
    pub disk_bytes: u64,
    /// The digest (`sha256:…`) of the catalog image the order runs; `None` for the provider's
    /// configured image (an order placed before the provider had a catalog).
    #[serde(default)]
    pub image: Option<String>,
    /// With `image`: the client brought its own image, pulled as `image_repository@image` from
    /// a registry `ProvisionerConfig::allowed_registries` lists.
    #[serde(default)]
    pub image_repository: Option<String>,
}

/// A running order container.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lease {
    pub order: u64,
    /// containerd's container id (`o<scope hash>-<order>`).
    pub container_id: String,
    /// Host pid of the container's init.
    pub pid: u32,
    /// The image the container was created from.
    pub image: ImageRef,
    /// The order's home on the host, on its disk (mounted at `ProvisionerConfig::work_dir`).
    pub volume: PathBuf,
    /// The host ids the order's user namespace maps its ids to.
    pub ids: Option<IdRange>,
    /// The size of the order's disk, as recorded on its container.
    pub disk_bytes: u64,
    /// CDI device names given to this order.
    pub gpus: Vec<String>,
    /// True when an existing container was found (and started again if it had stopped).
    pub reused: bool,
    /// Whether the container's task is running (always true from `ensure`).
    pub running: bool,
    /// When the lease ends, as recorded on the container.
    pub expires_at: Option<SystemTime>,
}

/// runc's shim options (`containerd.runc.v1.Options`); only the fields we set.
#[derive(Clone, PartialEq, Message)]
struct RuncOptions {
    /// runc's state directory: ours, so two containerd instances never share container ids there.
    #[prost(string, tag = "7")]
    root: String,
}

/// Whole seconds since the Unix epoch (0 before it).
pub(crate) fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

impl Provisioner {
    /// Creates the order's container and starts it, or finds it and makes sure it runs.
    ///
    /// Idempotent and safe under concurrent calls for the same order: the second caller waits
    /// and then finds the first caller's container. A dataset the provider does not hold fails
    /// here with [`ProvisionError::DatasetMissing`] before anything is created.
    #[instrument(skip_all, fields(order = spec.order))]
    pub async fn ensure(&self, spec: &LeaseSpec) -> Result<Lease, ProvisionError> {
        let order = spec.order;
        if spec.cpus == 0 || spec.memory_bytes < MIN_MEMORY {
            return Err(ProvisionError::StartFailed {
                order,
                reason: format!("the order asks for {} CPUs and {} bytes of memory; at least 1 CPU and {MIN_MEMORY} bytes are needed", spec.cpus, spec.memory_bytes),
            });
        }
        if spec.disk_bytes < MIN_DISK_BYTES {
            return Err(ProvisionError::StartFailed {
                order,
                reason: format!(
                    "the order asks for a disk of {} MiB; at least {} MiB are needed",
                    spec.disk_bytes >> 20,
                    MIN_DISK_BYTES >> 20
                ),
            });
        }
        if let Some(id) = &spec.dataset {
            if !self.inner.datasets.holds(id) {
                return Err(ProvisionError::DatasetMissing {
                    dataset: id.clone(),
                });
            }
        }
        let lock = self.order_lock(order);
        let _guard = lock.lock().await;
        let ctd = &self.inner.ctd;
        let id = self.container_id(order);

        match ctd
            .containers()
            .get(ctd.req(GetContainerRequest { id: id.clone() }))
            .await
        {
            Ok(resp) => {
                let container = resp
                    .into_inner()
                    .container
                    .ok_or(ProvisionError::NotProvisioned { order })?;
                self.update_expiry(&id, spec.expires_at).await?;
                let pid = self.ensure_running(order, &container).await?;
                let mut lease = self.lease_of(order, &container, pid, true);
                lease.expires_at =
                    Some(UNIX_EPOCH + Duration::from_secs(unix_secs(spec.expires_at)));
                return Ok(lease);
            }
            Err(s) if is_not_found(&s) => {}
            Err(s) => return Err(ctd.status("look up the order's container", s)),
        }

        // Exactly the content the order names, never whatever a tag points at now.
        let named = match (&spec.image, &spec.image_repository) {
            (Some(digest), Some(repository)) => self.client_image(repository, digest).await?,
            (Some(digest), None) => self.image_for_order(digest).await?,
            (None, _) => self.inner.config.image.clone(),
        };
        let image = ctd.resolve_image(&named).await?;
        // A piece is hashed here if its file is not the one last found to be the piece: before
        // anything is allocated, and never mounted unless it matches.
        let dataset = match &spec.dataset {
            Some(id) => Some(self.inner.datasets.mount(id).await?),
            None => None,
        };
        let _gpu_guard = if spec.gpus > 0 {
            Some(self.inner.gpu_lock.lock().await)
        } else {
            None
        };
        let (gpus, edits) = self.allocate_gpus(order, spec.gpus).await?;

        // The range is taken once the container carrying its label exists: allocate and create
        // under one lock, so two orders never pick the same free range.
        let allocation = userns::lock_allocation().await?;
        let ids = self.free_id_range().await?;
        // containerd's garbage collector removes snapshots nothing refers to; a short lease
        // holds the new snapshot until the container (which refers to it) exists.
        let gc_lease = ctd.temporary_lease("shale-ensure").await?;
        let created = self
            .create_container(order, spec, &image, gpus, &edits, dataset, ids, &gc_lease)
            .await;
        ctd.drop_lease(gc_lease).await;
        drop(allocation);
        let created = created?;
        let pid = match self.start_task(order, &created).await {
            Ok(pid) => pid,
            Err(e) => {
                // Leave nothing half-made behind; the next ensure starts clean.
                self.remove_container(order).await.ok();
                return Err(e);
            }
        };
        Ok(self.lease_of(order, &created, pid, false))
    }

    #[allow(clippy::too_many_arguments)]
    async fn create_container(
        &self,
        order: u64,
        spec: &LeaseSpec,
        image: &ResolvedImage,
        gpus: Vec<String>,
        edits: &ContainerEdits,
        dataset: Option<DatasetMount>,
        ids: IdRange,
        gc_lease: &str,
    ) -> Result<Container, ProvisionError> {
        let ctd = &self.inner.ctd;
        let id = self.container_id(order);
        // A read-only view of the image: its layers become the order's lower layers, idmapped
        // at every task start; the order's writes go to its own disk.
        let prepare = ctd
            .snapshots()
            .view(ctd.req_leased(
                ViewSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: id.clone(),
                    parent: image.chain_id.clone(),
                    labels: HashMap::new(),
                },
                gc_lease,
            ))
            .await;
        match prepare {
            Ok(_) => {}
            // Left over from an ensure that died half-way: the snapshot is still good.
            Err(s) if is_already_exists(&s) => {}
            Err(s) => return Err(ctd.status("prepare the order's root filesystem", s)),
        }

        let disk = self.disk(order);
        let etc = self.etc_dir(order);
        self.prepare_host_dirs(order, &etc).await?;
        // The disk is made here, so its cost is the first start's alone.
        disk.ensure(spec.disk_bytes, ids, self.inner.config.user)
            .await?;
        let home = disk.home();

        let mut env: Vec<String> = image.config.env.clone().unwrap_or_default();
        env.retain(|e| !e.starts_with("HOME=") && !e.starts_with("SHALE_ORDER="));
        env.push(format!("HOME={}", self.inner.config.work_dir));
        env.push(format!("SHALE_ORDER={order}"));
        if let Some(d) = &dataset {
            env.retain(|e| !e.starts_with("SHALE_DATASET"));
            env.extend(d.env.iter().cloned());
        }
        let shape = ContainerShape {
            order,
            hostname: id.clone(),
            cgroups_path: format!("/shale/{}-{id}", self.inner.instance),
            ids,
            env,
            cpus: spec.cpus,
            memory_bytes: spec.memory_bytes,
            pids_limit: spec
                .pids_limit
                .unwrap_or(self.inner.config.default_pids_limit),
            home: &home,
            etc_dir: &etc,
            dataset: dataset.as_ref(),
            edits,
            agent: self
                .inner
                .agents
                .binary()
                .map(|binary| (binary, self.agent_dir(order))),
        };
        let oci = spec::container(&self.inner.config, &shape)?;

        let mut labels = HashMap::new();
        labels.insert(LABEL_ORDER.to_string(), order.to_string());
        labels.insert(
            LABEL_PROVIDER.to_string(),
            self.inner.config.provider.clone(),
        );
        labels.insert(
            LABEL_EXPIRES.to_string(),
            unix_secs(spec.expires_at).to_string(),
        );
        labels.insert(LABEL_SCOPE.to_string(), self.inner.config.scope.clone());
        labels.insert(LABEL_UID_BASE.to_string(), ids.host_base.to_string());
        labels.insert(LABEL_DISK.to_string(), spec.disk_bytes.to_string());
        if !gpus.is_empty() {
            labels.insert(LABEL_GPUS.to_string(), gpus.join(","));
        }
        if let Some(d) = &dataset {
            labels.insert(LABEL_DATASET.to_string(), d.id.clone());
        }
        let runc_root = self.inner.config.state_dir.join("runc");
        let container = Container {
            id: id.clone(),
            labels,
            image: image.name.clone(),
            runtime: Some(Runtime {
                name: RUNTIME.into(),
                options: Some(prost_types::Any {
                    type_url: "containerd.runc.v1.Options".into(),
                    value: RuncOptions {
                        root: runc_root.display().to_string(),
                    }
                    .encode_to_vec(),
                }),
            }),
            spec: Some(prost_types::Any {
                type_url: SPEC_TYPE_URL.into(),
                value: serde_json::to_vec(&oci).expect("spec serializes"),
            }),
            snapshotter: SNAPSHOTTER.into(),
            snapshot_key: id.clone(),
            ..Default::default()
        };
        let created = ctd
            .containers()
            .create(ctd.req(CreateContainerRequest {
                container: Some(container),
            }))
            .await
            .map_err(|s| ctd.status("create the order's container", s))?
            .into_inner()
            .container
            .ok_or(ProvisionError::NotProvisioned { order })?;
        info!(image = %image.name, gpus = ?gpus, "container created");
        Ok(created)
    }

    /// The orders that have a container in this scope, running or stopped: what the gateway
    /// must watch even when nobody is connected, so that an ended lease is released on time.
    pub async fn orders(&self) -> Result<Vec<u64>, ProvisionError> {
        let mut orders: Vec<u64> = self
            .list_containers()
            .await?
            .iter()
            .filter_map(|c| c.labels.get(LABEL_ORDER)?.parse().ok())
            .collect();
        orders.sort_unstable();
        Ok(orders)
    }

    /// The order's container as it is now, without starting anything; `None` when it has none.
    pub async fn lease(&self, order: u64) -> Result<Option<Lease>, ProvisionError> {
        let ctd = &self.inner.ctd;
        let id = self.container_id(order);
        let container = match ctd
            .containers()
            .get(ctd.req(GetContainerRequest { id: id.clone() }))
            .await
        {
            Ok(resp) => match resp.into_inner().container {
                Some(c) => c,
                None => return Ok(None),
            },
            Err(s) if is_not_found(&s) => return Ok(None),
            Err(s) => return Err(ctd.status("look up the order's container", s)),
        };
        let (pid, running) = match ctd
            .tasks()
            .get(ctd.req(GetRequest {
                container_id: id,
                exec_id: String::new(),
            }))
            .await
        {
            Ok(resp) => {
                let p = resp.into_inner().process.unwrap_or_default();
                (p.pid, p.status == TaskStatus::Running as i32)
            }
            Err(s) if is_not_found(&s) => (0, false),
            Err(s) => return Err(ctd.status("look up the order's task", s)),
        };
        let mut lease = self.lease_of(order, &container, pid, true);
        lease.running = running;
        Ok(Some(lease))
    }

    fn lease_of(&self, order: u64, c: &Container, pid: u32, reused: bool) -> Lease {
        Lease {
            order,
            container_id: c.id.clone(),
            pid,
            image: ImageRef(c.image.clone()),
            volume: self.disk(order).home(),
            ids: id_range_of(c),
            disk_bytes: disk_bytes_of(c).unwrap_or(0),
            gpus: gpus_of(c),
            reused,
            running: true,
            expires_at: c
                .labels
                .get(LABEL_EXPIRES)
                .and_then(|s| s.parse::<u64>().ok())
                .map(|secs| UNIX_EPOCH + Duration::from_secs(secs)),
        }
    }

    async fn update_expiry(&self, id: &str, expires_at: SystemTime) -> Result<(), ProvisionError> {
        let ctd = &self.inner.ctd;
        let mut labels = HashMap::new();
        labels.insert(LABEL_EXPIRES.to_string(), unix_secs(expires_at).to_string());
        ctd.containers()
            .update(ctd.req(UpdateContainerRequest {
                container: Some(Container {
                    id: id.to_string(),
                    labels,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec![format!("labels.{LABEL_EXPIRES}")],
                }),
            }))
            .await
            .map_err(|s| ctd.status("update the order's expiry", s))?;
        Ok(())
    }

    async fn prepare_host_dirs(&self, order: u64, etc: &PathBuf) -> Result<(), ProvisionError> {
        std::fs::create_dir_all(etc).map_err(|e| ProvisionError::io("create", etc, e))?;
        let host = self.container_id(order);
        let hosts =
            format!("127.0.0.1\tlocalhost {host}\n::1\tlocalhost ip6-localhost ip6-loopback\n");
        std::fs::write(etc.join("hosts"), hosts)
            .map_err(|e| ProvisionError::io("write", etc.join("hosts"), e))?;
        std::fs::write(etc.join("hostname"), format!("{host}\n"))
            .map_err(|e| ProvisionError::io("write", etc.join("hostname"), e))?;
        if self.inner.agents.binary().is_some() {
            // Bound read-only into the container: the container's user may connect to the
            // socket the broker makes here, not put anything in its place.
            let dir = self.agent_dir(order);
            std::fs::create_dir_all(&dir).map_err(|e| ProvisionError::io("create", &dir, e))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| ProvisionError::io("open up", &dir, e))?;
        }
        Ok(())
    }

    /// Picks free CDI GPUs: those not named on any other order's container.
    async fn allocate_gpus(
        &self,
        order: u64,
        wanted: u32,
    ) -> Result<(Vec<String>, ContainerEdits), ProvisionError> {
        if wanted == 0 {
            return Ok((Vec::new(), ContainerEdits::default()));
        }
        let registry = CdiRegistry::load(&self.inner.config.cdi_dirs)?;
        let all = registry.devices_of_kind(&self.inner.config.gpu_kind);
        let used = self.gpus_in_use(order).await?;
        let free: Vec<String> = all.iter().filter(|d| !used.contains(*d)).cloned().collect();
        if (free.len() as u32) < wanted {
            return Err(ProvisionError::GpusUnavailable {
                wanted,
                available: free.len() as u32,
            });
        }
        let chosen: Vec<String> = free.into_iter().take(wanted as usize).collect();
        let edits = registry.edits_for(&chosen)?;
        Ok((chosen, edits))
    }

    /// The GPUs held by other orders: those of containers whose task runs. A stopped order
    /// (out of escrow) holds none; it gets its own back only if nobody took them meanwhile.
    async fn gpus_in_use(&self, order: u64) -> Result<BTreeSet<String>, ProvisionError> {
        let ctd = &self.inner.ctd;
        let running: BTreeSet<String> = ctd
            .tasks()
            .list(ctd.req(ListTasksRequest::default()))
            .await
            .map_err(|s| ctd.status("list tasks", s))?
            .into_inner()
            .tasks
            .into_iter()
            .filter(|t| {
                t.status == TaskStatus::Running as i32 || t.status == TaskStatus::Paused as i32
            })
            .map(|t| {
                if t.container_id.is_empty() {
                    t.id
                } else {
                    t.container_id
                }
            })
            .collect();
        let mut used = BTreeSet::new();
        for c in self.list_containers().await? {
            if c.id != self.container_id(order) && running.contains(&c.id) {
                used.extend(gpus_of(&c));
            }
        }
        Ok(used)
    }

    pub(crate) async fn list_containers(&self) -> Result<Vec<Container>, ProvisionError> {
        let ctd = &self.inner.ctd;
        let filter = format!(
            "labels.\"{LABEL_PROVIDER}\"=={},labels.\"{LABEL_SCOPE}\"=={}",
            self.inner.config.provider, self.inner.config.scope
        );
        Ok(ctd
            .containers()
            .list(ctd.req(ListContainersRequest {
                filters: vec![filter],
            }))
            .await
            .map_err(|s| ctd.status("list containers", s))?
            .into_inner()
            .containers)
    }

    /// Starts the container's task unless it already runs; returns the init's pid.
    async fn ensure_running(
        &self,
        order: u64,
        container: &Container,
    ) -> Result<u32, ProvisionError> {
        let ctd = &self.inner.ctd;
        match ctd
            .tasks()
            .get(ctd.req(GetRequest {
                container_id: container.id.clone(),
                exec_id: String::new(),
            }))
            .await
        {
            Ok(resp) => {
                let process = resp.into_inner().process.unwrap_or_default();
                if process.status == TaskStatus::Running as i32 {
                    return Ok(process.pid);
                }
                debug!(
                    status = process.status,
                    "task is not running; recreating it"
                );
                self.delete_task(&container.id).await?;
            }
            Err(s) if is_not_found(&s) => {}
            Err(s) => return Err(ctd.status("look up the order's task", s)),
        }
        let own = gpus_of(container);
        // A stopped order's GPUs may have gone to another order while it was stopped.
        let _gpu_guard = if own.is_empty() {
            None
        } else {
            let guard = self.inner.gpu_lock.lock().await;
            let used = self.gpus_in_use(order).await?;
            let taken = own.iter().filter(|g| used.contains(*g)).count() as u32;
            if taken > 0 {
                return Err(ProvisionError::GpusUnavailable {
                    wanted: own.len() as u32,
                    available: own.len() as u32 - taken,
                });
            }
            Some(guard)
        };
        self.start_task(order, container).await
    }

    /// The lowest host uid range no container on this containerd holds. Call it under
    /// `userns::lock_allocation`.
    async fn free_id_range(&self) -> Result<IdRange, ProvisionError> {
        let filter = format!("labels.\"{LABEL_UID_BASE}\"");
        let taken: BTreeSet<u32> = self
            .inner
            .ctd
            .containers_everywhere(&filter)
            .await?
            .iter()
            .filter_map(id_range_of)
            .map(|r| r.host_base)
            .collect();
        userns::pick(&self.inner.config, &taken).ok_or_else(|| {
            ProvisionError::AtCapacity(format!(
                "all {} user-namespace ranges are in use",
                self.inner.config.uid_ranges
            ))
        })
    }

    /// Starts the container's task: mounts its disk (after a reboot too), idmaps the image's
    /// layers to the order's namespace, and gives the shim the overlay of both as the root.
    async fn start_task(&self, order: u64, container: &Container) -> Result<u32, ProvisionError> {
        let ctd = &self.inner.ctd;
        let id = container.id.as_str();
        let failed = |reason: String| ProvisionError::StartFailed { order, reason };
        let ids = id_range_of(container).ok_or_else(|| {
            failed("its container carries no user-namespace range (made by an older Shale?)".into())
        })?;
        let disk_bytes = disk_bytes_of(container)
            .ok_or_else(|| failed("its container records no disk size".into()))?;
        let started = std::time::Instant::now();
        let etc = self.etc_dir(order);
        std::fs::create_dir_all(&etc).map_err(|e| ProvisionError::io("create", &etc, e))?;
        std::fs::write(etc.join("resolv.conf"), self.resolv_conf())
            .map_err(|e| ProvisionError::io("write", etc.join("resolv.conf"), e))?;
        let disk = self.disk(order);
        disk.ensure(disk_bytes, ids, self.inner.config.user).await?;
        let disk_ready = started.elapsed();
        let view: Vec<Mount> = ctd
            .snapshots()
            .mounts(ctd.req(MountsRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: id.to_string(),
            }))
            .await
            .map_err(|s| ctd.status("find the order's root filesystem", s))?
            .into_inner()
            .mounts;
        let layers = image_layers(&view)?;
        let userns = userns::namespace_for(ids)?;
        // Held until the shim has mounted the overlay; dropping it detaches the idmapped layers.
        let idmapped = IdmappedLayers::mount(&self.idmap_dir(order), &layers, &userns)?;
        let rootfs = vec![idmapped.overlay(&disk.upper(), &disk.overlay_work())];
        let idmap_ready = started.elapsed();
        let created = ctd
            .tasks()
            .create(ctd.req(CreateTaskRequest {
                container_id: id.to_string(),
                rootfs,
                ..Default::default()
            }))
            .await;
        drop(idmapped);
        debug!(
            disk_us = disk_ready.as_micros() as u64,
            userns_idmap_us = (idmap_ready - disk_ready).as_micros() as u64,
            task_create_us = (started.elapsed() - idmap_ready).as_micros() as u64,
            "task created"
        );
        let pid = created
            .map_err(|s| match ctd.status("create the task", s) {
                ProvisionError::Runtime { status, .. } => failed(status),
                other => other,
            })?
            .into_inner()
            .pid;
        // Before the first process runs, so it starts with its way out and its rules.
        let net_started = std::time::Instant::now();
        if let Err(e) = self.attach_network(order, ids, pid).await {
            self.delete_task(id).await.ok();
            return Err(failed(format!("its network could not be set up: {e}")));
        }
        debug!(
            network_us = net_started.elapsed().as_micros() as u64,
            "network attached"
        );
        let started = ctd
            .tasks()
            .start(ctd.req(StartRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            }))
            .await;
        match started {
            Ok(resp) => {
                let pid = resp.into_inner().pid;
                info!(pid, "task started");
                Ok(pid)
            }
            Err(s) => {
                let err = match ctd.status("start the task", s) {
                    ProvisionError::Runtime { status, .. } => failed(status),
                    other => other,
                };
                self.delete_task(id).await.ok();
                Err(err)
            }
        }
    }

    async fn delete_task(&self, id: &str) -> Result<(), ProvisionError> {
        let ctd = &self.inner.ctd;
        match ctd
            .tasks()
            .delete(ctd.req(DeleteTaskRequest {
                container_id: id.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if is_not_found(&s) => Ok(()),
            Err(s) => Err(ctd.status("delete the task", s)),
        }
    }

    /// Stops the order's processes (SIGTERM, then SIGKILL after `stop_grace`) and deletes its
    /// task; the container, its root filesystem and its volume stay for the next `ensure`.
    #[instrument(skip(self))]
    pub async fn stop(&self, order: u64) -> Result<(), ProvisionError> {
        let lock = self.order_lock(order);
        let _guard = lock.lock().await;
        self.stop_locked(order).await
    }

    async fn stop_locked(&self, order: u64) -> Result<(), ProvisionError> {
        let ctd = &self.inner.ctd;
        let id = self.container_id(order);
        match ctd
            .containers()
            .get(ctd.req(GetContainerRequest { id: id.clone() }))
            .await
        {
            Ok(_) => {}
            Err(s) if is_not_found(&s) => return Err(ProvisionError::NotProvisioned { order }),
            Err(s) => return Err(ctd.status("look up the order's container", s)),
        }
        let status = match ctd
            .tasks()
            .get(ctd.req(GetRequest {
                container_id: id.clone(),
                exec_id: String::new(),
            }))
            .await
        {
            Ok(resp) => resp.into_inner().process.unwrap_or_default().status,
            Err(s) if is_not_found(&s) => return Ok(()),
            Err(s) => return Err(ctd.status("look up the order's task", s)),
        };
        if status == TaskStatus::Running as i32 || status == TaskStatus::Paused as i32 {
            self.kill(&id, libc_signal::SIGTERM, false).await?;
            let exited =
                tokio::time::timeout(self.inner.config.stop_grace, self.wait_task(&id)).await;
            if !matches!(exited, Ok(Ok(()))) {
                warn!("processes did not stop within the grace period; killing them");
                self.kill(&id, libc_signal::SIGKILL, true).await?;
                tokio::time::timeout(Duration::from_secs(30), self.wait_task(&id))
                    .await
                    .map_err(|_| ProvisionError::Runtime {
                        action: "stop the order's container".into(),
                        status: "its processes survived SIGKILL for 30 s".into(),
                    })??;
            }
        }
        self.delete_task(&id).await?;
        self.inner
            .envs
            .lock()
            .expect("env cache poisoned")
            .remove(&order);
        self.inner.agents.forget(order);
        info!("task stopped");
        Ok(())
    }

    async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<(), ProvisionError> {
        let ctd = &self.inner.ctd;
        match ctd
            .tasks()
            .kill(ctd.req(KillRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
                signal,
                all,
            }))
            .await
        {
            Ok(_) => Ok(()),
            // Already gone: nothing left to signal.
            Err(s) if is_not_found(&s) => Ok(()),
            Err(s) => Err(ctd.status("signal the order's processes", s)),
        }
    }

    async fn wait_task(&self, id: &str) -> Result<(), ProvisionError> {
        let ctd = &self.inner.ctd;
        match ctd
            .tasks()
            .wait(ctd.req_long(WaitRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if is_not_found(&s) => Ok(()),
            Err(s) => Err(ctd.status("wait for the order's processes", s)),
        }
    }

    /// Ends the lease: stops the processes, deletes the container, its root filesystem and
    /// its volume. Releasing an order that has nothing left is not an error.
    #[instrument(skip(self))]
    pub async fn release(&self, order: u64) -> Result<(), ProvisionError> {
        let lock = self.order_lock(order);
        let _guard = lock.lock().await;
        match self.stop_locked(order).await {
            Ok(()) | Err(ProvisionError::NotProvisioned { .. }) => {}
            Err(e) => return Err(e),
        }
        self.remove_container(order).await?;
        // Its link died with the task; its rules go now (the table with the last order).
        self.write_rules(None).await?;
        self.disk(order).remove().await?;
        for dir in [
            self.etc_dir(order),
            self.fifo_dir(order),
            self.idmap_dir(order),
        ] {
            let d = dir.clone();
            let removed = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&d))
                .await
                .expect("remove_dir_all does not panic");
            match removed {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(ProvisionError::io("remove", dir, e)),
            }
        }
        self.inner
            .order_locks
            .lock()
            .expect("order lock map poisoned")
            .remove(&order);
        info!("lease released");
        Ok(())
    }

    async fn remove_container(&self, order: u64) -> Result<(), ProvisionError> {
        let ctd = &self.inner.ctd;
        let id = self.container_id(order);
        self.delete_task(&id).await?;
        match ctd
            .containers()
            .delete(ctd.req(DeleteContainerRequest { id: id.clone() }))
            .await
        {
            Ok(_) => {}
            Err(s) if is_not_found(&s) => {}
            Err(s) => return Err(ctd.status("delete the order's container", s)),
        }
        match ctd
            .snapshots()
            .remove(ctd.req(RemoveSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: id,
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if is_not_found(&s) => Ok(()),
            Err(s) => Err(ctd.status("remove the order's root filesystem", s)),
        }
    }

    /// After a gateway restart: keeps (and restarts if needed) the containers of orders that
    /// `still_leased` says are live, and releases every other container of this provider.
    /// Returns the adopted orders, sorted.
    #[instrument(skip_all)]
    pub async fn adopt(
        &self,
        still_leased: impl Fn(u64) -> bool,
    ) -> Result<Vec<u64>, ProvisionError> {
        let mut adopted = Vec::new();
        let mut known = BTreeSet::new();
        for c in self.list_containers().await? {
            let Some(order) = c
                .labels
                .get(LABEL_ORDER)
                .and_then(|o| o.parse::<u64>().ok())
            else {
                continue;
            };
            known.insert(order);
            if still_leased(order) {
                let lock = self.order_lock(order);
                let _guard = lock.lock().await;
                match self.ensure_running(order, &c).await {
                    Ok(pid) => {
                        info!(order, pid, "adopted");
                        adopted.push(order);
                    }
                    Err(e) => {
                        warn!(order, error = %e, "could not restart an adopted order's container")
                    }
                }
            } else {
                info!(order, "no longer leased; releasing");
                self.release(order).await?;
            }
        }
        // Disks whose container is gone (a crash between the two) and whose lease is over.
        let disks = self.inner.config.state_dir.join("disks");
        if let Ok(entries) = std::fs::read_dir(&disks) {
            for e in entries.flatten() {
                let name = e.file_name();
                let Some(order) = name
                    .to_str()
                    .and_then(|n| self.order_of_container_id(n.trim_end_matches(".ext4")))
                else {
                    continue;
                };
                if !known.contains(&order) && !still_leased(order) {
                    self.release(order).await?;
                }
            }
        }
        // Links and rules as the adopted orders need them; what a crash left behind goes.
        let net = self.reconcile_network().await?;
        if net.rules_rewritten || net.orphans_removed > 0 || !net.restored.is_empty() {
            info!(?net, "network reconciled after adoption");
        }
        adopted.sort_unstable();
        Ok(adopted)
    }

    /// The processes' environment for an order, from its container spec (cached).
    pub(crate) async fn order_env(&self, order: u64) -> Result<Arc<Vec<String>>, ProvisionError> {
        if let Some(env) = self
            .inner
            .envs
            .lock()
            .expect("env cache poisoned")
            .get(&order)
        {
            return Ok(env.clone());
        }
        let ctd = &self.inner.ctd;
        let c = match ctd
            .containers()
            .get(ctd.req(GetContainerRequest {
                id: self.container_id(order),
            }))
            .await
        {
            Ok(resp) => resp
                .into_inner()
                .container
                .ok_or(ProvisionError::NotProvisioned { order })?,
            Err(s) if is_not_found(&s) => return Err(ProvisionError::NotProvisioned { order }),
            Err(s) => return Err(ctd.status("look up the order's container", s)),
        };
        let spec: serde_json::Value = c
            .spec
            .as_ref()
            .and_then(|a| serde_json::from_slice(&a.value).ok())
            .unwrap_or_default();
        let env: Vec<String> = spec["process"]["env"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let has_agent = spec["mounts"].as_array().is_some_and(|mounts| {
            mounts
                .iter()
                .any(|m| m["destination"].as_str() == Some(shale_agent::CONTAINER_BINARY))
        });
        let env = Arc::new(env);
        self.inner
            .envs
            .lock()
            .expect("env cache poisoned")
            .insert(order, env.clone());
        self.inner
            .agent_mounted
            .lock()
            .expect("agent cache poisoned")
            .insert(order, has_agent);
        Ok(env)
    }

    /// Whether the order's container was made with the agent bound in (containers made before
    /// the fast path, or with it off, were not).
    pub(crate) async fn order_has_agent(&self, order: u64) -> bool {
        if self.order_env(order).await.is_err() {
            return false;
        }
        self.inner
            .agent_mounted
            .lock()
            .expect("agent cache poisoned")
            .get(&order)
            .copied()
            .unwrap_or(false)
    }

    /// The uid range of the order's container, or `None` when it has none.
    pub(crate) async fn order_id_range(
        &self,
        order: u64,
    ) -> Result<Option<IdRange>, ProvisionError> {
        let ctd = &self.inner.ctd;
        match ctd
            .containers()
            .get(ctd.req(GetContainerRequest {
                id: self.container_id(order),
            }))
            .await
        {
            Ok(resp) => Ok(resp.into_inner().container.as_ref().and_then(id_range_of)),
            Err(s) if is_not_found(&s) => Ok(None),
            Err(s) => Err(ctd.status("look up the order's container", s)),
        }
    }

    /// Host pid of the order's running init, for entering its namespaces.
    pub(crate) async fn task_pid(&self, order: u64) -> Result<u32, ProvisionError> {
        let ctd = &self.inner.ctd;
        match ctd
            .tasks()
            .get(ctd.req(GetRequest {
                container_id: self.container_id(order),
                exec_id: String::new(),
            }))
            .await
        {
            Ok(resp) => {
                let p = resp.into_inner().process.unwrap_or_default();
                if p.status == TaskStatus::Running as i32 && p.pid != 0 {
                    Ok(p.pid)
                } else {
                    Err(ProvisionError::NotProvisioned { order })
                }
            }
            Err(s) if is_not_found(&s) => Err(ProvisionError::NotProvisioned { order }),
            Err(s) => Err(ctd.status("look up the order's task", s)),
        }
    }
}

/// The order number recorded on a container.
pub(crate) fn order_of(c: &Container) -> Option<u64> {
    c.labels.get(LABEL_ORDER)?.parse().ok()
}

/// The user-namespace range recorded on a container.
pub(crate) fn id_range_of(c: &Container) -> Option<IdRange> {
    c.labels
        .get(LABEL_UID_BASE)
        .and_then(|s| s.parse::<u32>().ok())
        .map(IdRange::at)
}

/// The CDI devices recorded on a container.
fn gpus_of(c: &Container) -> Vec<String> {
    c.labels
        .get(LABEL_GPUS)
        .map(|g| g.split(',').map(str::to_string).collect())
        .unwrap_or_default()
}

/// The disk size recorded on a container.
fn disk_bytes_of(c: &Container) -> Option<u64> {
    c.labels.get(LABEL_DISK).and_then(|s| s.parse().ok())
}

/// Signal numbers as containerd wants them (u32).
mod libc_signal {
    pub const SIGTERM: u32 = nix::sys::signal::Signal::SIGTERM as u32;
    pub const SIGKILL: u32 = nix::sys::signal::Signal::SIGKILL as u32;
}
