//! The README's quick-start blocks, run as typed. A shell block preceded by
//! `<!-- readme-test: NAME -->` is extracted and run by `bash -e` in a fresh directory, with
//! the freshly built `eventbroker` first on `PATH` (what `cargo install --path host/cli`, the
//! README's first step, gives a user). Nothing in a block is rewritten.

use std::path::{Path, PathBuf};
use std::process::Command;

use eventbroker_testkit::guests::repo_root;
use eventbroker_testkit::toolchains;

/// The marked blocks of README.md, by name.
fn blocks() -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("read README.md");
    let mut blocks = Vec::new();
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line
            .trim()
            .strip_prefix("<!-- readme-test:")
            .and_then(|rest| rest.strip_suffix("-->"))
        else {
            continue;
        };
        let fence = lines.next().unwrap_or_default();
        assert_eq!(
            fence.trim(),
            "```sh",
            "a readme-test marker precedes a ```sh block"
        );
        let body: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
        blocks.push((name.trim().to_owned(), body.join("\n")));
    }
    blocks
}

/// A directory holding only the `eventbroker` binary, to put first on `PATH`.
fn bin_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_eventbroker"))
        .parent()
        .expect("the binary has a directory")
        .to_owned()
}

fn run_block(name: &str, dir: &Path) {
    let (_, body) = blocks()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("README.md has no block marked readme-test: {name}"));
    let path = format!(
        "{}:{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // Harness cleanup only: whatever the block left running in the background is stopped when
    // it ends, even when a command fails (it would otherwise hold the output pipes open).
    let script = format!("trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n{body}");
    let output = toolchains::run_clean(
        // Bounded: a block that waits for a host that never comes up fails instead of hanging.
        Command::new("timeout")
            .args(["300", "bash", "-e", "-c", &script])
            .env("PATH", path)
            .env("EVENTBROKER_CACHE_DIR", dir.join("cache"))
            .env_remove("EVENTBROKER_SERVER")
            .env_remove("EVENTBROKER_TOKEN"),
        dir,
    );
    assert!(
        output.status.success(),
        "README block {name:?} failed as typed ({:?}):\n{body}\n---\n{}",
        output.status,
        toolchains::output_tail(&output)
    );
}

#[test]
fn every_marked_block_is_a_shell_block_with_commands() {
    let blocks = blocks();
    let names: Vec<&str> = blocks.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["first-event", "new-handler"]);
    for (name, body) in &blocks {
        assert!(body.contains("eventbroker "), "{name}: {body}");
    }
}

#[test]
fn readme_first_event_runs_as_typed() {
    // The block serves on the default address, as a user's first run would.
    if std::net::TcpListener::bind("127.0.0.1:8080").is_err() {
        eventbroker_testkit::services::skip(
            "port 127.0.0.1:8080, which the README's first-event block serves on, is in use",
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    run_block("first-event", dir.path());
}

#[test]
fn readme_new_handler_runs_as_typed() {
    if !toolchains::ensure("rust") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    run_block("new-handler", dir.path());
}
