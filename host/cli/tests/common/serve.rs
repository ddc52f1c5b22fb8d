//! One `eventbroker serve` process for a test: started on a free port, its address read from
//! its own "listening" log line (text or JSON log format), its log kept for assertions.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use eventbroker_testkit::PATIENCE;

/// A `serve` process and the address it bound.
pub struct Served {
    /// The process.
    pub child: Child,
    /// Base URL of its HTTP API.
    pub url: String,
    /// Its log lines, once it has exited.
    pub logs: JoinHandle<Vec<String>>,
}

/// The address in a "listening" log line, in the text (`addr=…`) or JSON (`"addr":"…"`) format.
fn listening_addr(line: &str) -> Option<String> {
    if !line.contains("eventbroker listening") {
        return None;
    }
    if let Ok(entry) = serde_json::from_str::<serde_json::Value>(line) {
        return entry["addr"].as_str().map(str::to_owned);
    }
    let addr = line.split("addr=").nth(1)?;
    Some(addr.split_whitespace().next().unwrap_or("").to_owned())
}

/// Starts `eventbroker serve --listen 127.0.0.1:0 ARGS` in `dir` (`RUST_LOG=info`).
pub fn serve(dir: &Path, args: &[&str]) -> Served {
    serve_with(dir, args, &[])
}

/// Like [`serve`], with extra environment variables (which may override `RUST_LOG`).
///
/// # Panics
/// When the process does not log its address within [`PATIENCE`]; the panic shows its log.
pub fn serve_with(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_eventbroker"))
        .arg("serve")
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .env_remove("EVENTBROKER_SERVER")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start eventbroker serve");
    let stderr = child.stderr.take().expect("stderr");
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let logs = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = listening_addr(&line) {
                let _ = addr_tx.send(addr);
            }
            lines.push(line);
        }
        lines
    });
    match addr_rx.recv_timeout(PATIENCE) {
        Ok(addr) => Served {
            child,
            url: format!("http://{addr}"),
            logs,
        },
        Err(_) => {
            let _ = child.kill();
            let lines = logs.join().unwrap_or_default();
            panic!("serve did not start; its log:\n{}", lines.join("\n"));
        }
    }
}

/// Sends SIGTERM (a graceful stop).
pub fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// Waits for the process to exit, at most [`PATIENCE`].
pub fn wait_exit(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "serve did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Served {
    /// Stops the process with SIGTERM, checks it exited cleanly, and returns its log.
    pub fn stop(mut self) -> Vec<String> {
        sigterm(&self.child);
        let status = wait_exit(&mut self.child);
        assert!(status.success(), "serve exited with {status:?}");
        self.logs.join().expect("log reader")
    }
}
