//! Who may pull a sequence's KV cache from a stage.
//!
//! A KV cache is a person's prompt in another form, so a stage exports it only to
//! the worker the coordinator chose to import it: when the coordinator moves a
//! sequence it signs, with the CA's key, a [`KvGrant`] naming the importing node,
//! the old pipeline and sequence, and the layers; the importer sends the signature
//! with its ExportKv, and the exporting stage checks it against the CA certificate
//! it was enrolled with and the caller's own certificate. Any other enrolled
//! worker asking gets nothing. A grant needs no expiry: it names one sequence of
//! one pipeline, both gone once the move is over, and only the named node may use
//! it.

use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, UnparsedPublicKey};
use strata_proto::NodeId;

use crate::error::TrustError;

/// The coordinator's word that `importer` may pull the KV of layers
/// `layer_start..layer_end` of sequence `seq_id` on pipeline `pipeline_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvGrant<'a> {
    pub importer: &'a NodeId,
    pub pipeline_id: u64,
    pub seq_id: u64,
    pub layer_start: u32,
    pub layer_end: u32,
}

impl KvGrant<'_> {
    /// What is signed: a label (no signature of the CA for anything else can pass
    /// for a grant) and the fields, each of fixed width or length-prefixed.
    fn message(&self) -> Vec<u8> {
        let mut m = b"strata kv grant v1\0".to_vec();
        m.extend_from_slice(&(self.importer.as_str().len() as u32).to_be_bytes());
        m.extend_from_slice(self.importer.as_str().as_bytes());
        m.extend_from_slice(&self.pipeline_id.to_be_bytes());
        m.extend_from_slice(&self.seq_id.to_be_bytes());
        m.extend_from_slice(&self.layer_start.to_be_bytes());
        m.extend_from_slice(&self.layer_end.to_be_bytes());
        m
    }
}

/// The CA's key, as grants are signed with it (ECDSA P-256, as rcgen made it).
pub(crate) struct GrantSigner(EcdsaKeyPair);

impl GrantSigner {
    pub(crate) fn new(ca_key_pkcs8: &[u8]) -> Result<Self, TrustError> {
        let key =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, ca_key_pkcs8, &SystemRandom::new())
                .map_err(|e| TrustError::Certificate(format!("the CA key cannot sign grants: {e}")))?;
        Ok(Self(key))
    }

    pub(crate) fn sign(&self, grant: &KvGrant<'_>) -> Result<Vec<u8>, TrustError> {
        let signature = self.0.sign(&SystemRandom::new(), &grant.message());
        Ok(signature.map_err(|_| TrustError::Certificate("signing a KV grant failed".into()))?.as_ref().to_vec())
    }
}

/// Checks that `signature` is the CA's (`ca_der`) over `grant`.
pub(crate) fn check(ca_der: &[u8], grant: &KvGrant<'_>, signature: &[u8]) -> Result<(), TrustError> {
    let refused = |why: &str| TrustError::Refused(format!("no grant to pull that KV: {why}"));
    if signature.is_empty() {
        return Err(refused("the coordinator granted none"));
    }
    let (_, ca) =
        x509_parser::parse_x509_certificate(ca_der).map_err(|_| refused("the CA certificate is unreadable"))?;
    let key =
        UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, ca.public_key().subject_public_key.data.as_ref());
    key.verify(&grant.message(), signature).map_err(|_| refused("the signature is not the coordinator's for it"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Authority;

    #[test]
    fn only_the_grant_signed_for_a_node_passes_for_it() {
        let state = tempfile::tempdir().unwrap();
        let authority = Authority::open_or_create(state.path()).unwrap();
        let (importer, other) = (NodeId::new("00000000000000a1").unwrap(), NodeId::new("00000000000000b2").unwrap());
        let grant = KvGrant { importer: &importer, pipeline_id: 7, seq_id: 3, layer_start: 4, layer_end: 9 };
        let signature = authority.sign_kv_grant(&grant).unwrap();
        check(authority.ca_der(), &grant, &signature).unwrap();
        let changed = [
            KvGrant { importer: &other, ..grant.clone() },
            KvGrant { pipeline_id: 8, ..grant.clone() },
            KvGrant { seq_id: 4, ..grant.clone() },
            KvGrant { layer_start: 0, ..grant.clone() },
            KvGrant { layer_end: 10, ..grant.clone() },
        ];
        for g in &changed {
            assert!(check(authority.ca_der(), g, &signature).is_err(), "{g:?}");
        }
        assert!(check(authority.ca_der(), &grant, &[]).unwrap_err().to_string().contains("granted none"));
        // Another cluster's CA signed nothing here.
        let elsewhere = tempfile::tempdir().unwrap();
        let other_ca = Authority::open_or_create(elsewhere.path()).unwrap();
        assert!(check(other_ca.ca_der(), &grant, &signature).is_err());
    }
}
