//! The piece side of piece protocol v1: [`serve`] turns a [`Piece`] into an executable that a
//! piece host (the worker, the api) starts as a child process.
//!
//! ```no_run
//! fn main() -> std::process::ExitCode {
//!     # fn piece() -> Result<piecework_sdk::Piece, piecework_sdk::PieceDefinitionError> { todo!() }
//!     piecework_sdk::serve(piece())
//! }
//! ```
//!
//! Each host request runs as its own task, so one process serves many calls at once; a
//! `cancel` aborts the task at its next `.await` (an action that blocks a thread cannot be
//! aborted, and the host kills the process instead). `ctx.store` asks the host over the same
//! pipe; `tracing` events become `log` notifications carrying the call's id, so they land in the
//! host's log with the run's fields. Stdout belongs to the protocol: a piece writes diagnostics
//! with `tracing` or to stderr, never with `println!`.

use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::Scope;
use crate::context::{Context, RunInfo, ScopedKv, ScopedStore};
use crate::error::PieceError;
use crate::http::HttpClient;
use crate::piece::{Piece, PieceDefinitionError};
use crate::protocol::{self, Frame, LogLevel, Read, WireError, method};
use crate::trigger::{TriggerHandle, TriggerHook};

/// Frames waiting to be written; responses wait for room, logs are dropped when it is full.
const OUTBOX: usize = 1024;

/// Serves `piece` on stdin/stdout until the host closes stdin. Returns the process's exit
/// code: 2 for a piece definition that does not build or when started by hand on a terminal.
pub fn serve(piece: Result<Piece, PieceDefinitionError>) -> ExitCode {
    let piece = match piece {
        Ok(piece) => piece,
        Err(err) => {
            eprintln!("{err}");
            return ExitCode::from(2);
        }
    };
    if std::io::stdin().is_terminal() {
        eprintln!(
            "{} {} is a piecework piece: it speaks piece protocol {} on stdin and stdout and is started by a piece host.\n\
             Try it with `piecework piece test <bundle or directory> <action> --input '{{…}}'`.",
            piece.name(),
            piece.version(),
            protocol::VERSION
        );
        return ExitCode::from(2);
    }
    forward_logs();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve_stdio(piece)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("piece protocol: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Serves on stdin and stdout: as non-blocking pipes on the runtime's reactor when they are
/// pipes (as a host starts a piece), else through tokio's blocking stdio. The reactor matters:
/// blocking stdio hands every read and write to another thread, which costs more than the
/// rest of a call.
async fn serve_stdio(piece: Piece) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::fd::AsFd as _;
        use tokio::net::unix::pipe;
        let reader = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .ok()
            .and_then(|fd| pipe::Receiver::from_owned_fd(fd).ok());
        let writer = std::io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .ok()
            .and_then(|fd| pipe::Sender::from_owned_fd(fd).ok());
        if let (Some(reader), Some(writer)) = (reader, writer) {
            return serve_io(piece, reader, writer).await;
        }
    }
    serve_io(piece, tokio::io::stdin(), tokio::io::stdout()).await
}

/// Serves `piece` over any pair of streams until `reader` ends; [`serve`] uses stdin and
/// stdout. Conformance tests run a piece this way in-process.
pub async fn serve_io(
    piece: Piece,
    reader: impl AsyncRead + Unpin + Send + 'static,
    writer: impl AsyncWrite + Unpin + Send + 'static,
) -> std::io::Result<()> {
    let (outbox, queued) = mpsc::channel(OUTBOX);
    let session = Arc::new(Session {
        piece,
        outbox,
        calls: Mutex::default(),
        waiting: Mutex::default(),
        next_id: AtomicU64::new(1),
        http: OnceLock::new(),
        max_message: AtomicUsize::new(protocol::DEFAULT_MAX_MESSAGE_BYTES),
    });
    if let Some(forward) = FORWARD.get() {
        *forward.outbox.lock().unwrap() = Some(session.outbox.clone());
    }
    let writing = tokio::spawn(write_frames(queued, writer));
    let read = session.clone().read_frames(reader).await;
    session.abort_all();
    drop(session);
    if let Some(forward) = FORWARD.get() {
        forward.outbox.lock().unwrap().take();
    }
    let written = writing.await.unwrap_or(Ok(()));
    read.and(written)
}

