//! What each subcommand does.

use std::io::Write;

use anyhow::{Context as _, bail};
use tokio_util::sync::CancellationToken;

use crate::cli::{
    ApiArgs, Command, ConnectionArgs, ConnectionCommand, DevArgs, FlowCommand, KeyCommand,
    PieceCommand, SchedulerArgs, WorkerArgs,
};
use crate::client::ApiClient;
use crate::config::Config;
use crate::dev::Sandbox;
use crate::health::{self, MetricsSource, ReadyCheck};
use crate::infra::{self, Infra};
use crate::{feed, flows, registry};

pub async fn run(command: Command, shutdown: CancellationToken) -> anyhow::Result<()> {
    match command {
        Command::Dev(args) => dev(args, shutdown).await,
        Command::Api(args) => api(args, shutdown).await,
        Command::Scheduler(args) => scheduler(args, shutdown).await,
        Command::Worker(args) => worker(args, shutdown).await,
        Command::Piece(PieceCommand::Test {
            piece,
            name,
            input,
            auth,
            connection,
            owner,
        }) => {
            crate::piece_test::run(
                &piece,
                &name,
                &input,
                auth.as_deref(),
                connection.as_deref(),
                &owner,
            )
            .await
        }
        Command::Piece(command) => piece(command),
        Command::Connection(args) => connection(args).await,
        Command::Audit(args) => crate::audit::run(args, shutdown).await,
        Command::Doctor(args) => crate::doctor::run(&args.common).await,
        Command::Key(KeyCommand::Generate { id }) => {
            println!(
                "{}",
                piecework_runtime::secrets::Keyring::generate_spec(&id)
            );
            Ok(())
        }
        Command::Flow(command) => flow(command).await,
    }
}

async fn dev(args: DevArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let infra = Infra {
        nats: args.common.nats_url.is_some(),
        redis: args.common.redis_url.is_some(),
    };
    let config = Config::load(&args.common, |config| {
        if let Some(listen) = args.listen {
            config.api.listen = listen;
        }
        if let Some(key) = args.api_key.as_ref().filter(|k| !k.is_empty()) {
            config.api.api_key = Some(key.clone());
        }
        if let Some(concurrency) = args.concurrency {
            config.worker.concurrency = concurrency;
        }
    })?;
    let registry = registry::pieces()?;
    let mut definitions = if args.no_examples {
        Vec::new()
    } else {
        flows::examples()?
    };
    if let Some(dir) = &args.flows {
        for file in flows::files_in(dir)? {
            definitions.push(flows::parse_file(&file)?);
        }
    }
    let names: Vec<String> = definitions.iter().map(|f| f.name.clone()).collect();
    let (keyring, ephemeral) = match infra::keyring(&args.common, false)? {
        Some(keyring) => (keyring, false),
        None => (
            piecework_runtime::secrets::Keyring::parse(
                &piecework_runtime::secrets::Keyring::generate_spec("dev"),
            )?,
            true,
        ),
    };
    let sandbox = Sandbox::start(config, definitions, registry, infra, keyring).await?;
    let addr = sandbox.api_addr;
    let mock = if names
        .iter()
        .any(|n| n == "auto-assign" || n == "api-health")
    {
        Some(crate::demo::start(&sandbox.runtime, std::time::Duration::from_secs(7)).await?)
    } else {
        None
    };
    let persisted = if infra == Infra::MEMORY {
        " (nothing is persisted)"
    } else {
        ""
    };
    println!(
        "piecework dev: api, scheduler and worker on {}{persisted}",
        infra.describe()
    );
    println!("  api     http://{addr}   (GET /v1/runs, GET /v1/pieces, POST /v1/flows)");
    println!("  watch   http://{addr}/metrics, GET /v1/audit, PW_OTLP_ENDPOINT for traces");
    println!(
        "  flows   {}",
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    );
    if names.iter().any(|n| n == "echo") {
        println!(
            "  try     curl -s -X POST http://{addr}/v1/webhooks/echo/sync -H 'content-type: application/json' -d '{{\"name\":\"ada\"}}'"
        );
    }
    if let Some(mock) = &mock {
        println!(
            "  demo    a mock ticketing API at {} files a ticket every 7s; `auto-assign` assigns each once",
            mock.url
        );
    }
    if ephemeral {
        println!(
            "  keys    PW_ENCRYPTION_KEY is not set: connections are encrypted with a key that lives only as long as this process"
        );
    }
    println!("  stop    Ctrl-C\n");
    let _ = std::io::stdout().flush();
    if !args.quiet {
        let store = sandbox.runtime.store.clone();
        tokio::spawn(feed::run(
            store,
            Some("$".to_owned()),
            sandbox.shutdown_token(),
        ));
    }
    sandbox.run_until(shutdown).await
}

