//! A minimal HTTP/1.1 client for talking to our own API: `strata demo` streams an
//! answer with it, and the end-to-end tests use it. One request per connection
//! (`Connection: close`), chunked bodies decoded as they arrive, server-sent events
//! split into their `data:` payloads.

use std::time::Duration;

use strata_proto::transport::CONNECT_TIMEOUT;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("connecting to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed response: {0}")]
    Malformed(String),
    #[error("HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("no response within {0:?}")]
    Timeout(Duration),
}

/// A whole response.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Result<serde_json::Value, HttpError> {
        serde_json::from_str(&self.body).map_err(|e| HttpError::Malformed(format!("{e}: {}", self.body)))
    }
}

struct Response {
    stream: TcpStream,
    status: u16,
    chunked: bool,
    /// Body bytes already read past the headers.
    buffered: Vec<u8>,
}

async fn send(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    key: Option<&str>,
) -> Result<Response, HttpError> {
    // Bounded like a gRPC connection: a host that drops packets would otherwise
    // keep the caller waiting as long as the OS retries (minutes).
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await.unwrap_or_else(|_| {
        Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer within {CONNECT_TIMEOUT:?}")))
    });
    let mut stream = connect.map_err(|e| HttpError::Connect(addr.to_string(), e))?;
    stream.set_nodelay(true)?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let authorization = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{authorization}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buffered = Vec::new();
    let header_end = loop {
        if let Some(i) = buffered.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let mut buf = [0u8; 4096];
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(HttpError::Malformed("the connection closed inside the headers".into()));
        }
        buffered.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&buffered[..header_end]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| HttpError::Malformed(format!("bad status line in {head:?}")))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    buffered.drain(..header_end + 4);
    Ok(Response { stream, status, chunked, buffered })
}

impl Response {
    /// Calls `on_bytes` with body bytes as they arrive (de-chunked).
    async fn body(mut self, mut on_bytes: impl FnMut(&[u8])) -> Result<(), HttpError> {
        let mut raw = std::mem::take(&mut self.buffered);
        let mut buf = vec![0u8; 16 * 1024];
        if !self.chunked {
            on_bytes(&raw);
            loop {
                let n = self.stream.read(&mut buf).await?;
                if n == 0 {
                    return Ok(());
                }
                on_bytes(&buf[..n]);
            }
        }
        loop {
            // Take every complete chunk in `raw`.
            while let Some(line_end) = raw.windows(2).position(|w| w == b"\r\n") {
                let size_text = String::from_utf8_lossy(&raw[..line_end]).to_string();
                let size_text = size_text.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size_text, 16)
                    .map_err(|_| HttpError::Malformed(format!("bad chunk size {size_text:?}")))?;
                if size == 0 {
                    return Ok(());
                }
                if raw.len() < line_end + 2 + size + 2 {
                    break;
                }
                on_bytes(&raw[line_end + 2..line_end + 2 + size]);
                raw.drain(..line_end + 2 + size + 2);
            }
            let n = self.stream.read(&mut buf).await?;
            if n == 0 {
                return Err(HttpError::Malformed("the connection closed inside a chunked body".into()));
            }
            raw.extend_from_slice(&buf[..n]);
        }
    }
}

/// Sends a request and reads the whole response. `addr` is `host:port` (user input
/// goes through [`strata_proto::address`] first).
pub async fn request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<Reply, HttpError> {
    request_with_key(addr, method, path, body, None).await
}

/// [`request`] with `Authorization: Bearer KEY` when a key is given.
pub async fn request_with_key(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    key: Option<&str>,
) -> Result<Reply, HttpError> {
    let response = send(addr, method, path, body, key).await?;
    let status = response.status;
    let mut bytes = Vec::new();
    response.body(|b| bytes.extend_from_slice(b)).await?;
    Ok(Reply { status, body: String::from_utf8_lossy(&bytes).to_string() })
}

/// POSTs `body` and calls `on_event` with each server-sent event's JSON payload as
/// it arrives, until `[DONE]`. A status other than 200 is an error with the body.
pub async fn post_events(
    addr: &str,
    path: &str,
    body: &serde_json::Value,
    mut on_event: impl FnMut(serde_json::Value),
) -> Result<(), HttpError> {
    let response = send(addr, "POST", path, Some(body), None).await?;
    if response.status != 200 {
        let status = response.status;
        let mut bytes = Vec::new();
        response.body(|b| bytes.extend_from_slice(b)).await?;
        return Err(HttpError::Status { status, body: String::from_utf8_lossy(&bytes).to_string() });
    }
    let mut pending = Vec::new();
    let mut events = Vec::new();
    let mut bad = None;
    response
        .body(|b| {
            pending.extend_from_slice(b);
            while let Some(i) = pending.windows(2).position(|w| w == b"\n\n") {
                let event = String::from_utf8_lossy(&pending[..i]).to_string();
                pending.drain(..i + 2);
                for line in event.lines() {
                    if let Some(data) = line.strip_prefix("data:") {
                        let data = data.trim();
                        if data == "[DONE]" {
                            continue;
                        }
                        match serde_json::from_str(data) {
                            Ok(v) => events.push(v),
                            Err(e) => bad = Some(format!("{e}: {data}")),
                        }
                    }
                }
            }
            for e in events.drain(..) {
                on_event(e);
            }
        })
        .await?;
    match bad {
        Some(b) => Err(HttpError::Malformed(b)),
        None => Ok(()),
    }
}
