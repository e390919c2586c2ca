//! One pool per bundle (name, version, digest): its process is started on first use, kept
//! warm, restarted after a crash with backoff, and stopped when idle or retired.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use backoff::ExponentialBackoff;
use backoff::backoff::Backoff as _;
use piecework_sdk::protocol::{self, DescribeParams, Described, method};
use piecework_sdk::{PieceError, PieceMetadata};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::process::{CallScope, Exit, Label, Launch, Process};

/// A process that lived this long before crashing was healthy: its crash restarts at once.
const STABLE: Duration = Duration::from_secs(60);
/// How long a start that failed for good is remembered before it is tried again.
const FAILED_START: Duration = Duration::from_secs(30);

/// Gets a bundle ready to run (unpacked, verified) and says how to start it.
#[async_trait]
pub trait Prepare: Send + Sync + 'static {
    async fn prepare(&self) -> Result<Launch, PieceError>;
}

/// Identifies a pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub name: String,
    pub version: String,
    pub digest: String,
}

pub struct Pool {
    key: PoolKey,
    label: Label,
    prepare: Box<dyn Prepare>,
    /// What the program must describe itself as: the manifest's metadata.
    expected: PieceMetadata,
    describe: DescribeParams,
    start_timeout: Duration,
    state: tokio::sync::Mutex<State>,
    retired: AtomicBool,
}

