//! Piece protocol v1: how a piece host (the worker, the api) and a piece process talk.
//!
//! The contract is `docs/piece-protocol.md`; this module is its Rust form, used by both ends:
//! [`crate::serve`] on the piece's side, `piecework-host` on the host's. In short: one JSON
//! object per line (UTF-8, `\n`-terminated) on the piece's stdin (host → piece) and stdout
//! (piece → host). A frame with a `method` and an `id` is a request and gets exactly one
//! response with the same `id` (`result`, or `error`); a frame with a `method` and no `id` is a
//! notification; a frame with an `id` and no `method` is a response. Each side numbers its own
//! requests, so many calls are in flight at once in both directions.
//!
//! The first request is always `describe`, which carries the host's protocol version and
//! settings and returns the piece's; a major version the other side does not speak is refused
//! with an error naming both.

use std::borrow::Cow;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

use crate::context::{Owner, RunInfo, Scope};
use crate::egress::EgressPolicy;
use crate::error::{ErrorKind, PieceError};
use crate::piece::PieceMetadata;
use crate::trigger::WebhookRequest;

/// The protocol version this crate speaks: `major.minor`. Minor versions only add optional
/// fields and methods; a different major is refused.
pub const VERSION: &str = "1.3";
/// The major part of [`VERSION`].
pub const MAJOR: u64 = 1;
/// The largest frame either side accepts unless the manifest says otherwise.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Method names.
pub mod method {
    // host → piece
    pub const DESCRIBE: &str = "describe";
    pub const VALIDATE_AUTH: &str = "validate_auth";
    pub const RUN_ACTION: &str = "run_action";
    pub const POLL: &str = "poll";
    pub const WEBHOOK: &str = "webhook";
    pub const SCHEDULE: &str = "schedule";
    pub const HEALTH: &str = "health";
    /// The options of a dynamic dropdown (1.2).
    pub const OPTIONS: &str = "options";
    /// A trigger's flow starts listening (1.3).
    pub const ENABLE: &str = "enable";
    /// A trigger's flow stops listening (1.3).
    pub const DISABLE: &str = "disable";
    /// A notification: stop working on request `id` and answer it with an error.
    pub const CANCEL: &str = "cancel";
    // piece → host, during a call
    pub const STORE_GET: &str = "store.get";
    pub const STORE_PUT: &str = "store.put";
    pub const STORE_DELETE: &str = "store.delete";
    /// Notifications.
    pub const LOG: &str = "log";
    pub const PROGRESS: &str = "progress";
}

/// The major version of a `major.minor` string, if it is one.
pub fn major_of(version: &str) -> Option<u64> {
    let (major, minor) = version.split_once('.')?;
    minor.parse::<u64>().ok()?;
    major.parse().ok()
}

/// The minor version of a `major.minor` string, if it is one: what optional methods the
/// other side knows (`enable` needs 1.3).
pub fn minor_of(version: &str) -> Option<u64> {
    major_of(version)?;
    version.split_once('.')?.1.parse().ok()
}

/// Checks the other side's version; the error names both, as the contract requires.
pub fn check_version(theirs: &str, side: &str) -> Result<(), PieceError> {
    match major_of(theirs) {
        Some(MAJOR) => Ok(()),
        Some(_) => Err(PieceError::fatal(format!(
            "the {side} speaks piece protocol {theirs}, this side speaks {VERSION}: major versions differ"
        ))),
        None => Err(PieceError::fatal(format!(
            "the {side} sent protocol version {theirs:?}, which is not `major.minor` (this side speaks {VERSION})"
        ))),
    }
}

/// One line on the wire, as read. `params` and `result` stay raw until the method is known.
#[derive(Debug, Default, Deserialize)]
pub struct Frame {
    #[serde(default)]
    pub id: Option<u64>,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub params: Option<Box<RawValue>>,
    #[serde(default)]
    pub result: Option<Box<RawValue>>,
    #[serde(default)]
    pub error: Option<WireError>,
}

impl Frame {
    pub fn parse(line: &[u8]) -> Result<Frame, String> {
        serde_json::from_slice(line).map_err(|e| format!("not a protocol frame: {e}"))
    }

    /// The params as `T`; a frame without params reads as `{}`.
    pub fn params<'a, T: Deserialize<'a>>(&'a self) -> Result<T, PieceError> {
        let raw = self.params.as_deref().map_or("{}", RawValue::get);
        serde_json::from_str(raw).map_err(|e| {
            PieceError::fatal(format!(
                "bad params for `{}`: {e}",
                self.method.as_deref().unwrap_or("?")
            ))
        })
    }

