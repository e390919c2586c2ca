//! The piece host against real piece processes: the `probe` test piece, built from this
//! workspace and packed into bundles here. No broker or database is involved (the piece
//! store is in memory); what is under test is the process boundary.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use piecework_bundle::{Bundle, Digest, File, Limits, SigningKey};
use piecework_core::Catalog;
use piecework_host::build::{self, Options};
use piecework_host::directory::Directory;
use piecework_host::{HostConfig, PieceHost, Source, conformance};
use piecework_sdk::{
    Context, EgressPolicy, HttpClient, KvStore, MemoryKv, Owner, Piece, PieceError, RunInfo, Scope,
    ScopedStore, TriggerHandle, TriggerHook, WebhookRequest,
};
use piecework_testkit::binaries;
use serde_json::{Value, json};

/// The probe program with `version.txt` beside it, in its own directory.
fn probe_dir(version: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        binaries::binary("piecework-piece-probe", "probe"),
        dir.path().join("probe"),
    )
    .unwrap();
    std::fs::write(dir.path().join("version.txt"), version).unwrap();
    dir
}

async fn probe_bundle_with(version: &str, options: Options) -> Vec<u8> {
    let dir = probe_dir(version);
    let mut options = options;
    options.files.push(File {
        path: "version.txt".into(),
        contents: version.as_bytes().to_vec(),
        executable: false,
    });
    build::bundle_executable(&dir.path().join("probe"), options)
        .await
        .unwrap()
        .0
}

async fn probe_bundle(version: &str) -> Vec<u8> {
    probe_bundle_with(version, Options::default()).await
}

struct Harness {
    host: Arc<PieceHost>,
    kv: Arc<MemoryKv>,
    _cache: tempfile::TempDir,
}

fn harness(edit: impl FnOnce(&mut HostConfig)) -> Harness {
    let cache = tempfile::tempdir().unwrap();
    let mut config = HostConfig {
        cache_dir: cache.path().join("cache"),
        cancel_grace: Duration::from_millis(500),
        ..HostConfig::default()
    };
    edit(&mut config);
    Harness {
        host: PieceHost::new(config, EgressPolicy::default()).unwrap(),
        kv: Arc::new(MemoryKv::default()),
        _cache: cache,
    }
}

impl Harness {
    fn load(&self, bytes: Vec<u8>) -> Piece {
        self.host.load_bytes(Bytes::from(bytes), None).unwrap().0
    }

    fn ctx(&self, flow: &str, auth: Option<Value>) -> Context {
        // One client for the whole binary: loading the system's root certificates is slow.
        static HTTP: OnceLock<HttpClient> = OnceLock::new();
        let http = HTTP.get_or_init(|| HttpClient::new(EgressPolicy::default()).unwrap());
        Context::new(
            RunInfo::new("run-1", flow, 1, "step", 1),
            Owner { id: "ada".into() },
            ScopedStore::new(self.kv.clone() as Arc<dyn KvStore>, flow),
            http.clone(),
        )
        .with_auth(auth)
    }
}

async fn run(
    piece: &Piece,
    ctx: &Context,
    action: &str,
    input: Value,
) -> Result<Value, PieceError> {
    piece.action(action).unwrap().run_json(ctx, input).await
}

