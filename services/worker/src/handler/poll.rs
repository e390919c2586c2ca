//! Poll jobs: run a flow's trigger once. A polling trigger's items are deduplicated against
//! the flow's cursor and each new item starts one run with a deterministic id (a redelivered
//! poll starts none twice); a schedule tick starts one run.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use piecework_bus::Delivery;
use piecework_core::flow::FlowVersion;
use piecework_core::lifecycle::{Settle, Termination};
use piecework_core::run::deterministic_run_id;
use piecework_proto::v1::PollJob;
use piecework_runtime::RuntimeError;
use piecework_sdk::mask::Secrets;
use piecework_sdk::polling::{self, DedupeStrategy};
use piecework_sdk::{Piece, RunInfo, TriggerHandle, TriggerKind};
use piecework_telemetry::metrics::{self, FlowLabels, PollLabels, PollOutcome};
use piecework_telemetry::propagation;
use serde_json::json;
use tracing::Instrument as _;
use tracing::field::Empty;

use super::{Handler, POLL_ATTEMPTS};

/// Delay between retries of a poll that failed with a retryable error.
const POLL_RETRY_DELAY: Duration = Duration::from_secs(5);
/// A poll lease outlives the poll's timeout by this much before it lapses.
const POLL_LEASE_MARGIN: Duration = Duration::from_secs(30);

impl Handler {
    pub(super) async fn poll(
        &self,
        job: PollJob,
        delivery: &Delivery,
    ) -> Result<Settle, RuntimeError> {
        let span = tracing::info_span!(
            "poll",
            otel.name = %format_args!("poll {}", job.flow_id),
            otel.kind = "consumer",
            otel.status_code = Empty,
            messaging.system = self.runtime.messaging_system(),
            messaging.operation.type = "process",
            messaging.operation.name = "process",
            messaging.destination.name = %delivery.subject,
            messaging.message.id = delivery.header("Nats-Msg-Id").unwrap_or_default(),
            piecework.flow.id = %job.flow_id,
            piecework.flow.version = job.flow_version,
            piecework.tick_unix_ms = job.tick_unix_ms,
            piecework.items = Empty,
            piecework.new_items = Empty,
            piecework.delivery = delivery.delivered,
            piecework.worker = %self.config.id,
        );
        propagation::set_parent(&span, &delivery.headers);
        self.run_poll(job, delivery).instrument(span).await
    }

    async fn run_poll(&self, job: PollJob, delivery: &Delivery) -> Result<Settle, RuntimeError> {
        let runtime = &self.runtime;
        let Some(flow) = runtime.flow_version(&job.flow_id, job.flow_version).await? else {
            return self
                .poison(
                    delivery,
                    &format!(
                        "flow {} version {} does not exist",
                        job.flow_id, job.flow_version
                    ),
                )
                .await;
        };
        if !runtime.flow_enabled(&flow.flow_id).await? {
            return Ok(Settle::Ack);
        }
        let trigger = &flow.definition.trigger;
        let piece = match self
            .resolve_piece(&flow, "trigger", &trigger.piece, trigger.version.as_ref())
            .await
        {
            Ok(piece) => piece,
            Err(error) => return self.poll_failed(&flow, &error.to_string()).await,
        };
        match piece.trigger(&trigger.trigger).cloned() {
            Some(TriggerHandle::Schedule(_)) => {
                let tick =
                    DateTime::from_timestamp_millis(job.tick_unix_ms).unwrap_or_else(Utc::now);
                let item = json!({ "scheduled_at": tick, "fired_at": Utc::now() });
                let tick = format!("tick:{}", job.tick_unix_ms);
                let run_id = deterministic_run_id(&flow.flow_id, &tick);
                runtime
                    .start_or_hold(&flow, run_id, item, metrics::TriggerKind::schedule, &tick)
                    .await?;
                Ok(Settle::Ack)
            }
            Some(TriggerHandle::Polling(polling)) => {
                let strategy = match polling.spec().kind {
                    TriggerKind::Polling { strategy, .. } => strategy,
                    _ => DedupeStrategy::TimeBased,
                };
                // One poll of a flow at a time across the fleet: a slow poll and the next tick
                // must not both advance the cursor. A tick that finds the lease taken is skipped;
                // the poll in progress will see the same new items.
                let lease = format!("poll:{}", flow.flow_id);
                let holder = format!("{}:{}", self.config.id, job.tick_unix_ms);
                let ttl = self.config.poll_timeout + POLL_LEASE_MARGIN;
                if !runtime.acquire_lease(&lease, &holder, ttl).await? {
                    tracing::debug!(flow = %flow.flow_id, "another worker is polling this flow; skipping the tick");
                    self.count_poll(&flow.flow_id, PollOutcome::skipped);
                    return Ok(Settle::Ack);
                }
                let polled = self
                    .poll_once(&flow, &piece, polling.as_ref(), strategy, &job, delivery)
                    .await;
                if let Err(err) = runtime.release_lease(&lease, &holder).await {
                    tracing::debug!(error = %err, "could not release the poll lease; it will lapse");
                }
                polled
            }
            Some(TriggerHandle::Webhook(_)) => {
                self.poison(
                    delivery,
                    &format!(
                        "flow {} has a webhook trigger, which is not polled",
                        flow.flow_id
                    ),
                )
                .await
            }
            None => {
                self.poll_failed(
                    &flow,
                    &format!(
                        "piece `{}` has no trigger `{}`",
                        trigger.piece, trigger.trigger
                    ),
                )
                .await
            }
        }
    }