/// Writes queued frames, flushing when nothing else is waiting: many frames, few syscalls.
async fn write_frames(
    mut queued: mpsc::Receiver<Vec<u8>>,
    writer: impl AsyncWrite + Unpin,
) -> std::io::Result<()> {
    let mut writer = BufWriter::new(writer);
    while let Some(frame) = queued.recv().await {
        writer.write_all(&frame).await?;
        while let Ok(frame) = queued.try_recv() {
            writer.write_all(&frame).await?;
        }
        writer.flush().await?;
    }
    Ok(())
}

struct Session {
    piece: Piece,
    outbox: mpsc::Sender<Vec<u8>>,
    /// The host's requests being worked on.
    calls: Mutex<HashMap<u64, JoinHandle<()>>>,
    /// Our requests to the host (store operations), awaiting their answer.
    waiting: Mutex<HashMap<u64, oneshot::Sender<Frame>>>,
    next_id: AtomicU64,
    /// Set by `describe`, under the host's egress policy.
    http: OnceLock<HttpClient>,
    max_message: AtomicUsize,
}

impl Session {
    async fn read_frames(self: Arc<Self>, reader: impl AsyncRead + Unpin) -> std::io::Result<()> {
        let mut reader = BufReader::new(reader);
        let mut line = Vec::new();
        loop {
            let max = self.max_message.load(Ordering::Relaxed);
            match protocol::read_frame(&mut reader, &mut line, max).await? {
                Read::Closed => return Ok(()),
                Read::TooLong { bytes, head } => {
                    let message =
                        format!("a frame of {bytes} bytes is more than this piece accepts ({max})");
                    match protocol::id_in_head(&head) {
                        Some(id) => self.fail(id, &PieceError::fatal(message)).await,
                        None => eprintln!("piece protocol: {message}; ignored"),
                    }
                }
                Read::Frame if line.iter().all(u8::is_ascii_whitespace) => {}
                Read::Frame => match Frame::parse(&line) {
                    Ok(frame) => self.clone().dispatch(frame).await,
                    Err(problem) => eprintln!("piece protocol: {problem}; ignored"),
                },
            }
        }
    }

    async fn dispatch(self: Arc<Self>, frame: Frame) {
        let Some(name) = frame.method.as_deref() else {
            // An answer to one of our store requests.
            if let Some(id) = frame.id
                && let Some(waiter) = self.waiting.lock().unwrap().remove(&id)
            {
                let _ = waiter.send(frame);
            }
            return;
        };
        let Some(id) = frame.id else {
            if name == method::CANCEL
                && let Ok(cancel) = frame.params::<protocol::Cancel>()
            {
                self.cancel(cancel.id);
            }
            return;
        };
        match name {
            method::DESCRIBE => {
                let described = self.describe(&frame);
                self.answer(id, described).await;
            }
            method::HEALTH => {
                let health = protocol::Health {
                    status: "ok".into(),
                    in_flight: self.calls.lock().unwrap().len(),
                };
                self.answer(id, Ok(health)).await;
            }
            _ if self.http.get().is_none() => {
                let err = PieceError::fatal(format!(
                    "`{name}` before `describe`: describe must be the first request"
                ));
                self.fail(id, &err).await;
            }
            method::RUN_ACTION
            | method::POLL
            | method::WEBHOOK
            | method::SCHEDULE
            | method::OPTIONS
            | method::ENABLE
            | method::DISABLE
            | method::VALIDATE_AUTH => self.start_call(id, frame),
            other => {
                let err = PieceError::fatal(format!("unknown method `{other}`"));
                self.fail(id, &err).await;
            }
        }
    }

    fn describe(&self, frame: &Frame) -> Result<protocol::Described, PieceError> {
        let params: protocol::DescribeParams = frame.params()?;
        protocol::check_version(&params.protocol, "host")?;
        if self.http.get().is_none() {
            let http = HttpClient::new(params.egress)?;
            let _ = self.http.set(http);
        }
        self.max_message
            .store(params.max_message_bytes.max(1024), Ordering::Relaxed);
        if let Some(forward) = FORWARD.get() {
            forward
                .level
                .store(params.log_level as u8, Ordering::Relaxed);
        }
        Ok(protocol::Described {
            protocol: protocol::VERSION.to_owned(),
            piece: self.piece.metadata().clone(),
        })
    }