async fn pid_of(piece: &Piece, ctx: &Context) -> u64 {
    run(piece, ctx, "echo", json!({"value": 0})).await.unwrap()["pid"]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn the_sdk_passes_the_protocol_conformance_suite() {
    let dir = probe_dir("1.0.0");
    let report = conformance::run(&dir.path().join("probe"), dir.path()).await;
    for check in &report.checks {
        assert!(
            check.failure.is_none(),
            "{}: {:?}",
            check.name,
            check.failure
        );
    }
    assert!(report.checks.len() >= 8, "{:?}", report.checks);
    assert_eq!(report.piece.unwrap().name, "probe");
}

#[tokio::test]
async fn calls_cross_the_process_boundary_with_validated_input_and_the_flow_store() {
    let h = harness(|_| {});
    let piece = h.load(probe_bundle("1.0.0").await);
    let ctx = h.ctx("flow-a", None);
    let out = run(&piece, &ctx, "echo", json!({"value": [1, "two"]}))
        .await
        .unwrap();
    assert_eq!(out["value"], json!([1, "two"]));
    assert_eq!(
        (out["run"].as_str(), out["owner"].as_str()),
        (Some("run-1"), Some("ada"))
    );
    assert_ne!(out["pid"].as_u64(), Some(u64::from(std::process::id())));

    // Input is validated before it is sent, with the same error as in process.
    let err = run(&piece, &ctx, "echo", json!({})).await.unwrap_err();
    assert_eq!(err.to_string(), "prop `value`: is required");

    // The store goes through the host, scoped by the host to the call's flow.
    let stored = run(&piece, &ctx, "store", json!({"key": "k", "value": 1}))
        .await
        .unwrap();
    assert_eq!(stored, json!({"before": null, "after": 1}));
    assert_eq!(h.kv.get("flow:flow-a:k").await.unwrap(), Some(json!(1)));
    let other = h.ctx("flow-b", None);
    let stored = run(&piece, &other, "store", json!({"key": "k", "value": 2}))
        .await
        .unwrap();
    assert_eq!(
        stored["before"],
        Value::Null,
        "another flow does not see flow-a's key"
    );
    let global = run(
        &piece,
        &ctx,
        "store",
        json!({"key": "g", "value": 3, "global": true}),
    )
    .await
    .unwrap();
    assert_eq!(global["after"], 3);
    assert_eq!(h.kv.get("global:g").await.unwrap(), Some(json!(3)));

    // Errors keep their kind and retry-after across the pipe.
    let err = run(
        &piece,
        &ctx,
        "fail",
        json!({"retryable": true, "message": "upstream 503"}),
    )
    .await
    .unwrap_err();
    assert!(err.is_retryable());
    assert_eq!(err.retry_after(), Some(Duration::from_millis(1500)));
    let err = run(
        &piece,
        &ctx,
        "fail",
        json!({"retryable": false, "message": "bad request"}),
    )
    .await
    .unwrap_err();
    assert!(!err.is_retryable());
    assert_eq!(err.to_string(), "bad request");

    // Triggers of every kind, and the auth check.
    let Some(TriggerHandle::Polling(ticks)) = piece.trigger("ticks") else {
        panic!()
    };
    let items = ticks
        .poll_json(&ctx, json!({"items": ["a", "b"]}))
        .await
        .unwrap();
    let ids: Vec<_> = items.iter().map(|i| i.id.clone().unwrap()).collect();
    assert_eq!(ids, ["b", "a"]);
    let Some(TriggerHandle::Webhook(hook)) = piece.trigger("hook") else {
        panic!()
    };
    let request = WebhookRequest {
        body: json!([{"n": 1}, {"n": 2}]),
        ..WebhookRequest::default()
    };
    assert_eq!(
        hook.handle_json(&ctx, json!({}), &request)
            .await
            .unwrap()
            .len(),
        2
    );
    // Its hooks reach the piece with the flow's store, its connection and its webhook URL.
    let registered = h
        .ctx("hooked", Some(json!({"key": "good-1234"})))
        .with_webhook_url(Some("https://pw.example/v1/webhooks/hooked".into()));
    hook.hook_json(&registered, TriggerHook::Enable, json!({}))
        .await
        .unwrap();
    let stored = registered.store.get(Scope::Flow, "registration").await;
    assert_eq!(
        stored.unwrap(),
        Some(json!({"url": "https://pw.example/v1/webhooks/hooked", "has_key": true}))
    );
    hook.hook_json(&registered, TriggerHook::Disable, json!({}))
        .await
        .unwrap();
    let stored = registered.store.get(Scope::Flow, "registration").await;
    assert_eq!(stored.unwrap(), None);
    let Some(TriggerHandle::Schedule(every)) = piece.trigger("every") else {
        panic!()
    };
    assert!(every.schedule_json(json!({"every": "5m"})).await.is_ok());
    let err = every
        .schedule_json(json!({"every": "soon"}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("invalid interval"), "{err}");
    let good = h.ctx("f", Some(json!({"key": "good-1234"})));
    assert!(piece.validate_auth(&good).await.is_ok());
    let bad = h.ctx("f", Some(json!({"key": "stolen"})));
    assert_eq!(
        piece.validate_auth(&bad).await.unwrap_err().to_string(),
        "the key was refused"
    );
}

#[tokio::test]
async fn two_versions_of_one_piece_serve_side_by_side_at_once() {
    let h = harness(|_| {});
    let (one, two) = tokio::join!(probe_bundle("1.4.0"), probe_bundle("2.0.0"));
    let (one, two) = (h.load(one), h.load(two));
    assert_eq!(
        (one.version().to_string(), two.version().to_string()),
        ("1.4.0".into(), "2.0.0".into())
    );
    let ctx = h.ctx("f", None);
    let (a, b) = tokio::join!(
        run(&one, &ctx, "sleep", json!({"ms": 300})),
        run(&two, &ctx, "sleep", json!({"ms": 300})),
    );
    assert_eq!(a.unwrap()["version"], "1.4.0");
    assert_eq!(b.unwrap()["version"], "2.0.0");
    assert_ne!(pid_of(&one, &ctx).await, pid_of(&two, &ctx).await);
    // One process serves many calls at once.
    let calls: Vec<_> = (0..20)
        .map(|_| run(&one, &ctx, "sleep", json!({"ms": 200})))
        .collect();
    let started = std::time::Instant::now();
    for out in futures::future::join_all(calls).await {
        out.unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "calls ran one after another: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_crash_fails_its_calls_as_retryable_and_the_piece_restarts_after_a_backoff() {
    let h = harness(|_| {});
    let piece = h.load(probe_bundle("1.0.0").await);
    let ctx = h.ctx("f", None);
    let first = pid_of(&piece, &ctx).await;
    let slow = run(&piece, &ctx, "sleep", json!({"ms": 5000}));
    let crash = run(&piece, &ctx, "crash", json!({}));
    let (slow, crash) = tokio::join!(slow, crash);
    for err in [slow.unwrap_err(), crash.unwrap_err()] {
        assert!(err.is_retryable(), "{err}");
        assert!(err.to_string().contains("killed by signal 6"), "{err}");
    }
    // Right after a crash the next start waits for the backoff, and says so.
    let err = run(&piece, &ctx, "echo", json!({"value": 1}))
        .await
        .unwrap_err();
    assert!(
        err.is_retryable() && err.to_string().contains("restarted in"),
        "{err}"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let second = pid_of(&piece, &ctx).await;
    assert_ne!(first, second);
}

#[tokio::test]
async fn a_cancelled_call_stops_and_its_process_is_kept() {
    let h = harness(|_| {});
    let piece = h.load(probe_bundle("1.0.0").await);
    let ctx = h.ctx("f", None);
    let pid = pid_of(&piece, &ctx).await;
    let timed_out = tokio::time::timeout(
        Duration::from_millis(200),
        run(&piece, &ctx, "sleep", json!({"ms": 10_000})),
    )
    .await;
    assert!(timed_out.is_err());
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(
        pid_of(&piece, &ctx).await,
        pid,
        "the piece stopped the call when asked; nothing was killed"
    );
}

#[tokio::test]
async fn a_call_that_ignores_cancel_gets_its_process_killed() {
    let h = harness(|_| {});
    let piece = h.load(probe_bundle("1.0.0").await);
    let ctx = h.ctx("f", None);
    let pid = pid_of(&piece, &ctx).await;
    let hung = tokio::time::timeout(
        Duration::from_millis(200),
        run(&piece, &ctx, "hang", json!({"ms": 30_000})),
    )
    .await;
    assert!(hung.is_err());
    // After the grace period (500ms here) the process is killed; a later call gets a new one.
    let pool = &h.host.pools()[0];
    let process = pool.current().await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(5), process.exited())
        .await
        .unwrap();
    assert!(
        matches!(&exit, piecework_host::process::Exit::Killed(why) if why.contains("cancelled")),
        "{exit:?}"
    );
    assert_ne!(pid_of(&piece, &ctx).await, pid);
}

#[tokio::test]
async fn the_environment_is_only_what_the_manifest_declares() {
    // This test process's environment (cargo's variables, the developer's) stands in for a
    // worker's, with its PW_* settings: none of it may reach the piece.
    let h = harness(|config| {
        config.env.insert(
            "probe".into(),
            BTreeMap::from([("PROBE_REGION".into(), "eu-west".into())]),
        );
    });
    let options = Options {
        env: vec!["PROBE_REGION".into(), "PROBE_UNSET".into()],
        ..Options::default()
    };
    let piece = h.load(probe_bundle_with("1.0.0", options).await);
    let out = run(&piece, &h.ctx("f", None), "env", json!({}))
        .await
        .unwrap();
    let env = out["env"].as_object().unwrap();
    let names: Vec<&str> = env.keys().map(String::as_str).collect();
    assert!(!names.iter().any(|n| n.starts_with("PW_")), "{names:?}");
    assert_eq!(env["PROBE_REGION"], "eu-west");
    assert!(!env.contains_key("PROBE_UNSET"));
    assert!(
        !env.contains_key("CARGO"),
        "nothing of the host's own environment leaks: {names:?}"
    );
    for expected in ["PATH", "HOME", "TMPDIR", "LANG"] {
        assert!(env.contains_key(expected), "{expected} missing: {names:?}");
    }
    assert!(out["cwd"].as_str().unwrap().contains("cache"), "{out}");
}

#[tokio::test]
async fn the_memory_limit_stops_a_runaway_piece_and_the_host_carries_on() {
    let h = harness(|_| {});
    let options = Options {
        limits: Limits {
            memory_mb: Some(128),
            ..Limits::default()
        },
        ..Options::default()
    };
    let piece = h.load(probe_bundle_with("1.0.0", options).await);
    let ctx = h.ctx("f", None);
    assert_eq!(
        run(&piece, &ctx, "alloc", json!({"mb": 16})).await.unwrap()["allocated_mb"],
        16
    );
    let err = run(&piece, &ctx, "alloc", json!({"mb": 1024}))
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(err.to_string().contains("ended"), "{err}");
}

#[tokio::test]
async fn oversized_frames_fail_the_call_not_the_process() {
    let h = harness(|_| {});
    let options = Options {
        limits: Limits {
            max_message_bytes: Some(64 * 1024),
            ..Limits::default()
        },
        ..Options::default()
    };
    let piece = h.load(probe_bundle_with("1.0.0", options).await);
    let ctx = h.ctx("f", None);
    let pid = pid_of(&piece, &ctx).await;
    let err = run(&piece, &ctx, "big", json!({"bytes": 200_000}))
        .await
        .unwrap_err();
    assert!(!err.is_retryable());
    assert!(
        err.to_string()
            .contains("more than the host accepts (65536)"),
        "{err}"
    );
    let err = run(&piece, &ctx, "echo", json!({"value": "y".repeat(100_000)}))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("limits.max_message_bytes"),
        "{err}"
    );
    assert_eq!(pid_of(&piece, &ctx).await, pid);
}

/// Everything the host logs, for assertions.
fn captured() -> &'static Mutex<Vec<u8>> {
    static LOG: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    static INSTALL: OnceLock<()> = OnceLock::new();
    let log = LOG.get_or_init(Mutex::default);
    INSTALL.get_or_init(|| {
        struct Writer;
        impl std::io::Write for Writer {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                captured().lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(|| Writer)
            .init();
    });
    log
}

#[tokio::test]
async fn logs_and_stderr_reach_the_host_log_with_the_run_and_secrets_masked() {
    let log = captured();
    let h = harness(|_| {});
    let piece = h.load(probe_bundle("1.0.0").await);
    let ctx = h.ctx("f", Some(json!({"key": "sekrit-value-42", "region": "eu"})));
    run(&piece, &ctx, "log", json!({"message": "hello-from-probe"}))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("hello-from-probe"))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("probe says hello-from-probe with key ***")
                && l.contains("run_id=run-1")),
        "{text}"
    );
    assert!(
        lines.iter().any(
            |l| l.contains("probe stderr: hello-from-probe with key ***")
                && l.contains("stream=\"stderr\"")
                && l.contains("run_id=run-1")
        ),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("hello-from-probe half done")),
        "progress: {text}"
    );
    assert!(!text.contains("sekrit-value-42"), "{text}");
}

