//! The NATS JetStream adapter: the production bus.
//!
//! One stream, `PW_JOBS` (work-queue retention, file storage, subjects `pw.jobs.>`), and one
//! durable pull consumer per queue (`pw-<queue>`, filter `pw.jobs.<queue>.*`) shared by every
//! worker serving it. Both are created or updated at start, so deploying a new release or
//! another worker is idempotent. Acks are explicit; a retry is a nak with a delay; after the
//! last attempt the worker terminates the message. The broker's duplicate window makes
//! publishes with the same `Nats-Msg-Id` idempotent.
//!
//! The piece registry lives in the same server ([`crate::pieces::nats`]).
//!
//! The client reconnects by itself; while NATS is away, publishes and fetches fail and callers
//! retry, and deliveries that were not acked are redelivered after their ack wait.

use piecework_sdk::mask::redact_url;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, stream};
use async_nats::{HeaderMap, connection::State};
use async_trait::async_trait;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::{
    Bus, BusError, ConsumeOptions, Consumer, Delivery, Message, PublishAck, QueueStats, Settle,
    subject,
};

/// How piecework uses NATS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated: `nats://nats-1:4222,nats://nats-2:4222`.
    pub url: String,
    /// The job stream's name.
    pub stream: String,
    /// How long a message id is remembered for deduplication.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// Stream replicas (1 for a single server; 3 for a cluster).
    pub replicas: usize,
    /// How long to keep trying to reach NATS at start before giving up.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// A NATS credentials file (`.creds`: a user JWT and its nkey seed), for servers with
    /// decentralized auth. A user and password go in the URL (`nats://USER:PASSWORD@host`).
    pub creds_file: Option<std::path::PathBuf>,
    /// Require TLS (also implied by `tls://` URLs and by any TLS file).
    pub tls_required: bool,
    /// A PEM file of the CA(s) to trust besides the system's roots.
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// A client certificate and its key (PEM), for servers that verify clients.
    pub tls_cert_file: Option<std::path::PathBuf>,
    pub tls_key_file: Option<std::path::PathBuf>,
}

impl NatsConfig {
    /// Checks that a client certificate comes with its key.
    pub fn validate(&self) -> Result<(), String> {
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err("tls_cert_file and tls_key_file go together".into());
        }
        Ok(())
    }

    /// Whether connections must use TLS.
    fn tls(&self) -> bool {
        self.tls_required
            || self.url.split(',').any(|u| u.trim().starts_with("tls://"))
            || self.tls_ca_file.is_some()
            || self.tls_cert_file.is_some()
    }

    /// The client options: name, timeouts, credentials and TLS.
    async fn connect_options(&self) -> Result<async_nats::ConnectOptions, BusError> {
        let mut options = async_nats::ConnectOptions::new()
            .name("piecework")
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None);
        // async-nats reads no credentials from URLs: take them from the first that has any
        // (`nats://USER:PASSWORD@host`, or `nats://TOKEN@host`).
        let embedded = self
            .url
            .split(',')
            .filter_map(|url| url.trim().parse::<async_nats::ServerAddr>().ok())
            .find(async_nats::ServerAddr::has_user_pass);
        if let Some(addr) = embedded {
            let user = percent_decode(addr.username().unwrap_or_default());
            options = match addr.password() {
                Some(password) => options.user_and_password(user, percent_decode(password)),
                None => options.token(user),
            };
        }
        if let Some(path) = &self.creds_file {
            options = options.credentials_file(path).await.map_err(|e| {
                BusError::Unavailable(format!(
                    "cannot read the NATS credentials file {}: {e}",
                    path.display()
                ))
            })?;
        }
        if self.tls() {
            piecework_sdk::http::install_crypto_provider();
            options = options.require_tls(true);
        }
        if let Some(ca) = &self.tls_ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert_file, &self.tls_key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        Ok(options)
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            stream: "PW_JOBS".into(),
            duplicate_window: Duration::from_secs(120),
            replicas: 1,
            connect_timeout: Duration::from_secs(30),
            creds_file: None,
            tls_required: false,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

/// The JetStream [`Bus`].
#[derive(Clone)]
pub struct NatsBus {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    config: NatsConfig,
    pieces: std::sync::Arc<crate::pieces::nats::NatsPieces>,
}

fn unavailable(context: &str, err: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(format!("{context}: {err}"))
}

