//! Builds the Rust guests (`guests/`) and the test fixtures (`tests/fixtures/`) once per
//! process, adding the `wasm32-wasip2` target first if it is missing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The repository root.
pub fn repo_root() -> PathBuf {
    // This crate lives at host/testkit.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("host/testkit has two ancestors")
        .to_path_buf()
}

/// Paths of the built components.
#[derive(Debug, Clone)]
pub struct Built {
    /// `guests/target/wasm32-wasip2/release`.
    pub guests: PathBuf,
    /// `tests/fixtures/target/wasm32-wasip2/release`.
    pub fixtures: PathBuf,
}

impl Built {
    /// An example guest by crate name, e.g. `rust_audit_logger`.
    pub fn guest(&self, crate_name: &str) -> PathBuf {
        self.guests.join(format!("{crate_name}.wasm"))
    }

    /// The misbehaving fixture.
    pub fn misbehave(&self) -> PathBuf {
        self.fixtures.join("misbehave.wasm")
    }

    /// The fixture whose `patterns()` misbehaves as its manifest's `[config] patterns` says
    /// (without one, it waits on a clock for an hour).
    pub fn hostile_patterns(&self) -> PathBuf {
        self.fixtures.join("hostile_patterns.wasm")
    }

    /// The source folder of an example guest, e.g. `rust-audit-logger`.
    pub fn guest_dir(&self, dir: &str) -> PathBuf {
        repo_root().join("guests").join(dir)
    }
}

/// Builds everything once; later calls return the same paths.
pub fn build() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        ensure_target();
        let root = repo_root();
        cargo_build(&root.join("guests"));
        cargo_build(&root.join("tests/fixtures"));
        Built {
            guests: root.join("guests/target/wasm32-wasip2/release"),
            fixtures: root.join("tests/fixtures/target/wasm32-wasip2/release"),
        }
    })
}

fn ensure_target() {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("wasm32-wasip2"))
        .unwrap_or(false);
    if !installed {
        let status = Command::new("rustup")
            .args(["target", "add", "wasm32-wasip2"])
            .status()
            .expect("rustup is needed to add the wasm32-wasip2 target");
        assert!(status.success(), "rustup target add wasm32-wasip2 failed");
    }
}

fn cargo_build(dir: &Path) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["build", "--release", "--quiet"])
        .current_dir(dir)
        // The outer cargo's settings must not leak into the wasm build.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo in {}: {e}", dir.display()));
    assert!(
        output.status.success(),
        "building the guests in {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}
