//! Parsing of stream replies (`XREADGROUP`, `XAUTOCLAIM`, `XRANGE`, `XPENDING`) from raw
//! values, so that deleted entries (a nil field list) are seen rather than rejected.

use std::collections::HashMap;

use redis::Value;

/// One stream entry as read: its id and its fields (`None` if it was deleted meanwhile).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    pub id: String,
    pub fields: Option<HashMap<String, String>>,
}

impl Entry {
    /// A field's value.
    pub(crate) fn field(&self, name: &str) -> Option<&str> {
        self.fields.as_ref()?.get(name).map(String::as_str)
    }
}

pub(crate) fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

pub(crate) fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(i) => Some(*i),
        other => text(other)?.parse().ok(),
    }
}

fn items(value: &Value) -> &[Value] {
    match value {
        Value::Array(items) | Value::Set(items) => items,
        _ => &[],
    }
}

fn fields(value: &Value) -> Option<HashMap<String, String>> {
    match value {
        Value::Array(items) => Some(
            items
                .chunks(2)
                .filter_map(|pair| Some((text(pair.first()?)?, text(pair.get(1)?)?)))
                .collect(),
        ),
        Value::Map(pairs) => Some(
            pairs
                .iter()
                .filter_map(|(k, v)| Some((text(k)?, text(v)?)))
                .collect(),
        ),
        _ => None,
    }
}

/// Entries of a `[[id, fields], …]` list.
pub(crate) fn entries(value: &Value) -> Vec<Entry> {
    items(value)
        .iter()
        .filter_map(|entry| {
            let parts = items(entry);
            Some(Entry {
                id: text(parts.first()?)?,
                fields: parts.get(1).and_then(fields),
            })
        })
        .collect()
}

/// Entries of an `XREADGROUP` reply for one stream (nil when the block timed out).
pub(crate) fn read_reply(value: &Value) -> Vec<Entry> {
    match value {
        Value::Array(streams) => streams
            .iter()
            .flat_map(|stream| items(stream).get(1).map(entries).unwrap_or_default())
            .collect(),
        Value::Map(streams) => streams.iter().flat_map(|(_, v)| entries(v)).collect(),
        _ => Vec::new(),
    }
}

/// The next cursor and the claimed entries of an `XAUTOCLAIM` reply.
pub(crate) fn autoclaim_reply(value: &Value) -> (String, Vec<Entry>) {
    let parts = items(value);
    let cursor = parts.first().and_then(text).unwrap_or_else(|| "0-0".into());
    let claimed = parts.get(1).map(entries).unwrap_or_default();
    (cursor, claimed)
}

/// `(entry id, consumer, times delivered)` of an extended `XPENDING` reply.
pub(crate) fn pending_reply(value: &Value) -> Vec<(String, String, u32)> {
    items(value)
        .iter()
        .filter_map(|row| {
            let row = items(row);
            Some((
                text(row.first()?)?,
                text(row.get(1)?)?,
                u32::try_from(int(row.get(3)?)?).unwrap_or(u32::MAX),
            ))
        })
        .collect()
}

/// `(group, field, value)` of the numeric fields `pending`, `consumers` and `lag` of an
/// `XINFO GROUPS` reply.
pub(crate) fn group_info(value: &Value) -> Vec<(String, &'static str, i64)> {
    let mut out = Vec::new();
    for group in items(value) {
        let Some(fields) = fields_raw(group) else {
            continue;
        };
        let Some(name) = fields
            .iter()
            .find(|(k, _)| k == "name")
            .and_then(|(_, v)| text(v))
        else {
            continue;
        };
        for wanted in ["pending", "consumers", "lag"] {
            if let Some(n) = fields
                .iter()
                .find(|(k, _)| k == wanted)
                .and_then(|(_, v)| int(v))
            {
                out.push((name.clone(), wanted, n));
            }
        }
    }
    out
}

fn fields_raw(value: &Value) -> Option<Vec<(String, &Value)>> {
    match value {
        Value::Array(items) => Some(
            items
                .chunks(2)
                .filter_map(|pair| Some((text(pair.first()?)?, pair.get(1)?)))
                .collect(),
        ),
        Value::Map(pairs) => Some(
            pairs
                .iter()
                .filter_map(|(k, v)| Some((text(k)?, v)))
                .collect(),
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn parses_entries_including_deleted_ones() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("s"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk("1-0"),
                    Value::Array(vec![bulk("id"), bulk("e1")]),
                ]),
                Value::Array(vec![bulk("2-0"), Value::Nil]),
            ]),
        ])]);
        let got = read_reply(&reply);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].field("id"), Some("e1"));
        assert_eq!(got[1].fields, None);
        assert!(read_reply(&Value::Nil).is_empty());
    }
}
