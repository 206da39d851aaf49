//! The concurrency harness: many interactive sessions at once against the gateway and against
//! sshd, and what the server spends on them.
//!
//! The [`driver`] is the load generator (a russh client, in a process of its own); [`procfs`]
//! reads what the server's processes cost; [`ServerProcs`] says which processes are the server.

pub mod driver;
pub mod procfs;

use procfs::ProcStat;

/// Which processes count as the server under load.
#[derive(Debug, Clone)]
pub enum ServerProcs {
    /// The gateway, running inside this very process (the bench).
    InProcess,
    /// OpenSSH: the listener `root` and every `sshd` process below it (one per connection, plus
    /// privilege-separation children). The sessions' own processes (the shell that became
    /// `cat`) are not the server: [`ServerProcs::session_processes`] lists them apart.
    SshdTree {
        /// The listening sshd.
        root: u32,
    },
}

impl ServerProcs {
    /// The server's processes now.
    pub fn processes(&self) -> Vec<ProcStat> {
        match self {
            Self::InProcess => procfs::stat(procfs::own_pid()).into_iter().collect(),
            Self::SshdTree { root } => procfs::tree(*root)
                .into_iter()
                .filter(|p| p.comm.starts_with("sshd"))
                .collect(),
        }
    }

    /// The processes the sessions run on the server's host and that the server spawned itself
    /// (`cat` under sshd). The gateway's run inside containers, under containerd's shims.
    pub fn session_processes(&self) -> Vec<ProcStat> {
        match self {
            Self::InProcess => Vec::new(),
            Self::SshdTree { root } => procfs::tree(*root)
                .into_iter()
                .filter(|p| !p.comm.starts_with("sshd"))
                .collect(),
        }
    }
}

/// PSS of `procs`, in KiB.
pub fn pss_of(procs: &[ProcStat]) -> u64 {
    procfs::pss_sum_kib(&procs.iter().map(|p| p.pid).collect::<Vec<_>>())
}
