//! The `eventbroker` binary end to end: `serve` over HTTP with signals, and the guest tools
//! `run` and `check` with their output and exit codes.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::serve::{serve, serve_with, sigterm, wait_exit};
use eventbroker_testkit::guests;

use serde_json::{Value, json};

const PATIENCE: Duration = Duration::from_secs(60);

fn eventbroker() -> Command {
    Command::new(env!("CARGO_BIN_EXE_eventbroker"))
}

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(PATIENCE)
        .build()
        .expect("client")
}

fn wait_finished(url: &str, id: &str) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let event: Value = http()
            .get(format!("{url}/v1/events/{id}"))
            .send()
            .and_then(|r| r.json())
            .expect("get event");
        if matches!(event["status"].as_str(), Some("completed" | "failed")) {
            return event;
        }
        assert!(
            Instant::now() < deadline,
            "event {id} did not finish: {event}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serve_with_no_configuration_accepts_processes_and_reports_events() {
    let dir = tempfile::tempdir().unwrap();
    let mut served = serve(dir.path(), &[]);
    let health: Value = http()
        .get(format!("{}/healthz", served.url))
        .send()
        .and_then(|r| r.json())
        .unwrap();
    assert_eq!(health["status"], "ok");
    let response = http()
        .post(format!("{}/v1/events", served.url))
        .json(&json!({"type": "public.users.create", "source": "frontend", "payload": {"id": 1}}))
        .send()
        .unwrap();
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let event = wait_finished(&served.url, &id);
    assert_eq!(event["status"], "completed");
    assert_eq!(event["source"], "frontend");
    let sync: Value = http()
        .post(format!("{}/v1/events?mode=sync", served.url))
        .json(&json!({"type": "a.b"}))
        .send()
        .and_then(|r| r.json())
        .unwrap();
    assert_eq!(sync["status"], "completed");
    // The CLI client talks to the same server.
    let out = eventbroker()
        .args(["events", "get", &id, "--server", &served.url, "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["id"], id.as_str());
    let out = eventbroker()
        .args([
            "publish",
            "--type",
            "cli.test",
            "--payload",
            "{\"n\":1}",
            "--sync",
            "--server",
            &served.url,
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["status"], "completed");
    let out = eventbroker()
        .args([
            "events",
            "list",
            "type=cli.*",
            "--server",
            &served.url,
            "--json",
        ])
        .output()
        .unwrap();
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["count"], 1);
    sigterm(&served.child);
    let status = wait_exit(&mut served.child);
    assert!(status.success(), "clean exit after SIGTERM: {status:?}");
}

#[test]
fn serve_rejects_a_bad_config_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        "event_broker:\n  provider: kafka\n",
    )
    .unwrap();
    let out = eventbroker()
        .args(["serve", "--config", "bad.yaml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("kafka") && stderr.contains("provider"),
        "{stderr}"
    );
}

#[test]
fn tokens_in_query_strings_never_reach_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut served = serve_with(
        dir.path(),
        &[],
        &[
            ("RUST_LOG", "debug"),
            ("EVENTBROKER_SERVER__ADMIN_TOKEN", "secret-token-1"),
        ],
    );
    let client = http();
    for path in [
        "/?token=secret-token-1&demo=a.b",
        "/v1/ws?token=secret-token-1",
        "/v1/ws?%74oken=secret-token-2",
        "/v1/events?token=secret-token-3",
        "/v1/stream?pattern=a.b&token=secret-token-4",
    ] {
        let status = client
            .get(format!("{}{path}", served.url))
            .send()
            .unwrap()
            .status();
        assert!(status.as_u16() < 500, "{path}: {status}");
    }
    // A WebSocket authenticated by its query string.
    let mut socket =
        std::net::TcpStream::connect(served.url.trim_start_matches("http://")).unwrap();
    use std::io::{Read, Write};
    write!(
        socket,
        "GET /v1/ws?token=secret-token-1 HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        served.url.trim_start_matches("http://")
    )
    .unwrap();
    let mut answer = [0u8; 12];
    socket.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 101");
    drop(socket);
    sigterm(&served.child);
    assert!(wait_exit(&mut served.child).success());
    let logs = served.logs.join().unwrap().join("\n");
    assert!(
        logs.contains("token=[redacted]"),
        "the requests were logged, with the token redacted:\n{logs}"
    );
    assert!(
        !logs.contains("secret-token"),
        "a token reached the log:\n{logs}"
    );
}

