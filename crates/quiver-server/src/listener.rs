//! Accepting connections for tonic: TCP options, TLS handshakes off the accept loop.
//!
//! tonic's own `serve_with_shutdown` can neither reload certificates nor enforce TLS 1.3,
//! so Quiver accepts sockets itself and hands tonic finished connections through
//! `serve_with_incoming_shutdown`. On that path tonic ignores its TCP options, so
//! `TCP_NODELAY` is set here. Each TLS handshake runs in its own task with a timeout: a
//! client that opens a socket and stalls cannot hold up anyone else's.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use quiver::flight::auth::PeerInfo;
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

/// A connection handed to tonic: plain TCP or TLS over TCP.
pub enum Conn {
    /// Plaintext.
    Plain(TcpStream),
    /// TLS, with the client certificate's subject if any.
    Tls(Box<TlsStream<TcpStream>>, Option<Arc<str>>),
}

impl Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        match self {
            Conn::Plain(s) => PeerInfo {
                remote_addr: s.peer_addr().ok(),
                client_subject: None,
            },
            Conn::Tls(s, subject) => PeerInfo {
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
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s, _) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
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
    let task = AbortOnDropHandle::new(tokio::runtime::Handle::current().spawn(accept_loop(
        listener,
        tls,
        handshake_timeout,
        shutdown,
        tx,
    )));
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
                        if tx.send(Ok(Conn::Plain(socket))).await.is_err() {
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
                                    Some(Conn::Tls(Box::new(stream), subject))
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
