//! `eventbroker new NAME --lang LANG`: writes a handler project that builds with `./build.sh`
//! into `dist/NAME.wasm` and runs on the sample event it contains:
//! `eventbroker run dist/NAME.wasm --event sample-event.json --manifest manifest.toml`.
//!
//! The templates live in `host/cli/templates/`; the WIT contract, the toolchain installer
//! (`guests/toolchains/lib.sh`) and the Go glue are the repository's own files, compiled into
//! the binary, so a scaffold always matches the host that wrote it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, ValueEnum};

use super::exit::{Exit, fail};

/// `eventbroker new`.
#[derive(Debug, Args)]
pub struct NewArgs {
    /// Handler name: 1-64 letters, digits, `-` or `_`; also the folder created.
    name: String,
    /// The guest language.
    #[arg(long, short, value_enum, default_value_t = Lang::Rust)]
    lang: Lang,
    /// Where to create the project (default: ./NAME).
    #[arg(long, short)]
    dir: Option<PathBuf>,
}

/// Languages `new` can scaffold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Lang {
    /// Rust (cargo, target wasm32-wasip2, wit-bindgen).
    Rust,
    /// Python (componentize-py).
    Python,
    /// JavaScript (componentize-js on Node.js).
    Javascript,
    /// C (clang + wasi-libc, wit-bindgen c, wasm-tools).
    C,
    /// Go (standard Go, GOOS=wasip1, wasm-tools).
    Go,
}

struct File {
    path: &'static str,
    text: &'static str,
    executable: bool,
}

const fn file(path: &'static str, text: &'static str) -> File {
    File {
        path,
        text,
        executable: false,
    }
}

const fn script(path: &'static str, text: &'static str) -> File {
    File {
        path,
        text,
        executable: true,
    }
}

const COMMON: &[File] = &[
    file(
        "manifest.toml",
        include_str!("../../templates/common/manifest.toml"),
    ),
    file(
        "sample-event.json",
        include_str!("../../templates/common/sample-event.json"),
    ),
    file(
        "README.md",
        include_str!("../../templates/common/README.md"),
    ),
    file(
        "wit/eventbroker.wit",
        include_str!("../../../../wit/eventbroker.wit"),
    ),
    file(
        "wit/deps/keyvalue/atomic.wit",
        include_str!("../../../../wit/deps/keyvalue/atomic.wit"),
    ),
    file(
        "wit/deps/keyvalue/batch.wit",
        include_str!("../../../../wit/deps/keyvalue/batch.wit"),
    ),
    file(
        "wit/deps/keyvalue/store.wit",
        include_str!("../../../../wit/deps/keyvalue/store.wit"),
    ),
    file(
        "wit/deps/keyvalue/watch.wit",
        include_str!("../../../../wit/deps/keyvalue/watch.wit"),
    ),
    file(
        "wit/deps/keyvalue/world.wit",
        include_str!("../../../../wit/deps/keyvalue/world.wit"),
    ),
    file(".gitignore", "/dist/\n/target/\n/node_modules/\n/gen/\n"),
];

const TOOLCHAINS: &[File] = &[
    file(
        "toolchains/lib.sh",
        include_str!("../../../../guests/toolchains/lib.sh"),
    ),
    file(
        "toolchains/requirements.txt",
        include_str!("../../../../guests/toolchains/requirements.txt"),
    ),
];

const RUST: &[File] = &[
    file(
        "Cargo.toml",
        include_str!("../../templates/rust/Cargo.toml"),
    ),
    file(
        ".cargo/config.toml",
        include_str!("../../templates/rust/.cargo/config.toml"),
    ),
    file(
        "src/lib.rs",
        include_str!("../../templates/rust/src/lib.rs"),
    ),
    script("build.sh", include_str!("../../templates/rust/build.sh")),
];

const PYTHON: &[File] = &[
    file("app.py", include_str!("../../templates/python/app.py")),
    script("build.sh", include_str!("../../templates/python/build.sh")),
];

