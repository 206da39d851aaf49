//! The seccomp filter of the gateway's SSH process, applied after it drops privileges.
//!
//! The SSH process only speaks SSH, reads and writes the ledger and its sockets, and hands
//! everything else to the broker: it never runs a program, never needs a namespace, a mount or
//! a kernel module. A deny list refuses exactly those with EPERM, so that a compromised SSH
//! process cannot exec a shell or reach the kernel's riskier interfaces; everything else is
//! allowed (an allow list would break on the next tokio or glibc release's new syscall).
//! `clone3` answers ENOSYS from a second filter (its flags live in memory a filter cannot read;
//! glibc then falls back to `clone`, whose namespace flags the first filter refuses).

use std::collections::BTreeMap;

use anyhow::Context;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Refused outright.
const DENIED: &[i64] = &[
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_setns,
    libc::SYS_unshare,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_fanotify_init,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_syslog,
];

/// `clone` flags that make a namespace.
const NAMESPACE_FLAGS: [libc::c_int; 7] = [
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWNS,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWCGROUP,
];

fn arch() -> anyhow::Result<TargetArch> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|e| anyhow::anyhow!("no seccomp filter for this architecture: {e:?}"))
}

fn deny_list() -> anyhow::Result<BpfProgram> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|s| (*s, Vec::new())).collect();
    // One rule per flag: a clone with any of them matches.
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|flag| {
            let flag = *flag as u64;
            SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )?])
        })
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_clone, clone_rules);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch()?,
    )?;
    Ok(filter.try_into()?)
}

fn no_clone3() -> anyhow::Result<BpfProgram> {
    let filter = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch()?,
    )?;
    Ok(filter.try_into()?)
}

/// Applies both filters to every thread of this process. Needs `no_new_privs` (set by the
/// privilege drop) and cannot be undone.
pub fn apply() -> anyhow::Result<()> {
    let (deny, clone3) = (deny_list()?, no_clone3()?);
    seccompiler::apply_filter_all_threads(&clone3).context("installing the clone3 filter")?;
    seccompiler::apply_filter_all_threads(&deny).context("installing the seccomp deny list")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_filters_compile_for_this_machine() {
        assert!(!deny_list().unwrap().is_empty());
        assert!(!no_clone3().unwrap().is_empty());
    }

    /// Set in the test's own child, which applies the filter for good.
    const PROBE: &str = "SHALE_SSH_FILTER_PROBE";

    #[test]
    fn a_filtered_process_cannot_exec_but_still_starts_threads() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "ssh_filter::tests::filtered_probe",
                "--nocapture",
            ])
            .env(PROBE, "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("probe: thread 7, exec EPERM, unshare EPERM"),
            "{text}"
        );
    }

    /// Does its work only as the child of the test above.
    #[test]
    fn filtered_probe() {
        if std::env::var_os(PROBE).is_none() {
            return;
        }
        nix::sys::prctl::set_no_new_privs().unwrap();
        apply().unwrap();
        let thread = std::thread::spawn(|| 7).join().unwrap();
        let exec = std::process::Command::new("/bin/true")
            .status()
            .unwrap_err();
        assert_eq!(exec.raw_os_error(), Some(libc::EPERM));
        // SAFETY: unshare only reads its flag argument.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWUSER) }, -1);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EPERM)
        );
        println!("probe: thread {thread}, exec EPERM, unshare EPERM");
    }
}
