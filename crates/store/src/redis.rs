//! The Redis adapter: the production store.
//!
//! Keys (all under `pw:`):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `pw:flows` | set | flow ids |
//! | `pw:flows:revision` | string | a counter incremented by every apply, enable and disable |
//! | `pw:flow:{id}` | string | the flow record (JSON) |
//! | `pw:flow:{id}:v:{n}` | string | version `n` (JSON), never changed once written |
//! | `pw:flow:{id}:webhook-secret` | string | a webhook flow's secret (JSON), sealed (AES-256-GCM) |
//! | `pw:flow:{id}:lock` | string | held while a flow is applied or enabled (expires) |
//! | `pw:run:{id}` | hash | `meta` (JSON: ids, trigger, created_at, trace, started_by, deadline, parent, depth), `status` (running, waiting, …), `error`, `finished_at`, `response`, `step:{name}` (JSON per step); expires `run_retention` after the run finished |
//! | `pw:runs`, `pw:runs:flow:{id}` | sorted set | run ids by creation time; ids older than `run_retention` are trimmed as runs are created |
//! | `pw:run-done:{id}` | pub/sub channel | a message when the run finishes |
//! | `pw:outbox` | sorted set | step jobs written with a run's creation or retry and not yet known to be published (`run\nflow\nversion\nstep\nepoch`, by ms written); the publisher takes its job out, a relay publishes the ones left behind |
//! | `pw:timers` | sorted set and pub/sub channel | timers of waiting runs and run deadlines (`run\nflow\nversion\nstep`, by due ms); a message when one is added |
//! | `pw:rate:{key}`, `pw:inflight:{key}`, `pw:slots:flow:{id}` | string, sorted sets | fleet-wide step rate limits, in-flight places and run slots |
//! | `pw:trigger:{flow}` | string | the polling cursor (JSON) |
//! | `pw:debounce:{flow}:{slot}` | hash | a debounced group: its last `item` (JSON), `item_id`, `meta` (JSON), `seq`, `first_ms`, `due_ms`; its timer is `slot\nflow\n0\n#debounce` in `pw:timers`; expires a day after it was due |
//! | `pw:lease:{name}` | string | a lease's holder, expiring (`poll:{flow}`: one poll per flow at a time) |
//! | `pw:connections` | set | connection names |
//! | `pw:connection:{name}` | string | a connection (JSON) whose values are sealed (AES-256-GCM) |
//! | `pw:api-keys` | hash | API key name → its record (JSON: role, keyed hash of the secret, created) |
//! | `pw:kv:{key}` | string | the piece key-value store (JSON), keys `flow:{id}:…` and `global:…` |
//! | `pw:results`, `pw:audit` | stream | one entry per step attempt / audited operation, capped with `MAXLEN ~`; also trimmed by age (`run_retention`, `audit_retention`) |
//!
//! A step update is one `MULTI` (step field, run status, `pw:results` entry, done
//! notification), and the updates of steps finishing together share one round trip
//! ([`crate::group_commit`]); creating a run is one Lua script, so "create only if new" is atomic. Blocking
//! stream reads use their own connection so they never hold up the shared one. The connection
//! manager reconnects by itself; while Redis is away, calls fail with `Unavailable`.
//!
//! On a Redis Cluster (`cluster = true`) every key starts `{pw}:` instead — one hash tag, so
//! every script and `MULTI` above stays in one slot — and commands follow the slot map.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use piecework_core::run::InFlight;
use piecework_core::{FlowVersion, Run, RunStatus, RunSummary, StepState, ValidFlow};
use piecework_proto::v1::{self, AuditEvent, StepResult};
use piecework_sdk::{KvStore, PieceError, PollState};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamId, StreamRangeReply, StreamReadReply};
use redis::{AsyncCommands, Script};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Mutex;

use crate::connection::{Connection, PubSubNodes, SentinelConnection};
use crate::group_commit::GroupCommit;
use crate::run_done::{self, RunDone};
use crate::{
    Admission, ApiKeyRecord, Applied, ConnectionRecord, DEBOUNCE_STEP, Entry, FlowRecord, Held,
    OutboxJob, Pending, RunCursor, RunEnded, RunQuery, RunStats, RunUpdate, RunWatch, StepUpdate,
    Store, StoreError, Timer,
};

/// A registered waiter for one run's end. The finish notification says how the run ended;
/// should one be lost (a Redis restart), the run is read every [`run_done::FALLBACK_POLL`].
struct RedisRunWatch {
    store: RedisStore,
    run_id: String,
    waiter: run_done::Waiter,
}

#[async_trait]
impl RunWatch for RedisRunWatch {
    async fn ended(self: Box<Self>, timeout: Duration) -> Result<Option<RunEnded>, StoreError> {
        let Self {
            store,
            run_id,
            mut waiter,
        } = *self;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next_look = deadline.min(tokio::time::Instant::now() + run_done::FALLBACK_POLL);
            tokio::select! {
                payload = &mut waiter.finished => {
                    if let Some(ended) = payload.ok().and_then(|p| serde_json::from_str(&p).ok()) {
                        return Ok(Some(ended));
                    }
                    // Not a payload this version writes: read the run instead.
                    let run = store.get_run(&run_id).await?;
                    return Ok(run.as_ref().and_then(RunEnded::of));
                }
                () = tokio::time::sleep_until(next_look) => {
                    // A look at the status alone: a watch may last as long as a step does.
                    let status: Option<String> = store
                        .conn()
                        .hget(store.keys.run(&run_id), "status")
                        .await
                        .map_err(unavailable)?;
                    let ended = status.is_none_or(|s| {
                        s.parse::<RunStatus>().is_ok_and(RunStatus::is_terminal)
                    });
                    if ended {
                        let run = store.get_run(&run_id).await?;
                        return Ok(run.as_ref().and_then(RunEnded::of));
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Ok(None);
                    }
                }
            }
        }
    }
}

/// How piecework uses Redis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:6379/0`, or `rediss://…` for TLS; a password as `redis://:PASSWORD@host`
    /// (or `USER:PASSWORD` with ACLs). With `cluster`, some nodes of the cluster,
    /// comma-separated (`redis://r1:6379,redis://r2:6379`).
    pub url: String,
    /// Talk to a Redis Cluster (`PW_REDIS_CLUSTER`): commands follow the cluster's slot map
    /// and every key carries the hash tag `{pw}` (`{pw}:results`, `{pw}:run:…`), so each
    /// operation stays in one slot.
    pub cluster: bool,
    /// The name of the primary a group of Redis Sentinels watches (`PW_REDIS_SENTINEL_MASTER`,
    /// their `sentinel monitor NAME …`): `url` then lists the Sentinels
    /// (`redis://s1:26379,redis://s2:26379`), and piecework connects to the primary they name,
    /// asking again after a failover. A password in the URLs is used for the Sentinels and
    /// the Redis servers both.
    pub sentinel_master: Option<String>,
    /// With `rediss://`: a PEM file of the CA(s) to trust instead of the system's roots.
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// With `rediss://`: a client certificate and its key (PEM), for servers that require one.
    pub tls_cert_file: Option<std::path::PathBuf>,
    pub tls_key_file: Option<std::path::PathBuf>,
    /// Approximate cap of `pw:results` and `pw:audit` (`XADD MAXLEN ~`).
    pub stream_maxlen: usize,
    /// How long `pw:audit` keeps an entry, whatever the count (`XTRIM MINID`, at most once a
    /// minute per process, as entries are added); zero keeps them until `stream_maxlen` pushes
    /// them out.
    #[serde(with = "humantime_serde")]
    pub audit_retention: Duration,
    /// How long to keep trying to reach Redis at start before giving up.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a run is kept once it has finished (`PW_RUN_RETENTION`); its step results
    /// in `pw:results` are kept as long. Zero keeps everything.
    #[serde(with = "humantime_serde")]
    pub run_retention: Duration,
}

impl RedisConfig {
    /// Checks the TLS settings: files only with `rediss://`, a certificate with its key.
    pub fn validate(&self) -> Result<(), String> {
        let tls = self.url.starts_with("rediss://");
        let files = [&self.tls_ca_file, &self.tls_cert_file, &self.tls_key_file];
        if !tls && files.iter().any(|f| f.is_some()) {
            return Err("tls_ca_file, tls_cert_file and tls_key_file need a rediss:// url".into());
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err("tls_cert_file and tls_key_file go together".into());
        }
        Ok(())
    }

    /// The certificates to connect with, when any file is configured.
    fn tls_certificates(&self) -> Result<Option<redis::TlsCertificates>, StoreError> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|e| {
                StoreError::Unavailable(format!("cannot read {}: {e}", path.display()))
            })
        };
        let root_cert = self.tls_ca_file.as_deref().map(read).transpose()?;
        let client_tls = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                client_cert: read(cert)?,
                client_key: read(key)?,
            }),
            _ => None,
        };
        if root_cert.is_none() && client_tls.is_none() {
            return Ok(None);
        }
        Ok(Some(redis::TlsCertificates {
            client_tls,
            root_cert,
        }))
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            cluster: false,
            sentinel_master: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            stream_maxlen: 100_000,
            audit_retention: Duration::from_secs(90 * 24 * 3600),
            connect_timeout: Duration::from_secs(30),
            run_retention: crate::DEFAULT_RUN_RETENTION,
        }
    }
}

const LOCK_TTL_MS: u64 = 10_000;
const TRIM_EVERY_MS: i64 = 60_000;

/// Key names. On one Redis they start `pw:`; on a Redis Cluster `{pw}:`, one hash tag, so
/// every script and transaction — a run with its indexes, timers and outbox, a step with its
/// results and audit entries — stays in one slot and stays atomic.
#[derive(Debug, Clone, Copy)]
struct Keys {
    prefix: &'static str,
}

impl Keys {
    fn new(cluster: bool) -> Self {
        Self {
            prefix: if cluster { "{pw}" } else { "pw" },
        }
    }

    fn key(&self, rest: impl std::fmt::Display) -> String {
        format!("{}:{rest}", self.prefix)
    }