const JAVASCRIPT: &[File] = &[
    file(
        "handler.js",
        include_str!("../../templates/javascript/handler.js"),
    ),
    file(
        "build.mjs",
        include_str!("../../templates/javascript/build.mjs"),
    ),
    file(
        "package.json",
        include_str!("../../templates/javascript/package.json"),
    ),
    file(
        "package-lock.json",
        include_str!("../../templates/javascript/package-lock.json"),
    ),
    script(
        "build.sh",
        include_str!("../../templates/javascript/build.sh"),
    ),
];

const C: &[File] = &[
    file("handler.c", include_str!("../../templates/c/handler.c")),
    file(
        "json.c",
        include_str!("../../../../guests/c-payload-validator/json.c"),
    ),
    file(
        "json.h",
        include_str!("../../../../guests/c-payload-validator/json.h"),
    ),
    script("build.sh", include_str!("../../templates/c/build.sh")),
];

const GO: &[File] = &[
    file("main.go", include_str!("../../templates/go/main.go")),
    file("go.mod", include_str!("../../templates/go/go.mod")),
    script("build.sh", include_str!("../../templates/go/build.sh")),
    file(
        "adapter_realloc.py",
        include_str!("../../../../guests/go-payload-validator/adapter_realloc.py"),
    ),
    file(
        "eventbroker/abi.go",
        include_str!("../../../../guests/go-payload-validator/eventbroker/abi.go"),
    ),
    file(
        "eventbroker/abi_test.go",
        include_str!("../../../../guests/go-payload-validator/eventbroker/abi_test.go"),
    ),
    file(
        "eventbroker/adapter_arena.go",
        include_str!("../../../../guests/go-payload-validator/eventbroker/adapter_arena.go"),
    ),
    file(
        "eventbroker/eventbroker.go",
        include_str!("../../../../guests/go-payload-validator/eventbroker/eventbroker.go"),
    ),
    file(
        "eventbroker/wasm.go",
        include_str!("../../../../guests/go-payload-validator/eventbroker/wasm.go"),
    ),
];

impl Lang {
    fn files(self) -> Vec<&'static File> {
        let own: &[File] = match self {
            Lang::Rust => RUST,
            Lang::Python => PYTHON,
            Lang::Javascript => JAVASCRIPT,
            Lang::C => C,
            Lang::Go => GO,
        };
        let toolchains: &[File] = if self == Lang::Rust { &[] } else { TOOLCHAINS };
        COMMON.iter().chain(toolchains).chain(own).collect()
    }

    fn word(self) -> &'static str {
        match self {
            Lang::Rust => "rust",
            Lang::Python => "python",
            Lang::Javascript => "javascript",
            Lang::C => "c",
            Lang::Go => "go",
        }
    }

    fn language(self) -> &'static str {
        match self {
            Lang::Rust => "Rust",
            Lang::Python => "Python",
            Lang::Javascript => "JavaScript",
            Lang::C => "C",
            Lang::Go => "Go",
        }
    }

    /// Limits for the manifest: interpreters need more fuel and memory than compiled code.
    fn limits(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Lang::Rust | Lang::C => ("10_000_000", "16MiB", "2s"),
            Lang::Go => ("20_000_000", "32MiB", "2s"),
            Lang::Python | Lang::Javascript => ("50_000_000", "32MiB", "2s"),
        }
    }

    fn toolchain(self) -> &'static str {
        match self {
            Lang::Rust => {
                "`./build.sh` adds the wasm32-wasip2 target with rustup if it is missing; the first build downloads and compiles wit-bindgen (about a minute)."
            }
            Lang::Python => {
                "The first `./build.sh` installs componentize-py into `~/.cache/eventbroker-toolchains` (`EVENTBROKER_TOOLCHAINS`); a build takes 5-20 s, and the host's first compile of the 18 MB component about a minute (then it is cached)."
            }
            Lang::Javascript => {
                "Needs Node.js 20 or later. The first `./build.sh` installs the pinned componentize-js from npm; the host's first compile of the 12 MB component takes a minute or more (then it is cached)."
            }
            Lang::C => {
                "The first `./build.sh` installs clang and wasi-libc (Debian packages: needs root or sudo), wit-bindgen and wasm-tools into `~/.cache/eventbroker-toolchains`."
            }
            Lang::Go => {
                "The first `./build.sh` installs Go and wasm-tools into `~/.cache/eventbroker-toolchains` (`EVENTBROKER_TOOLCHAINS`). `eventbroker/` is hand-written glue for the WIT contract: keep it when you edit main.go."
            }
        }
    }
}

