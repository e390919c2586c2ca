//! One piece process: spawned under its limits, spoken to over its pipes.
//!
//! Four tasks serve a process: the writer (frames to stdin, batched), the reader (frames from
//! stdout: answers, the piece's store requests, `log` and `progress`), the stderr forwarder
//! (lines into the host's log), and the supervisor, which owns the child, reaps it and fails
//! every call still in flight when it dies. A call dropped before its answer (the step timed
//! out) sends `cancel`; a piece that does not answer a cancelled call within the grace period
//! is killed.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use piecework_sdk::mask::Secrets;
use piecework_sdk::protocol::{self, Frame, LogLevel, Read, method};
use piecework_sdk::{Context, PieceError, Scope};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::io::{
    AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader, BufWriter,
};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot, watch};

/// Longest stderr line forwarded whole; longer ones are cut.
const STDERR_LINE: usize = 8 * 1024;
/// Longest store key a piece may use.
const MAX_KEY: usize = 512;

/// Which piece a process runs, for logs and errors.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Label {
    pub piece: String,
    pub version: String,
    /// Short digest of the bundle.
    pub digest: String,
}

impl std::fmt::Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.piece, self.version)
    }
}

/// Everything needed to start a process.
#[derive(Debug, Clone)]
pub struct Launch {
    pub label: Label,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Working directory: the unpacked bundle.
    pub dir: PathBuf,
    /// The child's whole environment.
    pub env: Vec<(OsString, OsString)>,
    /// Address-space limit (`RLIMIT_AS`).
    pub memory_bytes: u64,
    pub max_message_bytes: usize,
    /// Calls in flight at once.
    pub concurrency: usize,
    /// How long a cancelled call may take to stop before the process is killed.
    pub cancel_grace: Duration,
}

/// The call a piece's request or log belongs to, as the host knows it.
pub struct CallScope {
    /// The call's context without the connection's values.
    pub ctx: Context,
    /// The connection's secret values, masked in whatever the piece logs.
    pub secrets: Secrets,
}

impl CallScope {
    pub fn of(ctx: &Context, secrets: Secrets) -> Self {
        Self {
            ctx: ctx.without_auth(),
            secrets,
        }
    }
}

/// A call waiting for its answer.
struct Pending {
    answer: oneshot::Sender<Result<Frame, PieceError>>,
    scope: Option<Arc<CallScope>>,
}

/// Why a process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The host asked it to stop (idle, retired, shutting down).
    Stopped,
    /// The host killed it: why.
    Killed(String),
    /// It ended on its own.
    Crashed(String),
}

impl Exit {
    pub fn is_crash(&self) -> bool {
        matches!(self, Exit::Crashed(_))
    }
}

struct Shared {
    label: Label,
    calls: Mutex<HashMap<u64, Pending>>,
    /// Cancelled calls whose answer (the acknowledgement) has not come yet.
    cancelled: Mutex<HashSet<u64>>,
    /// Set when the process is gone or going; no new call starts.
    closing: AtomicBool,
    /// Tells the writer to close stdin: the piece's signal to exit.
    close_stdin: Notify,
}

impl Shared {
    fn scope_of(&self, call: u64) -> Option<Arc<CallScope>> {
        self.calls.lock().unwrap().get(&call)?.scope.clone()
    }

    /// The run of the only call in flight, for stderr lines (which carry no call id).
    fn sole_run(&self) -> Option<String> {
        let calls = self.calls.lock().unwrap();
        let mut scopes = calls.values().filter_map(|p| p.scope.as_ref());
        let only = scopes.next()?;
        scopes.next().is_none().then(|| only.ctx.run.run_id.clone())
    }

    fn secrets(&self) -> Secrets {
        let calls = self.calls.lock().unwrap();
        calls
            .values()
            .filter_map(|p| p.scope.as_ref())
            .fold(Secrets::default(), |all, s| all.merge(&s.secrets))
    }

