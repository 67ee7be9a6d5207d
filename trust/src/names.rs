//! Who a certificate says its holder is. The identity lives in the certificate's
//! DNS names, under `.strata` (never a real domain):
//!
//! * `coordinator.strata`: the coordinator;
//! * `<node id>.node.strata`: a worker the coordinator enrolled;
//! * `<node id>.enrol.strata` plus `<proof>.proof.strata`: a worker's self-signed
//!   certificate while it waits to be enrolled, the proof showing it holds the token.

use strata_proto::NodeId;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

pub const COORDINATOR_NAME: &str = "coordinator.strata";
const NODE_SUFFIX: &str = ".node.strata";
const ENROL_SUFFIX: &str = ".enrol.strata";
const PROOF_SUFFIX: &str = ".proof.strata";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertIdentity {
    Coordinator,
    Worker(NodeId),
    /// A worker not enrolled yet, with the proof it holds the token.
    Enrolling {
        node: NodeId,
        proof: Vec<u8>,
    },
}

impl std::fmt::Display for CertIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Coordinator => f.write_str("the coordinator"),
            Self::Worker(node) => write!(f, "worker {node}"),
            Self::Enrolling { node, .. } => write!(f, "worker {node} (not enrolled)"),
        }
    }
}

/// A certificate's identity and the DER of its public key.
pub struct CertInfo {
    pub identity: CertIdentity,
    pub spki_der: Vec<u8>,
}

/// Whether `node` can be a DNS label: the node ids strata-worker makes are 16 hex
/// digits; anything else a peer sends is refused before it reaches a certificate.
pub fn valid_node_id(node: &str) -> bool {
    !node.is_empty()
        && node.len() <= 63
        && node.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
}

pub fn node_name(node: &NodeId) -> String {
    format!("{node}{NODE_SUFFIX}")
}

pub fn enrol_names(node: &NodeId, proof: &[u8]) -> Vec<String> {
    vec![format!("{node}{ENROL_SUFFIX}"), format!("{}{PROOF_SUFFIX}", crate::hex::encode(proof))]
}

/// The identity `der` claims (whether to believe it is the verifier's job), or
/// `None` for a certificate strata did not make.
pub fn cert_info(der: &[u8]) -> Option<CertInfo> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let names: Vec<&str> = cert
        .subject_alternative_name()
        .ok()??
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(name) => Some(*name),
            _ => None,
        })
        .collect();
    let node = |suffix: &str| {
        names.iter().find_map(|n| n.strip_suffix(suffix)).filter(|n| valid_node_id(n)).and_then(NodeId::new)
    };
    let identity = if names.contains(&COORDINATOR_NAME) {
        CertIdentity::Coordinator
    } else if let Some(node) = node(NODE_SUFFIX) {
        CertIdentity::Worker(node)
    } else {
        let node = node(ENROL_SUFFIX)?;
        let proof = names.iter().find_map(|n| n.strip_suffix(PROOF_SUFFIX)).and_then(crate::hex::decode)?;
        CertIdentity::Enrolling { node, proof }
    };
    Some(CertInfo { identity, spki_der: cert.public_key().raw.to_vec() })
}
