//! Which database a URL names, how to reach it, and the checks on names that end up in SQL.

use std::path::PathBuf;

use super::NAME;
use eventbroker::provider::ProviderError;

/// Longest accepted table name: leaves room for the suffixes of the provider's other tables
/// and indexes within PostgreSQL's 63-byte identifier limit.
pub const MAX_TABLE_NAME: usize = 40;

/// The two supported databases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// PostgreSQL: `FOR UPDATE SKIP LOCKED` claims, `LISTEN/NOTIFY` wake-ups.
    Postgres,
    /// SQLite: a single writer per process, claims inside `BEGIN IMMEDIATE`, polling.
    Sqlite,
}

/// A parsed `database.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The database kind.
    pub dialect: Dialect,
    /// The URL to connect with (for SQLite: with `mode=rwc` so the file is created).
    pub url: String,
    /// The database file (SQLite only).
    pub path: Option<PathBuf>,
}

fn config_error(reason: impl Into<String>) -> ProviderError {
    ProviderError::Config {
        provider: NAME,
        reason: reason.into(),
    }
}

impl Target {
    /// Parses `postgres://…`, `postgresql://…` or `sqlite://path` (also `sqlite:path`).
    ///
    /// # Errors
    /// [`ProviderError::Config`] for another scheme, an empty SQLite path or an in-memory
    /// SQLite database (each pooled connection would see a different one).
    pub fn parse(url: &str) -> Result<Self, ProviderError> {
        let url = url.trim();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Target {
                dialect: Dialect::Postgres,
                url: url.to_owned(),
                path: None,
            });
        }
        let Some(rest) = url.strip_prefix("sqlite:") else {
            return Err(config_error(format!(
                "database.url must start with postgres://, postgresql:// or sqlite://, got {:?}",
                redact(url)
            )));
        };
        let rest = rest.strip_prefix("//").unwrap_or(rest);
        let (path, query) = match rest.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (rest, None),
        };
        if path.is_empty() {
            return Err(config_error("database.url names no SQLite file"));
        }
        if path == ":memory:" || query.is_some_and(|q| q.contains("mode=memory")) {
            return Err(config_error(
                "an in-memory SQLite database cannot be shared by a connection pool; \
                 use a file path (a temporary file is fine) or the memory provider",
            ));
        }
        let mut connect = format!("sqlite://{path}");
        match query {
            Some(query) if query.split('&').any(|kv| kv.starts_with("mode=")) => {
                connect.push('?');
                connect.push_str(query);
            }
            Some(query) => {
                connect.push('?');
                connect.push_str(query);
                connect.push_str("&mode=rwc");
            }
            None => connect.push_str("?mode=rwc"),
        }
        Ok(Target {
            dialect: Dialect::Sqlite,
            url: connect,
            path: Some(PathBuf::from(path)),
        })
    }
}

/// The URL with any password replaced, for messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((credentials, host)) => match credentials.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// Checks that `name` is a plain identifier that can be written into SQL unquoted: ASCII
/// letters, digits and `_`, starting with a letter or `_`, at most [`MAX_TABLE_NAME`] bytes.
/// Nothing else is ever interpolated into the provider's SQL.
///
/// # Errors
/// [`ProviderError::Config`] saying what is wrong.
pub fn validate_identifier(name: &str) -> Result<(), ProviderError> {
    identifier_problem(name).map_or(Ok(()), |reason| {
        Err(config_error(format!("database.table_name {reason}")))
    })
}

/// What is wrong with `name` as a table name (a plain identifier of at most
/// [`MAX_TABLE_NAME`] characters), if anything.
pub(crate) fn identifier_problem(name: &str) -> Option<String> {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return Some("is empty".into());
    };
    if name.len() > MAX_TABLE_NAME {
        return Some(format!(
            "{name:?} is longer than {MAX_TABLE_NAME} characters"
        ));
    }
    if !(first.is_ascii_alphabetic() || first == '_') {
        return Some(format!("{name:?} must start with a letter or '_'"));
    }
    if let Some(bad) = chars.find(|c| !(c.is_ascii_alphanumeric() || *c == '_')) {
        return Some(format!(
            "{name:?} contains {bad:?}; allowed are letters, digits and '_'"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_select_the_dialect() {
        let pg = Target::parse("postgres://u:p@localhost/db").unwrap();
        assert_eq!(pg.dialect, Dialect::Postgres);
        assert_eq!(pg.url, "postgres://u:p@localhost/db");
        let sqlite = Target::parse("sqlite://data/events.db").unwrap();
        assert_eq!(sqlite.dialect, Dialect::Sqlite);
        assert_eq!(sqlite.url, "sqlite://data/events.db?mode=rwc");
        assert_eq!(sqlite.path, Some(PathBuf::from("data/events.db")));
        let absolute = Target::parse("sqlite:///tmp/x.db?cache=private").unwrap();
        assert_eq!(absolute.url, "sqlite:///tmp/x.db?cache=private&mode=rwc");
        assert_eq!(absolute.path, Some(PathBuf::from("/tmp/x.db")));
        let read_only = Target::parse("sqlite:x.db?mode=ro").unwrap();
        assert_eq!(read_only.url, "sqlite://x.db?mode=ro");
        for bad in ["mysql://x", "sqlite://", "sqlite::memory:", "redis://x", ""] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://user:secret@host/db"),
            "postgres://user:***@host/db"
        );
        assert_eq!(redact("postgres://host/db"), "postgres://host/db");
    }

    #[test]
    fn identifiers_are_checked() {
        for good in ["events", "_e", "Events_2", &"a".repeat(MAX_TABLE_NAME)] {
            validate_identifier(good).unwrap();
        }
        for bad in [
            "",
            "2events",
            "events;drop",
            "ev ents",
            "\"events\"",
            "ev-ents",
            "évents",
            &"a".repeat(MAX_TABLE_NAME + 1),
        ] {
            assert!(validate_identifier(bad).is_err(), "{bad}");
        }
    }
}
