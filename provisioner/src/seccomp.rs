//! The seccomp profile of an order's processes: an allowlist equivalent to containerd's default
//! profile for a process without `CAP_SYS_ADMIN` and the other capabilities an order never holds.
//!
//! Everything not listed is refused with EPERM, so a syscall added to a future kernel is closed
//! until someone decides it is safe. What is left out, and why:
//! - mounts, namespaces, `pivot_root`, `chroot`, `sethostname`: `CAP_SYS_ADMIN`/`CAP_SYS_CHROOT`;
//!   `clone` is allowed only without namespace flags, and `clone3` answers ENOSYS (its flags live
//!   in memory a filter cannot read; libc then falls back to `clone`);
//! - module loading, `kexec`, `reboot`, swap, `acct`, `iopl`/`ioperm`, setting the clock,
//!   `vhangup`, `syslog`, `quotactl`: host-wide, and capability-gated in containerd's profile;
//! - `bpf`, `perf_event_open`, `userfaultfd`, `kcmp`, `pidfd_getfd`, `lookup_dcookie`,
//!   `open_by_handle_at`/`name_to_handle_at`, `fanotify_init`: kernel attack surface or
//!   escape paths that need capabilities an order does not have;
//! - the keyrings (`add_key`, `keyctl`, `request_key`): not namespaced;
//! - NUMA policy (`mbind`, `set_mempolicy`, `get_mempolicy`): `CAP_SYS_NICE` in Docker's profile;
//! - `io_uring_*`: refused by containerd and Docker since its run of kernel exploits;
//! - `socket(AF_VSOCK, ...)`: the host/VM socket family;
//! - obsolete calls (`uselib`, `ustat`, `sysfs`, `_sysctl`, `vm86`, `nfsservctl`, ...).
//!
//! `ptrace` and `process_vm_readv`/`writev` stay allowed, as in containerd's profile on kernels
//! since 4.8: the pid namespace and the uid check confine them to the order's own processes, and
//! users debug their jobs with `gdb` and `strace`.

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompArgBuilder,
    LinuxSeccompBuilder, LinuxSeccompOperator, LinuxSyscallBuilder,
};

use crate::ProvisionError;

