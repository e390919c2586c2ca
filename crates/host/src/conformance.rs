//! The protocol conformance suite: checks that a piece program speaks piece protocol v1 as
//! `docs/piece-protocol.md` says, whatever it is written in. `piecework piece conformance`
//! runs it against a program or a bundle; the SDK's `serve` is held to it in CI.
//!
//! It talks to the program over raw pipes, not through the host's process layer, so it can
//! also send what a host never would (a wrong major version, a malformed line, an oversized
//! frame) and see that the piece survives it.

use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use piecework_sdk::PieceMetadata;
use piecework_sdk::protocol::{self, Frame, method};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// How long the piece has to answer each request.
const ANSWER: Duration = Duration::from_secs(10);

/// One check and how it went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    /// `None` when it passed, else what went wrong.
    pub failure: Option<String>,
}

/// The outcome of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub checks: Vec<Check>,
    /// The metadata the piece described, when it got that far.
    pub piece: Option<PieceMetadata>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.failure.is_none())
    }
}

struct Peer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    line: Vec<u8>,
}

impl Peer {
    fn start(program: &Path, args: &[OsString], dir: &Path) -> Result<Self, String> {
        let mut child = Command::new(program)
            .args(args)
            .current_dir(dir)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        Ok(Self {
            stdin: child.stdin.take().expect("piped"),
            stdout: BufReader::new(child.stdout.take().expect("piped")),
            child,
            line: Vec::new(),
        })
    }

    async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stdin
            .write_all(bytes)
            .await
            .map_err(|e| format!("cannot write to the piece: {e}"))?;
        self.stdin
            .flush()
            .await
            .map_err(|e| format!("cannot write to the piece: {e}"))
    }

    async fn send(&mut self, id: u64, name: &str, params: &Value) -> Result<(), String> {
        let frame = protocol::encode(&protocol::Request {
            id,
            method: name,
            params,
        });
        self.send_raw(&frame).await
    }

    /// The next frame that answers `id`, skipping notifications (logs).
    async fn answer(&mut self, id: u64) -> Result<Frame, String> {
        let deadline = tokio::time::Instant::now() + ANSWER;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.next_frame())
                .await
                .map_err(|_| format!("no answer to request {id} within {ANSWER:?}"))??;
            if frame.method.is_none() && frame.id == Some(id) {
                return Ok(frame);
            }
            if frame.method.is_none() {
                return Err(format!(
                    "an answer to request {:?} came while waiting for {id}",
                    frame.id
                ));
            }
        }
    }

    async fn next_frame(&mut self) -> Result<Frame, String> {
        self.line.clear();
        let read = self
            .stdout
            .read_until(b'\n', &mut self.line)
            .await
            .map_err(|e| format!("cannot read from the piece: {e}"))?;
        if read == 0 {
            return Err("the piece closed its output (did it exit?)".into());
        }
        if !self.line.ends_with(b"\n") {
            return Err("a frame did not end with a newline".into());
        }
        Frame::parse(&self.line).map_err(|e| format!("it wrote {e}"))
    }

    async fn describe(&mut self, id: u64, version: &str) -> Result<Frame, String> {
        let params = json!({ "protocol": version, "host": "piecework conformance" });
        self.send(id, method::DESCRIBE, &params).await?;
        self.answer(id).await
    }
}

fn error_of(frame: &Frame) -> Option<&protocol::WireError> {
    frame.error.as_ref()
}

/// Runs every check against `program` (started in `dir`).
pub async fn run(program: &Path, dir: &Path) -> Report {
    run_with(program, &[], dir).await
}

