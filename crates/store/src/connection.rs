//! The Redis store's connection: to one Redis, to a Redis Cluster, or to the primary that
//! Redis Sentinel names. Each multiplexes many callers over few sockets and reconnects by
//! itself; the cluster one also follows the slot map (every key of the store shares one
//! slot, see the `Keys` of the adapter), the Sentinel one asks the Sentinels again for the
//! primary whenever its connection breaks or lands on a replica.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::SentinelClient;
use redis::{
    Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, ServerErrorKind, Value,
};

#[derive(Clone)]
pub(crate) enum Connection {
    One(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(SentinelConnection),
}

/// A connection to the primary a group of Sentinels names, found again after a failover.
#[derive(Clone)]
pub(crate) struct SentinelConnection {
    sentinels: Arc<tokio::sync::Mutex<SentinelClient>>,
    current: Arc<std::sync::Mutex<Option<MultiplexedConnection>>>,
    response_timeout: Option<Duration>,
}

impl SentinelConnection {
    /// Connects to the primary the Sentinels name now.
    pub(crate) async fn connect(
        sentinels: Arc<tokio::sync::Mutex<SentinelClient>>,
        response_timeout: Option<Duration>,
    ) -> RedisResult<Self> {
        let connection = Self {
            sentinels,
            current: Arc::default(),
            response_timeout,
        };
        connection.primary().await?;
        Ok(connection)
    }

    /// The connection to the primary, asking the Sentinels for it when there is none.
    async fn primary(&self) -> RedisResult<MultiplexedConnection> {
        if let Some(conn) = self.current.lock().unwrap().clone() {
            return Ok(conn);
        }
        let mut sentinels = self.sentinels.lock().await;
        // Another caller may have found it while this one waited.
        if let Some(conn) = self.current.lock().unwrap().clone() {
            return Ok(conn);
        }
        let client = sentinels.async_get_client().await?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(self.response_timeout);
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        *self.current.lock().unwrap() = Some(conn.clone());
        Ok(conn)
    }

    /// Drops the connection after an error that says the primary is gone or is a primary no
    /// more, so the next call asks the Sentinels.
    fn check<T>(&self, result: RedisResult<T>) -> RedisResult<T> {
        if let Err(err) = &result
            && lost_primary(err)
        {
            tracing::warn!(error = %err, "lost the Redis primary; asking the Sentinels again");
            self.current.lock().unwrap().take();
        }
        result
    }
}

/// Whether `err` means the connection no longer reaches a writable primary.
fn lost_primary(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
        || matches!(err.kind(), ErrorKind::Server(ServerErrorKind::ReadOnly))
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::One(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
            Self::Sentinel(sentinel) => Box::pin(async move {
                let mut conn = sentinel.primary().await?;
                sentinel.check(conn.req_packed_command(cmd).await)
            }),
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
            Self::Sentinel(sentinel) => Box::pin(async move {
                let mut conn = sentinel.primary().await?;
                sentinel.check(conn.req_packed_commands(pipeline, offset, count).await)
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::One(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
            Self::Sentinel(sentinel) => sentinel
                .current
                .lock()
                .unwrap()
                .as_ref()
                .map_or(0, ConnectionLike::get_db),
        }
    }
}

/// Where pub/sub subscriptions (run ends, timers) go: the one Redis, or any node of a
/// cluster — a cluster passes every `PUBLISH` to all its nodes — tried in turn from the last
/// one that worked, so a node that died does not silence them; or the primary the Sentinels
/// name now.
#[derive(Clone)]
pub(crate) enum PubSubNodes {
    Nodes {
        clients: Arc<[redis::Client]>,
        next: Arc<std::sync::atomic::AtomicUsize>,
    },
    Sentinel(Arc<tokio::sync::Mutex<SentinelClient>>),
}

impl PubSubNodes {
    pub(crate) fn new(clients: Vec<redis::Client>) -> Self {
        assert!(!clients.is_empty(), "a Redis URL names at least one node");
        Self::Nodes {
            clients: clients.into(),
            next: Arc::default(),
        }
    }

    /// A pub/sub connection to the first node that answers.
    pub(crate) async fn connect(&self) -> RedisResult<redis::aio::PubSub> {
        use std::sync::atomic::Ordering;
        let (clients, next) = match self {
            Self::Nodes { clients, next } => (clients, next),
            Self::Sentinel(sentinels) => {
                let client = sentinels.lock().await.async_get_client().await?;
                return client.get_async_pubsub().await;
            }
        };
        let start = next.load(Ordering::Relaxed);
        let mut failed = None;
        for i in 0..clients.len() {
            let at = (start + i) % clients.len();
            match clients[at].get_async_pubsub().await {
                Ok(pubsub) => {
                    next.store(at, Ordering::Relaxed);
                    return Ok(pubsub);
                }
                Err(err) => failed = Some(err),
            }
        }
        Err(failed.expect("at least one node was tried"))
    }
}
