//! Subscription patterns over dotted event types, and an index that finds every
//! subscription matching a type without testing each pattern in turn.
//!
//! Rules:
//! - segments are separated by `.`;
//! - `*` matches exactly one segment;
//! - `>` (or its alias `**`) as the last segment matches one or more remaining segments;
//! - a bare `*` matches every type (as ResolveSpec's plan uses it), as does a bare `>`.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One compiled segment of a pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Segment {
    /// Matches this exact segment.
    Literal(String),
    /// `*`: matches any one segment.
    Any,
    /// `>` or `**` (last only): matches one or more segments.
    Rest,
}

/// A compiled subscription pattern.
///
/// # Examples
/// ```
/// use eventbroker::Pattern;
/// let pattern: Pattern = "public.*.create".parse()?;
/// assert!(pattern.matches("public.users.create"));
/// assert!(!pattern.matches("public.users.delete"));
/// assert!("*".parse::<Pattern>()?.matches("anything.at.all"));
/// # Ok::<(), eventbroker::PatternError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    source: String,
    segments: Vec<Segment>,
}

impl Pattern {
    /// Compiles a pattern.
    ///
    /// # Errors
    /// [`PatternError`] saying which segment is wrong and why: empty patterns or segments,
    /// `>`/`**` anywhere but last, wildcards mixed with other characters, characters that
    /// cannot appear in an event type.
    pub fn new(text: &str) -> Result<Self, PatternError> {
        let error = |position: usize, reason: String| PatternError {
            pattern: text.to_owned(),
            position,
            reason,
        };
        if text.is_empty() {
            return Err(error(0, "pattern is empty".into()));
        }
        if text == "*" {
            return Ok(Pattern {
                source: text.to_owned(),
                segments: vec![Segment::Rest],
            });
        }
        let parts: Vec<&str> = text.split('.').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (index, part) in parts.iter().enumerate() {
            let position = index + 1;
            let last = index + 1 == parts.len();
            let segment = match *part {
                "" => return Err(error(position, "empty segment".into())),
                "*" => Segment::Any,
                ">" | "**" if last => Segment::Rest,
                ">" | "**" => {
                    return Err(error(
                        position,
                        format!("{part:?} may only be the last segment"),
                    ));
                }
                literal => {
                    if let Some(bad) = literal
                        .chars()
                        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-')))
                    {
                        let reason = if matches!(bad, '*' | '>') {
                            format!("wildcard {bad:?} must be a whole segment, found {literal:?}")
                        } else {
                            format!(
                                "{literal:?} contains {bad:?}; allowed are letters, digits, \
                                 '_', '-' and the wildcards '*', '>' and '**'"
                            )
                        };
                        return Err(error(position, reason));
                    }
                    Segment::Literal(literal.to_owned())
                }
            };
            segments.push(segment);
        }
        Ok(Pattern {
            source: text.to_owned(),
            segments,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The compiled segments (a bare `*` compiles to a single [`Segment::Rest`]).
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// True when the pattern matches every type.
    pub fn matches_all(&self) -> bool {
        self.segments == [Segment::Rest]
    }

    /// Whether `event_type` matches. Linear in the number of segments.
    pub fn matches(&self, event_type: &str) -> bool {
        let mut parts = event_type.split('.');
        for segment in &self.segments {
            match segment {
                Segment::Rest => return parts.next().is_some(),
                Segment::Any => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Segment::Literal(literal) => {
                    if parts.next() != Some(literal.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl FromStr for Pattern {
    type Err = PatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Pattern::new(s)
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Pattern::new(&text).map_err(serde::de::Error::custom)
    }
}

/// A malformed pattern, with the 1-based segment position where the problem is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid pattern {pattern:?} at segment {position}: {reason}")]
pub struct PatternError {
    /// The pattern as given.
    pub pattern: String,
    /// 1-based segment position (0 for the pattern as a whole).
    pub position: usize,
    /// What is wrong.
    pub reason: String,
}

/// A trie over pattern segments mapping event types to the keys of every pattern that
/// matches them. Lookup cost depends on the type's length and the wildcards on its path,
/// not on the number of patterns.
#[derive(Debug, Clone)]
pub struct PatternIndex<K> {
    root: Node<K>,
    len: usize,
}

#[derive(Debug, Clone)]
struct Node<K> {
    literal: HashMap<String, Node<K>>,
    any: Option<Box<Node<K>>>,
    /// Keys whose pattern ends here with `>`: they match one or more further segments.
    rest: Vec<K>,
    /// Keys whose pattern ends exactly here.
    exact: Vec<K>,
}

impl<K> Default for Node<K> {
    fn default() -> Self {
        Node {
            literal: HashMap::new(),
            any: None,
            rest: Vec::new(),
            exact: Vec::new(),
        }
    }
}

impl<K> Node<K> {
    fn is_empty(&self) -> bool {
        self.literal.is_empty()
            && self.any.is_none()
            && self.rest.is_empty()
            && self.exact.is_empty()
    }
}

impl<K> Default for PatternIndex<K> {
    fn default() -> Self {
        PatternIndex {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<K: Clone + PartialEq> PatternIndex<K> {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of (pattern, key) entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the index holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `key` under `pattern`. The same key may be added under several patterns.
    pub fn insert(&mut self, pattern: &Pattern, key: K) {
        let mut node = &mut self.root;
        for segment in pattern.segments() {
            match segment {
                Segment::Literal(literal) => {
                    node = node.literal.entry(literal.clone()).or_default();
                }
                Segment::Any => {
                    node = node.any.get_or_insert_with(Box::default);
                }
                Segment::Rest => {
                    node.rest.push(key);
                    self.len += 1;
                    return;
                }
            }
        }
        node.exact.push(key);
        self.len += 1;
    }

    /// Removes `key` from under `pattern`; returns whether it was there.
    pub fn remove(&mut self, pattern: &Pattern, key: &K) -> bool {
        let removed = Self::remove_at(&mut self.root, pattern.segments(), key);
        if removed {
            self.len -= 1;
        }
        removed
    }

    fn remove_at(node: &mut Node<K>, segments: &[Segment], key: &K) -> bool {
        let Some((first, rest)) = segments.split_first() else {
            return remove_one(&mut node.exact, key);
        };
        match first {
            Segment::Rest => remove_one(&mut node.rest, key),
            Segment::Any => {
                let Some(child) = node.any.as_mut() else {
                    return false;
                };
                let removed = Self::remove_at(child, rest, key);
                if child.is_empty() {
                    node.any = None;
                }
                removed
            }
            Segment::Literal(literal) => {
                let Some(child) = node.literal.get_mut(literal) else {
                    return false;
                };
                let removed = Self::remove_at(child, rest, key);
                if child.is_empty() {
                    node.literal.remove(literal);
                }
                removed
            }
        }
    }

    /// Every key whose pattern matches `event_type`, each once per matching pattern,
    /// in no particular order.
    pub fn matches(&self, event_type: &str) -> Vec<K> {
        let parts: Vec<&str> = event_type.split('.').collect();
        let mut found = Vec::new();
        Self::collect(&self.root, &parts, &mut found);
        found
    }

    fn collect(node: &Node<K>, parts: &[&str], found: &mut Vec<K>) {
        let Some((first, rest)) = parts.split_first() else {
            found.extend(node.exact.iter().cloned());
            return;
        };
        found.extend(node.rest.iter().cloned());
        if let Some(child) = node.literal.get(*first) {
            Self::collect(child, rest, found);
        }
        if let Some(child) = &node.any {
            Self::collect(child, rest, found);
        }
    }
}

fn remove_one<K: PartialEq>(keys: &mut Vec<K>, key: &K) -> bool {
    match keys.iter().position(|k| k == key) {
        Some(index) => {
            keys.swap_remove(index);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(text: &str) -> Pattern {
        Pattern::new(text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn literal_and_single_wildcard() {
        assert!(p("public.users.create").matches("public.users.create"));
        assert!(!p("public.users.create").matches("public.users"));
        assert!(!p("public.users.create").matches("public.users.create.x"));
        assert!(p("public.*.create").matches("public.orders.create"));
        assert!(!p("public.*.create").matches("public.create"));
        assert!(p("*.*.create").matches("a.b.create"));
        assert!(!p("*.*").matches("a"));
        assert!(!p("*.*").matches("a.b.c"));
    }

    #[test]
    fn rest_wildcard_matches_one_or_more() {
        for pattern in ["public.>", "public.**"] {
            assert!(p(pattern).matches("public.users"), "{pattern}");
            assert!(p(pattern).matches("public.users.create"), "{pattern}");
            assert!(!p(pattern).matches("public"), "{pattern}");
            assert!(!p(pattern).matches("private.users"), "{pattern}");
        }
        assert!(p(">").matches("a"));
        assert!(p("*.>").matches("a.b"));
        assert!(!p("*.>").matches("a"));
    }

    #[test]
    fn bare_star_matches_everything() {
        let all = p("*");
        assert!(all.matches_all());
        for t in ["a", "a.b", "public.users.create", "x.y.z.w.v"] {
            assert!(all.matches(t), "{t}");
        }
    }

    #[test]
    fn malformed_patterns_say_where() {
        for (bad, position, needle) in [
            ("", 0, "empty"),
            ("a..b", 2, "empty segment"),
            ("a.", 2, "empty segment"),
            (".a", 1, "empty segment"),
            ("a.>.b", 2, "last"),
            ("**.a", 1, "last"),
            ("a.b*", 2, "whole segment"),
            ("a.>x", 2, "whole segment"),
            ("a.b c", 2, "' '"),
            ("a.$", 2, "'$'"),
        ] {
            let err = Pattern::new(bad).expect_err(bad);
            assert_eq!(err.position, position, "{bad}: {err}");
            assert!(err.to_string().contains(needle), "{bad}: {err}");
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn serde_compiles_patterns() {
        let pattern: Pattern = serde_json::from_str("\"a.*\"").expect("valid");
        assert_eq!(pattern.as_str(), "a.*");
        assert!(serde_json::from_str::<Pattern>("\"a..\"").is_err());
        assert_eq!(serde_json::to_string(&pattern).expect("ser"), "\"a.*\"");
    }

    #[test]
    fn index_finds_and_forgets() {
        let mut index = PatternIndex::new();
        index.insert(&p("public.users.create"), 1);
        index.insert(&p("public.*.create"), 2);
        index.insert(&p("public.>"), 3);
        index.insert(&p("*"), 4);
        index.insert(&p("other.>"), 5);
        let mut found = index.matches("public.users.create");
        found.sort();
        assert_eq!(found, vec![1, 2, 3, 4]);
        assert!(index.remove(&p("public.*.create"), &2));
        assert!(!index.remove(&p("public.*.create"), &2));
        let mut found = index.matches("public.users.create");
        found.sort();
        assert_eq!(found, vec![1, 3, 4]);
        assert_eq!(index.len(), 4);
        for (pattern, key) in [
            ("public.users.create", 1),
            ("public.>", 3),
            ("*", 4),
            ("other.>", 5),
        ] {
            assert!(index.remove(&p(pattern), &key));
        }
        assert!(index.is_empty());
        assert!(index.root.is_empty(), "empty branches are pruned");
    }

    fn segment_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just("c".to_owned())
        ]
    }

    fn pattern_strategy() -> impl Strategy<Value = String> {
        let middle = prop_oneof![3 => segment_strategy(), 1 => Just("*".to_owned())];
        (
            proptest::collection::vec(middle, 0..4),
            prop_oneof![
                3 => segment_strategy(),
                1 => Just("*".to_owned()),
                1 => Just(">".to_owned()),
                1 => Just("**".to_owned())
            ],
        )
            .prop_map(|(mut parts, last)| {
                parts.push(last);
                parts.join(".")
            })
    }

    fn type_strategy() -> impl Strategy<Value = String> {
        proptest::collection::vec(segment_strategy(), 1..6).prop_map(|parts| parts.join("."))
    }

    /// The obvious recursive definition, independent of the compiled form.
    fn naive(pattern: &str, event_type: &str) -> bool {
        if pattern == "*" {
            return true;
        }
        fn go(p: &[&str], t: &[&str]) -> bool {
            match (p.split_first(), t.split_first()) {
                (None, None) => true,
                (Some((&">", [])), Some(_)) | (Some((&"**", [])), Some(_)) => true,
                (Some((&"*", pr)), Some((_, tr))) => go(pr, tr),
                (Some((lit, pr)), Some((seg, tr))) => lit == seg && go(pr, tr),
                _ => false,
            }
        }
        let p: Vec<&str> = pattern.split('.').collect();
        let t: Vec<&str> = event_type.split('.').collect();
        go(&p, &t)
    }

    proptest! {
        #[test]
        fn index_agrees_with_naive_matcher(
            patterns in proptest::collection::vec(pattern_strategy(), 1..20),
            types in proptest::collection::vec(type_strategy(), 1..20),
        ) {
            let mut index = PatternIndex::new();
            for (key, text) in patterns.iter().enumerate() {
                index.insert(&p(text), key);
            }
            for event_type in &types {
                let mut found = index.matches(event_type);
                found.sort();
                let expected: Vec<usize> = patterns
                    .iter()
                    .enumerate()
                    .filter(|(_, text)| naive(text, event_type))
                    .map(|(key, _)| key)
                    .collect();
                prop_assert_eq!(&found, &expected, "type {}", event_type);
                for (key, text) in patterns.iter().enumerate() {
                    prop_assert_eq!(p(text).matches(event_type), expected.contains(&key));
                }
            }
        }
    }
}
