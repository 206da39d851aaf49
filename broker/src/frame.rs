//! Frames on the broker's socket: a 4-byte big-endian length and a JSON document, and file
//! descriptors passed beside them (`SCM_RIGHTS`) on a one-byte message of their own.

use std::io;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub use shale_provisioner::fds::{recv_fds, send_fds, MAX_FDS};

use crate::protocol::MAX_FRAME;

/// Writes `value` as one frame.
pub async fn write_frame<T: Serialize>(
    w: &mut (impl AsyncWrite + Unpin),
    value: &T,
) -> io::Result<()> {
    let body = serde_json::to_vec(value).map_err(io::Error::other)?;
    if body.len() > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a {}-byte frame is over the {MAX_FRAME}-byte cap",
                body.len()
            ),
        ));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame).await?;
    w.flush().await
}

/// Reads one frame: `None` at a clean end of the stream before a frame begins. A frame over
/// [`MAX_FRAME`] or one that does not parse as `T` is an error; the caller ends the connection.
pub async fn read_frame<T: DeserializeOwned>(
    r: &mut (impl AsyncRead + Unpin),
) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a {len}-byte frame is over the {MAX_FRAME}-byte cap"),
        ));
    }
    // Exactly the frame's bytes: a descriptor message right behind it must not be read here,
    // or the kernel would drop its descriptors.
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use tokio::net::UnixStream;

    #[tokio::test]
    async fn frames_and_descriptors_arrive_in_order() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        let mut a = a;
        write_frame(&mut a, &"hello".to_string()).await.unwrap();
        send_fds(&a, &[file.as_fd()]).await.unwrap();
        write_frame(&mut a, &7u32).await.unwrap();
        let s: String = read_frame(&mut b).await.unwrap().unwrap();
        assert_eq!(s, "hello");
        let fds = recv_fds(&b, 1).await.unwrap();
        let got = nix::sys::stat::fstat(&fds[0]).unwrap();
        let want = nix::sys::stat::fstat(&file).unwrap();
        assert_eq!((got.st_dev, got.st_ino), (want.st_dev, want.st_ino));
        let n: u32 = read_frame(&mut b).await.unwrap().unwrap();
        assert_eq!(n, 7);
        drop(a);
        assert!(read_frame::<u32>(&mut b).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused_before_it_is_read() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(&(u32::MAX).to_be_bytes()).await.unwrap();
        let e = read_frame::<String>(&mut b).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn the_wrong_number_of_descriptors_is_an_error() {
        let (a, b) = UnixStream::pair().unwrap();
        let (f1, f2) = (tempfile::tempfile().unwrap(), tempfile::tempfile().unwrap());
        send_fds(&a, &[f1.as_fd(), f2.as_fd()]).await.unwrap();
        let e = recv_fds(&b, 1).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }
}
