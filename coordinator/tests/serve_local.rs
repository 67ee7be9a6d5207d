//! `strata serve-local` as a user runs it: the binary announces its address, answers
//! OpenAI requests over HTTP, and exits cleanly on SIGTERM or SIGINT.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use strata_model::synthetic::SyntheticModel;

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(model: &std::path::Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_strata"))
            .args([
                "serve-local",
                "--model",
                model.to_str().unwrap(),
                "--http-listen",
                "127.0.0.1:0",
                "--model-id",
                "tiny",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the strata binary runs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening http=")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .parse()
            .unwrap();
        Self { child, addr }
    }

    /// One request on its own connection; returns the status and the body.
    fn request(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
        let mut stream = TcpStream::connect(self.addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let body = body.map(Value::to_string).unwrap_or_default();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        let status =
            reply.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("bad reply: {reply}"));
        let body = reply.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        (status, body)
    }

    /// Sends `signal` and waits for a clean exit.
    fn stop(mut self, signal: &str) {
        let sent = Command::new("kill").args([&format!("-{signal}"), &self.child.id().to_string()]).status().unwrap();
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "exit after SIG{signal}: {status}");
                return;
            }
            assert!(Instant::now() < deadline, "still running after SIG{signal}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn serves_completions_and_stops_on_signals() {
    let dir = tempfile::tempdir().unwrap();
    let model = SyntheticModel::tiny().write_to(dir.path()).unwrap();
    for signal in ["TERM", "INT"] {
        let server = Server::start(&model);
        assert_eq!(server.request("GET", "/health", None), (200, r#"{"status":"ok"}"#.to_owned()));
        let (status, body) = server.request("GET", "/v1/models", None);
        assert_eq!(status, 200);
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["data"][0]["id"], "tiny");
        let request = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5});
        let (status, body) = server.request("POST", "/v1/chat/completions", Some(&request));
        assert_eq!(status, 200, "{body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["object"], "chat.completion");
        assert!(body["usage"]["completion_tokens"].as_u64().unwrap() <= 5);
        let (status, body) = server.request(
            "POST",
            "/v1/completions",
            Some(&json!({"model": "tiny", "prompt": "hi", "temperature": 7})),
        );
        assert_eq!(status, 400);
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"]["param"], "temperature");
        server.stop(signal);
    }
}
