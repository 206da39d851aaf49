//! Every task the gateway spawns, and the one signal that ends them.
//!
//! Shutdown is one sequence whatever the task: [`Tasks::stop`] cancels the token (the accept
//! loop stops accepting, the watcher, `/metrics` and the per-order checks return, connections
//! begin to drain), closes the tracker and waits, within a bound, for every tracked task to
//! finish. Work that must outlive the signal to be correct (a session's end record, a drained
//! connection) is spawned with [`Tasks::spawn`] and waited for; work that is only useful while
//! the gateway serves is spawned with [`Tasks::spawn_until_stopped`] and dropped at the signal.
//!
//! A leaf: it knows nothing of the gateway's other parts, so any of them may hold one.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The gateway's cancellation token and task tracker. Cheap to clone: clones share both.
#[derive(Clone, Debug, Default)]
pub struct Tasks {
    stopping: CancellationToken,
    tracker: TaskTracker,
}

/// Tasks still running when [`Tasks::stop`]'s bound ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{left} of the gateway's tasks were still running when shutdown stopped waiting")]
pub struct Unfinished {
    /// How many.
    pub left: usize,
}

impl Tasks {
    /// A fresh token and an empty, open tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancelled once the gateway is stopping.
    pub fn stopping(&self) -> &CancellationToken {
        &self.stopping
    }

    /// Whether the gateway is stopping.
    pub fn is_stopping(&self) -> bool {
        self.stopping.is_cancelled()
    }

    /// Runs `task` to its end; shutdown waits for it. For work whose end matters (a drained
    /// connection, a record written after one): it should watch [`Tasks::stopping`] itself if
    /// it may wait long.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// Runs `task` until it ends or the gateway stops, whichever is first; a task dropped at the
    /// signal returns `None`. For loops and probes that only serve while the gateway does.
    pub fn spawn_until_stopped<F>(&self, task: F) -> JoinHandle<Option<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let stopping = self.stopping.clone();
        self.tracker
            .spawn(async move { stopping.run_until_cancelled(task).await })
    }

    /// How many tracked tasks are running.
    pub fn running(&self) -> usize {
        self.tracker.len()
    }

    /// Whether the tracker is closed and every tracked task has finished.
    pub fn finished(&self) -> bool {
        self.tracker.is_closed() && self.tracker.is_empty()
    }

    /// Signals every task to stop, closes the tracker and waits up to `within` for every task
    /// to finish (tasks spawned meanwhile, such as a connection's end record, are waited for
    /// too).
    pub async fn stop(&self, within: Duration) -> Result<(), Unfinished> {
        self.stopping.cancel();
        self.tracker.close();
        match tokio::time::timeout(within, self.tracker.wait()).await {
            Ok(()) => Ok(()),
            Err(_) => Err(Unfinished {
                left: self.tracker.len(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_ends_loops_and_waits_for_work_that_must_finish() {
        let tasks = Tasks::new();
        let looping = tasks.spawn_until_stopped(std::future::pending::<()>());
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let stopping = tasks.stopping().clone();
        // Work that finishes after the signal, as a drained connection's record does.
        tasks.spawn(async move {
            stopping.cancelled().await;
            tokio::task::yield_now().await;
            done_tx.send(()).unwrap();
        });
        assert_eq!(tasks.running(), 2);
        assert!(!tasks.finished());
        tasks.stop(Duration::from_secs(60)).await.unwrap();
        assert!(tasks.finished());
        assert_eq!(looping.await.unwrap(), None);
        done_rx.await.unwrap();
    }

    #[tokio::test]
    async fn a_task_that_ignores_the_signal_is_reported_not_waited_for_forever() {
        let tasks = Tasks::new();
        tasks.spawn(std::future::pending::<()>());
        let left = tasks.stop(Duration::from_millis(10)).await.unwrap_err();
        assert_eq!(left, Unfinished { left: 1 });
        assert!(!tasks.finished());
    }
}