    fn fail_all(&self, error: &PieceError) {
        let calls: Vec<Pending> = self.calls.lock().unwrap().drain().map(|(_, p)| p).collect();
        for pending in calls {
            let _ = pending.answer.send(Err(error.clone()));
        }
    }
}

/// A running piece process.
pub struct Process {
    shared: Arc<Shared>,
    outbox: mpsc::UnboundedSender<Vec<u8>>,
    slots: Arc<Semaphore>,
    next_id: AtomicU64,
    /// Asks the supervisor to end the process.
    stop: mpsc::UnboundedSender<Exit>,
    exit: watch::Receiver<Option<Exit>>,
    pid: Option<u32>,
    started: Instant,
    max_message: usize,
    cancel_grace: Duration,
    last_used: Mutex<Instant>,
    /// The protocol minor the piece answered `describe` with: which optional methods it knows.
    minor: AtomicU64,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("piece", &self.shared.label)
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

impl Process {
    /// Starts the process. It is not usable before a successful `describe`.
    pub async fn spawn(launch: Launch) -> Result<Arc<Process>, PieceError> {
        let mut command = Command::new(&launch.program);
        command
            .args(&launch.args)
            .current_dir(&launch.dir)
            .env_clear()
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        limits::apply(&mut command, launch.memory_bytes);
        let mut attempts = 0;
        let mut child = loop {
            match command.spawn() {
                Ok(child) => break child,
                // A just-unpacked program can be "busy" for an instant: another thread's fork
                // briefly holds the handle it was written through. It passes; try again.
                Err(err) if err.raw_os_error() == Some(libc::ETXTBSY) && attempts < 20 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                Err(err) => {
                    return Err(PieceError::fatal(format!(
                        "cannot start piece {} ({}): {err}",
                        launch.label,
                        launch.program.display()
                    )));
                }
            }
        };
        let pid = child.id();
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");

        let shared = Arc::new(Shared {
            label: launch.label.clone(),
            calls: Mutex::default(),
            cancelled: Mutex::default(),
            closing: AtomicBool::new(false),
            close_stdin: Notify::new(),
        });
        let (outbox, queued) = mpsc::unbounded_channel();
        let (stop, stop_requests) = mpsc::unbounded_channel();
        let (exit_tx, exit) = watch::channel(None);
        tokio::spawn(write_frames(shared.clone(), queued, stdin));
        tokio::spawn(forward_stderr(shared.clone(), stderr, pid));
        tokio::spawn(supervise(
            shared.clone(),
            child,
            stop_requests,
            exit_tx,
            launch.cancel_grace,
        ));
        let process = Arc::new(Process {
            shared,
            outbox,
            slots: Arc::new(Semaphore::new(launch.concurrency.max(1))),
            next_id: AtomicU64::new(1),
            stop,
            exit,
            pid,
            started: Instant::now(),
            max_message: launch.max_message_bytes,
            cancel_grace: launch.cancel_grace,
            last_used: Mutex::new(Instant::now()),
            minor: AtomicU64::new(0),
        });
        tokio::spawn(read_frames(process.clone_link(), stdout));
        tracing::debug!(piece = %launch.label.piece, version = %launch.label.version, pid, "piece process started");
        Ok(process)
    }

    /// What the reader needs, without keeping the process alive.
    fn clone_link(&self) -> Link {
        Link {
            shared: self.shared.clone(),
            outbox: self.outbox.clone(),
            stop: self.stop.clone(),
            exit: self.exit.clone(),
            max_message: self.max_message,
        }
    }

    pub fn label(&self) -> &Label {
        &self.shared.label
    }

    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Records the protocol version the piece described itself with.
    pub fn set_protocol(&self, version: &str) {
        let minor = piecework_sdk::protocol::minor_of(version).unwrap_or(0);
        self.minor.store(minor, Ordering::Relaxed);
    }