    /// Runs a call as its own task, abortable by `cancel`.
    fn start_call(self: Arc<Self>, id: u64, frame: Frame) {
        let session = self.clone();
        let mut calls = self.calls.lock().unwrap();
        let task = tokio::spawn(CALL.scope(id, async move {
            let outcome = session.call(id, &frame).await;
            // Answer unless a cancel got here first (it answers for us).
            if session.calls.lock().unwrap().remove(&id).is_some() {
                session.answer(id, outcome).await;
            }
        }));
        calls.insert(id, task);
    }

    async fn call(self: &Arc<Self>, id: u64, frame: &Frame) -> Result<Value, PieceError> {
        let piece = &self.piece;
        match frame.method.as_deref().unwrap_or_default() {
            method::RUN_ACTION => {
                let params: protocol::RunAction = frame.params()?;
                let action = piece.action(&params.action).ok_or_else(|| {
                    PieceError::fatal(format!(
                        "piece `{}` has no action `{}`",
                        piece.name(),
                        params.action
                    ))
                })?;
                let ctx = self.context(id, params.context);
                action.run_json(&ctx, params.input).await
            }
            method::POLL => {
                let params: protocol::Poll = frame.params()?;
                let Some(TriggerHandle::Polling(trigger)) = piece.trigger(&params.trigger) else {
                    return Err(self.no_trigger(&params.trigger, "polling"));
                };
                let mut ctx = self
                    .context(id, params.context)
                    .with_poll_cursor(params.cursor.map(std::borrow::Cow::into_owned));
                if params.trial {
                    ctx = ctx.trial();
                }
                let items = trigger.poll_json(&ctx, params.input).await?;
                to_value(&items)
            }
            method::WEBHOOK => {
                let params: protocol::Webhook = frame.params()?;
                let Some(TriggerHandle::Webhook(trigger)) = piece.trigger(&params.trigger) else {
                    return Err(self.no_trigger(&params.trigger, "webhook"));
                };
                // A host before 1.3 sends no context: the call gets an empty one.
                let context = params.context.unwrap_or_else(|| protocol::CallContext {
                    run: std::borrow::Cow::Owned(RunInfo::new("webhook", "", 0, "trigger", 1)),
                    owner: std::borrow::Cow::Owned(Default::default()),
                    auth: None,
                    limits: Default::default(),
                });
                let ctx = self
                    .context(id, context)
                    .with_webhook_url(params.webhook_url.map(std::borrow::Cow::into_owned));
                let items = trigger
                    .handle_json(&ctx, params.input, &params.request)
                    .await?;
                Ok(Value::Array(items))
            }
            method::ENABLE | method::DISABLE => {
                let hook = if frame.method.as_deref() == Some(method::ENABLE) {
                    TriggerHook::Enable
                } else {
                    TriggerHook::Disable
                };
                let params: protocol::TriggerHookOf = frame.params()?;
                let ctx = self
                    .context(id, params.context)
                    .with_webhook_url(params.webhook_url.map(std::borrow::Cow::into_owned));
                match piece.trigger(&params.trigger) {
                    Some(TriggerHandle::Polling(trigger)) => {
                        trigger.hook_json(&ctx, hook, params.input).await?
                    }
                    Some(TriggerHandle::Webhook(trigger)) => {
                        trigger.hook_json(&ctx, hook, params.input).await?
                    }
                    _ => return Err(self.no_trigger(&params.trigger, "polling or webhook")),
                }
                Ok(Value::Null)
            }
            method::SCHEDULE => {
                let params: protocol::ScheduleOf = frame.params()?;
                let Some(TriggerHandle::Schedule(trigger)) = piece.trigger(&params.trigger) else {
                    return Err(self.no_trigger(&params.trigger, "schedule"));
                };
                let schedule = trigger.schedule_json(params.input).await?;
                to_value(&schedule)
            }
            method::OPTIONS => {
                let params: protocol::OptionsOf = frame.params()?;
                let ctx = self.context(id, params.context);
                let options = match (params.action, params.trigger) {
                    (Some(name), None) => {
                        let action = piece.action(&name).ok_or_else(|| {
                            PieceError::fatal(format!(
                                "piece `{}` has no action `{name}`",
                                piece.name()
                            ))
                        })?;
                        action
                            .options_json(&ctx, &params.prop, params.input)
                            .await?
                    }
                    (None, Some(name)) => {
                        let Some(TriggerHandle::Polling(trigger)) = piece.trigger(&name) else {
                            return Err(self.no_trigger(&name, "polling"));
                        };
                        trigger
                            .options_json(&ctx, &params.prop, params.input)
                            .await?
                    }
                    _ => {
                        return Err(PieceError::fatal(
                            "`options` names exactly one of `action` and `trigger`",
                        ));
                    }
                };
                to_value(&options)
            }
            method::VALIDATE_AUTH => {
                let params: protocol::ValidateAuth = frame.params()?;
                let ctx = self.context(id, params.context);
                piece.validate_auth(&ctx).await.map(|()| Value::Null)
            }
            other => Err(PieceError::fatal(format!("unknown method `{other}`"))),
        }
    }