impl NatsBus {
    /// Connects (retrying for up to `connect_timeout`) and creates or updates the job stream.
    pub async fn connect(config: NatsConfig) -> Result<Self, BusError> {
        let deadline = tokio::time::Instant::now() + config.connect_timeout;
        let mut delay = Duration::from_millis(100);
        let client = loop {
            let options = config.connect_options().await?;
            // Every server of a cluster the URL lists: the client starts at any that answers
            // (and learns the others from it).
            let servers: Vec<&str> = config
                .url
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .collect();
            match options.connect(servers).await {
                Ok(client) => break client,
                Err(err) if tokio::time::Instant::now() + delay < deadline => {
                    tracing::warn!(url = %redact_url(&config.url), error = %err, retry_in = ?delay, "cannot reach NATS yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(err) => {
                    return Err(unavailable(
                        &format!("cannot connect to NATS at {}", redact_url(&config.url)),
                        err,
                    ));
                }
            }
        };
        let jetstream = jetstream::new(client.clone());
        let pieces = crate::pieces::nats::NatsPieces::open(&jetstream, config.replicas)
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        let bus = Self {
            client,
            jetstream,
            config,
            pieces: std::sync::Arc::new(pieces),
        };
        bus.ensure_stream().await?;
        Ok(bus)
    }

    fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.config.stream.clone(),
            description: Some("piecework jobs: pw.jobs.<queue>.poll|step".into()),
            subjects: vec![format!("{}.>", subject::PREFIX)],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: self.config.duplicate_window,
            num_replicas: self.config.replicas,
            ..Default::default()
        }
    }

    async fn ensure_stream(&self) -> Result<(), BusError> {
        self.jetstream
            .create_or_update_stream(self.stream_config())
            .await
            .map_err(|e| {
                unavailable(
                    &format!("cannot create or update stream {}", self.config.stream),
                    e,
                )
            })?;
        Ok(())
    }

    /// The underlying client, for health and metrics.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    async fn consumer_info(&self, queue: &str) -> Result<QueueStats, BusError> {
        let stream = self
            .jetstream
            .get_stream(&self.config.stream)
            .await
            .map_err(|e| unavailable("stream lookup", e))?;
        let mut consumer: consumer::PullConsumer = stream
            .get_consumer(&consumer_name(queue))
            .await
            .map_err(|e| unavailable("consumer lookup", e))?;
        let info = consumer
            .info()
            .await
            .map_err(|e| unavailable("consumer info", e))?;
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        Ok(QueueStats {
            pending: info.num_pending,
            ack_pending: count(info.num_ack_pending),
            redelivered: count(info.num_redelivered),
        })
    }
}

/// Undoes URL percent-encoding in a user name or password (`p%40ss` → `p@ss`).
fn percent_decode(text: &str) -> String {
    form_urlencoded::parse(format!("x={}", text.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, value)| value.into_owned())
        .unwrap_or_default()
}

fn consumer_name(queue: &str) -> String {
    format!("pw-{queue}")
}

#[async_trait]
impl Bus for NatsBus {
    async fn publish(&self, message: Message) -> Result<PublishAck, BusError> {
        let mut headers = HeaderMap::new();
        for (name, value) in message.headers {
            headers.insert(name.as_str(), value.as_str());
        }
        let publish = jetstream::message::PublishMessage::build()
            .payload(message.payload)
            .headers(headers)
            .message_id(&message.msg_id);
        let fail = |err: &dyn std::fmt::Display| BusError::Publish {
            subject: message.subject.clone(),
            message: err.to_string(),
        };
        let ack = self
            .jetstream
            .send_publish(message.subject.clone(), publish)
            .await
            .map_err(|e| fail(&e))?
            .await
            .map_err(|e| fail(&e))?;
        Ok(PublishAck {
            duplicate: ack.duplicate,
        })
    }

    async fn consume(
        &self,
        queue: &str,
        options: ConsumeOptions,
    ) -> Result<Box<dyn Consumer>, BusError> {
        let stream = self
            .jetstream
            .get_stream(&self.config.stream)
            .await
            .map_err(|e| unavailable(&format!("cannot find stream {}", self.config.stream), e))?;
        let config = consumer::pull::Config {
            durable_name: Some(consumer_name(queue)),
            description: Some(format!("piecework workers serving queue {queue}")),
            filter_subject: subject::queue_filter(queue),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: options.ack_wait,
            max_ack_pending: i64::try_from(options.max_ack_pending).unwrap_or(i64::MAX),
            // Workers terminate after the last attempt; the broker never gives up on its own.
            max_deliver: -1,
            ..Default::default()
        };
        let consumer = match stream.create_consumer(config.clone()).await {
            Ok(consumer) => consumer,
            // An older server refuses to change an existing durable; keep it and say so.
            Err(err) => {
                tracing::warn!(queue, error = %err, "cannot create or update consumer; using the existing one");
                stream
                    .get_consumer(&consumer_name(queue))
                    .await
                    .map_err(|e| BusError::Consume {
                        queue: queue.to_owned(),
                        message: e.to_string(),
                    })?
            }
        };
        Ok(Box::new(NatsConsumer {
            queue: queue.to_owned(),
            consumer,
        }))
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    async fn ready(&self) -> Result<(), BusError> {
        if self.client.connection_state() != State::Connected {
            return Err(BusError::Unavailable(format!(
                "not connected to NATS at {}",
                redact_url(&self.config.url)
            )));
        }
        self.jetstream
            .get_stream_no_info(&self.config.stream)
            .await
            .map_err(|e| unavailable(&format!("stream {}", self.config.stream), e))?;
        Ok(())
    }

    async fn queue_stats(&self, queue: &str) -> Result<QueueStats, BusError> {
        self.consumer_info(queue).await
    }

    fn system(&self) -> &'static str {
        "nats"
    }

