//! Run-finished notifications for the Redis store's `wait_run_finished` (synchronous
//! webhooks): one pattern subscription per process, opened on first use, shared by every
//! waiting request, instead of a new connection and subscription per request.
//!
//! A waiter registers before it reads the run's status, so a finish that lands in between still
//! wakes it. Should the subscription drop (Redis restarting), it is reopened, and waiters also
//! re-read the run every [`FALLBACK_POLL`] so a notification lost meanwhile costs at most that.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use tokio::sync::{OnceCell, oneshot};

use crate::connection::PubSubNodes;

/// Channel prefix of run-finished notifications: `pw:run-done:{run id}`.
pub(crate) const PREFIX: &str = "pw:run-done:";
/// How often a waiter re-reads the run in case a notification was lost.
pub(crate) const FALLBACK_POLL: Duration = Duration::from_millis(500);
/// Delay before reopening a dropped subscription.
const RESUBSCRIBE_AFTER: Duration = Duration::from_millis(500);

/// Waiters by run id; each gets the notification's payload (how the run ended, as JSON).
type Waiters = Arc<Mutex<HashMap<String, Vec<oneshot::Sender<String>>>>>;

pub(crate) struct RunDone {
    nodes: PubSubNodes,
    waiters: Waiters,
    subscribed: OnceCell<()>,
}

/// A registered interest in one run's finish; unregisters when dropped.
pub(crate) struct Waiter {
    run_id: String,
    waiters: Waiters,
    pub(crate) finished: oneshot::Receiver<String>,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.finished.close();
        let mut waiters = self.waiters.lock().unwrap();
        if let Some(senders) = waiters.get_mut(&self.run_id) {
            senders.retain(|s| !s.is_closed());
            if senders.is_empty() {
                waiters.remove(&self.run_id);
            }
        }
    }
}

impl RunDone {
    pub(crate) fn new(nodes: PubSubNodes) -> Self {
        Self {
            nodes,
            waiters: Waiters::default(),
            subscribed: OnceCell::new(),
        }
    }

    /// Registers for `run_id`'s finish, subscribing first if this is the first waiter ever.
    pub(crate) async fn register(&self, run_id: &str) -> redis::RedisResult<Waiter> {
        self.subscribed
            .get_or_try_init(|| async {
                let stream = subscribe(&self.nodes).await?;
                tokio::spawn(listen(self.nodes.clone(), stream, self.waiters.clone()));
                redis::RedisResult::Ok(())
            })
            .await?;
        let (sender, finished) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap()
            .entry(run_id.to_owned())
            .or_default()
            .push(sender);
        Ok(Waiter {
            run_id: run_id.to_owned(),
            waiters: self.waiters.clone(),
            finished,
        })
    }
}

async fn subscribe(nodes: &PubSubNodes) -> redis::RedisResult<redis::aio::PubSubStream> {
    let mut pubsub = nodes.connect().await?;
    pubsub.psubscribe(format!("{PREFIX}*")).await?;
    Ok(pubsub.into_on_message())
}

/// Wakes the waiters of every run-finished message; reopens the subscription when it drops.
async fn listen(nodes: PubSubNodes, mut stream: redis::aio::PubSubStream, waiters: Waiters) {
    loop {
        while let Some(message) = stream.next().await {
            let Some(run_id) = message.get_channel_name().strip_prefix(PREFIX) else {
                continue;
            };
            let woken = waiters.lock().unwrap().remove(run_id);
            if let Some(senders) = woken {
                let payload: String = message.get_payload().unwrap_or_default();
                for sender in senders {
                    let _ = sender.send(payload.clone());
                }
            }
        }
        tracing::debug!("run-finished subscription dropped; reopening");
        loop {
            tokio::time::sleep(RESUBSCRIBE_AFTER).await;
            match subscribe(&nodes).await {
                Ok(reopened) => {
                    stream = reopened;
                    break;
                }
                Err(err) => {
                    tracing::debug!(error = %err, "cannot reopen the run-finished subscription yet")
                }
            }
        }
    }
}