async fn api(args: ApiArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = Config::load(&args.common, |config| {
        if let Some(listen) = args.listen {
            config.api.listen = listen;
        }
        // An empty PW_API_KEY (as compose passes when it is unset) means no key.
        if let Some(key) = args.api_key.as_ref().filter(|k| !k.is_empty()) {
            config.api.api_key = Some(key.clone());
        }
    })?;
    let runtime = infra::runtime(
        &config,
        registry::pieces()?,
        Infra::PRODUCTION,
        infra::keyring(&args.common, true)?,
    )
    .await?;
    piecework_api::run(config.api, runtime, shutdown).await?;
    Ok(())
}

/// `/metrics` of a process with nothing to refresh before a scrape.
fn plain_metrics(runtime: &std::sync::Arc<piecework_runtime::Runtime>) -> MetricsSource {
    let runtime = runtime.clone();
    std::sync::Arc::new(move || {
        let runtime = runtime.clone();
        Box::pin(async move { runtime.metrics.encode() })
    })
}

/// `/readyz` of a process that needs the bus and the store.
fn infra_ready(runtime: &std::sync::Arc<piecework_runtime::Runtime>) -> ReadyCheck {
    let runtime = runtime.clone();
    std::sync::Arc::new(move || {
        let runtime = runtime.clone();
        Box::pin(async move {
            let mut reasons = Vec::new();
            if let Err(err) = runtime.bus.ready().await {
                reasons.push(format!("bus: {err}"));
            }
            if let Err(err) = runtime.store.ready().await {
                reasons.push(format!("store: {err}"));
            }
            if reasons.is_empty() {
                Ok(())
            } else {
                Err(reasons.join("; "))
            }
        })
    })
}

async fn scheduler(args: SchedulerArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = Config::load(&args.common, |config| {
        if let Some(listen) = args.health_listen {
            config.health.scheduler_listen = listen;
        }
    })?;
    let runtime = infra::runtime(&config, registry::pieces()?, Infra::PRODUCTION, None).await?;
    let health = health::serve(
        config.health.scheduler_listen,
        infra_ready(&runtime),
        plain_metrics(&runtime),
        shutdown.clone(),
    );
    let service = async {
        piecework_scheduler::run(config.scheduler.clone(), runtime.clone(), shutdown.clone())
            .await?;
        anyhow::Ok(())
    };
    tokio::try_join!(health, service)?;
    Ok(())
}

