//! `list`: every [`EventFilter`] field as SQL, ordering and pagination in the database, over
//! the events as the provider's own group sees them (its status, outcomes and times).
//!
//! The type pattern is translated exactly for valid event types (segments of letters, digits,
//! `_` and `-`, none empty): literal segments and `*` become a `LIKE` (PostgreSQL) or `GLOB`
//! (SQLite, whose `LIKE` ignores case) pattern, and the number of dots pins the number of
//! segments, so `*` cannot swallow a dot. Pagination therefore stays in SQL. A final check in
//! Rust guards against stored types that bypassed validation.

use sqlx::AssertSqlSafe;

use super::dialect::Dialect;
use super::row::{AnyQuery, EVENT_COLUMNS, decode_event, nanos};
use super::schema::{view_columns, view_from};
use super::{Shared, db_error};
use eventbroker::broker::CAUSED_BY_KEY;
use eventbroker::event::Event;
use eventbroker::pattern::{Pattern, Segment};
use eventbroker::provider::{EventFilter, ProviderError, SortOrder};

/// A value to bind.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Text(String),
    Int(i64),
}

/// A `WHERE … ORDER BY … LIMIT … OFFSET …` clause and its values.
#[derive(Debug, Default)]
struct Clause {
    sql: String,
    values: Vec<Value>,
}

impl Clause {
    fn push(&mut self, condition: &str, value: Value) {
        self.values.push(value);
        let n = self.values.len();
        self.sql.push_str(" AND ");
        self.sql.push_str(&condition.replace('?', &format!("${n}")));
    }
}

const DOTS: &str = "(LENGTH(type) - LENGTH(REPLACE(type, '.', '')))";

/// Conditions matching exactly the valid types that `pattern` matches.
fn pattern_conditions(dialect: Dialect, pattern: &Pattern, clause: &mut Clause) {
    if pattern.matches_all() {
        return;
    }
    let segments = pattern.segments();
    let (fixed, rest) = match segments.split_last() {
        Some((Segment::Rest, fixed)) => (fixed, true),
        _ => (segments, false),
    };
    if !rest && fixed.iter().all(|s| matches!(s, Segment::Literal(_))) {
        clause.push("type = ?", Value::Text(pattern.as_str().to_owned()));
        return;
    }
    let (any, many) = match dialect {
        Dialect::Postgres => ("%", "%"),
        Dialect::Sqlite => ("*", "*"),
    };
    let mut parts: Vec<String> = fixed
        .iter()
        .map(|segment| match segment {
            Segment::Literal(literal) => match dialect {
                // `_` is LIKE's one-character wildcard; `\` is PostgreSQL's default escape.
                Dialect::Postgres => literal.replace('_', "\\_"),
                // Letters, digits, `_` and `-` are not GLOB wildcards.
                Dialect::Sqlite => literal.clone(),
            },
            Segment::Any | Segment::Rest => any.to_owned(),
        })
        .collect();
    if rest {
        parts.push(many.to_owned());
    }
    let text = parts.join(".");
    match dialect {
        Dialect::Postgres => clause.push("type LIKE ?", Value::Text(text)),
        Dialect::Sqlite => clause.push("type GLOB ?", Value::Text(text)),
    }
    let dots = i64::try_from(fixed.len()).unwrap_or(i64::MAX);
    if rest {
        clause.push(&format!("{DOTS} >= ?"), Value::Int(dots));
    } else {
        clause.push(&format!("{DOTS} = ?"), Value::Int(dots - 1));
    }
}

/// The clause over the view of `group` (bound as `$1`, see [`list`]).
fn build(dialect: Dialect, group: &str, filter: &EventFilter) -> Result<Clause, ProviderError> {
    let mut clause = Clause {
        sql: "WHERE 1 = 1".into(),
        values: vec![Value::Text(group.to_owned())],
    };
    let text = |value: &str| Value::Text(value.to_owned());
    if let Some(source) = filter.source {
        clause.push("source = ?", text(source.as_str()));
    }
    if let Some(status) = filter.status {
        clause.push("status = ?", text(status.as_str()));
    }
    if let Some(user_id) = filter.user_id {
        clause.push("user_id = ?", Value::Int(user_id));
    }
    for (column, value) in [
        ("session_id", &filter.session_id),
        ("schema", &filter.schema),
        ("entity", &filter.entity),
        ("operation", &filter.operation),
        ("instance_id", &filter.instance_id),
    ] {
        if let Some(value) = value {
            clause.push(&format!("{column} = ?"), text(value));
        }
    }
    if let Some(handler) = &filter.handler {
        match dialect {
            Dialect::Postgres => clause.push(
                "CAST(handlers AS jsonb) @> CAST(? AS jsonb)",
                Value::Text(serde_json::json!([{ "handler": handler }]).to_string()),
            ),
            Dialect::Sqlite => clause.push(
                "EXISTS (SELECT 1 FROM json_each(handlers) AS o \
                 WHERE json_extract(o.value, '$.handler') = ?)",
                text(handler),
            ),
        }
    }
    if let Some(cause) = &filter.caused_by {
        match dialect {
            Dialect::Postgres => clause.push(
                &format!("CAST(metadata AS jsonb) ->> '{CAUSED_BY_KEY}' = ?"),
                text(cause),
            ),
            Dialect::Sqlite => clause.push(
                &format!("json_extract(metadata, '$.{CAUSED_BY_KEY}') = ?"),
                text(cause),
            ),
        }
    }
    if let Some(pattern) = &filter.type_pattern {
        pattern_conditions(dialect, pattern, &mut clause);
    }
    if let Some(after) = filter.created_after {
        clause.push(
            "created_at >= ?",
            Value::Int(nanos(after, "created_after")?),
        );
    }
    if let Some(before) = filter.created_before {
        clause.push(
            "created_at < ?",
            Value::Int(nanos(before, "created_before")?),
        );
    }
    let direction = match filter.order {
        SortOrder::Asc => "ASC",
        SortOrder::Desc => "DESC",
    };
    // Byte order for ids, as the memory provider sorts them.
    let id = match dialect {
        Dialect::Postgres => "id COLLATE \"C\"",
        Dialect::Sqlite => "id",
    };
    let limit = i64::try_from(filter.effective_limit()).unwrap_or(i64::MAX);
    let offset = i64::try_from(filter.offset).unwrap_or(i64::MAX);
    clause.values.push(Value::Int(limit));
    clause.values.push(Value::Int(offset));
    let n = clause.values.len();
    clause.sql.push_str(&format!(
        " ORDER BY created_at {direction}, {id} {direction} LIMIT ${} OFFSET ${n}",
        n - 1
    ));
    Ok(clause)
}