    /// Whether the piece speaks protocol 1.`minor` or later.
    pub fn speaks(&self, minor: u64) -> bool {
        self.minor.load(Ordering::Relaxed) >= minor
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// How it ended, once it has.
    pub fn exit(&self) -> Option<Exit> {
        self.exit.borrow().clone()
    }

    pub fn is_alive(&self) -> bool {
        !self.shared.closing.load(Ordering::Acquire) && self.exit.borrow().is_none()
    }

    pub fn in_flight(&self) -> usize {
        self.shared.calls.lock().unwrap().len()
    }

    /// Time since the last call started or ended.
    pub fn idle_for(&self) -> Duration {
        self.last_used.lock().unwrap().elapsed()
    }

    /// Waits until the process has ended.
    pub async fn exited(&self) -> Exit {
        let mut exit = self.exit.clone();
        loop {
            if let Some(exit) = exit.borrow_and_update().clone() {
                return exit;
            }
            if exit.changed().await.is_err() {
                return Exit::Crashed("its supervisor is gone".into());
            }
        }
    }

    /// Ends the process: `Stopped` closes its stdin and lets it exit, `Killed` kills it.
    pub fn end(&self, how: Exit) {
        self.shared.closing.store(true, Ordering::Release);
        let _ = self.stop.send(how);
    }

    /// Sends a request and waits for its answer. Dropping the future cancels the call.
    pub async fn call<T: DeserializeOwned>(
        self: &Arc<Self>,
        name: &str,
        params: &impl Serialize,
        scope: Option<CallScope>,
    ) -> Result<T, PieceError> {
        let _slot = self.slots.acquire().await.map_err(|_| self.gone_error())?;
        if !self.is_alive() {
            return Err(self.gone_error());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = protocol::encode(&protocol::Request {
            id,
            method: name,
            params,
        });
        if frame.len() > self.max_message {
            return Err(PieceError::fatal(format!(
                "the request is {} bytes, more than piece {} accepts ({}; limits.max_message_bytes)",
                frame.len(),
                self.shared.label,
                self.max_message
            )));
        }
        let (answer, answered) = oneshot::channel();
        self.shared.calls.lock().unwrap().insert(
            id,
            Pending {
                answer,
                scope: scope.map(Arc::new),
            },
        );
        self.touch();
        if self.outbox.send(frame).is_err() {
            self.shared.calls.lock().unwrap().remove(&id);
            return Err(self.gone_error());
        }
        let mut guard = CancelOnDrop {
            process: self,
            id,
            armed: true,
        };
        let outcome = answered.await;
        guard.armed = false;
        self.touch();
        match outcome {
            Ok(Ok(frame)) => frame.outcome(),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(self.gone_error()),
        }
    }

    fn touch(&self) {
        *self.last_used.lock().unwrap() = Instant::now();
    }

    /// The error of a call that the process's end interrupted or prevented.
    fn gone_error(&self) -> PieceError {
        let why = match self.exit() {
            Some(Exit::Crashed(why) | Exit::Killed(why)) => why,
            Some(Exit::Stopped) => "it was stopped".into(),
            None => "it is shutting down".into(),
        };
        PieceError::retryable(format!("piece process {} ended: {why}", self.shared.label))
    }

    /// Stops work on call `id`: tells the piece, and kills the process if the piece does
    /// not acknowledge within the grace period.
    fn cancel(&self, id: u64) {
        if self.shared.calls.lock().unwrap().remove(&id).is_none() {
            return;
        }
        self.shared.cancelled.lock().unwrap().insert(id);
        let notice = protocol::encode(&protocol::Notification {
            method: method::CANCEL,
            params: &protocol::Cancel { id },
        });
        let _ = self.outbox.send(notice);
        let shared = self.shared.clone();
        let stop = self.stop.clone();
        let grace = self.cancel_grace;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            tokio::time::sleep(grace).await;
            let ignored = shared.cancelled.lock().unwrap().remove(&id);
            if ignored && !shared.closing.swap(true, Ordering::AcqRel) {
                tracing::warn!(piece = %shared.label.piece, version = %shared.label.version, call = id, grace = ?grace, "piece did not stop a cancelled call; killing its process");
                let _ = stop.send(Exit::Killed(format!(
                    "it did not stop a cancelled call within {}",
                    humantime::format_duration(grace)
                )));
            }
        });
    }
}

/// Cancels the call if its future is dropped before the answer came.
struct CancelOnDrop<'a> {
    process: &'a Process,
    id: u64,
    armed: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.process.cancel(self.id);
        }
    }
}