async fn worker(args: WorkerArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = Config::load(&args.common, |config| {
        if let Some(queues) = &args.queues {
            config.worker.queues = queues.clone();
        }
        if let Some(concurrency) = args.concurrency {
            config.worker.concurrency = concurrency;
        }
        if let Some(id) = &args.id {
            config.worker.id = id.clone();
        }
        if let Some(listen) = args.health_listen {
            config.health.worker_listen = listen;
        }
    })?;
    let runtime = infra::runtime(
        &config,
        registry::pieces()?,
        Infra::PRODUCTION,
        infra::keyring(&args.common, true)?,
    )
    .await?;
    let consuming = piecework_worker::Health::default();
    let ready = {
        let infra = infra_ready(&runtime);
        let consuming = consuming.clone();
        let queues = config.worker.queues.clone();
        let check: ReadyCheck = std::sync::Arc::new(move || {
            let (infra, consuming, queues) = (infra.clone(), consuming.clone(), queues.clone());
            Box::pin(async move {
                infra().await?;
                consuming
                    .ready(&queues)
                    .map_err(|queues| format!("not consuming queues: {}", queues.join(", ")))
            })
        });
        check
    };
    let metrics: MetricsSource = {
        let runtime = runtime.clone();
        let queues = config.worker.queues.clone();
        std::sync::Arc::new(move || {
            let (runtime, queues) = (runtime.clone(), queues.clone());
            Box::pin(async move {
                piecework_worker::refresh_queue_metrics(&runtime, &queues).await;
                runtime.metrics.encode()
            })
        })
    };
    let health = health::serve(
        config.health.worker_listen,
        ready,
        metrics,
        shutdown.clone(),
    );
    let service = async {
        piecework_worker::run_with_health(
            config.worker.clone(),
            runtime.clone(),
            shutdown.clone(),
            consuming.clone(),
        )
        .await?;
        anyhow::Ok(())
    };
    tokio::try_join!(health, service)?;
    Ok(())
}

async fn connection(args: ConnectionArgs) -> anyhow::Result<()> {
    let client = ApiClient::new(&args.api)?;
    match args.command {
        ConnectionCommand::Create {
            name,
            piece,
            values,
        } => {
            let values = read_values(&values)?;
            let body = serde_json::json!({ "name": name, "piece": piece, "values": values });
            let saved = client
                .send(reqwest::Method::POST, "/v1/connections", Some(&body))
                .await?;
            let info = &saved["connection"];
            let field = |name: &str| info[name].as_str().unwrap_or_default().to_owned();
            println!(
                "saved connection `{}` for piece `{}` (encrypted with key `{}`)",
                field("name"),
                field("piece"),
                field("key_id")
            );
        }
        ConnectionCommand::List => {
            let listed = client
                .send(reqwest::Method::GET, "/v1/connections", None)
                .await?;
            for info in listed["connections"].as_array().into_iter().flatten() {
                let field = |name: &str| info[name].as_str().unwrap_or_default().to_owned();
                println!(
                    "{:<24} {:<24} key {:<8} updated {}",
                    field("name"),
                    field("piece"),
                    field("key_id"),
                    field("updated_at")
                );
            }
        }
        ConnectionCommand::Delete { name } => {
            client
                .send(
                    reqwest::Method::DELETE,
                    &format!("/v1/connections/{name}"),
                    None,
                )
                .await?;
            println!("deleted connection `{name}`");
        }
    }
    Ok(())
}

/// Connection values from an argument: JSON, `@FILE` or `-` (standard input).
fn read_values(source: &str) -> anyhow::Result<serde_json::Value> {
    let text = match source {
        "-" => std::io::read_to_string(std::io::stdin())
            .context("cannot read values from standard input")?,
        path if path.starts_with('@') => std::fs::read_to_string(&path[1..])
            .with_context(|| format!("cannot read values from {}", &path[1..]))?,
        inline => inline.to_owned(),
    };
    // The values are secrets: say where the JSON is wrong, never what it contains.
    serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "--values is not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        )
    })
}

