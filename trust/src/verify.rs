//! Checking the other end of a connection. Both ends send their certificate and
//! the CA's, and the CA is recognised by the SHA-256 the join token carries: a
//! worker checks the coordinator before it holds the CA's certificate.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, RootCertStore, SignatureScheme};
use strata_proto::NodeId;

use crate::names::{self, CertIdentity};
use crate::{hex, provider};

/// The handshake-signature methods both verifiers share: the provider's own
/// algorithms (what differs between them is whose certificates they accept).
macro_rules! handshake_signatures_by_the_provider {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &provider().signature_verification_algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &provider().signature_verification_algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            provider().signature_verification_algorithms.supported_schemes()
        }
    };
}

/// Whether `leaf` was signed by the CA `ca` (and is in its validity period).
pub(crate) fn signed_by_ca(leaf: &[u8], ca: &[u8]) -> Result<(), Error> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca.to_vec()))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| Error::General(e.to_string()))?;
    verifier.verify_client_cert(&CertificateDer::from(leaf.to_vec()), &[], UnixTime::now()).map(|_| ())
}

/// Checks `leaf` against the CA among `intermediates` whose hash is `ca_sha256`.
fn chained(leaf: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>], ca_sha256: &[u8; 32]) -> Result<(), Error> {
    let ca = intermediates
        .iter()
        .find(|c| hex::sha256(c) == *ca_sha256)
        .ok_or(Error::InvalidCertificate(CertificateError::UnknownIssuer))?;
    signed_by_ca(leaf, ca)
}

/// Whom a client expects at the other end.
#[derive(Debug, Clone)]
pub(crate) enum Expect {
    Coordinator,
    Node(NodeId),
    /// Any worker this cluster enrolled (one reached at an address whose node is
    /// not known yet).
    AnyWorker,
    /// A worker, enrolled or waiting to be (only the coordinator finding a worker).
    WorkerOrEnrolling,
}

#[derive(Debug)]
pub(crate) struct ServerVerifier {
    pub ca_sha256: [u8; 32],
    pub expect: Expect,
    pub revoked: Arc<RwLock<HashSet<NodeId>>>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let identity =
            names::cert_info(end_entity).ok_or(Error::InvalidCertificate(CertificateError::BadEncoding))?.identity;
        let wanted = match (&self.expect, &identity) {
            // Holding the key is proven by the handshake's signature; the token
            // proof is checked by the coordinator before it signs anything.
            (Expect::WorkerOrEnrolling, CertIdentity::Enrolling { .. }) => return Ok(ServerCertVerified::assertion()),
            (Expect::Coordinator, CertIdentity::Coordinator) => true,
            (Expect::Node(n), CertIdentity::Worker(m)) => n == m,
            (Expect::AnyWorker | Expect::WorkerOrEnrolling, CertIdentity::Worker(_)) => true,
            _ => false,
        };
        if !wanted {
            return Err(Error::InvalidCertificate(CertificateError::NotValidForName));
        }
        if let CertIdentity::Worker(node) = &identity {
            if self.revoked.read().unwrap_or_else(|p| p.into_inner()).contains(node) {
                return Err(Error::InvalidCertificate(CertificateError::Revoked));
            }
        }
        chained(end_entity, intermediates, &self.ca_sha256)?;
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures_by_the_provider!();
}

/// A server's check of its clients: a certificate from this cluster's CA, required
/// (workers) or optional (the coordinator, which a worker not enrolled yet calls to
/// announce itself). Which calls a client may make is the service's to decide.
#[derive(Debug)]
pub(crate) struct ClientVerifier {
    pub ca_sha256: [u8; 32],
    pub mandatory: bool,
}

impl ClientCertVerifier for ClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        chained(end_entity, intermediates, &self.ca_sha256)?;
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures_by_the_provider!();
}
