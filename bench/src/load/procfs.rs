//! What `/proc` says a set of processes costs: proportional memory and CPU time.
//!
//! Memory is anonymous PSS (proportional set size, `Pss_Anon` + `Pss_Shmem` in
//! `/proc/PID/smaps_rollup`): pages shared between forked sshd processes are split among them
//! instead of counted once per process, so a sum over processes is the memory they really hold.
//! Code and mapped files are left out: their share moves whenever another process maps the same
//! file (the load generator is this very binary), and no session adds any.

use std::collections::BTreeMap;
use std::fs;

/// The pid of this process (the bench, which also runs the gateway in-process).
pub fn own_pid() -> u32 {
    std::process::id()
}

/// Anonymous PSS of `pid` in KiB, `None` if the process is gone or unreadable.
pub fn pss_kib(pid: u32) -> Option<u64> {
    let rollup = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| -> Option<u64> {
        rollup
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    Some(field("Pss_Anon:")? + field("Pss_Shmem:").unwrap_or(0))
}

/// Summed PSS of `pids` in KiB.
pub fn pss_sum_kib(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|&p| pss_kib(p)).sum()
}

/// One line of `/proc/PID/stat`, the fields this module uses.
#[derive(Debug, Clone)]
pub struct ProcStat {
    /// The process id.
    pub pid: u32,
    /// The executable's name (truncated to 15 bytes by the kernel).
    pub comm: String,
    /// The parent's pid.
    pub ppid: u32,
    /// User plus system CPU time, in clock ticks.
    pub cpu_ticks: u64,
}

/// Reads `/proc/PID/stat`.
pub fn stat(pid: u32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name sits in parentheses and may itself hold spaces or parentheses.
    let (open, close) = (text.find('(')?, text.rfind(')')?);
    let comm = text[open + 1..close].to_string();
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // `rest[0]` is field 3 (state): ppid is field 4, utime 14, stime 15.
    let ppid = rest.get(1)?.parse().ok()?;
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some(ProcStat {
        pid,
        comm,
        ppid,
        cpu_ticks: utime + stime,
    })
}

/// Every process now running.
pub fn all() -> Vec<ProcStat> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(stat)
        .collect()
}

/// `root` and every process below it.
pub fn tree(root: u32) -> Vec<ProcStat> {
    let procs = all();
    let mut children: BTreeMap<u32, Vec<&ProcStat>> = BTreeMap::new();
    for p in &procs {
        children.entry(p.ppid).or_default().push(p);
    }
    let mut out: Vec<ProcStat> = procs.iter().filter(|p| p.pid == root).cloned().collect();
    let mut i = 0;
    while i < out.len() {
        let pid = out[i].pid;
        out.extend(
            children
                .get(&pid)
                .into_iter()
                .flatten()
                .map(|p| (*p).clone()),
        );
        i += 1;
    }
    out
}

/// Processes whose command line holds every one of `needles` (arguments, NUL-separated).
pub fn with_cmdline(comm: &str, needles: &[&str]) -> Vec<ProcStat> {
    all()
        .into_iter()
        .filter(|p| p.comm == comm)
        .filter(|p| {
            fs::read(format!("/proc/{}/cmdline", p.pid)).is_ok_and(|raw| {
                let args: Vec<&[u8]> = raw.split(|&b| b == 0).collect();
                needles.iter().all(|n| args.contains(&n.as_bytes()))
            })
        })
        .collect()
}

/// CPU ticks per process, to subtract a later reading from.
pub type CpuSnapshot = BTreeMap<u32, u64>;

/// The CPU ticks of `procs` now.
pub fn cpu_snapshot(procs: &[ProcStat]) -> CpuSnapshot {
    procs.iter().map(|p| (p.pid, p.cpu_ticks)).collect()
}

/// CPU seconds `after` used since `before` (a process new in `after` counts whole).
pub fn cpu_secs_between(before: &CpuSnapshot, after: &CpuSnapshot) -> f64 {
    let ticks: u64 = after
        .iter()
        .map(|(pid, t)| t.saturating_sub(before.get(pid).copied().unwrap_or(0)))
        .sum();
    ticks as f64 / ticks_per_second()
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// Raises this process's open-file limit to its hard limit: a thousand connections, each with a
/// socket and (in the gateway) the pipes of a process in a container, pass the usual 1,024.
pub fn raise_open_files() -> anyhow::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit to fill and then to read.
    unsafe {
        anyhow::ensure!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0,
            "getrlimit: {}",
            std::io::Error::last_os_error()
        );
        lim.rlim_cur = lim.rlim_max;
        anyhow::ensure!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0,
            "setrlimit: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(lim.rlim_cur)
}

/// Hands memory that is free in the allocator back to the kernel, so that a baseline taken
/// after an earlier, larger run does not hide the next run's growth in recycled pages.
pub fn release_free_heap() {
    // SAFETY: malloc_trim only walks glibc's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = stat(own_pid()).expect("own stat");
        assert_eq!(me.pid, own_pid());
        assert!(pss_kib(own_pid()).expect("own pss") > 0);
        assert!(tree(me.ppid).iter().any(|p| p.pid == own_pid()));
    }

    #[test]
    fn cpu_deltas_count_new_processes_whole() {
        let before = CpuSnapshot::from([(1, 100), (2, 50)]);
        let after = CpuSnapshot::from([(1, 150), (3, 10)]);
        let secs = cpu_secs_between(&before, &after);
        assert!((secs - 60.0 / ticks_per_second()).abs() < 1e-9);
    }
}
