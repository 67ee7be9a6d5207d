//! Transport settings both ends of a strata connection share.
//!
//! Every client and server is built here so that message limits, flow-control
//! windows, keepalive and Nagle's algorithm are set once, on purpose: tonic's
//! defaults (a 4 MiB decode limit, 64 KiB HTTP/2 windows, Nagle left to the OS)
//! would stall a long prefill's frames and add latency to every decode step, and a
//! call to a peer cut off from the network would hang as long as TCP retries.

use std::time::Duration;

use tonic::transport::{Endpoint, Server};

/// HTTP/2 flow-control window, per stream and per connection: large enough that a
/// full frame ([`crate::FRAME_TARGET_BYTES`]) travels without waiting on window
/// updates.
pub const WINDOW_BYTES: u32 = 16 * 1024 * 1024;

/// How long a connection attempt may take before it counts as failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection that has read nothing for this long while a call is open sends an
/// HTTP/2 PING (both ends: clients and servers).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);

/// How long a PING may go unanswered before the connection is closed and every
/// call on it fails. A peer whose link went down closes nothing and TCP keeps
/// retransmitting for minutes: without this, a call to it (a stage's Forward
/// stream, a load) would hang that long. A live peer answers from its runtime, not
/// its compute threads; what can delay the answer is the data queued ahead of the
/// PING in a socket buffer (a few MiB, a few seconds on a slow Wi-Fi link), so
/// this is well above that, and a dead path is found within interval + timeout.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Calls one peer may have open on one connection at once. A node's own use is a
/// few (an event stream, a Forward stream per pipeline, a pull, short calls);
/// without a limit a peer could open streams until the server runs out of memory.
/// Beyond it, the peer's new calls wait for one of its own to end (HTTP/2 flow
/// control), nobody else's.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 128;

/// A client endpoint for `address` (`host:port`, or a URL with a scheme).
pub fn endpoint(address: &str) -> Result<Endpoint, tonic::transport::Error> {
    let uri = if address.contains("://") { address.to_string() } else { format!("http://{address}") };
    Ok(Endpoint::from_shared(uri)?
        .tcp_nodelay(true)
        .connect_timeout(CONNECT_TIMEOUT)
        .initial_stream_window_size(WINDOW_BYTES)
        .initial_connection_window_size(WINDOW_BYTES)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT))
}

/// A server builder with the same settings as [`endpoint`].
pub fn server() -> Server {
    Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(WINDOW_BYTES)
        .initial_connection_window_size(WINDOW_BYTES)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
}

/// The accepted connections of `listener`, with Nagle's algorithm off. (A server
/// given its own incoming stream ignores the builder's TCP settings.)
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}
