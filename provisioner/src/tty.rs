//! Terminals for processes the agent starts: opened by us in the container's own `devpts`, so
//! the master never leaves the host and the process sees an ordinary `/dev/pts/N`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::exec::PtySize;

/// `/dev/ptmx`'s device numbers, in every `devpts` instance.
const PTMX_MAJOR: u64 = 5;
const PTMX_MINOR: u64 = 2;

/// A new terminal pair: the master for the gateway, the slave for the process.
pub(crate) struct Pty {
    pub master: OwnedFd,
    pub slave: OwnedFd,
}

/// Opens a terminal in the `devpts` of the container whose process is `pid` (on the host), of
/// `size`, its slave owned by `owner` (host ids) as if the container's user had opened it.
///
/// The path is resolved inside the container's root and follows no symlink, so nothing the
/// tenant put there can point us elsewhere; the result must be that `devpts`'s `ptmx`.
pub(crate) fn open_in(pid: u32, size: PtySize, owner: (u32, u32)) -> io::Result<Pty> {
    let root = nix::fcntl::open(
        format!("/proc/{pid}/root").as_str(),
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let how = OpenHow::new()
        .flags(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
        .resolve(
            ResolveFlag::RESOLVE_IN_ROOT
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        );
    let master = openat2(&root, "dev/pts/ptmx", how)?;
    let fs = nix::sys::statfs::fstatfs(&master)?;
    let st = nix::sys::stat::fstat(&master)?;
    let is_ptmx = fs.filesystem_type() == nix::sys::statfs::DEVPTS_SUPER_MAGIC
        && (st.st_mode & libc::S_IFMT) == libc::S_IFCHR
        && libc::major(st.st_rdev) as u64 == PTMX_MAJOR
        && libc::minor(st.st_rdev) as u64 == PTMX_MINOR;
    if !is_ptmx {
        return Err(io::Error::other(
            "the container's /dev/pts/ptmx is not a terminal multiplexer",
        ));
    }
    let unlock: libc::c_int = 0;
    // SAFETY: ioctls on a descriptor we own, with arguments of the types they take.
    let slave = unsafe {
        if libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) != 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        OwnedFd::from_raw_fd(fd)
    };
    resize(&master, size)?;
    nix::unistd::fchown(
        &slave,
        Some(nix::unistd::Uid::from_raw(owner.0)),
        Some(nix::unistd::Gid::from_raw(owner.1)),
    )?;
    Ok(Pty { master, slave })
}

/// Sets a terminal's size; its foreground process group gets SIGWINCH.
pub(crate) fn resize(master: &impl AsFd, size: PtySize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows.max(1),
        ws_col: size.cols.max(1),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer.
    if unsafe { libc::ioctl(master.as_fd().as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `fd` is a terminal.
pub(crate) fn is_terminal(fd: &impl AsFd) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd.as_fd().as_raw_fd()) == 1 }
}

/// One side of a terminal master, readable or writable without blocking a thread.
pub struct TtyMaster {
    fd: AsyncFd<OwnedFd>,
}

impl TtyMaster {
    /// Takes a master descriptor (set non-blocking here).
    pub(crate) fn new(fd: OwnedFd) -> io::Result<Self> {
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
        // SAFETY: an OwnedFd is a valid descriptor that stays the same until it is dropped,
        // which happens only with (or after `into_inner` of) the AsyncFd.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(Self { fd })
    }

    /// The descriptor, for a broker to hand on.
    pub(crate) fn into_fd(self) -> OwnedFd {
        self.fd.into_inner()
    }
}

impl AsFd for TtyMaster {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

impl AsyncRead for TtyMaster {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard
                .try_io(|fd| nix::unistd::read(fd.get_ref(), unfilled).map_err(io::Error::from))
            {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // Every slave is closed: the terminal's end of file.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Poll::Ready(Ok(())),
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for TtyMaster {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), buf).map_err(io::Error::from))
            {
                Ok(Ok(n)) => return Poll::Ready(Ok(n)),
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the terminal is closed",
                    )))
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