    /// One entry per step attempt.
    fn results(&self) -> String {
        self.key("results")
    }
    /// Timers of waiting runs: members `run\nflow\nversion\nstep`, scored by due time (ms); a
    /// message on the channel of the same name when one is added.
    fn timers(&self) -> String {
        self.key("timers")
    }
    fn audit(&self) -> String {
        self.key("audit")
    }
    fn flows(&self) -> String {
        self.key("flows")
    }
    fn flows_revision(&self) -> String {
        self.key("flows:revision")
    }
    fn runs(&self) -> String {
        self.key("runs")
    }
    /// Step jobs recorded with a run's creation or retry that are not known to be published:
    /// members `run\nflow\nversion\nstep\nepoch` by when they were recorded (ms).
    fn outbox(&self) -> String {
        self.key("outbox")
    }
    fn connections(&self) -> String {
        self.key("connections")
    }
    /// Hash: connection name → when it was last used (Unix ms).
    fn connections_used(&self) -> String {
        self.key("connections:used")
    }
    fn api_keys(&self) -> String {
        self.key("api-keys")
    }
    fn flow(&self, id: &str) -> String {
        self.key(format_args!("flow:{id}"))
    }
    fn version(&self, id: &str, version: u32) -> String {
        self.key(format_args!("flow:{id}:v:{version}"))
    }
    fn webhook_secret(&self, flow_id: &str) -> String {
        self.key(format_args!("flow:{flow_id}:webhook-secret"))
    }
    /// What every run's key starts with.
    fn run_prefix(&self) -> String {
        self.key("run:")
    }
    fn run(&self, id: &str) -> String {
        self.key(format_args!("run:{id}"))
    }
    fn runs_of_flow(&self, id: &str) -> String {
        self.key(format_args!("runs:flow:{id}"))
    }
    fn connection(&self, name: &str) -> String {
        self.key(format_args!("connection:{name}"))
    }
    fn trigger(&self, flow: &str) -> String {
        self.key(format_args!("trigger:{flow}"))
    }
    /// The hash of debounce group `slot` of `flow_id`.
    fn debounce(&self, flow_id: &str, slot: &str) -> String {
        self.key(format_args!("debounce:{flow_id}:{slot}"))
    }
    fn slots(&self, flow_id: &str) -> String {
        self.key(format_args!("slots:flow:{flow_id}"))
    }
    fn in_flight(&self, limit: &str) -> String {
        self.key(format_args!("inflight:{limit}"))
    }
    fn rate(&self, limit: &str) -> String {
        self.key(format_args!("rate:{limit}"))
    }
    fn lease(&self, name: &str) -> String {
        self.key(format_args!("lease:{name}"))
    }
    fn kv(&self, key: &str) -> String {
        self.key(format_args!("kv:{key}"))
    }
}

fn done_channel(id: &str) -> String {
    format!("{}{id}", crate::run_done::PREFIX)
}

/// The body shared by [`CREATE_RUN`] and [`CREATE_ADMITTED_RUN`]: creates run `KEYS[1]`
/// (meta `ARGV[1]`) only if its hash does not exist (else returns 0), indexes it in `KEYS[2]`
/// and `KEYS[3]` at `ARGV[2]` under `ARGV[3]`, drops index entries created before `ARGV[4]`
/// (ms; `0`: keep all) as their runs have expired, sets the deadline timer `ARGV[5]` due
/// at `ARGV[6]` in `KEYS[4]` when it has one, and puts the jobs in the local `queued`
/// ([`OUTBOX_SEPARATOR`]-separated members) in the outbox `outbox` at `ARGV[2]`.
macro_rules! create_run_lua {
    () => {
        r#"
if redis.call('HSETNX', KEYS[1], 'meta', ARGV[1]) == 0 then return 0 end
for member in string.gmatch(queued, '[^\31]+') do
  redis.call('ZADD', outbox, ARGV[2], member)
end
redis.call('HSET', KEYS[1], 'status', 'running')
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
if ARGV[4] ~= '0' then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[4])
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[4])
end
if ARGV[5] ~= '' then
  redis.call('ZADD', KEYS[4], ARGV[6], ARGV[5])
  redis.call('PUBLISH', KEYS[4], ARGV[6])
end
"#
    };
}

/// Creates a run ([`create_run_lua`]), with outbox `KEYS[5]` and jobs `ARGV[7]`: 1 when
/// created, 0 when it existed.
const CREATE_RUN: &str = concat!(
    "local outbox, queued = KEYS[5], ARGV[7]\n",
    create_run_lua!(),
    "return 1\n"
);

/// Separates the outbox members passed to a script as one argument.
const OUTBOX_SEPARATOR: char = '\x1f';

/// Fails run `KEYS[1]` as timed out if it has not ended (`ARGV[1]` the error, `ARGV[2]` the
/// end as JSON, expiring after `ARGV[3]` ms, `0`: never), tells waiters on `ARGV[4]`, and
/// drops its deadline timer `ARGV[5]` from `KEYS[2]`. 1 if it ended it.
const EXPIRE_RUN: &str = r#"
redis.call('ZREM', KEYS[2], ARGV[5])
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' and status ~= 'waiting' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'failed', 'error', ARGV[1], 'finished_at', ARGV[2])
if ARGV[3] ~= '0' then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
redis.call('PUBLISH', ARGV[4], '{"status":"failed","error":' .. cjson.encode(ARGV[1]) .. '}')
return 1
"#;

/// [`CREATE_RUN`] for an admitted webhook call: only while the flow record (`KEYS[5]`) is
/// enabled at version `ARGV[7]` (-1 otherwise: stale), then the audit entry (fields from
/// `ARGV[10]` on) appended to `KEYS[6]`, capped at `ARGV[8]`; outbox `KEYS[7]`, jobs `ARGV[9]`.
const CREATE_ADMITTED_RUN: &str = concat!(
    r#"
local outbox, queued = KEYS[7], ARGV[9]
local text = redis.call('GET', KEYS[5])
if not text then return -1 end
local flow = cjson.decode(text)
if flow.enabled ~= true or tonumber(flow.latest_version) ~= tonumber(ARGV[7]) then return -1 end
"#,
    create_run_lua!(),
    r#"
if #ARGV > 9 then
  local fields = {}
  for i = 10, #ARGV do fields[#fields + 1] = ARGV[i] end
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[8], '*', unpack(fields))
end
return 1
"#
);

/// Cancels a run only while it is running or waiting, to expire after `ARGV[3]` ms (`0`:
/// never). 0: no such run, 1: cancelled, 2: not running.
const CANCEL_RUN: &str = r#"
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 0 end
if status ~= 'running' and status ~= 'waiting' then return 2 end
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1])
if ARGV[3] ~= '0' then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
redis.call('PUBLISH', ARGV[2], '{"status":"cancelled"}')
return 1
"#;

/// Resumes a failed run with its failed step reset, its jobs (`ARGV[4]` on) put in the
/// outbox `KEYS[2]` at `ARGV[3]` ms. 0: no such run, 1: resumed, 2: not failed.
const RESUME_RUN: &str = r#"
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 0 end
if status ~= 'failed' then return 2 end
redis.call('HSET', KEYS[1], 'status', 'running', 'error', '', ARGV[1], ARGV[2])
redis.call('HDEL', KEYS[1], 'finished_at')
redis.call('PERSIST', KEYS[1])
for i = 4, #ARGV do redis.call('ZADD', KEYS[2], ARGV[3], ARGV[i]) end
return 1
"#;

/// Inside a step update's `MULTI`: the run `KEYS[1]` waits, if it is still running, with
/// timer `ARGV[1]` (none when empty) due at `ARGV[2]` ms in `KEYS[2]`, announced on the
/// channel `KEYS[2]`.
const START_WAIT: &str = r#"
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'waiting')
if ARGV[1] ~= '' then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
  redis.call('PUBLISH', KEYS[2], ARGV[2])
end
return 1
"#;

/// Claims the wake of step field `ARGV[2]` of run `KEYS[1]` and drops its timer `ARGV[1]`
/// from `KEYS[2]`: 1 when the run was waiting, or was claimed before but its step is still
/// waiting (the claimer died before recording it); else 0.
const CLAIM_WAKE: &str = r#"
local status = redis.call('HGET', KEYS[1], 'status')
local claimed = status == 'waiting'
if not claimed and status == 'running' then
  local step = redis.call('HGET', KEYS[1], ARGV[2])
  claimed = step ~= false and cjson.decode(step).status == 'waiting'
end
if not claimed then return 0 end
redis.call('HSET', KEYS[1], 'status', 'running')
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"#;

/// Resumes run `KEYS[1]` waiting on step field `ARGV[1]`: records the step `ARGV[2]`, drops
/// its timer `ARGV[3]` from `KEYS[2]`, appends the result (fields `ARGV[5..]`, stream capped
/// at `ARGV[4]`) to `KEYS[3]`. 0: no such run, 1: resumed, 2: not waiting on that step.
const RESUME_WAITING: &str = r#"
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 0 end
if status ~= 'waiting' then return 2 end
local step = redis.call('HGET', KEYS[1], ARGV[1])
if not step or cjson.decode(step).status ~= 'waiting' then return 2 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], 'status', 'running')
redis.call('ZREM', KEYS[2], ARGV[3])
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', unpack(fields))
return 1
"#;

/// Takes the timers of `KEYS[1]` due at `ARGV[1]` ms, at most `ARGV[2]`, pushing each back by
/// `ARGV[3]` ms; returns members and scores.
const TAKE_TIMERS: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, ARGV[2])
for i = 1, #due, 2 do
  redis.call('ZADD', KEYS[1], 'XX', tonumber(ARGV[1]) + tonumber(ARGV[3]), due[i])
end
return due
"#;

