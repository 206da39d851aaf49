//! Descriptors passed over a unix socket (`SCM_RIGHTS`), each batch on a one-byte message of
//! its own, so that a reader of plain bytes beside it never swallows them.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use tokio::io::Interest;
use tokio::net::UnixStream;

/// The most descriptors one message may carry (an exec's stdin, stdout and stderr).
pub const MAX_FDS: usize = 3;

/// Sends `fds` on one one-byte message.
pub async fn send_fds(stream: &UnixStream, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    loop {
        stream.writable().await?;
        let sent = stream.try_io(Interest::WRITABLE, || {
            let cmsg = [ControlMessage::ScmRights(&raw)];
            sendmsg::<()>(
                stream.as_raw_fd(),
                &[IoSlice::new(&[0u8])],
                &cmsg,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        });
        match sent {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Receives the descriptors of one message sent by [`send_fds`]: exactly `count` of them, or an
/// error (every descriptor received is closed then, so a hostile sender leaks nothing here).
pub async fn recv_fds(stream: &UnixStream, count: usize) -> io::Result<Vec<OwnedFd>> {
    assert!(
        count <= MAX_FDS,
        "at most {MAX_FDS} descriptors per message"
    );
    loop {
        stream.readable().await?;
        let got = stream.try_io(Interest::READABLE, || {
            let mut byte = [0u8; 1];
            let mut iov = [IoSliceMut::new(&mut byte)];
            let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
            let msg = recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(io::Error::from)?;
            let mut fds = Vec::new();
            for cmsg in msg.cmsgs().map_err(io::Error::from)? {
                if let ControlMessageOwned::ScmRights(raw) = cmsg {
                    // SAFETY: the kernel installed these descriptors for us just now; nothing
                    // else owns them.
                    fds.extend(
                        raw.into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
            if msg.bytes == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the connection ended before its descriptors",
                ));
            }
            if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "more descriptors than expected",
                ));
            }
            Ok(fds)
        });
        match got {
            Ok(fds) if fds.len() == count => return Ok(fds),
            Ok(fds) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} descriptors where {count} were expected", fds.len()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}
