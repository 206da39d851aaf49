//! What the chain allows: the broker's own check of every order the SSH process names.
//!
//! The SSH process may be compromised, and it alone saw the client's signature (russh verifies
//! it internally and hands the gateway only the public key), so the broker cannot tell which
//! client is behind a request. What it can tell is what the chain allows for the order named: a
//! container only for a live order of this provider, shaped exactly as its terms say (no more
//! CPUs, memory, GPUs, disk or time than were paid for, only its own dataset), processes and
//! dials only into a live order's container, and an order's disk destroyed only once the chain
//! says the order is over. A compromised SSH process can then do no more than serve the
//! provider's live orders wrongly; it cannot mint containers, outlive leases or wipe a live
//! order's work.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use futures::future::BoxFuture;
use shale_provisioner::LeaseSpec;

/// What the chain says of an order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Standing {
    /// The order is live for this provider; its container is shaped by this spec.
    Live(LeaseSpec),
    /// The order may not run (unknown, another provider's, not accepted, ended...): why.
    NotLive(String),
}

/// The chain could not be asked.
#[derive(Debug, thiserror::Error)]
#[error("cannot read order {order} on chain: {reason}")]
pub struct AdmissionError {
    /// The order asked about.
    pub order: u64,
    /// Why the chain gave no answer.
    pub reason: String,
}

/// Reads an order's standing from the chain; the broker's only source of truth about orders.
pub trait Admission: Send + Sync + 'static {
    /// The order's standing now.
    fn standing(&self, order: u64) -> BoxFuture<'_, Result<Standing, AdmissionError>>;
}

/// A standing read recently enough to serve again without a chain call.
const FRESH: Duration = Duration::from_secs(15);

/// Caches the chain's answers: a live standing serves for [`FRESH`], and while the chain is
/// unreachable, for up to `stale_max` (the gateway's own bound on serving cached orders during an
/// outage), so live sessions continue through an RPC outage.
pub(crate) struct Admissions {
    chain: Box<dyn Admission>,
    pub(crate) stale_max: Duration,
    live: Mutex<HashMap<u64, (LeaseSpec, Instant)>>,
}

impl Admissions {
    pub(crate) fn new(chain: Box<dyn Admission>, stale_max: Duration) -> Self {
        Self {
            chain,
            stale_max,
            live: Mutex::new(HashMap::new()),
        }
    }

    /// The order's standing, from the cache when fresh or when the chain cannot be reached and
    /// the cached answer is within the stale bound.
    async fn standing(&self, order: u64) -> Result<Standing, AdmissionError> {
        let cached = self.live.lock().expect("admissions").get(&order).cloned();
        if let Some((spec, at)) = &cached {
            if at.elapsed() < FRESH {
                return Ok(Standing::Live(spec.clone()));
            }
        }
        self.ask_chain(order, cached).await
    }

    /// The chain's answer now, remembered; the cached answer serves while the chain cannot be
    /// reached and it is within the stale bound.
    async fn ask_chain(
        &self,
        order: u64,
        cached: Option<(LeaseSpec, Instant)>,
    ) -> Result<Standing, AdmissionError> {
        match self.chain.standing(order).await {
            Ok(standing) => {
                let mut live = self.live.lock().expect("admissions");
                match &standing {
                    Standing::Live(spec) => {
                        live.insert(order, (spec.clone(), Instant::now()));
                    }
                    Standing::NotLive(_) => {
                        live.remove(&order);
                    }
                }
                // Orders end; their entries must not pile up.
                live.retain(|_, (_, at)| at.elapsed() < self.stale_max);
                Ok(standing)
            }
            Err(e) => match cached {
                Some((spec, at)) if at.elapsed() < self.stale_max => {
                    tracing::debug!(order, error = %e, "chain unreachable: serving its last answer");
                    Ok(Standing::Live(spec))
                }
                _ => Err(e),
            },
        }
    }

    /// A container for `spec` is allowed: the order is live and `spec` is its terms.
    pub(crate) async fn ensure(&self, spec: &LeaseSpec) -> Result<(), String> {
        let allowed = self.live_spec(spec.order).await?;
        differs(spec, &allowed).map_or(Ok(()), |what| {
            Err(format!(
                "order {} asks for {what}: not what the order's terms on chain allow",
                spec.order
            ))
        })
    }