    fn no_trigger(&self, name: &str, kind: &str) -> PieceError {
        PieceError::fatal(format!(
            "piece `{}` has no {kind} trigger `{name}`",
            self.piece.name()
        ))
    }

    /// The context of call `id`: its run, its connection, a store and progress that go
    /// through the host.
    fn context(self: &Arc<Self>, id: u64, call: protocol::CallContext<'_>) -> Context {
        let store = ScopedStore::from_scoped(Arc::new(HostStore {
            session: self.clone(),
            call: id,
        }));
        let mut http = self.http.get().expect("calls start after describe").clone();
        if let Some(max) = call.limits.max_response_bytes {
            http = http.with_max_response_bytes(max);
        }
        let progress = {
            let outbox = self.outbox.clone();
            Arc::new(move |message: &str| {
                let params = protocol::Progress {
                    call: id,
                    message: message.to_owned(),
                };
                let frame = protocol::encode(&protocol::Notification {
                    method: method::PROGRESS,
                    params: &params,
                });
                let _ = outbox.try_send(frame);
            })
        };
        Context::new(call.run.into_owned(), call.owner.into_owned(), store, http)
            .with_auth(call.auth.map(std::borrow::Cow::into_owned))
            .with_progress(progress)
    }

    /// Aborts call `id` and acknowledges once its task has really ended: a task blocking its
    /// thread ends late, and the host, seeing no acknowledgement, kills the process.
    fn cancel(self: Arc<Self>, id: u64) {
        let task = self.calls.lock().unwrap().remove(&id);
        if let Some(task) = task {
            task.abort();
            tokio::spawn(async move {
                let _ = task.await;
                self.fail(id, &PieceError::fatal("cancelled by the host"))
                    .await;
            });
        }
    }

    fn abort_all(&self) {
        for (_, task) in self.calls.lock().unwrap().drain() {
            task.abort();
        }
    }

    async fn answer<T: Serialize>(&self, id: u64, outcome: Result<T, PieceError>) {
        let frame = match &outcome {
            Ok(result) => protocol::encode(&protocol::Response {
                id,
                result: Some(result),
                error: None,
            }),
            Err(err) => failure(id, err),
        };
        let max = self.max_message.load(Ordering::Relaxed);
        let frame = if frame.len() > max {
            let err = PieceError::fatal(format!(
                "the answer is {} bytes, more than the host accepts ({max})",
                frame.len()
            ));
            failure(id, &err)
        } else {
            frame
        };
        let _ = self.outbox.send(frame).await;
    }

    async fn fail(&self, id: u64, err: &PieceError) {
        let _ = self.outbox.send(failure(id, err)).await;
    }