/// Bumps `sender` on every message on `pw:timers`, resubscribing when the subscription drops,
/// until every receiver is gone.
async fn listen_timers(
    nodes: PubSubNodes,
    channel: String,
    sender: tokio::sync::watch::Sender<u64>,
) {
    use futures::StreamExt as _;
    while !sender.is_closed() {
        match nodes.connect().await {
            Ok(mut pubsub) => {
                if pubsub.subscribe(&channel).await.is_ok() {
                    // Timers added while unsubscribed: have the watchers look.
                    sender.send_modify(|n| *n += 1);
                    let mut messages = pubsub.on_message();
                    while messages.next().await.is_some() {
                        sender.send_modify(|n| *n += 1);
                    }
                }
            }
            Err(err) => tracing::debug!(error = %err, "timer notifications unavailable"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Reserves a start under the rate limit `KEYS[1]` (starts spaced `ARGV[1]` µs apart) on the
/// server's clock; returns the wait in µs.
const RESERVE_RATE: &str = r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local interval = tonumber(ARGV[1])
local next_start = tonumber(redis.call('GET', KEYS[1]) or '0')
local start = math.max(next_start, now)
redis.call('SET', KEYS[1], string.format('%d', start + interval), 'PX', math.ceil((start + interval - now) / 1000) + 1000)
return start - now
"#;

/// The member of a run's deadline timer (its step is empty), or `""` for a run without one.
fn deadline_member(run: &Run) -> String {
    if run.deadline.is_some() {
        timer_member(&run.id, &run.flow_id, run.flow_version, "")
    } else {
        String::new()
    }
}

/// Takes a run slot of `KEYS[1]` (a sorted set of run ids) for run `ARGV[1]` if fewer than
/// `ARGV[2]` of its members are still running or waiting (run hashes `ARGV[3]` + id); members
/// whose run ended are dropped on the way. 1: taken (or held already), 0: full.
const ACQUIRE_RUN_SLOT: &str = r#"
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 1 end
local live = 0
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local status = redis.call('HGET', ARGV[3] .. member, 'status')
  if status == 'running' or status == 'waiting' then
    live = live + 1
  else
    redis.call('ZREM', KEYS[1], member)
  end
end
if live >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
return 1
"#;

/// Holds item `ARGV[1]` (id `ARGV[2]`, meta `ARGV[3]`) as the last of debounce group
/// `KEYS[1]` at `ARGV[4]` ms: due `ARGV[5]` ms later, at most `ARGV[6]` ms after the group's
/// first item; sets its timer `ARGV[7]` in `KEYS[2]` (and announces it); the group expires
/// `ARGV[8]` ms after it is due. Returns when it is due.
const HOLD_ITEM: &str = r#"
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], 'item_id') == ARGV[2] then
  return tonumber(redis.call('HGET', KEYS[1], 'due_ms'))
end
local now = tonumber(ARGV[4])
local first = tonumber(redis.call('HGET', KEYS[1], 'first_ms') or ARGV[4])
local due = math.min(now + tonumber(ARGV[5]), first + tonumber(ARGV[6]))
redis.call('HSET', KEYS[1], 'item', ARGV[1], 'item_id', ARGV[2], 'meta', ARGV[3],
  'first_ms', string.format('%d', first), 'due_ms', string.format('%d', due))
redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('PEXPIRE', KEYS[1], due - now + tonumber(ARGV[8]))
redis.call('ZADD', KEYS[2], due, ARGV[7])
redis.call('PUBLISH', KEYS[2], string.format('%d', due))
return due
"#;

/// Ends debounce group `KEYS[1]` if it is still at item `ARGV[1]`, with its timer `ARGV[2]`
/// in `KEYS[2]` (also when the group is gone).
const RELEASE_ITEM: &str = r#"
local seq = redis.call('HGET', KEYS[1], 'seq')
if seq == false or seq == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[2])
end
return 0
"#;

/// Sets field `ARGV[1]` of run `KEYS[1]` to `ARGV[2]` if the run exists.
const MARK_IN_FLIGHT: &str = r#"
if redis.call('HEXISTS', KEYS[1], 'meta') == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"#;

/// Counts the end of lane `ARGV[2]` of a loop in run hash `KEYS[1]`, as field `ARGV[1]<lane>`
/// (so the count goes with the run), and answers how many of lanes `0..ARGV[3]` ended; 0 for
/// a run that no longer exists.
const JOIN_LANE: &str = r#"
if redis.call('HEXISTS', KEYS[1], 'meta') == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1] .. ARGV[2], '1')
local ended = 0
for lane = 0, tonumber(ARGV[3]) - 1 do
  ended = ended + redis.call('HEXISTS', KEYS[1], ARGV[1] .. lane)
end
return ended
"#;

/// Takes an in-flight place of `KEYS[1]` (holders scored by lease end, ms on the server's
/// clock) for `ARGV[1]` if fewer than `ARGV[2]` unexpired holders have one; the lease lasts
/// `ARGV[3]` ms. 1: taken (or held), 0: full.
const ACQUIRE_IN_FLIGHT: &str = r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local lease_end = now + tonumber(ARGV[3])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], lease_end, ARGV[1])
  return 1
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], lease_end, ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) + 1000)
return 1
"#;

/// A run's status as stored (a run without one is running).
fn parse_status(key: &str, status: Option<&str>) -> Result<RunStatus, StoreError> {
    status
        .unwrap_or("running")
        .parse::<RunStatus>()
        .map_err(|e| corrupt(key, e))
}

/// The run ids a [`RunQuery`] walks, newest first (ties by id descending), a page at a time:
/// the flow's index or all runs', between `since` and `until`, after the cursor.
struct IndexPages {
    index: String,
    /// The newest score still to read (inclusive), and the lowest.
    max: String,
    min: String,
    /// Members with the score of the cursor that are not after it are skipped.
    after: Option<RunCursor>,
    offset: usize,
    page: usize,
}

impl IndexPages {
    fn new(keys: Keys, query: &RunQuery, page: usize) -> Self {
        let until = query.until.map(|t| t.timestamp_millis());
        let max = match (&query.after, until) {
            (Some(after), Some(until)) if until <= after.created_ms => format!("({until}"),
            (Some(after), _) => after.created_ms.to_string(),
            (None, Some(until)) => format!("({until}"),
            (None, None) => "+inf".to_owned(),
        };
        Self {
            index: query
                .flow_id
                .as_deref()
                .map_or_else(|| keys.runs(), |id| keys.runs_of_flow(id)),
            max,
            min: query
                .since
                .map_or_else(|| "-inf".to_owned(), |t| t.timestamp_millis().to_string()),
            after: query.after.clone(),
            offset: 0,
            page,
        }
    }

    /// The next page's ids (empty at the end).
    async fn next(&mut self, conn: &mut Connection) -> Result<Vec<String>, StoreError> {
        loop {
            let rows: Vec<(String, f64)> = redis::cmd("ZREVRANGEBYSCORE")
                .arg(&self.index)
                .arg(&self.max)
                .arg(&self.min)
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(self.offset)
                .arg(self.page)
                .query_async(conn)
                .await
                .map_err(unavailable)?;
            if rows.is_empty() {
                return Ok(Vec::new());
            }
            self.offset += rows.len();
            #[allow(clippy::cast_possible_truncation)]
            let ids: Vec<String> = rows
                .into_iter()
                .filter(|(id, score)| {
                    self.after
                        .as_ref()
                        .is_none_or(|after| after.precedes(*score as i64, id))
                })
                .map(|(id, _)| id)
                .collect();
            if !ids.is_empty() {
                return Ok(ids);
            }
        }
    }
}

/// A timer's member in `pw:timers`.
fn timer_member(run_id: &str, flow_id: &str, flow_version: u32, step: &str) -> String {
    format!("{run_id}\n{flow_id}\n{flow_version}\n{step}")
}

/// An outbox member: `run\nflow\nversion\nstep\nepoch`.
fn outbox_member(job: &OutboxJob) -> String {
    format!(
        "{}\n{}\n{}\n{}\n{}",
        job.run_id, job.flow_id, job.flow_version, job.step, job.epoch
    )
}

/// Several outbox members as one script argument.
fn outbox_members(jobs: &[OutboxJob]) -> String {
    let members: Vec<String> = jobs.iter().map(outbox_member).collect();
    members.join(&OUTBOX_SEPARATOR.to_string())
}

fn outbox_job(member: &str) -> Option<OutboxJob> {
    let mut parts = member.splitn(4, '\n');
    let (run_id, flow_id, version, rest) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let (step, epoch) = rest.rsplit_once('\n')?;
    Some(OutboxJob {
        run_id: run_id.to_owned(),
        flow_id: flow_id.to_owned(),
        flow_version: version.parse().ok()?,
        step: step.to_owned(),
        epoch: epoch.parse().ok()?,
    })
}

fn timer_from(member: &str, due_ms: f64) -> Option<Timer> {
    let mut parts = member.splitn(4, '\n');
    let (run_id, flow_id, version, step) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    #[allow(clippy::cast_possible_truncation)]
    let due = DateTime::from_timestamp_millis(due_ms as i64)?;
    Some(Timer {
        run_id: run_id.to_owned(),
        flow_id: flow_id.to_owned(),
        flow_version: version.parse().ok()?,
        step: step.to_owned(),
        due,
    })
}

/// Replaces a JSON string record whose field `ARGV[1]` still equals `ARGV[2]` by `ARGV[3]`.
const SWAP_RECORD: &str = r#"
local text = redis.call('GET', KEYS[1])
if not text then return 0 end
if cjson.decode(text)[ARGV[1]] ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[3])
return 1
"#;

/// Replaces a string that still equals `ARGV[1]` by `ARGV[2]`.
const SWAP_STRING: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"#;

/// Replaces hash field `ARGV[1]`'s JSON record whose field `ARGV[2]` still equals `ARGV[3]`
/// by `ARGV[4]`.
const SWAP_HASH_RECORD: &str = r#"
local text = redis.call('HGET', KEYS[1], ARGV[1])
if not text then return 0 end
if cjson.decode(text)[ARGV[2]] ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
return 1
"#;

/// Deletes a lock only if we still hold it.
const UNLOCK: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// The Redis [`Store`].
#[derive(Clone)]
pub struct RedisStore {
    keys: Keys,
    conn: Connection,
    /// For blocking reads only.
    blocking: Arc<Mutex<Connection>>,
    config: RedisConfig,
    create_run: Arc<Script>,
    create_admitted_run: Arc<Script>,
    cancel_run: Arc<Script>,
    resume_run: Arc<Script>,
    claim_wake: Arc<Script>,
    reserve_rate: Arc<Script>,
    expire_run: Arc<Script>,
    acquire_run_slot: Arc<Script>,
    join_lane: Arc<Script>,
    mark_in_flight: Arc<Script>,
    hold_item: Arc<Script>,
    release_item: Arc<Script>,
    acquire_in_flight: Arc<Script>,
    resume_waiting: Arc<Script>,
    take_timers: Arc<Script>,
    /// Timer notifications, subscribed on the first `watch_timers`.
    timers: Arc<tokio::sync::OnceCell<tokio::sync::watch::Sender<u64>>>,
    /// Where subscriptions go.
    pubsub: PubSubNodes,
    unlock: Arc<Script>,
    /// Run-finished notifications, subscribed on the first `wait_run_finished`.
    done: Arc<RunDone>,
    /// When this process last trimmed `pw:results` and `pw:audit` by age (ms since the epoch).
    results_trimmed_at: Arc<std::sync::atomic::AtomicI64>,
    audit_trimmed_at: Arc<std::sync::atomic::AtomicI64>,
    /// Writes step updates, many per round trip under load.
    steps: GroupCommit,
}