fn write_bundle(dir: &Path, bytes: &[u8]) -> PathBuf {
    let manifest = Bundle::read(bytes).unwrap().manifest;
    let path = dir.join(manifest.file_name());
    std::fs::write(dir.join(".incoming"), bytes).unwrap();
    std::fs::rename(dir.join(".incoming"), &path).unwrap();
    path
}

#[tokio::test]
async fn bundles_in_a_directory_are_loaded_replaced_and_unloaded() {
    let h = harness(|_| {});
    let dir = tempfile::tempdir().unwrap();
    let catalog = Arc::new(Catalog::new(piecework_core::Registry::new()));
    let mut directory = Directory::new(dir.path().to_owned(), h.host.clone(), catalog.clone());
    assert_eq!(directory.scan().await.unwrap(), Default::default());

    let path = write_bundle(dir.path(), &probe_bundle("1.0.0").await);
    std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
    std::fs::write(dir.path().join("broken.piece.tgz"), "not a bundle").unwrap();
    let scan = directory.scan().await.unwrap();
    assert_eq!(scan.loaded, ["probe 1.0.0"]);
    assert_eq!(scan.refused.len(), 1, "{scan:?}");
    assert!(scan.refused[0].1.contains("not a piece bundle"), "{scan:?}");
    let piece = catalog
        .snapshot()
        .get("probe", &"1.0.0".parse().unwrap())
        .unwrap()
        .clone();
    let ctx = h.ctx("f", None);
    assert_eq!(
        run(&piece, &ctx, "echo", json!({"value": 1}))
            .await
            .unwrap()["version"],
        "1.0.0"
    );
    // An unchanged directory changes nothing; the broken file is not reported again.
    assert_eq!(directory.scan().await.unwrap(), Default::default());

    write_bundle(dir.path(), &probe_bundle("1.1.0").await);
    assert_eq!(directory.scan().await.unwrap().loaded, ["probe 1.1.0"]);
    assert_eq!(catalog.snapshot().versions("probe").len(), 2);

    std::fs::remove_file(&path).unwrap();
    assert_eq!(directory.scan().await.unwrap().removed, ["probe 1.0.0"]);
    let versions: Vec<String> = catalog
        .snapshot()
        .versions("probe")
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(versions, ["1.1.0"]);
}