fn piece(command: PieceCommand) -> anyhow::Result<()> {
    let registry = registry::pieces()?;
    match command {
        PieceCommand::List => {
            for piece in registry.pieces() {
                let meta = piece.metadata();
                println!("{} {}  {}", meta.name, meta.version, meta.description);
                for action in &meta.actions {
                    println!("    action   {:<18} {}", action.name, action.description);
                }
                for trigger in &meta.triggers {
                    println!("    trigger  {:<18} {}", trigger.name, trigger.description);
                }
            }
            Ok(())
        }
        PieceCommand::Docs { piece, output } => {
            let markdown = piecework_core::docs::markdown(newest(&registry, &piece)?.metadata());
            write_output(output.as_deref(), &markdown)
        }
        PieceCommand::Check { piece, against } => {
            let text = std::fs::read_to_string(&against)
                .with_context(|| format!("cannot read {}", against.display()))?;
            let old: piecework_sdk::PieceMetadata = serde_json::from_str(&text)
                .with_context(|| format!("{} is not piece metadata", against.display()))?;
            let new = newest(&registry, &piece)?.metadata();
            let report = piecework_core::versioning::check(&old, new);
            for change in &report.changes {
                println!("{:<5}  {}", change.bump, change.what);
            }
            let made = report
                .made
                .map_or("none (the version did not increase)".to_owned(), |b| {
                    b.to_string()
                });
            println!(
                "{} {} → {}: needs a {} bump, made {made}",
                piece, old.version, new.version, report.required
            );
            if !report.is_ok() {
                bail!("the version bump of `{piece}` is too small for its changes");
            }
            Ok(())
        }
        PieceCommand::Test { .. } => unreachable!("handled by piece_test"),
        PieceCommand::New { name, root } => {
            let root = match root {
                Some(root) => root,
                None => crate::scaffold::find_root(&std::env::current_dir()?)?,
            };
            let made = crate::scaffold::create(&root, &name)?;
            println!(
                "created {} ({}) and registered it",
                made.dir.display(),
                made.crate_name
            );
            println!(
                "next: cargo test -p {} && cargo run -- piece test {name} hello --input '{{\"name\": \"ada\"}}'",
                made.crate_name
            );
            Ok(())
        }
        PieceCommand::Metadata { piece, output } => {
            let versions = registry.versions(&piece);
            let Some(found) = versions.first().and_then(|v| registry.get(&piece, v)) else {
                let known: Vec<&str> = registry.names().collect();
                bail!("no piece `{piece}` (registered: {})", known.join(", "));
            };
            let json = serde_json::to_string_pretty(found.metadata())?;
            match output {
                Some(path) => std::fs::write(&path, json + "\n")
                    .with_context(|| format!("cannot write {}", path.display())),
                None => {
                    println!("{json}");
                    Ok(())
                }
            }
        }
    }
}

fn newest<'r>(
    registry: &'r piecework_core::Registry,
    piece: &str,
) -> anyhow::Result<&'r piecework_sdk::Piece> {
    let versions = registry.versions(piece);
    versions
        .first()
        .and_then(|v| registry.get(piece, v))
        .ok_or_else(|| {
            let known: Vec<&str> = registry.names().collect();
            anyhow::anyhow!("no piece `{piece}` (registered: {})", known.join(", "))
        })
}

fn write_output(output: Option<&std::path::Path>, text: &str) -> anyhow::Result<()> {
    match output {
        Some(path) => {
            std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
        }
        None => {
            print!("{text}");
            Ok(())
        }
    }
}

async fn flow(command: FlowCommand) -> anyhow::Result<()> {
    let FlowCommand::Validate { files } = command;
    let registry = registry::pieces()?;
    let mut failed = 0;
    for file in &files {
        let result = match flows::parse_file(file) {
            Ok(def) => piecework_core::flow::validate(def, &registry)
                .await
                .map_err(Into::into),
            Err(err) => Err(err),
        };
        match result {
            Ok(valid) => println!(
                "{}: ok (flow `{}`, {} steps)",
                file.display(),
                valid.definition.name,
                valid.definition.steps.len()
            ),
            Err(err) => {
                failed += 1;
                eprintln!("{}: {err:#}", file.display());
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} flow files are invalid", files.len());
    }
    Ok(())
}