fn unavailable(err: redis::RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis: {err}"))
}

fn corrupt(key: &str, err: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key: key.to_owned(),
        message: err.to_string(),
    }
}

fn to_json(value: &impl Serialize) -> String {
    serde_json::to_string(value).expect("store records serialize")
}

fn from_json<T: DeserializeOwned>(key: &str, text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| corrupt(key, e))
}

/// The immutable part of `run`, as stored in `meta`.
fn run_meta(run: &Run) -> RunMeta {
    RunMeta {
        id: run.id.clone(),
        flow_id: run.flow_id.clone(),
        flow_version: run.flow_version,
        trigger: run.trigger.clone(),
        created_at: run.created_at,
        trace: run.trace.clone(),
        started_by: run.started_by.clone(),
        deadline: run.deadline,
        parent: run.parent.clone(),
        depth: run.depth,
    }
}

/// The immutable part of a run, stored once in `meta`.
#[derive(Serialize, Deserialize)]
struct RunMeta {
    id: String,
    flow_id: String,
    flow_version: u32,
    trigger: Value,
    created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    trace: Option<String>,
    #[serde(default)]
    started_by: piecework_sdk::Principal,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    deadline: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parent: Option<piecework_core::run::ParentStep>,
    #[serde(default)]
    depth: u32,
}

/// A client of the Sentinels at `nodes` for the primary they call `master`, with the first
/// URL's credentials (and the configured certificates) for the Sentinels and the servers.
fn sentinel_client(
    nodes: &[redis::ConnectionInfo],
    master: &str,
    certificates: Option<&redis::TlsCertificates>,
) -> redis::RedisResult<redis::sentinel::SentinelClient> {
    use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
    let first = &nodes[0];
    let nodelay = redis::io::tcp::TcpSettings::default().set_nodelay(true);
    let mut builder = SentinelClientBuilder::new(
        nodes.iter().map(|node| node.addr().clone()),
        master,
        SentinelServerType::Master,
    )?
    .set_client_to_redis_tcp_settings(nodelay.clone())
    .set_client_to_sentinel_tcp_settings(nodelay);
    let settings = first.redis_settings();
    if let Some(username) = settings.username() {
        builder = builder
            .set_client_to_redis_username(username)
            .set_client_to_sentinel_username(username);
    }
    if let Some(password) = settings.password() {
        builder = builder
            .set_client_to_redis_password(password)
            .set_client_to_sentinel_password(password);
    }
    if matches!(first.addr(), redis::ConnectionAddr::TcpTls { .. }) {
        builder = builder
            .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
            .set_client_to_sentinel_tls_mode(redis::TlsMode::Secure);
    }
    if let Some(certificates) = certificates {
        builder = builder
            .set_client_to_redis_certificates(certificates.clone())
            .set_client_to_sentinel_certificates(certificates.clone());
    }
    builder.build()
}

