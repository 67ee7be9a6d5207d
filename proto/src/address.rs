//! The address of a coordinator or worker as people type it: one parser for every
//! flag that names a peer to reach (`strata status --coordinator`, `strata serve
//! --worker`, `--grpc-advertise`, `strata-worker --join`, `--advertise`, `--address`).
//!
//! It takes `host:port`, `[v6]:port`, or a URL `http://host:port`, with an optional
//! trailing `/`: a URL is what people paste from a browser or a log line. What a
//! URL may carry besides is refused, not dropped: a path (`http://box:8000/v1` is
//! most likely a proxy strata would bypass), a query, a user name. So is `https://`:
//! neither the CLI's HTTP client nor the gRPC transport speaks TLS yet, and a plain
//! connection to a TLS port would fail later with a far less clear message.
//!
//! A flag whose peer has one obvious port may fill it in
//! ([`Address::parse_with_default_port`]); the others require it ([`Address::parse`]).
//! Flags hand on [`Address::to_string`], `host:port`, the one form the rest of
//! strata (the wire's worker addresses, [`crate::transport::endpoint`]) reads.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// A peer's host and port, checked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Address {
    /// A name, an IPv4 address or an IPv6 address (without brackets).
    host: String,
    port: u16,
}

/// Why an address does not parse. Each message quotes the text and says what to
/// give instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("an empty address; give host:port")]
    Empty,
    /// Shown escaped (`\n`), so that the message stays one line.
    #[error("`{}` contains a space or control character", .0.escape_debug())]
    Space(String),
    #[error("`{text}`: https is not supported yet (strata speaks plain HTTP and gRPC, no TLS); give http://host:port or host:port")]
    Https { text: String },
    #[error("`{text}` has an unknown scheme `{scheme}://`; give host:port or http://host:port")]
    Scheme { text: String, scheme: String },
    #[error("`{text}` has a path {path}; give only scheme://host:port")]
    Path { text: String, path: String },
    #[error("`{text}` has a query or fragment {rest}; give only scheme://host:port")]
    Query { text: String, rest: String },
    #[error("`{text}` has a user name; strata has no logins, give only host:port")]
    User { text: String },
    #[error("`{0}` has no host; give host:port")]
    EmptyHost(String),
    #[error("`{text}`: `{host}` is not a host name or IP address")]
    BadHost { text: String, host: String },
    #[error("`{0}`: an IPv6 address goes in brackets, as [::1]:7070")]
    Ipv6WithoutBrackets(String),
    #[error("`{0}` has no port; give host:port")]
    MissingPort(String),
    #[error("`{text}`: the port `{port}` is not a number from 1 to 65535")]
    BadPort { text: String, port: String },
}

impl Address {
    /// `host:port`, `[v6]:port` or `http://host:port[/]`; the port is required.
    pub fn parse(text: &str) -> Result<Self, AddressError> {
        Self::parse_with_default_port(text, None)
    }

    /// As [`Address::parse`], with `default_port` where the text gives none. (Even
    /// after `http://`: a strata peer never listens on HTTP's port 80 by default, so
    /// `http://box` means the strata port, not 80.)
    pub fn parse_with_default_port(text: &str, default_port: Option<u16>) -> Result<Self, AddressError> {
        if text.is_empty() {
            return Err(AddressError::Empty);
        }
        // Refused rather than trimmed: a space is usually a quoting slip that cut or
        // joined two arguments, and guessing would hide it.
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(AddressError::Space(text.to_string()));
        }
        let owned = || text.to_string();
        let rest = match text.split_once("://") {
            None => text,
            Some((scheme, rest)) => match scheme.to_ascii_lowercase().as_str() {
                "http" => rest,
                "https" => return Err(AddressError::Https { text: owned() }),
                _ => return Err(AddressError::Scheme { text: owned(), scheme: scheme.to_string() }),
            },
        };
        // The authority ends where a path, query or fragment starts.
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        match tail {
            "" | "/" => {}
            _ if tail.starts_with('/') => return Err(AddressError::Path { text: owned(), path: tail.to_string() }),
            _ => return Err(AddressError::Query { text: owned(), rest: tail.to_string() }),
        }
        if authority.contains('@') {
            return Err(AddressError::User { text: owned() });
        }
        let (host, port) = split_host_port(text, authority)?;
        if host.is_empty() {
            return Err(AddressError::EmptyHost(owned()));
        }
        let port = match port {
            None | Some("") => default_port.ok_or_else(|| AddressError::MissingPort(owned()))?,
            Some(port) => match port.parse::<u16>() {
                // Port 0 means "any port" to a listener; nothing can be reached at it.
                Ok(p) if p > 0 => p,
                _ => return Err(AddressError::BadPort { text: owned(), port: port.to_string() }),
            },
        };
        Ok(Self { host, port })
    }

    /// A name, an IPv4 address or an IPv6 address (without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://host:port`, the URI a gRPC endpoint wants.
    pub fn url(&self) -> String {
        format!("http://{self}")
    }
}

