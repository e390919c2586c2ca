//! Webhook flows' secrets, and the check of a call against them.
//!
//! A webhook flow with `auth: hmac` (the default) or `auth: token` gets a secret when it is
//! first applied: 32 random bytes in hex, sealed like a connection (`pw:flow:{id}:webhook-secret`),
//! shown in that apply's answer and to admins afterwards. `hmac` callers sign
//! `"<timestamp>.<body>"` with it (HMAC-SHA256, the secret's text as the key) and send
//! `x-piecework-timestamp` and `x-piecework-signature: sha256=<hex>`; `token` callers send the
//! secret in a header.

use piecework_core::WebhookAuth;
use piecework_core::flow::TriggerDef;
use piecework_sdk::mask::Secrets;

use tracing::Instrument as _;

use crate::{Actor, Runtime, RuntimeError, secrets};

/// The unix time (seconds) an `hmac` call was signed at.
pub const TIMESTAMP_HEADER: &str = "x-piecework-timestamp";
/// `sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`.
pub const SIGNATURE_HEADER: &str = "x-piecework-signature";
/// How far a signature's timestamp may be from now, either way: a captured call can be
/// replayed for at most this long.
pub const MAX_SKEW_SECONDS: i64 = 300;

/// Why a call was refused; the label of `piecework_webhook_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No signature, timestamp or token.
    Missing,
    /// A timestamp that is not a number or is too far from now.
    Stale,
    /// A signature or token that does not match.
    Wrong,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Stale => "stale",
            Refusal::Wrong => "wrong",
        }
    }
}

/// Checks a call to a flow whose trigger is `trigger`, holding `secret`, at unix time `now`.
/// `header` reads a request header (names are lowercase).
pub fn check_call(
    trigger: &TriggerDef,
    secret: Option<&str>,
    header: impl Fn(&str) -> Option<String>,
    body: &[u8],
    now: i64,
) -> Result<(), Refusal> {
    let auth = trigger.auth.unwrap_or_default();
    if auth == WebhookAuth::None {
        return Ok(());
    }
    // A flow that needs a secret and has none refuses everyone.
    let secret = secret.ok_or(Refusal::Wrong)?;
    match auth {
        WebhookAuth::None => Ok(()),
        WebhookAuth::Token => {
            let given = header(trigger.token_header()).ok_or(Refusal::Missing)?;
            if secrets::constant_time_eq(given.trim().as_bytes(), secret.as_bytes()) {
                Ok(())
            } else {
                Err(Refusal::Wrong)
            }
        }
        WebhookAuth::Hmac => {
            let timestamp = header(TIMESTAMP_HEADER).ok_or(Refusal::Missing)?;
            let signature = header(SIGNATURE_HEADER).ok_or(Refusal::Missing)?;
            let at: i64 = timestamp.trim().parse().map_err(|_| Refusal::Stale)?;
            // `abs_diff`: a caller's timestamp of i64::MIN must not overflow the check.
            if now.abs_diff(at) > MAX_SKEW_SECONDS.unsigned_abs() {
                return Err(Refusal::Stale);
            }
            let tag = signature
                .trim()
                .strip_prefix("sha256=")
                .and_then(decode_hex)
                .ok_or(Refusal::Wrong)?;
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
            let mut signed = Vec::with_capacity(timestamp.len() + 1 + body.len());
            signed.extend_from_slice(timestamp.trim().as_bytes());
            signed.push(b'.');
            signed.extend_from_slice(body);
            ring::hmac::verify(&key, &signed, &tag).map_err(|_| Refusal::Wrong)
        }
    }
}

/// The `x-piecework-signature` value for `body` signed at `timestamp` with `secret`: what a
/// caller computes (and tests, and `piecework` tools).
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut signed = format!("{timestamp}.").into_bytes();
    signed.extend_from_slice(body);
    let tag = ring::hmac::sign(&key, &signed);
    format!("sha256={}", encode_hex(tag.as_ref()))
}

