//! `piecework doctor`: the guide's troubleshooting lists, automated. Each check prints ✓ or ✗
//! with what to do about it; the command fails if any check fails.
//!
//! - pieces: built in or bundles (the pieces directory, the registry), metadata valid, each
//!   bundle starts and answers over the protocol (the guide's "check piece is exported
//!   properly", "verify the build", "check the container logs");
//! - infrastructure: NATS and Redis reachable, the job stream and each queue's consumer;
//! - connections: each decrypts with the current key, and its piece's check against the real
//!   system passes (reachable, certificate valid, key accepted — "verify API key, check the
//!   environment, confirm the endpoint, review firewall rules, check SSL certificates").

use std::collections::BTreeSet;
use std::sync::Arc;

use anyhow::bail;
use piecework_bus::nats::NatsBus;
use piecework_bus::{Bus as _, QueueStats};
use piecework_runtime::Runtime;
use piecework_sdk::{Context, Owner, RunInfo};

use crate::cli::ConfigArgs;
use crate::config::Config;
use crate::infra::{self, Infra};

struct Report {
    failures: usize,
}

impl Report {
    fn ok(&mut self, what: impl std::fmt::Display) {
        println!("✓ {what}");
    }

    fn fail(&mut self, what: impl std::fmt::Display, fix: &str) {
        self.failures += 1;
        println!("✗ {what}\n    fix: {fix}");
    }
}

pub async fn run(common: &ConfigArgs) -> anyhow::Result<()> {
    let mut report = Report { failures: 0 };
    let config = Config::load(common, |_| {})?;

    println!("pieces");
    let registry = match crate::registry::pieces() {
        Ok(registry) => registry,
        Err(err) => {
            report.fail(
                format!("a piece does not register: {err}"),
                "fix the definition named in the error, then rebuild",
            );
            bail!("1 check failed");
        }
    };
    check_pieces(&mut report, &config, registry.clone()).await;

    println!("\ninfrastructure");
    let keyring = match infra::keyring(common, true) {
        Ok(keyring) => {
            report.ok(format!(
                "encryption keys: {}",
                keyring
                    .as_ref()
                    .map(|k| k.key_ids().join(", "))
                    .unwrap_or_default()
            ));
            keyring
        }
        Err(err) => {
            report.fail(
                err,
                "set PW_ENCRYPTION_KEY to the key the api and workers use",
            );
            None
        }
    };
    let bus = match NatsBus::connect(piecework_bus::nats::NatsConfig {
        connect_timeout: std::time::Duration::from_secs(3),
        ..config.nats.clone()
    })
    .await
    {
        Ok(bus) => {
            report.ok(format!(
                "NATS at {} (stream {})",
                piecework_sdk::mask::redact_url(&config.nats.url),
                config.nats.stream
            ));
            Some(bus)
        }
        Err(err) => {
            report.fail(
                err,
                "check PW_NATS_URL, that nats-server runs with -js, and firewall rules",
            );
            None
        }
    };
    let mut quick = config.clone();
    quick.redis.connect_timeout = std::time::Duration::from_secs(3);
    let runtime = match infra::runtime(
        &quick,
        registry,
        Infra {
            nats: false,
            redis: true,
        },
        keyring.clone(),
    )
    .await
    {
        Ok((runtime, _)) => {
            report.ok(format!(
                "Redis at {}",
                piecework_sdk::mask::redact_url(&config.redis.url)
            ));
            Some(runtime)
        }
        Err(err) => {
            report.fail(
                format!("{err:#}"),
                "check PW_REDIS_URL and that redis-server is reachable",
            );
            None
        }
    };
    if let (Some(bus), Some(runtime)) = (&bus, &runtime) {
        check_queues(&mut report, bus, runtime, &config).await;
    }

    println!("\nconnections");
    if let (Some(runtime), Some(_)) = (&runtime, &keyring) {
        check_connections(&mut report, runtime).await;
    } else {
        println!("  (skipped: needs Redis and the encryption key)");
    }

    println!();
    if report.failures > 0 {
        bail!("{} check(s) failed", report.failures);
    }
    println!("all checks passed");
    Ok(())
}

/// Every queue a worker serves or a flow routes to: its consumer's backlog and redeliveries.
async fn check_queues(report: &mut Report, bus: &NatsBus, runtime: &Runtime, config: &Config) {
    let mut queues: BTreeSet<String> = config.worker.queues.iter().cloned().collect();
    for flow in runtime.flow_records().await.unwrap_or_default() {
        if let Ok(Some(version)) = runtime.flow_version(&flow.id, flow.latest_version).await {
            queues.insert(version.definition.trigger.queue().to_owned());
            queues.extend(
                version
                    .definition
                    .steps
                    .iter()
                    .map(|s| s.queue().to_owned()),
            );
        }
    }
    for queue in queues {
        match bus.queue_stats(&queue).await {
            Ok(QueueStats {
                pending,
                ack_pending,
                redelivered,
            }) => report.ok(format!(
                "queue {queue}: {pending} waiting, {ack_pending} in progress, {redelivered} redelivered"
            )),
            Err(_) => report.fail(
                format!("queue {queue}: no consumer `pw-{queue}`"),
                &format!("start a worker with --queues {queue} (it creates the consumer)"),
            ),
        }
    }
}