/// The reader's handle: enough to answer the piece and stop the process.
#[derive(Clone)]
struct Link {
    shared: Arc<Shared>,
    outbox: mpsc::UnboundedSender<Vec<u8>>,
    stop: mpsc::UnboundedSender<Exit>,
    exit: watch::Receiver<Option<Exit>>,
    max_message: usize,
}

impl Link {
    fn kill(&self, why: String) {
        self.shared.closing.store(true, Ordering::Release);
        let _ = self.stop.send(Exit::Killed(why));
    }

    fn answer(&self, id: u64, outcome: Result<Value, PieceError>) {
        let frame = match outcome {
            Ok(value) => protocol::encode(&protocol::Response {
                id,
                result: Some(&value),
                error: None,
            }),
            Err(err) => protocol::encode(&protocol::Response::<Value> {
                id,
                result: None,
                error: Some((&err).into()),
            }),
        };
        let _ = self.outbox.send(frame);
    }
}

async fn write_frames(
    shared: Arc<Shared>,
    mut queued: mpsc::UnboundedReceiver<Vec<u8>>,
    stdin: ChildStdin,
) {
    let mut stdin = BufWriter::new(stdin);
    loop {
        let frame = tokio::select! {
            frame = queued.recv() => frame,
            () = shared.close_stdin.notified() => None,
        };
        let Some(frame) = frame else { break };
        if stdin.write_all(&frame).await.is_err() {
            return;
        }
        while let Ok(frame) = queued.try_recv() {
            if stdin.write_all(&frame).await.is_err() {
                return;
            }
        }
        if stdin.flush().await.is_err() {
            return;
        }
    }
    // Dropping stdin sends EOF: a served piece exits when it sees it.
}

async fn read_frames(link: Link, stdout: ChildStdout) {
    let mut reader = BufReader::with_capacity(64 * 1024, stdout);
    let mut line = Vec::with_capacity(4096);
    loop {
        match protocol::read_frame(&mut reader, &mut line, link.max_message).await {
            Ok(Read::Closed) | Err(_) => break,
            Ok(Read::TooLong { bytes, head }) => {
                let error = PieceError::fatal(format!(
                    "piece {} answered with {bytes} bytes, more than the limit of {} (limits.max_message_bytes)",
                    link.shared.label, link.max_message
                ));
                let pending = protocol::id_in_head(&head)
                    .and_then(|id| link.shared.calls.lock().unwrap().remove(&id));
                match pending {
                    Some(pending) => {
                        let _ = pending.answer.send(Err(error));
                    }
                    None => {
                        link.kill(error.to_string());
                        break;
                    }
                }
            }
            Ok(Read::Frame) => match Frame::parse(&line) {
                Ok(frame) => handle_frame(&link, frame),
                Err(problem) => {
                    let text = String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned();
                    let text = link.shared.secrets().mask(&text).into_owned();
                    tracing::warn!(piece = %link.shared.label.piece, version = %link.shared.label.version, problem, line = %text, "piece wrote to stdout what is not a protocol frame (pieces log with tracing or to stderr)");
                }
            },
        }
    }
    // The piece closed its stdout: it is exiting, or it can no longer answer anyway.
    let mut exit = link.exit.clone();
    let exited = tokio::time::timeout(Duration::from_secs(2), exit.wait_for(Option::is_some));
    if exited.await.is_err() && !link.shared.closing.load(Ordering::Acquire) {
        link.kill("it closed its standard output".into());
    }
}