fn run_cli(args: &[&str]) -> Output {
    eventbroker().args(args).output().expect("run eventbroker")
}

/// `run` applies the manifest's `[http]` grant: a URL outside it is refused with the reason in
/// the log, and `--deny-net` refuses even a granted one; both are errors the guest handles.
#[test]
fn run_applies_the_http_grant_and_deny_net_refuses_everything() {
    let built = guests::build();
    let caller = built.fixtures.join("http_caller.wasm");
    let dir = tempfile::tempdir().expect("dir");
    let manifest = dir.path().join("caller.toml");
    // Nothing listens on port 9: a granted request would fail to connect, not be refused.
    std::fs::write(
        &manifest,
        "patterns = [\"http.>\"]\n[http]\nallow = [\"http://127.0.0.1:9/\"]\n",
    )
    .expect("manifest");
    let event = |url: &str| {
        let path = dir.path().join("event.json");
        std::fs::write(
            &path,
            json!({"type": "http.call", "payload": {"url": url, "method": "GET"}}).to_string(),
        )
        .expect("event");
        path
    };
    let run = |url: &str, extra: &[&str]| {
        let event = event(url);
        let mut args = vec![
            "run",
            caller.to_str().expect("path"),
            "--manifest",
            manifest.to_str().expect("path"),
            "--event",
            event.to_str().expect("path"),
        ];
        args.extend_from_slice(extra);
        let out = run_cli(&args);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let outside = run("http://10.1.2.3/", &[]);
    assert!(
        outside.contains("outbound HTTP refused") && outside.contains("is not in http.allow"),
        "{outside}"
    );
    let denied = run("http://127.0.0.1:9/", &["--deny-net"]);
    assert!(
        denied.contains("outbound HTTP refused") && denied.contains("--deny-net"),
        "{denied}"
    );
    assert!(
        denied.contains("outcome   fail"),
        "the guest saw an error: {denied}"
    );
}

/// `run --kv FILE`: the dedupe counter's buckets are read from the file and written back, so
/// a second run of the same event is a duplicate; `check` says whether the manifest grants
/// `wasi:keyvalue`; a file that is not a key-value file is a usage error naming it.
#[test]
fn run_keeps_key_value_state_in_a_file_and_check_names_the_grant() {
    let built = guests::build();
    let counter = built.guest("rust_dedupe_counter");
    let folder = built.guest_dir("rust-dedupe-counter");
    let dir = tempfile::tempdir().expect("dir");
    let kv = dir.path().join("kv.json");
    let run = |kv: &std::path::Path| {
        run_cli(&[
            "run",
            counter.to_str().expect("path"),
            "--manifest",
            folder.join("manifest.toml").to_str().expect("path"),
            "--event",
            folder.join("sample-event.json").to_str().expect("path"),
            "--kv",
            kv.to_str().expect("path"),
        ])
    };
    let first = run(&kv);
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(first.status.success(), "{stdout}");
    assert!(
        stdout.contains("public.orders.create counted: 1"),
        "{stdout}"
    );
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&kv).expect("kv written")).expect("json");
    assert_eq!(
        saved,
        json!({"counts": {"public.orders.create": "1"}, "dedupe": {"public.orders.create:A-1001": "1"}})
    );
    let second = run(&kv);
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(
        stdout.contains("duplicate public.orders.create:A-1001"),
        "{stdout}"
    );
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&kv).expect("kv")).expect("json");
    assert_eq!(saved["dedupe"]["public.orders.create:A-1001"], "2");
    assert_eq!(saved["counts"]["public.orders.create"], "1");

    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "[1, 2]").expect("write");
    let refused = run(&bad);
    assert_eq!(refused.status.code(), Some(2), "a usage error");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("is not a key-value file"), "{stderr}");

    let check = |manifest: Option<&std::path::Path>| {
        let mut args = vec!["check", counter.to_str().expect("path")];
        if let Some(manifest) = manifest {
            args.extend(["--manifest", manifest.to_str().expect("path")]);
        }
        String::from_utf8_lossy(&run_cli(&args).stdout).into_owned()
    };
    let ungranted = check(None);
    assert!(
        ungranted.contains("wasi:keyvalue/store@0.2.0-draft") && ungranted.contains("NOT granted"),
        "{ungranted}"
    );
    let granted = check(Some(&folder.join("manifest.toml")));
    assert!(
        granted.contains("granted by the manifest: buckets counts, dedupe"),
        "{granted}"
    );
}

