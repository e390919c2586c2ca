//! Issue-level guarantees across real processes: `piecework api`, `worker` and `scheduler` as
//! separate processes on a real nats-server and redis-server (testkit), killed and restarted.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use common::{Fleet, Target, client};
use futures::future::join_all;
use piecework_proto::Message as _;
use serde_json::{Value, json};

/// No settings beyond the defaults.
const BASE: &str = "";

fn webhook_flow(name: &str, steps: &str) -> String {
    format!(
        "apiVersion: piecework/v1\nkind: Flow\nname: {name}\ntrigger: {{ piece: webhook, trigger: catch, auth: none }}\nsteps:\n{steps}"
    )
}

fn workers_of(run: &Value) -> BTreeSet<String> {
    run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["attempts"].as_array().unwrap().iter())
        .map(|a| a["worker"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_flow_runs_across_two_worker_processes_and_records_results_and_audit() {
    let target = Target::start().await;
    let mut fleet = Fleet::start(BASE).await;
    fleet.start_api().await;
    fleet.start_worker("w1", &["--concurrency", "1"]).await;
    fleet.start_worker("w2", &["--concurrency", "1"]).await;
    let steps = format!(
        "  - {{ name: fetch, piece: http, action: send_request, input: {{ url: \"{url}/ok\" }} }}\n  - {{ name: shape, piece: data, action: set, input: {{ value: {{ ok: \"{{{{ steps.fetch.output.body.ok }}}}\", n: \"{{{{ trigger.body.n }}}}\" }} }} }}\n  - {{ name: notify, piece: http, action: send_request, input: {{ method: POST, url: \"{url}/ok\", body: \"{{{{ steps.shape.output }}}}\" }} }}\n",
        url = target.url
    );
    fleet.apply(&webhook_flow("three", &steps)).await;

    let runs = join_all((0..12).map(|n| fleet.webhook("three", json!({"n": n})))).await;
    let mut workers = BTreeSet::new();
    for id in &runs {
        let run = fleet.finished(id, Duration::from_secs(60)).await;
        assert_eq!(run["status"], "succeeded", "{run}");
        assert_eq!(run["steps"].as_array().unwrap().len(), 3);
        assert_eq!(run["steps"][1]["output"]["ok"], true);
        workers.extend(workers_of(&run));
    }
    assert_eq!(
        workers,
        BTreeSet::from(["w1".to_owned(), "w2".to_owned()]),
        "steps spread over both workers"
    );

    let results = fleet.stream("pw:results").await;
    let ours: HashSet<&String> = runs.iter().collect();
    let entries: Vec<_> = results
        .iter()
        .filter(|e| ours.contains(&e["run"]))
        .collect();
    assert_eq!(entries.len(), 36, "one pw:results entry per step attempt");
    assert!(
        entries.iter().all(|e| e["status"] == "succeeded"
            && e["flow"] == "three"
            && e["version"]
                == if e["piece"] == "http" {
                    "0.2.0"
                } else {
                    "0.1.0"
                }),
        "{entries:?}"
    );
    let finishing = entries
        .iter()
        .filter(|e| e["run_status"] == "succeeded")
        .count();
    assert_eq!(finishing, 12);

    let audit = fleet.stream("pw:audit").await;
    assert!(audit.iter().any(|e| e["action"] == "flow.apply"
        && e["resource"] == "flow/three"
        && e["outcome"] == "success"));
    let steps_audited = audit
        .iter()
        .filter(|e| e["action"] == "step.execute" && e["outcome"] == "success")
        .count();
    assert_eq!(steps_audited, 36, "every step execution is audited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_follow_the_policy_and_a_failed_run_retried_after_the_fix_completes() {
    let target = Target::start().await;
    let mut fleet = Fleet::start(BASE).await;
    fleet.start_api().await;
    fleet.start_worker("w1", &[]).await;
    let retry = "retry: { max_attempts: 3, initial_interval: 1s, multiplier: 2, jitter: 0 }";
    let flaky = format!(
        "  - {{ name: call, piece: http, action: send_request, input: {{ url: \"{}/flaky/a?fail=2\" }}, {retry} }}\n",
        target.url
    );
    fleet.apply(&webhook_flow("flaky", &flaky)).await;
    let id = fleet.webhook("flaky", json!({})).await;
    let run = fleet.finished(&id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let statuses: Vec<&str> = run["steps"][0]["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["retrying", "retrying", "succeeded"]);
    let hits = target.hits("a");
    assert_eq!(hits.len(), 3);
    assert!(
        hits[1] - hits[0] >= Duration::from_secs(1),
        "first retry after the initial interval"
    );
    assert!(
        hits[2] - hits[1] >= Duration::from_secs(2),
        "second retry after interval × multiplier"
    );

    target.set_broken("b", true);
    let broken = format!(
        "  - {{ name: call, piece: http, action: send_request, input: {{ url: \"{}/toggle/b\" }}, retry: {{ max_attempts: 2, initial_interval: 1s, jitter: 0 }} }}\n  - {{ name: after, piece: data, action: set, input: {{ value: \"{{{{ steps.call.output.body.fixed }}}}\" }} }}\n",
        target.url
    );
    fleet.apply(&webhook_flow("broken", &broken)).await;
    let id = fleet.webhook("broken", json!({})).await;
    let run = fleet.finished(&id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "failed");
    assert!(
        run["error"]
            .as_str()
            .unwrap()
            .contains("gave up after 2 attempts"),
        "{run}"
    );
    assert_eq!(target.hits("b").len(), 2, "no retry beyond the policy");

    target.set_broken("b", false);
    let retried = client()
        .post(format!("{}/v1/runs/{id}/retry", fleet.api))
        .send()
        .await
        .unwrap();
    assert_eq!(retried.status(), 202);
    let run = fleet.finished(&id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["steps"][1]["output"], true);
    assert_eq!(run["steps"][0]["attempts"].as_array().unwrap().len(), 3);
}

/// `before` and `slow` run in one delivery (inline); the worker is killed during `slow`, after
/// `before` was journaled. The redelivered job resumes after `before`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_step_is_replaced_and_the_step_is_recorded_once() {
    let target = Target::start().await;
    let mut fleet = Fleet::start("[worker]\nack_wait = \"2s\"\n").await;
    fleet.start_api().await;
    fleet.start_worker("doomed", &[]).await;
    let steps = format!(
        "  - {{ name: before, piece: data, action: set, input: {{ value: 1 }} }}\n  - {{ name: slow, piece: http, action: send_request, input: {{ url: \"{}/slow/k?ms=1500\" }} }}\n  - {{ name: after, piece: data, action: set, input: {{ value: 2 }} }}\n",
        target.url
    );
    fleet.apply(&webhook_flow("slow", &steps)).await;
    let id = fleet.webhook("slow", json!({})).await;
    target.wait_for_hits("k", 1, Duration::from_secs(30)).await;
    fleet.kill("doomed");
    fleet.start_worker("rescuer", &[]).await;

    let run = fleet.finished(&id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let slow = &run["steps"][1];
    assert_eq!(slow["name"], "slow");
    let attempts = slow["attempts"].as_array().unwrap();
    assert_eq!(
        attempts.len(),
        1,
        "the committed result is recorded once: {slow}"
    );
    assert_eq!(attempts[0]["worker"], "rescuer");
    // Attempts are numbered from the record: the execution lost with the worker left none.
    assert_eq!(attempts[0]["attempt"], 1);
    assert_eq!(
        run["steps"][0]["attempts"].as_array().unwrap().len(),
        1,
        "`before` ran once"
    );
    let results = fleet.stream("pw:results").await;
    let recorded = results
        .iter()
        .filter(|e| e["run"] == id && e["step"] == "slow")
        .count();
    assert_eq!(recorded, 1);
    // The action itself ran twice (at least once is the guarantee; see docs/architecture.md).
    assert_eq!(target.hits("k").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schedulers_publish_one_poll_per_tick_and_a_redelivered_poll_starts_no_duplicate_run() {
    let mut fleet = Fleet::start(BASE).await;
    fleet.start_api().await;
    fleet.start_worker("w1", &[]).await;
    let flow = "apiVersion: piecework/v1\nkind: Flow\nname: tick\ntrigger: { piece: schedule, trigger: every, input: { interval: 1s } }\nsteps:\n  - { name: noop, piece: data, action: set, input: { value: \"{{ trigger.scheduled_at }}\" } }\n";
    fleet.apply(flow).await;
    fleet.start_scheduler("s1").await;
    fleet.start_scheduler("s2").await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    fleet.kill("s1");
    fleet.kill("s2");
    tokio::time::sleep(Duration::from_secs(2)).await;

    let list: Value = client()
        .get(format!("{}/v1/runs?flow=tick&limit=100", fleet.api))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let runs = list["runs"].as_array().unwrap().clone();
    assert!(runs.len() >= 3, "about one run per second: {runs:?}");
    assert!(runs.iter().all(|r| r["status"] == "succeeded"), "{runs:?}");
    let ticks: HashSet<String> =
        join_all(runs.iter().map(|r| fleet.run(r["id"].as_str().unwrap())))
            .await
            .iter()
            .map(|run| run["trigger"]["scheduled_at"].as_str().unwrap().to_owned())
            .collect();
    assert_eq!(ticks.len(), runs.len(), "one run per tick");

    // Every tick stored exactly one poll job: the stream holds one poll and one step per run.
    let nats = async_nats::connect(fleet.nats.url()).await.unwrap();
    let jetstream = async_nats::jetstream::new(nats);
    let mut stream = jetstream.get_stream("PW_JOBS").await.unwrap();
    let stored = stream.info().await.unwrap().state.last_sequence;
    assert_eq!(
        stored,
        2 * runs.len() as u64,
        "no duplicate poll job was stored"
    );

    // A poll job delivered again (as after a lost ack) under another message id.
    let first = fleet.run(runs[0]["id"].as_str().unwrap()).await;
    let scheduled =
        chrono::DateTime::parse_from_rfc3339(first["trigger"]["scheduled_at"].as_str().unwrap())
            .unwrap();
    let job = piecework_proto::v1::PollJob {
        flow_id: "tick".into(),
        flow_version: 1,
        tick_unix_ms: scheduled.timestamp_millis(),
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "redelivered-poll");
    jetstream
        .publish_with_headers("pw.jobs.default.poll", headers, job.encode_to_vec().into())
        .await
        .unwrap()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let again: Value = client()
        .get(format!("{}/v1/runs?flow=tick&limit=100", fleet.api))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        again["runs"].as_array().unwrap().len(),
        runs.len(),
        "the same tick maps to the same run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_job_is_terminated_and_recorded_and_the_worker_keeps_serving() {
    let mut fleet = Fleet::start(BASE).await;
    fleet.start_api().await;
    fleet.start_worker("w1", &[]).await;
    fleet.apply(&webhook_flow("echo", "  - { name: one, piece: data, action: set, input: { value: \"{{ trigger.body }}\" } }\n")).await;

    let nats = async_nats::connect(fleet.nats.url()).await.unwrap();
    let jetstream = async_nats::jetstream::new(nats);
    jetstream
        .publish(
            "pw.jobs.default.step",
            bytes::Bytes::from_static(b"\x08\x96\x01 definitely not a StepJob \xff"),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let id = fleet.webhook("echo", json!({"still": "serving"})).await;
    let run = fleet.finished(&id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded");
    assert_eq!(run["steps"][0]["output"], json!({"still": "serving"}));

    let audit = fleet.stream("pw:audit").await;
    let rejected: Vec<_> = audit
        .iter()
        .filter(|e| e["action"] == "job.reject")
        .collect();
    assert_eq!(rejected.len(), 1, "{audit:?}");
    assert_eq!(rejected[0]["resource"], "pw.jobs.default.step");
    assert_eq!(rejected[0]["outcome"], "failure");
    let mut stream = jetstream.get_stream("PW_JOBS").await.unwrap();
    assert_eq!(
        stream.info().await.unwrap().state.messages,
        0,
        "nothing left to redeliver"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_nats_and_redis_during_runs_loses_no_run() {
    let target = Target::start().await;
    let mut fleet = Fleet::start("[worker]\nack_wait = \"3s\"\n").await;
    fleet.start_api().await;
    fleet.start_worker("w1", &[]).await;
    let steps = format!(
        "  - {{ name: slow, piece: http, action: send_request, input: {{ url: \"{}/slow/r?ms=400\" }}, retry: {{ max_attempts: 10, initial_interval: 1s, jitter: 0 }} }}\n  - {{ name: after, piece: data, action: set, input: {{ value: \"{{{{ trigger.body.n }}}}\" }}, retry: {{ max_attempts: 10, initial_interval: 1s, jitter: 0 }} }}\n",
        target.url
    );
    fleet.apply(&webhook_flow("steady", &steps)).await;
    let runs = join_all((0..6).map(|n| fleet.webhook("steady", json!({"n": n})))).await;

    fleet.nats.restart().await.unwrap();
    fleet.redis.restart().await.unwrap();

    for (n, id) in runs.iter().enumerate() {
        let run = fleet.finished(id, Duration::from_secs(90)).await;
        assert_eq!(run["status"], "succeeded", "{run}");
        assert_eq!(run["steps"][1]["output"], json!(n));
    }
    // And the fleet keeps working after both restarts.
    let id = fleet.webhook("steady", json!({"n": 99})).await;
    assert_eq!(
        fleet.finished(&id, Duration::from_secs(60)).await["status"],
        "succeeded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_step_in_flight_finish_and_hands_the_rest_on() {
    let target = Target::start().await;
    let mut fleet = Fleet::start(BASE).await;
    fleet.start_api().await;
    fleet.start_worker("leaving", &[]).await;
    let steps = format!(
        "  - {{ name: slow, piece: http, action: send_request, input: {{ url: \"{}/slow/g?ms=1500\" }} }}\n  - {{ name: after, piece: data, action: set, input: {{ value: done }} }}\n",
        target.url
    );
    fleet.apply(&webhook_flow("graceful", &steps)).await;
    let id = fleet.webhook("graceful", json!({})).await;
    target.wait_for_hits("g", 1, Duration::from_secs(30)).await;
    let status = fleet.terminate("leaving");
    assert!(
        status.success(),
        "clean exit on SIGTERM: {status}\n{}",
        fleet.logs("leaving")
    );
    let midway = fleet.run(&id).await;
    assert_eq!(
        midway["steps"][0]["status"], "succeeded",
        "the step in flight finished: {midway}"
    );
    assert_eq!(midway["steps"][0]["attempts"][0]["worker"], "leaving");

    fleet.start_worker("staying", &[]).await;
    let run = fleet.finished(&id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded");
    assert_eq!(run["steps"][1]["attempts"][0]["worker"], "staying");
    assert_eq!(target.hits("g").len(), 1, "nothing ran twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_fleet_leaves_redis_alone() {
    let mut fleet = Fleet::start(BASE).await;
    fleet.start_api().await;
    fleet.start_worker("w1", &[]).await;
    fleet.start_scheduler("s1").await;
    fleet
        .apply(&webhook_flow(
            "idle",
            "  - { name: one, piece: data, action: set, input: { value: 1 } }\n",
        ))
        .await;
    let mut conn = fleet.redis().await;
    let commands = async |conn: &mut redis::aio::MultiplexedConnection| -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .query_async(conn)
            .await
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = commands(&mut conn).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let spent = commands(&mut conn).await - before - 1;
    // The scheduler re-reads the flow list every 5s (two commands); nothing else polls.
    assert!(
        spent <= 10,
        "an idle fleet sent {spent} Redis commands in 10s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_is_not_ready_while_nats_is_away_and_ready_again_after() {
    let mut fleet = Fleet::start(BASE).await;
    let ready = fleet.start_worker("w1", &[]).await;
    let status = async || {
        client()
            .get(&ready)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    assert_eq!(status().await, 200);
    fleet.nats.stop().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while status().await != 503 {
        assert!(
            std::time::Instant::now() < deadline,
            "still ready without NATS"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    fleet.nats.restart().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while status().await != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "not ready again after NATS came back:\n{}",
            fleet.logs("w1")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_longer_than_the_ack_wait_sends_progress_and_runs_once() {
    let target = Target::start().await;
    let mut fleet = Fleet::start("[worker]\nack_wait = \"2s\"\n").await;
    fleet.start_api().await;
    fleet.start_worker("w1", &[]).await;
    fleet.start_worker("w2", &[]).await;
    let steps = format!(
        "  - {{ name: long, piece: http, action: send_request, input: {{ url: \"{}/slow/p?ms=5000\" }} }}\n",
        target.url
    );
    fleet.apply(&webhook_flow("long", &steps)).await;
    let id = fleet.webhook("long", json!({})).await;
    let run = fleet.finished(&id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["steps"][0]["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(
        target.hits("p").len(),
        1,
        "not redelivered to the other worker mid-step"
    );
}

/// kill -9 of a worker while it runs many 3-step runs inline: every run finishes, and no step
/// is recorded as done twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_worker_under_load_loses_no_run_and_commits_no_step_twice() {
    let target = Target::start().await;
    // The default ack wait (6 s): what an installation gets.
    let mut fleet = Fleet::start("").await;
    fleet.start_api().await;
    fleet.start_worker("doomed", &[]).await;
    fleet.start_worker("steady", &[]).await;
    let steps = format!(
        "  - {{ name: a, piece: data, action: set, input: {{ value: \"{{{{ trigger.body.n }}}}\" }} }}\n  - {{ name: b, piece: http, action: send_request, input: {{ url: \"{}/slow/load?ms=50\" }} }}\n  - {{ name: c, piece: data, action: set, input: {{ value: \"{{{{ steps.a.output }}}}\" }} }}\n",
        target.url
    );
    fleet.apply(&webhook_flow("load", &steps)).await;
    let runs = join_all((0..60).map(|n| fleet.webhook("load", json!({"n": n})))).await;
    target
        .wait_for_hits("load", 10, Duration::from_secs(30))
        .await;
    fleet.kill("doomed");
    let killed = chrono::Utc::now();

    let mut last_finish = killed;
    for (n, id) in runs.iter().enumerate() {
        let run = fleet.finished(id, Duration::from_secs(90)).await;
        assert_eq!(run["status"], "succeeded", "{run}");
        assert_eq!(run["steps"][2]["output"], json!(n));
        let finished = chrono::DateTime::parse_from_rfc3339(run["finished_at"].as_str().unwrap())
            .unwrap()
            .with_timezone(&chrono::Utc);
        last_finish = last_finish.max(finished);
        for step in run["steps"].as_array().unwrap() {
            let done = step["attempts"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|a| a["status"] == "succeeded")
                .count();
            assert_eq!(done, 1, "{step}");
        }
    }
    let results = fleet.stream("pw:results").await;
    let mut succeeded = std::collections::HashMap::new();
    for entry in results.iter().filter(|e| e["status"] == "succeeded") {
        *succeeded
            .entry((entry["run"].clone(), entry["step"].clone()))
            .or_insert(0) += 1;
    }
    assert_eq!(succeeded.len(), 60 * 3);
    assert!(succeeded.values().all(|&n| n == 1), "a step recorded twice");
    // The killed worker's jobs come back after the 6 s ack wait, not 30 s (about 8 s here,
    // the bound being 10 s plus the step; the margin is for a loaded machine).
    let recovered = (last_finish - killed).to_std().unwrap_or_default();
    eprintln!("every run finished {recovered:?} after the kill");
    assert!(recovered < Duration::from_secs(20), "{recovered:?}");
}

/// A branch across processes: `triage` chooses by the webhook's body; the `then` branch calls
/// a slow endpoint (the worker is killed there), then hops to a step on another queue, whose
/// end closes the branch; `report` reads which branch ran and its output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branches_run_across_workers_and_queues_and_survive_a_kill_inside_a_branch() {
    let target = Target::start().await;
    let mut fleet = Fleet::start("[worker]\nack_wait = \"2s\"\n").await;
    fleet.start_api().await;
    fleet.start_worker("doomed", &["--queues", "default"]).await;
    fleet.start_worker("vpn", &["--queues", "vpn"]).await;
    let steps = format!(
        concat!(
            "  - name: triage\n",
            "    if: \"{{{{ trigger.body.critical }}}}\"\n",
            "    then:\n",
            "      - {{ name: page, piece: http, action: send_request, input: {{ url: \"{url}/slow/page?ms=1500\" }} }}\n",
            "      - {{ name: notify, piece: data, action: set, queue: vpn, input: {{ value: \"paged {{{{ steps.page.output.status }}}}\" }} }}\n",
            "    else:\n",
            "      - {{ name: backlog, piece: data, action: set, input: {{ value: \"queued\" }} }}\n",
            "  - {{ name: report, piece: data, action: set, input: {{ value: \"{{{{ steps.triage.branch }}}}: {{{{ steps.triage.output }}}}\" }} }}\n",
        ),
        url = target.url
    );
    fleet.apply(&webhook_flow("triage", &steps)).await;

    let calm = fleet.webhook("triage", json!({"critical": false})).await;
    let run = fleet.finished(&calm, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let names: Vec<&str> = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["triage", "backlog", "report"]);
    assert_eq!(run["steps"][0]["branch"], "else");
    assert_eq!(run["steps"][0]["input"], json!({"then": false}));
    assert_eq!(run["steps"][2]["output"], "else: queued");

    let urgent = fleet.webhook("triage", json!({"critical": true})).await;
    target
        .wait_for_hits("page", 1, Duration::from_secs(30))
        .await;
    fleet.kill("doomed");
    fleet
        .start_worker("rescuer", &["--queues", "default"])
        .await;
    let run = fleet.finished(&urgent, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let step = |name: &str| {
        run["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no step {name} in {run}"))
            .clone()
    };
    let triage = step("triage");
    assert_eq!(triage["branch"], "then");
    assert_eq!(
        triage["attempts"].as_array().unwrap().len(),
        1,
        "the branch was chosen once, before the kill: {triage}"
    );
    assert_eq!(triage["attempts"][0]["worker"], "doomed");
    assert_eq!(triage["output"], "paged 200", "the branch's output");
    assert_eq!(step("page")["attempts"][0]["worker"], "rescuer");
    assert_eq!(step("notify")["attempts"][0]["worker"], "vpn");
    assert_eq!(step("report")["output"], "then: paged 200");
    assert_eq!(step("report")["attempts"][0]["worker"], "rescuer");
}

/// A delay and an approval wait on the production topology: waiting runs hold no job and
/// survive a kill -9 of every piecework process and a restart of NATS and Redis; the delay's
/// timer wakes the run on the new processes and the approval resumes it exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_runs_survive_restarts_of_every_process_and_resume_exactly_once() {
    let mut fleet = Fleet::start("[scheduler]\ntimer_poll = \"1s\"\n").await;
    fleet.start_api().await;
    fleet.start_worker("w1", &[]).await;
    fleet.start_scheduler("s1").await;
    let steps = concat!(
        "  - { name: pause, delay: 3s }\n",
        "  - { name: approval, wait_for: approval, timeout: 1h }\n",
        "  - { name: done, piece: data, action: set, input: { value: \"{{ steps.approval.output.by }}\" } }\n",
    );
    fleet.apply(&webhook_flow("gated", steps)).await;
    let id = fleet.webhook("gated", json!({})).await;
    let run = fleet.run_in(&id, "waiting", Duration::from_secs(30)).await;
    assert_eq!(run["steps"][0]["name"], "pause");
    assert_eq!(run["steps"][0]["status"], "waiting");
    assert_eq!(run["steps"][0]["input"]["waiting_for"], "delay");

    // Everything goes down while the run waits; the delay ends meanwhile.
    fleet.kill("w1");
    fleet.kill("s1");
    fleet.kill("api");
    fleet.nats.restart().await.unwrap();
    fleet.redis.restart().await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    fleet.start_api().await;
    fleet.start_worker("w2", &[]).await;
    fleet.start_scheduler("s2").await;

    // The delay's timer wakes it on the new processes; then it waits for the approval.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let run = loop {
        let run = fleet.run(&id).await;
        if run["steps"][1]["status"] == "waiting" {
            break run;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{run}\n{}",
            fleet.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(run["status"], "waiting");
    assert_eq!(run["steps"][0]["status"], "succeeded");
    assert_eq!(
        run["steps"][0]["attempts"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()["worker"],
        "w2"
    );

    // Resumed by an operator, once; a second resume is refused.
    let resume = |by: &str| {
        client()
            .post(format!("{}/v1/runs/{id}/resume", fleet.api))
            .json(&json!({"step": "approval", "payload": {"by": by}}))
            .send()
    };
    let first = resume("ada").await.unwrap();
    assert_eq!(first.status(), 202, "{}", first.text().await.unwrap());
    let second = resume("bob").await.unwrap();
    assert_eq!(second.status(), 409);
    let body: Value = second.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not waiting on step `approval`"),
        "{body}"
    );
    let bad = client()
        .post(format!("{}/v1/runs/{id}/resume", fleet.api))
        .json(&json!({"payload": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    let run = fleet.finished(&id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["steps"][2]["output"], "ada");
    let audit = fleet.stream("pw:audit").await;
    assert_eq!(
        audit
            .iter()
            .filter(|e| e["action"] == "run.resume" && e["outcome"] == "success")
            .count(),
        1
    );
}

/// `rate: 10/s` holds across two worker processes: no 11 calls within 0.9 s, and waiting for
/// the limit spends no attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_holds_across_workers_without_spending_attempts() {
    let target = Target::start().await;
    let mut fleet = Fleet::start(BASE).await;
    fleet.start_api().await;
    fleet.start_worker("w1", &["--concurrency", "8"]).await;
    fleet.start_worker("w2", &["--concurrency", "8"]).await;
    let steps = format!(
        "  - {{ name: call, piece: http, action: send_request, rate: 10/s, rate_key: internal-api, input: {{ url: \"{}/slow/limited?ms=1\" }}, retry: {{ max_attempts: 1 }} }}\n",
        target.url
    );
    fleet.apply(&webhook_flow("limited", &steps)).await;
    let runs = join_all((0..30).map(|n| fleet.webhook("limited", json!({"n": n})))).await;
    let mut workers = BTreeSet::new();
    for id in &runs {
        let run = fleet.finished(id, Duration::from_secs(60)).await;
        assert_eq!(run["status"], "succeeded", "{run}");
        assert_eq!(run["steps"][0]["attempts"].as_array().unwrap().len(), 1);
        workers.extend(workers_of(&run));
    }
    assert_eq!(workers.len(), 2, "both workers called: {workers:?}");
    let mut hits = target.hits("limited");
    hits.sort();
    assert_eq!(hits.len(), 30);
    for window in hits.windows(11) {
        let span = window[10] - window[0];
        assert!(
            span >= Duration::from_millis(900),
            "11 calls within {span:?}: the limit is 10/s"
        );
    }
}

/// A loop on the production topology: each item calls a slow endpoint (the worker is killed
/// during the second item's call), then hops to a step on another queue and back; every item
/// is recorded once, in order, and the loop's output lists them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_survives_a_kill_mid_item_and_hops_queues_per_item() {
    let target = Target::start().await;
    let mut fleet = Fleet::start("[worker]\nack_wait = \"2s\"\n").await;
    fleet.start_api().await;
    fleet.start_worker("doomed", &["--queues", "default"]).await;
    fleet.start_worker("vpn", &["--queues", "vpn"]).await;
    let steps = format!(
        concat!(
            "  - name: each\n",
            "    for_each: \"{{{{ trigger.body.items }}}}\"\n",
            "    steps:\n",
            "      - {{ name: call, piece: http, action: send_request, input: {{ url: \"{url}/slow/loop-{{{{ item }}}}?ms=700\" }} }}\n",
            "      - {{ name: mark, piece: data, action: set, queue: vpn, input: {{ value: \"{{{{ item }}}}:{{{{ steps.call.output.status }}}}\" }} }}\n",
            "  - {{ name: report, piece: data, action: set, input: {{ value: \"{{{{ steps.each.output | join(' ') }}}}\" }} }}\n",
        ),
        url = target.url
    );
    fleet.apply(&webhook_flow("looped", &steps)).await;
    let id = fleet.webhook("looped", json!({"items": [1, 2, 3]})).await;
    target
        .wait_for_hits("loop-2", 1, Duration::from_secs(30))
        .await;
    fleet.kill("doomed");
    fleet
        .start_worker("rescuer", &["--queues", "default"])
        .await;

    let run = fleet.finished(&id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let step = |name: &str| {
        run["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no step {name} in {run}"))
            .clone()
    };
    assert_eq!(step("each")["output"], json!(["1:200", "2:200", "3:200"]));
    assert_eq!(step("report")["output"], "1:200 2:200 3:200");
    for item in 0..3 {
        let call = step(&format!("call[{item}]"));
        assert_eq!(
            call["attempts"].as_array().unwrap().len(),
            1,
            "each item's call is recorded once: {call}"
        );
        assert_eq!(
            step(&format!("mark[{item}]"))["attempts"][0]["worker"],
            "vpn"
        );
    }
    assert_eq!(step("call[0]")["attempts"][0]["worker"], "doomed");
    assert_eq!(step("call[1]")["attempts"][0]["worker"], "rescuer");
    // Item 1's call ran again after the kill (at least once); the others once.
    assert_eq!(target.hits("loop-1").len(), 1);
    assert_eq!(target.hits("loop-2").len(), 2);
    assert_eq!(target.hits("loop-3").len(), 1);
}

/// A loop with `parallelism: 3` on the production topology: three items in flight at once
/// (never more), the worker running them killed mid-item; its lanes move to the worker that
/// replaces it, every item is recorded once and the loop's output keeps item order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parallel_loop_runs_its_lanes_at_once_and_survives_a_kill_mid_lane() {
    let target = Target::start().await;
    let mut fleet = Fleet::start("[worker]\nack_wait = \"2s\"\n").await;
    fleet.start_api().await;
    fleet.start_worker("doomed", &[]).await;
    let steps = format!(
        concat!(
            "  - name: each\n",
            "    for_each: \"{{{{ trigger.body.items }}}}\"\n",
            "    parallelism: 3\n",
            "    steps:\n",
            "      - {{ name: call, piece: http, action: send_request, input: {{ url: \"{url}/slow/par?ms=600&item={{{{ item }}}}\" }} }}\n",
            "      - {{ name: mark, piece: data, action: set, input: {{ value: \"{{{{ item }}}}:{{{{ steps.call.output.status }}}}\" }} }}\n",
            "  - {{ name: report, piece: data, action: set, input: {{ value: \"{{{{ steps.each.output | join(' ') }}}}\" }} }}\n",
        ),
        url = target.url
    );
    fleet.apply(&webhook_flow("fanout", &steps)).await;
    let id = fleet
        .webhook("fanout", json!({"items": [0, 1, 2, 3, 4, 5, 6, 7]}))
        .await;
    // The first three items' calls are in flight on the doomed worker.
    target
        .wait_for_hits("par", 3, Duration::from_secs(30))
        .await;
    fleet.kill("doomed");
    fleet.start_worker("rescuer", &[]).await;

    let run = fleet.finished(&id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let step = |name: &str| {
        run["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no step {name} in {run}"))
            .clone()
    };
    let marks: Vec<String> = (0..8).map(|i| format!("{i}:200")).collect();
    assert_eq!(step("each")["output"], json!(marks));
    assert_eq!(step("report")["output"], marks.join(" "));
    for item in 0..8 {
        let call = step(&format!("call[{item}]"));
        assert_eq!(call["attempts"].as_array().unwrap().len(), 1, "{call}");
    }
    // The three calls the kill interrupted ran again; at most three were ever in flight.
    let hits = target.hits("par");
    assert_eq!(hits.len(), 11, "8 items, 3 of them interrupted");
    let most = most_in_flight(&hits, 11, Duration::from_millis(600));
    assert_eq!(most, 3, "three lanes, one call each at a time");
}

/// The flow's `timeout` on the production topology: the only worker dies mid-step and none
/// replaces it; the scheduler fails the run as timed out instead of leaving it running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_worker_vanished_is_failed_at_the_flows_timeout() {
    let target = Target::start().await;
    let mut fleet = Fleet::start("[scheduler]\ntimer_poll = \"1s\"\n").await;
    fleet.start_api().await;
    fleet.start_scheduler("s1").await;
    fleet.start_worker("doomed", &[]).await;
    let steps = format!(
        "  - {{ name: slow, piece: http, action: send_request, input: {{ url: \"{}/slow/vanish?ms=60000\" }} }}\n",
        target.url
    );
    let flow = webhook_flow("bounded", &steps).replace("steps:\n", "timeout: 3s\nsteps:\n");
    fleet.apply(&flow).await;
    let id = fleet.webhook("bounded", json!({})).await;
    target
        .wait_for_hits("vanish", 1, Duration::from_secs(30))
        .await;
    fleet.kill("doomed");

    let run = fleet.finished(&id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(
        run["error"],
        "timed out: the run did not end within the flow's timeout (3s)"
    );
    let audit = fleet.stream("pw:audit").await;
    assert!(
        audit
            .iter()
            .any(|e| e["action"] == "run.timeout" && e["resource"] == format!("run/{id}"))
    );
}

/// `max_concurrent_runs: 2` across two worker processes: never more than two runs' calls
/// in flight at once, and every run completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_runs_holds_across_workers() {
    let target = Target::start().await;
    let mut fleet = Fleet::start(BASE).await;
    fleet.start_api().await;
    fleet.start_worker("w1", &["--concurrency", "8"]).await;
    fleet.start_worker("w2", &["--concurrency", "8"]).await;
    let steps = format!(
        "  - {{ name: call, piece: http, action: send_request, input: {{ url: \"{}/slow/slots?ms=400\" }} }}\n",
        target.url
    );
    let flow =
        webhook_flow("slotted", &steps).replace("steps:\n", "max_concurrent_runs: 2\nsteps:\n");
    fleet.apply(&flow).await;
    let runs = join_all((0..6).map(|n| fleet.webhook("slotted", json!({"n": n})))).await;
    for id in &runs {
        let run = fleet.finished(id, Duration::from_secs(60)).await;
        assert_eq!(run["status"], "succeeded", "{run}");
    }
    // The slot of a run frees only when it ends.
    assert_eq!(
        most_in_flight(&target.hits("slots"), 6, Duration::from_millis(400)),
        2
    );
}

/// The most of `count` calls of `length`, started at `starts`, in flight at once.
fn most_in_flight(starts: &[std::time::Instant], count: usize, length: Duration) -> usize {
    let mut starts = starts.to_vec();
    starts.sort();
    assert_eq!(starts.len(), count);
    (0..starts.len())
        .map(|i| {
            let earlier = &starts[..i];
            1 + earlier.iter().filter(|e| starts[i] - **e < length).count()
        })
        .max()
        .unwrap_or(0)
}

/// `max_in_flight: 2` across two worker processes: never more than two calls in flight to the
/// limited system, waiting spends no attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_holds_across_workers() {
    let target = Target::start().await;
    let mut fleet = Fleet::start(BASE).await;
    fleet.start_api().await;
    fleet.start_worker("w1", &["--concurrency", "8"]).await;
    fleet.start_worker("w2", &["--concurrency", "8"]).await;
    let steps = format!(
        "  - {{ name: call, piece: http, action: send_request, max_in_flight: 2, rate_key: slow-api, input: {{ url: \"{}/slow/inflight?ms=400\" }}, retry: {{ max_attempts: 1 }} }}\n",
        target.url
    );
    fleet.apply(&webhook_flow("bounded-calls", &steps)).await;
    let runs = join_all((0..6).map(|n| fleet.webhook("bounded-calls", json!({"n": n})))).await;
    for id in &runs {
        let run = fleet.finished(id, Duration::from_secs(60)).await;
        assert_eq!(run["status"], "succeeded", "{run}");
        assert_eq!(run["steps"][0]["attempts"].as_array().unwrap().len(), 1);
    }
    assert_eq!(
        most_in_flight(&target.hits("inflight"), 6, Duration::from_millis(400)),
        2
    );
}

/// A sub-flow on the production topology: the parent waits without a job while the child runs
/// on another worker; the child's end wakes the parent, which takes its output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subflow_runs_as_its_own_run_and_hands_its_output_back() {
    let target = Target::start().await;
    let mut fleet = Fleet::start("[scheduler]\ntimer_poll = \"1s\"\n").await;
    fleet.start_api().await;
    fleet.start_scheduler("s1").await;
    fleet.start_worker("w1", &[]).await;
    fleet.start_worker("w2", &[]).await;
    let child = format!(
        "apiVersion: piecework/v1\nkind: Flow\nname: lookup\ntrigger: {{ piece: webhook, trigger: catch, auth: none }}\nsteps:\n  - {{ name: fetch, piece: http, action: send_request, input: {{ url: \"{}/slow/child?ms=300\" }} }}\n  - {{ name: shape, piece: data, action: set, input: {{ value: {{ asked: \"{{{{ trigger.who }}}}\", status: \"{{{{ steps.fetch.output.status }}}}\" }} }} }}\n",
        target.url
    );
    fleet.apply(&child).await;
    fleet
        .apply(&webhook_flow(
            "caller",
            "  - { name: ask, subflow: lookup, input: { who: \"{{ trigger.body.who }}\" } }\n  - { name: done, piece: data, action: set, input: { value: \"{{ steps.ask.output.asked }} got {{ steps.ask.output.status }}\" } }\n",
        ))
        .await;
    let id = fleet.webhook("caller", json!({"who": "ada"})).await;
    let run = fleet.finished(&id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["steps"][1]["output"], "ada got 200");
    let child_id = run["steps"][0]["input"]["run_id"].as_str().unwrap();
    let child = fleet.run(child_id).await;
    assert_eq!(child["status"], "succeeded");
    assert_eq!(child["parent"]["run_id"], id.as_str());
    assert_eq!(child["parent"]["step"], "ask");
    assert_eq!(child["started_by"]["name"], "flow:caller");
    assert_eq!(target.hits("child").len(), 1, "the child ran once");
}

/// `debounce` on the production topology: a burst of webhook calls per ticket starts one run
/// per ticket, with its last call's body, after the calls stop — and the held items survive a
/// kill of the only scheduler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debounced_burst_starts_one_run_per_key_with_its_last_item_despite_a_scheduler_kill() {
    let mut fleet = Fleet::start("[scheduler]\ntimer_poll = \"1s\"\n").await;
    fleet.start_api().await;
    fleet.start_scheduler("s1").await;
    fleet.start_worker("w1", &[]).await;
    let steps = "  - { name: note, piece: data, action: set, input: { value: \"{{ trigger.body.ticket }}#{{ trigger.body.n }}\" } }\n";
    let flow = webhook_flow("calm", steps).replace(
        "steps:\n",
        "debounce: 3s\ndebounce_key: \"{{ trigger.body.ticket }}\"\nsteps:\n",
    );
    fleet.apply(&flow).await;
    for (ticket, n) in [("t-1", 1), ("t-2", 1), ("t-1", 2), ("t-1", 3), ("t-2", 2)] {
        let response = client()
            .post(format!("{}/v1/webhooks/calm", fleet.api))
            .json(&json!({ "ticket": ticket, "n": n }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["run_ids"], json!([]), "{answer}");
        assert!(answer["run_id"].is_null(), "{answer}");
        let until = answer["held_until"].as_str().unwrap();
        assert!(
            chrono::DateTime::parse_from_rfc3339(until).is_ok(),
            "{answer}"
        );
    }
    // A retry of the last call (its `Idempotency-Key`) is the same item: it moves nothing.
    let retried = |key: &'static str| {
        client()
            .post(format!("{}/v1/webhooks/calm", fleet.api))
            .header("Idempotency-Key", key)
            .json(&json!({ "ticket": "t-2", "n": 3 }))
            .send()
    };
    let first: Value = retried("t-2-n3").await.unwrap().json().await.unwrap();
    let again: Value = retried("t-2-n3").await.unwrap().json().await.unwrap();
    assert_eq!(first["held_until"], again["held_until"], "{first} {again}");
    // A synchronous call cannot wait for a run that starts later.
    let sync = client()
        .post(format!("{}/v1/webhooks/calm/sync", fleet.api))
        .json(&json!({ "ticket": "t-3", "n": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(sync.status(), 400);
    // The only scheduler dies while the items wait; its replacement starts their runs.
    fleet.kill("s1");
    fleet.start_scheduler("s2").await;

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let runs = loop {
        let runs = fleet.runs_of("calm").await;
        if runs.len() >= 2 {
            break runs;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            fleet.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut notes = Vec::new();
    for summary in &runs {
        let run = fleet
            .finished(summary["id"].as_str().unwrap(), Duration::from_secs(30))
            .await;
        assert_eq!(run["status"], "succeeded", "{run}");
        notes.push(run["steps"][0]["output"].as_str().unwrap().to_owned());
    }
    notes.sort();
    assert_eq!(
        notes,
        ["t-1#3", "t-2#3"],
        "one run per ticket, with its last call"
    );
    // Nothing more comes of the burst.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(fleet.runs_of("calm").await.len(), 2);
    let metrics = fleet.metrics().await;
    assert!(
        metrics.contains("piecework_trigger_items_held_total{flow=\"calm\"} 7"),
        "{metrics}"
    );
}

/// A cron schedule in a time zone on the production topology: an expression for a local time
/// in Asia/Kolkata (UTC+05:30) a few seconds away fires then — read as UTC it would be five
/// and a half hours off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cron_schedule_fires_at_its_local_time_in_its_time_zone() {
    use chrono::Timelike as _;
    let mut fleet = Fleet::start("").await;
    fleet.start_api().await;
    fleet.start_scheduler("s1").await;
    fleet.start_worker("w1", &[]).await;
    let offset = chrono::Duration::minutes(5 * 60 + 30);
    let due = (chrono::Utc::now() + chrono::Duration::seconds(8))
        .with_nanosecond(0)
        .unwrap();
    let local = due + offset;
    let expression = format!(
        "{} {} {} * * *",
        local.second(),
        local.minute(),
        local.hour()
    );
    let flow = format!(
        "apiVersion: piecework/v1\nkind: Flow\nname: kolkata\ntrigger: {{ piece: schedule, trigger: cron, input: {{ expression: \"{expression}\", timezone: Asia/Kolkata }} }}\nsteps:\n  - {{ name: at, piece: data, action: set, input: {{ value: \"{{{{ trigger.scheduled_at }}}}\" }} }}\n"
    );
    fleet.apply(&flow).await;

    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let run = loop {
        if let Some(first) = fleet.runs_of("kolkata").await.first() {
            break fleet
                .finished(first["id"].as_str().unwrap(), Duration::from_secs(30))
                .await;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            fleet.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(run["status"], "succeeded", "{run}");
    let scheduled =
        chrono::DateTime::parse_from_rfc3339(run["steps"][0]["output"].as_str().unwrap()).unwrap();
    assert_eq!(scheduled, due, "{expression} in Asia/Kolkata is {due} UTC");
}

/// The operator's view of runs through the CLI: every run across cursor-linked pages, filters,
/// counts per status, one run in detail, and retry and cancel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_page_count_show_retry_and_cancel_runs_from_the_cli() {
    let mut fleet = Fleet::start("").await;
    fleet.start_api().await;
    fleet.start_worker("w1", &[]).await;
    let steps = "  - { name: divide, piece: data, action: set, input: { value: \"{{ trigger.body.n / trigger.body.d }}\" }, retry: { max_attempts: 1 } }\n";
    fleet.apply(&webhook_flow("ops", steps)).await;
    let mut ids = Vec::new();
    for n in 0..7 {
        let d = if n % 3 == 0 { 0 } else { 1 };
        ids.push(fleet.webhook("ops", json!({ "n": n, "d": d })).await);
    }
    for id in &ids {
        fleet.finished(id, Duration::from_secs(60)).await;
    }
    let cli = |args: &[&str]| {
        let out = common::piecework_command()
            .arg("runs")
            .args(args)
            .env("PW_API_URL", &fleet.api)
            .env("PW_API_KEY", common::ADMIN_KEY)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.success(), stdout, stderr)
    };

    // Pages of three, followed to the end: every run once, newest first.
    let (ok, listed, err) = cli(&["list", "--flow", "ops", "--limit", "3", "--all"]);
    assert!(ok, "{err}");
    let listed_ids: Vec<&str> = listed
        .lines()
        .map(|l| l.split_whitespace().nth(3).unwrap())
        .collect();
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(listed_ids, newest_first, "{listed}");
    let (_, failed, _) = cli(&["list", "--flow", "ops", "--status", "failed", "--json"]);
    let failed: Vec<Value> = failed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(failed.len(), 3);
    assert!(failed.iter().all(|r| r["started_by"] == "webhook:ops"));
    let (ok, stats, err) = cli(&["stats", "--flow", "ops", "--json"]);
    assert!(ok, "{err}");
    let stats: Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["counts"], json!({"failed": 3, "succeeded": 4}));
    assert_eq!(stats["total"], 7);
    // The API's own page: `next` until the last one.
    let page = fleet.get("/v1/runs?flow=ops&limit=7").await;
    assert_eq!(page["runs"].as_array().unwrap().len(), 7);
    let next = page["next"].as_str().unwrap();
    let rest = fleet
        .get(&format!("/v1/runs?flow=ops&limit=7&after={next}"))
        .await;
    assert_eq!(rest["runs"], json!([]));
    assert!(rest["next"].is_null());

    let failed_id = failed[0]["id"].as_str().unwrap();
    let (ok, shown, err) = cli(&["show", failed_id]);
    assert!(ok, "{err}");
    assert!(shown.contains("divide"), "{shown}");
    assert!(shown.contains("failed"), "{shown}");
    let (ok, _, err) = cli(&["cancel", failed_id]);
    assert!(!ok);
    assert!(err.contains("is not running"), "{err}");
    let (ok, retried, err) = cli(&["retry", failed_id]);
    assert!(ok, "{err}");
    assert!(
        retried.contains(&format!("retrying run {failed_id}")),
        "{retried}"
    );
}

/// Fast recovery with the default `ack_wait`: a worker killed two seconds into a step; the step
/// runs again on another worker within 10 s of the kill, and the run records the lost attempt
/// with the worker it was lost with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_lost_with_its_worker_is_back_within_seconds_and_recorded_as_lost() {
    let target = Target::start().await;
    let mut fleet = Fleet::start("").await;
    fleet.start_api().await;
    fleet.start_worker("doomed", &[]).await;
    let steps = format!(
        "  - {{ name: slow, piece: http, action: send_request, input: {{ url: \"{}/slow/lost?ms=3000\" }} }}\n",
        target.url
    );
    fleet.apply(&webhook_flow("recover", &steps)).await;
    let id = fleet.webhook("recover", json!({})).await;
    target
        .wait_for_hits("lost", 1, Duration::from_secs(30))
        .await;
    // Past the first second, the attempt is marked in flight in the run.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while fleet.run(&id).await["in_flight"].as_array().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            fleet.run(&id).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let marked = fleet.run(&id).await;
    assert_eq!(marked["in_flight"][0]["worker"], "doomed", "{marked}");
    assert_eq!(marked["in_flight"][0]["step"], "slow");
    fleet.kill("doomed");
    let killed = std::time::Instant::now();
    let rescuer = fleet.start_worker("rescuer", &[]).await;

    target
        .wait_for_hits("lost", 2, Duration::from_secs(30))
        .await;
    let back_after = killed.elapsed();
    assert!(
        back_after < Duration::from_secs(10),
        "the step came back {back_after:?} after the kill"
    );
    let run = fleet.finished(&id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert!(run.get("in_flight").is_none(), "the mark is cleared: {run}");
    let attempts = run["steps"][0]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{run}");
    assert_eq!(attempts[0]["worker"], "doomed");
    assert_eq!(attempts[0]["error"], "worker doomed lost during attempt 1");
    assert_eq!(attempts[1]["worker"], "rescuer");
    assert_eq!(attempts[1]["attempt"], 2);
    assert_eq!(attempts[1]["status"], "succeeded");
    let metrics = common::get_text(&rescuer.replace("/readyz", "/metrics")).await;
    assert!(
        metrics.contains("piecework_attempts_lost_total{flow=\"recover\"} 1"),
        "{metrics}"
    );
}

/// A backlog filed while a polling flow was paused: 250 tickets, more than one page of the
/// ticketing API and than one poll starts runs for. After enable, every ticket gets exactly
/// one run — the trigger pages back to the last ticket it saw — and no gap is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_filed_while_a_polling_flow_was_paused_gets_one_run_per_item() {
    const KEY: &str = "backlog-key-123456";
    let mock = piecework_mock_ticketing::MockTicketing::start("127.0.0.1:0".parse().unwrap(), KEY)
        .await
        .unwrap();
    mock.add_ticket("before", "low", "support");
    let mut fleet = Fleet::start("").await;
    fleet.with_demo_piece();
    fleet.start_api().await;
    fleet.start_scheduler("s1").await;
    fleet.start_worker("w1", &["--concurrency", "32"]).await;
    fleet.save_tickets_connection(KEY, &mock.url).await;
    fleet
        .apply(
            "apiVersion: piecework/v1\nkind: Flow\nname: backlog\ntrigger: { piece: my-company-api, trigger: new_ticket, connection: tickets, poll_interval: 1s }\nsteps:\n  - { name: note, piece: data, action: set, input: { value: \"{{ trigger.id }}\" } }\n",
        )
        .await;
    // The first poll takes the existing ticket as its baseline.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !mock.requests().iter().any(|r| r.path == "/v1/tickets") {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            fleet.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let toggle = |action: &str| {
        let url = format!("{}/v1/flows/backlog/{action}", fleet.api);
        async move {
            let response = client().post(url).send().await.unwrap();
            assert_eq!(response.status(), 200);
        }
    };
    toggle("disable").await;
    let filed: BTreeSet<String> = (0..250)
        .map(|n| {
            mock.add_ticket(&format!("backlog {n}"), "high", "platform")
                .id
        })
        .collect();
    toggle("enable").await;

    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let runs = loop {
        let page = fleet.get("/v1/runs?flow=backlog&limit=1000").await;
        let runs = page["runs"].as_array().cloned().unwrap_or_default();
        let done = runs.iter().filter(|r| r["status"] == "succeeded").count();
        if done >= 250 {
            break runs;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{done} of 250 runs\n{}",
            fleet.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // Settle: nothing more comes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stats = fleet.get("/v1/runs/stats?flow=backlog").await;
    assert_eq!(stats["total"], 250, "{stats}");
    let mut noted = Vec::new();
    for summary in &runs {
        let run = fleet.run(summary["id"].as_str().unwrap()).await;
        noted.push(run["steps"][0]["output"].as_str().unwrap().to_owned());
    }
    let unique: BTreeSet<String> = noted.iter().cloned().collect();
    assert_eq!(noted.len(), 250, "one run per ticket, no repeats");
    assert_eq!(
        unique, filed,
        "every ticket filed while paused, and nothing else"
    );
    let audit = fleet.stream("pw:audit").await;
    assert!(
        !audit.iter().any(|e| e["action"] == "trigger.gap"),
        "no gap was reported"
    );
}

/// A three-node NATS cluster with replicated streams: under a steady stream of webhook calls,
/// the job stream's leader is killed. Every call the api accepted becomes a run that
/// succeeds; calls refused while the cluster elects a new leader succeed when the caller tries
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_stream_leader_of_a_nats_cluster_loses_no_accepted_run() {
    let mut cluster = piecework_testkit::NatsCluster::start(3).await.unwrap();
    let mut fleet = Fleet::start("[nats]\nreplicas = 3\n").await;
    fleet.env.push(("PW_NATS_URL".into(), cluster.url()));
    fleet.start_api().await;
    fleet.start_worker("w1", &[]).await;
    fleet.start_worker("w2", &[]).await;
    fleet
        .apply(&webhook_flow(
            "replicated",
            "  - { name: one, piece: data, action: set, input: { value: \"{{ trigger.body.n }}\" } }\n  - { name: two, piece: data, action: set, input: { value: \"{{ steps.one.output }}\" }, queue: other }\n",
        ))
        .await;
    fleet.start_worker("w3", &["--queues", "other"]).await;

    let client_nats = async_nats::connect(cluster.url().split(',').collect::<Vec<_>>())
        .await
        .unwrap();
    let jetstream = async_nats::jetstream::new(client_nats);
    let mut stream = jetstream.get_stream("PW_JOBS").await.unwrap();
    let info = stream.info().await.unwrap();
    let leader = info
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .unwrap();
    assert_eq!(info.config.num_replicas, 3, "the job stream is replicated");

    let send = |n: u32| {
        let url = format!("{}/v1/webhooks/replicated", fleet.api);
        async move {
            // A caller that tries again on 503, as webhook senders do.
            for _ in 0..60 {
                let response = client().post(&url).json(&json!({ "n": n })).send().await;
                if let Ok(response) = response
                    && response.status() == 202
                {
                    let answer: Value = response.json().await.unwrap();
                    return answer["run_id"].as_str().unwrap().to_owned();
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            panic!("call {n} was never accepted");
        }
    };
    let mut accepted = Vec::new();
    for n in 0..20 {
        accepted.push(send(n).await);
    }
    cluster.kill(&leader).await;
    for n in 20..40 {
        accepted.push(send(n).await);
    }
    let mut outputs = BTreeSet::new();
    for id in &accepted {
        let run = fleet.finished(id, Duration::from_secs(90)).await;
        assert_eq!(run["status"], "succeeded", "{run}\n{}", fleet.log_tails());
        outputs.insert(run["steps"][1]["output"].to_string());
    }
    assert_eq!(outputs.len(), 40, "every call's run, with its own input");
    let info = stream.info().await.unwrap();
    let new_leader = info
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .unwrap();
    assert_ne!(new_leader, leader, "another node leads the stream now");
}

/// A caller sending 20 webhook calls a second, each with its own `Idempotency-Key` and
/// retrying anything but a 202, while NATS is killed (-9) for 5 s: every call is accepted
/// the first time — runs recorded while NATS is away are answered at once and their jobs
/// relayed from the outbox when it is back — every order has exactly one effect, and a
/// retried key answers with the same run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_under_webhook_load_loses_no_call_and_repeats_no_effect() {
    const ORDERS: usize = 200;
    let target = Target::start().await;
    let mut fleet = Fleet::start("").await;
    fleet.start_api().await;
    fleet.start_worker("w1", &[]).await;
    let steps = format!(
        "  - {{ name: call, piece: http, action: send_request, input: {{ url: \"{}/slow/order-{{{{ trigger.body.order }}}}?ms=10\" }} }}\n",
        target.url
    );
    fleet.apply(&webhook_flow("once", &steps)).await;
    let api = fleet.api.clone();
    let call = move |order: usize| {
        client()
            .post(format!("{api}/v1/webhooks/once"))
            .header("Idempotency-Key", format!("order-{order}"))
            .json(&json!({ "order": order }))
            .timeout(Duration::from_secs(10))
            .send()
    };
    // The caller: one call every 50 ms, each retried until accepted.
    let caller = {
        let call = call.clone();
        async move {
            let mut calls = Vec::new();
            for order in 0..ORDERS {
                let call = call.clone();
                calls.push(tokio::spawn(async move {
                    let mut tries = 0;
                    loop {
                        tries += 1;
                        match call(order).await {
                            Ok(response) if response.status() == 202 => {
                                let body: Value = response.json().await.unwrap();
                                return (body["run_id"].as_str().unwrap().to_owned(), tries);
                            }
                            _ => tokio::time::sleep(Duration::from_millis(250)).await,
                        }
                        assert!(tries < 100, "order {order} never accepted");
                    }
                }));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            join_all(calls).await
        }
    };
    let outage = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        fleet.nats.kill().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    };
    let (accepted, ()) = tokio::join!(caller, outage);
    fleet.nats.restart().await.unwrap();
    let accepted: Vec<(String, u32)> = accepted.into_iter().map(Result::unwrap).collect();
    let retried = accepted.iter().filter(|(_, tries)| *tries > 1).count();
    assert_eq!(retried, 0, "every call is accepted the first time");
    for (id, _) in &accepted {
        let run = fleet.finished(id, Duration::from_secs(90)).await;
        assert_eq!(run["status"], "succeeded", "{run}");
    }
    // Settle, then count: one effect per order, none lost.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for order in 0..ORDERS {
        assert_eq!(
            target.hits(&format!("order-{order}")).len(),
            1,
            "order {order}: one effect"
        );
    }
    // Calls taken while NATS was away were counted, and their jobs relayed.
    let metrics = common::get_text(&format!("{}/metrics", fleet.api_health)).await;
    let count = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|line| line.starts_with(name))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(
        count("piecework_job_publish_failures_total") > 0.0,
        "{metrics}"
    );
    assert!(count("piecework_outbox_relayed_total") > 0.0, "{metrics}");
    assert!(
        fleet.logs("api").contains("waits in the outbox"),
        "the api says what it could not publish"
    );

    // A retried key is the same run, and nothing new happens.
    let again: Value = call(7).await.unwrap().json().await.unwrap();
    assert_eq!(again["run_id"], accepted[7].0.as_str());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(target.hits("order-7").len(), 1);
    let bad = client()
        .post(format!("{}/v1/webhooks/once", fleet.api))
        .header("Idempotency-Key", "x".repeat(300))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

/// A Redis that can lose its primary: a cluster (three primaries, a replica each) or a
/// primary with a replica under Sentinels.
enum FailingOver {
    Cluster(piecework_testkit::RedisCluster),
    Sentinel(piecework_testkit::RedisSentinel),
}

impl FailingOver {
    /// What the fleet's processes are told to connect to.
    fn env(&self) -> Vec<(String, String)> {
        match self {
            Self::Cluster(cluster) => vec![
                ("PW_REDIS_URL".into(), cluster.url()),
                ("PW_REDIS_CLUSTER".into(), "true".into()),
            ],
            Self::Sentinel(sentinels) => vec![
                ("PW_REDIS_URL".into(), sentinels.url()),
                (
                    "PW_REDIS_SENTINEL_MASTER".into(),
                    piecework_testkit::RedisSentinel::MASTER.into(),
                ),
            ],
        }
    }

    /// The port of the primary holding piecework's data now.
    async fn primary(&self) -> u16 {
        match self {
            Self::Cluster(cluster) => cluster.primary_of("{pw}").await,
            Self::Sentinel(sentinels) => sentinels.primary().await,
        }
        .expect("a primary")
    }

    async fn kill(&mut self, port: u16) {
        match self {
            Self::Cluster(cluster) => cluster.kill(port).await,
            Self::Sentinel(sentinels) => {
                assert_eq!(sentinels.kill_primary().await, Some(port));
            }
        }
    }
}

/// On a Redis Cluster (`PW_REDIS_CLUSTER`) the fleet runs a flow with steps, a durable delay
/// and a branch; when the primary holding piecework's slot is killed, its replica takes
/// over, and every call ends in exactly one successful run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_on_a_redis_cluster_runs_flows_and_survives_losing_its_primary() {
    let cluster = piecework_testkit::RedisCluster::start(3, 1).await.unwrap();
    survives_losing_the_redis_primary(FailingOver::Cluster(cluster)).await;
}

/// The same behind Redis Sentinel (`PW_REDIS_SENTINEL_MASTER`): the Sentinels promote the
/// replica and the fleet follows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_behind_redis_sentinels_runs_flows_and_survives_losing_its_primary() {
    let sentinels = piecework_testkit::RedisSentinel::start().await.unwrap();
    survives_losing_the_redis_primary(FailingOver::Sentinel(sentinels)).await;
}

/// Runs calls — each retried with its `Idempotency-Key` until accepted — before and after
/// the primary is killed, and checks every one ends in one successful run.
async fn survives_losing_the_redis_primary(mut redis: FailingOver) {
    let mut fleet = Fleet::start("").await;
    fleet.env.extend(redis.env());
    fleet.start_api().await;
    fleet.start_scheduler("s1").await;
    fleet.start_worker("w1", &[]).await;
    fleet.start_worker("w2", &[]).await;
    let steps = "  - { name: one, piece: data, action: set, input: { value: \"{{ trigger.body.n }}\" } }\n  - { name: pause, delay: 1s }\n  - name: parity\n    if: \"{{ trigger.body.n % 2 == 0 }}\"\n    then:\n      - { name: even, piece: data, action: set, input: { value: even } }\n    else:\n      - { name: odd, piece: data, action: set, input: { value: odd } }\n";
    fleet.apply(&webhook_flow("clustered", steps)).await;
    let api = fleet.api.clone();
    let accept = |n: u64| {
        let api = api.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                let response = client()
                    .post(format!("{api}/v1/webhooks/clustered"))
                    .header("Idempotency-Key", format!("n-{n}"))
                    .json(&json!({ "n": n }))
                    .timeout(Duration::from_secs(15))
                    .send()
                    .await;
                let last = match response {
                    Ok(response) if response.status() == 202 => {
                        let body: Value = response.json().await.unwrap();
                        return body["run_id"].as_str().unwrap().to_owned();
                    }
                    Ok(response) => response.text().await.unwrap_or_default(),
                    Err(err) => err.to_string(),
                };
                assert!(
                    std::time::Instant::now() < deadline,
                    "call {n} never accepted: {last}"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    let check = async |ids: &[String], first: u64| {
        for (n, id) in (first..).zip(ids) {
            let run = fleet.finished(id, Duration::from_secs(90)).await;
            assert_eq!(run["status"], "succeeded", "{run}\n{}", fleet.log_tails());
            let parity = if n % 2 == 0 { "even" } else { "odd" };
            let branch = run["steps"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["name"] == parity)
                .unwrap_or_else(|| panic!("run {n} took the {parity} branch: {run}"));
            assert_eq!(branch["output"], parity);
        }
    };
    let before = join_all((0..10).map(accept)).await;
    check(&before, 0).await;

    let primary = redis.primary().await;
    redis.kill(primary).await;
    let after = join_all((10..30).map(accept)).await;
    check(&after, 10).await;
    assert_ne!(redis.primary().await, primary, "a replica took over");
    // One run per call: the retries of a call were the same run.
    let stats = fleet.get("/v1/runs/stats?flow=clustered").await;
    assert_eq!(stats["total"], 30, "{stats}");
}
