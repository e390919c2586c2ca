//! What piecework refuses to do, across real processes on real NATS and Redis: call internal
//! addresses (the egress guard, in the worker, in a piece process and in the api's connection
//! check), buffer or store oversized responses and outputs, and re-run a step whose results
//! keep getting lost to a store outage.

mod common;

use std::time::Duration;

use common::{Fleet, Target, client};
use serde_json::{Value, json};

fn webhook_flow(name: &str, steps: &str) -> String {
    format!(
        "apiVersion: piecework/v1\nkind: Flow\nname: {name}\ntrigger: {{ piece: webhook, trigger: catch, auth: none }}\nsteps:\n{steps}"
    )
}

/// A fleet whose processes run with the default egress policy: no `PW_EGRESS_ALLOW`.
async fn guarded_fleet() -> Fleet {
    let mut fleet = Fleet::start("").await;
    fleet.env.push(("PW_EGRESS_ALLOW".into(), String::new()));
    fleet
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployed_fleet_refuses_loopback_in_steps_pieces_and_connection_checks() {
    let target = Target::start().await;
    let mut fleet = guarded_fleet().await;
    fleet.with_demo_piece();
    fleet.start_api().await;
    fleet.start_worker("w1", &[]).await;

    // A built-in piece in the worker process.
    let port = target.url.rsplit(':').next().unwrap().to_owned();
    let steps = format!(
        "  - {{ name: a, piece: http, action: send_request, input: {{ url: \"{}/ok\" }}, on_failure: continue }}\n  - {{ name: b, piece: http, action: send_request, input: {{ url: \"http://localhost:{port}/ok\" }}, on_failure: continue }}\n  - {{ name: c, piece: http, action: send_request, input: {{ url: \"http://[::ffff:127.0.0.1]:{port}/ok\" }}, retry: {{ max_attempts: 3, initial_interval: 1s }} }}\n",
        target.url
    );
    fleet.apply(&webhook_flow("ssrf", &steps)).await;
    let id = fleet.webhook("ssrf", json!({})).await;
    let run = fleet.finished(&id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "failed", "{run}");
    for step in run["steps"].as_array().unwrap() {
        let error = step["error"].as_str().unwrap();
        assert!(error.starts_with("egress policy: "), "{error}");
        assert!(error.contains("loopback address"), "{error}");
        assert_eq!(
            step["attempts"].as_array().unwrap().len(),
            1,
            "an egress refusal is not retried: {step}"
        );
    }
    assert!(target.hits("ok").is_empty());

    // A private piece in its own process: the api checks a connection through it when it is
    // saved, and the piece's client is held to the same policy.
    let response = client()
        .post(format!("{}/v1/connections", fleet.api))
        .json(&json!({
            "name": "inside",
            "piece": "my-company-api",
            "values": {"api_key": "k-123456", "environment": "dev", "base_url": target.url},
        }))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 422, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("egress policy: address 127.0.0.1 is a loopback address"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_responses_and_outputs_fail_their_step_once_and_are_not_stored() {
    let target = Target::start().await;
    let mut fleet = Fleet::start("").await;
    fleet.start_api().await;
    fleet.start_worker("w1", &[]).await;
    let steps = format!(
        "  - {{ name: huge, piece: http, action: send_request, input: {{ url: \"{url}/big/huge?bytes=11000000\" }}, on_failure: continue }}\n  - {{ name: allowed, piece: http, action: send_request, input: {{ url: \"{url}/big/allowed?bytes=3000000\" }}, max_response_bytes: 20000000, on_failure: continue }}\n  - {{ name: small, piece: http, action: send_request, input: {{ url: \"{url}/big/small?bytes=2000\" }}, max_response_bytes: 1000 }}\n",
        url = target.url
    );
    fleet.apply(&webhook_flow("big", &steps)).await;
    let id = fleet.webhook("big", json!({})).await;
    let run = fleet.finished(&id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "failed", "{run}");
    let error = |i: usize| run["steps"][i]["error"].as_str().unwrap().to_owned();
    assert!(
        error(0).contains("is larger than 10485760 bytes (max_response_bytes)"),
        "{}",
        error(0)
    );
    // Read within the step's own limit, but too large to record (2 MiB by default).
    assert!(
        error(1).starts_with("the step's output is 3000"),
        "{}",
        error(1)
    );
    assert!(
        error(2).contains("is larger than 1000 bytes"),
        "{}",
        error(2)
    );
    for key in ["huge", "allowed", "small"] {
        assert_eq!(target.hits(key).len(), 1, "{key} was not retried");
    }
    let mut redis = fleet.redis().await;
    let bytes: u64 = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(format!("pw:run:{id}"))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(bytes < 64 * 1024, "the run takes {bytes} bytes in Redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_whose_result_is_lost_to_a_store_outage_is_not_run_past_its_budget() {
    let target = Target::start().await;
    // No allowance for infrastructure errors beyond the policy's one attempt.
    let mut fleet = Fleet::start("[worker]\nmax_infra_retries = 0\n").await;
    fleet.start_api().await;
    let worker = fleet.start_worker("w1", &[]).await;
    let steps = format!(
        "  - {{ name: call, piece: http, action: send_request, input: {{ url: \"{}/slow/once?ms=1500\" }}, retry: {{ max_attempts: 1 }} }}\n",
        target.url
    );
    fleet.apply(&webhook_flow("lost", &steps)).await;
    let id = fleet.webhook("lost", json!({})).await;

    // Redis goes away while the call is in flight, so its result cannot be recorded.
    target
        .wait_for_hits("once", 1, Duration::from_secs(30))
        .await;
    fleet.redis.stop().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    fleet.redis.restart().await.unwrap();

    let run = fleet.finished(&id, Duration::from_secs(90)).await;
    assert_eq!(run["status"], "failed", "{run}");
    let error = run["steps"][0]["error"].as_str().unwrap();
    assert!(error.starts_with("gave up after "), "{error}");
    assert_eq!(target.hits("once").len(), 1, "the call was not made again");
    let metrics = client()
        .get(worker.replace("/readyz", "/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let retried = metrics
        .lines()
        .find(|l| l.starts_with("piecework_jobs_infra_retries_total{"))
        .unwrap_or_else(|| panic!("no infrastructure retry counted:\n{metrics}"));
    assert!(retried.contains("kind=\"step\""), "{retried}");
}