/// [`run`] against `program ARGS` (`node piece.js`).
pub async fn run_with(program: &Path, args: &[OsString], dir: &Path) -> Report {
    let mut checks = Vec::new();
    let mut piece = None;
    let mut minor = 0;
    let mut check = |name: &'static str, outcome: Result<(), String>| {
        checks.push(Check {
            name,
            failure: outcome.err(),
        });
    };

    // A fresh process per check that may leave it in a bad state.
    match Peer::start(program, args, dir) {
        Err(err) => check("starts", Err(err)),
        Ok(mut peer) => {
            check(
                "refuses another major version, naming both",
                async {
                    let frame = peer.describe(1, "99.0").await?;
                    let error = error_of(&frame).ok_or("it accepted protocol 99.0")?;
                    if error.message.contains("99.0")
                        && error.message.contains(&format!("{}.", protocol::MAJOR))
                    {
                        Ok(())
                    } else {
                        Err(format!(
                            "the error does not name both versions: {:?}",
                            error.message
                        ))
                    }
                }
                .await,
            );
            let _ = peer.child.kill().await;
        }
    }

    let Ok(mut peer) = Peer::start(program, args, dir) else {
        return Report { checks, piece };
    };
    check(
        "answers a call before describe with an error",
        async {
            peer.send(1, method::RUN_ACTION, &json!({})).await?;
            let frame = peer.answer(1).await?;
            error_of(&frame)
                .map(drop)
                .ok_or_else(|| "it served a call before describe".to_owned())
        }
        .await,
    );
    check(
        "describes itself",
        async {
            let frame = peer.describe(2, protocol::VERSION).await?;
            let described: protocol::Described = frame.outcome().map_err(|e| e.to_string())?;
            protocol::check_version(&described.protocol, "piece").map_err(|e| e.to_string())?;
            check_metadata(&described.piece)?;
            minor = protocol::minor_of(&described.protocol).unwrap_or(0);
            piece = Some(described.piece);
            Ok(())
        }
        .await,
    );
    check(
        "answers health",
        async {
            peer.send(3, method::HEALTH, &json!({})).await?;
            let health: protocol::Health =
                peer.answer(3).await?.outcome().map_err(|e| e.to_string())?;
            if health.status == "ok" {
                Ok(())
            } else {
                Err(format!("status {:?}", health.status))
            }
        }
        .await,
    );
    check(
        "answers an unknown method with an error",
        async {
            peer.send(4, "no.such.method", &json!({})).await?;
            error_of(&peer.answer(4).await?)
                .map(drop)
                .ok_or_else(|| "no error".to_owned())
        }
        .await,
    );
    check(
        "survives a malformed line and an unknown cancel",
        async {
            peer.send_raw(b"this is not json\n").await?;
            let cancel = protocol::encode(&protocol::Notification {
                method: method::CANCEL,
                params: &protocol::Cancel { id: 4242 },
            });
            peer.send_raw(&cancel).await?;
            peer.send(5, method::HEALTH, &json!({})).await?;
            peer.answer(5).await.map(drop)
        }
        .await,
    );
    check("refuses an unknown action and invalid input by error, not by exiting", async {
        let context = json!({ "run": { "run_id": "r", "flow_id": "f", "flow_version": 1, "step": "s", "attempt": 1, "idempotency_key": "r:s" } });
        peer.send(6, method::RUN_ACTION, &json!({ "action": "no_such_action", "input": {}, "context": context })).await?;
        let frame = peer.answer(6).await?;
        let error = error_of(&frame).ok_or("it ran an action that does not exist")?;
        if error.kind != piecework_sdk::ErrorKind::Fatal {
            return Err("an unknown action must be a fatal error".into());
        }
        peer.send(7, method::RUN_ACTION, &json!({ "action": 7, "context": context })).await?;
        error_of(&peer.answer(7).await?).map(drop).ok_or_else(|| "malformed params were accepted".to_owned())
    }.await);
    if minor >= 3 {
        check("refuses to enable a trigger it does not have (1.3)", async {
            let context = json!({ "run": { "run_id": "enable", "flow_id": "f", "flow_version": 1, "step": "trigger", "attempt": 1, "idempotency_key": "enable:trigger" } });
            peer.send(8, method::ENABLE, &json!({ "trigger": "no_such_trigger", "input": {}, "context": context })).await?;
            let frame = peer.answer(8).await?;
            match error_of(&frame) {
                Some(error) if error.kind == piecework_sdk::ErrorKind::Fatal => Ok(()),
                Some(_) => Err("an unknown trigger must be a fatal error".into()),
                None => Err("it enabled a trigger that does not exist".into()),
            }
        }.await);
    }
    check(
        "answers concurrent requests by id",
        async {
            for id in [10, 11, 12] {
                peer.send(id, method::HEALTH, &json!({})).await?;
            }
            let mut seen = Vec::new();
            while seen.len() < 3 {
                let frame = tokio::time::timeout(ANSWER, peer.next_frame())
                    .await
                    .map_err(|_| "timed out")??;
                if frame.method.is_none() {
                    seen.push(frame.id.ok_or("an answer without an id")?);
                }
            }
            seen.sort_unstable();
            if seen == [10, 11, 12] {
                Ok(())
            } else {
                Err(format!("answered {seen:?}"))
            }
        }
        .await,
    );
    check(
        "exits when its input closes",
        async {
            drop(peer.stdin);
            match tokio::time::timeout(Duration::from_secs(5), peer.child.wait()).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("still running 5s after its stdin closed".into()),
            }
        }
        .await,
    );
    Report { checks, piece }
}

/// The described metadata must make a valid piece.
fn check_metadata(metadata: &PieceMetadata) -> Result<(), String> {
    piecework_sdk::piece::check_metadata(metadata).map_err(|e| e.to_string())
}
