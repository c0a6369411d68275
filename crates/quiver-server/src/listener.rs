//! Accepting connections for tonic: TCP options, TLS handshakes off the accept loop.
//!
//! tonic's own `serve_with_shutdown` can neither reload certificates nor enforce TLS 1.3,
//! so Quiver accepts sockets itself and hands tonic finished connections through
//! `serve_with_incoming_shutdown`. On that path tonic ignores its TCP options, so
//! `TCP_NODELAY` is set here. Each TLS handshake runs in its own task with a timeout: a
//! client that opens a socket and stalls cannot hold up anyone else's.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use quiver::flight::auth::PeerInfo;
use quiver::query::spawn;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tonic::transport::server::Connected;

use crate::tls::{self, TlsReloader};

/// Accepted connections waiting for tonic to pick them up.
const ACCEPTED_QUEUE: usize = 64;

/// How long a closing connection keeps reading (and discarding) what the client still
/// sends after Quiver's last byte. Closing a socket with unread input makes the kernel
/// send a reset, and a reset makes the client's kernel drop data it has received but not
/// yet read: the end of the last stream. gRPC clients close their side as soon as they
/// have read the GOAWAY, so this wait is normally one round trip.
const LINGER: Duration = Duration::from_secs(2);

/// A connection handed to tonic: plain TCP or TLS over TCP.
pub struct Conn {
    io: Io,
    /// Set once the write side is shut down: until when to drain the read side.
    linger: Option<Pin<Box<tokio::time::Sleep>>>,
}

enum Io {
    /// Plaintext.
    Plain(TcpStream),
    /// TLS, with the client certificate's subject if any.
    Tls(Box<TlsStream<TcpStream>>, Option<Arc<str>>),
}

impl Conn {
    fn plain(socket: TcpStream) -> Self {
        Self {
            io: Io::Plain(socket),
            linger: None,
        }
    }

    fn tls(stream: TlsStream<TcpStream>, client_subject: Option<Arc<str>>) -> Self {
        Self {
            io: Io::Tls(Box::new(stream), client_subject),
            linger: None,
        }
    }

    fn tcp(&mut self) -> &mut TcpStream {
        match &mut self.io {
            Io::Plain(s) => s,
            Io::Tls(s, _) => s.get_mut().0,
        }
    }

    /// Reads and discards until the client closes, the socket fails or `LINGER` ends.
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut scratch = [0u8; 4096];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(self.tcp()).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(()),
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => {
                    let timer = self.linger.as_mut().expect("lingering");
                    return timer.as_mut().poll(cx);
                }
            }
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        match &self.io {
            Io::Plain(s) => PeerInfo {
                remote_addr: s.peer_addr().ok(),
                client_subject: None,
            },
            Io::Tls(s, subject) => PeerInfo {
                remote_addr: s.get_ref().0.peer_addr().ok(),
                client_subject: subject.clone(),
            },
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s, _) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    /// Shuts the write side down (after TLS's close_notify), then lingers: see `LINGER`.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.linger.is_none() {
            match &mut this.io {
                Io::Plain(s) => ready!(Pin::new(s).poll_shutdown(cx))?,
                Io::Tls(s, _) => ready!(Pin::new(s.as_mut()).poll_shutdown(cx))?,
            }
            this.linger = Some(Box::pin(tokio::time::sleep(LINGER)));
        }
        ready!(this.poll_linger(cx));
        Poll::Ready(Ok(()))
    }
}

/// The accept loop, running until `shutdown`; connections arrive on the returned stream.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<TlsReloader>>,
    handshake_timeout: Duration,
    shutdown: CancellationToken,
) -> (ReceiverStream<io::Result<Conn>>, AbortOnDropHandle<()>) {
    let (tx, rx) = mpsc::channel(ACCEPTED_QUEUE);
    let task = spawn(accept_loop(listener, tls, handshake_timeout, shutdown, tx));
    (ReceiverStream::new(rx), task)
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<Arc<TlsReloader>>,
    handshake_timeout: Duration,
    shutdown: CancellationToken,
    tx: mpsc::Sender<io::Result<Conn>>,
) {
    // Handshakes in flight; dropped (and aborted) with the loop.
    let mut handshakes = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => {
                let (socket, addr) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Small gRPC frames (headers, trailers, pings) must not wait for Nagle.
                if let Err(e) = socket.set_nodelay(true) {
                    tracing::debug!(error = %e, %addr, "TCP_NODELAY failed");
                }
                match &tls {
                    None => {
                        if tx.send(Ok(Conn::plain(socket))).await.is_err() {
                            return;
                        }
                    }
                    Some(tls) => {
                        let acceptor = tls.acceptor();
                        handshakes.spawn(async move {
                            match tokio::time::timeout(handshake_timeout, acceptor.accept(socket)).await {
                                Ok(Ok(stream)) => {
                                    let subject = stream
                                        .get_ref()
                                        .1
                                        .peer_certificates()
                                        .and_then(|c| c.first())
                                        .and_then(tls::subject)
                                        .map(Arc::<str>::from);
                                    if let Some(subject) = &subject {
                                        tracing::info!(%addr, client = %subject, "client certificate accepted");
                                    }
                                    Some(Conn::tls(stream, subject))
                                }
                                Ok(Err(e)) => {
                                    tracing::info!(%addr, error = %e, "TLS handshake failed");
                                    None
                                }
                                Err(_) => {
                                    tracing::info!(%addr, timeout = ?handshake_timeout, "TLS handshake timed out");
                                    None
                                }
                            }
                        });
                    }
                }
            }
            Some(done) = handshakes.join_next(), if !handshakes.is_empty() => {
                if let Ok(Some(conn)) = done
                    && tx.send(Ok(conn)).await.is_err()
                {
                    return;
                }
            }
        }
    }
}