    /// A response's outcome as `T` (`null` when the result is absent).
    pub fn outcome<T: serde::de::DeserializeOwned>(&self) -> Result<T, PieceError> {
        if let Some(error) = &self.error {
            return Err(error.clone().into());
        }
        let raw = self.result.as_deref().map_or("null", RawValue::get);
        serde_json::from_str(raw).map_err(|e| {
            PieceError::fatal(format!("the answer is not what the protocol says: {e}"))
        })
    }
}

/// A request as written.
#[derive(Debug, Serialize)]
pub struct Request<'a, P: Serialize> {
    pub id: u64,
    pub method: &'a str,
    pub params: &'a P,
}

/// A notification as written.
#[derive(Debug, Serialize)]
pub struct Notification<'a, P: Serialize> {
    pub method: &'a str,
    pub params: &'a P,
}

/// A response as written: `result` or `error`.
#[derive(Debug, Serialize)]
pub struct Response<'a, R: Serialize> {
    pub id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<&'a R>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<WireError>,
}

/// Encodes a frame as one line, newline included.
pub fn encode(frame: &impl Serialize) -> Vec<u8> {
    let mut line = serde_json::to_vec(frame).expect("protocol frames serialize");
    line.push(b'\n');
    line
}

/// A [`PieceError`] on the wire: retryable or fatal, exactly as the piece returned it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub kind: ErrorKind,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl From<&PieceError> for WireError {
    fn from(err: &PieceError) -> Self {
        Self {
            kind: err.kind(),
            message: err.message().to_owned(),
            retry_after_ms: err
                .retry_after()
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        }
    }
}

impl From<WireError> for PieceError {
    fn from(err: WireError) -> Self {
        let error = match err.kind {
            ErrorKind::Retryable => PieceError::retryable(err.message),
            ErrorKind::Fatal => PieceError::fatal(err.message),
        };
        match err.retry_after_ms {
            Some(ms) => error.with_retry_after(Duration::from_millis(ms)),
            None => error,
        }
    }
}

/// `describe` params: the host's version and the settings the piece runs under.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DescribeParams {
    pub protocol: String,
    /// e.g. `piecework 0.1.0`.
    #[serde(default)]
    pub host: String,
    /// What the piece's HTTP client may call.
    #[serde(default)]
    pub egress: EgressPolicy,
    /// The most verbose `log` level the host wants.
    #[serde(default)]
    pub log_level: LogLevel,
    /// The largest frame the host accepts.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// The installation's API as callers outside reach it (1.3), e.g.
    /// `https://piecework.company.internal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
}

fn default_max_message_bytes() -> usize {
    DEFAULT_MAX_MESSAGE_BYTES
}

/// `describe` result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Described {
    pub protocol: String,
    pub piece: PieceMetadata,
}

/// Who and what a call runs for. The connection's values travel only in the call that needs
/// them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallContext<'a> {
    pub run: Cow<'a, RunInfo>,
    #[serde(default)]
    pub owner: Cow<'a, Owner>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<Cow<'a, Value>>,
    /// Limits of this call that replace the installation's (1.1; absent from older hosts).
    #[serde(default, skip_serializing_if = "CallLimits::is_empty")]
    pub limits: CallLimits,
}

/// Per-call limits a step sets for itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallLimits {
    /// The largest response body the piece's HTTP client reads in this call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_response_bytes: Option<u64>,
}

impl CallLimits {
    pub fn is_empty(&self) -> bool {
        self.max_response_bytes.is_none()
    }
}

/// `run_action` params; the result is the action's output.
#[derive(Debug, Serialize, Deserialize)]
pub struct RunAction<'a> {
    pub action: Cow<'a, str>,
    /// Already validated against the action's props by the host.
    pub input: Value,
    pub context: CallContext<'a>,
}

/// `poll` params; the result is a list of `PolledItem`s (the host deduplicates).
#[derive(Debug, Serialize, Deserialize)]
pub struct Poll<'a> {
    pub trigger: Cow<'a, str>,
    pub input: Value,
    pub context: CallContext<'a>,
    /// How far the flow has read the source (1.2; absent on its first poll).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<Cow<'a, crate::polling::PollCursor>>,
    /// A trial poll from `piece test` (1.3): answer with the source's recent items and keep
    /// no state of the piece's own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub trial: bool,
}

