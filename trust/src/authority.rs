//! The coordinator's side: the cluster's certificate authority, made on first start
//! and kept in the coordinator's state folder, the join token's secret, the nodes it
//! enrolled and the ones revoked.
//!
//! Files (`<state>/`): `ca.pem`, `ca-key.pem` (0600), `token-secret` (0600),
//! `nodes` (one enrolled node per line: id and the SHA-256 of its public key) and
//! `revoked` (one node id per line).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SubjectPublicKeyInfo,
};
use strata_proto::NodeId;

use crate::error::TrustError;
use crate::files;
use crate::grant::{GrantSigner, KvGrant};
use crate::hex;
use crate::names::{self, CertIdentity};
use crate::token::{JoinToken, SECRET_BYTES};
use crate::OwnCertificate;

pub struct Authority {
    dir: PathBuf,
    ca_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
    grants: GrantSigner,
    token: JoinToken,
    registry: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    /// Node id → hex SHA-256 of the public key it was enrolled with.
    nodes: BTreeMap<String, String>,
    revoked: BTreeSet<String>,
}

/// What [`Authority::enrol`] issued.
pub struct Enrolment {
    pub node: NodeId,
    pub certificate_der: Vec<u8>,
}

impl Authority {
    /// The authority kept in `dir`, made there if there is none yet.
    pub fn open_or_create(dir: &Path) -> Result<Self, TrustError> {
        let (cert_path, key_path, secret_path) = (dir.join("ca.pem"), dir.join("ca-key.pem"), dir.join("token-secret"));
        let (ca_der, key) = match (files::read(&cert_path)?, files::read(&key_path)?) {
            (Some(cert), Some(key)) => {
                let key = KeyPair::from_pem(&key)
                    .map_err(|e| TrustError::Corrupt { path: key_path.clone(), reason: e.to_string() })?;
                (files::pem_der(&cert_path, &cert)?, key)
            }
            _ => {
                let key = KeyPair::generate()?;
                let mut params = CertificateParams::new(Vec::<String>::new())?;
                params.distinguished_name.push(DnType::CommonName, "strata cluster CA");
                params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
                params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
                let cert = params.self_signed(&key)?;
                files::write(&key_path, &key.serialize_pem(), true)?;
                files::write(&cert_path, &cert.pem(), false)?;
                // A new CA makes every old token and enrolment void.
                for stale in ["token-secret", "nodes", "revoked"] {
                    let _ = std::fs::remove_file(dir.join(stale));
                }
                (cert.der().to_vec(), key)
            }
        };
        let secret = match files::read(&secret_path)? {
            Some(text) => hex::decode(text.trim())
                .and_then(|b| <[u8; SECRET_BYTES]>::try_from(b).ok())
                .ok_or_else(|| TrustError::Corrupt { path: secret_path.clone(), reason: "not 32 hex digits".into() })?,
            None => {
                let mut secret = [0; SECRET_BYTES];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
                    .map_err(|_| TrustError::Certificate("no system randomness".into()))?;
                files::write(&secret_path, &hex::encode(&secret), true)?;
                secret
            }
        };
        let grants = GrantSigner::new(&key.serialize_der())?;
        let issuer = Issuer::from_ca_cert_der(&ca_der.clone().into(), key)?;
        let token = JoinToken::new(hex::sha256(&ca_der), secret);
        let registry = Registry {
            nodes: read_lines(&dir.join("nodes"))?
                .into_iter()
                .filter_map(|l| l.split_once(' ').map(|(n, k)| (n.to_string(), k.to_string())))
                .collect(),
            revoked: read_lines(&dir.join("revoked"))?.into_iter().collect(),
        };
        Ok(Self { dir: dir.to_path_buf(), ca_der, issuer, grants, token, registry: Mutex::new(registry) })
    }

    pub fn token(&self) -> &JoinToken {
        &self.token
    }

    pub fn ca_der(&self) -> &[u8] {
        &self.ca_der
    }

    /// The CA's signature over `grant` (see [`crate::grant`]).
    pub fn sign_kv_grant(&self, grant: &KvGrant<'_>) -> Result<Vec<u8>, TrustError> {
        self.grants.sign(grant)
    }

    /// A certificate for the coordinator itself, on a key made now.
    pub fn coordinator_certificate(&self) -> Result<OwnCertificate, TrustError> {
        let key = KeyPair::generate()?;
        let cert = leaf_params(names::COORDINATOR_NAME)?.signed_by(&key, &self.issuer)?;
        Ok(OwnCertificate { chain: vec![cert.der().to_vec(), self.ca_der.clone()], key_pkcs8: key.serialize_der() })
    }