/// Every string in `value`.
fn string_leaves(value: &serde_json::Value) -> Vec<&str> {
    match value {
        serde_json::Value::String(text) => vec![text],
        serde_json::Value::Array(items) => items.iter().flat_map(string_leaves).collect(),
        serde_json::Value::Object(map) => map.values().flat_map(string_leaves).collect(),
        _ => Vec::new(),
    }
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn new_secret() -> String {
    encode_hex(&secrets::random_bytes::<32>())
}

fn context(flow_id: &str) -> String {
    format!("webhook:{flow_id}")
}

/// The header a webhook caller sets so that its retries of one call start one run.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The caller's `Idempotency-Key`, if it sent one: printable, at most 255 bytes.
fn idempotency_key(request: &piecework_sdk::WebhookRequest) -> Result<Option<&str>, RuntimeError> {
    let Some(key) = request.headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    if key.is_empty() || key.len() > 255 || key.chars().any(|c| c.is_control()) {
        return Err(RuntimeError::Invalid(
            "Idempotency-Key must be 1 to 255 printable characters".into(),
        ));
    }
    Ok(Some(key))
}

/// The id of the run for item `index` of a call: fresh, or with an `Idempotency-Key` the same
/// for every call carrying it (for as long as the run is kept: `run_retention`).
fn run_id_for(flow: &piecework_core::FlowVersion, key: Option<&str>, index: usize) -> String {
    match key {
        Some(key) => piecework_core::run::deterministic_run_id(
            &flow.flow_id,
            &format!("idempotency:{key}:{index}"),
        ),
        None => piecework_core::run::new_run_id(),
    }
}

/// What a webhook call started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookRuns {
    /// One run per item, started now.
    pub run_ids: Vec<String>,
    /// When the flow debounces: its items were held, and their runs start by then.
    pub held_until: Option<chrono::DateTime<chrono::Utc>>,
}

impl Runtime {
    /// The flow record a webhook call is admitted on: from this process's cache of records
    /// that admitted a call before, else read from the store. Creating the run checks it
    /// against the store (one round trip for both); [`Runtime::forget_admission`] drops it
    /// when that check fails. Only records that admitted are cached, so a refusal always
    /// comes from the store's current record.
    pub async fn admission_record(
        &self,
        flow_id: &str,
    ) -> Result<Option<piecework_store::FlowRecord>, RuntimeError> {
        if let Some(record) = self.admissions.lock().unwrap().get(flow_id) {
            return Ok(Some(record.clone()));
        }
        Ok(self.store.get_flow(flow_id).await?)
    }

    /// Caches the record a webhook call was just admitted on (enabled, with a webhook
    /// trigger), for the flow's next calls.
    pub fn remember_admission(&self, record: &piecework_store::FlowRecord) {
        let mut admissions = self.admissions.lock().unwrap();
        if !admissions.contains_key(&record.id) {
            admissions.insert(record.id.clone(), record.clone());
        }
    }

    /// Forgets the cached record of a flow whose admission turned out stale.
    pub fn forget_admission(&self, flow_id: &str) {
        self.admissions.lock().unwrap().remove(flow_id);
    }