    /// Polls once and starts a run per new item; the caller holds the flow's poll lease.
    async fn poll_once(
        &self,
        flow: &FlowVersion,
        piece: &Piece,
        polling: &dyn piecework_sdk::trigger::DynPolling,
        strategy: DedupeStrategy,
        job: &PollJob,
        delivery: &Delivery,
    ) -> Result<Settle, RuntimeError> {
        let runtime = &self.runtime;
        let trigger = &flow.definition.trigger;
        let started = Instant::now();
        let run_info = RunInfo::new(
            &format!("poll:{}", job.tick_unix_ms),
            &flow.flow_id,
            flow.version,
            "trigger",
            delivery.delivered,
        )
        .started_by(piecework_sdk::Principal::new("schedule", None));
        let auth = match self
            .connection_for(trigger.connection.as_deref(), &trigger.piece)
            .await?
        {
            Ok(auth) => auth,
            Err(error) => return self.poll_failed(flow, &error).await,
        };
        // What the source answers may echo the connection's secrets: never into a run.
        let secrets = auth
            .as_ref()
            .map(|values| Secrets::of(piece.auth(), values))
            .unwrap_or_default();
        // How far the flow has read: a trigger reading pages goes back until it gets there.
        let previous = runtime.trigger_state(&flow.flow_id).await?;
        let cursor = previous.as_ref().map(piecework_sdk::PollCursor::of);
        let ctx = runtime
            .context(run_info, flow, auth)
            .with_poll_cursor(cursor);
        let input = serde_json::Value::Object(trigger.input.clone());
        let polled =
            match tokio::time::timeout(self.config.poll_timeout, polling.poll_json(&ctx, input))
                .await
            {
                Ok(result) => result,
                Err(_) => Err(piecework_sdk::PieceError::retryable("poll timed out")),
            };
        let items = match polled {
            Ok(items) => items,
            Err(err) if err.is_retryable() && delivery.delivered < POLL_ATTEMPTS => {
                let error = secrets.mask(&err.to_string()).into_owned();
                tracing::warn!(flow = %flow.flow_id, error, "poll failed; retrying");
                self.count_poll(&flow.flow_id, PollOutcome::retrying);
                return Ok(Settle::Nak(err.retry_after().unwrap_or(POLL_RETRY_DELAY)));
            }
            Err(err) => {
                let error = secrets.mask(&err.to_string()).into_owned();
                return self.poll_failed(flow, &error).await;
            }
        };
        let polled_items = items.len();
        let outcome =
            match polling::dedupe(strategy, previous, items, self.config.max_items_per_poll) {
                Ok(outcome) => outcome,
                Err(err) => return self.poll_failed(flow, &err.to_string()).await,
            };
        let new_items = outcome.new_items.len();
        if outcome.gap {
            self.poll_gap(flow).await;
        }
        for mut item in outcome.new_items {
            let key = item.dedupe_key();
            let run_id = deterministic_run_id(&flow.flow_id, &key);
            secrets.mask_value(&mut item.data);
            runtime
                .start_or_hold(flow, run_id, item.data, metrics::TriggerKind::polling, &key)
                .await?;
        }
        // The cursor moves only after every run exists: a crash before this line
        // repeats the poll, and deterministic run ids keep the runs single.
        runtime
            .put_trigger_state(&flow.flow_id, &outcome.state)
            .await?;
        tracing::debug!(flow = %flow.flow_id, new_items, elapsed = ?started.elapsed(), "polled");
        let span = tracing::Span::current();
        span.record("piecework.items", polled_items);
        span.record("piecework.new_items", new_items);
        self.count_poll(&flow.flow_id, PollOutcome::succeeded);
        let metrics = &runtime.metrics;
        let labels = FlowLabels {
            flow: flow.flow_id.clone(),
        };
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        metrics
            .poll_items
            .get_or_create(&labels)
            .inc_by(count(polled_items));
        metrics
            .poll_dedupe_dropped
            .get_or_create(&labels)
            .inc_by(count(
                polled_items.saturating_sub(new_items + outcome.deferred),
            ));
        Ok(Settle::Ack)
    }

    /// Says, never silently, that a poll did not reach back to the last item emitted: the
    /// trigger reads one page, or more items came than it reads pages of. A warning, the
    /// `piecework_poll_gaps_total` metric and a `trigger.gap` audit entry.
    async fn poll_gap(&self, flow: &FlowVersion) {
        let error = "the poll did not reach the last item it emitted before: items between may have been missed (the trigger reads too few pages)";
        tracing::warn!(flow = %flow.flow_id, "{error}");
        self.runtime
            .metrics
            .poll_gaps
            .get_or_create(&FlowLabels {
                flow: flow.flow_id.clone(),
            })
            .inc();
        let resource = format!("flow/{}", flow.flow_id);
        self.runtime
            .audit(
                &self.actor,
                "trigger.gap",
                &resource,
                Instant::now(),
                Some(&error),
            )
            .await;
    }

    fn count_poll(&self, flow: &str, outcome: PollOutcome) {
        self.runtime
            .metrics
            .polls
            .get_or_create(&PollLabels {
                flow: flow.to_owned(),
                outcome,
            })
            .inc();
    }

    async fn poll_failed(&self, flow: &FlowVersion, error: &str) -> Result<Settle, RuntimeError> {
        tracing::warn!(flow = %flow.flow_id, error, "poll failed");
        self.count_poll(&flow.flow_id, PollOutcome::failed);
        tracing::Span::current().record("otel.status_code", "ERROR");
        let resource = format!("flow/{}", flow.flow_id);
        self.runtime
            .audit(
                &self.actor,
                "trigger.poll",
                &resource,
                Instant::now(),
                Some(&error),
            )
            .await;
        Ok(Settle::Term(Termination::Failed))
    }
}