#[tokio::test]
async fn signatures_are_required_once_keys_are_trusted_and_tampering_is_caught() {
    let key = SigningKey::parse(&SigningKey::generate("ci").unwrap()).unwrap();
    let h = harness(|config| config.trusted_keys = key.public_key());
    let bytes = Bytes::from(probe_bundle("1.0.0").await);
    let digest = Digest::of(&bytes);
    let ctx = h.ctx("f", None);

    let (unsigned, _) = h.host.load_bytes(bytes.clone(), None).unwrap();
    let err = run(&unsigned, &ctx, "echo", json!({"value": 1}))
        .await
        .unwrap_err();
    assert!(!err.is_retryable());
    assert!(
        err.to_string()
            .contains("is not signed, and PW_TRUSTED_KEYS requires a signature by one of: ci"),
        "{err}"
    );

    let other = SigningKey::parse(&SigningKey::generate("laptop").unwrap()).unwrap();
    let (wrong, _) = h
        .host
        .load_bytes(bytes.clone(), Some(other.sign(&digest)))
        .unwrap();
    let err = run(&wrong, &ctx, "echo", json!({"value": 1}))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("`laptop`, which is not in PW_TRUSTED_KEYS"),
        "{err}"
    );

    let (signed, _) = h
        .host
        .load_bytes(bytes.clone(), Some(key.sign(&digest)))
        .unwrap();
    assert_eq!(
        run(&signed, &ctx, "echo", json!({"value": 1}))
            .await
            .unwrap()["value"],
        1
    );

    // Bytes that are not the bundle the manifest was read from are refused before unpacking.
    let manifest = Bundle::read(&bytes).unwrap().manifest;
    let mut tampered = bytes.to_vec();
    let at = tampered.len() - 100;
    tampered[at] ^= 1;
    let fake = Digest::of(b"what the catalog was told");
    let piece = h
        .host
        .load(
            &manifest,
            &fake,
            Source::Bytes {
                bytes: Bytes::from(tampered),
                signature: Some(key.sign(&fake)),
            },
        )
        .unwrap();
    let err = run(&piece, &ctx, "echo", json!({"value": 1}))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("changed or tampered with"),
        "{err}"
    );
}

#[tokio::test]
async fn idle_processes_stop_and_start_again_when_needed() {
    let h = harness(|config| config.idle_timeout = Duration::from_millis(300));
    let piece = h.load(probe_bundle("1.0.0").await);
    let ctx = h.ctx("f", None);
    let first = pid_of(&piece, &ctx).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    h.host.tidy();
    let pool = &h.host.pools()[0];
    assert!(pool.current().await.is_none(), "an idle process is stopped");
    assert_ne!(
        pid_of(&piece, &ctx).await,
        first,
        "and a new one starts on the next call"
    );
}
