//! `shale-agent SOCKET`: runs inside an order's container, connects to the broker at SOCKET,
//! and starts the processes the broker asks for on the descriptors it sends (see the library's
//! docs). One thread, one `poll` loop: the link and a `signalfd` for SIGCHLD.
//!
//! When the link ends the agent exits; the processes it started keep running (the container's
//! init inherits them), as they would if a shim died.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use shale_agent::{
    decode, encode, truncate, Command, FrameError, Report, Status, MAX_COMMAND, MAX_REASON,
    MAX_REPORT, VERSION,
};

/// PATH for a lookup when the environment has none (runc's default too).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Most descriptors one message may carry.
const MAX_FDS: usize = 3;

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: shale-agent SOCKET");
        std::process::exit(2);
    };
    match run(&path) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("shale-agent: {e}");
            std::process::exit(1);
        }
    }
}

fn run(path: &str) -> io::Result<()> {
    let mut link = UnixStream::connect(path)?;
    let signals = sigchld_fd()?;
    send(&mut link, &Report::Hello { version: VERSION })?;
    let mut agent = Agent {
        link,
        children: HashMap::new(),
        buf: Vec::new(),
        fds: Vec::new(),
    };
    agent.serve(&signals)
}

struct Agent {
    link: UnixStream,
    /// pid → the broker's id.
    children: HashMap<libc::pid_t, u64>,
    /// Bytes received and not yet a whole frame.
    buf: Vec<u8>,
    /// Descriptors received and not yet claimed by a command.
    fds: Vec<OwnedFd>,
}

