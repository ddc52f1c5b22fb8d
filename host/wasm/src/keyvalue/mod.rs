//! Key-value state for handlers (`wasi:keyvalue@0.2.0-draft`: `store`, `atomics`, `batch`),
//! granted per handler by the `[keyvalue]` section of its manifest ([`grant`]) and kept in the
//! store of the host's provider ([`eventbroker::KeyValueStore`]), so that every host of a
//! cluster sharing a backend shares one state. A component that imports `wasi:keyvalue`
//! without a grant is refused at deploy ([`check_imports`]).
//!
//! Each bucket a handler opens is a namespace of its own: consumer group, handler name and
//! bucket name ([`eventbroker::keyvalue::Namespace`]), so handlers never see each other's
//! keys. Every operation is checked, in order: the bucket is granted (else `access-denied`,
//! the reason in the invocation's log), the invocation's operation budget is not spent, the
//! key and value sizes, the bucket's quota (on writes), and it runs within the invocation's
//! remaining deadline. Refusals are errors the guest sees (`error::other` with the reason),
//! never traps. Bytes of keys and values are charged to the invocation's fuel.

mod bindings;
pub mod file;
pub mod grant;
mod guest;

use std::sync::Arc;

use crate::WasmError;
use eventbroker::KeyValueStore;

pub(crate) use bindings::add_to_linker;
pub(crate) use guest::KvAccess;

/// The prefix of the interfaces whose import needs a `[keyvalue]` grant.
pub const IMPORT_PREFIX: &str = "wasi:keyvalue/";

/// Where a host keeps its handlers' key-value state: the store (normally the provider's,
/// [`eventbroker::Provider::keyvalue`]) and the scope that namespaces it (the consumer
/// group), so that two applications sharing a backend keep apart.
#[derive(Clone)]
pub struct KeyValueBinding {
    /// The store.
    pub store: Arc<dyn KeyValueStore>,
    /// The scope of every namespace: the consumer group.
    pub scope: String,
}

impl std::fmt::Debug for KeyValueBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyValueBinding")
            .field("store", &self.store.backend())
            .field("scope", &self.scope)
            .finish()
    }
}

/// Refuses a component that imports `wasi:keyvalue` when its manifest grants no buckets, and
/// one granted buckets on a host without a key-value store; `imports` are the component's
/// import names.
///
/// # Errors
/// [`WasmError::Link`] saying which grant is missing and how to give it, or that the host's
/// backend offers no store.
pub fn check_imports<'a>(
    imports: impl IntoIterator<Item = &'a str>,
    granted: bool,
    store: Option<&KeyValueBinding>,
) -> Result<(), WasmError> {
    let Some(import) = imports
        .into_iter()
        .find(|name| name.starts_with(IMPORT_PREFIX))
    else {
        return Ok(());
    };
    if !granted {
        return Err(WasmError::Link(format!(
            "the component imports {import} (key-value state), but its manifest grants none: add a [keyvalue] section naming the buckets it may open, e.g. [keyvalue] buckets = [\"dedupe\"]"
        )));
    }
    if store.is_none() {
        return Err(WasmError::Link(format!(
            "the component imports {import} (key-value state), but this host's provider offers no key-value store"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keyvalue_import_needs_a_grant_and_a_store() {
        let imports = ["wasi:io/streams@0.2.0", "wasi:keyvalue/store@0.2.0-draft"];
        let binding = KeyValueBinding {
            store: Arc::new(eventbroker::MemoryKeyValue::new()),
            scope: "g".into(),
        };
        let refused = check_imports(imports, false, Some(&binding)).expect_err("no grant");
        assert!(refused.to_string().contains("[keyvalue]"), "{refused}");
        let refused = check_imports(imports, true, None).expect_err("no store");
        assert!(
            refused.to_string().contains("no key-value store"),
            "{refused}"
        );
        assert!(check_imports(imports, true, Some(&binding)).is_ok());
        assert!(check_imports(["wasi:io/streams@0.2.0"], false, None).is_ok());
    }
}
