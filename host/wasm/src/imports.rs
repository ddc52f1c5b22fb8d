//! What the host links for a component, and plain-words explanations of what it does not
//! (shared by component loading and `check`).

/// Interfaces the host links, as `namespace:package/interface` with the major.minor version
/// they are provided at (WASI 0.2.x is matched semver-compatibly).
const PROVIDED: &[(&str, &str)] = &[
    ("wasi:cli/environment", "0.2"),
    ("wasi:cli/exit", "0.2"),
    ("wasi:cli/stdin", "0.2"),
    ("wasi:cli/stdout", "0.2"),
    ("wasi:cli/stderr", "0.2"),
    ("wasi:cli/terminal-input", "0.2"),
    ("wasi:cli/terminal-output", "0.2"),
    ("wasi:cli/terminal-stdin", "0.2"),
    ("wasi:cli/terminal-stdout", "0.2"),
    ("wasi:cli/terminal-stderr", "0.2"),
    ("wasi:clocks/monotonic-clock", "0.2"),
    ("wasi:clocks/wall-clock", "0.2"),
    ("wasi:http/types", "0.2"),
    ("wasi:http/outgoing-handler", "0.2"),
    ("wasi:filesystem/types", "0.2"),
    ("wasi:filesystem/preopens", "0.2"),
    ("wasi:io/error", "0.2"),
    ("wasi:io/poll", "0.2"),
    ("wasi:io/streams", "0.2"),
    ("wasi:random/random", "0.2"),
    ("wasi:random/insecure", "0.2"),
    ("wasi:random/insecure-seed", "0.2"),
    ("wasi:sockets/network", "0.2"),
    ("wasi:sockets/instance-network", "0.2"),
    ("wasi:sockets/ip-name-lookup", "0.2"),
    ("wasi:sockets/tcp", "0.2"),
    ("wasi:sockets/tcp-create-socket", "0.2"),
    ("wasi:sockets/udp", "0.2"),
    ("wasi:sockets/udp-create-socket", "0.2"),
    ("wasi:keyvalue/store", "0.2.0-draft"),
    ("wasi:keyvalue/atomics", "0.2.0-draft"),
    ("wasi:keyvalue/batch", "0.2.0-draft"),
    ("resolvespec:eventbroker/types", "0.1"),
    ("resolvespec:eventbroker/host", "0.1"),
];

pub(crate) fn split_name(name: &str) -> (&str, Option<&str>) {
    match name.split_once('@') {
        Some((base, version)) => (base, Some(version)),
        None => (name, None),
    }
}

pub(crate) fn provided(name: &str) -> bool {
    let (base, version) = split_name(name);
    PROVIDED.iter().any(|(known, major_minor)| {
        *known == base
            && version
                .is_some_and(|v| v == *major_minor || v.starts_with(&format!("{major_minor}.")))
    })
}

/// A plain-words note about an import.
pub(crate) fn note_for(name: &str, satisfied: bool) -> String {
    let (base, _) = split_name(name);
    if satisfied {
        return match base {
            b if b.starts_with("wasi:sockets/") => {
                "linked, but every network use is denied at run time".into()
            }
            b if b.starts_with("wasi:filesystem/") => {
                "linked, but no directory is opened to the guest".into()
            }
            "wasi:cli/environment" => "linked; the environment and arguments are empty".into(),
            "wasi:cli/stdout" | "wasi:cli/stderr" => {
                "captured into the invocation's log (capped)".into()
            }
            "wasi:cli/stdin" => "linked; stdin is empty".into(),
            "resolvespec:eventbroker/host" => "log, publish and config".into(),
            b if b.starts_with("wasi:http/") => {
                "outbound HTTP: only to what the manifest's [http] allow lists; a component \
                 importing it without that grant is refused at deploy"
                    .into()
            }
            b if b.starts_with("wasi:keyvalue/") => {
                "key-value state: only the buckets the manifest's [keyvalue] section names; a \
                 component importing it without that grant is refused at deploy"
                    .into()
            }
            _ => "provided".into(),
        };
    }
    if base.starts_with("wasi:http/") {
        return "the host links wasi:http/types and wasi:http/outgoing-handler (0.2) for \
                outbound requests granted by the manifest's [http] section; it serves no \
                incoming HTTP. Rebuild without the server side (for JavaScript, \
                componentize-js's `disableFeatures: ['http']` unless the handler calls fetch)"
            .into();
    }
    if base.starts_with("wasi:keyvalue/") {
        return "the host provides wasi:keyvalue store, atomics and batch at version \
                0.2.0-draft (the WIT in the host's wit/deps/keyvalue); regenerate the \
                bindings against that version"
            .into();
    }
    if base.starts_with("wasi:") {
        let (_, version) = split_name(name);
        if version.is_some_and(|v| !v.starts_with("0.2")) {
            return format!(
                "the host provides WASI 0.2.x; this import asks for version {}. Rebuild with a \
                 toolchain that targets WASI 0.2 (wasm32-wasip2)",
                version.unwrap_or("?")
            );
        }
        return "not provided by the host; rebuild without the feature that needs it".into();
    }
    if base.starts_with("resolvespec:eventbroker/") {
        return "not part of resolvespec:eventbroker@0.1 as this host knows it; regenerate the \
                bindings from the wit/ directory of this host"
            .into();
    }
    "not provided by the host; a handler may only import WASI 0.2 and resolvespec:eventbroker/host"
        .into()
}

/// Adds a plain-words explanation to a link error from wasmtime.
pub(crate) fn explain_link_error(message: &str) -> String {
    let missing = message
        .split(|c: char| c == '`' || c == '"' || c.is_whitespace())
        .find(|word| word.contains(':') && word.contains('/'));
    match missing {
        Some(name) => format!(
            "{message} — {}",
            note_for(name.trim_end_matches(','), false)
        ),
        None => message.to_owned(),
    }
}
