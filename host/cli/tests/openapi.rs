//! The OpenAPI contract, checked against a live `serve` by a property-based API fuzzer
//! (schemathesis, installed by `guests/install-toolchains.sh api-fuzzer`). It generates
//! requests from `/openapi.json` (valid and invalid ones, and sequences linked through the
//! responses) and checks every answer: no 5xx, the status documented, the content type
//! documented, the body matching the documented schema (so every error is the JSON envelope,
//! which every operation documents as its `default` response).
//!
//! `/v1/stream` (Server-Sent Events, an answer that never ends) and `/v1/ws` (a WebSocket
//! upgrade) are left out: the fuzzer waits for a whole response.

mod common;

use std::process::Command;

use common::serve::serve;
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
    let served = serve(dir.path(), &[]);
    let url = served.url.clone();
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
    let logs = served.stop().join("\n");
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