impl Agent {
    fn serve(&mut self, signals: &OwnedFd) -> io::Result<()> {
        loop {
            let mut polled = [
                libc::pollfd {
                    fd: self.link.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: signals.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfd entries, their count given.
            if unsafe { libc::poll(polled.as_mut_ptr(), 2, -1) } < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if polled[1].revents != 0 {
                drain_signalfd(signals);
                self.reap()?;
            }
            if polled[0].revents != 0 {
                if !self.receive()? {
                    return Ok(());
                }
                while let Some(cmd) = self.next_command()? {
                    self.obey(cmd)?;
                }
            }
        }
    }

    /// Reads what the link has; `false` at its end.
    fn receive(&mut self) -> io::Result<bool> {
        let mut chunk = [0u8; 64 * 1024];
        let (n, fds) = recv_with_fds(self.link.as_raw_fd(), &mut chunk)?;
        self.fds.extend(fds);
        if n == 0 {
            return Ok(false);
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(true)
    }

    /// The next whole command and its descriptors, once they have all arrived.
    fn next_command(&mut self) -> io::Result<Option<(Command, Vec<OwnedFd>)>> {
        // A spawn's frame is followed by one carrier byte, sent with its descriptors.
        let mut probe = self.buf.clone();
        let cmd = match decode::<Command>(&mut probe, MAX_COMMAND) {
            Ok(Some(c)) => c,
            Ok(None) => return Ok(None),
            Err(e @ FrameError::TooLarge { .. }) | Err(e @ FrameError::Malformed(_)) => {
                return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
            }
        };
        let wanted = cmd.descriptors();
        if wanted == 0 {
            self.buf = probe;
            return Ok(Some((cmd, Vec::new())));
        }
        if probe.is_empty() || self.fds.len() < wanted {
            return Ok(None);
        }
        probe.remove(0);
        self.buf = probe;
        let fds = self.fds.drain(..wanted).collect();
        Ok(Some((cmd, fds)))
    }

    fn obey(&mut self, (cmd, fds): (Command, Vec<OwnedFd>)) -> io::Result<()> {
        match cmd {
            Command::Spawn {
                id,
                argv,
                env,
                cwd,
                tty,
            } => {
                let report = match spawn(&argv, &env, &cwd, tty, &fds) {
                    Ok(pid) => {
                        self.children.insert(pid, id);
                        Report::Spawned { id, pid }
                    }
                    Err(reason) => Report::Failed {
                        id,
                        reason: truncate(&reason, MAX_REASON).to_string(),
                    },
                };
                drop(fds);
                send(&mut self.link, &report)
            }
            Command::Signal { id, signal } => {
                if let Some((&pid, _)) = self.children.iter().find(|(_, &i)| i == id) {
                    // SAFETY: kill has no memory effects; a stale pid cannot be reused while
                    // it is our unreaped child.
                    unsafe { libc::kill(pid, signal) };
                }
                Ok(())
            }
        }
    }

    /// Reports every child that has ended.
    fn reap(&mut self) -> io::Result<()> {
        loop {
            let mut status = 0;
            // SAFETY: a plain waitpid into a local.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return Ok(());
            }
            let Some(id) = self.children.remove(&pid) else {
                continue;
            };
            let status = if libc::WIFSIGNALED(status) {
                Status::Signal(libc::WTERMSIG(status))
            } else {
                Status::Code(libc::WEXITSTATUS(status))
            };
            send(&mut self.link, &Report::Exited { id, status })?;
        }
    }
}

fn send(link: &mut UnixStream, report: &Report) -> io::Result<()> {
    let frame = encode(report, MAX_REPORT)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    link.write_all(&frame)
}

/// SIGCHLD, blocked and readable as a descriptor.
fn sigchld_fd() -> io::Result<OwnedFd> {
    // SAFETY: sigset operations on a local set; signalfd returns a new descriptor or -1.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

fn drain_signalfd(fd: &OwnedFd) {
    let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>() * 8];
    // SAFETY: reads into a local buffer of the given size; the descriptor is non-blocking.
    while unsafe { libc::read(fd.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) } > 0 {}
}

/// One `recvmsg`: bytes into `buf`, and any descriptors that came with them (close-on-exec).
fn recv_with_fds(sock: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    // SAFETY: msghdr and its control buffer are locals sized for MAX_FDS descriptors; the kernel
    // writes at most msg_controllen bytes, and every descriptor it installs is taken as owned.
    unsafe {
        let space = libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) as usize;
        let mut control = vec![0u8; space];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        let n = loop {
            let n = libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC);
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        let mut fds = Vec::new();
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        Ok((n, fds))
    }
}

/// Where a child failed before its program ran: sent up a close-on-exec pipe.
#[repr(u8)]
#[derive(Clone, Copy)]
enum Stage {
    Stdio = 1,
    Terminal = 2,
    Cwd = 3,
    Exec = 4,
}

/// Forks and execs `argv` on `fds`; the pid, or why it could not start (`sh: not found`-style
/// reasons, as the runtime would give).
fn spawn(
    argv: &[String],
    env: &[String],
    cwd: &str,
    tty: bool,
    fds: &[OwnedFd],
) -> Result<libc::pid_t, String> {
    let Some(program) = argv.first() else {
        return Err("no command given".into());
    };
    let cstr = |s: &str| CString::new(s).map_err(|_| format!("{s:?} contains a NUL byte"));
    let args: Vec<CString> = argv.iter().map(|a| cstr(a)).collect::<Result<_, _>>()?;
    let envs: Vec<CString> = env.iter().map(|e| cstr(e)).collect::<Result<_, _>>()?;
    let cwd_c = cstr(cwd)?;
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    let candidates: Vec<CString> = if program.contains('/') {
        vec![cstr(program)?]
    } else {
        path.split(':')
            .filter(|d| !d.is_empty())
            .map(|d| cstr(&format!("{d}/{program}")))
            .collect::<Result<_, _>>()?
    };
    let mut arg_ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    arg_ptrs.push(std::ptr::null());
    let mut env_ptrs: Vec<*const libc::c_char> = envs.iter().map(|e| e.as_ptr()).collect();
    env_ptrs.push(std::ptr::null());
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();

    let mut report = [0 as RawFd; 2];
    // SAFETY: a local two-element array for pipe2.
    if unsafe { libc::pipe2(report.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("cannot start: {}", io::Error::last_os_error()));
    }
    // SAFETY: this process is single-threaded, so the child may run any code; it only uses
    // what was prepared above and ends in execve or _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        let e = io::Error::last_os_error();
        // SAFETY: closing our own pipe.
        unsafe {
            libc::close(report[0]);
            libc::close(report[1]);
        }
        return Err(format!("cannot start: {e}"));
    }
    if pid == 0 {
        // SAFETY: in the child, before exec: resets and dup2s on descriptors we own.
        unsafe {
            child(
                &raw,
                tty,
                &cwd_c,
                &candidates,
                &arg_ptrs,
                &env_ptrs,
                report[1],
            )
        }
    }
    // SAFETY: our end of the report pipe; the child's write end is closed here first.
    unsafe { libc::close(report[1]) };
    let mut got = [0u8; 5];
    let mut n = 0;
    while n < got.len() {
        // SAFETY: reads into the rest of a local buffer.
        let r = unsafe { libc::read(report[0], got[n..].as_mut_ptr().cast(), got.len() - n) };
        if r > 0 {
            n += r as usize;
        } else if r == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            break;
        }
    }
    // SAFETY: closing our read end.
    unsafe { libc::close(report[0]) };
    if n == 0 {
        return Ok(pid);
    }
    // The child failed and exits; reap it here so it is not reported as a process.
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let errno = i32::from_ne_bytes([got[1], got[2], got[3], got[4]]);
    let e = io::Error::from_raw_os_error(errno);
    Err(match got[0] {
        s if s == Stage::Cwd as u8 => format!("cannot enter {cwd}: {e}"),
        s if s == Stage::Exec as u8 && e.kind() == io::ErrorKind::NotFound => {
            format!("{program}: command not found")
        }
        s if s == Stage::Exec as u8 => format!("cannot run {program}: {e}"),
        s if s == Stage::Terminal as u8 => format!("cannot set up the terminal: {e}"),
        _ => format!("cannot set up the process's stdio: {e}"),
    })
}