/// Syscalls allowed with any arguments. Names libseccomp does not know (other architectures'
/// or newer kernels') are skipped by runc, so the list can cover 32-bit and 64-bit names.
const ALLOWED: &[&str] = &[
    // files and directories
    "access",
    "chdir",
    "chmod",
    "chown",
    "chown32",
    "close",
    "close_range",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fadvise64_64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchown32",
    "fchownat",
    "fcntl",
    "fcntl64",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstat64",
    "fstatat64",
    "fstatfs",
    "fstatfs64",
    "fsync",
    "ftruncate",
    "ftruncate64",
    "futimesat",
    "getcwd",
    "getdents",
    "getdents64",
    "getxattr",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "ioctl",
    "lchown",
    "lchown32",
    "lgetxattr",
    "link",
    "linkat",
    "listxattr",
    "llistxattr",
    "_llseek",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "lstat64",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "newfstatat",
    "open",
    "openat",
    "openat2",
    "pread64",
    "preadv",
    "preadv2",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "removexattr",
    "rename",
    "renameat",
    "renameat2",
    "rmdir",
    "sendfile",
    "sendfile64",
    "setxattr",
    "splice",
    "stat",
    "stat64",
    "statfs",
    "statfs64",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "tee",
    "truncate",
    "truncate64",
    "umask",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimensat_time64",
    "utimes",
    "vmsplice",
    "write",
    "writev",
    // asynchronous I/O and readiness
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "pipe",
    "pipe2",
    "io_cancel",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
    "io_setup",
    "io_submit",
    "_newselect",
    "poll",
    "ppoll",
    "ppoll_time64",
    "pselect6",
    "pselect6_time64",
    "select",
    "signalfd",
    "signalfd4",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    // memory
    "brk",
    "madvise",
    "membarrier",
    "memfd_create",
    "mincore",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mmap2",
    "mprotect",
    "mremap",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "remap_file_pages",
    // processes, threads and signals
    "arch_prctl",
    "capget",
    "capset",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "fork",
    "futex",
    "futex_time64",
    "futex_waitv",
    "get_robust_list",
    "get_thread_area",
    "getcpu",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrlimit",
    "getrusage",
    "getsid",
    "gettid",
    "ioprio_get",
    "ioprio_set",
    "kill",
    "modify_ldt",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "prctl",
    "prlimit64",
    "process_mrelease",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "restart_syscall",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_rr_get_interval_time64",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "set_robust_list",
    "set_thread_area",
    "set_tid_address",
    "setpgid",
    "setpriority",
    "setrlimit",
    "setsid",
    "sigaltstack",
    "sigprocmask",
    "sigreturn",
    "tgkill",
    "tkill",
    "ugetrlimit",
    "vfork",
    "wait4",
    "waitid",
    "waitpid",
    // credentials (the kernel still checks CAP_SETUID/CAP_SETGID)
    "getegid",
    "getegid32",
    "geteuid",
    "geteuid32",
    "getgid",
    "getgid32",
    "getgroups",
    "getgroups32",
    "getresgid",
    "getresgid32",
    "getresuid",
    "getresuid32",
    "getuid",
    "getuid32",
    "setfsgid",
    "setfsgid32",
    "setfsuid",
    "setfsuid32",
    "setgid",
    "setgid32",
    "setgroups",
    "setgroups32",
    "setregid",
    "setregid32",
    "setresgid",
    "setresgid32",
    "setresuid",
    "setresuid32",
    "setreuid",
    "setreuid32",
    "setuid",
    "setuid32",
    // sandboxing a process may impose on itself
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    // sockets (socket(2) itself is below, without AF_VSOCK)
    "accept",
    "accept4",
    "bind",
    "connect",
    "getpeername",
    "getsockname",
    "getsockopt",
    "listen",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmmsg_time64",
    "recvmsg",
    "send",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setsockopt",
    "shutdown",
    "socketcall",
    "socketpair",
    // System V and POSIX IPC (the container has its own ipc namespace)
    "ipc",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_unlink",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    // time (reading it, sleeping, timers)
    "alarm",
    "clock_getres",
    "clock_getres_time64",
    "clock_gettime",
    "clock_gettime64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "getitimer",
    "gettimeofday",
    "nanosleep",
    "setitimer",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    "times",
    // the system, read-only
    "getrandom",
    "sysinfo",
    "uname",
];

/// personality(2) values allowed, as in Docker's profile: PER_LINUX, PER_LINUX32, UNAME26,
/// UNAME26 | PER_LINUX32, and the query.
const PERSONALITIES: [u64; 5] = [0x0, 0x0008, 0x0002_0000, 0x0002_0008, 0xffff_ffff];

/// clone(2) flags that make new namespaces: CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER,
/// NEWPID, NEWNET. New user namespaces in particular would hand back every capability.
const CLONE_NAMESPACE_FLAGS: u64 =
    0x0002_0000 | 0x0200_0000 | 0x0400_0000 | 0x0800_0000 | 0x1000_0000 | 0x2000_0000 | 0x4000_0000;
/// The socket family refused: host/VM sockets.
const AF_VSOCK: u64 = 40;
const EPERM: u32 = 1;
const ENOSYS: u32 = 38;