    /// Enrols the worker whose self-signed certificate is `presented`: checks the
    /// token proof in it, that the node is not revoked and not already enrolled
    /// with another key (a captured token cannot take over an existing node's
    /// name), and signs a certificate for its key and node id.
    pub fn enrol(&self, presented: &[u8]) -> Result<Enrolment, TrustError> {
        let info = names::cert_info(presented).ok_or_else(|| TrustError::Refused("not a strata certificate".into()))?;
        let CertIdentity::Enrolling { node, proof } = info.identity else {
            return Err(TrustError::Refused(format!("{} is not asking to be enrolled", info.identity)));
        };
        if !self.token.check_proof(node.as_str(), &info.spki_der, &proof) {
            return Err(TrustError::Refused(format!(
                "worker {node} does not hold this cluster's join token (start it with the token `strata serve` printed)"
            )));
        }
        let key_hash = hex::encode(&hex::sha256(&info.spki_der));
        let mut registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if registry.revoked.contains(node.as_str()) {
            return Err(TrustError::Refused(format!("node {node} was revoked; start the worker under a new --name")));
        }
        match registry.nodes.get(node.as_str()) {
            Some(known) if *known != key_hash => {
                return Err(TrustError::Refused(format!(
                    "node {node} is already enrolled with another key; `strata node revoke {node}` first if that \
                     machine was lost"
                )))
            }
            Some(_) => {}
            None => {
                registry.nodes.insert(node.to_string(), key_hash);
                let lines: Vec<String> = registry.nodes.iter().map(|(n, k)| format!("{n} {k}")).collect();
                write_lines(&self.dir.join("nodes"), &lines)?;
            }
        }
        drop(registry);
        let spki = SubjectPublicKeyInfo::from_der(&info.spki_der)?;
        let cert = leaf_params(&names::node_name(&node))?.signed_by(&spki, &self.issuer)?;
        Ok(Enrolment { node, certificate_der: cert.der().to_vec() })
    }

    /// Revokes `node` for good; false if it already was.
    pub fn revoke(&self, node: &NodeId) -> Result<bool, TrustError> {
        let mut registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if !registry.revoked.insert(node.to_string()) {
            return Ok(false);
        }
        let lines: Vec<String> = registry.revoked.iter().cloned().collect();
        write_lines(&self.dir.join("revoked"), &lines)?;
        Ok(true)
    }

    pub fn revoked(&self) -> Vec<NodeId> {
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        registry.revoked.iter().filter_map(|n| NodeId::new(n)).collect()
    }
}

fn leaf_params(name: &str) -> Result<CertificateParams, TrustError> {
    let mut params = CertificateParams::new(vec![name.to_string()])?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    Ok(params)
}

fn read_lines(path: &Path) -> Result<Vec<String>, TrustError> {
    Ok(files::read(path)?
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

fn write_lines(path: &Path, lines: &[String]) -> Result<(), TrustError> {
    files::write(path, &lines.iter().map(|l| format!("{l}\n")).collect::<String>(), false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeIdentity;

    fn presented(identity: &NodeIdentity) -> Vec<u8> {
        identity.certified().cert[0].to_vec()
    }

    #[test]
    fn enrols_a_token_holder_once_per_node_and_never_a_revoked_one() {
        let state = tempfile::tempdir().unwrap();
        let authority = Authority::open_or_create(state.path()).unwrap();
        let token = authority.token().clone();
        let node = NodeId::new("0123456789abcdef").unwrap();
        let home = tempfile::tempdir().unwrap();
        let worker = NodeIdentity::open(home.path(), node.clone(), &token).unwrap();
        assert!(!worker.enrolled());

        let enrolment = authority.enrol(&presented(&worker)).unwrap();
        assert_eq!(enrolment.node, node);
        worker.install(&enrolment.certificate_der, authority.ca_der()).unwrap();
        assert!(worker.enrolled());
        // Kept: a restart presents the signed certificate at once.
        assert!(NodeIdentity::open(home.path(), node.clone(), &token).unwrap().enrolled());
        // The same key may be enrolled again (a worker that lost its certificate).
        let again = NodeIdentity::open(tempfile::tempdir().unwrap().path(), node.clone(), &token).unwrap();
        let err = authority.enrol(&presented(&again)).err().unwrap().to_string();
        assert!(err.contains("already enrolled with another key"), "{err}");

        // A token from another cluster proves nothing here.
        let other = Authority::open_or_create(tempfile::tempdir().unwrap().path()).unwrap();
        let stranger =
            NodeIdentity::open(tempfile::tempdir().unwrap().path(), NodeId::new("aa").unwrap(), other.token()).unwrap();
        let err = authority.enrol(&presented(&stranger)).err().unwrap().to_string();
        assert!(err.contains("does not hold this cluster's join token"), "{err}");
        // A certificate from another CA is not installed.
        let forged = other.enrol(&presented(&stranger)).unwrap();
        assert!(stranger.install(&forged.certificate_der, authority.ca_der()).is_err());

        assert!(authority.revoke(&node).unwrap());
        let err = authority.enrol(&presented(&worker)).err().unwrap().to_string();
        assert!(err.contains("revoked") || err.contains("not asking"), "{err}");
        let fresh = NodeIdentity::open(tempfile::tempdir().unwrap().path(), node.clone(), &token).unwrap();
        assert!(authority.enrol(&presented(&fresh)).err().unwrap().to_string().contains("revoked"));

        // Reopened: the same CA, token, enrolments and revocations.
        let reopened = Authority::open_or_create(state.path()).unwrap();
        assert_eq!(reopened.token(), &token);
        assert_eq!(reopened.revoked(), vec![node]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(state.path().join("ca-key.pem")).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
