//! Querying the audit trail (`pw:audit`): filters over the raw stream, the same for every
//! adapter.
//!
//! The stream is read oldest first in chunks from a cursor (a stream id, exclusive) and
//! filtered here. A query scans at most [`MAX_SCAN`] entries, so a filter that matches
//! nothing in a long trail answers quickly with a cursor to continue from instead of reading
//! the whole stream.

use piecework_proto::v1::AuditEvent;

use crate::{Entry, Store, StoreError};

/// Entries read per round trip.
const CHUNK: usize = 500;
/// Most entries one query looks at.
pub const MAX_SCAN: usize = 10_000;

/// Which audit entries to return. Matching is hierarchical: `actor=worker` matches
/// `worker:w1`, `action=run` matches `run.cancel`, `resource=run/r1` matches
/// `run/r1/step/fetch`; a full value matches itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// Continue after this stream id (exclusive), as returned in [`AuditPage::next`].
    pub after: Option<String>,
    /// Entries recorded at or after this time (Unix ms).
    pub since_ms: Option<i64>,
    /// Entries recorded at or before this time (Unix ms).
    pub until_ms: Option<i64>,
    pub actor: Option<String>,
    pub action: Option<String>,
    pub resource: Option<String>,
    /// `success` or `failure`.
    pub outcome: Option<String>,
    /// Most entries returned.
    pub limit: usize,
}

/// One page of a query.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditPage {
    pub entries: Vec<Entry<AuditEvent>>,
    /// Set when the page stopped early (the limit or the scan budget was reached): query again
    /// with `after = next` for more.
    pub next: Option<String>,
    /// The last entry looked at: where a tail resumes once more entries arrive.
    pub cursor: Option<String>,
}

impl AuditQuery {
    fn matches(&self, event: &AuditEvent) -> bool {
        within(self.actor.as_deref(), &event.actor, ':')
            && within(self.action.as_deref(), &event.action, '.')
            && within(self.resource.as_deref(), &event.resource, '/')
            && self.outcome.as_deref().is_none_or(|o| o == event.outcome)
            && self
                .since_ms
                .is_none_or(|since| event.time_unix_ms >= since)
    }
}

/// Whether `value` is `wanted` or lies under it (`wanted` + `separator` + …).
fn within(wanted: Option<&str>, value: &str, separator: char) -> bool {
    let Some(wanted) = wanted else { return true };
    value == wanted
        || value
            .strip_prefix(wanted)
            .is_some_and(|rest| rest.starts_with(separator))
}

/// Runs `query` against the store's audit stream.
pub async fn query(store: &dyn Store, query: &AuditQuery) -> Result<AuditPage, StoreError> {
    let limit = query.limit.max(1);
    let mut cursor = match (&query.after, query.since_ms) {
        (Some(after), _) => Some(after.clone()),
        (None, Some(since)) => store.audit_cursor_at(since).await?,
        (None, None) => None,
    };
    let mut entries = Vec::new();
    let mut scanned = 0;
    loop {
        let chunk = store.read_audit(cursor.as_deref(), CHUNK).await?;
        let exhausted = chunk.len() < CHUNK;
        for entry in chunk {
            if query
                .until_ms
                .is_some_and(|until| entry.event.time_unix_ms > until)
            {
                return Ok(AuditPage {
                    entries,
                    next: None,
                    cursor,
                });
            }
            scanned += 1;
            cursor = Some(entry.id.clone());
            if query.matches(&entry.event) {
                entries.push(entry);
            }
            if entries.len() == limit || scanned == MAX_SCAN {
                return Ok(AuditPage {
                    entries,
                    next: cursor.clone(),
                    cursor,
                });
            }
        }
        if exhausted {
            return Ok(AuditPage {
                entries,
                next: None,
                cursor,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_is_hierarchical() {
        assert!(within(None, "anything", '.'));
        assert!(within(Some("run"), "run.cancel", '.'));
        assert!(within(Some("run.cancel"), "run.cancel", '.'));
        assert!(!within(Some("run"), "runner.cancel", '.'));
        assert!(within(Some("run/r1"), "run/r1/step/fetch", '/'));
        assert!(!within(Some("run/r1"), "run/r10", '/'));
        assert!(within(Some("worker"), "worker:w1", ':'));
    }
}
