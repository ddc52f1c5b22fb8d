//! Query filters over stored events.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::event::{Event, EventSource, EventStatus};
use crate::pattern::Pattern;

/// The default page size of [`EventFilter::limit`].
pub const DEFAULT_LIMIT: usize = 100;
/// The largest page size a backend returns.
pub const MAX_LIMIT: usize = 1000;

/// Order of listed events by creation time (ties broken by id).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SortOrder {
    /// Oldest first.
    Asc,
    /// Newest first (the default).
    #[default]
    Desc,
}

/// Which events to list. Every field is optional; set fields must all match.
///
/// The same names are the query parameters of `GET /v1/events`.
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventFilter {
    /// Only events from this source.
    pub source: Option<EventSource>,
    /// Only events in this status.
    pub status: Option<EventStatus>,
    /// Only events of this user.
    pub user_id: Option<i64>,
    /// Only events of this session.
    pub session_id: Option<String>,
    /// Only events of this schema.
    pub schema: Option<String>,
    /// Only events of this entity.
    pub entity: Option<String>,
    /// Only events with this operation.
    pub operation: Option<String>,
    /// Only events accepted by this host instance.
    pub instance_id: Option<String>,
    /// Only events whose type matches this pattern.
    #[serde(rename = "type")]
    #[cfg_attr(feature = "openapi", param(value_type = Option<String>))]
    pub type_pattern: Option<Pattern>,
    /// Only events with an outcome recorded for this handler (it ran on them, in any state).
    pub handler: Option<String>,
    /// Only events a handler published while handling this event (derived events, whose
    /// `metadata.caused_by` is this id).
    pub caused_by: Option<String>,
    /// Only events created at or after this time (RFC 3339).
    pub created_after: Option<DateTime<Utc>>,
    /// Only events created before this time (RFC 3339).
    pub created_before: Option<DateTime<Utc>>,
    /// Page size (default 100, at most 1000).
    pub limit: Option<usize>,
    /// Number of matching events to skip.
    pub offset: usize,
    /// Sort order by creation time (default newest first).
    pub order: SortOrder,
}

impl EventFilter {
    /// A filter for one status.
    pub fn status(status: EventStatus) -> Self {
        EventFilter {
            status: Some(status),
            ..EventFilter::default()
        }
    }

    /// The page size to apply: the requested limit capped at [`MAX_LIMIT`].
    pub fn effective_limit(&self) -> usize {
        self.limit.unwrap_or(DEFAULT_LIMIT).min(MAX_LIMIT)
    }

    /// Whether `event` passes every set field (ignores limit, offset and order).
    pub fn matches(&self, event: &Event) -> bool {
        self.matches_in(event, event.status, &event.handlers)
    }

    /// [`Self::matches`] for `event` as a consumer group sees it: in `status`, with
    /// `handlers` as the group's outcomes (the fields a group's state replaces that a filter
    /// reads), without building that view.
    pub fn matches_in(
        &self,
        event: &Event,
        status: EventStatus,
        handlers: &[crate::event::HandlerOutcome],
    ) -> bool {
        fn eq<T: PartialEq>(want: &Option<T>, have: &T) -> bool {
            want.as_ref().is_none_or(|want| want == have)
        }
        eq(&self.source, &event.source)
            && eq(&self.status, &status)
            && self.user_id.is_none_or(|id| event.user_id == Some(id))
            && eq(&self.session_id, &event.session_id)
            && eq(&self.schema, &event.schema)
            && eq(&self.entity, &event.entity)
            && eq(&self.operation, &event.operation)
            && eq(&self.instance_id, &event.instance_id)
            && self
                .type_pattern
                .as_ref()
                .is_none_or(|p| p.matches(&event.event_type))
            && self
                .handler
                .as_ref()
                .is_none_or(|name| handlers.iter().any(|o| &o.handler == name))
            && self.caused_by.as_ref().is_none_or(|cause| {
                event
                    .metadata
                    .get(crate::broker::CAUSED_BY_KEY)
                    .and_then(serde_json::Value::as_str)
                    == Some(cause.as_str())
            })
            && self.created_after.is_none_or(|t| event.created_at >= t)
            && self.created_before.is_none_or(|t| event.created_at < t)
    }

    /// Sorts, skips and truncates already-filtered events as this filter says.
    pub fn paginate(&self, mut events: Vec<Event>) -> Vec<Event> {
        self.sort(&mut events);
        events
            .into_iter()
            .skip(self.offset)
            .take(self.effective_limit())
            .collect()
    }

    /// Sorts events in this filter's order (creation time, then id).
    fn sort(&self, events: &mut [Event]) {
        events.sort_by(|a, b| {
            let ascending = a
                .created_at
                .cmp(&b.created_at)
                .then_with(|| a.id.cmp(&b.id));
            match self.order {
                SortOrder::Asc => ascending,
                SortOrder::Desc => ascending.reverse(),
            }
        });
    }

    /// A collector for backends that scan every stored event: it keeps only the events
    /// that can still be on the requested page, so a scan holds `offset + limit` events at
    /// most (twice that between compactions), whatever the number stored.
    pub fn page(&self) -> PageCollector<'_> {
        PageCollector {
            filter: self,
            keep: self.offset.saturating_add(self.effective_limit()),
            events: Vec::new(),
        }
    }
}