    fn pieces(&self) -> std::sync::Arc<dyn crate::pieces::PieceRegistry> {
        self.pieces.clone()
    }
}

struct NatsConsumer {
    queue: String,
    consumer: consumer::PullConsumer,
}

impl NatsConsumer {
    fn fail(&self, err: impl std::fmt::Display) -> BusError {
        BusError::Consume {
            queue: self.queue.clone(),
            message: err.to_string(),
        }
    }
}

/// How much longer than its own wait a fetch may take before it is given up: a pull request
/// lost in a server restart is never answered, and the no-wait fetch has no timer of its own.
/// The server answers an expired long poll itself; async-nats's own timer fires 5s after
/// the expiry, so this is longer.
const FETCH_GRACE: Duration = Duration::from_secs(10);

#[async_trait]
impl Consumer for NatsConsumer {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError> {
        match tokio::time::timeout(wait + FETCH_GRACE, self.fetch_unbounded(max, wait)).await {
            Ok(result) => result,
            Err(_) => Err(self.fail(format!(
                "no answer from NATS within {:?}",
                wait + FETCH_GRACE
            ))),
        }
    }
}

impl NatsConsumer {
    async fn fetch_unbounded(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, BusError> {
        // What is there now, without waiting...
        let mut ready = self
            .consumer
            .fetch()
            .max_messages(max.max(1))
            .messages()
            .await
            .map_err(|e| self.fail(e))?;
        let mut out = Vec::new();
        while let Some(message) = ready.next().await {
            out.push(delivery(message.map_err(|e| self.fail(e))?)?);
        }
        if !out.is_empty() {
            return Ok(out);
        }
        // ...else one long poll for the next job, answered as soon as it arrives. No idle
        // heartbeats: async-nats 0.51's batch stream loses its wake-up after consuming one
        // (`Batch::poll_next` returns `Pending` without re-polling), so a job arriving after a
        // heartbeat waited for the batch's own timer and then its ack wait (30s). A dead
        // connection is caught by the fetch deadline instead.
        let mut waiting = self
            .consumer
            .batch()
            .max_messages(1)
            .expires(wait)
            .messages()
            .await
            .map_err(|e| self.fail(e))?;
        if let Some(message) = waiting.next().await {
            out.push(delivery(message.map_err(|e| self.fail(e))?)?);
        }
        Ok(out)
    }
}

fn delivery(message: jetstream::Message) -> Result<Delivery, BusError> {
    let delivered = message
        .info()
        .map(|info| u32::try_from(info.delivered).unwrap_or(u32::MAX))
        .map_err(|e| BusError::Settle(format!("message has no JetStream info: {e}")))?;
    let (message, acker) = message.split();
    let headers = message
        .headers
        .iter()
        .flat_map(|headers| headers.iter())
        .flat_map(|(name, values)| {
            values
                .iter()
                .map(move |v| (name.to_string(), v.as_str().to_owned()))
        })
        .collect();
    let settle = NatsSettle {
        acker: Mutex::new(Some(acker)),
    };
    Ok(Delivery::new(
        message.subject.to_string(),
        headers,
        message.payload,
        delivered,
        Box::new(settle),
    ))
}

struct NatsSettle {
    /// Taken by the first settle; `None` afterwards.
    acker: Mutex<Option<jetstream::message::Acker>>,
}

impl NatsSettle {
    async fn send(&self, kind: AckKind) -> Result<(), BusError> {
        let acker = self
            .acker
            .lock()
            .await
            .take()
            .ok_or_else(|| BusError::Settle("delivery was already settled".into()))?;
        acker
            .ack_with(kind)
            .await
            .map_err(|e| BusError::Settle(e.to_string()))
    }
}

#[async_trait]
impl Settle for NatsSettle {
    async fn ack(&self) -> Result<(), BusError> {
        self.send(AckKind::Ack).await
    }

    async fn nak(&self, delay: Duration) -> Result<(), BusError> {
        self.send(AckKind::Nak((!delay.is_zero()).then_some(delay)))
            .await
    }

    async fn term(&self) -> Result<(), BusError> {
        self.send(AckKind::Term).await
    }

    async fn progress(&self) -> Result<(), BusError> {
        match self.acker.lock().await.as_ref() {
            Some(acker) => acker
                .ack_with(AckKind::Progress)
                .await
                .map_err(|e| BusError::Settle(e.to_string())),
            None => Err(BusError::Settle("delivery was already settled".into())),
        }
    }
}

impl Drop for NatsSettle {
    /// An unsettled delivery (its task was aborted) is nakked at once instead of waiting out
    /// the ack wait.
    fn drop(&mut self) {
        if let Some(acker) = self.acker.get_mut().take()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn(async move {
                let _ = acker.ack_with(AckKind::Nak(None)).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_credentials_are_percent_decoded() {
        assert_eq!(percent_decode("p%40ss%3Aword"), "p@ss:word");
        assert_eq!(percent_decode("a+b"), "a+b");
        assert_eq!(percent_decode("plain"), "plain");
    }
}
