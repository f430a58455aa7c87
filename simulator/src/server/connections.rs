//! The server's open connections, so a test can wait for a killed client's last requests.
//!
//! A client killed with SIGKILL may leave a request the server has received and not yet answered
//! (or a connection still waiting in the accept queue with a request in it): answered after the
//! test has changed the server (cleared a fault, say), it lands as if the dead process had sent
//! it then. [`Connections::quiesce`] is the barrier: it returns once every connection open — or
//! queued — when it was called has closed, so nothing a dead client sent is still to be served.

use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The peers of the connections open now.
#[derive(Debug, Clone)]
pub struct Connections {
    open: watch::Sender<BTreeSet<SocketAddr>>,
}

impl Default for Connections {
    fn default() -> Self {
        Connections { open: watch::Sender::new(BTreeSet::new()) }
    }
}

impl Connections {
    /// Waits until every connection open or waiting to be accepted by `addr`'s listener when
    /// called has closed. A probe connection is queued behind any waiting ones (the kernel's
    /// accept queue is first in, first out): once it is accepted, every earlier one has been, and
    /// the open set then is what must close. Connections opened after the call are not waited
    /// for; a client that keeps one open (a live watch) holds this until it lets go.
    pub async fn quiesce(&self, addr: SocketAddr) -> io::Result<()> {
        let mut rx = self.open.subscribe();
        let probe = TcpStream::connect(addr).await?;
        let me = probe.local_addr()?;
        let before: BTreeSet<SocketAddr> = {
            let open = rx.wait_for(|open| open.contains(&me)).await.map_err(io::Error::other)?;
            open.iter().copied().filter(|a| *a != me).collect()
        };
        drop(probe);
        rx.wait_for(|open| open.is_disjoint(&before)).await.map_err(io::Error::other)?;
        Ok(())
    }

    fn opened(&self, peer: SocketAddr) {
        self.open.send_modify(|open| {
            open.insert(peer);
        });
    }

    fn closed(&self, peer: SocketAddr) {
        self.open.send_modify(|open| {
            open.remove(&peer);
        });
    }
}

/// A TCP listener whose accepted streams are counted in [`Connections`] until dropped.
pub struct CountedListener {
    pub inner: TcpListener,
    pub connections: Connections,
}

impl axum::serve::Listener for CountedListener {
    type Io = CountedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (stream, peer) = axum::serve::Listener::accept(&mut self.inner).await;
        self.connections.opened(peer);
        (CountedStream { inner: stream, peer, connections: self.connections.clone() }, peer)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// An accepted stream, struck off [`Connections`] when the server drops it.
pub struct CountedStream {
    inner: TcpStream,
    peer: SocketAddr,
    connections: Connections,
}

impl Drop for CountedStream {
    fn drop(&mut self) {
        self.connections.closed(self.peer);
    }
}

impl AsyncRead for CountedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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
}