/// Collects the page of an [`EventFilter`] from events offered one at a time
/// ([`EventFilter::page`]).
pub struct PageCollector<'a> {
    filter: &'a EventFilter,
    keep: usize,
    events: Vec<Event>,
}

impl PageCollector<'_> {
    /// Offers one stored event: kept if it matches the filter and may be on the page.
    pub fn offer(&mut self, event: Event) {
        if !self.filter.matches(&event) {
            return;
        }
        self.events.push(event);
        if self.events.len() >= self.keep.saturating_mul(2).max(64) {
            self.filter.sort(&mut self.events);
            self.events.truncate(self.keep);
        }
    }

    /// The page: sorted, skipped and truncated as the filter says.
    pub fn finish(self) -> Vec<Event> {
        self.filter.paginate(self.events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_collected_one_event_at_a_time_equals_the_paginated_whole() {
        let events: Vec<Event> = (0..500)
            .map(|n| {
                let mut event = Event::new(
                    EventSource::System,
                    if n % 3 == 0 { "a.x" } else { "b.y" },
                    "h",
                );
                event.created_at += chrono::TimeDelta::milliseconds((n * 7919 % 500) as i64);
                event
            })
            .collect();
        for order in [SortOrder::Asc, SortOrder::Desc] {
            let filter = EventFilter {
                type_pattern: Some(crate::pattern::Pattern::new("a.*").unwrap()),
                order,
                offset: 20,
                limit: Some(15),
                ..EventFilter::default()
            };
            let mut page = filter.page();
            for event in events.iter().cloned() {
                page.offer(event);
            }
            let whole = filter.paginate(
                events
                    .iter()
                    .filter(|e| filter.matches(e))
                    .cloned()
                    .collect(),
            );
            assert_eq!(page.finish(), whole);
        }
    }

    #[test]
    fn empty_filter_matches_everything() {
        let event = Event::new(EventSource::System, "a.b", "h");
        assert!(EventFilter::default().matches(&event));
    }

    #[test]
    fn each_field_filters() {
        let mut event = Event::crud(EventSource::Database, "public", "users", "create", "h1");
        event.user_id = Some(5);
        event.session_id = "s".into();
        let cases: Vec<(EventFilter, bool)> = vec![
            (
                EventFilter {
                    source: Some(EventSource::Database),
                    ..Default::default()
                },
                true,
            ),
            (
                EventFilter {
                    source: Some(EventSource::Frontend),
                    ..Default::default()
                },
                false,
            ),
            (EventFilter::status(EventStatus::Pending), true),
            (EventFilter::status(EventStatus::Failed), false),
            (
                EventFilter {
                    user_id: Some(5),
                    ..Default::default()
                },
                true,
            ),
            (
                EventFilter {
                    user_id: Some(6),
                    ..Default::default()
                },
                false,
            ),
            (
                EventFilter {
                    session_id: Some("t".into()),
                    ..Default::default()
                },
                false,
            ),
            (
                EventFilter {
                    schema: Some("public".into()),
                    ..Default::default()
                },
                true,
            ),
            (
                EventFilter {
                    entity: Some("orders".into()),
                    ..Default::default()
                },
                false,
            ),
            (
                EventFilter {
                    operation: Some("create".into()),
                    ..Default::default()
                },
                true,
            ),
            (
                EventFilter {
                    instance_id: Some("h2".into()),
                    ..Default::default()
                },
                false,
            ),
            (
                EventFilter {
                    type_pattern: Some("public.*.create".parse().unwrap()),
                    ..Default::default()
                },
                true,
            ),
            (
                EventFilter {
                    created_after: Some(event.created_at),
                    ..Default::default()
                },
                true,
            ),
            (
                EventFilter {
                    created_before: Some(event.created_at),
                    ..Default::default()
                },
                false,
            ),
        ];
        for (filter, expected) in cases {
            assert_eq!(filter.matches(&event), expected, "{filter:?}");
        }
    }

    #[test]
    fn query_string_parses_and_rejects_unknown_keys() {
        let filter: EventFilter =
            serde_urlencoded::from_str("status=failed&type=public.>&limit=5&offset=2&order=asc")
                .expect("parse");
        assert_eq!(filter.status, Some(EventStatus::Failed));
        assert_eq!(filter.effective_limit(), 5);
        assert_eq!(filter.order, SortOrder::Asc);
        let err = serde_urlencoded::from_str::<EventFilter>("colour=red").unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        let err = serde_urlencoded::from_str::<EventFilter>("type=a..b").unwrap_err();
        assert!(err.to_string().contains("invalid pattern"), "{err}");
    }

    #[test]
    fn paginate_orders_and_pages() {
        let mut events = Vec::new();
        for i in 0..5 {
            let mut e = Event::new(EventSource::System, "a.b", "h");
            e.created_at = DateTime::from_timestamp(1_700_000_000 + i, 0).unwrap();
            e.id = format!("e{i}");
            events.push(e);
        }
        let asc = EventFilter {
            order: SortOrder::Asc,
            limit: Some(2),
            offset: 1,
            ..Default::default()
        };
        let ids: Vec<_> = asc
            .paginate(events.clone())
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(ids, ["e1", "e2"]);
        let desc = EventFilter {
            limit: Some(2),
            ..Default::default()
        };
        let ids: Vec<_> = desc
            .paginate(events.clone())
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(ids, ["e4", "e3"]);
        let past = EventFilter {
            offset: 10,
            ..Default::default()
        };
        assert!(past.paginate(events).is_empty());
    }
}
