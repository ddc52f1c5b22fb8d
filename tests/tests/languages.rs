//! Handlers in every language do the same thing: each payload validator (Python, JavaScript,
//! C, Go) runs the Rust reference's sample events in the same sandbox as `eventbroker run`,
//! and must give the same outcomes, failure kinds and messages, log lines and derived events
//! as `guests/rust-payload-validator`.

use std::path::Path;

use eventbroker_tests::guests::{self, repo_root};
use eventbroker_tests::toolchains::{self, Language, PAYLOAD_VALIDATORS};
use eventbroker_wasm::WasmEngine;
use eventbroker_wasm::config::PoolConfig;
use eventbroker_wasm::runner::{Overrides, RunReport, parse_events, run};
use serde_json::{Value, json};

/// What a handler did with one event, in a form that can be compared across languages.
#[derive(Debug, PartialEq)]
struct Observed {
    /// Whether the event's type matches the handler's patterns.
    matched: bool,
    /// `ok`, or the failure's kind, retry decision and message.
    outcome: String,
    /// Level and message of each log line; ids of published events read `<published id>`.
    logs: Vec<(String, String)>,
    /// Type, source, payload and user id of each derived event.
    published: Vec<Value>,
}

fn reference_folder() -> std::path::PathBuf {
    repo_root().join("guests/rust-payload-validator")
}

fn sample_events() -> String {
    std::fs::read_to_string(reference_folder().join("sample-events.jsonl")).expect("sample events")
}

async fn run_sample_events(wasm: &Path, folder: &Path) -> RunReport {
    let pool = PoolConfig {
        instances: 4,
        ..Default::default()
    };
    let engine = WasmEngine::new(&pool, Some(repo_root().join("target/test-component-cache")))
        .expect("engine");
    let bytes = std::fs::read(wasm).expect("component");
    let manifest = std::fs::read_to_string(folder.join("manifest.toml")).expect("manifest");
    let events = parse_events(&sample_events()).expect("sample events parse");
    run(
        &engine,
        &bytes,
        Some(&manifest),
        &Overrides::default(),
        events,
    )
    .await
    .unwrap_or_else(|e| panic!("{} does not load: {e}", wasm.display()))
}

fn observe(report: &RunReport) -> Vec<Observed> {
    report
        .results
        .iter()
        .zip(&report.matched)
        .map(|(result, matched)| {
            let invocation = &result.invocation;
            let outcome = match &invocation.result {
                Ok(()) => "ok".to_owned(),
                Err(failure) => format!(
                    "{} (retryable: {}): {}",
                    failure.kind.as_str(),
                    failure.retryable,
                    failure.message
                ),
            };
            let logs = invocation
                .logs
                .iter()
                .map(|line| {
                    let message = invocation
                        .published
                        .iter()
                        .fold(line.message.clone(), |message, event| {
                            message.replace(&event.id, "<published id>")
                        });
                    (line.level.to_owned(), message)
                })
                .collect();
            let published = invocation
                .published
                .iter()
                .map(|event| {
                    json!({
                        "type": event.event_type,
                        "source": event.source,
                        "payload": event.payload,
                        "user_id": event.user_id,
                    })
                })
                .collect();
            Observed {
                matched: *matched,
                outcome,
                logs,
                published,
            }
        })
        .collect()
}

async fn reference() -> (RunReport, Vec<Observed>) {
    let built = tokio::task::spawn_blocking(guests::build)
        .await
        .expect("build");
    let report =
        run_sample_events(&built.guest("rust_payload_validator"), &reference_folder()).await;
    let observed = observe(&report);
    (report, observed)
}

fn summary(name: &str, report: &RunReport) -> String {
    let handler = &report.handler;
    format!(
        "{name}: {} bytes, {} in {:?}, first invocation latency {:?}, fuel per event {:?}",
        handler.size,
        if handler.compiled_from_cache {
            "loaded from cache"
        } else {
            "compiled"
        },
        handler.compile_time,
        report.first_invocation_latency,
        report
            .results
            .iter()
            .map(|r| r.invocation.fuel_used)
            .collect::<Vec<_>>(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_uses_every_import_and_both_failure_kinds() {
    let (report, observed) = reference().await;
    eprintln!("{}", summary("rust", &report));
    let outcomes: Vec<&str> = observed
        .iter()
        .map(|o| o.outcome.split(' ').next().unwrap_or(""))
        .collect();
    for kind in ["ok", "fail", "retry"] {
        assert!(outcomes.contains(&kind), "no {kind} among {outcomes:?}");
    }
    assert!(
        observed.iter().all(|o| o.matched),
        "every sample event is delivered"
    );
    let first = &observed[0];
    assert_eq!(
        first.published,
        [
            json!({"type": "shop.orders.validated", "source": "internal",
                "payload": {"sku": "BOOK-1", "quantity": 2}, "user_id": 42})
        ],
        "publish"
    );
    assert_eq!(
        first.logs,
        [
            (
                "info".to_owned(),
                "order line BOOK-1 x2 is valid".to_owned()
            ),
            (
                "info".to_owned(),
                "published shop.orders.validated <published id>".to_owned()
            ),
        ],
        "log"
    );
    assert_eq!(
        observed[3].outcome, "fail (retryable: false): \"quantity\" 500 is outside 1..=100",
        "config max_quantity = 100 from the manifest"
    );
}

async fn matches_the_reference(language: Language) {
    let own = std::fs::read_to_string(language.folder().join("sample-events.jsonl"))
        .expect("the guest has sample-events.jsonl");
    assert_eq!(
        own,
        sample_events(),
        "guests/{}/sample-events.jsonl must equal the reference's",
        language.dir
    );
    let Some(wasm) = tokio::task::spawn_blocking(move || toolchains::build(language))
        .await
        .expect("build")
    else {
        return;
    };
    let (_, expected) = reference().await;
    let report = run_sample_events(&wasm, &language.folder()).await;
    eprintln!("{}", summary(language.name, &report));
    let observed = observe(&report);
    assert_eq!(observed.len(), expected.len());
    for (index, (got, want)) in observed.iter().zip(&expected).enumerate() {
        assert_eq!(
            got,
            want,
            "{}: sample event {} differs from the Rust reference",
            language.name,
            index + 1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_handler_matches_the_rust_reference() {
    matches_the_reference(PAYLOAD_VALIDATORS[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javascript_handler_matches_the_rust_reference() {
    matches_the_reference(PAYLOAD_VALIDATORS[1]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_handler_matches_the_rust_reference() {
    matches_the_reference(PAYLOAD_VALIDATORS[2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_handler_matches_the_rust_reference() {
    matches_the_reference(PAYLOAD_VALIDATORS[3]).await;
}
