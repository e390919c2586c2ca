//! Deduplication for polling triggers.
//!
//! A polling trigger returns what the source has now; the framework decides what is new, so
//! authors do not each reinvent (and get wrong) cursors. State is kept per flow, not per flow
//! version: re-applying or re-enabling a flow keeps its cursor, so nothing fires twice and
//! nothing is skipped (Activepieces loses events by resetting it, #13311).
//!
//! The first poll of a flow records a baseline and emits nothing: a trigger fires for items
//! that appear after the flow is enabled.

use std::collections::VecDeque;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::PieceError;

/// How a polling trigger tells new items from seen ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DedupeStrategy {
    /// Items carry a timestamp; new items are newer than the newest one already emitted.
    /// Items with the same timestamp are never split across polls.
    TimeBased,
    /// Items carry an id and come newest first; new items are those before the last seen one.
    LastItem,
}

/// One item a poll returned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PolledItem {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<DateTime<Utc>>,
    pub data: Value,
}

impl PolledItem {
    pub fn new(data: Value) -> Self {
        Self {
            id: None,
            timestamp: None,
            data,
        }
    }

    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    pub fn timestamp(mut self, timestamp: DateTime<Utc>) -> Self {
        self.timestamp = Some(timestamp);
        self
    }

    /// A stable identity for the item, used to derive the run id: the same item always maps
    /// to the same run, even if a poll job is redelivered.
    pub fn dedupe_key(&self) -> String {
        match (&self.id, self.timestamp) {
            (Some(id), _) => format!("id:{id}"),
            (None, Some(ts)) => format!("ts:{}:{}", ts.timestamp_millis(), self.data),
            (None, None) => format!("data:{}", self.data),
        }
    }
}

/// Recently emitted ids kept for `LastItem`, so an item that reappears after its successor was
/// deleted is still recognised.
const RECENT_IDS: usize = 500;

/// The cursor of one flow's polling trigger, as stored between polls.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PollState {
    /// Newest timestamp emitted (`TimeBased`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor_time: Option<DateTime<Utc>>,
    /// Ids seen most recently, newest last (`LastItem`).
    #[serde(default, skip_serializing_if = "VecDeque::is_empty")]
    pub recent_ids: VecDeque<String>,
}

/// How far a flow's trigger has read its source, as a polling trigger sees it
/// (`ctx.poll_cursor()`): a trigger that reads its source in pages keeps reading older pages
/// until one [`reaches`](PollCursor::reaches) the cursor, so nothing between is skipped.
/// Absent on a flow's first poll, which only takes the newest items as its baseline.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PollCursor {
    /// The ids emitted last, newest first (`LastItem`; at most [`CURSOR_IDS`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub last_ids: Vec<String>,
    /// The newest timestamp emitted (`TimeBased`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
}

/// How many of the last emitted ids a [`PollCursor`] carries.
pub const CURSOR_IDS: usize = 20;

impl PollCursor {
    /// The cursor of `state`, as the trigger is told it.
    pub fn of(state: &PollState) -> Self {
        Self {
            last_ids: state
                .recent_ids
                .iter()
                .rev()
                .take(CURSOR_IDS)
                .cloned()
                .collect(),
            since: state.cursor_time,
        }
    }

    /// Whether `page` reaches back to what was read before: it holds an item already emitted
    /// (by id), or one no newer than the cursor's time. An empty page is the end of the
    /// source and reaches it too. A cursor of an empty source is reached only by the end.
    pub fn reaches(&self, page: &[PolledItem]) -> bool {
        page.is_empty()
            || page.iter().any(|item| {
                item.id
                    .as_ref()
                    .is_some_and(|id| self.last_ids.contains(id))
                    || item
                        .timestamp
                        .zip(self.since)
                        .is_some_and(|(at, since)| at <= since)
            })
    }
}

/// The result of deduplicating one poll.
#[derive(Debug, Clone, PartialEq)]
pub struct PollOutcome {
    /// New items, oldest first: runs are started in this order.
    pub new_items: Vec<PolledItem>,
    /// New items beyond the per-poll cap, left for the next poll. The rest of the polled items
    /// were already seen (on a flow's first poll: every item, which only sets the cursor).
    pub deferred: usize,
    pub state: PollState,
    /// The poll did not reach back to the last item emitted before (`LastItem`): items
    /// between the oldest it returned and that one may have been missed.
    pub gap: bool,
}

/// Decides which of `items` are new given the previous state (`None` on the first poll), and
/// returns at most `cap` of them, the oldest first; the rest come with the next poll.
pub fn dedupe(
    strategy: DedupeStrategy,
    previous: Option<PollState>,
    items: Vec<PolledItem>,
    cap: usize,
) -> Result<PollOutcome, PieceError> {
    let cap = cap.max(1);
    match strategy {
        DedupeStrategy::TimeBased => time_based(previous, items, cap),
        DedupeStrategy::LastItem => last_item(previous, items, cap),
    }
}