struct State {
    process: Option<Arc<Process>>,
    restarts: ExponentialBackoff,
    /// No start before this instant; calls until then get this error.
    blocked: Option<(Instant, PieceError)>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Pool {
    pub fn new(
        key: PoolKey,
        label: Label,
        prepare: Box<dyn Prepare>,
        expected: PieceMetadata,
        describe: DescribeParams,
        start_timeout: Duration,
    ) -> Self {
        Self {
            key,
            label,
            prepare,
            expected,
            describe,
            start_timeout,
            state: tokio::sync::Mutex::new(State {
                process: None,
                restarts: restart_backoff(),
                blocked: None,
            }),
            retired: AtomicBool::new(false),
        }
    }

    pub fn key(&self) -> &PoolKey {
        &self.key
    }

    pub fn label(&self) -> &Label {
        &self.label
    }

    /// Sends one call to the pool's process, starting it if needed.
    pub async fn call<T: DeserializeOwned>(
        &self,
        name: &str,
        params: &impl Serialize,
        scope: Option<CallScope>,
    ) -> Result<T, PieceError> {
        let process = self.process().await?;
        process.call(name, params, scope).await
    }

    /// The running process, started (or restarted) now if there is none.
    pub async fn process(&self) -> Result<Arc<Process>, PieceError> {
        let mut state = self.state.lock().await;
        if let Some(process) = &state.process {
            if process.is_alive() {
                return Ok(process.clone());
            }
            let process = state.process.take().expect("checked above");
            self.note_end(&mut state, &process);
        }
        if let Some((until, error)) = &state.blocked {
            let now = Instant::now();
            if now < *until {
                // A retry before the restart would only fail again: say when to come back.
                let error = error.clone();
                return Err(if error.is_retryable() {
                    error.with_retry_after(*until - now)
                } else {
                    error
                });
            }
            state.blocked = None;
        }
        match self.start().await {
            Ok(process) => {
                state.process = Some(process.clone());
                Ok(process)
            }
            Err(error) => {
                let wait = if error.is_retryable() {
                    state.restarts.next_backoff().unwrap_or(FAILED_START)
                } else {
                    FAILED_START
                };
                state.blocked = Some((Instant::now() + wait, error.clone()));
                Err(error)
            }
        }
    }

    /// Records how a process ended: a crash holds back the next start by the backoff.
    fn note_end(&self, state: &mut State, process: &Process) {
        let Some(Exit::Crashed(why)) = process.exit() else {
            return;
        };
        if process.uptime() >= STABLE {
            state.restarts.reset();
        }
        let wait = state.restarts.next_backoff().unwrap_or(STABLE);
        let error = PieceError::retryable(format!(
            "piece {} crashed ({why}); it is restarted in {}",
            self.label,
            humantime::format_duration(round(wait))
        ));
        tracing::warn!(piece = %self.label.piece, version = %self.label.version, restart_in = ?wait, "restarting a crashed piece process after a backoff");
        state.blocked = Some((Instant::now() + wait, error));
    }

    async fn start(&self) -> Result<Arc<Process>, PieceError> {
        let launch = self.prepare.prepare().await?;
        let process = Process::spawn(launch).await?;
        let described = tokio::time::timeout(
            self.start_timeout,
            process.call::<Described>(method::DESCRIBE, &self.describe, None),
        )
        .await;
        let described = match described {
            Ok(Ok(described)) => described,
            Ok(Err(error)) => {
                process.end(Exit::Killed("its describe failed".into()));
                return Err(error.context(format!("piece {} did not start", self.label)));
            }
            Err(_) => {
                process.end(Exit::Killed("it did not answer describe".into()));
                return Err(PieceError::retryable(format!(
                    "piece {} did not answer `describe` within {}",
                    self.label,
                    humantime::format_duration(self.start_timeout)
                )));
            }
        };
        if let Err(error) = self.check(&described) {
            process.end(Exit::Killed("it is not the piece its bundle says".into()));
            return Err(error);
        }
        process.set_protocol(&described.protocol);
        tracing::info!(piece = %self.label.piece, version = %self.label.version, digest = %self.label.digest, pid = process.pid(), "piece process ready");
        Ok(process)
    }

    /// The program must speak our protocol and be the piece its manifest describes.
    fn check(&self, described: &Described) -> Result<(), PieceError> {
        protocol::check_version(&described.protocol, "piece")?;
        let (want, got) = (&self.expected, &described.piece);
        if want.name != got.name || want.version != got.version {
            return Err(PieceError::fatal(format!(
                "the bundle is {} {} but its program describes itself as {} {}",
                want.name, want.version, got.name, got.version
            )));
        }
        if want != got {
            return Err(PieceError::fatal(format!(
                "piece {}: the program's metadata differs from its piece.json; rebuild the bundle with `piecework piece build`",
                self.label
            )));
        }
        Ok(())
    }

    /// Marks the pool as replaced: its process stops once idle.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Stops the process if it has been idle for `idle`, or at once if retired and idle.
    /// Returns whether a process was stopped.
    pub fn tidy(&self, idle: Duration) -> bool {
        let Ok(mut state) = self.state.try_lock() else {
            return false;
        };
        let Some(process) = &state.process else {
            return false;
        };
        if !process.is_alive() {
            let process = state.process.take().expect("checked above");
            self.note_end(&mut state, &process);
            return false;
        }
        let quiet = process.in_flight() == 0;
        if quiet && (self.is_retired() || process.idle_for() >= idle) {
            tracing::debug!(piece = %self.label.piece, version = %self.label.version, retired = self.is_retired(), "stopping an idle piece process");
            process.end(Exit::Stopped);
            state.process = None;
            return true;
        }
        false
    }

    /// Stops the process, waiting for it to exit.
    pub async fn stop(&self) {
        let process = self.state.lock().await.process.take();
        if let Some(process) = process {
            process.end(Exit::Stopped);
            process.exited().await;
        }
    }

    /// The running process, if any (for tests and `health`).
    pub async fn current(&self) -> Option<Arc<Process>> {
        self.state.lock().await.process.clone()
    }
}

fn restart_backoff() -> ExponentialBackoff {
    let mut backoff = ExponentialBackoff {
        initial_interval: Duration::from_millis(500),
        multiplier: 2.0,
        randomization_factor: 0.2,
        max_interval: Duration::from_secs(30),
        max_elapsed_time: None,
        ..ExponentialBackoff::default()
    };
    backoff.reset();
    backoff
}

fn round(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis().try_into().unwrap_or(u64::MAX))
}