/// The host (checked, IPv6 without brackets) and the port text, if any, of
/// `authority`; `text` is the whole address, for the messages.
fn split_host_port<'a>(text: &str, authority: &'a str) -> Result<(String, Option<&'a str>), AddressError> {
    let bad_host = |host: &str| AddressError::BadHost { text: text.to_string(), host: host.to_string() };
    if let Some(bracketed) = authority.strip_prefix('[') {
        let Some((inside, after)) = bracketed.split_once(']') else {
            return Err(bad_host(authority));
        };
        let ip: Ipv6Addr = inside.parse().map_err(|_| bad_host(&format!("[{inside}]")))?;
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':').ok_or_else(|| bad_host(authority))?),
        };
        return Ok((ip.to_string(), port));
    }
    let (host, port) = match authority.split_once(':') {
        None => (authority, None),
        // Two colons or more outside brackets: an IPv6 address, whose port could
        // not be told from its last group.
        Some((_, port)) if port.contains(':') => return Err(AddressError::Ipv6WithoutBrackets(text.to_string())),
        Some((host, port)) => (host, Some(port)),
    };
    // Letters, digits, `-`, `.` (and `_`, which some home routers hand out in names).
    let name_like = host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    // All digits and dots is meant as an IPv4 address: `10.0.0.300` would otherwise
    // be looked up as a name and fail with a resolver's message.
    let ipv4_like = !host.is_empty() && host.chars().all(|c| c.is_ascii_digit() || c == '.');
    if !name_like || (ipv4_like && host.parse::<Ipv4Addr>().is_err()) {
        return Err(bad_host(host));
    }
    Ok((host.to_string(), port))
}

impl fmt::Display for Address {
    /// `host:port`, `[v6]:port`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for Address {
    type Err = AddressError;

