//! What each subcommand does.

use std::io::Write;

use anyhow::{Context as _, bail};
use tokio_util::sync::CancellationToken;

use crate::cli::{
    ApiArgs, ApiKeyArgs, ApiKeyCommand, Command, ConnectionArgs, ConnectionCommand, DevArgs,
    FlowCommand, KeyCommand, PieceCommand, SchedulerArgs, WorkerArgs,
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
        Command::Piece(command) => piece(command).await,
        Command::Connection(args) => connection(args).await,
        Command::ApiKey(args) => api_key(args).await,
        Command::Audit(args) => crate::audit::run(args, shutdown).await,
        Command::Runs(args) => crate::runs::run(args, shutdown).await,
        Command::Doctor(args) => crate::doctor::run(&args.common).await,
        Command::Key(KeyCommand::Generate { id, env }) => {
            let key = piecework_runtime::secrets::Keyring::generate_spec(&id);
            if env {
                print!("{}", secrets_env_file(&key));
            } else {
                println!("{key}");
            }
            Ok(())
        }
        Command::Key(KeyCommand::Rotate { api }) => rotate_keys(&api).await,
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
        if let Some(concurrency) = args.concurrency {
            config.worker.concurrency = concurrency;
        }
        if let Some(rate) = args.webhook_rate {
            config.api.webhook_rate = rate;
        }
        if let Some(rate) = args.webhook_rate_per_flow {
            config.api.webhook_rate_per_flow = rate;
        }
        // The demo's mock API, and the API a piece author is integrating, listen here.
        config.egress.allow_loopback();
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
    let mut bundle_files = Vec::new();
    let demo_flows = definitions
        .iter()
        .any(|f| uses_piece(f, crate::demo::PIECE));
    if demo_flows && !dir_has_piece(config.pieces.dir.as_deref(), crate::demo::PIECE) {
        eprintln!(
            "piecework dev: building the demo piece `{}` into a bundle, as for any private piece…",
            crate::demo::PIECE
        );
        match crate::demo::bundle().await {
            Ok(Some(path)) => bundle_files.push(path),
            outcome => {
                let why = match outcome {
                    Err(err) => format!("{err:#}"),
                    _ => "there is no piecework checkout here to build it from".to_owned(),
                };
                eprintln!(
                    "piecework dev: leaving out the demo flows of `{}`: {why}",
                    crate::demo::PIECE
                );
                definitions.retain(|f| !uses_piece(f, crate::demo::PIECE));
            }
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
    let pieces_dir = config.pieces.dir.clone();
    let sandbox =
        Sandbox::start_with(config, definitions, registry, infra, keyring, &bundle_files).await?;
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
    println!(
        "  api     http://{addr}   (GET /v1/runs, GET /v1/pieces, POST /v1/flows; GET /openapi.json)"
    );
    println!("  console http://{addr}/   runs, flows, pieces, connections, audit in the browser");
    match &pieces_dir {
        Some(dir) => println!(
            "  pieces  {} is watched: `piecework piece build DIR -o {}` deploys a piece as you edit it",
            dir.display(),
            dir.display()
        ),
        None => println!(
            "  pieces  --pieces DIR loads your bundles (and reloads them as you rebuild); publish with `piecework piece publish`"
        ),
    }
    println!("  watch   http://{addr}/metrics, GET /v1/audit, PW_OTLP_ENDPOINT for traces");
    println!(
        "  egress  pieces may call loopback here (for local mocks); deployed workers refuse loopback and private addresses unless [egress] allow / PW_EGRESS_ALLOW name them"
    );
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
    for flow in &sandbox.signed_webhooks {
        println!(
            "  signed  webhook `{flow}` takes signed calls only: its secret is at GET http://{addr}/v1/flows/{flow}/webhook-secret (docs/flows.md)"
        );
    }
    if let Some(mock) = &mock {
        println!(
            "  demo    a mock ticketing API at {} files a ticket every 7s; `auto-assign` assigns each once",
            mock.url
        );
        if let Some(bundle) = bundle_files.first() {
            println!(
                "          with the `{}` piece running in its own process, from {}",
                crate::demo::PIECE,
                bundle.display()
            );
        }
    }
    if ephemeral {
        println!(
            "  keys    PW_ENCRYPTION_KEY is not set: connections are encrypted with a key that lives only as long as this process"
        );
    }
    println!("  stop    Ctrl-C\n");
    let _ = std::io::stdout().flush();
    if !args.quiet {
        tokio::spawn(feed::run(
            sandbox.runtime.clone(),
            Some("$".to_owned()),
            sandbox.shutdown_token(),
        ));
    }
    sandbox.run_until(shutdown).await
}

fn uses_piece(flow: &piecework_core::FlowDefinition, piece: &str) -> bool {
    flow.trigger.piece == piece || flow.all_steps().iter().any(|s| s.piece == piece)
}

/// Whether `dir` holds a bundle of `piece` (then `dev` does not build the demo's own).
fn dir_has_piece(dir: Option<&std::path::Path>, piece: &str) -> bool {
    let Some(entries) = dir.and_then(|d| std::fs::read_dir(d).ok()) else {
        return false;
    };
    entries.filter_map(Result::ok).any(|e| {
        e.file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(&format!("{piece}-")) && n.ends_with(".piece.tgz"))
    })
}

async fn api(args: ApiArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = Config::load(&args.common, |config| {
        if let Some(listen) = args.listen {
            config.api.listen = listen;
        }
        if let Some(rate) = args.webhook_rate {
            config.api.webhook_rate = rate;
        }
        if let Some(rate) = args.webhook_rate_per_flow {
            config.api.webhook_rate_per_flow = rate;
        }
        if let Some(listen) = args.health_listen {
            config.health.api_listen = listen;
        }
    })?;
    let (runtime, sources) = infra::runtime(
        &config,
        registry::pieces()?,
        Infra::PRODUCTION,
        infra::keyring(&args.common, true)?,
    )
    .await?;
    let pieces = sources.spawn();
    if config.api.api_key.is_none()
        && matches!(runtime.list_api_keys().await, Ok(k) if k.is_empty())
    {
        tracing::warn!(
            "no API key can open /v1: set PW_API_KEY (or PW_API_KEY_FILE) to a bootstrap admin key, then create named keys with `piecework api-key create`"
        );
    }
    let health = health::serve(
        config.health.api_listen,
        infra_ready(&runtime),
        api_metrics(&runtime),
        shutdown.clone(),
    );
    let service = async {
        piecework_api::run(config.api, runtime.clone(), shutdown.clone()).await?;
        anyhow::Ok(())
    };
    let ran = tokio::try_join!(health, service);
    pieces.stop().await;
    ran.map(drop)
}

/// `/metrics` of the api: adoption is counted from the enabled flows at each scrape.
fn api_metrics(runtime: &std::sync::Arc<piecework_runtime::Runtime>) -> MetricsSource {
    let runtime = runtime.clone();
    std::sync::Arc::new(move || {
        let runtime = runtime.clone();
        Box::pin(async move { piecework_api::encode_metrics(&runtime).await })
    })
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
        Box::pin(async move { runtime.ready().await })
    })
}