async fn check_connections(report: &mut Report, runtime: &Arc<Runtime>) {
    let records = match runtime.connection_records().await {
        Ok(records) => records,
        Err(err) => return report.fail(err, "check Redis"),
    };
    if records.is_empty() {
        println!("  (none)");
    }
    for record in records {
        let name = &record.name;
        let values = match runtime.open_connection(&record) {
            Ok(values) => values,
            Err(err) => {
                report.fail(err, "use the key it was saved with (list it first in PW_ENCRYPTION_KEY), or save the connection again");
                continue;
            }
        };
        let pieces = runtime.pieces();
        let Some(piece) = pieces.newest(&record.piece) else {
            report.fail(
                format!(
                    "connection `{name}`: piece `{}` is not registered",
                    record.piece
                ),
                "register the piece or delete the connection",
            );
            continue;
        };
        let ctx = Context::new(
            RunInfo::new("doctor", "", 0, "auth", 1),
            Owner::default(),
            runtime.piece_store(""),
            runtime.http().clone(),
        )
        .with_auth(Some(values.clone()));
        let plain_http = ["base_url", "url", "endpoint"]
            .iter()
            .filter_map(|k| values.get(*k).and_then(|v| v.as_str()))
            .any(|url| url.starts_with("http://"));
        match piece.validate_auth(&ctx).await {
            Ok(()) if plain_http => report.fail(
                format!("connection `{name}` ({}) works, but over plain HTTP", record.piece),
                "use an https:// endpoint: the guide asks for HTTPS on every API call",
            ),
            Ok(()) => report.ok(format!("connection `{name}` ({}): reachable, key accepted", record.piece)),
            Err(err) => report.fail(
                format!("connection `{name}` ({}): {err}", record.piece),
                "verify the API key, the environment, that the endpoint is reachable from here (firewall, VPN), and its TLS certificate",
            ),
        }
    }
}

/// Lists every piece this machine would run — built in, and the bundles of the pieces
/// directory, each started once and asked for `health` — with what to fix.
async fn check_pieces(report: &mut Report, config: &Config, registry: piecework_core::Registry) {
    let catalog = Arc::new(piecework_core::Catalog::new(registry));
    let host = match piecework_host::PieceHost::new(config.pieces.clone(), config.egress.clone()) {
        Ok(host) => host,
        Err(err) => {
            report.fail(
                err,
                "fix the [pieces] configuration (PW_PIECES_DIR, PW_TRUSTED_KEYS, PW_PIECES_CACHE)",
            );
            return;
        }
    };
    if let Some(dir) = &config.pieces.dir {
        let mut directory =
            piecework_host::directory::Directory::new(dir.clone(), host.clone(), catalog.clone());
        match directory.scan().await {
            Ok(scan) => {
                for (file, why) in scan.refused {
                    report.fail(
                        format!("{}: {why}", file.display()),
                        "rebuild it with `piecework piece build`, or remove it from the pieces directory",
                    );
                }
            }
            Err(err) => report.fail(
                format!("pieces directory {}: {err}", dir.display()),
                "check PW_PIECES_DIR and its permissions",
            ),
        }
    }
    let snapshot = catalog.snapshot();
    for name in snapshot.names() {
        for entry in snapshot.entries(name) {
            let meta = entry.piece.metadata();
            let summary = format!(
                "{} {} ({} actions, {} triggers)",
                meta.name,
                meta.version,
                meta.actions.len(),
                meta.triggers.len()
            );
            if serde_json::to_value(meta).is_err() {
                report.fail(
                    format!("{}: metadata does not serialize", meta.name),
                    "check its props",
                );
                continue;
            }
            let piecework_core::registry::Origin::Directory { path, .. } = &entry.origin else {
                report.ok(summary);
                continue;
            };
            match host.check(&meta.name, &meta.version.to_string()).await {
                Ok(took) => report.ok(format!("{summary}, bundle {path}, starts and answers in {} ms", took.as_millis())),
                Err(err) => report.fail(
                    format!("{summary}, bundle {path}: {err}"),
                    "run `piecework piece conformance` on the bundle, check its signature (`piece inspect`) and the platform it was built for",
                ),
            }
        }
    }
    host.stop_all().await;
}