/// Events matching `filter`, ordered and paginated by the database.
pub async fn list(shared: &Shared, filter: &EventFilter) -> Result<Vec<Event>, ProviderError> {
    if filter.effective_limit() == 0 {
        return Ok(Vec::new());
    }
    let clause = build(shared.dialect, &shared.options.group, filter)?;
    // The own group's view of every event, under the event column names.
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM (SELECT {} FROM {}) v {}",
        view_columns(),
        view_from(&shared.table, "$1"),
        clause.sql
    );
    let mut query: AnyQuery<'_> = sqlx::query(AssertSqlSafe(sql));
    for value in clause.values {
        query = match value {
            Value::Text(text) => query.bind(text),
            Value::Int(int) => query.bind(int),
        };
    }
    let rows = query.fetch_all(&shared.pool).await.map_err(db_error)?;
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        let event = decode_event(row, 0)?;
        if filter
            .type_pattern
            .as_ref()
            .is_none_or(|p| p.matches(&event.event_type))
        {
            events.push(event);
        }
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conditions(dialect: Dialect, pattern: &str) -> (String, Vec<Value>) {
        let mut clause = Clause::default();
        pattern_conditions(dialect, &pattern.parse().unwrap(), &mut clause);
        (clause.sql, clause.values)
    }

    #[test]
    fn patterns_translate_exactly() {
        assert_eq!(conditions(Dialect::Sqlite, "*").0, "");
        assert_eq!(conditions(Dialect::Sqlite, ">").0, "");
        let (sql, values) = conditions(Dialect::Postgres, "public.users.create");
        assert_eq!(sql, " AND type = $1");
        assert_eq!(values, [Value::Text("public.users.create".into())]);
        let (sql, values) = conditions(Dialect::Postgres, "my_schema.*.create");
        assert_eq!(sql, format!(" AND type LIKE $1 AND {DOTS} = $2"));
        assert_eq!(
            values,
            [Value::Text("my\\_schema.%.create".into()), Value::Int(2)]
        );
        let (sql, values) = conditions(Dialect::Sqlite, "public.>");
        assert_eq!(sql, format!(" AND type GLOB $1 AND {DOTS} >= $2"));
        assert_eq!(values, [Value::Text("public.*".into()), Value::Int(1)]);
        let (_, values) = conditions(Dialect::Sqlite, "*.*");
        assert_eq!(values, [Value::Text("*.*".into()), Value::Int(1)]);
    }

    #[test]
    fn every_field_becomes_a_condition() {
        let filter: EventFilter = serde_urlencoded::from_str(
            "source=database&status=failed&user_id=5&session_id=s&schema=public&entity=users\
             &operation=create&instance_id=h1&type=public.*.create\
             &created_after=2026-01-01T00:00:00Z&created_before=2027-01-01T00:00:00Z\
             &limit=5&offset=2&order=asc",
        )
        .unwrap();
        let clause = build(Dialect::Sqlite, "g", &filter).unwrap();
        for column in [
            "source",
            "status",
            "user_id",
            "session_id",
            "schema",
            "entity",
            "operation",
            "instance_id",
            "type GLOB",
            "created_at >=",
            "created_at <",
        ] {
            assert!(clause.sql.contains(column), "{column}: {}", clause.sql);
        }
        assert!(
            clause
                .sql
                .ends_with("ORDER BY created_at ASC, id ASC LIMIT $14 OFFSET $15"),
            "{}",
            clause.sql
        );
        assert_eq!(clause.values.len(), 15);
        assert_eq!(clause.values[0], Value::Text("g".into()));
        assert_eq!(clause.values[13], Value::Int(5));
        assert_eq!(clause.values[14], Value::Int(2));
    }
}