fn handle_frame(link: &Link, frame: Frame) {
    let Some(name) = frame.method.clone() else {
        let Some(id) = frame.id else { return };
        let pending = link.shared.calls.lock().unwrap().remove(&id);
        match pending {
            Some(pending) => {
                let _ = pending.answer.send(Ok(frame));
            }
            None => {
                // The acknowledgement of a cancel, or a stray answer.
                link.shared.cancelled.lock().unwrap().remove(&id);
            }
        }
        return;
    };
    match (name.as_str(), frame.id) {
        (method::LOG, _) => log(link, &frame),
        (method::PROGRESS, _) => {
            if let Ok(progress) = frame.params::<protocol::Progress>()
                && let Some(scope) = link.shared.scope_of(progress.call)
            {
                scope.ctx.progress(&scope.secrets.mask(&progress.message));
            }
        }
        (method::STORE_GET | method::STORE_PUT | method::STORE_DELETE, Some(id)) => {
            let link = link.clone();
            tokio::spawn(async move {
                let outcome = store_op(&link.shared, &name, &frame).await;
                link.answer(id, outcome);
            });
        }
        (other, Some(id)) => link.answer(
            id,
            Err(PieceError::fatal(format!(
                "the host has no method `{other}`"
            ))),
        ),
        (_, None) => {}
    }
}

/// A piece's store request, in the scope of the call it serves.
async fn store_op(shared: &Shared, name: &str, frame: &Frame) -> Result<Value, PieceError> {
    let op: protocol::StoreOp = frame.params()?;
    let scope = shared.scope_of(op.call).ok_or_else(|| {
        PieceError::fatal(format!(
            "no call {} is in flight: the store is only available during a call",
            op.call
        ))
    })?;
    if op.key.is_empty() || op.key.len() > MAX_KEY {
        return Err(PieceError::fatal(format!(
            "store keys must be 1-{MAX_KEY} bytes"
        )));
    }
    let store = &scope.ctx.store;
    let scope_kind: Scope = op.scope;
    match name {
        method::STORE_GET => Ok(store.get(scope_kind, &op.key).await?.unwrap_or(Value::Null)),
        method::STORE_PUT => {
            let value = op
                .value
                .ok_or_else(|| PieceError::fatal("store.put needs a `value`"))?;
            store.put(scope_kind, &op.key, value).await?;
            Ok(Value::Null)
        }
        _ => Ok(Value::Bool(store.delete(scope_kind, &op.key).await?)),
    }
}

/// A `log` notification, into the host's log with the run's fields and secrets masked.
fn log(link: &Link, frame: &Frame) {
    let Ok(entry) = frame.params::<protocol::Log>() else {
        return;
    };
    let scope = entry.call.and_then(|call| link.shared.scope_of(call));
    let secrets = scope
        .as_ref()
        .map_or_else(Secrets::default, |s| s.secrets.clone());
    let message = secrets.mask(&entry.message).into_owned();
    let fields = if entry.fields.is_empty() {
        String::new()
    } else {
        secrets
            .mask(&Value::Object(entry.fields).to_string())
            .into_owned()
    };
    let run_id = scope.as_ref().map_or("", |s| s.ctx.run.run_id.as_str());
    let step = scope.as_ref().map_or("", |s| s.ctx.run.step.as_str());
    let label = &link.shared.label;
    macro_rules! emit {
        ($level:ident) => {
            tracing::$level!(target: "piece", piece = %label.piece, version = %label.version, run_id = %run_id, step = %step, fields = %fields, "{message}")
        };
    }
    match entry.level {
        LogLevel::Error => emit!(error),
        LogLevel::Warn => emit!(warn),
        LogLevel::Info => emit!(info),
        LogLevel::Debug => emit!(debug),
        LogLevel::Trace => emit!(trace),
    }
}

async fn forward_stderr(
    shared: Arc<Shared>,
    stderr: tokio::process::ChildStderr,
    pid: Option<u32>,
) {
    let mut lines = BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut lines)
            .take(STDERR_LINE as u64)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        if text.is_empty() {
            continue;
        }
        let secrets = shared.secrets();
        let text = secrets.mask(text);
        let run_id = shared.sole_run().unwrap_or_default();
        tracing::info!(target: "piece", piece = %shared.label.piece, version = %shared.label.version, pid, run_id = %run_id, stream = "stderr", "{text}");
    }
}

