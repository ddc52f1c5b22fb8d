//! Conformance cases of the cluster handler store ([`eventbroker::HandlerStore`]), run by each
//! backend a cluster can share. Two providers opened on one backend play two hosts.

use std::sync::Arc;
use std::time::Duration;

use eventbroker::HandlerStore;
use eventbroker::handler_store::Written;
use futures::StreamExt;

use crate::backends::Backend;
use crate::{PATIENCE, unique_suffix, wait_for};

async fn store(backend: &Backend) -> Arc<dyn HandlerStore> {
    backend
        .connect()
        .await
        .handler_store()
        .unwrap_or_else(|| panic!("{}: a shared backend offers a handler store", backend.name))
}

/// Bytes of `len` that differ from one call to the next.
fn component_bytes(len: usize) -> Vec<u8> {
    let seed = unique_suffix();
    seed.bytes().cycle().take(len).collect()
}

/// Components are stored by version, read back byte for byte (a large one included), stored
/// again harmlessly, and deleted.
pub async fn components_round_trip(backend: &Backend) {
    let store = store(backend).await;
    let small = component_bytes(100);
    // Larger than NATS's default chunk and Redis's default bulk reply buffer.
    let large = component_bytes(3 * 1024 * 1024 + 17);
    let (v1, v2) = (
        format!("v1-{}", unique_suffix()),
        format!("v2-{}", unique_suffix()),
    );
    assert_eq!(store.component(&v1).await.expect("read"), None);
    store.put_component(&v1, &small).await.expect("put small");
    store.put_component(&v2, &large).await.expect("put large");
    store.put_component(&v1, &small).await.expect("put again");
    assert_eq!(store.component(&v1).await.expect("read"), Some(small));
    assert_eq!(
        store.component(&v2).await.expect("read").map(|b| b.len()),
        Some(large.len())
    );
    assert_eq!(store.component(&v2).await.expect("read"), Some(large));
    store.delete_component(&v1).await.expect("delete");
    store.delete_component(&v1).await.expect("delete again");
    assert_eq!(store.component(&v1).await.expect("read"), None);
    store.delete_component(&v2).await.expect("delete");
}