/// `webhook` params; the result is the list of items that start runs.
#[derive(Debug, Serialize, Deserialize)]
pub struct Webhook<'a> {
    pub trigger: Cow<'a, str>,
    pub input: Value,
    pub request: Cow<'a, WebhookRequest>,
    /// The flow, its owner and the trigger's connection (1.3; absent from older hosts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<CallContext<'a>>,
    /// The public URL the flow's webhook calls arrive at (1.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<Cow<'a, str>>,
}

/// `enable` and `disable` params (1.3): a polling or webhook trigger's flow starts or stops
/// listening. `context.run` names the flow and the version whose trigger it is (`run_id` is
/// `enable` or `disable`); the store is the flow's, as in its polls and webhook calls. The
/// result is `null`.
#[derive(Debug, Serialize, Deserialize)]
pub struct TriggerHookOf<'a> {
    pub trigger: Cow<'a, str>,
    pub input: Value,
    pub context: CallContext<'a>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<Cow<'a, str>>,
}

/// `schedule` params; the result is `{"every": "5m"}` or `{"cron": "…"}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ScheduleOf<'a> {
    pub trigger: Cow<'a, str>,
    pub input: Value,
}

/// `options` params (1.2): the options of dynamic dropdown `prop` of an action or of a
/// polling trigger (exactly one named), with the props given so far as `input`
/// (unvalidated) and the chosen connection in `context.auth`. The result is a
/// [`crate::DropdownOptions`].
#[derive(Debug, Serialize, Deserialize)]
pub struct OptionsOf<'a> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<Cow<'a, str>>,
    pub prop: Cow<'a, str>,
    #[serde(default)]
    pub input: Value,
    pub context: CallContext<'a>,
}

/// `validate_auth` params: the values being saved are `context.auth`; the result is `null`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ValidateAuth<'a> {
    pub context: CallContext<'a>,
}

/// `health` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// `ok`.
    pub status: String,
    /// Calls the piece is working on.
    pub in_flight: usize,
}

/// `cancel` params.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Cancel {
    pub id: u64,
}

/// `store.get|put|delete` params. `call` is the id of the host's request the piece is
/// serving; the host alone maps it to the flow whose store it is. `get` returns the value or
/// `null`, `put` returns `null`, `delete` whether the key existed.
#[derive(Debug, Serialize, Deserialize)]
pub struct StoreOp<'a> {
    pub call: u64,
    #[serde(default)]
    pub scope: Scope,
    pub key: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
}

/// Severity of a `log` notification.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn from_tracing(level: tracing::Level) -> Self {
        match level {
            tracing::Level::ERROR => Self::Error,
            tracing::Level::WARN => Self::Warn,
            tracing::Level::INFO => Self::Info,
            tracing::Level::DEBUG => Self::Debug,
            tracing::Level::TRACE => Self::Trace,
        }
    }
}

/// `log` params: a line for the host's log, with the run's fields added by the host when
/// `call` names a call in flight.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Log {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call: Option<u64>,
    pub level: LogLevel,
    pub message: String,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub fields: Map<String, Value>,
}

/// `progress` params.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    pub call: u64,
    pub message: String,
}

/// What one read of a frame found.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// A frame is in the buffer (without its newline).
    Frame,
    /// A line longer than the limit was skipped; `head` is its start, to tell whose it was.
    TooLong { bytes: usize, head: Vec<u8> },
    /// The other side closed the stream.
    Closed,
}

/// Bytes of an oversized line kept to find its `id`.
const HEAD: usize = 64;

/// Reads one line into `buf` (cleared first), refusing to buffer more than `max` bytes: an
/// oversized line is consumed and reported, so a runaway peer cannot exhaust memory.
pub async fn read_frame<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Read> {
    buf.clear();
    let mut skipped: Option<(usize, Vec<u8>)> = None;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(match skipped {
                Some((bytes, head)) => Read::TooLong { bytes, head },
                None if buf.is_empty() => Read::Closed,
                // A last line without its newline still counts.
                None => Read::Frame,
            });
        }
        let (chunk, done) = match memchr(available) {
            Some(at) => (&available[..at], at + 1),
            None => (available, available.len()),
        };
        let found_newline = done > chunk.len();
        match &mut skipped {
            Some((bytes, _)) => *bytes += chunk.len(),
            None if buf.len() + chunk.len() > max => {
                let mut head = std::mem::take(buf);
                let bytes = head.len() + chunk.len();
                head.truncate(HEAD);
                let room = HEAD - head.len();
                head.extend_from_slice(&chunk[..chunk.len().min(room)]);
                skipped = Some((bytes, head));
            }
            None => buf.extend_from_slice(chunk),
        }
        reader.consume(done);
        if found_newline {
            return Ok(match skipped {
                Some((bytes, head)) => Read::TooLong { bytes, head },
                None => Read::Frame,
            });
        }
    }
}

