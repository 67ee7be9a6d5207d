//! The few files trust keeps: written whole (a temporary file renamed over the old
//! one), private ones readable by their owner only.

use std::io::Write;
use std::path::Path;

use crate::error::TrustError;

pub fn read(path: &Path) -> Result<Option<String>, TrustError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TrustError::file(path)(e)),
    }
}

/// Writes `text` to `path`; `private` files (keys, the token's secret) get mode 0600
/// where the system has modes.
pub fn write(path: &Path, text: &str, private: bool) -> Result<(), TrustError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(TrustError::file(dir))?;
    let partial = path.with_extension("partial");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(&partial).map_err(TrustError::file(&partial))?;
    file.write_all(text.as_bytes()).and_then(|()| file.sync_all()).map_err(TrustError::file(&partial))?;
    std::fs::rename(&partial, path).map_err(TrustError::file(path))
}

pub fn pem_der(path: &Path, text: &str) -> Result<Vec<u8>, TrustError> {
    pem_blocks(text)
        .into_iter()
        .next()
        .ok_or_else(|| TrustError::Corrupt { path: path.to_path_buf(), reason: "no PEM block".into() })
}

/// The DER of every `-----BEGIN ...-----` block in `text`.
pub fn pem_blocks(text: &str) -> Vec<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(text.as_bytes())
        .filter_map(Result::ok)
        .map(|c| c.to_vec())
        .collect()
}

pub fn cert_pem(der: &[u8]) -> String {
    pem("CERTIFICATE", der)
}

pub fn pem(label: &str, der: &[u8]) -> String {
    let body = base64(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trips() {
        for len in [0usize, 1, 2, 3, 47, 48, 49, 300] {
            let der: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let text = cert_pem(&der);
            if len > 0 {
                assert_eq!(pem_blocks(&text), vec![der], "{len}");
            }
        }
    }
}