/// Records are created only where none exists, replaced only from the revision the writer
/// read, listed, and deleted only from the current revision.
pub async fn records_are_compare_and_set(backend: &Backend) {
    let store = store(backend).await;
    let name = format!("h{}", unique_suffix());
    assert_eq!(store.record(&name).await.expect("read"), None);
    let Written::Done(first) = store
        .write_record(&name, r#"{"n":1}"#, None)
        .await
        .expect("create")
    else {
        panic!("creating a new record conflicted");
    };
    assert_eq!(
        store
            .write_record(&name, r#"{"n":0}"#, None)
            .await
            .expect("create again"),
        Written::Conflict,
        "a second create must conflict"
    );
    let Written::Done(second) = store
        .write_record(&name, r#"{"n":2}"#, Some(first))
        .await
        .expect("update")
    else {
        panic!("an update from the current revision conflicted");
    };
    assert!(second > first, "revisions grow: {first} then {second}");
    assert_eq!(
        store
            .write_record(&name, r#"{"n":3}"#, Some(first))
            .await
            .expect("stale update"),
        Written::Conflict,
        "an update from a stale revision must conflict"
    );
    let record = store.record(&name).await.expect("read").expect("exists");
    assert_eq!(
        (record.revision, record.doc.as_str()),
        (second, r#"{"n":2}"#)
    );
    let listed = store.records().await.expect("list");
    assert!(
        listed.iter().any(|r| r == &record),
        "records() lists {name}: {listed:?}"
    );
    assert!(
        !store
            .delete_record(&name, first)
            .await
            .expect("stale delete"),
        "a delete from a stale revision must not delete"
    );
    assert!(store.delete_record(&name, second).await.expect("delete"));
    assert_eq!(store.record(&name).await.expect("read"), None);
    assert!(!store.delete_record(&name, second).await.expect("delete"));
    // A name deleted and created again gets a revision above the old ones, so a host that
    // remembers the old revision never mistakes the new record for it.
    let Written::Done(third) = store
        .write_record(&name, r#"{"n":4}"#, None)
        .await
        .expect("create")
    else {
        panic!("re-creating a deleted record conflicted");
    };
    assert!(
        third > second,
        "revisions grow across a delete: {second} then {third}"
    );
    assert!(store.delete_record(&name, third).await.expect("delete"));
}

/// Two hosts replacing one record from the same revision at once: exactly one wins.
pub async fn concurrent_writers_one_wins(backend: &Backend) {
    let (a, b) = (store(backend).await, store(backend).await);
    let name = format!("h{}", unique_suffix());
    let Written::Done(base) = a.write_record(&name, "{}", None).await.expect("create") else {
        panic!("create conflicted");
    };
    for round in 0..10 {
        let current = a
            .record(&name)
            .await
            .expect("read")
            .expect("exists")
            .revision;
        let (doc_a, doc_b) = (format!(r#"{{"a":{round}}}"#), format!(r#"{{"b":{round}}}"#));
        let (ra, rb) = tokio::join!(
            a.write_record(&name, &doc_a, Some(current)),
            b.write_record(&name, &doc_b, Some(current)),
        );
        let wins = [ra.expect("a writes"), rb.expect("b writes")]
            .iter()
            .filter(|w| matches!(w, Written::Done(_)))
            .count();
        assert_eq!(wins, 1, "round {round}: exactly one writer wins");
    }
    let last = a.record(&name).await.expect("read").expect("exists");
    assert!(last.revision > base);
    assert!(a.delete_record(&name, last.revision).await.expect("delete"));
}

/// A write by one host wakes the change feed of another.
pub async fn a_write_wakes_another_hosts_feed(backend: &Backend) {
    let (a, b) = (store(backend).await, store(backend).await);
    let mut feed = b.changes().await.expect("feed");
    let name = format!("h{}", unique_suffix());
    // The feed may yield for what happened before it was opened; it must yield after the
    // write. Write, then wait for a yield while the record is visible.
    let Written::Done(revision) = a.write_record(&name, "{}", None).await.expect("create") else {
        panic!("create conflicted");
    };
    tokio::time::timeout(PATIENCE, feed.next())
        .await
        .expect("the feed woke within the patience")
        .expect("the feed is open");
    let Written::Done(revision) = a
        .write_record(&name, r#"{"x":1}"#, Some(revision))
        .await
        .expect("update")
    else {
        panic!("update conflicted");
    };
    // Drain what is queued, then see the update arrive or already be there.
    tokio::time::timeout(PATIENCE, feed.next())
        .await
        .expect("the feed woke after the update")
        .expect("the feed is open");
    assert!(a.delete_record(&name, revision).await.expect("delete"));
    tokio::time::timeout(PATIENCE, feed.next())
        .await
        .expect("the feed woke after the delete")
        .expect("the feed is open");
}

/// Each host's report replaces its own only, and a report not renewed expires.
pub async fn reports_are_per_host_and_expire(backend: &Backend) {
    let (a, b) = (store(backend).await, store(backend).await);
    let (host_a, host_b) = (
        format!("host-a-{}", unique_suffix()),
        format!("host-b-{}", unique_suffix()),
    );
    a.put_report(&host_a, r#"{"v":1}"#, Duration::from_secs(60))
        .await
        .expect("report a");
    a.put_report(&host_a, r#"{"v":2}"#, Duration::from_secs(60))
        .await
        .expect("report a again");
    b.put_report(&host_b, r#"{"v":9}"#, Duration::from_secs(1))
        .await
        .expect("report b");
    let reports = a.reports().await.expect("reports");
    assert!(
        reports.contains(&(host_a.clone(), r#"{"v":2}"#.to_owned())),
        "{reports:?}"
    );
    assert!(
        reports.contains(&(host_b.clone(), r#"{"v":9}"#.to_owned())),
        "{reports:?}"
    );
    assert_eq!(
        reports.iter().filter(|(host, _)| host == &host_a).count(),
        1,
        "one report per host: {reports:?}"
    );
    wait_for("the report not renewed to expire", || {
        let a = a.clone();
        let host_b = host_b.clone();
        async move {
            a.reports()
                .await
                .ok()
                .filter(|reports| !reports.iter().any(|(host, _)| host == &host_b))
        }
    })
    .await;
    assert!(
        a.reports()
            .await
            .expect("reports")
            .iter()
            .any(|(host, _)| host == &host_a),
        "a live report stays"
    );
}

/// Generates one test per handler store case for a shared backend, in a module named
/// `$backend` (`$open` as for [`crate::conformance!`]).
#[macro_export]
macro_rules! handler_store_conformance {
    ($backend:ident, $open:expr) => {
        mod $backend {
            #[allow(unused_imports)]
            use super::*;
            use $crate::conformance::handler_store as cases;
            $crate::conformance!(@cases $open;
                components_round_trip,
                records_are_compare_and_set,
                concurrent_writers_one_wins,
                a_write_wakes_another_hosts_feed,
                reports_are_per_host_and_expire,
            );
        }
    };
}