impl RedisStore {
    /// Connects (retrying for up to `connect_timeout`).
    pub async fn connect(config: RedisConfig) -> Result<Self, StoreError> {
        piecework_sdk::http::install_crypto_provider();
        let invalid = |e: redis::RedisError| {
            StoreError::Unavailable(format!(
                "invalid Redis URL {:?}: {e}",
                piecework_sdk::mask::redact_url(&config.url)
            ))
        };
        // redis-rs leaves Nagle's algorithm on; every round trip here is a small request that
        // waits for its answer, so send at once (TCP_NODELAY), as other Redis clients do.
        let nodes = config
            .url
            .split(',')
            .map(|url| {
                redis::IntoConnectionInfo::into_connection_info(url.trim()).map(|info| {
                    info.set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true))
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        if config.cluster && config.sentinel_master.is_some() {
            return Err(StoreError::Unavailable(
                "`cluster` and `sentinel_master` exclude each other: a Redis Cluster fails over by itself".into(),
            ));
        }
        if nodes.len() > 1 && !config.cluster && config.sentinel_master.is_none() {
            return Err(StoreError::Unavailable(format!(
                "{} lists {} Redis servers: set `cluster = true` (PW_REDIS_CLUSTER) for a Redis Cluster, or `sentinel_master` (PW_REDIS_SENTINEL_MASTER) for Sentinels",
                piecework_sdk::mask::redact_url(&config.url),
                nodes.len()
            )));
        }
        let certificates = config.tls_certificates()?;
        let clients = nodes
            .iter()
            .map(|node| match &certificates {
                Some(certificates) => {
                    redis::Client::build_with_tls(node.clone(), certificates.clone())
                }
                None => redis::Client::open(node.clone()),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        let client = clients[0].clone();
        let sentinels = match &config.sentinel_master {
            Some(master) => Some(Arc::new(tokio::sync::Mutex::new(
                sentinel_client(&nodes, master, certificates.as_ref()).map_err(invalid)?,
            ))),
            None => None,
        };
        let pubsub = match &sentinels {
            Some(sentinels) => PubSubNodes::Sentinel(sentinels.clone()),
            None => PubSubNodes::new(clients),
        };
        let connect = |response_timeout: Option<Duration>| {
            let (client, nodes, certificates) =
                (client.clone(), nodes.clone(), certificates.clone());
            let sentinels = sentinels.clone();
            async move {
                if let Some(sentinels) = sentinels {
                    SentinelConnection::connect(sentinels, response_timeout)
                        .await
                        .map(Connection::Sentinel)
                } else if config.cluster {
                    let mut builder = redis::cluster::ClusterClientBuilder::new(nodes)
                        .connection_timeout(Duration::from_secs(5))
                        .retries(2);
                    if let Some(timeout) = response_timeout {
                        builder = builder.response_timeout(timeout);
                    }
                    if let Some(certificates) = certificates {
                        builder = builder.certs(certificates);
                    }
                    let cluster = builder.build()?;
                    Ok(Connection::Cluster(cluster.get_async_connection().await?))
                } else {
                    let managed = ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(Duration::from_secs(5)))
                        .set_response_timeout(response_timeout)
                        .set_number_of_retries(2);
                    ConnectionManager::new_with_config(client, managed)
                        .await
                        .map(Connection::One)
                }
            }
        };
        let deadline = tokio::time::Instant::now() + config.connect_timeout;
        let mut delay = Duration::from_millis(100);
        let conn = loop {
            match connect(Some(Duration::from_secs(10))).await {
                Ok(conn) => break conn,
                Err(err) if tokio::time::Instant::now() + delay < deadline => {
                    tracing::warn!(error = %err, retry_in = ?delay, "cannot reach Redis yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(err) => {
                    return Err(StoreError::Unavailable(format!(
                        "cannot connect to Redis: {err}"
                    )));
                }
            }
        };
        // For blocking reads only: no response timeout.
        let blocking = connect(None).await.map_err(unavailable)?;
        Ok(Self {
            keys: Keys::new(config.cluster),
            done: Arc::new(RunDone::new(pubsub.clone())),
            pubsub,
            claim_wake: Arc::new(Script::new(CLAIM_WAKE)),
            reserve_rate: Arc::new(Script::new(RESERVE_RATE)),
            expire_run: Arc::new(Script::new(EXPIRE_RUN)),
            acquire_run_slot: Arc::new(Script::new(ACQUIRE_RUN_SLOT)),
            join_lane: Arc::new(Script::new(JOIN_LANE)),
            mark_in_flight: Arc::new(Script::new(MARK_IN_FLIGHT)),
            hold_item: Arc::new(Script::new(HOLD_ITEM)),
            release_item: Arc::new(Script::new(RELEASE_ITEM)),
            acquire_in_flight: Arc::new(Script::new(ACQUIRE_IN_FLIGHT)),
            resume_waiting: Arc::new(Script::new(RESUME_WAITING)),
            take_timers: Arc::new(Script::new(TAKE_TIMERS)),
            timers: Arc::default(),
            results_trimmed_at: Arc::new(std::sync::atomic::AtomicI64::new(0)),
            audit_trimmed_at: Arc::new(std::sync::atomic::AtomicI64::new(0)),
            steps: GroupCommit::start(conn.clone()),
            conn,
            blocking: Arc::new(Mutex::new(blocking)),
            config,
            create_run: Arc::new(Script::new(CREATE_RUN)),
            create_admitted_run: Arc::new(Script::new(CREATE_ADMITTED_RUN)),
            cancel_run: Arc::new(Script::new(CANCEL_RUN)),
            resume_run: Arc::new(Script::new(RESUME_RUN)),
            unlock: Arc::new(Script::new(UNLOCK)),
        })
    }

    fn conn(&self) -> Connection {
        self.conn.clone()
    }

    /// Whether this step update should also trim `pw:results` (and `pw:audit`) by age: at most
    /// once a minute per process, so the hot path rarely pays for it.
    fn results_trim_due(&self) -> bool {
        trim_due(&self.results_trimmed_at)
    }

    /// Runs `work` holding the flow's lock, so concurrent applies of one flow serialize.
    async fn with_flow_lock<T>(
        &self,
        id: &str,
        work: impl AsyncFnOnce(&Self) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let key = format!("{}:lock", self.keys.flow(id));
        let token = uuid::Uuid::new_v4().to_string();
        let mut conn = self.conn();
        let mut acquired = false;
        for _ in 0..50 {
            let set: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(LOCK_TTL_MS)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if set.is_some() {
                acquired = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !acquired {
            return Err(StoreError::Conflict(format!(
                "flow `{id}` is being changed by someone else; try again"
            )));
        }
        let result = work(self).await;
        let _: Result<i64, _> = self
            .unlock
            .key(&key)
            .arg(&token)
            .invoke_async(&mut conn)
            .await;
        result
    }

    async fn read_flow(&self, id: &str) -> Result<Option<FlowRecord>, StoreError> {
        let key = self.keys.flow(id);
        let text: Option<String> = self.conn().get(&key).await.map_err(unavailable)?;
        text.map(|t| from_json(&key, &t)).transpose()
    }

    /// Every record whose name is in the set `index`, sorted by name, in two round trips.
    async fn read_indexed<T: DeserializeOwned>(
        &self,
        index: &str,
        key_of: impl Fn(&str) -> String,
    ) -> Result<Vec<T>, StoreError> {
        let mut conn = self.conn();
        let mut names: Vec<String> = conn.smembers(index).await.map_err(unavailable)?;
        if names.is_empty() {
            return Ok(Vec::new());
        }
        names.sort();
        let keys: Vec<String> = names.iter().map(|name| key_of(name)).collect();
        let texts: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        keys.iter()
            .zip(texts)
            .filter_map(|(key, text)| text.map(|t| from_json(key, &t)))
            .collect()
    }

    fn run_from_hash(
        &self,
        id: &str,
        fields: HashMap<String, String>,
    ) -> Result<Option<Run>, StoreError> {
        let key = self.keys.run(id);
        let Some(meta) = fields.get("meta") else {
            return Ok(None);
        };
        let meta: RunMeta = from_json(&key, meta)?;
        let status = match fields.get("status") {
            Some(s) => s.parse::<RunStatus>().map_err(|e| corrupt(&key, e))?,
            None => RunStatus::Running,
        };
        let mut steps: Vec<StepState> = fields
            .iter()
            .filter(|(k, _)| k.starts_with("step:"))
            .map(|(_, v)| from_json(&key, v))
            .collect::<Result<_, _>>()?;
        steps.sort_by(|a, b| {
            let first = |s: &StepState| s.attempts.first().map(|a| a.started_at);
            first(a).cmp(&first(b)).then_with(|| a.name.cmp(&b.name))
        });
        // Marks of attempts in flight; a run that ended has none left to speak of.
        let mut in_flight: Vec<InFlight> = if status.is_terminal() {
            Vec::new()
        } else {
            fields
                .iter()
                .filter(|(k, _)| k.starts_with("inflight:"))
                .map(|(_, v)| from_json(&key, v))
                .collect::<Result<_, _>>()?
        };
        in_flight.sort_by(|a, b| a.step.cmp(&b.step));
        Ok(Some(Run {
            id: meta.id,
            flow_id: meta.flow_id,
            flow_version: meta.flow_version,
            status,
            trigger: meta.trigger,
            steps,
            created_at: meta.created_at,
            trace: meta.trace,
            started_by: meta.started_by,
            deadline: meta.deadline,
            resume_url: None,
            parent: meta.parent,
            depth: meta.depth,
            in_flight,
            finished_at: fields
                .get("finished_at")
                .map(|t| from_json(&key, t))
                .transpose()?,
            error: fields.get("error").filter(|e| !e.is_empty()).cloned(),
            response: fields
                .get("response")
                .map(|r| from_json(&key, r))
                .transpose()?,
        }))
    }
}

/// Ends a run only while it is running, so a cancel is never overwritten by the step that was
/// in flight; a finished run expires after `ARGV[4]` ms (`0`: never). Then tells waiters on
/// channel `ARGV[5]` how it ended (a `RunEnded` as JSON: status, error, the run's response, the
/// last step's output `ARGV[6]`), so they need not read the run.
const FINISH_RUN: &str = r#"
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'error', ARGV[2])
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[3])
  if ARGV[4] ~= '0' then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
end
local ended = '{"status":' .. cjson.encode(ARGV[1])
if ARGV[2] ~= '' then ended = ended .. ',"error":' .. cjson.encode(ARGV[2]) end
local response = redis.call('HGET', KEYS[1], 'response')
if response then ended = ended .. ',"response":' .. response end
if ARGV[6] ~= '' then ended = ended .. ',"output":' .. ARGV[6] end
redis.call('PUBLISH', ARGV[5], ended .. '}')
return 1
"#;

/// Whether a trim that runs at most once a minute per process is due now (and claims it).
fn trim_due(last: &std::sync::atomic::AtomicI64) -> bool {
    use std::sync::atomic::Ordering;
    let now = Utc::now().timestamp_millis();
    let previous = last.load(Ordering::Relaxed);
    now - previous >= TRIM_EVERY_MS
        && last
            .compare_exchange(previous, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// The command that ends run `run_id` (inside a `MULTI`) and tells its waiters, with the last
/// step's `output`.
fn finish_run(
    keys: Keys,
    run_id: &str,
    update: &RunUpdate,
    retention: Duration,
    output: Option<&Value>,
) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(FINISH_RUN)
        .arg(1)
        .arg(keys.run(run_id))
        .arg(update.status.as_str())
        .arg(update.error.clone().unwrap_or_default())
        .arg(update.finished_at.map(|f| to_json(&f)).unwrap_or_default())
        .arg(millis(retention))
        .arg(done_channel(run_id))
        .arg(output.map(to_json).unwrap_or_default());
    cmd
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The oldest time (ms since the epoch) something kept for `retention` may have; `0` when
/// `retention` is zero (keep everything).
fn cutoff(retention: Duration) -> i64 {
    if retention.is_zero() {
        return 0;
    }
    (Utc::now().timestamp_millis() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX))
        .max(1)
}

/// A status as written to the streams: the protobuf name without its prefix, lowercased
/// (`STEP_STATUS_SUCCEEDED` → `succeeded`).
fn status_name(proto_name: &str, prefix: &str) -> String {
    proto_name
        .strip_prefix(prefix)
        .unwrap_or(proto_name)
        .to_ascii_lowercase()
}

fn step_status_name(status: i32) -> String {
    let status = v1::StepStatus::try_from(status).unwrap_or(v1::StepStatus::Unspecified);
    status_name(status.as_str_name(), "STEP_STATUS_")
}

fn step_status_from(name: &str) -> v1::StepStatus {
    v1::StepStatus::from_str_name(&format!("STEP_STATUS_{}", name.to_ascii_uppercase()))
        .unwrap_or_default()
}

fn run_status_name(status: i32) -> String {
    let status = v1::RunStatus::try_from(status).unwrap_or(v1::RunStatus::Unspecified);
    status_name(status.as_str_name(), "RUN_STATUS_")
}

fn run_status_from(name: &str) -> v1::RunStatus {
    v1::RunStatus::from_str_name(&format!("RUN_STATUS_{}", name.to_ascii_uppercase()))
        .unwrap_or_default()
}

/// `XADD <stream> MAXLEN ~ <maxlen> * <fields…>`: appends and caps the stream.
fn xadd(stream: &str, maxlen: usize, fields: Vec<(&'static str, String)>) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream)
        .arg("MAXLEN")
        .arg("~")
        .arg(maxlen)
        .arg("*")
        .arg(fields);
    cmd
}

fn result_fields(r: &StepResult) -> Vec<(&'static str, String)> {
    let mut fields = vec![
        ("run", r.run_id.clone()),
        ("flow", r.flow_id.clone()),
        ("flow_version", r.flow_version.to_string()),
        ("step", r.step.clone()),
        ("piece", r.piece.clone()),
        ("action", r.action.clone()),
        ("version", r.version.clone()),
        ("attempt", r.attempt.to_string()),
        ("status", step_status_name(r.status)),
        ("duration_ms", r.duration_ms.to_string()),
        ("error", r.error.clone()),
        ("run_status", run_status_name(r.run_status)),
        ("finished_ms", r.finished_unix_ms.to_string()),
    ];
    if !r.branch.is_empty() {
        fields.push(("branch", r.branch.clone()));
    }
    fields
}

fn field<T: std::str::FromStr + Default>(entry: &StreamId, name: &str) -> T {
    entry
        .get::<String>(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or_default()
}

fn result_from(entry: &StreamId) -> StepResult {
    StepResult {
        run_id: field(entry, "run"),
        flow_id: field(entry, "flow"),
        flow_version: field(entry, "flow_version"),
        step: field(entry, "step"),
        piece: field(entry, "piece"),
        action: field(entry, "action"),
        version: field(entry, "version"),
        attempt: field(entry, "attempt"),
        status: step_status_from(&field::<String>(entry, "status")) as i32,
        duration_ms: field(entry, "duration_ms"),
        error: field(entry, "error"),
        run_status: run_status_from(&field::<String>(entry, "run_status")) as i32,
        finished_unix_ms: field(entry, "finished_ms"),
        branch: field(entry, "branch"),
    }
}

fn audit_fields(e: &AuditEvent) -> Vec<(&'static str, String)> {
    vec![
        ("actor", e.actor.clone()),
        ("action", e.action.clone()),
        ("resource", e.resource.clone()),
        ("outcome", e.outcome.clone()),
        ("time_ms", e.time_unix_ms.to_string()),
        ("duration_ms", e.duration_ms.to_string()),
        ("error", e.error.clone()),
    ]
}

fn audit_from(entry: &StreamId) -> AuditEvent {
    AuditEvent {
        actor: field(entry, "actor"),
        action: field(entry, "action"),
        resource: field(entry, "resource"),
        outcome: field(entry, "outcome"),
        time_unix_ms: field(entry, "time_ms"),
        duration_ms: field(entry, "duration_ms"),
        error: field(entry, "error"),
    }
}

/// Stream ids are exclusive lower bounds for XREAD; for XRANGE, `(id` is the exclusive form.
fn exclusive(after: Option<&str>) -> String {
    after.map_or_else(|| "-".to_owned(), |id| format!("({id}"))
}

#[async_trait]
impl Store for RedisStore {
    async fn apply_flow(&self, flow: ValidFlow) -> Result<Applied, StoreError> {
        let id = flow.definition.name.clone();
        self.with_flow_lock(&id, async |store| {
            let now = Utc::now();
            let mut conn = store.conn();
            let record = store.read_flow(&id).await?;
            let latest = record.as_ref().map_or(0, |r| r.latest_version);
            let unchanged = match latest {
                0 => false,
                n => match store.get_flow_version(&id, n).await? {
                    Some(v) => v.definition == flow.definition && v.resolved == flow.resolved,
                    None => false,
                },
            };
            let version = if unchanged { latest } else { latest + 1 };
            let enabled = crate::enabled_after_apply(record.as_ref(), &flow.definition, unchanged);
            let record = FlowRecord {
                id: id.clone(),
                latest_version: version,
                enabled,
                owner: flow.definition.owner.clone(),
                description: flow.definition.description.clone(),
                created_at: record.map_or(now, |r| r.created_at),
                updated_at: now,
            };
            let mut pipe = redis::pipe();
            pipe.atomic();
            if !unchanged {
                let stored = FlowVersion {
                    flow_id: id.clone(),
                    version,
                    definition: flow.definition,
                    resolved: flow.resolved,
                    created_at: now,
                };
                pipe.cmd("SET")
                    .arg(self.keys.version(&id, version))
                    .arg(to_json(&stored))
                    .ignore();
            }
            pipe.cmd("SET")
                .arg(self.keys.flow(&id))
                .arg(to_json(&record))
                .ignore();
            pipe.cmd("SADD").arg(self.keys.flows()).arg(&id).ignore();
            pipe.cmd("INCR").arg(self.keys.flows_revision()).ignore();
            let () = pipe.query_async(&mut conn).await.map_err(unavailable)?;
            Ok(Applied {
                record,
                version,
                created: !unchanged,
            })
        })
        .await
    }

    async fn get_flow(&self, id: &str) -> Result<Option<FlowRecord>, StoreError> {
        self.read_flow(id).await
    }

    async fn flows_revision(&self) -> Result<u64, StoreError> {
        let revision: Option<u64> = self
            .conn()
            .get(self.keys.flows_revision())
            .await
            .map_err(unavailable)?;
        Ok(revision.unwrap_or(0))
    }

    async fn list_flows(&self) -> Result<Vec<FlowRecord>, StoreError> {
        self.read_indexed(&self.keys.flows(), |id| self.keys.flow(id))
            .await
    }

    async fn get_flow_version(
        &self,
        id: &str,
        version: u32,
    ) -> Result<Option<FlowVersion>, StoreError> {
        let key = self.keys.version(id, version);
        let text: Option<String> = self.conn().get(&key).await.map_err(unavailable)?;
        text.map(|t| from_json(&key, &t)).transpose()
    }

    async fn set_flow_enabled(
        &self,
        id: &str,
        enabled: bool,
    ) -> Result<Option<FlowRecord>, StoreError> {
        self.with_flow_lock(id, async |store| {
            let Some(mut record) = store.read_flow(id).await? else {
                return Ok(None);
            };
            record.enabled = enabled;
            record.updated_at = Utc::now();
            let () = redis::pipe()
                .atomic()
                .cmd("SET")
                .arg(self.keys.flow(id))
                .arg(to_json(&record))
                .ignore()
                .cmd("INCR")
                .arg(self.keys.flows_revision())
                .ignore()
                .query_async(&mut store.conn())
                .await
                .map_err(unavailable)?;
            Ok(Some(record))
        })
        .await
    }

    async fn create_run_queued(&self, run: &Run, jobs: &[OutboxJob]) -> Result<bool, StoreError> {
        let created: i64 = self
            .create_run
            .key(self.keys.run(&run.id))
            .key(self.keys.runs())
            .key(self.keys.runs_of_flow(&run.flow_id))
            .key(self.keys.timers())
            .key(self.keys.outbox())
            .arg(to_json(&run_meta(run)))
            .arg(run.created_at.timestamp_millis())
            .arg(&run.id)
            .arg(cutoff(self.config.run_retention))
            .arg(deadline_member(run))
            .arg(run.deadline.map_or(0, |d| d.timestamp_millis()))
            .arg(outbox_members(jobs))
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(created == 1)
    }

    async fn create_admitted_run(
        &self,
        run: &Run,
        audit: Option<&AuditEvent>,
        jobs: &[OutboxJob],
    ) -> Result<Admission, StoreError> {
        let mut invocation = self.create_admitted_run.prepare_invoke();
        invocation
            .key(self.keys.run(&run.id))
            .key(self.keys.runs())
            .key(self.keys.runs_of_flow(&run.flow_id))
            .key(self.keys.timers())
            .key(self.keys.flow(&run.flow_id))
            .key(self.keys.audit())
            .key(self.keys.outbox())
            .arg(to_json(&run_meta(run)))
            .arg(run.created_at.timestamp_millis())
            .arg(&run.id)
            .arg(cutoff(self.config.run_retention))
            .arg(deadline_member(run))
            .arg(run.deadline.map_or(0, |d| d.timestamp_millis()))
            .arg(run.flow_version)
            .arg(self.config.stream_maxlen)
            .arg(outbox_members(jobs));
        if let Some(event) = audit {
            for (name, value) in audit_fields(event) {
                invocation.arg(name).arg(value);
            }
        }
        let outcome: i64 = invocation
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(match outcome {
            1 => Admission::Created,
            0 => Admission::Exists,
            _ => Admission::Stale,
        })
    }

    async fn outbox(
        &self,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<OutboxJob>, StoreError> {
        let members: Vec<String> = self
            .conn()
            .zrangebyscore_limit(
                self.keys.outbox(),
                "-inf",
                format!("({}", before.timestamp_millis()),
                0,
                isize::try_from(limit).unwrap_or(isize::MAX),
            )
            .await
            .map_err(unavailable)?;
        Ok(members
            .iter()
            .filter_map(|member| {
                let job = outbox_job(member);
                if job.is_none() {
                    tracing::warn!(
                        member,
                        "an outbox entry this version cannot read; left alone"
                    );
                }
                job
            })
            .collect())
    }

    async fn outbox_sent(&self, jobs: &[OutboxJob]) -> Result<(), StoreError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let members: Vec<String> = jobs.iter().map(outbox_member).collect();
        let _: i64 = self
            .conn()
            .zrem(self.keys.outbox(), members)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn get_run(&self, id: &str) -> Result<Option<Run>, StoreError> {
        let fields: HashMap<String, String> = self
            .conn()
            .hgetall(self.keys.run(id))
            .await
            .map_err(unavailable)?;
        self.run_from_hash(id, fields)
    }

    async fn list_runs(&self, query: &RunQuery) -> Result<Vec<RunSummary>, StoreError> {
        let limit = query.limit.max(1);
        let mut out = Vec::new();
        // Newest first, a page of the index at a time, filtering, until `limit` rows or the end.
        let page = limit.clamp(50, 1000);
        let mut pages = IndexPages::new(self.keys, query, page);
        while out.len() < limit {
            let ids = pages.next(&mut self.conn()).await?;
            if ids.is_empty() {
                break;
            }
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("HMGET")
                    .arg(self.keys.run(id))
                    .arg("meta")
                    .arg("status")
                    .arg("error")
                    .arg("finished_at");
            }
            let rows: Vec<(
                Option<String>,
                Option<String>,
                Option<String>,
                Option<String>,
            )> = pipe
                .query_async(&mut self.conn())
                .await
                .map_err(unavailable)?;
            for (id, (meta, status, error, finished)) in ids.iter().zip(rows) {
                let Some(meta) = meta else { continue };
                let key = self.keys.run(id);
                let meta: RunMeta = from_json(&key, &meta)?;
                let status = parse_status(&key, status.as_deref())?;
                if query.status.is_some_and(|s| s != status)
                    || !query.started_by_matches(&meta.started_by.name)
                {
                    continue;
                }
                out.push(RunSummary {
                    id: meta.id,
                    flow_id: meta.flow_id,
                    flow_version: meta.flow_version,
                    status,
                    created_at: meta.created_at,
                    finished_at: finished.map(|f| from_json(&key, &f)).transpose()?,
                    error: error.filter(|e| !e.is_empty()),
                    started_by: meta.started_by.name,
                });
                if out.len() == limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    async fn run_stats(&self, query: &RunQuery) -> Result<RunStats, StoreError> {
        let query = RunQuery {
            after: None,
            ..query.clone()
        };
        let mut stats = RunStats::default();
        let mut pages = IndexPages::new(self.keys, &query, 1000);
        loop {
            let ids = pages.next(&mut self.conn()).await?;
            if ids.is_empty() {
                return Ok(stats);
            }
            // The status alone, unless the starter is asked for: it is in the meta.
            let with_meta = query.started_by.is_some();
            let mut pipe = redis::pipe();
            for id in &ids {
                let hmget = pipe.cmd("HMGET").arg(self.keys.run(id)).arg("status");
                if with_meta {
                    hmget.arg("meta");
                }
            }
            let rows: Vec<Vec<Option<String>>> = pipe
                .query_async(&mut self.conn())
                .await
                .map_err(unavailable)?;
            for (id, row) in ids.iter().zip(rows) {
                let mut fields = row.into_iter();
                // A run indexed but expired has no fields left.
                let Some(status) = fields.next().flatten() else {
                    continue;
                };
                let key = self.keys.run(id);
                if with_meta {
                    let Some(meta) = fields.next().flatten() else {
                        continue;
                    };
                    let meta: RunMeta = from_json(&key, &meta)?;
                    if !query.started_by_matches(&meta.started_by.name) {
                        continue;
                    }
                }
                stats.add(parse_status(&key, Some(&status))?);
            }
        }
    }

    async fn record_step(&self, update: StepUpdate) -> Result<RunStatus, StoreError> {
        let key = self.keys.run(&update.run_id);
        let mut commands = Vec::with_capacity(8);
        let mut hset = redis::cmd("HSET");
        hset.arg(&key)
            .arg(format!("step:{}", update.step.name))
            .arg(to_json(&update.step));
        for closed in &update.closed {
            hset.arg(format!("step:{}", closed.name))
                .arg(to_json(closed));
        }
        if let Some(response) = &update.response {
            hset.arg("response").arg(to_json(response));
        }
        commands.push(hset);
        if update.unmark {
            let mut hdel = redis::cmd("HDEL");
            hdel.arg(&key).arg(format!("inflight:{}", update.step.name));
            commands.push(hdel);
        }
        let retention = self.config.run_retention;
        if let Some(pause) = &update.pause {
            let mut wait = redis::cmd("EVAL");
            wait.arg(START_WAIT)
                .arg(2)
                .arg(&key)
                .arg(self.keys.timers());
            match &pause.timer {
                Some(t) => wait
                    .arg(timer_member(&t.run_id, &t.flow_id, t.flow_version, &t.step))
                    .arg(t.due.timestamp_millis()),
                None => wait.arg("").arg(0),
            };
            commands.push(wait);
        }
        if let Some(t) = &update.wake {
            let member = timer_member(&t.run_id, &t.flow_id, t.flow_version, &t.step);
            let mut zadd = redis::cmd("ZADD");
            zadd.arg(self.keys.timers())
                .arg(t.due.timestamp_millis())
                .arg(member);
            commands.push(zadd);
            let mut announce = redis::cmd("PUBLISH");
            announce
                .arg(self.keys.timers())
                .arg(t.due.timestamp_millis());
            commands.push(announce);
        }
        if let Some(run) = &update.run {
            commands.push(finish_run(
                self.keys,
                &update.run_id,
                run,
                retention,
                update.step.output.as_ref(),
            ));
        }
        let maxlen = self.config.stream_maxlen;
        commands.push(xadd(
            &self.keys.results(),
            maxlen,
            result_fields(&update.result),
        ));
        if !retention.is_zero() && self.results_trim_due() {
            let mut trim = redis::cmd("XTRIM");
            trim.arg(self.keys.results())
                .arg("MINID")
                .arg(cutoff(retention));
            commands.push(trim);
        }
        if let Some(event) = &update.audit {
            commands.push(xadd(&self.keys.audit(), maxlen, audit_fields(event)));
        }
        let mut status = redis::cmd("HGET");
        status.arg(&key).arg("status");
        commands.push(status);
        self.steps.write(commands).await
    }

    async fn update_run(&self, run_id: &str, update: RunUpdate) -> Result<(), StoreError> {
        let _: i64 = finish_run(self.keys, run_id, &update, self.config.run_retention, None)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn cancel_run(
        &self,
        run_id: &str,
        at: DateTime<Utc>,
    ) -> Result<Option<bool>, StoreError> {
        let outcome: i64 = self
            .cancel_run
            .key(self.keys.run(run_id))
            .arg(to_json(&at))
            .arg(done_channel(run_id))
            .arg(millis(self.config.run_retention))
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(match outcome {
            0 => None,
            1 => Some(true),
            _ => Some(false),
        })
    }

    async fn resume_run(
        &self,
        run_id: &str,
        step: &StepState,
        jobs: &[OutboxJob],
    ) -> Result<Option<bool>, StoreError> {
        let mut invocation = self.resume_run.prepare_invoke();
        invocation
            .key(self.keys.run(run_id))
            .key(self.keys.outbox())
            .arg(format!("step:{}", step.name))
            .arg(to_json(step))
            .arg(Utc::now().timestamp_millis());
        for job in jobs {
            invocation.arg(outbox_member(job));
        }
        let outcome: i64 = invocation
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(match outcome {
            0 => None,
            1 => Some(true),
            _ => Some(false),
        })
    }

    async fn claim_wake(&self, timer: &Timer) -> Result<bool, StoreError> {
        let claimed: i64 = self
            .claim_wake
            .key(self.keys.run(&timer.run_id))
            .key(self.keys.timers())
            .arg(timer_member(
                &timer.run_id,
                &timer.flow_id,
                timer.flow_version,
                &timer.step,
            ))
            .arg(format!("step:{}", timer.step))
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(claimed == 1)
    }

    async fn expire_run(&self, timer: &Timer, error: &str) -> Result<bool, StoreError> {
        let ended: i64 = self
            .expire_run
            .key(self.keys.run(&timer.run_id))
            .key(self.keys.timers())
            .arg(error)
            .arg(to_json(&Utc::now()))
            .arg(millis(self.config.run_retention))
            .arg(done_channel(&timer.run_id))
            .arg(timer_member(
                &timer.run_id,
                &timer.flow_id,
                timer.flow_version,
                &timer.step,
            ))
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(ended == 1)
    }

    async fn drop_timer(&self, timer: &Timer) -> Result<(), StoreError> {
        let member = timer_member(
            &timer.run_id,
            &timer.flow_id,
            timer.flow_version,
            &timer.step,
        );
        let _: i64 = redis::cmd("ZREM")
            .arg(self.keys.timers())
            .arg(member)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn resume_waiting(
        &self,
        timer: &Timer,
        step: &StepState,
        result: &StepResult,
    ) -> Result<Option<bool>, StoreError> {
        let mut invocation = self.resume_waiting.prepare_invoke();
        invocation
            .key(self.keys.run(&timer.run_id))
            .key(self.keys.timers())
            .key(self.keys.results())
            .arg(format!("step:{}", step.name))
            .arg(to_json(step))
            .arg(timer_member(
                &timer.run_id,
                &timer.flow_id,
                timer.flow_version,
                &timer.step,
            ))
            .arg(self.config.stream_maxlen);
        for (name, value) in result_fields(result) {
            invocation.arg(name).arg(value);
        }
        let outcome: i64 = invocation
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(match outcome {
            0 => None,
            1 => Some(true),
            _ => Some(false),
        })
    }

    async fn take_due_timers(
        &self,
        now: DateTime<Utc>,
        limit: usize,
        again_after: Duration,
    ) -> Result<Vec<Timer>, StoreError> {
        let due: Vec<(String, f64)> = self
            .take_timers
            .key(self.keys.timers())
            .arg(now.timestamp_millis())
            .arg(limit)
            .arg(millis(again_after))
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(due
            .iter()
            .filter_map(|(member, due)| {
                let timer = timer_from(member, *due);
                if timer.is_none() {
                    tracing::warn!(member = %member.escape_debug(), "unreadable timer in pw:timers");
                }
                timer
            })
            .collect())
    }

    async fn acquire_run_slot(
        &self,
        flow_id: &str,
        run_id: &str,
        max: u32,
    ) -> Result<bool, StoreError> {
        let taken: i64 = self
            .acquire_run_slot
            .key(self.keys.slots(flow_id))
            .arg(run_id)
            .arg(max)
            .arg(self.keys.run_prefix())
            .arg(Utc::now().timestamp_millis())
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(taken == 1)
    }

    async fn mark_in_flight(&self, run_id: &str, marker: &InFlight) -> Result<(), StoreError> {
        let _: i64 = self
            .mark_in_flight
            .key(self.keys.run(run_id))
            .arg(format!("inflight:{}", marker.step))
            .arg(to_json(marker))
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn hold_item(&self, held: &Held) -> Result<DateTime<Utc>, StoreError> {
        let due: i64 = self
            .hold_item
            .key(self.keys.debounce(&held.flow_id, &held.slot))
            .key(self.keys.timers())
            .arg(to_json(&held.item))
            .arg(held.item_id.as_deref().unwrap_or_default())
            .arg(to_json(&held.meta))
            .arg(held.now.timestamp_millis())
            .arg(millis(held.period))
            .arg(millis(held.max))
            .arg(timer_member(&held.slot, &held.flow_id, 0, DEBOUNCE_STEP))
            .arg(millis(Duration::from_secs(24 * 3600)))
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(DateTime::from_timestamp_millis(due).unwrap_or(held.now))
    }

    async fn pending_item(&self, flow_id: &str, slot: &str) -> Result<Option<Pending>, StoreError> {
        let key = self.keys.debounce(flow_id, slot);
        let fields: HashMap<String, String> =
            self.conn().hgetall(&key).await.map_err(unavailable)?;
        let (Some(item), Some(meta)) = (fields.get("item"), fields.get("meta")) else {
            return Ok(None);
        };
        let number = |field: &str| -> Result<i64, StoreError> {
            fields
                .get(field)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| corrupt(&key, format!("no number `{field}`")))
        };
        let time = |field: &str| -> Result<DateTime<Utc>, StoreError> {
            DateTime::from_timestamp_millis(number(field)?)
                .ok_or_else(|| corrupt(&key, format!("`{field}` is not a time")))
        };
        Ok(Some(Pending {
            item: from_json(&key, item)?,
            meta: from_json(&key, meta)?,
            seq: u64::try_from(number("seq")?).unwrap_or_default(),
            first: time("first_ms")?,
            due: time("due_ms")?,
        }))
    }

    async fn release_item(&self, flow_id: &str, slot: &str, seq: u64) -> Result<(), StoreError> {
        let _: i64 = self
            .release_item
            .key(self.keys.debounce(flow_id, slot))
            .key(self.keys.timers())
            .arg(seq)
            .arg(timer_member(slot, flow_id, 0, DEBOUNCE_STEP))
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn join_lane(
        &self,
        run_id: &str,
        around: &str,
        lane: u32,
        lanes: u32,
    ) -> Result<bool, StoreError> {
        let ended: u32 = self
            .join_lane
            .key(self.keys.run(run_id))
            .arg(format!("lane:{around}:"))
            .arg(lane)
            .arg(lanes)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(ended >= lanes)
    }

    async fn acquire_in_flight(
        &self,
        key: &str,
        holder: &str,
        max: u32,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let taken: i64 = self
            .acquire_in_flight
            .key(self.keys.in_flight(key))
            .arg(holder)
            .arg(max)
            .arg(millis(lease))
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(taken == 1)
    }

    async fn release_in_flight(&self, key: &str, holder: &str) -> Result<(), StoreError> {
        let _: i64 = redis::cmd("ZREM")
            .arg(self.keys.in_flight(key))
            .arg(holder)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn reserve_rate(&self, key: &str, interval: Duration) -> Result<Duration, StoreError> {
        let wait_us: i64 = self
            .reserve_rate
            .key(self.keys.rate(key))
            .arg(u64::try_from(interval.as_micros()).unwrap_or(u64::MAX))
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(Duration::from_micros(u64::try_from(wait_us).unwrap_or(0)))
    }

    async fn next_timer(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        let first: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(self.keys.timers())
            .arg(0)
            .arg(0)
            .arg("WITHSCORES")
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        #[allow(clippy::cast_possible_truncation)]
        Ok(first
            .first()
            .and_then(|(_, due)| DateTime::from_timestamp_millis(*due as i64)))
    }

    async fn watch_timers(&self) -> Result<tokio::sync::watch::Receiver<u64>, StoreError> {
        let sender = self
            .timers
            .get_or_init(|| async {
                let (sender, _) = tokio::sync::watch::channel(0);
                tokio::spawn(listen_timers(
                    self.pubsub.clone(),
                    self.keys.timers(),
                    sender.clone(),
                ));
                sender
            })
            .await;
        Ok(sender.subscribe())
    }

    async fn watch_run(&self, run_id: &str) -> Result<Box<dyn RunWatch>, StoreError> {
        let waiter = self.done.register(run_id).await.map_err(unavailable)?;
        Ok(Box::new(RedisRunWatch {
            store: self.clone(),
            run_id: run_id.to_owned(),
            waiter,
        }))
    }

    async fn wait_run_finished(
        &self,
        run_id: &str,
        timeout: Duration,
    ) -> Result<Option<Run>, StoreError> {
        // Register before reading, so a finish in between is not missed.
        let mut waiter = self.done.register(run_id).await.map_err(unavailable)?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let run = self.get_run(run_id).await?;
            let now = tokio::time::Instant::now();
            match &run {
                None => return Ok(None),
                Some(r) if r.status.is_terminal() || now >= deadline => return Ok(run),
                Some(_) => {}
            }
            let next_look = deadline.min(now + run_done::FALLBACK_POLL);
            tokio::select! {
                _ = &mut waiter.finished => return self.get_run(run_id).await,
                () = tokio::time::sleep_until(next_look) => {}
            }
        }
    }

    async fn trigger_state(&self, flow_id: &str) -> Result<Option<PollState>, StoreError> {
        let key = self.keys.trigger(flow_id);
        let text: Option<String> = self.conn().get(&key).await.map_err(unavailable)?;
        text.map(|t| from_json(&key, &t)).transpose()
    }

    async fn put_trigger_state(&self, flow_id: &str, state: &PollState) -> Result<(), StoreError> {
        let () = self
            .conn()
            .set(self.keys.trigger(flow_id), to_json(state))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let taken: Option<String> = redis::cmd("SET")
            .arg(self.keys.lease(name))
            .arg(holder)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(taken.is_some())
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let _: i64 = self
            .unlock
            .key(self.keys.lease(name))
            .arg(holder)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn put_connection(&self, connection: &ConnectionRecord) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(self.keys.connection(&connection.name))
            .arg(to_json(connection))
            .ignore()
            .cmd("SADD")
            .arg(self.keys.connections())
            .arg(&connection.name)
            .ignore();
        let () = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn reseal_connection(
        &self,
        current: &ConnectionRecord,
        resealed: &ConnectionRecord,
    ) -> Result<bool, StoreError> {
        let swapped: i64 = Script::new(SWAP_RECORD)
            .key(self.keys.connection(&current.name))
            .arg("secret")
            .arg(&current.secret)
            .arg(to_json(resealed))
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(swapped == 1)
    }

    async fn get_connection(&self, name: &str) -> Result<Option<ConnectionRecord>, StoreError> {
        let key = self.keys.connection(name);
        let text: Option<String> = self.conn().get(&key).await.map_err(unavailable)?;
        text.map(|t| from_json(&key, &t)).transpose()
    }

    async fn list_connections(&self) -> Result<Vec<ConnectionRecord>, StoreError> {
        self.read_indexed(&self.keys.connections(), |name| self.keys.connection(name))
            .await
    }

    async fn delete_connection(&self, name: &str) -> Result<bool, StoreError> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("DEL")
            .arg(self.keys.connection(name))
            .cmd("SREM")
            .arg(self.keys.connections())
            .arg(name)
            .ignore()
            .cmd("HDEL")
            .arg(self.keys.connections_used())
            .arg(name)
            .ignore();
        let (deleted,): (i64,) = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(deleted > 0)
    }

    async fn put_webhook_secret(
        &self,
        flow_id: &str,
        sealed: &str,
        replace: bool,
    ) -> Result<bool, StoreError> {
        let key = self.keys.webhook_secret(flow_id);
        let mut conn = self.conn();
        if replace {
            let () = conn.set(&key, sealed).await.map_err(unavailable)?;
            Ok(true)
        } else {
            conn.set_nx(&key, sealed).await.map_err(unavailable)
        }
    }

    async fn get_webhook_secret(&self, flow_id: &str) -> Result<Option<String>, StoreError> {
        self.conn()
            .get(self.keys.webhook_secret(flow_id))
            .await
            .map_err(unavailable)
    }

    async fn reseal_webhook_secret(
        &self,
        flow_id: &str,
        current: &str,
        resealed: &str,
    ) -> Result<bool, StoreError> {
        let swapped: i64 = Script::new(SWAP_STRING)
            .key(self.keys.webhook_secret(flow_id))
            .arg(current)
            .arg(resealed)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(swapped == 1)
    }

    async fn rehash_api_key(
        &self,
        current: &ApiKeyRecord,
        rehashed: &ApiKeyRecord,
    ) -> Result<bool, StoreError> {
        let swapped: i64 = Script::new(SWAP_HASH_RECORD)
            .key(self.keys.api_keys())
            .arg(&current.name)
            .arg("hash")
            .arg(&current.hash)
            .arg(to_json(rehashed))
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(swapped == 1)
    }

    async fn create_api_key(&self, key: &ApiKeyRecord) -> Result<bool, StoreError> {
        self.conn()
            .hset_nx(self.keys.api_keys(), &key.name, to_json(key))
            .await
            .map_err(unavailable)
    }

    async fn get_api_key(&self, name: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        let text: Option<String> = self
            .conn()
            .hget(self.keys.api_keys(), name)
            .await
            .map_err(unavailable)?;
        text.map(|t| from_json(&self.keys.api_keys(), &t))
            .transpose()
    }

    async fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let all: std::collections::BTreeMap<String, String> = self
            .conn()
            .hgetall(self.keys.api_keys())
            .await
            .map_err(unavailable)?;
        all.values()
            .map(|t| from_json(&self.keys.api_keys(), t))
            .collect()
    }

    async fn delete_api_key(&self, name: &str) -> Result<bool, StoreError> {
        let deleted: i64 = self
            .conn()
            .hdel(self.keys.api_keys(), name)
            .await
            .map_err(unavailable)?;
        Ok(deleted > 0)
    }

    fn kv(&self) -> Arc<dyn KvStore> {
        Arc::new(RedisKv {
            keys: self.keys,
            conn: self.conn(),
        })
    }

    async fn append_audit(&self, event: AuditEvent) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        pipe.add_command(xadd(
            &self.keys.audit(),
            self.config.stream_maxlen,
            audit_fields(&event),
        ))
        .ignore();
        // Trimming by age at most once a minute per process: every append paid for it.
        let retention = self.config.audit_retention;
        if !retention.is_zero() && trim_due(&self.audit_trimmed_at) {
            pipe.cmd("XTRIM")
                .arg(self.keys.audit())
                .arg("MINID")
                .arg(cutoff(retention))
                .ignore();
        }
        let () = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn read_results(
        &self,
        after: Option<&str>,
        limit: usize,
        block: Duration,
    ) -> Result<Vec<Entry<StepResult>>, StoreError> {
        let limit = limit.max(1);
        let entries: Vec<StreamId> = if block.is_zero() {
            let reply: StreamRangeReply = redis::cmd("XRANGE")
                .arg(self.keys.results())
                .arg(exclusive(after))
                .arg("+")
                .arg("COUNT")
                .arg(limit)
                .query_async(&mut self.conn())
                .await
                .map_err(unavailable)?;
            reply.ids
        } else {
            let mut conn = self.blocking.lock().await;
            let reply: Option<StreamReadReply> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(limit)
                .arg("BLOCK")
                .arg(block.as_millis().max(1) as u64)
                .arg("STREAMS")
                .arg(self.keys.results())
                .arg(after.unwrap_or("0-0"))
                .query_async(&mut *conn)
                .await
                .map_err(unavailable)?;
            reply
                .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
                .unwrap_or_default()
        };
        Ok(entries
            .iter()
            .map(|e| Entry {
                id: e.id.clone(),
                event: result_from(e),
            })
            .collect())
    }

    async fn read_audit(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Entry<AuditEvent>>, StoreError> {
        let reply: StreamRangeReply = redis::cmd("XRANGE")
            .arg(self.keys.audit())
            .arg(exclusive(after))
            .arg("+")
            .arg("COUNT")
            .arg(limit.max(1))
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(reply
            .ids
            .iter()
            .map(|e| Entry {
                id: e.id.clone(),
                event: audit_from(e),
            })
            .collect())
    }

    /// Stream ids start with their entry's time in ms, so no round trip is needed.
    async fn audit_cursor_at(&self, time_ms: i64) -> Result<Option<String>, StoreError> {
        Ok(stream_cursor_at(time_ms))
    }

    async fn results_cursor_at(&self, time_ms: i64) -> Result<Option<String>, StoreError> {
        Ok(stream_cursor_at(time_ms))
    }

    async fn touch_connection(&self, name: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        // Only ever forward: two workers touching at once keep the later time.
        const LATER: &str = "local t = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') \
            if tonumber(ARGV[2]) > t then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end";
        redis::cmd("EVAL")
            .arg(LATER)
            .arg(1)
            .arg(self.keys.connections_used())
            .arg(name)
            .arg(at.timestamp_millis())
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(unavailable)
    }

    async fn connections_used(&self) -> Result<HashMap<String, DateTime<Utc>>, StoreError> {
        let used: HashMap<String, i64> = redis::cmd("HGETALL")
            .arg(self.keys.connections_used())
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(used
            .into_iter()
            .filter_map(|(name, ms)| Some((name, DateTime::from_timestamp_millis(ms)?)))
            .collect())
    }

    async fn ready(&self) -> Result<(), StoreError> {
        let pong: String = redis::cmd("PING")
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(StoreError::Unavailable(format!(
                "unexpected PING reply {pong:?}"
            )))
        }
    }
}

/// A stream id just before every entry added at or after `time_ms`: stream ids start with
/// the time they were added at.
fn stream_cursor_at(time_ms: i64) -> Option<String> {
    (time_ms > 0).then(|| format!("{}-{}", time_ms - 1, u64::MAX))
}

/// The piece key-value store on Redis.
struct RedisKv {
    keys: Keys,
    conn: Connection,
}

fn kv_error(err: redis::RedisError) -> PieceError {
    PieceError::retryable(format!("store unavailable: {err}"))
}

#[async_trait]
impl KvStore for RedisKv {
    async fn get(&self, key: &str) -> Result<Option<Value>, PieceError> {
        let text: Option<String> = self
            .conn
            .clone()
            .get(self.keys.kv(key))
            .await
            .map_err(kv_error)?;
        text.map(|t| {
            serde_json::from_str(&t)
                .map_err(|e| PieceError::fatal(format!("stored value of {key:?} is not JSON: {e}")))
        })
        .transpose()
    }

    async fn put(&self, key: &str, value: Value) -> Result<(), PieceError> {
        let () = self
            .conn
            .clone()
            .set(self.keys.kv(key), value.to_string())
            .await
            .map_err(kv_error)?;
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<bool, PieceError> {
        let removed: i64 = self
            .conn
            .clone()
            .del(self.keys.kv(key))
            .await
            .map_err(kv_error)?;
        Ok(removed > 0)
    }
}
