//! [`Metered`]: an `AsyncRead + AsyncWrite` wrapper that counts the bytes passing through it.
//!
//! The gateway wraps the stream at one end of a channel pump instead of calling the meter from
//! protocol code. Counting is one relaxed atomic add per completed read or write on the
//! channel's own [`ChannelCounter`]; the data is neither copied nor buffered.
//!
//! Wrap exactly one end of each pump: a byte is read from one end and written to the other, so
//! wrapping both would count it twice.

use crate::counter::ChannelCounter;
use pin_project_lite::pin_project;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Which end of the pump the wrapped stream is, which decides what "in" and "out" mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client's end (e.g. the SSH channel stream): reads are bytes in, writes are bytes out.
    Client,
    /// The container's end (e.g. an exec's stdio): reads are bytes out, writes are bytes in.
    Container,
}

pin_project! {
    /// A stream whose traffic is counted on a [`ChannelCounter`].
    #[derive(Debug)]
    pub struct Metered<S> {
        #[pin]
        inner: S,
        counter: Arc<ChannelCounter>,
        side: Side,
    }
}

impl<S> Metered<S> {
    /// Wraps `inner`, counting onto `counter` as seen from `side`.
    pub fn new(inner: S, counter: Arc<ChannelCounter>, side: Side) -> Self {
        Metered {
            inner,
            counter,
            side,
        }
    }

    /// The counter this stream counts onto.
    pub fn counter(&self) -> &Arc<ChannelCounter> {
        &self.counter
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped stream, mutably (bytes moved through it directly are not counted).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the stream.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

#[inline]
fn count_read(counter: &ChannelCounter, side: Side, n: usize) {
    match side {
        Side::Client => counter.add_in(n as u64),
        Side::Container => counter.add_out(n as u64),
    }
}

#[inline]
fn count_written(counter: &ChannelCounter, side: Side, n: usize) {
    match side {
        Side::Client => counter.add_out(n as u64),
        Side::Container => counter.add_in(n as u64),
    }
}

impl<S: AsyncRead> AsyncRead for Metered<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let res = this.inner.poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            let n = buf.filled().len() - before;
            if n > 0 {
                count_read(this.counter, *this.side, n);
            }
        }
        res
    }
}

impl<S: AsyncWrite> AsyncWrite for Metered<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let res = this.inner.poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            count_written(this.counter, *this.side, n);
        }
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let res = this.inner.poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = res {
            count_written(this.counter, *this.side, n);
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counter::{ByteCount, OrderCounter};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_bidirectional_pump_with_the_client_end_metered_counts_both_directions() {
        let order = OrderCounter::default();
        let session = order.open_session();
        let channel = session.open_channel();

        // client <-> (client_end | pump | container_end) <-> container
        let (client, client_end) = tokio::io::duplex(4096);
        let (container_end, container) = tokio::io::duplex(4096);
        let mut client_end = Metered::new(client_end, Arc::clone(&channel), Side::Client);
        // Only one end of a pump is wrapped: wrapping both would count each byte twice.
        let mut container_end = container_end;
        let pump = tokio::spawn(async move {
            tokio::io::copy_bidirectional(&mut client_end, &mut container_end).await
        });

        let (mut client_rd, mut client_wr) = tokio::io::split(client);
        let (mut cont_rd, mut cont_wr) = tokio::io::split(container);
        let upload = vec![7u8; 100_000];
        let download = vec![9u8; 250_001];
        let up = tokio::spawn(async move {
            client_wr.write_all(&upload).await.unwrap();
            client_wr.shutdown().await.unwrap();
        });
        let down = tokio::spawn(async move {
            cont_wr.write_all(&download).await.unwrap();
            cont_wr.shutdown().await.unwrap();
        });
        let mut got_up = Vec::new();
        let mut got_down = Vec::new();
        cont_rd.read_to_end(&mut got_up).await.unwrap();
        client_rd.read_to_end(&mut got_down).await.unwrap();
        up.await.unwrap();
        down.await.unwrap();
        let (a_to_b, b_to_a) = pump.await.unwrap().unwrap();
        assert_eq!((a_to_b, b_to_a), (100_000, 250_001));
        assert_eq!(got_up.len(), 100_000);
        assert_eq!(got_down.len(), 250_001);

        let seen = channel.bytes();
        assert_eq!(
            seen,
            ByteCount {
                bytes_in: 100_000,
                bytes_out: 250_001
            }
        );
        drop(channel);
        assert_eq!(order.bytes(), seen);
    }

    #[tokio::test]
    async fn wrapping_one_end_counts_each_byte_exactly_once() {
        let counter = Arc::new(ChannelCounter::default());
        let (near, mut far) = tokio::io::duplex(64);
        let mut near = Metered::new(near, Arc::clone(&counter), Side::Container);
        near.write_all(b"hello").await.unwrap();
        far.write_all(b"world!!").await.unwrap();
        let mut buf = [0u8; 7];
        near.read_exact(&mut buf).await.unwrap();
        let mut got = [0u8; 5];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        assert_eq!(
            counter.bytes(),
            ByteCount {
                bytes_in: 5,
                bytes_out: 7
            }
        );
    }
}
