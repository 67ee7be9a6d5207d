//! Who may talk to whom in a strata cluster.
//!
//! The coordinator is the cluster's certificate authority ([`Authority`]); `strata
//! serve` prints a [`JoinToken`]: the SHA-256 of the CA's certificate and a secret.
//! A worker given the token keeps a key ([`NodeIdentity`]) and, until enrolled,
//! presents a self-signed certificate that carries a proof it holds the token; the
//! coordinator that dials it checks the proof and signs a certificate for its node
//! id. From then on every gRPC connection — coordinator to worker, worker to worker,
//! weight pulls — is mutual TLS 1.3 ([`Transport`]), each end checked against the
//! CA and named by role (`coordinator.strata`, `<node id>.node.strata`), never by IP.
//! The services decide per call what a caller may do ([`authorize`]).
//!
//! `--insecure` keeps plain TCP ([`Transport::Insecure`]).
//!
//! A process has one transport, as it has one identity: [`install`] sets it at
//! start; one that never does (a test running workers in-process) is insecure.

mod authority;
mod connect;
mod error;
mod files;
pub mod grant;
pub mod hex;
mod identity;
pub mod names;
mod serve;
mod token;
mod verify;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

pub use authority::{Authority, Enrolment};
pub use connect::{ConnectError, Dial, SeenCertificate};
pub use error::TrustError;
pub use grant::KvGrant;
pub use identity::NodeIdentity;
pub use serve::{authorize, caller, incoming, remote_addr, Allow, Caller, PeerInfo, ServerIo};
use strata_proto::NodeId;
pub use token::{JoinToken, SECRET_BYTES as TOKEN_SECRET_BYTES};

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;

/// The one crypto provider (ring), installed as the process default on first use
/// so nothing else picks another.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let provider = rustls::crypto::ring::default_provider();
            let _ = provider.clone().install_default();
            Arc::new(provider)
        })
        .clone()
}

/// A certificate chain and its key, as the coordinator holds its own.
pub struct OwnCertificate {
    pub chain: Vec<Vec<u8>>,
    pub key_pkcs8: Vec<u8>,
}

/// What this process presents.
pub enum Own {
    /// The coordinator: its certificate, and the CA it enrols workers with.
    Coordinator(Arc<CertifiedKey>, Arc<Authority>),
    Node(Arc<NodeIdentity>),
}

impl Own {
    /// The coordinator of `authority`'s cluster, on a key made now.
    pub fn coordinator(authority: Arc<Authority>) -> Result<Self, TrustError> {
        let own = authority.coordinator_certificate()?;
        Ok(Self::Coordinator(identity::certified(own.chain, &own.key_pkcs8)?, authority))
    }

    pub(crate) fn certified(&self) -> Option<Arc<CertifiedKey>> {
        match self {
            Self::Coordinator(c, _) => Some(c.clone()),
            Self::Node(n) => Some(n.certified()),
        }
    }

    /// What this process presents as a client: nothing from a worker not enrolled
    /// yet (the coordinator takes its Join anonymously).
    pub(crate) fn client_certified(&self) -> Option<Arc<CertifiedKey>> {
        match self {
            Self::Node(n) if !n.enrolled() => None,
            _ => self.certified(),
        }
    }
}

/// How this process's gRPC connections are made and accepted.
pub enum Transport {
    /// Plain TCP, anyone may call anything: `--insecure`.
    Insecure,
    Tls(Tls),
}

pub struct Tls {
    ca_sha256: [u8; 32],
    own: Arc<Own>,
    /// The node each worker address belongs to, as enrolment, Describe or a plan
    /// told: a worker is dialled by its node id, never trusted for its address.
    known: Mutex<HashMap<String, NodeId>>,
    /// Shared with every connection's certificate check.
    revoked: Arc<RwLock<HashSet<NodeId>>>,
}

impl Transport {
    pub fn tls(ca_sha256: [u8; 32], own: Own) -> Self {
        Self::Tls(Tls { ca_sha256, own: Arc::new(own), known: Mutex::default(), revoked: Arc::default() })
    }

    pub fn secure(&self) -> bool {
        matches!(self, Self::Tls(_))
    }

    /// Remembers that `address` is `node`'s.
    pub fn learn(&self, address: &str, node: &NodeId) {
        if let Self::Tls(tls) = self {
            tls.known.lock().unwrap_or_else(|p| p.into_inner()).insert(address.to_string(), node.clone());
        }
    }

    pub fn node_at(&self, address: &str) -> Option<NodeId> {
        match self {
            Self::Tls(tls) => tls.known.lock().unwrap_or_else(|p| p.into_inner()).get(address).cloned(),
            Self::Insecure => None,
        }
    }

    /// Refuses `nodes` from the next call on, whether as callers or as peers.
    pub fn revoke(&self, nodes: impl IntoIterator<Item = NodeId>) {
        if let Self::Tls(tls) = self {
            tls.revoked.write().unwrap_or_else(|p| p.into_inner()).extend(nodes);
        }
    }

    pub fn is_revoked(&self, node: &NodeId) -> bool {
        match self {
            Self::Tls(tls) => tls.revoked.read().unwrap_or_else(|p| p.into_inner()).contains(node),
            Self::Insecure => false,
        }
    }

    /// This process's node identity, for a worker.
    pub fn node_identity(&self) -> Option<&Arc<NodeIdentity>> {
        match self {
            Self::Tls(tls) => match tls.own.as_ref() {
                Own::Node(n) => Some(n),
                Own::Coordinator(..) => None,
            },
            Self::Insecure => None,
        }
    }

    /// The cluster's CA, in the coordinator.
    pub fn authority(&self) -> Option<&Arc<Authority>> {
        match self {
            Self::Tls(tls) => match tls.own.as_ref() {
                Own::Coordinator(_, authority) => Some(authority),
                Own::Node(_) => None,
            },
            Self::Insecure => None,
        }
    }

    /// Checks the coordinator's `signature` over `grant` against the CA this
    /// process trusts (see [`grant`]); insecure, every grant passes.
    pub fn check_kv_grant(&self, grant: &KvGrant<'_>, signature: &[u8]) -> Result<(), TrustError> {
        let ca = match self {
            Self::Insecure => return Ok(()),
            Self::Tls(tls) => match tls.own.as_ref() {
                Own::Coordinator(_, authority) => authority.ca_der().to_vec(),
                Own::Node(identity) => {
                    identity.ca_der().ok_or_else(|| TrustError::Refused("this worker is not enrolled yet".into()))?
                }
            },
        };
        grant::check(&ca, grant, signature)
    }

    /// The transport of the coordinator of `authority`'s cluster.
    pub fn coordinator(authority: Arc<Authority>) -> Result<Self, TrustError> {
        let ca_sha256 = authority.token().ca_sha256;
        let transport = Self::tls(ca_sha256, Own::coordinator(authority.clone())?);
        transport.revoke(authority.revoked());
        Ok(transport)
    }
}

static TRANSPORT: OnceLock<Transport> = OnceLock::new();

/// Sets this process's transport; once.
pub fn install(transport: Transport) -> Result<(), TrustError> {
    if transport.secure() {
        provider();
    }
    TRANSPORT.set(transport).map_err(|_| TrustError::Tls("the transport was already set".into()))
}

/// This process's transport ([`Transport::Insecure`] where none was installed).
pub fn transport() -> &'static Transport {
    TRANSPORT.get_or_init(|| Transport::Insecure)
}