    /// Turns an admitted webhook call into the trigger's items and starts one run per item,
    /// as a poll does with its new items; returns the run ids. The first run is created in
    /// one round trip with the call's audit entry (`webhook.receive`, actor `webhook`: the
    /// caller is unknown); a flow that changed since admission is
    /// [`RuntimeError::StaleAdmission`].
    pub async fn start_webhook_runs(
        &self,
        flow: &piecework_core::FlowVersion,
        webhook: &dyn piecework_sdk::trigger::DynWebhook,
        request: &piecework_sdk::WebhookRequest,
    ) -> Result<WebhookRuns, RuntimeError> {
        let received = std::time::Instant::now();
        let result = async {
            let items = self.webhook_items(flow, webhook, request).await?;
            let key = idempotency_key(request)?;
            if flow.definition.debounce.is_some() {
                // Held back: the call's audit entry goes on its own. A retried call (the same
                // `Idempotency-Key`) is the same item again, which changes nothing.
                let started_by =
                    piecework_sdk::Principal::new(format!("webhook:{}", flow.flow_id), None);
                let mut held_until = None;
                for (i, item) in items.into_iter().enumerate() {
                    let kind = piecework_telemetry::metrics::TriggerKind::webhook;
                    let item_id = key.map(|key| format!("idempotency:{key}:{i}"));
                    let due = self
                        .hold_item(flow, item, kind, started_by.clone(), item_id)
                        .await?;
                    held_until = held_until.max(Some(due));
                }
                return Ok(WebhookRuns {
                    run_ids: Vec::new(),
                    held_until,
                });
            }
            let mut run_ids = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                let run_id = run_id_for(flow, key, i);
                let audit = run_ids
                    .is_empty()
                    .then(|| self.receive_audit(flow, received, None));
                self.start_admitted_run(flow, run_id.clone(), item, audit)
                    .await?;
                run_ids.push(run_id);
            }
            Ok(WebhookRuns {
                run_ids,
                held_until: None,
            })
        }
        .await;
        if let Some(error) =
            Self::receive_audit_owed(&result, |runs: &WebhookRuns| runs.run_ids.is_empty())
        {
            self.append_receive_audit(flow, received, error).await;
        }
        result
    }

    /// Starts the one run of a synchronous webhook call, watching for its end from before the
    /// run exists: the caller awaits the watch and answers from the finish notification, with
    /// no read of the run. Created and audited in one round trip, as
    /// [`Runtime::start_webhook_runs`].
    pub async fn start_sync_webhook_run(
        &self,
        flow: &piecework_core::FlowVersion,
        webhook: &dyn piecework_sdk::trigger::DynWebhook,
        request: &piecework_sdk::WebhookRequest,
    ) -> Result<(String, Box<dyn piecework_store::RunWatch>), RuntimeError> {
        let received = std::time::Instant::now();
        let result = async {
            if flow.definition.debounce.is_some() {
                return Err(RuntimeError::Invalid(format!(
                    "flow `{id}` debounces its items, so a call cannot wait for its run: call POST /v1/webhooks/{id}",
                    id = flow.flow_id
                )));
            }
            let items = self.webhook_items(flow, webhook, request).await?;
            let count = items.len();
            let Ok([item]) = <[serde_json::Value; 1]>::try_from(items) else {
                return Err(RuntimeError::Invalid(format!(
                    "a synchronous webhook needs exactly one run, the trigger produced {count}"
                )));
            };
            let run_id = run_id_for(flow, idempotency_key(request)?, 0);
            let watch = self.store.watch_run(&run_id).await?;
            let audit = self.receive_audit(flow, received, None);
            self.start_admitted_run(flow, run_id.clone(), item, Some(audit))
                .await?;
            Ok((run_id, watch))
        }
        .await;
        if let Some(error) = Self::receive_audit_owed(&result, |_| false) {
            self.append_receive_audit(flow, received, error).await;
        }
        result
    }

    /// The `webhook.receive` audit entry of a call received at `received`.
    fn receive_audit(
        &self,
        flow: &piecework_core::FlowVersion,
        received: std::time::Instant,
        error: Option<&String>,
    ) -> piecework_proto::v1::AuditEvent {
        crate::audit_event(
            &Actor::webhook(),
            "webhook.receive",
            &format!("flow/{}", flow.flow_id),
            received.elapsed(),
            error,
        )
    }

    /// What to audit of a call whose entry no run creation carried: `Some(error)` for a
    /// failure, `Some(None)` (with `no_run`) for a call that made no run, `None` when nothing
    /// is to be audited (the entry went with the run, or a stale admission, admitted again).
    fn receive_audit_owed<T>(
        result: &Result<T, RuntimeError>,
        no_run: impl Fn(&T) -> bool,
    ) -> Option<Option<String>> {
        match result {
            Err(RuntimeError::StaleAdmission(_)) => None,
            Err(err) => Some(Some(err.to_string())),
            Ok(value) if no_run(value) => Some(None),
            Ok(_) => None,
        }
    }

    async fn append_receive_audit(
        &self,
        flow: &piecework_core::FlowVersion,
        received: std::time::Instant,
        error: Option<String>,
    ) {
        let event = self.receive_audit(flow, received, error.as_ref());
        if let Err(err) = self.store.append_audit(event).await {
            tracing::warn!(error = %err, "could not append to the audit stream");
        }
    }

    /// Creates a webhook's run (with `audit`) if its flow is still enabled at the admitted
    /// version, then publishes its first step.
    async fn start_admitted_run(
        &self,
        flow: &piecework_core::FlowVersion,
        run_id: String,
        trigger: serde_json::Value,
        audit: Option<piecework_proto::v1::AuditEvent>,
    ) -> Result<(), RuntimeError> {
        use piecework_telemetry::metrics::TriggerKind;
        let started_by = piecework_sdk::Principal::new(format!("webhook:{}", flow.flow_id), None);
        let (run, span) = crate::new_run(flow, run_id, trigger, TriggerKind::webhook, started_by);
        let first = crate::first_job(flow, &run.id);
        async {
            match self
                .store
                .create_admitted_run(&run, audit.as_ref(), &first)
                .await?
            {
                piecework_store::Admission::Created => {
                    tracing::Span::current().record("piecework.run.created", true);
                    self.metrics
                        .run_started(&flow.flow_id, TriggerKind::webhook);
                    self.publish_queued(flow, &first).await;
                    Ok(())
                }
                // The caller's retry of an accepted call (same `Idempotency-Key`): the same
                // run.
                piecework_store::Admission::Exists => {
                    self.republish_first(flow, &run.id, &first).await
                }
                piecework_store::Admission::Stale => {
                    self.forget_admission(&flow.flow_id);
                    Err(RuntimeError::StaleAdmission(flow.flow_id.clone()))
                }
            }
        }
        .instrument(span)
        .await
    }

    /// The items a webhook trigger makes of a call: one run each.
    async fn webhook_items(
        &self,
        flow: &piecework_core::FlowVersion,
        webhook: &dyn piecework_sdk::trigger::DynWebhook,
        request: &piecework_sdk::WebhookRequest,
    ) -> Result<Vec<serde_json::Value>, RuntimeError> {
        let trigger = &flow.definition.trigger;
        let input = serde_json::Value::Object(trigger.input.clone());
        // Only a trigger that names a connection costs a read of it.
        let (auth, secrets) = match &trigger.connection {
            Some(name) => self.trigger_connection(flow, name).await?,
            None => (None, Secrets::default()),
        };
        let run = piecework_sdk::RunInfo::new("webhook", &flow.flow_id, flow.version, "trigger", 1)
            .started_by(piecework_sdk::Principal::new(
                format!("webhook:{}", flow.flow_id),
                None,
            ));
        let ctx = self
            .context(run, flow, auth)
            .with_webhook_url(Some(self.webhook_url(&flow.flow_id)));
        webhook
            .handle_json(&ctx, input, request)
            .await
            .map_err(|e| {
                let message = format!(
                    "webhook trigger rejected the request: {}",
                    secrets.mask(&e.to_string())
                );
                if e.is_retryable() {
                    RuntimeError::Unavailable(message)
                } else {
                    RuntimeError::Invalid(message)
                }
            })
    }

    /// The values of the connection a flow's trigger names, and what of them to mask.
    pub(crate) async fn trigger_connection(
        &self,
        flow: &piecework_core::FlowVersion,
        name: &str,
    ) -> Result<(Option<serde_json::Value>, Secrets), RuntimeError> {
        let trigger = &flow.definition.trigger;
        let values = self.connection_values(name, &trigger.piece).await?;
        let piece = match flow.trigger_version() {
            Some(version) => self
                .catalog()
                .get_or_fetch(&trigger.piece, version)
                .await
                .map_err(RuntimeError::Unavailable)?,
            None => None,
        };
        // Without the piece's auth kind every string of the connection is masked.
        let secrets = match &piece {
            Some(piece) => Secrets::of(piece.auth(), &values),
            None => Secrets::from_values(string_leaves(&values)),
        };
        Ok((Some(values), secrets))
    }

    /// Gives a flow whose webhook auth needs a secret one, unless it has one; returns the new
    /// secret (shown once, in the apply's answer).
    pub(crate) async fn ensure_webhook_secret(
        &self,
        flow_id: &str,
        trigger: &TriggerDef,
    ) -> Result<Option<String>, RuntimeError> {
        if !trigger.auth.is_some_and(WebhookAuth::needs_secret)
            || self.store.get_webhook_secret(flow_id).await?.is_some()
        {
            return Ok(None);
        }
        let secret = new_secret();
        let sealed = self.seal_webhook_secret(flow_id, &secret)?;
        let created = self
            .store
            .put_webhook_secret(flow_id, &sealed, false)
            .await?;
        // Another api process won the race: its secret stands, and it shows it.
        Ok(created.then_some(secret))
    }

    pub(crate) fn seal_webhook_secret(
        &self,
        flow_id: &str,
        secret: &str,
    ) -> Result<String, RuntimeError> {
        let sealed = self.keyring()?.seal(secret.as_bytes(), &context(flow_id));
        Ok(serde_json::to_string(&sealed).expect("sealed values serialize"))
    }

    /// The flow's webhook secret, if it has one.
    pub async fn webhook_secret(&self, flow_id: &str) -> Result<Option<String>, RuntimeError> {
        let Some(text) = self.store.get_webhook_secret(flow_id).await? else {
            return Ok(None);
        };
        let what = format!("the webhook secret of flow `{flow_id}`");
        let sealed: secrets::Sealed = serde_json::from_str(&text)
            .map_err(|_| RuntimeError::Invalid(format!("{what} is damaged")))?;
        let plain = self.keyring()?.open(&sealed, &context(flow_id), &what)?;
        String::from_utf8(plain)
            .map(Some)
            .map_err(|_| RuntimeError::Invalid(format!("{what} is damaged")))
    }

    /// Replaces the flow's webhook secret: callers with the old one are refused from now on.
    /// Audited as `flow.webhook_secret.rotate`.
    pub async fn rotate_webhook_secret(
        &self,
        flow_id: &str,
        actor: &Actor,
    ) -> Result<String, RuntimeError> {
        let rotate = async {
            let record = self
                .store
                .get_flow(flow_id)
                .await?
                .ok_or_else(|| RuntimeError::NoSuchFlow(flow_id.to_owned()))?;
            let version = self
                .flow_version(flow_id, record.latest_version)
                .await?
                .ok_or_else(|| RuntimeError::NoSuchFlow(flow_id.to_owned()))?;
            if !version
                .definition
                .trigger
                .auth
                .is_some_and(WebhookAuth::needs_secret)
            {
                return Err(RuntimeError::Conflict(format!(
                    "flow `{flow_id}` is not a webhook flow with `auth: hmac` or `auth: token`"
                )));
            }
            let secret = new_secret();
            let sealed = self.seal_webhook_secret(flow_id, &secret)?;
            self.store
                .put_webhook_secret(flow_id, &sealed, true)
                .await?;
            Ok(secret)
        };
        self.audited(
            actor,
            "flow.webhook_secret.rotate",
            &format!("flow/{flow_id}"),
            rotate,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trigger(auth: Option<WebhookAuth>) -> TriggerDef {
        serde_json::from_value(serde_json::json!({
            "piece": "webhook", "trigger": "catch", "auth": auth,
        }))
        .unwrap()
    }

    #[test]
    fn hmac_calls_need_a_fresh_matching_signature() {
        let hmac = trigger(Some(WebhookAuth::Hmac));
        let body = br#"{"n":1}"#;
        let now = 1_800_000_000;
        let signature = sign("s3cret", now - 10, body);
        let ts = (now - 10).to_string();
        let headers = |ts: &str, sig: &str| {
            let (ts, sig) = (ts.to_owned(), sig.to_owned());
            move |name: &str| match name {
                TIMESTAMP_HEADER => Some(ts.clone()),
                SIGNATURE_HEADER => Some(sig.clone()),
                _ => None,
            }
        };
        let (ts, sig) = (ts.as_str(), signature.as_str());
        assert_eq!(
            check_call(&hmac, Some("s3cret"), headers(ts, sig), body, now),
            Ok(())
        );
        assert_eq!(
            check_call(&hmac, Some("s3cret"), headers(ts, sig), b"{\"n\":2}", now),
            Err(Refusal::Wrong),
            "another body"
        );
        assert_eq!(
            check_call(&hmac, Some("other"), headers(ts, sig), body, now),
            Err(Refusal::Wrong)
        );
        assert_eq!(
            check_call(&hmac, Some("s3cret"), headers(ts, sig), body, now + 400),
            Err(Refusal::Stale),
            "replayed too late"
        );
        assert_eq!(
            check_call(&hmac, Some("s3cret"), headers("x", sig), body, now),
            Err(Refusal::Stale)
        );
        for extreme in [i64::MIN, i64::MAX] {
            assert_eq!(
                check_call(
                    &hmac,
                    Some("s3cret"),
                    headers(&extreme.to_string(), sig),
                    body,
                    now
                ),
                Err(Refusal::Stale),
                "{extreme}"
            );
        }
        assert_eq!(
            check_call(&hmac, Some("s3cret"), headers(ts, "sha256=zz"), body, now),
            Err(Refusal::Wrong)
        );
        assert_eq!(
            check_call(&hmac, Some("s3cret"), |_| None, body, now),
            Err(Refusal::Missing)
        );
        assert_eq!(
            check_call(&hmac, None, headers(ts, sig), body, now),
            Err(Refusal::Wrong),
            "no secret: nobody gets in"
        );
    }

    #[test]
    fn token_and_none() {
        let mut token = trigger(Some(WebhookAuth::Token));
        token.token_header = Some("x-hub-token".into());
        let given = |value: &'static str| {
            move |name: &str| (name == "x-hub-token").then(|| value.to_owned())
        };
        assert_eq!(
            check_call(&token, Some("t0k"), given("t0k"), b"", 0),
            Ok(())
        );
        assert_eq!(
            check_call(&token, Some("t0k"), given("t0x"), b"", 0),
            Err(Refusal::Wrong)
        );
        assert_eq!(
            check_call(&token, Some("t0k"), |_| None, b"", 0),
            Err(Refusal::Missing)
        );
        let open = trigger(Some(WebhookAuth::None));
        assert_eq!(check_call(&open, None, |_| None, b"", 0), Ok(()));
    }

    #[test]
    fn hex_round_trips_and_rejects_junk() {
        assert_eq!(
            decode_hex(&encode_hex(&[0, 15, 255])),
            Some(vec![0, 15, 255])
        );
        assert_eq!(decode_hex("abc"), None);
        assert_eq!(decode_hex("zz"), None);
    }
}
