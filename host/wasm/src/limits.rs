//! What a guest may hand the host, and how much: the bounds applied where the host receives
//! bytes from a guest — one host call or call result as a whole, subscription patterns, error and
//! trap messages — so that no guest can make the host copy, parse, store or log more than these.

use eventbroker::event::{MAX_FIELD_LEN, MAX_METADATA_BYTES, MAX_TYPE_LEN};
use eventbroker::pattern::Pattern;

/// Most subscription patterns a handler may have (from its manifest or its component).
pub const MAX_PATTERNS: usize = 100;
/// Longest subscription pattern, in bytes (the longest event type).
pub const MAX_PATTERN_LEN: usize = MAX_TYPE_LEN;
/// Longest error or trap message kept from an invocation, in bytes; longer ones are cut and
/// marked with how much was cut.
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024;
/// Smallest per-call transfer limit, whatever the log and payload limits: room for ordinary
/// messages and WASI stream writes.
const MIN_TRANSFER: usize = 64 * 1024;

/// Bytes a component's `patterns()` result may occupy as the host receives it: the most
/// patterns of the longest length, with the host's per-string overhead that wasmtime counts.
pub const PATTERNS_TRANSFER: usize = MAX_PATTERNS * (MAX_PATTERN_LEN + size_of::<String>());

/// The largest derived-event draft, in bytes of its text fields: the payload limit plus the
/// metadata limit plus the type and the four short fields at their limits.
pub fn draft_limit(max_payload: usize) -> usize {
    max_payload
        .saturating_add(MAX_METADATA_BYTES)
        .saturating_add(MAX_TYPE_LEN)
        .saturating_add(4 * MAX_FIELD_LEN)
}

/// The most bytes a guest may hand the host in one host call (`log`, `publish`, `config`, a
/// WASI call) or in the result of `handle`: the largest acceptable draft or the handler's log
/// budget, whichever is larger. Wasmtime checks it before copying anything; a guest that passes
/// more traps (see [`is_transfer_exceeded`]).
pub fn transfer_limit(max_payload: usize, max_log_bytes: usize) -> usize {
    draft_limit(max_payload)
        .max(max_log_bytes)
        .max(MIN_TRANSFER)
}

/// Whether `error` is wasmtime refusing to copy more than the transfer limit from a guest.
/// Wasmtime reports it with a private error type, so it is recognised by its message.
pub fn is_transfer_exceeded(error: &wasmtime::Error) -> bool {
    error
        .chain()
        .any(|cause| cause.to_string().contains("fuel allocated for hostcalls"))
}

/// `text` cut to at most [`MAX_MESSAGE_BYTES`] (at a character boundary), with a marker saying
/// how many bytes were cut. Shorter text is returned as is.
pub fn truncate_message(text: String) -> String {
    truncate_to(text, MAX_MESSAGE_BYTES)
}

fn truncate_to(mut text: String, limit: usize) -> String {
    if text.len() <= limit {
        return text;
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let cut = text.len() - end;
    text.truncate(end);
    text.push_str(&format!("… [{cut} more bytes cut]"));
    text
}

/// Checks a handler's patterns: at most [`MAX_PATTERNS`], each at most [`MAX_PATTERN_LEN`]
/// bytes and valid. `origin` names where they came from in the error (e.g. `component default`).
///
/// # Errors
/// A message naming the first rule broken.
pub fn check_patterns(patterns: &[String], origin: &str) -> Result<(), String> {
    if patterns.len() > MAX_PATTERNS {
        return Err(format!(
            "{origin} patterns: {} given, at most {MAX_PATTERNS} are allowed",
            patterns.len()
        ));
    }
    for pattern in patterns {
        if pattern.len() > MAX_PATTERN_LEN {
            return Err(format!(
                "{origin} pattern of {} bytes; at most {MAX_PATTERN_LEN} are allowed",
                pattern.len()
            ));
        }
        Pattern::new(pattern).map_err(|e| format!("{origin} {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_with_a_marker_at_a_character_boundary() {
        assert_eq!(truncate_message("short".into()), "short");
        let long = "é".repeat(MAX_MESSAGE_BYTES);
        let cut = truncate_message(long.clone());
        assert!(cut.len() < MAX_MESSAGE_BYTES + 64, "{}", cut.len());
        assert!(cut.ends_with("more bytes cut]"), "{cut}");
        let kept = cut.split('…').next().unwrap();
        assert!(long.starts_with(kept));
        assert_eq!(truncate_to("abcdef".into(), 3), "abc… [3 more bytes cut]");
    }

    #[test]
    fn patterns_are_bounded_in_count_and_length() {
        check_patterns(&["a.*".into(), "*".into()], "component default").expect("fine");
        let many = vec!["a.b".to_owned(); MAX_PATTERNS + 1];
        let err = check_patterns(&many, "component default").unwrap_err();
        assert!(err.contains("at most 100"), "{err}");
        let long = vec!["a".repeat(MAX_PATTERN_LEN + 1)];
        let err = check_patterns(&long, "component default").unwrap_err();
        assert!(err.contains("at most 255"), "{err}");
        let err = check_patterns(&["a..b".into()], "component default").unwrap_err();
        assert!(err.starts_with("component default"), "{err}");
    }

    #[test]
    fn the_transfer_limit_fits_the_largest_draft_and_the_log_budget() {
        let mib = 1 << 20;
        assert!(transfer_limit(mib, 64 << 10) >= draft_limit(mib));
        assert_eq!(transfer_limit(1024, 4 * mib), 4 * mib);
        assert!(transfer_limit(0, 0) >= MIN_TRANSFER);
    }
}
