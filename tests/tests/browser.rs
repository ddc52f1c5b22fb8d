//! The operator console at `/` in a real browser: Debian's Chromium driven by playwright-core
//! (both installed by `guests/install-toolchains.sh browser`) through the flow an operator
//! follows when a handler rejects orders it should accept — the token prompt, recent events,
//! a filter, a failed event with its log lines, the dead letters, the handlers with their
//! counters and percentiles, a fixed version deployed from the page, the event retried until it
//! completes (with its derived event), and the remaining dead letters retried as a set.
//!
//! The browser script is `tests/console/console.test.cjs`; it saves a screenshot of each view
//! to `target/console-screenshots/` (`.ci/run` lists them). Without Chromium or Node.js the
//! test skips loudly; with `EVENTBROKER_REQUIRE_SERVICES=1` it fails.

use std::process::Command;

use eventbroker_tests::guests::{self, repo_root};
use eventbroker_tests::host::{TestHost, install};
use eventbroker_tests::toolchains;
use serde_json::json;

const TOKEN: &str = "console-test-token";

/// The validator's manifest with `max_quantity` set and quick retries.
fn validator_manifest(max_quantity: u32) -> String {
    format!(
        r#"name = "payload-validator"
patterns = ["shop.orders.create", "shop.orders.update"]
fuel = 10_000_000
memory = "16MiB"
timeout = "2s"

[retry]
max_retries = 2
initial_delay = "50ms"

[config]
max_quantity = "{max_quantity}"
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_a_failed_event_with_its_logs_and_retries_it_to_completion() {
    if !toolchains::ensure("browser") {
        return;
    }
    let built = guests::build();
    let component = built.guest("rust_payload_validator");
    let host = TestHost::start(|config, dir| {
        config.server.token = Some(TOKEN.to_owned());
        install(
            dir,
            "payload-validator",
            &component,
            Some(&validator_manifest(100)),
        );
    })
    .await;

    // History the console shows on open: one valid order whose sku is markup (and the event it
    // derives), one that fails after its retries with log lines, one over the quantity limit.
    let mut ids = Vec::new();
    for payload in [
        // A hostile page's payload: markup that runs script if the console ever renders
        // event data as HTML (the browser script checks it shows as text and runs nothing).
        json!({"sku": "<img src=x onerror=\"window.pwned=1\">", "quantity": 2}),
        json!({"sku": "B-2", "quantity": 1, "simulate": "transient"}),
        json!({"sku": "C-3", "quantity": 500}),
    ] {
        let (status, body) = host
            .publish(
                json!({"type": "shop.orders.create", "payload": payload}),
                "",
            )
            .await;
        assert!(status == 200 || status == 202, "{status} {body}");
        let id = body["id"].as_str().expect("an id").to_owned();
        host.finished(&id).await;
        ids.push(id);
    }
    let fixed = tempfile::tempdir().expect("temp dir");
    let manifest = fixed.path().join("payload-validator.toml");
    std::fs::write(&manifest, validator_manifest(1000)).expect("manifest");
    let screenshots = repo_root().join("target/console-screenshots");
    let _ = std::fs::remove_dir_all(&screenshots);

    let url = host.url.clone();
    let script = repo_root().join("tests/console/console.test.cjs");
    let playwright = toolchains::dir().join("browser/node_modules/playwright-core");
    let (hostile, transient, big) = (ids[0].clone(), ids[1].clone(), ids[2].clone());
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .env("CONSOLE_URL", url)
            .env("CONSOLE_TOKEN", TOKEN)
            .env("CHROMIUM", "/usr/bin/chromium")
            .env("PLAYWRIGHT_CORE", playwright)
            .env("SCREENSHOTS", &screenshots)
            .env("HOSTILE_ID", hostile)
            .env("TRANSIENT_ID", transient)
            .env("BIG_ID", big)
            .env("COMPONENT", component)
            .env("MANIFEST", manifest)
            .output()
            .expect("node runs")
    })
    .await
    .expect("the browser script's thread");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "the console flow failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("console flow passed"), "{stdout}");
    let shots: Vec<&str> = stdout
        .lines()
        .filter_map(|line| line.strip_prefix("screenshot: "))
        .collect();
    assert!(shots.len() >= 11, "one screenshot per view: {shots:?}");
    for shot in shots {
        let size = std::fs::metadata(shot).map(|m| m.len()).unwrap_or(0);
        assert!(size > 1000, "{shot} is {size} bytes");
    }

    // The host agrees with what the page showed: the retried order completed under the
    // version deployed from the page, and derived its event.
    let big = host.finished(&ids[2]).await;
    assert_eq!(big["status"], "completed", "{big:#}");
    let (_, handler) = host.get("/v1/handlers/payload-validator").await;
    assert_eq!(
        big["handlers"][0]["version"], handler["current"]["version"],
        "{big:#}\n{handler:#}"
    );
    let (_, derived) = host.get(&format!("/v1/events?caused_by={}", ids[2])).await;
    assert_eq!(derived["count"], 1, "{derived:#}");
    host.stop().await;
}
