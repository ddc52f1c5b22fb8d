//! Names on the NATS side: event subjects, filter subjects for patterns, and the encoding of
//! event ids and group names into key-value keys and consumer names.
//!
//! - An event goes to `{prefix}.{source}.{type}`; each dot-separated segment of the type is a
//!   subject token. Tokens must be non-empty and free of whitespace, `*` and `>` (anything else
//!   would make an invalid subject or a wildcard).
//! - A pattern maps to the filter subject `{prefix}.*.{pattern}` (`*` stays `*`, `>` and `**`
//!   become `>`); the bare `*` (or `>`) maps to `{prefix}.>`.
//! - A re-run's message id is `{id}:requeue:{group}:{version}`, naming the (encoded) group it
//!   re-runs the event in and the version of that group's state it re-runs.
//! - Event ids and group names made only of ASCII letters, digits, `_` and `-` are used as they
//!   are; any other is written as `=` followed by its hex encoding (`=` never occurs in the
//!   plain form, so the two cannot collide).

use eventbroker::event::{Event, EventSource};
use eventbroker::pattern::{Pattern, Segment};

use super::NAME;
use eventbroker::provider::ProviderError;

/// The subject prefix of events: the first configured stream subject without its `.>`.
///
/// # Errors
/// [`ProviderError::Config`] when there is no subject or the first is not `prefix.>` with a
/// valid literal prefix.
pub(crate) fn prefix_of(subjects: &[String]) -> Result<String, ProviderError> {
    let config = |reason: String| ProviderError::Config {
        provider: NAME,
        reason,
    };
    let first = subjects
        .first()
        .ok_or_else(|| config("nats.subjects must name at least one subject".into()))?;
    let prefix = first.strip_suffix(".>").ok_or_else(|| {
        config(format!(
            "the first of nats.subjects must have the form \"prefix.>\", got {first:?}"
        ))
    })?;
    for token in prefix.split('.') {
        check_token(token).map_err(|why| {
            config(format!(
                "nats.subjects: prefix {prefix:?} is not a literal subject ({why})"
            ))
        })?;
    }
    Ok(prefix.to_owned())
}

/// Why `token` cannot be one literal subject token, if it cannot.
fn check_token(token: &str) -> Result<(), String> {
    if token.is_empty() {
        return Err("empty token".into());
    }
    if let Some(bad) = token
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '*' | '>'))
    {
        return Err(format!("token {token:?} contains {bad:?}"));
    }
    Ok(())
}

/// The subject an event is published on.
///
/// # Errors
/// [`ProviderError::Backend`] naming the offending segment when the type would not make a
/// valid literal subject (publish rejects the event before anything is written).
pub(crate) fn event_subject(prefix: &str, event: &Event) -> Result<String, ProviderError> {
    subject_for(prefix, event.source, &event.event_type)
}

fn subject_for(
    prefix: &str,
    source: EventSource,
    event_type: &str,
) -> Result<String, ProviderError> {
    for segment in event_type.split('.') {
        check_token(segment).map_err(|why| {
            ProviderError::backend(
                NAME,
                format!(
                    "event type {event_type:?} cannot be a NATS subject: {why}; types are \
                     dot-separated segments without whitespace, '*' or '>'"
                ),
            )
        })?;
    }
    Ok(format!("{prefix}.{}.{event_type}", source.as_str()))
}

/// The filter subject selecting the events a pattern matches, for any source.
pub(crate) fn filter_subject(prefix: &str, pattern: &Pattern) -> String {
    if pattern.matches_all() {
        return format!("{prefix}.>");
    }
    let mut subject = format!("{prefix}.*");
    for segment in pattern.segments() {
        subject.push('.');
        match segment {
            Segment::Literal(literal) => subject.push_str(literal),
            Segment::Any => subject.push('*'),
            Segment::Rest => subject.push('>'),
        }
    }
    subject
}

/// A name usable as a key-value key or a consumer name (see the module documentation).
pub(crate) fn encode_name(name: &str) -> String {
    if !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
    {
        name.to_owned()
    } else {
        format!("={}", hex::encode(name))
    }
}

