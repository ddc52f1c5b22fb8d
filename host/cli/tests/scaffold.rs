//! `eventbroker new NAME --lang LANG` in each of the five languages, followed as the README
//! says: `./build.sh`, then `eventbroker run dist/NAME.wasm --event sample-event.json
//! --manifest manifest.toml`, then `eventbroker deploy` to a running host and a publish of the
//! sample event. The scaffold must build with its one command and greet the sample event's
//! name; a payload that is not an object must fail.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::serve::serve_with;
use eventbroker_testkit::toolchains;
use serde_json::Value;

fn eventbroker(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_eventbroker"));
    command.current_dir(dir);
    command
}

fn ok(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed ({:?}):\n{}",
        output.status,
        toolchains::output_tail(output)
    );
}

/// Scaffolds, builds and runs one language's handler.
fn scaffold_builds_and_runs(lang: &'static str) {
    if !toolchains::ensure(lang) {
        return;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let name = format!("greeter-{lang}");
    let created = eventbroker(work.path())
        .args(["new", &name, "--lang", lang, "--json"])
        .output()
        .expect("run eventbroker new");
    ok(&created, "eventbroker new");
    let report: Value = serde_json::from_slice(&created.stdout).expect("new --json prints JSON");
    assert_eq!(report["component"], format!("dist/{name}.wasm"));
    let project = work.path().join(&name);
    // A second `new` into the same folder is refused, and touches nothing.
    let again = eventbroker(work.path())
        .args(["new", &name, "--lang", lang])
        .output()
        .expect("run eventbroker new again");
    assert_eq!(again.status.code(), Some(2), "refused as a usage error");
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));

    let built = toolchains::run_clean(
        Command::new("./build.sh").env("CARGO_TERM_COLOR", "never"),
        &project,
    );
    ok(&built, "./build.sh");
    let component = project.join("dist").join(format!("{name}.wasm"));
    assert!(
        component.is_file(),
        "build.sh wrote {}",
        component.display()
    );

    let cache = work.path().join("cache");
    let run = eventbroker(&project)
        .args([
            "run",
            &format!("dist/{name}.wasm"),
            "--event",
            "sample-event.json",
            "--manifest",
            "manifest.toml",
            "--json",
        ])
        .env("EVENTBROKER_CACHE_DIR", &cache)
        .output()
        .expect("run eventbroker run");
    ok(&run, "eventbroker run on the sample event");
    let report: Value = serde_json::from_slice(&run.stdout).expect("run --json prints JSON");
    let result = &report["results"][0];
    assert_eq!(result["result"], Value::Null, "ok outcome: {result}");
    let logs = result["logs"].to_string();
    assert!(
        logs.contains("hello") && logs.contains("Ada"),
        "greets the sample's name: {logs}"
    );
    assert_eq!(
        report["matched"][0], true,
        "the sample event matches the manifest's patterns"
    );

    // The scaffold's own failure path: a payload that is not an object fails for good.
    let refused = eventbroker(&project)
        .args([
            "run",
            &format!("dist/{name}.wasm"),
            "--event",
            "-",
            "--manifest",
            "manifest.toml",
        ])
        .env("EVENTBROKER_CACHE_DIR", &cache)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(br#"{"type":"example.greeting.create","payload":[1,2]}"#)?;
            child.wait_with_output()
        })
        .expect("run eventbroker run with a bad payload");
    assert_eq!(
        refused.status.code(),
        Some(1),
        "{}",
        toolchains::output_tail(&refused)
    );
    assert!(
        String::from_utf8_lossy(&refused.stdout).contains("payload is not a JSON object"),
        "{}",
        String::from_utf8_lossy(&refused.stdout)
    );

    // Deployed to a running host, it handles the sample event there.
    let handlers = work.path().join("handlers");
    let host = serve_with(
        work.path(),
        &["--handlers", handlers.to_str().expect("UTF-8 path")],
        &[(
            "EVENTBROKER_HANDLERS__CACHE_DIR",
            cache.to_str().expect("UTF-8 path"),
        )],
    );
    let url = host.url.clone();
    let deployed = eventbroker(&project)
        .args([
            "deploy",
            &format!("dist/{name}.wasm"),
            "--manifest",
            "manifest.toml",
            "-s",
            &url,
        ])
        .output()
        .expect("run eventbroker deploy");
    ok(&deployed, "eventbroker deploy");
    let published = eventbroker(&project)
        .args([
            "publish",
            "sample-event.json",
            "--sync",
            "--json",
            "-s",
            &url,
        ])
        .output()
        .expect("run eventbroker publish");
    ok(&published, "eventbroker publish of the sample event");
    let event: Value = serde_json::from_slice(&published.stdout).expect("publish --json");
    assert_eq!(event["status"], "completed", "{event}");
    assert_eq!(event["handlers"][0]["handler"], name.as_str(), "{event}");
    host.stop();
}

#[test]
fn new_rust_handler_builds_and_runs() {
    scaffold_builds_and_runs("rust");
}

#[test]
fn new_python_handler_builds_and_runs() {
    scaffold_builds_and_runs("python");
}

#[test]
fn new_javascript_handler_builds_and_runs() {
    scaffold_builds_and_runs("javascript");
}

#[test]
fn new_c_handler_builds_and_runs() {
    scaffold_builds_and_runs("c");
}

#[test]
fn new_go_handler_builds_and_runs() {
    scaffold_builds_and_runs("go");
}
