//! Schedulers on a paused clock: ticks are aligned and several schedulers publish each once.

use std::sync::Arc;
use std::time::Duration;

use piecework_bus::memory::MemoryBus;
use piecework_bus::{Bus, ConsumeOptions};
use piecework_core::Registry;
use piecework_core::flow::{FlowDefinition, Format};
use piecework_proto::Message as _;
use piecework_proto::v1::PollJob;
use piecework_runtime::Runtime;
use piecework_scheduler::SchedulerConfig;
use piecework_sdk::EgressPolicy;
use piecework_store::Store;
use piecework_store::memory::MemoryStore;
use tokio_util::sync::CancellationToken;

const FLOW: &str = r#"
apiVersion: piecework/v1
kind: Flow
name: tick
trigger: { piece: schedule, trigger: every, input: { interval: 10s } }
steps:
  - { name: noop, piece: schedule-test-missing, action: x }
"#;

async fn runtime() -> (Arc<Runtime>, MemoryBus, MemoryStore) {
    let mut registry = Registry::new();
    registry
        .register_built(piecework_piece_schedule::piece())
        .unwrap();
    let (bus, store) = (MemoryBus::new(), MemoryStore::new());
    let runtime = Arc::new(
        Runtime::new(
            Arc::new(store.clone()),
            Arc::new(bus.clone()),
            Arc::new(piecework_core::Catalog::new(registry)),
            EgressPolicy::default(),
        )
        .unwrap(),
    );
    (runtime, bus, store)
}

/// Stores the flow directly: the test registry lacks the step's piece, which does not matter
/// to the scheduler.
async fn apply(store: &MemoryStore, text: &str) {
    let definition = FlowDefinition::parse(text, Format::Yaml).unwrap();
    let mut resolved = std::collections::BTreeMap::new();
    resolved.insert("trigger".to_owned(), "0.1.0".parse().unwrap());
    store
        .apply_flow(piecework_core::ValidFlow {
            definition,
            resolved,
        })
        .await
        .unwrap();
}

async fn drain_ticks(bus: &MemoryBus) -> Vec<i64> {
    let count = bus.queued("default");
    let mut consumer = bus
        .consume("default", ConsumeOptions::default())
        .await
        .unwrap();
    let mut ticks = Vec::new();
    for delivery in consumer.fetch(count, Duration::from_secs(1)).await.unwrap() {
        let job = PollJob::decode(delivery.payload.as_ref()).unwrap();
        assert_eq!((job.flow_id.as_str(), job.flow_version), ("tick", 1));
        ticks.push(job.tick_unix_ms);
        delivery.ack().await.unwrap();
    }
    ticks
}

#[tokio::test(start_paused = true)]
async fn two_schedulers_publish_one_poll_per_aligned_tick() {
    let (runtime, bus, store) = runtime().await;
    apply(&store, FLOW).await;
    let shutdown = CancellationToken::new();
    let config = SchedulerConfig {
        refresh_interval: Duration::from_secs(1),
        ..SchedulerConfig::default()
    };
    let schedulers: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(piecework_scheduler::run(
                config.clone(),
                runtime.clone(),
                shutdown.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(45)).await;
    shutdown.cancel();
    for scheduler in schedulers {
        scheduler.await.unwrap().unwrap();
    }

    let ticks = drain_ticks(&bus).await;
    assert!(
        (4..=5).contains(&ticks.len()),
        "one job per tick in 45s of 10s ticks: {ticks:?}"
    );
    assert!(
        ticks.iter().all(|t| t % 10_000 == 0),
        "ticks are aligned: {ticks:?}"
    );
    assert!(
        ticks.windows(2).all(|w| w[1] - w[0] == 10_000),
        "no tick twice, none skipped: {ticks:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn disabled_flows_are_not_scheduled() {
    let (runtime, bus, store) = runtime().await;
    apply(&store, FLOW).await;
    store.set_flow_enabled("tick", false).await.unwrap();
    let shutdown = CancellationToken::new();
    let config = SchedulerConfig {
        refresh_interval: Duration::from_secs(1),
        ..SchedulerConfig::default()
    };
    let scheduler = tokio::spawn(piecework_scheduler::run(config, runtime, shutdown.clone()));
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(bus.queued("default"), 0);
    // Enabling it picks it up at the next refresh.
    store.set_flow_enabled("tick", true).await.unwrap();
    tokio::time::sleep(Duration::from_secs(25)).await;
    shutdown.cancel();
    scheduler.await.unwrap().unwrap();
    assert!(bus.queued("default") >= 2);
}