fn memchr(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|b| *b == b'\n')
}

/// The `id` at the start of an oversized frame, as both sides write it (`{"id":7,…`).
pub fn id_in_head(head: &[u8]) -> Option<u64> {
    // The head is cut at a byte count, maybe inside a character: read up to the cut.
    let text = match std::str::from_utf8(head) {
        Ok(text) => text,
        Err(err) => std::str::from_utf8(&head[..err.valid_up_to()]).ok()?,
    };
    let rest = text.trim_start().strip_prefix('{')?.trim_start();
    let rest = rest
        .strip_prefix("\"id\"")?
        .trim_start()
        .strip_prefix(':')?;
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_id_of_a_head_cut_inside_a_character_is_still_read() {
        let line =
            "{\"id\":100000000000000000,\"method\":\"a\",\"params\":{\"a\":\"\u{a1}\"}}".as_bytes();
        // Cut between the two bytes of `¡`.
        let cut = line.iter().position(|b| *b == 0xc2).unwrap() + 1;
        assert_eq!(id_in_head(&line[..cut]), Some(100_000_000_000_000_000));
    }

    #[test]
    fn versions_of_another_major_are_refused_naming_both() {
        assert!(check_version("1.0", "piece").is_ok());
        assert!(check_version("1.7", "piece").is_ok());
        assert_eq!(minor_of("1.12"), Some(12));
        assert_eq!(minor_of("1.x"), None);
        let err = check_version("2.0", "piece").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the piece speaks piece protocol 2.0, this side speaks 1.3: major versions differ"
        );
        assert!(!err.is_retryable());
        assert!(
            check_version("one", "host")
                .unwrap_err()
                .to_string()
                .contains("\"one\"")
        );
    }

    #[test]
    fn frames_tell_requests_responses_and_notifications_apart() {
        let request = encode(&Request {
            id: 3,
            method: method::HEALTH,
            params: &json!({}),
        });
        assert_eq!(request, b"{\"id\":3,\"method\":\"health\",\"params\":{}}\n");
        let frame = Frame::parse(&request[..request.len() - 1]).unwrap();
        assert_eq!(
            (frame.id, frame.method.as_deref()),
            (Some(3), Some("health"))
        );

        let ok = encode(&Response {
            id: 3,
            result: Some(&json!({"a": 1})),
            error: None,
        });
        let frame = Frame::parse(&ok).unwrap();
        assert_eq!(frame.outcome::<Value>().unwrap(), json!({"a": 1}));

        let failed = PieceError::retryable("503").with_retry_after(Duration::from_secs(2));
        let line = encode(&Response::<Value> {
            id: 4,
            result: None,
            error: Some(WireError::from(&failed)),
        });
        let err = Frame::parse(&line).unwrap().outcome::<Value>().unwrap_err();
        assert_eq!(err, failed);

        let null = Frame::parse(b"{\"id\":5,\"result\":null}").unwrap();
        assert_eq!(null.outcome::<Option<Value>>().unwrap(), None);
        assert!(
            Frame::parse(b"hello")
                .unwrap_err()
                .contains("not a protocol frame")
        );
    }

    #[tokio::test]
    async fn oversized_lines_are_skipped_and_reported_with_their_id() {
        let big = format!("{{\"id\":42,\"result\":\"{}\"}}\n", "x".repeat(100));
        let input = format!("{{\"id\":1}}\n{big}{{\"id\":2}}\nlast");
        let mut reader = tokio::io::BufReader::with_capacity(16, input.as_bytes());
        let mut buf = Vec::new();
        assert_eq!(
            read_frame(&mut reader, &mut buf, 50).await.unwrap(),
            Read::Frame
        );
        assert_eq!(buf, b"{\"id\":1}");
        match read_frame(&mut reader, &mut buf, 50).await.unwrap() {
            Read::TooLong { bytes, head } => {
                assert_eq!(bytes, big.len() - 1);
                assert_eq!(id_in_head(&head), Some(42));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            read_frame(&mut reader, &mut buf, 50).await.unwrap(),
            Read::Frame
        );
        assert_eq!(buf, b"{\"id\":2}");
        assert_eq!(
            read_frame(&mut reader, &mut buf, 50).await.unwrap(),
            Read::Frame
        );
        assert_eq!(buf, b"last");
        assert_eq!(
            read_frame(&mut reader, &mut buf, 50).await.unwrap(),
            Read::Closed
        );
    }
}
