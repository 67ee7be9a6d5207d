//! `strata status --coordinator` as a user types it: a URL works like host:port, and
//! each bad address (a path, a malformed one, a coordinator that is not there) is
//! one line on stderr that names the problem, with a non-zero exit.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Output};

fn strata(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        // The flag under test, not whatever the machine running the tests sets.
        .env_remove("STRATA_COORDINATOR")
        .output()
        .expect("the strata binary runs")
}

/// A port on loopback with nothing listening: bound, then let go.
fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding loopback");
    listener.local_addr().expect("a bound address").port()
}

/// Fails the test unless `out` failed with a single line on stderr containing
/// every one of `expected`.
fn assert_one_line_error(args: &[&str], out: &Output, expected: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: not one line: {stderr}");
    for e in expected {
        assert!(stderr.contains(e), "{args:?}: no {e:?} in {stderr}");
    }
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{args:?}: {stderr}");
}

#[test]
fn bad_coordinator_addresses_get_one_line_each() {
    let port = closed_port();
    let absent = format!("127.0.0.1:{port}");
    let absent_url = format!("http://127.0.0.1:{port}/");
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["status", "--coordinator", "http://127.0.0.1:8000/v1"],
            vec!["--coordinator", "`http://127.0.0.1:8000/v1` has a path /v1; give only scheme://host:port"],
        ),
        (vec!["status", "--coordinator", "127.0.0.1:http"], vec!["--coordinator", "the port `http` is not a number"]),
        (vec!["status", "--coordinator", "::1:8000"], vec!["--coordinator", "an IPv6 address goes in brackets"]),
        (
            vec!["status", "--coordinator", "https://127.0.0.1:8000"],
            vec!["--coordinator", "https is not supported yet"],
        ),
        (
            vec!["drain", "w1", "--coordinator", "ftp://127.0.0.1:8000"],
            vec!["--coordinator", "unknown scheme `ftp://`"],
        ),
        (
            vec!["status", "--coordinator", &absent],
            vec![&absent, "cannot reach the coordinator", "connection refused", "is `strata serve` running?"],
        ),
        // A URL reaches the same place as host:port (here: nothing).
        (
            vec!["status", "--coordinator", &absent_url],
            vec!["cannot reach the coordinator at", &absent, "connection refused"],
        ),
        (vec!["undrain", "w1", "--coordinator", &absent], vec!["cannot reach the coordinator at", &absent]),
    ];
    for (args, expected) in &cases {
        assert_one_line_error(args, &strata(args), expected);
    }
}

/// The environment variable is parsed like the flag.
#[test]
fn the_environment_variable_is_checked_like_the_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["status"])
        .env("STRATA_COORDINATOR", "http://127.0.0.1:8000/admin")
        .output()
        .expect("the strata binary runs");
    assert_one_line_error(&["status"], &out, &["--coordinator", "has a path /admin"]);
}

/// A stand-in coordinator on loopback: answers one request with `status` and `body`,
/// and hands back the request it got.
fn stand_in(status: &'static str, body: &'static str) -> (u16, std::thread::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding loopback");
    let port = listener.local_addr().expect("a bound address").port();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("a connection");
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        // Headers, then the body its Content-Length announces.
        loop {
            let n = stream.read(&mut buf).expect("reading the request");
            request.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&request).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0);
                if body.len() >= length {
                    break;
                }
            }
            if n == 0 {
                break;
            }
        }
        let reply = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(reply.as_bytes()).expect("writing the reply");
        String::from_utf8_lossy(&request).to_string()
    });
    (port, server)
}

/// `http://HOST:PORT/` reaches an HTTP server at HOST:PORT, and an error the API
/// answers with (an unknown node, as `strata serve` words it) is its one line.
#[test]
fn a_url_reaches_the_coordinator_and_its_refusal_is_one_line() {
    let (port, server) = stand_in(
        "404 Not Found",
        r#"{"error":{"message":"no worker is named `nosuchnode` (known: w1, w2)","type":"invalid_request_error","param":"node"}}"#,
    );
    let url = format!("http://127.0.0.1:{port}/");
    let args = ["drain", "nosuchnode", "--coordinator", url.as_str()];
    assert_one_line_error(&args, &strata(&args), &["no worker is named `nosuchnode` (known: w1, w2)"]);
    let request = server.join().expect("the stand-in coordinator");
    assert!(request.starts_with("POST /admin/drain HTTP/1.1\r\n"), "{request}");
    assert!(request.contains(&format!("Host: 127.0.0.1:{port}\r\n")), "{request}");
}

/// Another service on the port: one line saying so, not an empty message.
#[test]
fn a_server_that_is_not_a_coordinator_is_named_as_such() {
    let (port, server) = stand_in("404 Not Found", "");
    let address = format!("127.0.0.1:{port}");
    let args = ["status", "--coordinator", address.as_str()];
    let expected = format!("the server at {address} is not a strata coordinator: /admin/status answered HTTP 404");
    assert_one_line_error(&args, &strata(&args), &[&expected]);
    server.join().expect("the stand-in server");
}
