//! A worker's own identity: its key, kept across restarts, and the certificate the
//! coordinator signed for it. Until it has one, it presents a self-signed
//! certificate that names its node id and carries the proof it holds the join
//! token; the coordinator that dials it checks the proof and enrols it.
//!
//! Files (`<cache>/identity/`): `key.pem` (0600) and `cert.pem` (the node's
//! certificate, then the CA's).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use strata_proto::NodeId;

use crate::error::TrustError;
use crate::names::{self, CertIdentity};
use crate::token::JoinToken;
use crate::{files, hex, verify};

pub struct NodeIdentity {
    dir: PathBuf,
    node: NodeId,
    key_pkcs8: Vec<u8>,
    spki_der: Vec<u8>,
    ca_sha256: [u8; 32],
    current: RwLock<Current>,
}

#[derive(Clone)]
struct Current {
    certified: Arc<CertifiedKey>,
    /// The CA's certificate once enrolled.
    ca_der: Option<Vec<u8>>,
}

impl NodeIdentity {
    /// The identity of worker `node` kept in `dir` for the cluster of `token` (a key
    /// made there if there is none; the certificate kept only if it is this
    /// cluster's, for this node and key).
    pub fn open(dir: &Path, node: NodeId, token: &JoinToken) -> Result<Self, TrustError> {
        if !names::valid_node_id(node.as_str()) {
            return Err(TrustError::Certificate(format!("node id {node:?} cannot be a certificate name")));
        }
        let key_path = dir.join("key.pem");
        let key = match files::read(&key_path)? {
            Some(pem) => KeyPair::from_pem(&pem)
                .map_err(|e| TrustError::Corrupt { path: key_path.clone(), reason: e.to_string() })?,
            None => {
                let key = KeyPair::generate()?;
                files::write(&key_path, &key.serialize_pem(), true)?;
                key
            }
        };
        let spki_der = rcgen::PublicKeyData::subject_public_key_info(&key);
        let key_pkcs8 = key.serialize_der();
        let cert_path = dir.join("cert.pem");
        let kept = files::read(&cert_path)?.map(|text| files::pem_blocks(&text)).and_then(|blocks| match &blocks[..] {
            [leaf, ca] if hex::sha256(ca) == token.ca_sha256 => Some((leaf.clone(), ca.clone())),
            _ => None,
        });
        let kept = kept.filter(|(leaf, ca)| {
            let ours = names::cert_info(leaf)
                .is_some_and(|i| i.identity == CertIdentity::Worker(node.clone()) && i.spki_der == spki_der);
            ours && verify::signed_by_ca(leaf, ca).is_ok()
        });
        let current = match kept {
            Some((leaf, ca)) => Current { certified: certified(vec![leaf, ca.clone()], &key_pkcs8)?, ca_der: Some(ca) },
            None => {
                let proof = token.proof(node.as_str(), &spki_der);
                let cert = CertificateParams::new(names::enrol_names(&node, &proof))?.self_signed(&key)?;
                Current { certified: certified(vec![cert.der().to_vec()], &key_pkcs8)?, ca_der: None }
            }
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            node,
            key_pkcs8,
            spki_der,
            ca_sha256: token.ca_sha256,
            current: RwLock::new(current),
        })
    }

    /// The enrolled identity kept in `dir`, for a command run beside the worker
    /// (`strata-worker drain`): `None` when the worker was never enrolled.
    pub fn open_enrolled(dir: &Path) -> Result<Option<Self>, TrustError> {
        let (Some(key), Some(cert)) = (files::read(&dir.join("key.pem"))?, files::read(&dir.join("cert.pem"))?) else {
            return Ok(None);
        };
        let key = KeyPair::from_pem(&key)
            .map_err(|e| TrustError::Corrupt { path: dir.join("key.pem"), reason: e.to_string() })?;
        let [leaf, ca] = &files::pem_blocks(&cert)[..] else {
            return Ok(None);
        };
        let Some(CertIdentity::Worker(node)) = names::cert_info(leaf).map(|i| i.identity) else {
            return Ok(None);
        };
        let key_pkcs8 = key.serialize_der();
        let current =
            Current { certified: certified(vec![leaf.clone(), ca.clone()], &key_pkcs8)?, ca_der: Some(ca.clone()) };
        Ok(Some(Self {
            dir: dir.to_path_buf(),
            node,
            spki_der: rcgen::PublicKeyData::subject_public_key_info(&key),
            key_pkcs8,
            ca_sha256: hex::sha256(ca),
            current: RwLock::new(current),
        }))
    }

    pub fn node(&self) -> &NodeId {
        &self.node
    }

    pub fn ca_sha256(&self) -> [u8; 32] {
        self.ca_sha256
    }

    /// The certificate this node presents now (self-signed until enrolled).
    pub fn presented_certificate(&self) -> Vec<u8> {
        self.certified().cert.first().map(|c| c.to_vec()).unwrap_or_default()
    }

    pub fn enrolled(&self) -> bool {
        self.current().ca_der.is_some()
    }

    /// The CA's certificate, once enrolled.
    pub fn ca_der(&self) -> Option<Vec<u8>> {
        self.current().ca_der
    }

    pub(crate) fn certified(&self) -> Arc<CertifiedKey> {
        self.current().certified
    }

    fn current(&self) -> Current {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Takes the certificate the coordinator signed: it must be for this node and
    /// key, from the CA the token names. Kept on disk, and presented from the next
    /// handshake on.
    pub fn install(&self, certificate_der: &[u8], ca_der: &[u8]) -> Result<(), TrustError> {
        if hex::sha256(ca_der) != self.ca_sha256 {
            return Err(TrustError::Refused("the CA certificate is not the one the join token names".into()));
        }
        verify::signed_by_ca(certificate_der, ca_der).map_err(|e| TrustError::Refused(e.to_string()))?;
        let ours = names::cert_info(certificate_der)
            .is_some_and(|i| i.identity == CertIdentity::Worker(self.node.clone()) && i.spki_der == self.spki_der);
        if !ours {
            return Err(TrustError::Refused(format!("the certificate is not for node {} and its key", self.node)));
        }
        let pem = files::cert_pem(certificate_der) + &files::cert_pem(ca_der);
        files::write(&self.dir.join("cert.pem"), &pem, false)?;
        let certified = certified(vec![certificate_der.to_vec(), ca_der.to_vec()], &self.key_pkcs8)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Current { certified, ca_der: Some(ca_der.to_vec()) };
        Ok(())
    }
}

pub(crate) fn certified(chain: Vec<Vec<u8>>, key_pkcs8: &[u8]) -> Result<Arc<CertifiedKey>, TrustError> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8.to_vec()));
    let signing = crate::provider().key_provider.load_private_key(key)?;
    Ok(Arc::new(CertifiedKey::new(chain.into_iter().map(CertificateDer::from).collect(), signing)))
}
