//! Write coalescing above TLS: a gRPC request's frames share TLS records and system
//! calls.
//!
//! tokio-rustls seals and sends a record for every `poll_write`. hyper's h2 client
//! sends a request's HEADERS from the caller's task and its body from a task of its
//! own, and the connection flushes whatever it has each time it runs: every
//! AppendEntries went out as three records (HEADERS, DATA, the empty DATA that ends
//! the stream) in three `writev` calls, each a wake-up of the peer. Here writes are
//! buffered until a flush, and a flush first yields once, so that the tasks already
//! woken (the body's) add their frames to the same record: a heartbeat is one record,
//! an entry's request two (h2 flushes a payload over 256 bytes on its own before it
//! takes the frame that ends the stream, and that flush spends the yield).
//!
//! h2 flushes whenever it has written what it has (`FramedWrite::flush`), so nothing
//! waits in the buffer beyond the one yield.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, BufWriter, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::Connected;

/// Bytes buffered before a write goes through to TLS without waiting for the flush:
/// a full TLS record's worth of plaintext.
const WRITE_BUFFER: usize = 16 * 1024;

/// A stream whose writes reach the inner stream only on flush (or when the buffer
/// fills); reads pass straight through.
#[derive(Debug)]
pub struct Coalesced<S> {
    inner: BufWriter<S>,
    /// The pending flush has yielded once already.
    yielded: bool,
}

impl<S: AsyncWrite> Coalesced<S> {
    /// Buffer the writes to `inner`.
    pub fn new(inner: S) -> Self {
        Coalesced {
            inner: BufWriter::with_capacity(WRITE_BUFFER, inner),
            yielded: false,
        }
    }

    /// The inner stream.
    pub fn get_ref(&self) -> &S {
        self.inner.get_ref()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Coalesced<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesced<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.inner.buffer().is_empty() && !self.yielded {
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let flushed = Pin::new(&mut self.inner).poll_flush(cx);
        if flushed.is_ready() {
            self.yielded = false;
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// tonic learns the peer (and its certificate, for the pin guard) from the TLS stream.
impl Connected for Coalesced<tokio_rustls::server::TlsStream<TcpStream>> {
    type ConnectInfo = <tokio_rustls::server::TlsStream<TcpStream> as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.get_ref().connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Counts the writes that reach it.
    #[derive(Default)]
    struct Sink {
        writes: usize,
        bytes: Vec<u8>,
    }

    impl AsyncWrite for Sink {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes += 1;
            self.bytes.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn writes_reach_the_stream_together_at_the_flush() {
        let mut s = Coalesced::new(Sink::default());
        s.write_all(b"headers").await.unwrap();
        s.write_all(&[7u8; 1200]).await.unwrap();
        s.write_all(b"end").await.unwrap();
        assert_eq!(s.get_ref().writes, 0, "nothing goes out before the flush");
        s.flush().await.unwrap();
        assert_eq!(s.get_ref().writes, 1);
        assert_eq!(s.get_ref().bytes.len(), 7 + 1200 + 3);
    }

    #[tokio::test]
    async fn reads_pass_through() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut s = Coalesced::new(a);
        b.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        s.write_all(b"pong").await.unwrap();
        s.flush().await.unwrap();
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
    }
}
