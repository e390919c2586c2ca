//! The embedded sandbox: api, scheduler and worker in one process, on the in-memory bus and
//! store by default or on NATS and Redis. `piecework dev` runs it in the foreground; the end-to-end tests start it in-process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use piecework_core::FlowDefinition;
use piecework_core::flow::StepDef;
use piecework_runtime::{Actor, Runtime};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::infra::{self, Infra};
use piecework_runtime::secrets::Keyring;

fn serve_queues_of(config: &mut Config, flows: &[FlowDefinition]) {
    let used = flows.iter().flat_map(|f| {
        let steps = f.all_steps().into_iter().filter(|s| !s.is_control());
        std::iter::once(f.trigger.queue()).chain(steps.map(StepDef::queue))
    });
    for queue in used {
        if !config.worker.queues.iter().any(|q| q == queue) {
            config.worker.queues.push(queue.to_owned());
        }
    }
}

type Services = JoinSet<(&'static str, anyhow::Result<()>)>;

/// Runs a service as a task that reports its name with its result.
fn spawn_service<E>(
    tasks: &mut Services,
    name: &'static str,
    service: impl Future<Output = Result<(), E>> + Send + 'static,
) where
    E: Into<anyhow::Error>,
{
    tasks.spawn(async move { (name, service.await.map_err(Into::into)) });
}

/// A running sandbox.
pub struct Sandbox {
    pub api_addr: SocketAddr,
    /// The webhook flows it applied whose callers must sign (or send a token).
    pub signed_webhooks: Vec<String>,
    pub runtime: Arc<Runtime>,
    shutdown: CancellationToken,
    tasks: Services,
    pieces: crate::pieces::Running,
}

impl Sandbox {
    /// Starts every service with `flows` applied. The API listens on `config.api.listen`
    /// (port 0 picks a free one; see [`Sandbox::api_addr`]).
    ///
    /// The one embedded worker also serves every queue the given flows route to, since no
    /// other worker exists to serve them.
    ///
    /// Without an API key the API is open (everyone an admin), which is only allowed on a
    /// loopback address.
    pub async fn start(
        config: Config,
        flows: Vec<FlowDefinition>,
        registry: piecework_core::Registry,
        infra: Infra,
        keyring: Keyring,
    ) -> anyhow::Result<Self> {
        Self::start_with(config, flows, registry, infra, keyring, &[]).await
    }

    /// [`Sandbox::start`], also loading the bundle `files` (the demo piece, tests' pieces).
    pub async fn start_with(
        mut config: Config,
        flows: Vec<FlowDefinition>,
        registry: piecework_core::Registry,
        infra: Infra,
        keyring: Keyring,
        files: &[std::path::PathBuf],
    ) -> anyhow::Result<Self> {
        serve_queues_of(&mut config, &flows);
        if config.api.api_key.is_none() {
            if !config.api.listen.ip().is_loopback() {
                anyhow::bail!(
                    "the API would listen on {} with no key: set PW_API_KEY (or PW_API_KEY_FILE) to serve beyond loopback",
                    config.api.listen
                );
            }
            config.api.open = true;
        }
        config.validate()?;
        let (runtime, sources) =
            infra::runtime_with(&config, registry, infra, Some(keyring), files).await?;
        let pieces = sources.spawn();
        let actor = Actor("dev".into());
        let mut signed_webhooks = Vec::new();
        for flow in flows {
            let name = flow.name.clone();
            let applied = runtime
                .apply_flow(flow, &actor)
                .await
                .with_context(|| format!("cannot apply flow `{name}`"))?;
            if applied.webhook_auth.is_some_and(|a| a.needs_secret()) {
                signed_webhooks.push(name);
            }
        }
        let listener = piecework_api::bind(&config.api).await?;
        let api_addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let api = piecework_api::serve(
            listener,
            config.api.clone(),
            runtime.clone(),
            shutdown.child_token(),
        );
        let scheduler = piecework_scheduler::run(
            config.scheduler.clone(),
            runtime.clone(),
            shutdown.child_token(),
        );
        let worker = piecework_worker::run(
            config.worker.clone(),
            runtime.clone(),
            shutdown.child_token(),
        );
        spawn_service(&mut tasks, "api", api);
        spawn_service(&mut tasks, "scheduler", scheduler);
        spawn_service(&mut tasks, "worker", worker);
        Ok(Self {
            api_addr,
            signed_webhooks,
            runtime,
            shutdown,
            tasks,
            pieces,
        })
    }

    /// A token cancelled when the sandbox shuts down, for tasks that live alongside it.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.child_token()
    }

    /// Runs until `stop` is cancelled or a service fails; then shuts everything down.
    pub async fn run_until(mut self, stop: CancellationToken) -> anyhow::Result<()> {
        let failure = tokio::select! {
            () = stop.cancelled() => None,
            Some(joined) = self.tasks.join_next() => Some(joined),
        };
        let result = match failure {
            Some(Ok((service, Err(err)))) => Err(err.context(format!("{service} failed"))),
            Some(Ok((service, Ok(())))) => Err(anyhow::anyhow!("{service} stopped unexpectedly")),
            Some(Err(panic)) => Err(anyhow::anyhow!("a service panicked: {panic}")),
            None => Ok(()),
        };
        self.stop().await?;
        result
    }

    /// Stops every service, waiting for in-flight work within the worker's grace period.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let deadline = Duration::from_secs(60);
        let drained = tokio::time::timeout(deadline, async {
            let mut first_error = None;
            while let Some(joined) = self.tasks.join_next().await {
                match joined {
                    Ok((_, Ok(()))) => {}
                    Ok((service, Err(err))) => {
                        first_error.get_or_insert(err.context(format!("{service} failed")));
                    }
                    Err(panic) => {
                        first_error.get_or_insert(anyhow::anyhow!("a service panicked: {panic}"));
                    }
                }
            }
            first_error
        })
        .await;
        self.pieces.stop().await;
        match drained {
            Ok(None) => Ok(()),
            Ok(Some(err)) => Err(err),
            Err(_) => {
                self.tasks.abort_all();
                anyhow::bail!("services did not stop within {deadline:?}")
            }
        }
    }
}