/// Owns the child: reaps it, or stops it when asked, then fails what is still in flight.
async fn supervise(
    shared: Arc<Shared>,
    mut child: Child,
    mut stop: mpsc::UnboundedReceiver<Exit>,
    exit_tx: watch::Sender<Option<Exit>>,
    grace: Duration,
) {
    let exit = tokio::select! {
        status = child.wait() => Exit::Crashed(describe_status(status)),
        requested = stop.recv() => match requested.unwrap_or(Exit::Stopped) {
            Exit::Stopped => {
                shared.close_stdin.notify_one();
                match tokio::time::timeout(grace, child.wait()).await {
                    Ok(_) => Exit::Stopped,
                    Err(_) => {
                        let _ = child.kill().await;
                        Exit::Killed(format!("it did not exit within {} of being asked to", humantime::format_duration(grace)))
                    }
                }
            }
            other => {
                let _ = child.start_kill();
                match child.wait().await {
                    // It had died on its own: say how.
                    Ok(status) if !killed_by_sigkill(status) => Exit::Crashed(describe_status(Ok(status))),
                    _ => other,
                }
            }
        },
    };
    shared.closing.store(true, Ordering::Release);
    let error = match &exit {
        Exit::Crashed(why) | Exit::Killed(why) => {
            PieceError::retryable(format!("piece process {} ended: {why}", shared.label))
        }
        Exit::Stopped => {
            PieceError::retryable(format!("piece process {} was stopped", shared.label))
        }
    };
    if exit.is_crash() {
        tracing::warn!(piece = %shared.label.piece, version = %shared.label.version, in_flight = shared.calls.lock().unwrap().len(), reason = %error, "piece process crashed");
    } else {
        tracing::debug!(piece = %shared.label.piece, version = %shared.label.version, ?exit, "piece process ended");
    }
    shared.fail_all(&error);
    let _ = exit_tx.send(Some(exit));
}

fn killed_by_sigkill(status: ExitStatus) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt as _;
        status.signal() == Some(9)
    }
    #[cfg(not(unix))]
    {
        let _ = status;
        true
    }
}

fn describe_status(status: std::io::Result<ExitStatus>) -> String {
    match status {
        Err(err) => format!("cannot wait for it: {err}"),
        Ok(status) => {
            #[cfg(unix)]
            {
                use std::os::unix::process::ExitStatusExt as _;
                if let Some(signal) = status.signal() {
                    let name = match signal {
                        6 => " (SIGABRT: it aborted, e.g. out of memory under its limit)",
                        9 => " (SIGKILL)",
                        11 => " (SIGSEGV)",
                        15 => " (SIGTERM)",
                        _ => "",
                    };
                    return format!("killed by signal {signal}{name}");
                }
            }
            match status.code() {
                Some(101) => {
                    "exited with code 101 (a Rust panic; its message is in the log)".into()
                }
                Some(code) => format!("exited with code {code}"),
                None => "exited".into(),
            }
        }
    }
}

/// Resource limits applied in the child before it runs the piece.
mod limits {
    use tokio::process::Command;

    /// Limits the address space and turns off core dumps (a core file would hold the
    /// connection values the process was handed).
    #[cfg(unix)]
    #[allow(unsafe_code)]
    pub fn apply(command: &mut Command, memory_bytes: u64) {
        let memory = libc::rlimit {
            rlim_cur: memory_bytes,
            rlim_max: memory_bytes,
        };
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: the closure runs in the forked child before `exec`, where only
        // async-signal-safe functions may be called. It calls `setrlimit` (async-signal-safe)
        // and builds an `io::Error` from errno, which does not allocate; it takes no locks.
        unsafe {
            command.pre_exec(move || {
                for (resource, limit) in [(libc::RLIMIT_AS, &memory), (libc::RLIMIT_CORE, &no_core)]
                {
                    if libc::setrlimit(resource, limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }

    #[cfg(not(unix))]
    pub fn apply(_: &mut Command, _: u64) {}
}