fn time_based(
    previous: Option<PollState>,
    items: Vec<PolledItem>,
    cap: usize,
) -> Result<PollOutcome, PieceError> {
    let mut stamped = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let ts = item.timestamp.ok_or_else(|| {
            PieceError::fatal(format!(
                "polled item {i} has no timestamp, which the time-based dedupe strategy needs"
            ))
        })?;
        stamped.push((ts, item));
    }
    stamped.sort_by_key(|(ts, _)| *ts);
    let Some(previous) = previous else {
        let cursor_time = stamped.last().map(|(ts, _)| *ts);
        return Ok(PollOutcome {
            new_items: Vec::new(),
            deferred: 0,
            state: PollState {
                cursor_time,
                ..PollState::default()
            },
            gap: false,
        });
    };
    let fresh: Vec<_> = stamped
        .into_iter()
        .filter(|(ts, _)| previous.cursor_time.is_none_or(|cursor| *ts > cursor))
        .collect();
    // Cut after `cap` items, but never inside a group of equal timestamps: the cursor is a
    // timestamp, so the rest of such a group would be skipped next time.
    let mut take = fresh.len().min(cap);
    while take < fresh.len() && fresh[take].0 == fresh[take - 1].0 {
        take += 1;
    }
    let deferred = fresh.len() - take;
    let new_items: Vec<PolledItem> = fresh.into_iter().take(take).map(|(_, item)| item).collect();
    let cursor_time = new_items
        .last()
        .and_then(|i| i.timestamp)
        .or(previous.cursor_time);
    Ok(PollOutcome {
        new_items,
        deferred,
        state: PollState {
            cursor_time,
            ..previous
        },
        gap: false,
    })
}

