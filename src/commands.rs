//! What each subcommand does.

use std::io::Write;

use anyhow::{Context as _, bail};
use tokio_util::sync::CancellationToken;

use crate::cli::{Command, DevArgs, FlowCommand, PieceCommand};
use crate::config::DevConfig;
use crate::dev::Sandbox;
use crate::{feed, flows, registry};

pub async fn run(command: Command, shutdown: CancellationToken) -> anyhow::Result<()> {
    match command {
        Command::Dev(args) => dev(args, shutdown).await,
        Command::Piece(command) => piece(command),
        Command::Flow(command) => flow(command),
    }
}

async fn dev(args: DevArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = DevConfig::load(&args)?;
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
    let sandbox = Sandbox::start(config, definitions, registry).await?;
    let addr = sandbox.api_addr;
    println!(
        "piecework dev: api, scheduler and worker on the embedded in-memory bus and store (nothing is persisted)"
    );
    println!("  api     http://{addr}   (GET /v1/runs, GET /v1/pieces, POST /v1/flows)");
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
    println!("  stop    Ctrl-C\n");
    let _ = std::io::stdout().flush();
    if !args.quiet {
        let store = sandbox.runtime.store.clone();
        tokio::spawn(feed::run(store, None, sandbox.shutdown_token()));
    }
    sandbox.run_until(shutdown).await
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

fn flow(command: FlowCommand) -> anyhow::Result<()> {
    let FlowCommand::Validate { files } = command;
    let registry = registry::pieces()?;
    let mut failed = 0;
    for file in &files {
        let result = flows::parse_file(file)
            .and_then(|def| piecework_core::flow::validate(def, &registry).map_err(Into::into));
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
