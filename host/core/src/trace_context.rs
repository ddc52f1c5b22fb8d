//! W3C trace context carried by events, so that a trace begun by a publisher continues through
//! the handlers that process the event, on whatever host they run.
//!
//! An event carries its publisher's context in `metadata.traceparent` (and optionally
//! `metadata.tracestate`) — the names of the CloudEvents distributed-tracing extension, so a
//! CloudEvent's `traceparent` attribute lands there unchanged. The broker's `event` span (the
//! parent of each handler's `invoke` span) adopts it as its remote parent through a
//! [`ParentSetter`] that the service installs when it exports traces; without one (or for an
//! event without a context) nothing happens and nothing is allocated.

use std::sync::OnceLock;

use serde_json::{Map, Value};

/// Metadata key of the W3C `traceparent` (version-traceid-parentid-flags).
pub const TRACEPARENT_KEY: &str = "traceparent";
/// Metadata key of the W3C `tracestate` that goes with it.
pub const TRACESTATE_KEY: &str = "tracestate";
/// The longest `tracestate` kept (the W3C limit is 32 entries of at most 256 bytes; 512 bytes
/// is what the spec asks every vendor to propagate).
pub const MAX_TRACESTATE: usize = 512;

/// Makes `span` a child of the remote span `traceparent` names (with `tracestate`).
pub type ParentSetter = fn(span: &tracing::Span, traceparent: &str, tracestate: Option<&str>);

static SETTER: OnceLock<ParentSetter> = OnceLock::new();

/// Installs the process's [`ParentSetter`]; returns false if one was installed already (the
/// first one stays).
pub fn install(setter: ParentSetter) -> bool {
    SETTER.set(setter).is_ok()
}

/// Gives `span` the remote parent `metadata` carries, when a setter is installed, the span is
/// enabled and the metadata holds a valid `traceparent`.
pub fn adopt(span: &tracing::Span, metadata: &Map<String, Value>) {
    let Some(setter) = SETTER.get() else { return };
    if span.is_disabled() {
        return;
    }
    let Some(parent) = metadata.get(TRACEPARENT_KEY).and_then(Value::as_str) else {
        return;
    };
    if !is_traceparent(parent) {
        return;
    }
    let state = metadata.get(TRACESTATE_KEY).and_then(Value::as_str);
    setter(span, parent, state);
}

/// Copies a request's `traceparent` (and `tracestate`) into `metadata`, unless the event
/// carries its own context already or the header is not a valid W3C `traceparent`.
pub fn carry(metadata: &mut Map<String, Value>, traceparent: &str, tracestate: Option<&str>) {
    if metadata.contains_key(TRACEPARENT_KEY) || !is_traceparent(traceparent) {
        return;
    }
    metadata.insert(TRACEPARENT_KEY.into(), Value::String(traceparent.into()));
    if let Some(state) = tracestate.filter(|s| !s.is_empty() && s.len() <= MAX_TRACESTATE) {
        metadata.insert(TRACESTATE_KEY.into(), Value::String(state.into()));
    }
}

/// Whether `text` is a W3C `traceparent`: `VV-TTTT…(32)-PPPP…(16)-FF`, lowercase hex, version
/// not `ff`, trace and parent ids not all zero.
pub fn is_traceparent(text: &str) -> bool {
    let mut parts = text.split('-');
    let (Some(version), Some(trace), Some(parent), Some(flags)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let more = parts.next().is_some();
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let zero = |s: &str| s.bytes().all(|b| b == b'0');
    hex(version, 2)
        && version != "ff"
        // Version 00 has exactly four fields; later versions may append more.
        && !(more && version == "00")
        && hex(trace, 32)
        && !zero(trace)
        && hex(parent, 16)
        && !zero(parent)
        && hex(flags, 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn only_w3c_traceparents_are_accepted() {
        assert!(is_traceparent(VALID));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "not a traceparent at all",
        ] {
            assert!(!is_traceparent(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_request_context_is_carried_only_into_events_without_one() {
        let mut metadata = Map::new();
        carry(&mut metadata, VALID, Some("vendor=1"));
        assert_eq!(metadata[TRACEPARENT_KEY], VALID);
        assert_eq!(metadata[TRACESTATE_KEY], "vendor=1");
        let own = "00-11111111111111111111111111111111-2222222222222222-00";
        let mut metadata = Map::new();
        metadata.insert(TRACEPARENT_KEY.into(), Value::String(own.into()));
        carry(&mut metadata, VALID, None);
        assert_eq!(metadata[TRACEPARENT_KEY], own);
        let mut metadata = Map::new();
        carry(&mut metadata, "junk", None);
        assert!(metadata.is_empty());
        carry(&mut metadata, VALID, Some(&"x".repeat(MAX_TRACESTATE + 1)));
        assert!(!metadata.contains_key(TRACESTATE_KEY));
    }
}