    /// [`Address::parse`]: the port is required.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

/// `text` parsed (port required) and written back as `host:port`: for a clap
/// `value_parser` whose flag is then handed on as a string.
pub fn canonical(text: &str) -> Result<String, AddressError> {
    Address::parse(text).map(|a| a.to_string())
}

/// Why connecting failed, in a few words for a one-line message: the I/O error
/// deepest in `error`'s chain (`connection refused`, `no answer within 5s`,
/// `failed to lookup address information: ...`) without its `(os error N)`, else
/// the last message of the chain.
pub fn unreachable_reason(error: &(dyn std::error::Error + 'static)) -> String {
    let mut last = error;
    let mut io = None;
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(e) = e.downcast_ref::<std::io::Error>() {
            io = Some(e);
        }
        last = e;
        next = e.source();
    }
    let text = match io {
        Some(e) => e.to_string(),
        None => last.to_string(),
    };
    let text = match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => &text[..i],
        _ => text.as_str(),
    };
    // Lower case after the `: ` it follows ("Connection refused" from the OS), but
    // not an acronym ("DNS").
    let mut chars = text.chars();
    match (chars.next(), chars.clone().next()) {
        (Some(first), Some(second)) if second.is_lowercase() => first.to_lowercase().chain(chars).collect(),
        _ => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> String {
        match Address::parse(text) {
            Ok(a) => a.to_string(),
            Err(e) => panic!("{text}: {e}"),
        }
    }

    fn err(text: &str) -> AddressError {
        match Address::parse(text) {
            Ok(a) => panic!("{text} parsed as {a}"),
            Err(e) => e,
        }
    }

    #[test]
    fn host_port_and_urls_become_host_port() {
        for (text, expected) in [
            ("127.0.0.1:8000", "127.0.0.1:8000"),
            ("localhost:7100", "localhost:7100"),
            ("coordinator.lan:7000", "coordinator.lan:7000"),
            ("gaming-pc:7070", "gaming-pc:7070"),
            ("my_box:1", "my_box:1"),
            ("box:65535", "box:65535"),
            ("http://127.0.0.1:8000", "127.0.0.1:8000"),
            ("http://127.0.0.1:8000/", "127.0.0.1:8000"),
            ("HTTP://box:8000", "box:8000"),
            ("box:8000/", "box:8000"),
            ("[::1]:7070", "[::1]:7070"),
            ("http://[::1]:8000/", "[::1]:8000"),
            ("[0:0:0:0:0:0:0:1]:7070", "[::1]:7070"),
            ("[fe80::1]:80", "[fe80::1]:80"),
        ] {
            assert_eq!(ok(text), expected, "{text}");
        }
        let a = Address::parse("http://[::1]:8000").unwrap();
        assert_eq!((a.host(), a.port(), a.url().as_str()), ("::1", 8000, "http://[::1]:8000"));
        assert_eq!("box:1".parse::<Address>().unwrap().url(), "http://box:1");
        assert_eq!(canonical("http://box:7100/").unwrap(), "box:7100");
    }

    #[test]
    fn a_default_port_fills_in_only_a_missing_one() {
        let parse = |t| Address::parse_with_default_port(t, Some(8000)).map(|a| a.to_string());
        assert_eq!(parse("box").unwrap(), "box:8000");
        assert_eq!(parse("http://box").unwrap(), "box:8000");
        assert_eq!(parse("http://box/").unwrap(), "box:8000");
        assert_eq!(parse("box:").unwrap(), "box:8000");
        assert_eq!(parse("[::1]").unwrap(), "[::1]:8000");
        assert_eq!(parse("box:9000").unwrap(), "box:9000");
        assert!(matches!(parse("box:x"), Err(AddressError::BadPort { .. })));
        assert!(matches!(parse("http://box/v1"), Err(AddressError::Path { .. })));
    }

    #[test]
    fn each_mistake_gets_its_own_message() {
        let cases: &[(&str, &str)] = &[
            ("", "an empty address; give host:port"),
            ("http://box:8000/v1", "`http://box:8000/v1` has a path /v1; give only scheme://host:port"),
            ("box:8000/v1/chat", "`box:8000/v1/chat` has a path /v1/chat"),
            ("http://box:8000/?x=1", "has a path /?x=1"),
            ("http://box:8000?x=1", "has a query or fragment ?x=1"),
            ("box:8000#top", "has a query or fragment #top"),
            ("https://box:8000", "https is not supported yet"),
            ("grpc://box:7100", "`grpc://box:7100` has an unknown scheme `grpc://`"),
            ("://box:7100", "has an unknown scheme `://`"),
            ("box", "`box` has no port; give host:port"),
            ("http://box", "`http://box` has no port"),
            ("box:", "`box:` has no port"),
            ("[::1]", "`[::1]` has no port"),
            ("box:http", "the port `http` is not a number from 1 to 65535"),
            ("box:0", "the port `0` is not"),
            ("box:65536", "the port `65536` is not"),
            ("box:-1", "the port `-1` is not"),
            (":8000", "`:8000` has no host"),
            ("http://:8000", "`http://:8000` has no host"),
            ("http://", "`http://` has no host"),
            ("/v1", "has a path /v1"),
            ("box 1:8000", "`box 1:8000` contains a space"),
            (" box:8000", "contains a space"),
            ("box:8000\n", "`box:8000\\n` contains a space"),
            ("box\u{7}:8000", "`box\\u{7}:8000` contains a space or control character"),
            ("::1:8000", "an IPv6 address goes in brackets"),
            ("fe80::1", "an IPv6 address goes in brackets"),
            ("[::1:8000", "`[::1:8000` is not a host name or IP address"),
            ("[box]:8000", "`[box]` is not a host name or IP address"),
            ("[::1]8000", "`[::1]8000` is not a host name"),
            ("10.0.0.300:8000", "`10.0.0.300` is not a host name or IP address"),
            ("bo*x:8000", "`bo*x` is not a host name"),
            ("user@box:8000", "has a user name"),
            ("http://user:pw@box:8000", "has a user name"),
        ];
        for (text, expected) in cases {
            let message = err(text).to_string();
            assert!(message.contains(expected), "{text:?}: {message}");
            assert!(!message.contains('\n'), "{text:?}: {message}");
        }
    }

    #[test]
    fn the_reason_is_the_io_error_without_its_code() {
        // As Linux words it; the text, not the code, is what is rewritten.
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused (os error 111)");
        assert_eq!(unreachable_reason(&refused), "connection refused");
        let dns = std::io::Error::other("DNS lookup failed");
        assert_eq!(unreachable_reason(&dns), "DNS lookup failed");
        #[derive(Debug, thiserror::Error)]
        #[error("connecting")]
        struct Outer(#[source] std::io::Error);
        let timed_out = std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 5s");
        assert_eq!(unreachable_reason(&Outer(timed_out)), "no answer within 5s");
        assert_eq!(unreachable_reason(&AddressError::Empty), "an empty address; give host:port");
    }
}