/// The `linux.seccomp` section of an order container's OCI spec.
pub(crate) fn profile() -> Result<LinuxSeccomp, ProvisionError> {
    let invalid = |e: oci_spec::OciSpecError| {
        ProvisionError::Config(format!("the seccomp profile is invalid: {e}"))
    };
    let names = |list: &[&str]| list.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    let allow = |list: &[&str], args: Vec<LinuxSeccompArg>| {
        let mut rule = LinuxSyscallBuilder::default()
            .names(names(list))
            .action(LinuxSeccompAction::ScmpActAllow);
        if !args.is_empty() {
            rule = rule.args(args);
        }
        rule.build().map_err(invalid)
    };
    let arg = |value: u64, value_two: Option<u64>, op: LinuxSeccompOperator| {
        let mut a = LinuxSeccompArgBuilder::default()
            .index(0usize)
            .value(value)
            .op(op);
        if let Some(v) = value_two {
            a = a.value_two(v);
        }
        a.build().map_err(invalid)
    };
    let mut syscalls = vec![allow(ALLOWED, Vec::new())?];
    for persona in PERSONALITIES {
        syscalls.push(allow(
            &["personality"],
            vec![arg(persona, None, LinuxSeccompOperator::ScmpCmpEq)?],
        )?);
    }
    // Threads and plain forks: no namespace flag set.
    syscalls.push(allow(
        &["clone"],
        vec![arg(
            CLONE_NAMESPACE_FLAGS,
            Some(0),
            LinuxSeccompOperator::ScmpCmpMaskedEq,
        )?],
    )?);
    syscalls.push(allow(
        &["socket"],
        vec![arg(AF_VSOCK, None, LinuxSeccompOperator::ScmpCmpNe)?],
    )?);
    syscalls.push(
        LinuxSyscallBuilder::default()
            .names(names(&["clone3"]))
            .action(LinuxSeccompAction::ScmpActErrno)
            .errno_ret(ENOSYS)
            .build()
            .map_err(invalid)?,
    );
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActErrno)
        .default_errno_ret(EPERM)
        .architectures(vec![
            Arch::ScmpArchX86_64,
            Arch::ScmpArchX86,
            Arch::ScmpArchX32,
        ])
        .syscalls(syscalls)
        .build()
        .map_err(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What containerd's profile refuses to a process without capabilities must not be on the list.
    #[test]
    fn nothing_capability_gated_is_allowed() {
        for refused in [
            "mount",
            "umount2",
            "unshare",
            "setns",
            "pivot_root",
            "chroot",
            "sethostname",
            "setdomainname",
            "init_module",
            "finit_module",
            "delete_module",
            "kexec_load",
            "kexec_file_load",
            "reboot",
            "swapon",
            "acct",
            "bpf",
            "perf_event_open",
            "userfaultfd",
            "keyctl",
            "add_key",
            "request_key",
            "open_by_handle_at",
            "name_to_handle_at",
            "io_uring_setup",
            "kcmp",
            "pidfd_getfd",
            "iopl",
            "ioperm",
            "settimeofday",
            "clock_settime",
            "clock_adjtime",
            "adjtimex",
            "syslog",
            "vhangup",
            "fsopen",
            "move_mount",
            "open_tree",
            "quotactl",
            "mbind",
            "set_mempolicy",
        ] {
            assert!(!ALLOWED.contains(&refused), "{refused} is allowed");
        }
    }

    #[test]
    fn the_list_has_no_duplicates_and_conditional_calls_are_not_on_it() {
        let mut names = ALLOWED.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALLOWED.len());
        for conditional in ["clone", "clone3", "socket", "personality"] {
            assert!(!ALLOWED.contains(&conditional), "{conditional}");
        }
    }

    #[test]
    fn unlisted_calls_are_refused_with_eperm() {
        let p = serde_json::to_value(profile().unwrap()).unwrap();
        assert_eq!(p["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(p["defaultErrnoRet"], EPERM);
        assert_eq!(p["syscalls"][0]["action"], "SCMP_ACT_ALLOW");
        let clone = p["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["names"][0] == "clone")
            .unwrap();
        assert_eq!(clone["args"][0]["op"], "SCMP_CMP_MASKED_EQ");
        assert_eq!(clone["args"][0]["valueTwo"], 0);
    }
}
