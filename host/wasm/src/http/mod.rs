//! Outbound HTTP for handlers, granted per handler by the `[http]` section of its manifest:
//! the grant and its rules ([`grant`]), and the checked sending of each request
//! ([`outbound`]). A component that imports `wasi:http` without a grant is refused at deploy
//! ([`check_imports`]).

pub mod grant;
pub(crate) mod outbound;

use crate::WasmError;

/// The interface whose import needs an `[http]` grant.
pub const OUTGOING_HANDLER: &str = "wasi:http/outgoing-handler";

/// Refuses a component that imports `wasi:http/outgoing-handler` when its manifest grants no
/// outbound HTTP; `imports` are the component's import names.
///
/// # Errors
/// [`WasmError::Link`] saying which grant is missing and how to give it.
pub fn check_imports<'a>(
    imports: impl IntoIterator<Item = &'a str>,
    granted: bool,
) -> Result<(), WasmError> {
    if granted {
        return Ok(());
    }
    match imports
        .into_iter()
        .find(|name| name.starts_with(OUTGOING_HANDLER))
    {
        Some(import) => Err(WasmError::Link(format!(
            "the component imports {import} (outbound HTTP), but its manifest grants none: add an [http] section listing what it may call, e.g. [http] allow = [\"https://api.example.com\"]"
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http_import_needs_a_grant() {
        let imports = ["wasi:io/streams@0.2.0", "wasi:http/outgoing-handler@0.2.4"];
        let refused = check_imports(imports, false).expect_err("no grant");
        assert!(refused.to_string().contains("[http]"), "{refused}");
        assert!(check_imports(imports, true).is_ok());
        assert!(check_imports(["wasi:io/streams@0.2.0"], false).is_ok());
    }
}