    /// Processes and dials into the order's container are allowed: the order is live.
    pub(crate) async fn enter(&self, order: u64) -> Result<(), String> {
        self.live_spec(order).await.map(|_| ())
    }

    /// The order's disk may be destroyed: the chain says, now, that the order is not live. (A
    /// cached answer would refuse the release of an order that ended a moment ago; an outage
    /// keeps the disk, never destroys it.)
    pub(crate) async fn release(&self, order: u64) -> Result<(), String> {
        match self.ask_chain(order, None).await {
            Ok(Standing::NotLive(_)) => Ok(()),
            Ok(Standing::Live(_)) => Err(format!(
                "order {order} is live on chain: its container and disk are kept"
            )),
            Err(e) => Err(format!(
                "{e}: its container and disk are kept until it answers"
            )),
        }
    }

    async fn live_spec(&self, order: u64) -> Result<LeaseSpec, String> {
        match self.standing(order).await {
            Ok(Standing::Live(spec)) if spec.expires_at > SystemTime::now() => Ok(spec),
            Ok(Standing::Live(_)) => Err(format!("order {order}'s lease has expired")),
            Ok(Standing::NotLive(why)) => Err(format!("order {order} may not run: {why}")),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// The first way `asked` differs from `allowed`, in words; `None` when it is the same lease.
fn differs(asked: &LeaseSpec, allowed: &LeaseSpec) -> Option<String> {
    let mut what = Vec::new();
    if asked.cpus != allowed.cpus {
        what.push(format!("{} CPUs (terms: {})", asked.cpus, allowed.cpus));
    }
    if asked.memory_bytes != allowed.memory_bytes {
        what.push(format!(
            "{} bytes of memory (terms: {})",
            asked.memory_bytes, allowed.memory_bytes
        ));
    }
    if asked.gpus != allowed.gpus {
        what.push(format!("{} GPUs (terms: {})", asked.gpus, allowed.gpus));
    }
    if asked.disk_bytes != allowed.disk_bytes {
        what.push(format!(
            "{} bytes of disk (terms: {})",
            asked.disk_bytes, allowed.disk_bytes
        ));
    }
    if asked.dataset != allowed.dataset {
        what.push(format!(
            "dataset {:?} (terms: {:?})",
            asked.dataset, allowed.dataset
        ));
    }
    if asked.image != allowed.image {
        what.push(format!(
            "image {} (terms: {})",
            asked.image.as_deref().unwrap_or("the default"),
            allowed.image.as_deref().unwrap_or("the default")
        ));
    }
    if asked.image_repository != allowed.image_repository {
        what.push(format!(
            "an image from {} (terms: {})",
            asked.image_repository.as_deref().unwrap_or("the catalog"),
            allowed.image_repository.as_deref().unwrap_or("the catalog")
        ));
    }
    if asked.expires_at > allowed.expires_at {
        what.push("a lease past the order's end".into());
    }
    if asked.pids_limit != allowed.pids_limit {
        what.push(format!(
            "a process limit of {:?} (terms: {:?})",
            asked.pids_limit, allowed.pids_limit
        ));
    }
    (!what.is_empty()).then(|| what.join(", "))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    /// A chain of one live order (1) that can be switched off; counts its reads.
    struct OneOrder {
        reads: Arc<AtomicUsize>,
        down: Arc<AtomicBool>,
    }

    fn spec() -> LeaseSpec {
        LeaseSpec {
            order: 1,
            cpus: 2,
            memory_bytes: 1 << 30,
            gpus: 0,
            dataset: Some("genomes".into()),
            expires_at: SystemTime::now() + Duration::from_secs(3600),
            pids_limit: None,
            disk_bytes: 1 << 30,
            image: Some(format!("sha256:{}", "ab".repeat(32))),
            image_repository: None,
        }
    }

    impl Admission for OneOrder {
        fn standing(&self, order: u64) -> BoxFuture<'_, Result<Standing, AdmissionError>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let down = self.down.load(Ordering::SeqCst);
            Box::pin(async move {
                if down {
                    return Err(AdmissionError {
                        order,
                        reason: "connection refused".into(),
                    });
                }
                Ok(match order {
                    1 => Standing::Live(spec()),
                    _ => Standing::NotLive("no such order".into()),
                })
            })
        }
    }

    fn admissions(stale_max: Duration) -> (Admissions, Arc<AtomicUsize>, Arc<AtomicBool>) {
        let reads = Arc::new(AtomicUsize::new(0));
        let down = Arc::new(AtomicBool::new(false));
        let chain = OneOrder {
            reads: reads.clone(),
            down: down.clone(),
        };
        (Admissions::new(Box::new(chain), stale_max), reads, down)
    }

    #[tokio::test]
    async fn a_container_is_only_what_the_terms_say() {
        let (a, _, _) = admissions(Duration::from_secs(600));
        let mut asked = spec();
        asked.expires_at = spec().expires_at - Duration::from_secs(1);
        assert_eq!(a.ensure(&asked).await, Ok(()));

        let greedy = LeaseSpec {
            cpus: 64,
            gpus: 8,
            ..asked.clone()
        };
        let refused = a.ensure(&greedy).await.unwrap_err();
        assert!(refused.contains("64 CPUs (terms: 2)"), "{refused}");
        assert!(refused.contains("8 GPUs (terms: 0)"), "{refused}");

        let other_data = LeaseSpec {
            dataset: Some("someone-elses".into()),
            ..asked.clone()
        };
        assert!(a.ensure(&other_data).await.unwrap_err().contains("dataset"));

        // The digest pulled from somewhere the terms do not name is not the client's image.
        let own_image = LeaseSpec {
            image_repository: Some("registry.example:5000/me/tools".into()),
            ..asked.clone()
        };
        let refused = a.ensure(&own_image).await.unwrap_err();
        assert!(
            refused.contains("an image from registry.example:5000/me/tools (terms: the catalog)"),
            "{refused}"
        );

        // A default image is not the one the client paid for.
        let other_image = LeaseSpec {
            image: None,
            ..asked.clone()
        };
        let refused = a.ensure(&other_image).await.unwrap_err();
        assert!(
            refused.contains("image the default (terms: sha256:abab"),
            "{refused}"
        );

        let forever = LeaseSpec {
            expires_at: SystemTime::now() + Duration::from_secs(86_400 * 365),
            ..asked
        };
        assert!(a.ensure(&forever).await.unwrap_err().contains("past"));

        let unknown = LeaseSpec { order: 7, ..spec() };
        let refused = a.ensure(&unknown).await.unwrap_err();
        assert!(refused.contains("no such order"), "{refused}");
    }

    #[tokio::test]
    async fn only_live_orders_are_entered_and_only_dead_ones_released() {
        let (a, _, _) = admissions(Duration::from_secs(600));
        assert_eq!(a.enter(1).await, Ok(()));
        assert!(a.enter(2).await.is_err());
        assert!(a.release(1).await.unwrap_err().contains("live on chain"));
        assert_eq!(a.release(2).await, Ok(()));
    }

    #[tokio::test]
    async fn a_release_asks_the_chain_even_with_a_fresh_answer_cached() {
        let (a, reads, _) = admissions(Duration::from_secs(600));
        // A live answer for order 2 (which the chain now says has ended) is cached.
        a.live.lock().unwrap().insert(2, (spec(), Instant::now()));
        assert_eq!(a.release(2).await, Ok(()));
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        assert!(a.enter(2).await.is_err(), "the ended order is forgotten");
    }

    #[tokio::test]
    async fn an_outage_serves_live_orders_within_the_stale_bound_only() {
        let (a, reads, down) = admissions(Duration::from_secs(600));
        a.enter(1).await.unwrap();
        a.enter(1).await.unwrap();
        assert_eq!(reads.load(Ordering::SeqCst), 1, "a fresh answer is reused");

        down.store(true, Ordering::SeqCst);
        // Past freshness, the chain is asked; it is down, so the last answer serves.
        a.live.lock().unwrap().get_mut(&1).unwrap().1 -= FRESH;
        assert_eq!(a.enter(1).await, Ok(()));
        // Never-seen orders are refused with the chain's failure; nothing is released.
        assert!(a.enter(3).await.unwrap_err().contains("connection refused"));
        assert!(a.release(2).await.unwrap_err().contains("kept"));

        let (short, _, down) = admissions(Duration::from_secs(20));
        short.enter(1).await.unwrap();
        down.store(true, Ordering::SeqCst);
        short.live.lock().unwrap().get_mut(&1).unwrap().1 -= Duration::from_secs(21);
        assert!(short.enter(1).await.is_err(), "past the stale bound");
    }
}
