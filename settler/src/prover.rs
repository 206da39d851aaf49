//! The proving keys and the bounded pool that proves on them.
//!
//! arkworks parallelises proving with rayon. Run on rayon's global pool, a proof would take every
//! core and starve the SSH path; here every proof runs inside a dedicated pool of
//! `worker_threads` threads, entered from a `spawn_blocking` thread so that the async runtime's
//! workers never block on it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shale_circuits::{setup_from_seed, ClaimProof, ProvingKey, TickBatch};

use crate::{SettlerConfig, SettlerError};

/// Proving keys by capacity, and the pool.
#[derive(Clone)]
pub(crate) struct Prover {
    pool: Arc<rayon::ThreadPool>,
    keys: BTreeMap<u32, ProvingKey>,
}

impl std::fmt::Debug for Prover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prover")
            .field("threads", &self.pool.current_num_threads())
            .field("capacities", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Prover {
    /// Builds the pool and loads (or, with a seed, derives) a key per capacity in `wanted`.
    pub(crate) async fn load(config: &SettlerConfig, wanted: &[u32]) -> Result<Self, SettlerError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.worker_threads)
            .thread_name(|i| format!("shale-prover-{i}"))
            .build()
            .map_err(|e| SettlerError::Worker(format!("cannot start the proving pool: {e}")))?;
        let pool = Arc::new(pool);
        let mut keys = BTreeMap::new();
        for &capacity in wanted {
            let key = match (&config.key_dir, config.key_seed) {
                (Some(dir), _) => {
                    let path = dir.join(format!("tick-{capacity}.pk"));
                    if !path.is_file() {
                        tracing::warn!(capacity, path = %path.display(), "no proving key for this capacity; not using it");
                        continue;
                    }
                    run_on(&pool, move || ProvingKey::read(&path)).await??
                }
                (None, Some(seed)) => {
                    run_on(&pool, move || setup_from_seed(capacity as usize, seed))
                        .await??
                        .0
                }
                (None, None) => {
                    return Err(SettlerError::Config(
                        "no proving keys: set settler.key_dir or settler.key_seed".into(),
                    ))
                }
            };
            if key.capacity() != capacity as usize {
                return Err(SettlerError::KeyCapacity {
                    wanted: capacity,
                    found: key.capacity(),
                });
            }
            keys.insert(capacity, key);
        }
        if keys.is_empty() {
            return Err(SettlerError::NoKeys {
                capacities: wanted.to_vec(),
                key_dir: config.key_dir.as_deref().map(Path::to_path_buf),
            });
        }
        tracing::info!(capacities = ?keys.keys().collect::<Vec<_>>(), threads = config.worker_threads, "proving keys ready");
        Ok(Prover { pool, keys })
    }

    /// The capacities there is a key for, ascending.
    pub(crate) fn capacities(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }

    /// The largest batch this settler can prove.
    pub(crate) fn max_capacity(&self) -> usize {
        self.keys.keys().next_back().map_or(0, |c| *c as usize)
    }

    /// The smallest capacity that holds `ticks` ticks.
    pub(crate) fn capacity_for(&self, ticks: usize) -> Option<u32> {
        self.keys.keys().copied().find(|c| *c as usize >= ticks)
    }

    /// Proves `batch` with the key of `capacity` on the pool; returns the proof and the time
    /// the proof itself took (not the wait for a free worker).
    pub(crate) async fn prove(
        &self,
        capacity: u32,
        batch: TickBatch,
    ) -> Result<(ClaimProof, Duration), SettlerError> {
        let key = self
            .keys
            .get(&capacity)
            .cloned()
            .ok_or(SettlerError::KeyCapacity {
                wanted: capacity,
                found: 0,
            })?;
        let (proof, took) = run_on(&self.pool, move || {
            let start = Instant::now();
            let proof = key.prove_with_os_rng(&batch);
            (proof, start.elapsed())
        })
        .await?;
        Ok((proof?, took))
    }
}

/// Runs `job` inside `pool` from a blocking thread, so rayon's parallel loops in it use only the
/// pool's threads and the async runtime is never blocked.
async fn run_on<T: Send + 'static>(
    pool: &Arc<rayon::ThreadPool>,
    job: impl FnOnce() -> T + Send + 'static,
) -> Result<T, SettlerError> {
    let pool = Arc::clone(pool);
    tokio::task::spawn_blocking(move || pool.install(job))
        .await
        .map_err(|e| SettlerError::Worker(format!("a proving job panicked or was cancelled: {e}")))
}
