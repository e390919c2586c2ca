//! `piecework`: one binary for every role. `main` parses arguments, starts telemetry, installs
//! the signal handler and hands over to the command; the services themselves are libraries
//! under `services/`.

use std::process::ExitCode;

/// mimalloc: a step allocates and frees many small buffers (JSON, Redis and NATS frames) from
/// several threads, where glibc's malloc spent ~40% of a worker's CPU (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = piecework::cli::Cli::parse();
    let _telemetry = match piecework_telemetry::init(piecework_telemetry::Options {
        service: cli.command.service_name(),
        format: cli.log_format,
        default_filter: cli.command.default_log_filter(),
    }) {
        Ok(guard) => guard,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(watch_signals(shutdown.clone()));
        piecework::commands::run(cli.command, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// First Ctrl-C or SIGTERM: shut down gracefully. Second: exit at once.
async fn watch_signals(shutdown: CancellationToken) {
    for attempt in 0.. {
        if wait_for_signal().await.is_err() {
            return;
        }
        if attempt == 0 {
            eprintln!("\nshutting down (press Ctrl-C again to exit at once)");
            shutdown.cancel();
        } else {
            std::process::exit(130);
        }
    }
}

#[cfg(unix)]
async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result,
        _ = term.recv() => Ok(()),
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() -> std::io::Result<()> {
    tokio::signal::ctrl_c().await
}
