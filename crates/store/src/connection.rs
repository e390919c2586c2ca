//! The Redis store's connection, to one Redis or to a Redis Cluster: both multiplex many
//! callers over few sockets and reconnect by themselves; the cluster one also follows the
//! slot map (every key of the store shares one slot, see the `Keys` of the adapter).

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

#[derive(Clone)]
pub(crate) enum Connection {
    One(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::One(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::One(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::One(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

/// Where pub/sub subscriptions (run ends, timers) go: the one Redis, or any node of a
/// cluster — a cluster passes every `PUBLISH` to all its nodes — tried in turn from the last
/// one that worked, so a node that died does not silence them.
#[derive(Clone)]
pub(crate) struct PubSubNodes {
    clients: std::sync::Arc<[redis::Client]>,
    next: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl PubSubNodes {
    pub(crate) fn new(clients: Vec<redis::Client>) -> Self {
        assert!(!clients.is_empty(), "a Redis URL names at least one node");
        Self {
            clients: clients.into(),
            next: std::sync::Arc::default(),
        }
    }

    /// A pub/sub connection to the first node that answers.
    pub(crate) async fn connect(&self) -> redis::RedisResult<redis::aio::PubSub> {
        use std::sync::atomic::Ordering;
        let start = self.next.load(Ordering::Relaxed);
        let mut failed = None;
        for i in 0..self.clients.len() {
            let at = (start + i) % self.clients.len();
            match self.clients[at].get_async_pubsub().await {
                Ok(pubsub) => {
                    self.next.store(at, Ordering::Relaxed);
                    return Ok(pubsub);
                }
                Err(err) => failed = Some(err),
            }
        }
        Err(failed.expect("at least one node was tried"))
    }
}
