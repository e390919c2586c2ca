//! The piece registry contract, held against both adapters: the in-memory one and JetStream
//! (key-value index and object store) on a real nats-server, including a server restart.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use futures::StreamExt as _;
use piecework_bundle::{Digest, Manifest};
use piecework_bus::Bus;
use piecework_bus::memory::MemoryBus;
use piecework_bus::nats::{NatsBus, NatsConfig};
use piecework_bus::pieces::{Change, PieceRegistry, Published, RegistryError};
use piecework_testkit::NatsServer;

fn entry(version: &str, bytes: &[u8]) -> Published {
    let piece = piecework_sdk::Piece::builder("acme", "Acme")
        .version(version)
        .build()
        .unwrap();
    Published {
        name: "acme".into(),
        version: version.parse().unwrap(),
        digest: Digest::of(bytes),
        size: bytes.len() as u64,
        publisher: "api:ci".into(),
        published_at: Utc::now(),
        signature: None,
        manifest: Manifest::exec(piece.metadata().clone(), "bin/acme"),
    }
}

async fn next(
    changes: &mut futures::stream::BoxStream<'static, Result<Change, RegistryError>>,
) -> Change {
    tokio::time::timeout(Duration::from_secs(10), changes.next())
        .await
        .expect("a change within 10s")
        .expect("the watch goes on")
        .expect("no error")
}

async fn contract(registry: Arc<dyn PieceRegistry>) {
    // A bundle big enough to span several object-store chunks.
    let one: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
    let two = b"another bundle".to_vec();
    assert!(registry.list().await.unwrap().is_empty());

    assert!(
        registry
            .publish(entry("1.0.0", &one), Bytes::from(one.clone()))
            .await
            .unwrap()
    );
    // The same bundle again changes nothing; another one under the version is refused.
    assert!(
        !registry
            .publish(entry("1.0.0", &one), Bytes::from(one.clone()))
            .await
            .unwrap()
    );
    let err = registry
        .publish(entry("1.0.0", &two), Bytes::from(two.clone()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("versions are immutable"), "{err}");

    let got = registry
        .get("acme", &"1.0.0".parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.digest, Digest::of(&one));
    assert_eq!(got.manifest.piece.version.to_string(), "1.0.0");
    let downloaded = registry.download(&got.digest).await.unwrap().unwrap();
    assert_eq!(downloaded.as_ref(), one.as_slice());
    assert!(
        registry
            .download(&Digest::of(b"nothing"))
            .await
            .unwrap()
            .is_none()
    );

    // A watch starts with what is there, then follows.
    let mut changes = registry.watch().await.unwrap();
    match next(&mut changes).await {
        Change::Published(p) => assert_eq!(p.version.to_string(), "1.0.0"),
        other => panic!("{other:?}"),
    }
    registry
        .publish(entry("1.1.0", &two), Bytes::from(two.clone()))
        .await
        .unwrap();
    match next(&mut changes).await {
        Change::Published(p) => assert_eq!(p.version.to_string(), "1.1.0"),
        other => panic!("{other:?}"),
    }
    let versions: Vec<String> = registry
        .list()
        .await
        .unwrap()
        .iter()
        .map(|p| p.version.to_string())
        .collect();
    assert_eq!(versions, ["1.0.0", "1.1.0"]);

    let removed = registry
        .remove("acme", &"1.0.0".parse().unwrap())
        .await
        .unwrap();
    assert!(removed.is_some());
    assert_eq!(
        next(&mut changes).await,
        Change::Removed {
            name: "acme".into(),
            version: "1.0.0".parse().unwrap()
        }
    );
    assert!(
        registry
            .download(&Digest::of(&one))
            .await
            .unwrap()
            .is_none(),
        "its bytes went with it"
    );
    assert!(
        registry
            .remove("acme", &"1.0.0".parse().unwrap())
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn the_memory_registry_keeps_the_contract() {
    contract(MemoryBus::new().pieces()).await;
}

#[tokio::test]
async fn the_jetstream_registry_keeps_the_contract_and_survives_a_restart() {
    let mut server = NatsServer::start().await.unwrap();
    let config = NatsConfig {
        url: server.url(),
        ..NatsConfig::default()
    };
    let bus = NatsBus::connect(config.clone()).await.unwrap();
    contract(bus.pieces()).await;

    // Published bundles are on disk: a restarted server still has them, and a fresh
    // connection (a process that never saw the publish) finds them.
    server.restart().await.unwrap();
    let fresh = NatsBus::connect(config).await.unwrap();
    let listed = fresh.pieces().list().await.unwrap();
    assert_eq!(listed.len(), 1);
    let bytes = fresh
        .pieces()
        .download(&listed[0].digest)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(bytes.as_ref(), b"another bundle");
}
