//! `eventbroker check`: what a component exports and imports, which imports the host
//! satisfies, and — in plain words — what to do about the ones it does not.

use serde::Serialize;

use super::WasmError;
use super::engine::ComponentBytes;
use super::engine::WasmEngine;
use super::imports::{note_for, provided};

/// What the host does with one import.
#[derive(Debug, Clone, Serialize)]
pub struct ImportStatus {
    /// The import's name, e.g. `wasi:io/streams@0.2.0`.
    pub name: String,
    /// Whether the host links it.
    pub satisfied: bool,
    /// Plain-words note: what it gives the guest here, or what to do when it is missing.
    pub note: String,
}

/// The result of checking a component.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// Size in bytes.
    pub size: usize,
    /// Export names.
    pub exports: Vec<String>,
    /// Imports and their status.
    pub imports: Vec<ImportStatus>,
    /// Default patterns from the `subscriptions` export, if it has one.
    pub default_patterns: Option<Vec<String>>,
    /// Whether the component can run as a handler here.
    pub compatible: bool,
    /// Why not, when it cannot.
    pub problems: Vec<String>,
}

/// Checks a component (and its manifest, when given) against the handler world and the
/// host's imports, loading it as `serve` would with the default settings: the same patterns
/// checks (its own defaults included), the same limits and the same wall-clock bound on its
/// `patterns()`.
///
/// # Errors
/// [`WasmError::NotWasm`], [`WasmError::UnknownWasm`], [`WasmError::NotComponent`] or
/// [`WasmError::Compile`]; problems with imports, exports, patterns and the manifest are
/// reported in the [`CheckReport`] instead.
pub async fn check(
    engine: &WasmEngine,
    bytes: &[u8],
    manifest: Option<&str>,
) -> Result<CheckReport, WasmError> {
    let compiled = engine.compile_checked(&ComponentBytes::new(bytes.to_vec())?)?;
    let ty = compiled.component.component_type();
    let exports: Vec<String> = ty
        .exports(engine.engine())
        .map(|(name, _)| name.to_owned())
        .collect();
    let imports: Vec<ImportStatus> = ty
        .imports(engine.engine())
        .map(|(name, _)| {
            let satisfied = provided(name);
            ImportStatus {
                name: name.to_owned(),
                satisfied,
                note: note_for(name, satisfied),
            }
        })
        .collect();
    let mut problems: Vec<String> = imports
        .iter()
        .filter(|i| !i.satisfied)
        .map(|i| format!("import {}: {}", i.name, i.note))
        .collect();
    let spec = match manifest {
        Some(text) => super::manifest::Manifest::parse(text),
        None => Ok(super::manifest::Manifest::default()),
    }
    .and_then(|manifest| {
        manifest.resolve(
            "check",
            &crate::config::HandlerDefaults::default(),
            &eventbroker::config::RetryPolicy::default(),
            &crate::config::PoolConfig::default(),
        )
    });
    let spec = match spec {
        Ok(spec) => Some(spec),
        Err(error) => {
            problems.push(error.to_string());
            None
        }
    };
    // Say, in words, whether the manifest grants what the imports ask for.
    let mut imports = imports;
    for import in imports
        .iter_mut()
        .filter(|i| i.satisfied && i.name.starts_with(crate::http::OUTGOING_HANDLER))
    {
        import.note = match spec.as_ref().and_then(|s| s.http.as_ref()) {
            Some(grant) => format!(
                "outbound HTTP, granted by the manifest to: {}",
                grant
                    .allow
                    .iter()
                    .map(|r| r.text.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => "outbound HTTP, NOT granted: the manifest has no [http] section, so the \
                     host refuses this component at deploy"
                .into(),
        };
    }
    for import in imports
        .iter_mut()
        .filter(|i| i.satisfied && i.name.starts_with(crate::keyvalue::IMPORT_PREFIX))
    {
        import.note = match spec.as_ref().and_then(|s| s.keyvalue.as_ref()) {
            Some(grant) => format!(
                "key-value state, granted by the manifest: buckets {} (each at most {} keys and {}; {} operations per invocation)",
                grant.buckets.join(", "),
                grant.max_keys,
                bytesize::ByteSize::b(grant.max_bytes),
                grant.max_operations
            ),
            None => "key-value state, NOT granted: the manifest has no [keyvalue] section, so \
                     the host refuses this component at deploy"
                .into(),
        };
    }
    let mut default_patterns = None;
    if let Some(spec) = spec
        && problems.is_empty()
    {
        match super::component::CompiledHandler::load(engine, compiled, spec, Default::default())
            .await
        {
            Ok(loaded) => {
                default_patterns = loaded.info().default_patterns;
                if manifest.is_some() && loaded.patterns().is_empty() {
                    problems.push(
                        "no subscription patterns: the manifest gives none and the component \
                         exports none"
                            .into(),
                    );
                }
            }
            Err(error) => problems.push(error.to_string()),
        }
    }
    if !exports
        .iter()
        .any(|e| e.starts_with("resolvespec:eventbroker/handler@0.1"))
        && !problems.iter().any(|p| p.contains("handler world"))
    {
        problems.push(
            "export resolvespec:eventbroker/handler@0.1.0 is missing: the component must \
             target world `event-handler` or `handler-only` of wit/eventbroker.wit"
                .into(),
        );
    }
    Ok(CheckReport {
        size: bytes.len(),
        exports,
        compatible: problems.is_empty(),
        imports,
        default_patterns,
        problems,
    })
}

#[cfg(test)]
mod tests {
    use super::super::imports::explain_link_error;
    use super::*;

    #[test]
    fn provided_imports_match_semver_compatibly() {
        assert!(provided("wasi:io/streams@0.2.0"));
        assert!(provided("wasi:io/streams@0.2.6"));
        assert!(provided("resolvespec:eventbroker/host@0.1.0"));
        assert!(!provided("wasi:io/streams@0.3.0"));
        assert!(provided("wasi:http/outgoing-handler@0.2.4"));
        assert!(provided("wasi:keyvalue/atomics@0.2.0-draft"));
        assert!(!provided("wasi:keyvalue/atomics@0.2.0-draft2"));
        assert!(!provided("wasi:http/incoming-handler@0.2.0"));
        assert!(!provided("wasi:io/streams"));
    }

    #[test]
    fn notes_explain_missing_imports() {
        assert!(note_for("wasi:http/incoming-handler@0.2.0", false).contains("no incoming"));
        assert!(note_for("wasi:http/outgoing-handler@0.2.0", true).contains("[http]"));
        assert!(note_for("wasi:io/streams@0.3.0", false).contains("WASI 0.2"));
        assert!(note_for("acme:db/query@1.0.0", false).contains("may only import"));
        assert!(note_for("wasi:sockets/tcp@0.2.0", true).contains("denied"));
        assert!(note_for("wasi:keyvalue/store@0.2.0-draft2", false).contains("0.2.0-draft"));
        let explained = explain_link_error(
            "component imports instance `wasi:blobstore/container@0.2.0`, but a matching implementation was not found in the linker",
        );
        assert!(explained.contains("not provided"), "{explained}");
    }
}