fn last_item(
    previous: Option<PollState>,
    items: Vec<PolledItem>,
    cap: usize,
) -> Result<PollOutcome, PieceError> {
    for (i, item) in items.iter().enumerate() {
        if item.id.is_none() {
            return Err(PieceError::fatal(format!(
                "polled item {i} has no id, which the last-item dedupe strategy needs"
            )));
        }
    }
    let id = |item: &PolledItem| item.id.clone().unwrap_or_default();
    let Some(mut state) = previous else {
        let recent_ids = items.iter().take(RECENT_IDS).rev().map(id).collect();
        return Ok(PollOutcome {
            new_items: Vec::new(),
            deferred: 0,
            state: PollState {
                recent_ids,
                ..PollState::default()
            },
            gap: false,
        });
    };
    let gap = !state.recent_ids.is_empty()
        && !items.is_empty()
        && !items
            .iter()
            .any(|item| state.recent_ids.contains(&id(item)));
    // Newest first: everything before the first item already seen is new.
    let mut fresh: Vec<PolledItem> = Vec::new();
    for item in items {
        let item_id = id(&item);
        if state.recent_ids.contains(&item_id) {
            break;
        }
        if !fresh
            .iter()
            .any(|f| f.id.as_deref() == Some(item_id.as_str()))
        {
            fresh.push(item);
        }
    }
    fresh.reverse();
    let deferred = fresh.len().saturating_sub(cap);
    fresh.truncate(cap);
    for item in &fresh {
        state.recent_ids.push_back(id(item));
        if state.recent_ids.len() > RECENT_IDS {
            state.recent_ids.pop_front();
        }
    }
    Ok(PollOutcome {
        new_items: fresh,
        deferred,
        state,
        gap,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(secs, 0).unwrap()
    }

    fn timed(id: &str, secs: i64) -> PolledItem {
        PolledItem::new(json!({ "id": id })).timestamp(at(secs))
    }

    fn ided(id: &str) -> PolledItem {
        PolledItem::new(json!({ "id": id })).id(id)
    }

    fn ids(items: &[PolledItem]) -> Vec<String> {
        items
            .iter()
            .map(|i| i.data["id"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn time_based_first_poll_is_a_baseline() {
        let out = dedupe(
            DedupeStrategy::TimeBased,
            None,
            vec![timed("a", 10), timed("b", 20)],
            10,
        )
        .unwrap();
        assert!(out.new_items.is_empty());
        assert_eq!(out.state.cursor_time, Some(at(20)));
    }

    #[test]
    fn time_based_emits_only_newer_items_oldest_first() {
        let state = PollState {
            cursor_time: Some(at(20)),
            ..Default::default()
        };
        let items = vec![
            timed("c", 40),
            timed("a", 10),
            timed("b", 20),
            timed("d", 30),
        ];
        let out = dedupe(DedupeStrategy::TimeBased, Some(state), items.clone(), 10).unwrap();
        assert_eq!(ids(&out.new_items), ["d", "c"]);
        // The same items again: nothing new.
        let again = dedupe(DedupeStrategy::TimeBased, Some(out.state), items, 10).unwrap();
        assert!(again.new_items.is_empty());
    }

    #[test]
    fn time_based_cap_never_splits_equal_timestamps() {
        let state = PollState {
            cursor_time: Some(at(0)),
            ..Default::default()
        };
        let items = vec![
            timed("a", 10),
            timed("b", 20),
            timed("c", 20),
            timed("d", 30),
        ];
        let out = dedupe(DedupeStrategy::TimeBased, Some(state), items.clone(), 2).unwrap();
        assert_eq!(ids(&out.new_items), ["a", "b", "c"]);
        let next = dedupe(DedupeStrategy::TimeBased, Some(out.state), items, 2).unwrap();
        assert_eq!(ids(&next.new_items), ["d"]);
    }

    #[test]
    fn time_based_after_an_empty_baseline_everything_is_new() {
        let base = dedupe(DedupeStrategy::TimeBased, None, vec![], 10).unwrap();
        let out = dedupe(
            DedupeStrategy::TimeBased,
            Some(base.state),
            vec![timed("a", 1)],
            10,
        )
        .unwrap();
        assert_eq!(ids(&out.new_items), ["a"]);
    }

    #[test]
    fn time_based_requires_timestamps() {
        let err = dedupe(DedupeStrategy::TimeBased, None, vec![ided("a")], 10).unwrap_err();
        assert!(err.to_string().contains("no timestamp"), "{err}");
    }

    #[test]
    fn last_item_emits_items_before_the_last_seen_one() {
        let base = dedupe(
            DedupeStrategy::LastItem,
            None,
            vec![ided("2"), ided("1")],
            10,
        )
        .unwrap();
        assert!(base.new_items.is_empty());
        let items = vec![ided("4"), ided("3"), ided("2"), ided("1")];
        let out = dedupe(
            DedupeStrategy::LastItem,
            Some(base.state),
            items.clone(),
            10,
        )
        .unwrap();
        assert_eq!(ids(&out.new_items), ["3", "4"]);
        let again = dedupe(DedupeStrategy::LastItem, Some(out.state), items, 10).unwrap();
        assert!(again.new_items.is_empty());
    }

    #[test]
    fn last_item_cap_leaves_the_newest_for_the_next_poll() {
        let base = dedupe(DedupeStrategy::LastItem, None, vec![ided("1")], 10).unwrap();
        let items = vec![ided("5"), ided("4"), ided("3"), ided("2"), ided("1")];
        let out = dedupe(DedupeStrategy::LastItem, Some(base.state), items.clone(), 2).unwrap();
        assert_eq!(ids(&out.new_items), ["2", "3"]);
        let next = dedupe(DedupeStrategy::LastItem, Some(out.state), items, 2).unwrap();
        assert_eq!(ids(&next.new_items), ["4", "5"]);
    }

    #[test]
    fn last_item_survives_deletion_of_the_newest_seen_item() {
        let base = dedupe(
            DedupeStrategy::LastItem,
            None,
            vec![ided("3"), ided("2"), ided("1")],
            10,
        )
        .unwrap();
        // "3" was deleted at the source; "2" is still recognised as seen.
        let out = dedupe(
            DedupeStrategy::LastItem,
            Some(base.state),
            vec![ided("4"), ided("2"), ided("1")],
            10,
        )
        .unwrap();
        assert_eq!(ids(&out.new_items), ["4"]);
    }

    #[test]
    fn dedupe_keys_are_stable() {
        assert_eq!(ided("7").dedupe_key(), "id:7");
        assert_eq!(timed("x", 5).dedupe_key(), timed("x", 5).dedupe_key());
        assert_ne!(timed("x", 5).dedupe_key(), timed("y", 5).dedupe_key());
    }

    #[test]
    fn a_cursor_is_reached_by_a_page_holding_a_seen_item_or_the_end() {
        let mut state = PollState::default();
        for id in ["1", "2", "3"] {
            state.recent_ids.push_back(id.into());
        }
        state.cursor_time = Some(at(100));
        let cursor = PollCursor::of(&state);
        assert_eq!(cursor.last_ids, ["3", "2", "1"], "newest first");
        assert!(!cursor.reaches(&[ided("5"), ided("4")]));
        assert!(cursor.reaches(&[ided("4"), ided("3")]));
        assert!(cursor.reaches(&[]), "the end of the source");
        assert!(
            cursor.reaches(&[timed("a", 100)]),
            "no newer than the cursor"
        );
        assert!(!cursor.reaches(&[timed("a", 101)]));
        assert!(
            !PollCursor::of(&PollState::default()).reaches(&[ided("1")]),
            "a source empty at the baseline is read to its end"
        );
    }

    #[test]
    fn a_poll_that_does_not_reach_the_last_seen_item_reports_a_gap() {
        let baseline = dedupe(
            DedupeStrategy::LastItem,
            None,
            vec![ided("2"), ided("1")],
            10,
        )
        .unwrap();
        assert!(!baseline.gap);
        let reached = dedupe(
            DedupeStrategy::LastItem,
            Some(baseline.state.clone()),
            vec![ided("3"), ided("2")],
            10,
        )
        .unwrap();
        assert!(!reached.gap);
        let short = dedupe(
            DedupeStrategy::LastItem,
            Some(baseline.state),
            vec![ided("9"), ided("8")],
            10,
        )
        .unwrap();
        assert!(short.gap, "8 and 9 are new, 3 to 7 may have been missed");
        assert_eq!(ids(&short.new_items), ["8", "9"]);
    }
}
