//! Transport settings both ends of a strata connection share.
//!
//! Every client and server is built here so that message limits, flow-control
//! windows and Nagle's algorithm are set once, on purpose: tonic's defaults (a 4 MiB
//! decode limit, 64 KiB HTTP/2 windows, Nagle left to the OS) would stall a long
//! prefill's frames and add latency to every decode step.

use std::time::Duration;

use tonic::transport::{Endpoint, Server};

/// HTTP/2 flow-control window, per stream and per connection: large enough that a
/// full frame ([`crate::FRAME_TARGET_BYTES`]) travels without waiting on window
/// updates.
pub const WINDOW_BYTES: u32 = 16 * 1024 * 1024;

/// How long a connection attempt may take before it counts as failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A client endpoint for `address` (`host:port`, or a URL with a scheme).
pub fn endpoint(address: &str) -> Result<Endpoint, tonic::transport::Error> {
    let uri = if address.contains("://") { address.to_string() } else { format!("http://{address}") };
    Ok(Endpoint::from_shared(uri)?
        .tcp_nodelay(true)
        .connect_timeout(CONNECT_TIMEOUT)
        .initial_stream_window_size(WINDOW_BYTES)
        .initial_connection_window_size(WINDOW_BYTES)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20)))
}

/// A server builder with the same settings as [`endpoint`].
pub fn server() -> Server {
    Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(WINDOW_BYTES)
        .initial_connection_window_size(WINDOW_BYTES)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
}

/// The accepted connections of `listener`, with Nagle's algorithm off. (A server
/// given its own incoming stream ignores the builder's TCP settings.)
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}