    /// Sends a request to the host and waits for its answer.
    async fn ask<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
        params: &impl Serialize,
    ) -> Result<T, PieceError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (answer, answered) = oneshot::channel();
        self.waiting.lock().unwrap().insert(id, answer);
        let frame = protocol::encode(&protocol::Request {
            id,
            method: name,
            params,
        });
        if self.outbox.send(frame).await.is_err() {
            self.waiting.lock().unwrap().remove(&id);
            return Err(PieceError::retryable("the host is gone"));
        }
        let frame = answered
            .await
            .map_err(|_| PieceError::retryable("the host closed the pipe"))?;
        frame.outcome()
    }
}

fn failure(id: u64, err: &PieceError) -> Vec<u8> {
    protocol::encode(&protocol::Response::<Value> {
        id,
        result: None,
        error: Some(WireError::from(err)),
    })
}

fn to_value(value: &impl Serialize) -> Result<Value, PieceError> {
    serde_json::to_value(value)
        .map_err(|e| PieceError::fatal(format!("result is not serializable as JSON: {e}")))
}

/// `ctx.store` of a call: every operation is a request to the host, tagged with the call.
struct HostStore {
    session: Arc<Session>,
    call: u64,
}

impl HostStore {
    fn op<'a>(&self, scope: Scope, key: &'a str, value: Option<Value>) -> protocol::StoreOp<'a> {
        protocol::StoreOp {
            call: self.call,
            scope,
            key: key.into(),
            value,
        }
    }
}

#[async_trait]
impl ScopedKv for HostStore {
    async fn get(&self, scope: Scope, key: &str) -> Result<Option<Value>, PieceError> {
        self.session
            .ask(method::STORE_GET, &self.op(scope, key, None))
            .await
    }

    async fn put(&self, scope: Scope, key: &str, value: Value) -> Result<(), PieceError> {
        self.session
            .ask::<Option<Value>>(method::STORE_PUT, &self.op(scope, key, Some(value)))
            .await
            .map(drop)
    }

    async fn delete(&self, scope: Scope, key: &str) -> Result<bool, PieceError> {
        self.session
            .ask(method::STORE_DELETE, &self.op(scope, key, None))
            .await
    }
}

tokio::task_local! {
    /// The host request the current task serves, for `log` notifications.
    static CALL: u64;
}

/// Where `tracing` events of a served piece go: the current session's outbox.
struct Forward {
    outbox: Mutex<Option<mpsc::Sender<Vec<u8>>>>,
    /// The most verbose [`LogLevel`] forwarded, as set by `describe`.
    level: AtomicU8,
}

static FORWARD: OnceLock<Forward> = OnceLock::new();

/// Installs the `tracing` subscriber of a served piece (once per process).
fn forward_logs() {
    use tracing_subscriber::layer::SubscriberExt as _;
    let forward = FORWARD.get_or_init(|| Forward {
        outbox: Mutex::new(None),
        level: AtomicU8::new(LogLevel::Info as u8),
    });
    let subscriber = tracing_subscriber::registry().with(LogLayer { forward });
    let _ = tracing::subscriber::set_global_default(subscriber);
}

struct LogLayer {
    forward: &'static Forward,
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LogLayer {
    fn enabled(
        &self,
        metadata: &tracing::Metadata<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        LogLevel::from_tracing(*metadata.level()) as u8
            <= self.forward.level.load(Ordering::Relaxed)
    }

    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let Some(outbox) = self.forward.outbox.lock().unwrap().clone() else {
            return;
        };
        let mut fields = Fields::default();
        event.record(&mut fields);
        let params = protocol::Log {
            call: CALL.try_with(|id| *id).ok(),
            level: LogLevel::from_tracing(*event.metadata().level()),
            message: fields.message,
            fields: fields.rest,
        };
        let frame = protocol::encode(&protocol::Notification {
            method: method::LOG,
            params: &params,
        });
        // Never block a piece on its own logging: drop the line when the pipe is full.
        let _ = outbox.try_send(frame);
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    rest: Map<String, Value>,
}

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.message = text;
        } else {
            self.rest
                .insert(field.name().to_owned(), Value::String(text));
        }
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_owned();
        } else {
            self.rest
                .insert(field.name().to_owned(), Value::String(value.to_owned()));
        }
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.rest.insert(field.name().to_owned(), value.into());
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.rest.insert(field.name().to_owned(), value.into());
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.rest.insert(field.name().to_owned(), value.into());
    }
}
