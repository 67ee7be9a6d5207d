//! Accepting connections, and telling each call who made it.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use strata_proto::NodeId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::Status;

use crate::names::{self, CertIdentity};
use crate::verify::ClientVerifier;
use crate::{provider, Own, Transport};

/// A handshake that has not finished after this long is dropped: a client that
/// opens connections and says nothing ties up no more than this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// An accepted connection, TLS or (with `--insecure`) plain.
pub enum ServerIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// Who is at the other end of a connection; tonic makes it once a connection and
/// puts a copy in every request's extensions.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    /// Whom the client's certificate (checked against the CA in the handshake)
    /// names: read once a connection, not once a call.
    pub identity: Option<Arc<CertIdentity>>,
}

impl Connected for ServerIo {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        match self {
            Self::Plain(s) => PeerInfo { remote: s.peer_addr().ok(), identity: None },
            Self::Tls(s) => {
                let (tcp, session) = s.get_ref();
                let certificate = session.peer_certificates().and_then(|c| c.first());
                let identity = certificate.and_then(|c| names::cert_info(c)).map(|i| Arc::new(i.identity));
                PeerInfo { remote: tcp.peer_addr().ok(), identity }
            }
        }
    }
}

impl AsyncRead for ServerIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connections accepted on `listener`, Nagle's algorithm off, each through the
/// TLS handshake when `transport` is TLS (handshakes run side by side: a slow one
/// holds up nobody). The accepting stops when the stream is dropped.
pub fn incoming(transport: &Transport, listener: TcpListener) -> ReceiverStream<Result<ServerIo, std::io::Error>> {
    let acceptor = match transport {
        Transport::Insecure => None,
        Transport::Tls(tls) => {
            server_config(tls.ca_sha256, tls.own.clone()).map(|c| tokio_rustls::TlsAcceptor::from(Arc::new(c)))
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let tcp = match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let Some(acceptor) = acceptor.clone() else {
                if tx.send(Ok(ServerIo::Plain(tcp))).await.is_err() {
                    return;
                }
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let remote = tcp.peer_addr().ok();
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(ServerIo::Tls(Box::new(tls)))).await;
                    }
                    Ok(Err(e)) => tracing::info!(?remote, error = %e, "refused a connection: TLS handshake failed"),
                    Err(_) => {
                        tracing::info!(?remote, "refused a connection: no TLS handshake within {HANDSHAKE_TIMEOUT:?}")
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

fn server_config(ca_sha256: [u8; 32], own: Arc<Own>) -> Option<ServerConfig> {
    // Workers take calls from enrolled nodes only; the coordinator also from a
    // worker not enrolled yet (its Join), and checks per call.
    let mandatory = matches!(own.as_ref(), Own::Node(_));
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tracing::error!(error = %e, "cannot set up TLS"))
        .ok()?
        .with_client_cert_verifier(Arc::new(ClientVerifier { ca_sha256, mandatory }))
        .with_cert_resolver(Arc::new(ServerResolver(own)));
    let mut config = config;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Some(config)
}

struct ServerResolver(Arc<Own>);

impl std::fmt::Debug for ServerResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerResolver")
    }
}

impl rustls::server::ResolvesServerCert for ServerResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.certified()
    }
}

/// Who made a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// `--insecure`: nobody is known, everyone is let through.
    Insecure,
    /// No certificate (a worker not enrolled yet, announcing itself).
    Anonymous,
    Coordinator,
    Worker(NodeId),
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Insecure => f.write_str("a caller on an insecure cluster"),
            Self::Anonymous => f.write_str("a caller without a certificate"),
            Self::Coordinator => f.write_str("the coordinator"),
            Self::Worker(node) => write!(f, "worker {node}"),
        }
    }
}

pub fn caller<T>(transport: &Transport, request: &tonic::Request<T>) -> Caller {
    if !transport.secure() {
        return Caller::Insecure;
    }
    let identity = request.extensions().get::<PeerInfo>().and_then(|p| p.identity.as_deref());
    match identity {
        Some(CertIdentity::Coordinator) => Caller::Coordinator,
        Some(CertIdentity::Worker(node)) => Caller::Worker(node.clone()),
        Some(CertIdentity::Enrolling { .. }) | None => Caller::Anonymous,
    }
}

pub fn remote_addr<T>(request: &tonic::Request<T>) -> Option<SocketAddr> {
    request.extensions().get::<PeerInfo>().and_then(|p| p.remote).or_else(|| request.remote_addr())
}

/// Who may make a call.
#[derive(Debug, Clone, Copy)]
pub enum Allow<'a> {
    Coordinator,
    /// Any worker this cluster enrolled and did not revoke.
    Workers,
    /// This one node (a worker's own command-line tools, holding its key).
    Node(&'a NodeId),
    Anyone,
}

/// The caller of `request` if one of `allowed` covers it; else PERMISSION_DENIED
/// (UNAUTHENTICATED without a certificate), naming `what` was refused.
pub fn authorize<T>(
    transport: &Transport,
    request: &tonic::Request<T>,
    allowed: &[Allow<'_>],
    what: &str,
) -> Result<Caller, Status> {
    let caller = caller(transport, request);
    if let Caller::Worker(node) = &caller {
        if transport.is_revoked(node) {
            return Err(Status::permission_denied(format!("{what}: node {node} was revoked")));
        }
    }
    let ok = caller == Caller::Insecure
        || allowed.iter().any(|a| match (a, &caller) {
            (Allow::Anyone, _) | (Allow::Coordinator, Caller::Coordinator) | (Allow::Workers, Caller::Worker(_)) => {
                true
            }
            (Allow::Node(n), Caller::Worker(m)) => *n == m,
            _ => false,
        });
    match (ok, &caller) {
        (true, _) => Ok(caller),
        (false, Caller::Anonymous) => {
            Err(Status::unauthenticated(format!("{what} needs a certificate of this cluster")))
        }
        (false, _) => Err(Status::permission_denied(format!("{what} is not for {caller}"))),
    }
}