#[test]
fn run_prints_outcomes_logs_and_publishes_and_exits_non_zero_on_failure() {
    let built = guests::build();
    let validator = built.guest("rust_payload_validator");
    let folder = built.guest_dir("rust-payload-validator");
    let out = run_cli(&[
        "run",
        validator.to_str().unwrap(),
        "--event",
        folder.join("sample-events.jsonl").to_str().unwrap(),
        "--manifest",
        folder.join("manifest.toml").to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed event makes run fail:\n{stdout}"
    );
    for needle in [
        "first invocation latency",
        "outcome   ok",
        "outcome   fail (not retried)",
        "outcome   retry (would be retried)",
        "fuel ",
        "order line BOOK-1 x2 is valid",
    ] {
        assert!(
            stdout.contains(needle),
            "{needle:?} missing from:\n{stdout}"
        );
    }

    let notifier = built.guest("rust_user_notifier");
    let sample = built
        .guest_dir("rust-user-notifier")
        .join("sample-event.json");
    let out = run_cli(&[
        "run",
        notifier.to_str().unwrap(),
        "--event",
        sample.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(
        report["results"][0]["published"][0]["type"],
        "notify.users.welcome"
    );
    assert!(report["first_invocation_latency"].is_string());

    // Events from stdin, limits from flags.
    let mut child = eventbroker()
        .args([
            "run",
            built.misbehave().to_str().unwrap(),
            "--event",
            "-",
            "--fuel",
            "1000",
            "--json",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"type\":\"x.y\",\"payload\":{\"action\":\"loop\"}}")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["results"][0]["result"]["kind"], "out_of_fuel");

    // A component that cannot load: exit status 2 and a message.
    let out = run_cli(&["run", "Cargo.toml", "--event", sample.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a WebAssembly file"));
}

#[test]
fn check_lists_exports_imports_and_patterns_and_explains_problems() {
    let built = guests::build();
    let out = run_cli(&["check", built.guest("rust_audit_logger").to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    for needle in [
        "resolvespec:eventbroker/handler@0.1.0",
        "resolvespec:eventbroker/host@0.1.0",
        "wasi:cli/stdout",
        "default patterns: *",
        "compatible: yes",
    ] {
        assert!(
            stdout.contains(needle),
            "{needle:?} missing from:\n{stdout}"
        );
    }
    let out = run_cli(&["check", built.misbehave().to_str().unwrap(), "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["compatible"], true);
    assert!(
        report["default_patterns"].is_null(),
        "handler-only world has no defaults"
    );

    let dir = tempfile::tempdir().unwrap();
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let out = run_cli(&["check", core.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("core WebAssembly module, not a component")
    );
}

#[test]
fn sigterm_drains_queued_work_before_exiting() {
    let built = guests::build();
    let dir = tempfile::tempdir().unwrap();
    let handlers = dir.path().join("handlers");
    std::fs::create_dir_all(&handlers).unwrap();
    std::fs::copy(built.misbehave(), handlers.join("worker.wasm")).unwrap();
    std::fs::write(
        handlers.join("worker.toml"),
        "patterns = [\"work.*\"]\nfuel = 1_000_000_000_000\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("config.yaml"),
        "event_broker:\n  worker_count: 1\n  shutdown_timeout: 60s\nhandlers:\n  cache_dir: cache\n",
    )
    .unwrap();
    let mut served = serve(dir.path(), &["--config", "config.yaml"]);
    let client = http();
    let mut ids = Vec::new();
    for _ in 0..100 {
        let reply: Value = client
            .post(format!("{}/v1/events", served.url))
            .json(&json!({"type": "work.item", "payload": {"action": "work", "iterations": 20_000_000}}))
            .send()
            .and_then(|r| r.json())
            .unwrap();
        ids.push(reply["id"].as_str().unwrap().to_owned());
    }
    let stats: Value = client
        .get(format!("{}/v1/stats", served.url))
        .send()
        .and_then(|r| r.json())
        .unwrap();
    sigterm(&served.child);
    let status = wait_exit(&mut served.child);
    assert!(status.success(), "{status:?}");
    let logs = served.logs.join().unwrap().join("\n");
    for id in &ids {
        assert!(
            logs.contains(&format!("worked {id}")),
            "event {id} was not processed before exit"
        );
    }
    assert!(logs.contains("all work drained"), "{logs}");
    assert!(
        stats["provider"]["by_status"]["pending"]
            .as_u64()
            .unwrap_or(0)
            > 0
            || stats["queue_depth"].as_u64().unwrap_or(0) > 0,
        "work was still queued when SIGTERM arrived: {stats}"
    );
}

/// Runs the CLI, killing it (and failing) if it has not exited within [`PATIENCE`].
fn run_cli_bounded(args: &[&str]) -> Output {
    let child = eventbroker()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run eventbroker");
    let id = child.id();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(child.wait_with_output());
    });
    match receiver.recv_timeout(PATIENCE) {
        Ok(output) => output.expect("output"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &id.to_string()]).status();
            panic!("eventbroker {args:?} did not exit within {PATIENCE:?}");
        }
    }
}

#[test]
fn check_and_run_end_and_explain_hostile_components() {
    let built = guests::build();
    let hostile = built.hostile_patterns();
    let dir = tempfile::tempdir().unwrap();
    let sample = dir.path().join("event.json");
    std::fs::write(&sample, r#"{"type":"hostile.x"}"#).unwrap();
    // patterns() waits on a clock for an hour: both tools end and say why.
    let out = run_cli_bounded(&["check", hostile.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("compatible: no"), "{stdout}");
    assert!(stdout.contains("did not return within"), "{stdout}");
    let out = run_cli_bounded(&[
        "run",
        hostile.to_str().unwrap(),
        "--event",
        sample.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("did not return within"));
    // Default patterns that serve would refuse make check say "no".
    let manifest = dir.path().join("invalid.toml");
    std::fs::write(&manifest, "[config]\npatterns = \"invalid\"\n").unwrap();
    let out = run_cli_bounded(&[
        "check",
        hostile.to_str().unwrap(),
        "--manifest",
        manifest.to_str().unwrap(),
        "--json",
    ]);
    let report: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(report["compatible"], false, "{report:#}");
    assert!(
        report["problems"][0]
            .as_str()
            .unwrap()
            .contains("invalid pattern")
    );
    // The WebAssembly magic but neither a module nor a component.
    let strange = dir.path().join("strange.wasm");
    std::fs::write(&strange, b"\0asm\x02\0\0\0").unwrap();
    let out = run_cli_bounded(&["check", strange.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("neither a core WebAssembly module nor a component"),
        "{stderr}"
    );
}

/// Runs the CLI with `args` and no inherited server or token settings.
fn cli(args: &[&str]) -> Output {
    eventbroker()
        .args(args)
        .env_remove("EVENTBROKER_SERVER")
        .env_remove("EVENTBROKER_TOKEN")
        .output()
        .expect("run eventbroker")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn the_cli_prints_tables_json_and_documented_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let mut served = serve_with(
        dir.path(),
        &[],
        &[("EVENTBROKER_SERVER__ADMIN_TOKEN", "admin-secret")],
    );
    // `--server` takes host:port as well as a URL.
    let addr = served.url.trim_start_matches("http://").to_owned();

    // No token: exit 4, and the message says how to give one.
    let out = cli(&["events", "list", "-s", &addr]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("--token"), "{}", stderr(&out));
    let out = cli(&["events", "list", "-s", &addr, "--token", "wrong"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));

    // A table for people.
    let token = ["-s", addr.as_str(), "--token", "admin-secret"];
    let with = |args: &[&str]| cli(&[args, &token[..]].concat());
    let out = with(&["publish", "-t", "cli.table", "-d", "{\"n\":1}", "--sync"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = stdout(&out);
    assert!(
        printed
            .lines()
            .any(|l| l.starts_with("status") && l.ends_with("completed")),
        "{printed}"
    );
    assert!(printed.contains("{\"n\":1}"), "{printed}");
    let out = with(&["events", "list", "-t", "cli.*", "-n", "5"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = stdout(&out);
    let header = printed.lines().next().unwrap_or_default();
    for column in ["ID", "TYPE", "STATUS", "HANDLERS"] {
        assert!(header.contains(column), "{printed}");
    }
    assert!(
        printed.contains("cli.table") && printed.contains("completed"),
        "{printed}"
    );

    // JSON for scripts: the API's own document.
    let out = with(&["events", "list", "--status", "completed", "--json"]);
    let page: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(page["count"], 1);
    assert_eq!(page["events"][0]["type"], "cli.table");

    // The live stream: a published event shows up in `events watch`.
    let mut watch = eventbroker()
        .args([&["events", "watch", "cli.watched.*", "--json"], &token[..]].concat())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = BufReader::new(watch.stdout.take().unwrap());
    let (line_tx, line_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.lines().map_while(Result::ok) {
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    // The stream starts when the host has answered; publish until the watcher sees one.
    let deadline = Instant::now() + PATIENCE;
    let seen: Value = 'seen: loop {
        assert!(Instant::now() < deadline, "events watch printed nothing");
        let out = with(&["publish", "-t", "cli.watched.one", "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        while let Ok(line) = line_rx.recv_timeout(Duration::from_millis(500)) {
            let event: Value = serde_json::from_str(&line).expect("watch --json prints JSON lines");
            if event["type"] == "cli.watched.one" {
                break 'seen event;
            }
        }
    };
    assert!(seen["id"].is_string());
    let _ = watch.kill();
    let _ = watch.wait();

    // A refused action: exit 1 with the API's message.
    let out = with(&["events", "retry", "no-such-event"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stdout(&out).contains("no-such-event"), "{}", stdout(&out));

    // Nothing listening: exit 3, and the message says where it tried and what to do.
    let out = cli(&["events", "list", "-s", "127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("127.0.0.1:1") && stderr(&out).contains("--server"),
        "{}",
        stderr(&out)
    );
    // The variable of earlier versions is not read, and the CLI says so.
    let out = eventbroker()
        .args(["events", "list", "-s", "127.0.0.1:1"])
        .env_remove("EVENTBROKER_SERVER")
        .env("EVENTBROKER_SERVER_URL", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert!(
        stderr(&out).contains("EVENTBROKER_SERVER_URL is no longer read"),
        "{}",
        stderr(&out)
    );
    // Usage errors: exit 2.
    let out = cli(&["events", "list", "-s", "ftp://example"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = cli(&["run", "missing.wasm", "--event", "e.json", "--memory", "16"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("has no unit") && stderr(&out).contains("16MiB"),
        "{}",
        stderr(&out)
    );
    let out = cli(&["completions", "bash"]);
    assert!(out.status.success());
    assert!(
        stdout(&out).contains("_eventbroker"),
        "a bash completion script"
    );

    sigterm(&served.child);
    assert!(wait_exit(&mut served.child).success());
}

#[test]
fn deploy_refuses_a_name_that_disagrees_with_the_manifest_as_http_does() {
    let built = guests::build();
    let dir = tempfile::tempdir().unwrap();
    let mut served = serve(dir.path(), &[]);
    let logger = built.guest("rust_audit_logger");
    let manifest = built.guest_dir("rust-audit-logger").join("manifest.toml");
    let manifest_text = std::fs::read_to_string(&manifest).unwrap();
    assert!(manifest_text.contains("name = \"audit-logger\""));

    let out = cli(&[
        "deploy",
        logger.to_str().unwrap(),
        "--manifest",
        manifest.to_str().unwrap(),
        "--name",
        "other-name",
        "-s",
        &served.url,
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let from_cli = stderr(&out);

    let form = reqwest::blocking::multipart::Form::new()
        .part(
            "component",
            reqwest::blocking::multipart::Part::bytes(std::fs::read(&logger).unwrap())
                .file_name("x.wasm"),
        )
        .text("manifest", manifest_text);
    let response = http()
        .put(format!("{}/v1/handlers/other-name", served.url))
        .multipart(form)
        .send()
        .unwrap();
    assert_eq!(response.status(), 422);
    let body: Value = response.json().unwrap();
    let from_http = body["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        from_http.contains("\"audit-logger\"") && from_http.contains("\"other-name\""),
        "{from_http}"
    );
    assert!(
        from_cli.contains(&from_http),
        "the CLI reports the host's own reason\nCLI: {from_cli}\nHTTP: {from_http}"
    );

    // Agreeing names deploy, and the table shows the handler.
    let out = cli(&[
        "deploy",
        logger.to_str().unwrap(),
        "--manifest",
        manifest.to_str().unwrap(),
        "-s",
        &served.url,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("deployed audit-logger"),
        "{}",
        stdout(&out)
    );
    let out = cli(&["handlers", "list", "-s", &served.url]);
    assert!(
        stdout(&out)
            .lines()
            .any(|l| l.starts_with("audit-logger") && l.contains("active")),
        "{}",
        stdout(&out)
    );
    sigterm(&served.child);
    assert!(wait_exit(&mut served.child).success());
}

#[test]
fn run_from_a_host_compares_a_new_version_with_what_the_deployed_one_recorded() {
    let built = guests::build();
    let dir = tempfile::tempdir().unwrap();
    let mut served = serve(dir.path(), &[]);
    let validator = built.guest("rust_payload_validator");
    let validator_manifest = built
        .guest_dir("rust-payload-validator")
        .join("manifest.toml");
    let logger = built.guest("rust_audit_logger");
    let logger_manifest = built.guest_dir("rust-audit-logger").join("manifest.toml");
    for (wasm, manifest) in [
        (&validator, &validator_manifest),
        (&logger, &logger_manifest),
    ] {
        let out = cli(&[
            "deploy",
            wasm.to_str().unwrap(),
            "--manifest",
            manifest.to_str().unwrap(),
            "-s",
            &served.url,
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    // The validator's sample orders (valid, invalid, transient), without the user ids that
    // only a publisher with a token may set.
    let samples = std::fs::read_to_string(
        built
            .guest_dir("rust-payload-validator")
            .join("sample-events.jsonl"),
    )
    .unwrap();
    let events: Vec<Value> = samples
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut event: Value = serde_json::from_str(l).unwrap();
            event.as_object_mut().unwrap().remove("user_id");
            event
        })
        .collect();
    let reply: Value = http()
        .post(format!("{}/v1/events/batch", served.url))
        .json(&events)
        .send()
        .and_then(|r| r.json())
        .unwrap();
    assert_eq!(reply["rejected"], 0, "{reply}");
    for result in reply["results"].as_array().unwrap() {
        wait_finished(&served.url, result["id"].as_str().unwrap());
    }

    // The same version against its own history: every outcome agrees, exit 0.
    let out = cli(&[
        "run",
        validator.to_str().unwrap(),
        "--manifest",
        validator_manifest.to_str().unwrap(),
        "--from",
        &served.url,
        "-t",
        "shop.orders.*",
        "--last",
        "50",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["handler"], "payload-validator");
    assert_eq!(report["differ"], 0, "{report}");
    let rows = report["events"].as_array().unwrap();
    assert!(rows.len() >= events.len(), "{report}");
    assert!(
        rows.iter()
            .any(|r| r["recorded"]["outcome"] == "failed" && r["local"]["outcome"] == "failed"),
        "invalid orders failed on both sides: {report}"
    );

    // The validator as a new version of the audit logger (which accepts everything): the
    // invalid orders now fail where the deployed version succeeded, exit 1.
    let out = cli(&[
        "run",
        validator.to_str().unwrap(),
        "--from",
        &served.url,
        "--handler",
        "audit-logger",
        "-t",
        "shop.orders.create",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let printed = stdout(&out);
    assert!(printed.contains("nothing was published"), "{printed}");
    assert!(printed.lines().any(|l| l.ends_with("NO")), "{printed}");
    assert!(printed.contains("succeeded deployed"), "{printed}");

    // Nothing was published by the dry runs: the host holds what it held.
    let count = |url: &str| -> u64 {
        http()
            .get(format!("{url}/v1/events?limit=1000"))
            .send()
            .and_then(|r| r.json::<Value>())
            .unwrap()["count"]
            .as_u64()
            .unwrap()
    };
    let before = count(&served.url);
    let out = cli(&[
        "run",
        validator.to_str().unwrap(),
        "--from",
        &served.url,
        "--handler",
        "payload-validator",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(count(&served.url), before);

    // Retry the failed orders as a set: the host retries them (`POST /v1/events/retry`), and
    // the validator fails them again.
    let failed = |url: &str| -> Vec<String> {
        let page: Value = http()
            .get(format!(
                "{url}/v1/events?status=failed&type=shop.orders.create"
            ))
            .send()
            .and_then(|r| r.json())
            .unwrap();
        page["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let failed_before = failed(&served.url);
    assert!(!failed_before.is_empty());
    let out = cli(&[
        "events",
        "retry",
        "--failed",
        "-t",
        "shop.orders.create",
        "-s",
        &served.url,
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut retried: Vec<String> = report["retried"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["status"], "pending", "{r}");
            r["id"].as_str().unwrap().to_owned()
        })
        .collect();
    retried.sort();
    let mut expected = failed_before.clone();
    expected.sort();
    assert_eq!(retried, expected, "every failed order, once");
    for id in &retried {
        let event = wait_finished(&served.url, id);
        assert_eq!(event["status"], "failed", "fails again: {event}");
    }
    let refused = http()
        .post(format!("{}/v1/events/retry?status=completed", served.url))
        .send()
        .unwrap();
    assert_eq!(refused.status(), 422);
    sigterm(&served.child);
    assert!(wait_exit(&mut served.child).success());
}

#[test]
fn json_logs_are_json_without_rust_debug_text() {
    let built = guests::build();
    let dir = tempfile::tempdir().unwrap();
    let handlers = dir.path().join("handlers");
    std::fs::create_dir(&handlers).unwrap();
    std::fs::copy(
        built.guest("rust_audit_logger"),
        handlers.join("audit-logger.wasm"),
    )
    .unwrap();
    std::fs::copy(
        built.guest_dir("rust-audit-logger").join("manifest.toml"),
        handlers.join("audit-logger.toml"),
    )
    .unwrap();
    let served = serve_with(
        dir.path(),
        &[],
        &[("RUST_LOG", "info"), ("EVENTBROKER_LOG__FORMAT", "json")],
    );
    let out = cli(&["publish", "-t", "logs.json", "--sync", "-s", &served.url]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = served.stop();
    assert!(
        lines.iter().any(|l| l.contains("handler loaded")),
        "{lines:#?}"
    );
    for line in &lines {
        let entry: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for (key, value) in entry.as_object().unwrap() {
            if let Value::String(text) = value {
                for debug in ["Some(", "None", "Object {", "String(", "\\\""] {
                    assert!(
                        !text.contains(debug),
                        "{key} holds Rust debug text {debug:?}: {line}"
                    );
                }
            }
        }
    }
}
