//! The example guests in other languages than Rust (`guests/<language>-payload-validator/`):
//! their toolchains are installed by `guests/install-toolchains.sh` and each is built by its
//! own `build.sh`, once per test process and one at a time (the machine has two cores).
//!
//! A toolchain that cannot be installed makes the test that needs it skip with a loud
//! message, or fail when `EVENTBROKER_REQUIRE_SERVICES=1` (CI) says that everything a test
//! needs must be there.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

use crate::guests::repo_root;

/// One example guest written in a language other than Rust.
#[derive(Debug, Clone, Copy)]
pub struct Language {
    /// The language, as `guests/install-toolchains.sh` names it.
    pub name: &'static str,
    /// Its folder in `guests/`, also the file name of its component in `dist/`.
    pub dir: &'static str,
}

/// The payload validators, one per language; `guests/rust-payload-validator` is the reference.
pub const PAYLOAD_VALIDATORS: [Language; 4] = [
    Language {
        name: "python",
        dir: "python-payload-validator",
    },
    Language {
        name: "javascript",
        dir: "javascript-payload-validator",
    },
    Language {
        name: "c",
        dir: "c-payload-validator",
    },
    Language {
        name: "go",
        dir: "go-payload-validator",
    },
];

impl Language {
    /// The guest's folder.
    pub fn folder(&self) -> PathBuf {
        repo_root().join("guests").join(self.dir)
    }

    /// Where `build.sh` writes the component.
    pub fn component(&self) -> PathBuf {
        self.folder()
            .join("dist")
            .join(format!("{}.wasm", self.dir))
    }
}

/// Installs the language's toolchain and builds the guest (once per process and folder). Returns the
/// component, or `None` after printing why the test is skipped.
///
/// # Panics
/// If the build fails, or if the toolchain cannot be installed and toolchains are required.
pub fn build(language: Language) -> Option<PathBuf> {
    static BUILT: OnceLock<Mutex<HashMap<&'static str, Result<PathBuf, String>>>> = OnceLock::new();
    // One build at a time; a second test of the same guest waits and reuses the result.
    // Keyed by folder: one language has several guests.
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let result = built
        .entry(language.dir)
        .or_insert_with(|| install_and_build(language))
        .clone();
    match result {
        Ok(path) => Some(path),
        Err(missing) => {
            crate::services::skip(&missing);
            None
        }
    }
}

/// Installs the toolchain of `language` (`rust`, `python`, `javascript`, `c` or `go`) with
/// `guests/install-toolchains.sh`, once per process. Returns `false` after printing why the
/// test is skipped.
///
/// # Panics
/// If the toolchain cannot be installed and toolchains are required (CI).
pub fn ensure(language: &'static str) -> bool {
    static INSTALLED: OnceLock<Mutex<HashMap<&'static str, Result<(), String>>>> = OnceLock::new();
    let mut installed = INSTALLED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let result = installed
        .entry(language)
        .or_insert_with(|| install(language))
        .clone();
    match result {
        Ok(()) => true,
        Err(missing) => {
            crate::services::skip(&missing);
            false
        }
    }
}

fn install(language: &str) -> Result<(), String> {
    let guests = repo_root().join("guests");
    let install = run_clean(
        Command::new("bash")
            .arg(guests.join("install-toolchains.sh"))
            .arg(language),
        &guests,
    );
    if install.status.success() {
        Ok(())
    } else {
        Err(format!(
            "the {language} toolchain could not be installed by guests/install-toolchains.sh {language}:\n{}",
            output_tail(&install)
        ))
    }
}

/// Where `guests/install-toolchains.sh` puts what it installs (`EVENTBROKER_TOOLCHAINS`,
/// default `~/.cache/eventbroker-toolchains`).
pub fn dir() -> PathBuf {
    match std::env::var_os("EVENTBROKER_TOOLCHAINS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache")
            .join("eventbroker-toolchains"),
    }
}

/// `Err` says which toolchain is missing; a failing build panics.
fn install_and_build(language: Language) -> Result<PathBuf, String> {
    install(language.name)?;
    let output = run_clean(
        Command::new("bash").arg(language.folder().join("build.sh")),
        &language.folder(),
    );
    assert!(
        output.status.success(),
        "guests/{}/build.sh failed:\n{}",
        language.dir,
        output_tail(&output)
    );
    let component = language.component();
    assert!(
        component.is_file(),
        "guests/{}/build.sh did not write {}",
        language.dir,
        component.display()
    );
    Ok(component)
}

/// Runs a build script or tool for a guest in `dir`, without the outer cargo's target and
/// flags (they must not leak into a guest's own build). Returns its output.
///
/// # Panics
/// If the command cannot be started.
pub fn run_clean(command: &mut Command, dir: &Path) -> Output {
    command
        .current_dir(dir)
        // The outer cargo's settings must not leak into `cargo install` or the guests' builds.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

/// The last 40 lines of a command's output, for failure messages.
pub fn output_tail(output: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