async fn scheduler(args: SchedulerArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = Config::load(&args.common, |config| {
        if let Some(listen) = args.health_listen {
            config.health.scheduler_listen = listen;
        }
    })?;
    let (runtime, sources) =
        infra::runtime(&config, registry::pieces()?, Infra::PRODUCTION, None).await?;
    let pieces = sources.spawn();
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
    let ran = tokio::try_join!(health, service);
    pieces.stop().await;
    ran.map(drop)
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
    let (runtime, sources) = infra::runtime(
        &config,
        registry::pieces()?,
        Infra::PRODUCTION,
        infra::keyring(&args.common, true)?,
    )
    .await?;
    let pieces = sources.spawn();
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
    // The worker drains its in-flight steps first; only then do the piece processes stop.
    let ran = tokio::try_join!(health, service);
    pieces.stop().await;
    ran.map(drop)
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

async fn api_key(args: ApiKeyArgs) -> anyhow::Result<()> {
    let client = ApiClient::new(&args.api)?;
    match args.command {
        ApiKeyCommand::Create { name, role } => {
            let body = serde_json::json!({ "name": name, "role": role });
            let created = client
                .send(reqwest::Method::POST, "/v1/api-keys", Some(&body))
                .await?;
            let key = created["key"].as_str().context("the API returned no key")?;
            eprintln!(
                "created API key `{name}` ({}); it is shown this once:",
                created["api_key"]["role"].as_str().unwrap_or_default()
            );
            println!("{key}");
        }
        ApiKeyCommand::List => {
            let listed = client
                .send(reqwest::Method::GET, "/v1/api-keys", None)
                .await?;
            for info in listed["api_keys"].as_array().into_iter().flatten() {
                let field = |name: &str| info[name].as_str().unwrap_or_default().to_owned();
                println!(
                    "{:<24} {:<10} created {} by {}",
                    field("name"),
                    field("role"),
                    field("created_at"),
                    field("created_by")
                );
            }
        }
        ApiKeyCommand::Revoke { name } => {
            client
                .send(
                    reqwest::Method::DELETE,
                    &format!("/v1/api-keys/{name}"),
                    None,
                )
                .await?;
            println!("revoked API key `{name}`");
        }
    }
    Ok(())
}

/// The secrets of a new installation as an env file: the encryption key and a bootstrap
/// admin key (32 random bytes, base64url).
fn secrets_env_file(encryption_key: &str) -> String {
    use base64::Engine as _;
    let api_key = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(piecework_runtime::secrets::random_bytes::<32>());
    format!(
        "# piecework secrets, generated {}. Keep this file safe and backed up:\n\
         # PW_ENCRYPTION_KEY opens every stored connection; PW_API_KEY is the bootstrap admin key.\n\
         PW_ENCRYPTION_KEY={encryption_key}\n\
         PW_API_KEY={api_key}\n",
        chrono::Utc::now().format("%Y-%m-%d")
    )
}

/// `piecework key rotate`: asks the api to re-seal everything, prints what it did.
async fn rotate_keys(api: &crate::cli::ApiClientArgs) -> anyhow::Result<()> {
    let client = ApiClient::new(api)?;
    let report = client
        .send(reqwest::Method::POST, "/v1/keys/rotate", None)
        .await?;
    let count = |kind: &str, field: &str| report[kind][field].as_u64().unwrap_or(0);
    let key = report["key_id"].as_str().unwrap_or_default();
    for (kind, label) in [
        ("connections", "connections"),
        ("webhook_secrets", "webhook secrets"),
    ] {
        let meanwhile = match count(kind, "changed_meanwhile") {
            0 => String::new(),
            n => format!(", {n} saved by someone else meanwhile (under `{key}` already)"),
        };
        println!(
            "{label}: {} re-sealed under `{key}`, {} already were{meanwhile}",
            count(kind, "resealed"),
            count(kind, "current"),
        );
    }
    for pending in report["api_keys_pending"].as_array().into_iter().flatten() {
        println!(
            "api key `{}` is hashed under `{}`: it is re-hashed under `{key}` the next time it is used",
            pending["name"].as_str().unwrap_or_default(),
            pending["key_id"].as_str().unwrap_or_default()
        );
    }
    let failed: Vec<&str> = report["failed"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f.as_str())
        .collect();
    for failure in &failed {
        eprintln!("✗ {failure}");
    }
    let needed: Vec<&str> = report["still_needed"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| k.as_str())
        .collect();
    if needed.is_empty() {
        println!(
            "nothing needs any key but `{key}`: older keys can be dropped from PW_ENCRYPTION_KEY"
        );
    } else {
        println!(
            "still needed: {} — keep them in PW_ENCRYPTION_KEY until nothing needs them",
            needed.join(", ")
        );
    }
    if !failed.is_empty() {
        bail!("{} secret(s) could not be re-sealed", failed.len());
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

async fn piece(command: PieceCommand) -> anyhow::Result<()> {
    use crate::bundles;
    match command {
        PieceCommand::List { pieces_dir } => list_pieces(pieces_dir.as_deref()).await,
        PieceCommand::Docs { piece, output } => {
            let opened = bundles::open(&piece, pieces_dir().as_deref()).await?;
            let markdown = piecework_core::docs::markdown(opened.piece.metadata());
            opened.close().await;
            write_output(output.as_deref(), &markdown)
        }
        PieceCommand::Check { piece, against } => {
            let old = released_metadata(&against)?;
            let opened = bundles::open(&piece, pieces_dir().as_deref()).await?;
            let new = opened.piece.metadata().clone();
            opened.close().await;
            let report = piecework_core::versioning::check(&old, &new);
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
                new.name, old.version, new.version, report.required
            );
            if !report.is_ok() {
                bail!(
                    "the version bump of `{}` is too small for its changes",
                    new.name
                );
            }
            Ok(())
        }
        PieceCommand::Test {
            piece,
            name,
            input,
            auth,
            connection,
            owner,
        } => {
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
        PieceCommand::New {
            name,
            dir,
            typescript: true,
            ..
        } => {
            let made = crate::scaffold::create_typescript(&name, dir.as_deref())?;
            println!("created {} ({})", made.dir.display(), made.crate_name);
            println!("next:");
            println!("  cd {}", made.dir.display());
            println!("  piecework piece test . hello --input '{{\"name\": \"ada\"}}'");
            println!("  piecework piece build .    # → a bundle to deploy");
            Ok(())
        }
        PieceCommand::New { name, dir, sdk, .. } => {
            let made = crate::scaffold::create(&name, dir.as_deref(), sdk.as_deref())?;
            println!("created {} ({})", made.dir.display(), made.crate_name);
            println!("next:");
            println!("  cd {}", made.dir.display());
            println!("  cargo test");
            println!("  piecework piece test . hello --input '{{\"name\": \"ada\"}}'");
            println!("  piecework piece build .    # → a bundle to deploy");
            Ok(())
        }
        PieceCommand::Metadata { piece, output } => {
            let opened = bundles::open(&piece, pieces_dir().as_deref()).await?;
            let json = serde_json::to_string_pretty(opened.piece.metadata())?;
            opened.close().await;
            write_output(output.as_deref(), &(json + "\n"))
        }
        PieceCommand::Build {
            dir,
            out,
            profile,
            sign,
        } => {
            let key = sign.as_deref().map(bundles::signing_key).transpose()?;
            let options = bundles::BuildOptions {
                out: out.as_deref(),
                profile,
                sign: key.as_ref(),
                quiet: false,
            };
            let built = bundles::build(&dir, &options).await?;
            let manifest = &built.bundle.manifest;
            println!(
                "built {} {} → {}",
                manifest.name(),
                manifest.version(),
                built.path.display()
            );
            println!("  digest {}", built.bundle.digest);
            if let Some(key) = &key {
                println!("  signed by `{}` → {}.sig", key.id(), built.path.display());
            }
            Ok(())
        }
        PieceCommand::Inspect {
            file,
            json,
            trusted_keys,
        } => bundles::inspect(&file, json, trusted_keys.as_deref()),
        PieceCommand::Keygen { id, out } => bundles::keygen(&id, out.as_deref()),
        PieceCommand::Sign { file, key } => {
            let key = bundles::signing_key(&key)?;
            let path = bundles::sign(&file, &key)?;
            println!("signed by `{}` → {}", key.id(), path.display());
            Ok(())
        }
        PieceCommand::Publish {
            file,
            signature,
            api,
        } => bundles::publish(&ApiClient::new(&api)?, &file, signature.as_deref()).await,
        PieceCommand::Versions { piece, api } => {
            let client = ApiClient::new(&api)?;
            let answer = client
                .send(
                    reqwest::Method::GET,
                    &format!("/v1/pieces/{piece}/versions"),
                    None,
                )
                .await?;
            for version in answer["versions"].as_array().into_iter().flatten() {
                let field = |name: &str| version[name].as_str().unwrap_or_default().to_owned();
                let published = &version["published"];
                let detail = match field("source").as_str() {
                    "registry" => format!(
                        "published by {} at {}{}",
                        published["publisher"].as_str().unwrap_or("?"),
                        published["published_at"].as_str().unwrap_or("?"),
                        published["signed_by"]
                            .as_str()
                            .map(|k| format!(", signed by `{k}`"))
                            .unwrap_or_default()
                    ),
                    "directory" => field("path"),
                    _ => String::new(),
                };
                println!("{:<12} {:<10} {detail}", field("version"), field("source"));
            }
            Ok(())
        }
        PieceCommand::Yank {
            piece,
            version,
            api,
        } => {
            let client = ApiClient::new(&api)?;
            client
                .send(
                    reqwest::Method::DELETE,
                    &format!("/v1/pieces/{piece}/versions/{version}"),
                    None,
                )
                .await?;
            println!("yanked {piece} {version} from the registry");
            Ok(())
        }
        PieceCommand::Conformance { target } => bundles::conformance(&target).await,
    }
}

/// The pieces directory named by the environment, for commands that take piece names.
fn pieces_dir() -> Option<std::path::PathBuf> {
    std::env::var_os("PW_PIECES_DIR")
        .filter(|d| !d.is_empty())
        .map(Into::into)
}

/// Metadata of a released version: a metadata file (`piece metadata -o`) or a bundle.
fn released_metadata(path: &std::path::Path) -> anyhow::Result<piecework_sdk::PieceMetadata> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if path.to_string_lossy().ends_with(".piece.tgz") {
        let bundle =
            piecework_bundle::Bundle::read(&bytes).with_context(|| path.display().to_string())?;
        return Ok(bundle.manifest.piece);
    }
    serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not piece metadata", path.display()))
}

async fn list_pieces(dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    let mut registry = registry::pieces()?;
    let mut note = String::new();
    if let Some(dir) = dir {
        let cache = tempfile::tempdir()?;
        let host = piecework_host::PieceHost::new(
            piecework_host::HostConfig {
                cache_dir: cache.path().to_owned(),
                ..Default::default()
            },
            piecework_sdk::EgressPolicy::default(),
        )?;
        let catalog = std::sync::Arc::new(piecework_core::Catalog::new(registry));
        let mut directory =
            piecework_host::directory::Directory::new(dir.to_owned(), host, catalog.clone());
        let scan = directory.scan().await?;
        for (file, why) in &scan.refused {
            eprintln!("{}: {why}", file.display());
        }
        registry = piecework_core::Registry::clone(&catalog.snapshot());
        note = format!(" (bundle in {})", dir.display());
    }
    for name in registry.names() {
        for entry in registry.entries(name) {
            let meta = entry.piece.metadata();
            let from = match &entry.origin {
                piecework_core::registry::Origin::Builtin => " (built in)".to_owned(),
                _ => note.clone(),
            };
            println!("{} {}{from}  {}", meta.name, meta.version, meta.description);
            for action in &meta.actions {
                println!("    action   {:<18} {}", action.name, action.description);
            }
            for trigger in &meta.triggers {
                println!("    trigger  {:<18} {}", trigger.name, trigger.description);
            }
        }
    }
    Ok(())
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

/// `flow enable` / `flow disable`: `action` is the route's last segment.
async fn toggle_flow(
    flow: &str,
    api: &crate::cli::ApiClientArgs,
    action: &str,
) -> anyhow::Result<()> {
    ApiClient::new(api)?
        .send(
            reqwest::Method::POST,
            &format!("/v1/flows/{flow}/{action}"),
            None,
        )
        .await?;
    println!("flow `{flow}` {action}d");
    Ok(())
}

async fn flow(command: FlowCommand) -> anyhow::Result<()> {
    match command {
        FlowCommand::Validate { files, pieces_dir } => {
            validate_flows(&files, pieces_dir.as_deref()).await
        }
        FlowCommand::Apply { files, api } => {
            let client = ApiClient::new(&api)?;
            for file in files {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?;
                let json = file.extension().is_some_and(|e| e == "json");
                let content_type = if json {
                    "application/json"
                } else {
                    "application/yaml"
                };
                let answer = client
                    .send_document(reqwest::Method::POST, "/v1/flows", text, content_type)
                    .await
                    .with_context(|| file.display().to_string())?;
                let id = answer["flow"]["id"].as_str().unwrap_or_default();
                let version = answer["version"].as_u64().unwrap_or_default();
                if answer["created"] == true {
                    println!("applied flow `{id}` version {version}");
                } else {
                    println!("flow `{id}` is unchanged (version {version})");
                }
                if let Some(secret) = answer["webhook"]["secret"].as_str() {
                    println!(
                        "  webhook secret (shown this once; `piecework flow webhook-secret {id}` reads it again):\n  {secret}"
                    );
                }
            }
            Ok(())
        }
        FlowCommand::Enable { flow, api } => toggle_flow(&flow, &api, "enable").await,
        FlowCommand::Disable { flow, api } => toggle_flow(&flow, &api, "disable").await,
        FlowCommand::WebhookSecret { flow, rotate, api } => {
            let client = ApiClient::new(&api)?;
            let answer = if rotate {
                client
                    .send(
                        reqwest::Method::POST,
                        &format!("/v1/flows/{flow}/webhook-secret/rotate"),
                        None,
                    )
                    .await?
            } else {
                client
                    .send(
                        reqwest::Method::GET,
                        &format!("/v1/flows/{flow}/webhook-secret"),
                        None,
                    )
                    .await?
            };
            println!(
                "{}",
                answer["secret"]
                    .as_str()
                    .context("the API returned no secret")?
            );
            Ok(())
        }
        FlowCommand::Upgrade {
            flow,
            piece,
            to,
            force,
            api,
        } => {
            let client = ApiClient::new(&api)?;
            let body = serde_json::json!({ "piece": piece, "to": to, "force": force });
            let answer = client
                .send(
                    reqwest::Method::POST,
                    &format!("/v1/flows/{flow}/upgrade"),
                    Some(&body),
                )
                .await?;
            for step in answer["steps"].as_array().into_iter().flatten() {
                println!(
                    "{}: {} {} → {}",
                    step["step"].as_str().unwrap_or_default(),
                    piece,
                    step["from"].as_str().unwrap_or_default(),
                    step["to"].as_str().unwrap_or_default()
                );
                for change in step["changes"].as_array().into_iter().flatten() {
                    println!(
                        "    {:<5}  {}",
                        change["bump"].as_str().unwrap_or_default(),
                        change["what"].as_str().unwrap_or_default()
                    );
                }
            }
            match answer["version"].as_u64() {
                Some(version) if answer["created"] == true => {
                    println!("applied flow `{flow}` version {version}")
                }
                Some(version) => {
                    println!("flow `{flow}` already uses these versions (version {version})")
                }
                None => println!("nothing to upgrade"),
            }
            Ok(())
        }
    }
}

async fn validate_flows(
    files: &[std::path::PathBuf],
    pieces_dir: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let mut registry = registry::pieces()?;
    let _cache = match pieces_dir {
        None => None,
        Some(dir) => {
            let cache = tempfile::tempdir()?;
            let host = piecework_host::PieceHost::new(
                piecework_host::HostConfig {
                    cache_dir: cache.path().to_owned(),
                    ..Default::default()
                },
                piecework_sdk::EgressPolicy::default(),
            )?;
            let catalog = std::sync::Arc::new(piecework_core::Catalog::new(registry));
            piecework_host::directory::Directory::new(dir.to_owned(), host, catalog.clone())
                .scan()
                .await?;
            registry = piecework_core::Registry::clone(&catalog.snapshot());
            Some(cache)
        }
    };
    let mut failed = 0;
    for file in files {
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
                valid.definition.all_steps().len()
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