/// The child's side of [`spawn`]: never returns.
///
/// # Safety
/// Only in a child of a single-threaded process, right after `fork`.
unsafe fn child(
    fds: &[RawFd],
    tty: bool,
    cwd: &CString,
    candidates: &[CString],
    argv: &[*const libc::c_char],
    env: &[*const libc::c_char],
    report: RawFd,
) -> ! {
    let fail = |stage: Stage| -> ! {
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let mut msg = [0u8; 5];
        msg[0] = stage as u8;
        msg[1..].copy_from_slice(&errno.to_ne_bytes());
        libc::write(report, msg.as_ptr().cast(), msg.len());
        libc::_exit(127);
    };
    // The process starts as a login would: default signal dispositions (Rust ignores SIGPIPE),
    // nothing blocked, a session of its own.
    for sig in 1..libc::SIGRTMAX() {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
    let mut empty: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut empty);
    libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    libc::setsid();
    if tty {
        if libc::ioctl(fds[0], libc::TIOCSCTTY, 0) != 0 {
            fail(Stage::Terminal);
        }
        for target in 0..3 {
            if libc::dup2(fds[0], target) < 0 {
                fail(Stage::Stdio);
            }
        }
    } else {
        // dup2 onto 0..2 may overwrite a source still to be copied: move them above 2 first.
        let mut high = [0; 3];
        for (i, &fd) in fds.iter().enumerate() {
            high[i] = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3);
            if high[i] < 0 {
                fail(Stage::Stdio);
            }
        }
        for (target, &fd) in high.iter().enumerate() {
            if libc::dup2(fd, target as RawFd) < 0 {
                fail(Stage::Stdio);
            }
        }
    }
    if libc::chdir(cwd.as_ptr()) != 0 {
        fail(Stage::Cwd);
    }
    let mut last = libc::ENOENT;
    for path in candidates {
        libc::execve(path.as_ptr(), argv.as_ptr(), env.as_ptr());
        let e = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        // As execvp: a permission problem is remembered, a missing file tries the next one.
        if e != libc::ENOENT && e != libc::ENOTDIR {
            last = e;
        }
    }
    *libc::__errno_location() = last;
    fail(Stage::Exec)
}
