//! A `ringmaster serve` process on a free loopback port, and JSON calls to it (shared by
//! the serving and launch tests).
#![allow(dead_code)] // each test crate uses its own part

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running server; killed when dropped.
pub struct Served {
    pub child: Child,
    base: String,
    pub log: mpsc::Receiver<String>,
}

impl Served {
    pub fn start(model: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ringmaster"))
            .args([
                "serve",
                "--name",
                "clf",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
            ])
            .arg("--model")
            .arg(model)
            .args(["--threads", "2"])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, log) = mpsc::channel();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                eprintln!("[serve] {line}");
                let _ = tx.send(line);
            }
        });
        let line = log
            .recv_timeout(Duration::from_secs(30))
            .expect("the server printed where it listens");
        let base = line
            .split("listening on ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line: {line}"))
            .to_string();
        Self { child, base, log }
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while call(&self.url("/v2/health/ready"), None).0 != 200 {
            assert!(Instant::now() < deadline, "the server never became ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn metric(&self, name: &str) -> f64 {
        let (_, text) = call_text(&self.url("/metrics"), None);
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn call_text(url: &str, body: Option<&str>) -> (u16, String) {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build();
    let result = match body {
        Some(body) => agent.post(url).send_string(body),
        None => agent.get(url).call(),
    };
    match result {
        Ok(response) => (response.status(), response.into_string().unwrap()),
        Err(ureq::Error::Status(code, response)) => (code, response.into_string().unwrap()),
        Err(e) => panic!("{url}: {e}"),
    }
}

pub fn call(url: &str, body: Option<&Value>) -> (u16, Value) {
    let (code, text) = call_text(url, body.map(|b| b.to_string()).as_deref());
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url}: {e}: {text}"));
    (code, value)
}
