//! Dialling a peer: TCP, then TLS with the check of who is at the other end, under
//! tonic's channel (which redials through the same connector).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use strata_proto::NodeId;
use tokio::net::TcpStream;
use tonic::codegen::http::Uri;
use tonic::transport::Channel;

use crate::names;
use crate::verify::{Expect, ServerVerifier};
use crate::{provider, Own, Tls, Transport};

/// Whom a connection is for.
#[derive(Clone)]
pub enum Dial {
    /// The coordinator (a worker's Join and weight pulls).
    Coordinator,
    /// The worker at this address: its node when known, else any worker of this
    /// cluster.
    Worker,
    /// A worker the coordinator has just found, enrolled or not: the certificate
    /// it presented is left in the slot.
    Discover(SeenCertificate),
}

/// The certificate the last handshake of a [`Dial::Discover`] connection saw.
#[derive(Clone, Default)]
pub struct SeenCertificate(Arc<Mutex<Option<Vec<u8>>>>);

impl SeenCertificate {
    pub fn get(&self) -> Option<Vec<u8>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
    #[error("node {0} was revoked")]
    Revoked(NodeId),
    #[error("cannot set up TLS: {0}")]
    Tls(String),
}

impl ConnectError {
    pub fn transport(&self) -> Option<&tonic::transport::Error> {
        match self {
            Self::Transport(e) => Some(e),
            _ => None,
        }
    }
}

impl Transport {
    /// A connection to `address`, made now.
    pub async fn connect(&self, address: &str, dial: Dial) -> Result<Channel, ConnectError> {
        let endpoint = strata_proto::transport::endpoint(address)?;
        match self {
            Self::Insecure => Ok(endpoint.connect().await?),
            Self::Tls(tls) => Ok(endpoint.connect_with_connector(self.connector(tls, address, dial)?).await?),
        }
    }

    /// A connection to `address`, made at the first call.
    pub fn connect_lazy(&self, address: &str, dial: Dial) -> Result<Channel, ConnectError> {
        let endpoint = strata_proto::transport::endpoint(address)?;
        match self {
            Self::Insecure => Ok(endpoint.connect_lazy()),
            Self::Tls(tls) => Ok(endpoint.connect_with_connector_lazy(self.connector(tls, address, dial)?)),
        }
    }

    fn connector(&self, tls: &Tls, address: &str, dial: Dial) -> Result<TlsConnector, ConnectError> {
        let (expect, seen) = match dial {
            Dial::Coordinator => (Expect::Coordinator, None),
            Dial::Worker => match self.node_at(address) {
                Some(node) if self.is_revoked(&node) => return Err(ConnectError::Revoked(node)),
                Some(node) => (Expect::Node(node), None),
                None => (Expect::AnyWorker, None),
            },
            Dial::Discover(seen) => (Expect::WorkerOrEnrolling, Some(seen)),
        };
        let server_name = match &expect {
            Expect::Coordinator => names::COORDINATOR_NAME.to_string(),
            Expect::Node(node) => names::node_name(node),
            Expect::AnyWorker | Expect::WorkerOrEnrolling => "worker.strata".to_string(),
        };
        let server_name = ServerName::try_from(server_name).map_err(|e| ConnectError::Tls(e.to_string()))?;
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ConnectError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ServerVerifier { ca_sha256: tls.ca_sha256, expect, revoked: tls.revoked.clone() }))
            .with_client_cert_resolver(Arc::new(ClientResolver(tls.own.clone())));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(TlsConnector { config: Arc::new(config), server_name, seen })
    }
}

struct ClientResolver(Arc<Own>);

impl std::fmt::Debug for ClientResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientResolver")
    }
}

impl rustls::client::ResolvesClientCert for ClientResolver {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.client_certified()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.secure() { "Transport::Tls" } else { "Transport::Insecure" })
    }
}

#[derive(Clone)]
struct TlsConnector {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    seen: Option<SeenCertificate>,
}

type Io = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tower::Service<Uri> for TlsConnector {
    type Response = Io;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Io, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
            let port = uri.port_u16().unwrap_or(80);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(this.config).connect(this.server_name, tcp).await?;
            if let Some(seen) = this.seen {
                let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec());
                *seen.0.lock().unwrap_or_else(|p| p.into_inner()) = leaf;
            }
            Ok(TokioIo::new(tls))
        })
    }
}