fn fill(template: &str, name: &str, lang: Lang) -> String {
    let (fuel, memory, timeout) = lang.limits();
    template
        .replace("{{name}}", name)
        .replace("{{crate}}", &name.replace('-', "_"))
        .replace("{{module}}", &format!("example.com/{name}"))
        .replace("{{lang}}", lang.word())
        .replace("{{language}}", lang.language())
        .replace("{{fuel}}", fuel)
        .replace("{{memory}}", memory)
        .replace("{{timeout}}", timeout)
        .replace("{{toolchain}}", lang.toolchain())
}

/// Writes the project; refuses to touch a folder that exists and is not empty.
pub fn new_command(json: bool, args: NewArgs) -> anyhow::Result<ExitCode> {
    eventbroker_wasm::validate_name(&args.name).map_err(|e| fail(Exit::Usage, e.to_string()))?;
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(&args.name));
    if std::fs::read_dir(&dir).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(fail(
            Exit::Usage,
            format!(
                "{} exists and is not empty; choose another name or --dir",
                dir.display()
            ),
        ));
    }
    let mut written = Vec::new();
    for file in args.lang.files() {
        let path = dir.join(file.path);
        write(
            &path,
            &fill(file.text, &args.name, args.lang),
            file.executable,
        )?;
        written.push(file.path);
    }
    if json {
        println!(
            "{}",
            serde_json::json!({
                "name": args.name,
                "lang": args.lang.word(),
                "dir": dir,
                "files": written,
                "build": "./build.sh",
                "component": format!("dist/{}.wasm", args.name),
            })
        );
    } else {
        println!(
            "created {} ({} handler, {} files)",
            dir.display(),
            args.lang.language(),
            written.len()
        );
        println!();
        println!("  cd {}", dir.display());
        println!("  ./build.sh");
        println!(
            "  eventbroker run dist/{}.wasm --event sample-event.json --manifest manifest.toml",
            args.name
        );
        println!();
        println!("{}", args.lang.toolchain());
    }
    Ok(ExitCode::SUCCESS)
}

fn write(path: &Path, text: &str, executable: bool) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| {
            fail(
                Exit::Failed,
                format!("cannot create {}: {e}", parent.display()),
            )
        })?;
    }
    std::fs::write(path, text).map_err(|e| {
        fail(
            Exit::Failed,
            format!("cannot write {}: {e}", path.display()),
        )
    })?;
    #[cfg(unix)]
    if executable {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).map_err(|e| {
            fail(
                Exit::Failed,
                format!("cannot make {} executable: {e}", path.display()),
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_language_fills_every_placeholder() {
        for lang in Lang::value_variants() {
            for file in lang.files() {
                let text = fill(file.text, "my-handler", *lang);
                assert!(
                    !text.contains("{{"),
                    "{:?} {}: unfilled placeholder",
                    lang,
                    file.path
                );
            }
        }
    }

    #[test]
    fn the_manifest_parses_and_names_the_handler() {
        for lang in Lang::value_variants() {
            let text = fill(COMMON[0].text, "my-handler", *lang);
            let manifest = eventbroker_wasm::Manifest::parse(&text).expect("parses");
            assert_eq!(manifest.name.as_deref(), Some("my-handler"));
        }
    }
}
