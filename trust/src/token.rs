//! The join token: what a worker needs to trust the coordinator and be trusted by
//! it, in one string to copy (k3s's idea). It holds the SHA-256 of the cluster's CA
//! certificate, so a worker checks whom it talks to before it has the certificate,
//! and a secret that proves to the coordinator the worker was given the token.

use std::fmt;

use ring::hmac;

use crate::error::TrustError;

const PREFIX: &str = "strata1";
pub const SECRET_BYTES: usize = 16;
/// Bytes of the enrolment proof carried in a certificate name (hex: 32 characters,
/// within a DNS label's 63).
pub const PROOF_BYTES: usize = 16;

#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub ca_sha256: [u8; 32],
    secret: [u8; SECRET_BYTES],
}

impl JoinToken {
    pub fn new(ca_sha256: [u8; 32], secret: [u8; SECRET_BYTES]) -> Self {
        Self { ca_sha256, secret }
    }

    pub fn parse(text: &str) -> Result<Self, TrustError> {
        let mut parts = text.trim().split('.');
        let (Some(PREFIX), Some(ca), Some(secret), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TrustError::BadToken);
        };
        let ca = crate::hex::decode(ca).and_then(|b| <[u8; 32]>::try_from(b).ok()).ok_or(TrustError::BadToken)?;
        let secret = crate::hex::decode(secret)
            .and_then(|b| <[u8; SECRET_BYTES]>::try_from(b).ok())
            .ok_or(TrustError::BadToken)?;
        Ok(Self { ca_sha256: ca, secret })
    }

    /// What a worker shows to prove it holds the token: bound to its node id and
    /// its public key, so a proof seen once cannot be replayed for another key or
    /// another node.
    pub fn proof(&self, node_id: &str, spki_der: &[u8]) -> [u8; PROOF_BYTES] {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.secret);
        let mut context = hmac::Context::with_key(&key);
        context.update(b"strata enrol v1\0");
        context.update(node_id.as_bytes());
        context.update(b"\0");
        context.update(spki_der);
        let tag = context.sign();
        let mut out = [0; PROOF_BYTES];
        out.copy_from_slice(&tag.as_ref()[..PROOF_BYTES]);
        out
    }

    /// Whether `proof` is this token's for `node_id` and `spki_der`, compared in
    /// constant time.
    pub fn check_proof(&self, node_id: &str, spki_der: &[u8], proof: &[u8]) -> bool {
        let expected = self.proof(node_id, spki_der);
        proof.len() == expected.len() && expected.iter().zip(proof).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}.{}.{}", crate::hex::encode(&self.ca_sha256), crate::hex::encode(&self.secret))
    }
}

/// The secret is never logged.
impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinToken(ca {})", crate::hex::encode(&self.ca_sha256[..8]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_what_is_not_a_token() {
        let token = JoinToken::new([7; 32], [9; SECRET_BYTES]);
        assert_eq!(JoinToken::parse(&token.to_string()).unwrap(), token);
        assert_eq!(JoinToken::parse(&format!(" {token}\n")).unwrap(), token);
        for bad in
            ["", "strata1", "strata1.00.00", "k10.aa.bb", &format!("{token}.x"), &token.to_string().replace('7', "g")]
        {
            assert!(JoinToken::parse(bad).is_err(), "{bad}");
        }
        assert!(!format!("{token:?}").contains("0909"), "the secret stays out of logs");
    }

    #[test]
    fn a_proof_is_bound_to_node_and_key() {
        let token = JoinToken::new([7; 32], [9; SECRET_BYTES]);
        let proof = token.proof("node-a", b"key-a");
        assert!(token.check_proof("node-a", b"key-a", &proof));
        assert!(!token.check_proof("node-b", b"key-a", &proof));
        assert!(!token.check_proof("node-a", b"key-b", &proof));
        let other = JoinToken::new([7; 32], [8; SECRET_BYTES]);
        assert!(!other.check_proof("node-a", b"key-a", &proof));
    }
}