/// The name [`encode_name`] encoded (a consumer name back to its group), or the text as it is
/// when it is not a valid encoding.
pub(crate) fn decode_name(encoded: &str) -> String {
    encoded
        .strip_prefix('=')
        .and_then(|hex_text| hex::decode(hex_text).ok())
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .unwrap_or_else(|| encoded.to_owned())
}

/// What a re-run's message id names: the group it re-runs the event in, and the version of that
/// group's state it re-runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rerun {
    /// The group, encoded with [`encode_name`] (its durable consumer's name).
    pub group: String,
    /// The version of the group's state the re-run was made from.
    pub version: u64,
}

/// The message id of a re-run of event `id` in `group` from the group's state at `version`
/// (unique per re-run, so the duplicate window never drops a later re-run, while a repeat of
/// the same one is).
pub(crate) fn rerun_message_id(id: &str, group: &str, version: u64) -> String {
    format!("{id}:requeue:{}:{version}", encode_name(group))
}

/// The re-run a message with id `message_id` carries, if it is a re-run of `id`.
pub(crate) fn rerun_of(message_id: &str, id: &str) -> Option<Rerun> {
    let (group, version) = message_id
        .strip_prefix(id)?
        .strip_prefix(":requeue:")?
        .rsplit_once(':')?;
    if group.contains(':') {
        return None;
    }
    Some(Rerun {
        group: group.to_owned(),
        version: version.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_comes_from_the_first_subject() {
        assert_eq!(prefix_of(&["events.>".into()]).unwrap(), "events");
        assert_eq!(prefix_of(&["a.b.>".into(), "x.>".into()]).unwrap(), "a.b");
        assert!(prefix_of(&[]).is_err());
        assert!(prefix_of(&["events".into()]).is_err());
        assert!(prefix_of(&["ev*.>".into()]).is_err());
        assert!(prefix_of(&["a..b.>".into()]).is_err());
        assert!(prefix_of(&[">".into()]).is_err());
    }

    #[test]
    fn subjects_carry_source_and_type_tokens() {
        assert_eq!(
            subject_for("events", EventSource::Database, "public.users.create").unwrap(),
            "events.database.public.users.create"
        );
        for bad in ["a..b", "a b", "a.*", "a.>", "", ".a", "a.", "tab\tx"] {
            let err = subject_for("events", EventSource::System, bad).unwrap_err();
            assert!(
                err.to_string().contains("cannot be a NATS subject"),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn patterns_become_filter_subjects() {
        let filter = |p: &str| filter_subject("events", &p.parse().unwrap());
        assert_eq!(filter("*"), "events.>");
        assert_eq!(filter(">"), "events.>");
        assert_eq!(filter("public.*.create"), "events.*.public.*.create");
        assert_eq!(filter("public.>"), "events.*.public.>");
        assert_eq!(filter("public.**"), "events.*.public.>");
        assert_eq!(filter("a.b"), "events.*.a.b");
    }

    #[test]
    fn rerun_ids_name_the_event_group_and_version() {
        let id = rerun_message_id("a:requeue:1", "group a", 42);
        let rerun = Rerun {
            group: encode_name("group a"),
            version: 42,
        };
        assert_eq!(rerun_of(&id, "a:requeue:1"), Some(rerun));
        assert_eq!(rerun_of(&id, "a"), None);
        assert_eq!(rerun_of("a", "a"), None);
        assert_eq!(rerun_of("a:requeue:g:x", "a"), None);
        assert_eq!(
            rerun_of("a:requeue:3", "a"),
            None,
            "an id of an earlier version"
        );
        assert_eq!(rerun_of("b:requeue:g:3", "a"), None);
        assert_ne!(
            rerun_message_id("a", "g1", 1),
            rerun_message_id("a", "g2", 1),
            "each group's re-runs have their own ids"
        );
    }

    #[test]
    fn names_are_encoded_only_when_needed() {
        assert_eq!(encode_name("abc-DEF_123"), "abc-DEF_123");
        assert_eq!(encode_name("a.b"), "=612e62");
        assert_eq!(encode_name("a:b"), "=613a62");
        assert_eq!(encode_name(""), "=");
        assert_ne!(encode_name("x y"), encode_name("x_y"));
        for name in ["abc-DEF_123", "a.b", "a:b", "", "grüppe 1"] {
            assert_eq!(decode_name(&encode_name(name)), name);
        }
    }
}
