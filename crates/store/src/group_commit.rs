//! Group commit of step updates: the attempts of steps that finish at about the same time go
//! to Redis in one round trip.
//!
//! Each `record_step` call hands its update to one committer task and waits for its own
//! result. The committer takes every update waiting when it is free — one when the worker is
//! quiet (no added latency), dozens under load — and writes them as one `MULTI`/`EXEC`
//! pipeline: one write and one read on the socket, one append-only-file write in Redis, instead
//! of one each per step. Every command's result comes back (`ignore_errors`), so an update
//! whose commands failed fails alone, and the others of its batch are unaffected.

use crate::connection::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::{StoreError, run_status_of};
use piecework_core::RunStatus;

/// The most updates written in one round trip.
const MAX_BATCH: usize = 256;

/// One update's commands, and where its caller waits for the outcome.
pub(crate) struct Pending {
    /// Commands of this update; the last one reads the run's status.
    pub(crate) commands: Vec<redis::Cmd>,
    pub(crate) done: oneshot::Sender<Result<RunStatus, StoreError>>,
}

/// The committer's inbox.
#[derive(Clone)]
pub(crate) struct GroupCommit {
    inbox: mpsc::Sender<Pending>,
}

impl GroupCommit {
    /// Starts the committer on `conn`.
    pub(crate) fn start(conn: Connection) -> Self {
        let (inbox, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(commit_loop(conn, rx));
        Self { inbox }
    }

    /// Writes `commands` (ending with `HGET <run> status`) in the next batch; returns the
    /// run's status after them.
    pub(crate) async fn write(&self, commands: Vec<redis::Cmd>) -> Result<RunStatus, StoreError> {
        let (done, outcome) = oneshot::channel();
        self.inbox
            .send(Pending { commands, done })
            .await
            .map_err(|_| StoreError::Unavailable("the step committer stopped".into()))?;
        outcome
            .await
            .map_err(|_| StoreError::Unavailable("the step committer stopped".into()))?
    }
}

async fn commit_loop(mut conn: Connection, mut inbox: mpsc::Receiver<Pending>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while inbox.recv_many(&mut batch, MAX_BATCH).await > 0 {
        commit(&mut conn, std::mem::take(&mut batch)).await;
    }
}

/// Writes one batch and answers each of its callers.
async fn commit(conn: &mut Connection, batch: Vec<Pending>) {
    let mut pipe = redis::pipe();
    pipe.atomic().ignore_errors();
    let mut waiting = Vec::with_capacity(batch.len());
    for pending in batch {
        waiting.push((pending.done, pending.commands.len()));
        for command in pending.commands {
            pipe.add_command(command);
        }
    }
    let replies: Result<Vec<redis::RedisResult<redis::Value>>, _> = pipe.query_async(conn).await;
    let mut replies = match replies {
        Ok(replies) => replies.into_iter(),
        Err(err) => {
            let message = format!("redis: {err}");
            for (done, _) in waiting {
                let _ = done.send(Err(StoreError::Unavailable(message.clone())));
            }
            return;
        }
    };
    for (done, size) in waiting {
        let mine: Vec<_> = replies.by_ref().take(size).collect();
        let outcome = match mine.iter().find_map(|r| r.as_ref().err()) {
            Some(err) => Err(StoreError::Unavailable(format!("redis: {err}"))),
            None => match mine.last() {
                Some(Ok(status)) => run_status_of(status),
                _ => Err(StoreError::Unavailable(
                    "redis: a step update got no answer".into(),
                )),
            },
        };
        let _ = done.send(outcome);
    }
}
