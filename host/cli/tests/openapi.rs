//! The OpenAPI contract, checked against a live `serve` by a property-based API fuzzer
//! (schemathesis, installed by `guests/install-toolchains.sh api-fuzzer`). It generates
//! requests from `/openapi.json` (valid and invalid ones, and sequences linked through the
//! responses) and checks every answer: no 5xx, the status documented, the content type
//! documented, the body matching the documented schema (so every error is the JSON envelope,
//! which every operation documents as its `default` response).
//!
//! `/v1/stream` (Server-Sent Events, an answer that never ends) and `/v1/ws` (a WebSocket
//! upgrade) are left out: the fuzzer waits for a whole response.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use eventbroker_testkit::{guests, toolchains};

#[test]
fn every_response_matches_the_openapi_document() {
    if !toolchains::ensure("api-fuzzer") {
        return;
    }
    let fuzzer = toolchains::dir().join("api-fuzzer/bin/schemathesis");
    let built = guests::build();
    let dir = tempfile::tempdir().expect("tempdir");
    // A deployed handler, so that the handler routes answer with real documents too.
    let handlers = dir.path().join("handlers");
    std::fs::create_dir(&handlers).expect("handlers dir");
    std::fs::copy(
        built.guest("rust_audit_logger"),
        handlers.join("audit-logger.wasm"),
    )
    .expect("copy guest");
    let mut serve = Command::new(env!("CARGO_BIN_EXE_eventbroker"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start serve");
    let stderr = serve.stderr.take().expect("stderr");
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let logs = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("eventbroker listening")
                && let Some(addr) = line.split("addr=").nth(1)
            {
                let _ = addr_tx.send(addr.split_whitespace().next().unwrap_or("").to_owned());
            }
            lines.push(line);
        }
        lines
    });
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("serve logs its address");
    let url = format!("http://{addr}");
    let output = toolchains::run_clean(
        Command::new(&fuzzer).args([
            "run",
            &format!("{url}/openapi.json"),
            "--url",
            &url,
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--exclude-path",
            "/v1/stream",
            "--exclude-path",
            "/v1/ws",
            "--max-examples",
            "50",
            "--request-timeout",
            "30",
            "--no-color",
        ]),
        dir.path(),
    );
    let _ = Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status();
    let _ = serve.wait();
    let logs = logs.join().expect("log reader").join("\n");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "the API fuzzer found responses that break the OpenAPI document:\n{report}"
    );
    assert!(
        report.contains("passed"),
        "the fuzzer ran no test cases:\n{report}"
    );
    assert!(!logs.contains("panicked"), "serve panicked:\n{logs}");
}
