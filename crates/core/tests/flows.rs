//! Flow parsing and validation: every problem is reported with its location.

use piecework_core::flow::{FlowDefinition, FlowError, Format, validate};
use piecework_core::lifecycle::{self, At};
use piecework_core::{OnFailure, Registry, Run};
use piecework_sdk::prelude::*;
use serde_json::{Value, json};

struct Set;

impl Action for Set {
    type Input = Value;
    type Output = Value;

    fn spec(&self) -> ActionSpec {
        ActionSpec::new("set", "Set")
            .prop(Prop::json("value", "Value").required())
            .prop(Prop::number("count", "Count"))
    }

    async fn run(&self, _ctx: &Context, input: Value) -> Result<Value, PieceError> {
        Ok(input["value"].clone())
    }
}

struct Secure;

impl Action for Secure {
    type Input = Value;
    type Output = Value;

    fn spec(&self) -> ActionSpec {
        ActionSpec::new("secure", "Secure").require_auth()
    }

    async fn run(&self, _ctx: &Context, _input: Value) -> Result<Value, PieceError> {
        Ok(Value::Null)
    }
}

struct Catch;

impl WebhookTrigger for Catch {
    type Input = Value;

    fn spec(&self) -> TriggerSpec {
        TriggerSpec::webhook("catch", "Catch")
    }
}

struct Every;

#[derive(serde::Deserialize)]
struct EveryInput {
    interval: String,
}

impl ScheduleTrigger for Every {
    type Input = EveryInput;

    fn spec(&self) -> TriggerSpec {
        TriggerSpec::schedule("every", "Every")
            .prop(Prop::short_text("interval", "Interval").required())
    }

    fn schedule(&self, input: EveryInput) -> Result<Schedule, PieceError> {
        Schedule::parse_interval(&input.interval)
    }
}

fn registry() -> Registry {
    let mut registry = Registry::new();
    for version in ["0.1.0", "0.2.0", "1.0.0"] {
        registry
            .register_built(
                Piece::builder("data", "Data")
                    .version(version)
                    .action(Set)
                    .action(Secure)
                    .webhook_trigger(Catch)
                    .schedule_trigger(Every)
                    .build(),
            )
            .unwrap();
    }
    registry
}

const GOOD: &str = r#"
apiVersion: piecework/v1
kind: Flow
name: good
trigger: { piece: data, trigger: catch }
steps:
  - name: first
    piece: data
    version: "^0.1"
    action: set
    input: { value: "{{ trigger.body }}" }
  - name: second
    piece: data
    action: set
    input: { value: "{{ steps.first.output.x }}", count: "{{ steps.first.output | length }}" }
    on_failure: continue
    retry: { max_attempts: 5, initial_interval: 2s, max_interval: 1m }
    timeout: 10s
"#;

/// `validate` on a current-thread runtime: every piece here is in-process, so it never waits.
fn validated(def: FlowDefinition) -> Result<piecework_core::ValidFlow, FlowError> {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(validate(def, &registry()))
}

/// What follows step `name` (outside any loop) once it is done, as the run lifecycle walks
/// the flow: the next step, and the steps around it whose blocks it closes.
fn after<'a>(def: &'a FlowDefinition, name: &str) -> (Option<&'a str>, Vec<&'a str>) {
    let run = Run::new("r".into(), &def.name, 1, json!({}));
    let at = At::top(def.step(name).expect("the step"));
    let advance = lifecycle::advance(def, &run, at, None);
    let names = |at: &At<'a>| at.step.name.as_str();
    (
        advance.next.as_ref().map(names),
        advance.closed.iter().map(names).collect(),
    )
}

fn issues(text: &str) -> Vec<String> {
    let def = FlowDefinition::parse(text, Format::Yaml).unwrap();
    match validated(def) {
        Ok(_) => vec![],
        Err(FlowError::Invalid { issues, .. }) => issues.iter().map(ToString::to_string).collect(),
        Err(other) => panic!("{other}"),
    }
}

#[test]
fn a_piece_may_carry_its_range_after_an_at() {
    let text = "apiVersion: piecework/v1\nkind: Flow\nname: f\ntrigger: { piece: data@^1, trigger: catch }\nsteps:\n  - { name: a, piece: data@^0.1, action: set, input: { value: 1 } }\n";
    let def = FlowDefinition::parse(text, Format::Yaml).unwrap();
    assert_eq!(def.steps[0].piece, "data");
    assert_eq!(def.steps[0].version.as_ref().unwrap().to_string(), "^0.1");
    assert_eq!(def.trigger.piece, "data");
    assert_eq!(validated(def).unwrap().resolved["a"].to_string(), "0.1.0");

    let twice = text.replace("piece: data@^0.1,", "piece: data@^0.1, version: \"^0.1\",");
    let err = FlowDefinition::parse(&twice, Format::Yaml)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("steps[0] (a).piece: gives a range twice"),
        "{err}"
    );
    let bad = text.replace("data@^0.1", "data@soon");
    let err = FlowDefinition::parse(&bad, Format::Yaml)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"soon\" after `@` is not a semver range"),
        "{err}"
    );
}

#[test]
fn a_valid_flow_resolves_piece_ranges() {
    let def = FlowDefinition::parse(GOOD, Format::Yaml).unwrap();
    let valid = validated(def).unwrap();
    assert_eq!(valid.resolved["first"].to_string(), "0.1.0");
    assert_eq!(valid.resolved["second"].to_string(), "1.0.0");
    assert_eq!(valid.resolved["trigger"].to_string(), "1.0.0");
    let second = valid.definition.step("second").unwrap();
    assert_eq!(second.on_failure, OnFailure::Continue);
    assert_eq!(second.retry_policy().max_attempts, 5);
    assert_eq!(second.timeout().as_secs(), 10);
}

#[test]
fn json_and_yaml_parse_to_the_same_flow() {
    let yaml = FlowDefinition::parse(GOOD, Format::Yaml).unwrap();
    let json = serde_json::to_string(&yaml).unwrap();
    assert_eq!(FlowDefinition::parse(&json, Format::Json).unwrap(), yaml);
}

#[test]
fn unknown_fields_are_rejected_with_their_location() {
    let text = GOOD.replace(
        "input: { value: \"{{ trigger.body }}\" }",
        "inptu: { value: 1 }",
    );
    let err = FlowDefinition::parse(&text, Format::Yaml).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("unknown field `inptu`"), "{message}");
    assert!(message.contains("line"), "{message}");
}

#[test]
fn unknown_piece_action_and_prop_are_named() {
    let text = r#"
apiVersion: piecework/v1
kind: Flow
name: bad
trigger: { piece: data, trigger: catch }
steps:
  - { name: a, piece: nope, action: set }
  - { name: b, piece: data, action: frobnicate }
  - { name: c, piece: data, action: set, input: { value: 1, colour: red } }
  - { name: d, piece: data, action: set }
  - { name: e, piece: data, version: "^9", action: set, input: { value: 1 } }
  - { name: f, piece: data, action: secure }
  - { name: g, piece: data, action: set, input: { value: 1 }, connection: prod }
"#;
    let found = issues(text);
    let expect = [
        "steps[0] (a).piece: unknown piece `nope` (registered: data)",
        "steps[1] (b).action: piece `data` has no action `frobnicate` (it has: set, secure)",
        "steps[2] (c).input.colour: unknown prop (known props: value, count)",
        "steps[3] (d).input.value: is required",
        "steps[4] (e).piece: no registered version of `data` matches ^9 (registered: 1.0.0, 0.2.0, 0.1.0)",
        "steps[5] (f).connection: action `secure` needs a connection",
        "steps[6] (g).connection: piece `data` takes no connection: remove `connection`",
    ];
    assert_eq!(found, expect);
}

#[test]
fn literal_values_are_type_checked_templates_are_not() {
    let text = GOOD.replace(
        "count: \"{{ steps.first.output | length }}\"",
        "count: many",
    );
    assert_eq!(
        issues(&text),
        ["steps[1] (second).input.count: expected number, got a string"]
    );
}

#[test]
fn duplicate_step_names_are_rejected() {
    let text = GOOD
        .replace("name: second", "name: first")
        .replace("steps.first.output", "trigger");
    assert_eq!(
        issues(&text),
        ["steps[1].name: step `first` is defined twice"]
    );
}

#[test]
fn templates_may_only_refer_to_earlier_steps() {
    let text = GOOD.replace("{{ trigger.body }}", "{{ steps.second.output }}");
    assert_eq!(
        issues(&text),
        ["steps[0] (first).input.value: refers to step `second`, which runs after this step"]
    );
    let text = GOOD.replace("{{ trigger.body }}", "{{ steps.ghost.output }}");
    assert_eq!(
        issues(&text),
        ["steps[0] (first).input.value: refers to step `ghost`, which does not exist"]
    );
    let text = GOOD.replace("{{ trigger.body }}", "{{ steps.first.output }}");
    assert_eq!(
        issues(&text),
        ["steps[0] (first).input.value: step `first` cannot refer to its own output"]
    );
    let text = GOOD.replace("{{ trigger.body }}", "{{ trgger.body }}");
    assert_eq!(
        issues(&text),
        [
            "steps[0] (first).input.value: unknown variable `trgger` (templates can use trigger, steps, run, flow)"
        ]
    );
}

#[test]
fn template_syntax_errors_are_located() {
    let text = GOOD.replace("{{ trigger.body }}", "{{ trigger.body ");
    let found = issues(&text);
    assert_eq!(found.len(), 1);
    assert!(
        found[0].starts_with("steps[0] (first).input.value: template error: syntax error"),
        "{found:?}"
    );
}

#[test]
fn header_retry_and_schedule_problems_are_all_reported() {
    let text = r#"
apiVersion: piecework/v2
kind: Flo
name: Bad Name
trigger: { piece: data, trigger: every, input: { interval: "0s" }, poll_interval: 5s }
steps:
  - { name: a, piece: data, action: set, input: { value: 1 }, retry: { max_attempts: 0 }, queue: "VPN!" }
"#;
    let found = issues(text);
    assert_eq!(
        found,
        [
            "apiVersion: must be \"piecework/v1\", got \"piecework/v2\"",
            "kind: must be \"Flow\", got \"Flo\"",
            "name: \"Bad Name\" must be 1-100 lowercase letters, digits, '-' or '_'",
            "trigger.poll_interval: only polling triggers take a poll_interval",
            "trigger.input: interval 0s is shorter than the minimum of 1s",
            "steps[0] (a).retry: max_attempts must be at least 1",
            "steps[0] (a).queue: \"VPN!\" must be lowercase letters, digits, '-' or '_'",
        ]
    );
}

#[test]
fn empty_flows_are_rejected() {
    let text = "apiVersion: piecework/v1\nkind: Flow\nname: empty\ntrigger: { piece: data, trigger: catch }\nsteps: []\n";
    assert_eq!(issues(text), ["steps: a flow needs at least one step"]);
}

#[test]
fn next_step_walks_in_order() {
    let def = FlowDefinition::parse(GOOD, Format::Yaml).unwrap();
    assert_eq!(lifecycle::first_step(&def).unwrap().name, "first");
    assert_eq!(after(&def, "first").0, Some("second"));
    assert!(after(&def, "second").0.is_none());
    let _ = json!(null);
}

#[test]
fn webhook_flows_default_to_signed_calls_and_only_they_take_auth() {
    let hook = "apiVersion: piecework/v1\nkind: Flow\nname: f\ntrigger: { piece: data, trigger: catch }\nsteps:\n  - { name: a, piece: data, action: set, input: { value: 1 } }\n";
    let valid = validated(FlowDefinition::parse(hook, Format::Yaml).unwrap()).unwrap();
    assert_eq!(
        valid.definition.trigger.auth,
        Some(piecework_core::WebhookAuth::Hmac),
        "the default is written into the version"
    );
    let open = hook.replace("trigger: catch }", "trigger: catch, auth: none }");
    let valid = validated(FlowDefinition::parse(&open, Format::Yaml).unwrap()).unwrap();
    assert_eq!(
        valid.definition.trigger.auth,
        Some(piecework_core::WebhookAuth::None)
    );
    let scheduled = hook.replace(
        "trigger: { piece: data, trigger: catch }",
        "trigger: { piece: data, trigger: every, input: { interval: 1m }, auth: hmac }",
    );
    assert_eq!(
        issues(&scheduled),
        ["trigger.auth: only webhook triggers take `auth` and `token_header`"]
    );
    let stray_header = hook.replace("trigger: catch }", "trigger: catch, token_header: x-t }");
    assert_eq!(
        issues(&stray_header),
        ["trigger.token_header: is for `auth: token` only"]
    );
    let bad_header = hook.replace(
        "trigger: catch }",
        "trigger: catch, auth: token, token_header: \"X Token\" }",
    );
    assert_eq!(
        issues(&bad_header),
        ["trigger.token_header: \"X Token\" is not a lowercase HTTP header name"]
    );
    let valid = validated(
        FlowDefinition::parse(&hook.replace("name: f", "name: g"), Format::Yaml).unwrap(),
    )
    .unwrap();
    let scheduled_ok = validated(
        FlowDefinition::parse(
            &hook.replace(
                "trigger: { piece: data, trigger: catch }",
                "trigger: { piece: data, trigger: every, input: { interval: 1m } }",
            ),
            Format::Yaml,
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(scheduled_ok.definition.trigger.auth, None, "not a webhook");
    assert!(valid.definition.trigger.auth.is_some());
}

const BRANCHES: &str = r#"
apiVersion: piecework/v1
kind: Flow
name: branches
trigger: { piece: data, trigger: catch }
steps:
  - name: triage
    if: "{{ trigger.body.priority == 'critical' }}"
    then:
      - { name: page, piece: data, action: set, input: { value: "page" } }
      - name: escalate
        router:
          - name: night
            when: "{{ trigger.body.hour < 8 }}"
            steps: [ { name: wake, piece: data, action: set, input: { value: "{{ steps.page.output }}" } } ]
        default: [ { name: mail, piece: data, action: set, input: { value: "mail" } } ]
    else:
      - { name: queue, piece: data, action: set, input: { value: "queue" } }
  - { name: report, piece: data, action: set, input: { value: "{{ steps.triage.output }} via {{ steps.triage.branch }}" } }
"#;

#[test]
fn branch_steps_validate_and_the_flow_walks_into_and_out_of_their_branches() {
    let def = FlowDefinition::parse(BRANCHES, Format::Yaml).unwrap();
    let valid = validated(def.clone()).unwrap();
    assert!(valid.resolved.contains_key("wake"));
    assert!(!valid.resolved.contains_key("triage"));
    let names: Vec<&str> = def.all_steps().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "triage", "page", "escalate", "wake", "mail", "queue", "report"
        ]
    );
    let triage = def.step("triage").unwrap();
    assert!(triage.is_branch());
    let branches: Vec<(&str, Option<&str>)> =
        triage.branches().iter().map(|b| (b.name, b.when)).collect();
    assert_eq!(
        branches,
        [
            ("then", Some("{{ trigger.body.priority == 'critical' }}")),
            ("else", None)
        ]
    );
    let after = |name: &str| after(&def, name);
    assert_eq!(after("page"), (Some("escalate"), vec![]));
    // The last step of a nested branch ends both branches around it.
    assert_eq!(after("wake"), (Some("report"), vec!["escalate", "triage"]));
    assert_eq!(after("mail"), (Some("report"), vec!["escalate", "triage"]));
    assert_eq!(after("queue"), (Some("report"), vec!["triage"]));
    assert_eq!(after("report"), (None, vec![]));
    assert!(def.locate("ghost").is_none());
    // What is stored reads back the same.
    let json = serde_json::to_string(&def).unwrap();
    assert_eq!(FlowDefinition::parse(&json, Format::Json).unwrap(), def);
    assert!(
        json.contains(r#""if":"#) && json.contains(r#""else":"#),
        "{json}"
    );
}

#[test]
fn branch_step_problems_are_reported_where_they_are() {
    let text = r#"
apiVersion: piecework/v1
kind: Flow
name: bad
trigger: { piece: data, trigger: catch }
steps:
  - name: a
    if: "yes"
    piece: data
    then: [ { name: b, piece: data, action: set, input: { value: "{{ steps.a.output }}" } } ]
    router: [ { name: x, when: "{{ true }}" } ]
  - name: c
    router:
      - { name: default, when: "{{ steps.d.output }}", steps: [ { name: d, piece: data, action: set, input: { value: 1 } } ] }
      - { name: e, when: "{{ true }}" }
      - { name: e, when: "{{ true }}" }
    then: [ { name: f, piece: data, action: set, input: { value: 1 } } ]
  - { name: g, if: "{{ true }}" }
  - { name: h, piece: data, action: set, input: { value: "{{ steps.b.output }}" }, default: [ { name: i, piece: data, action: set, input: { value: 1 } } ] }
  - { name: j }
"#;
    assert_eq!(
        issues(text),
        [
            "steps[0] (a).piece: is for action steps; a branch step only chooses which steps run",
            "steps[0] (a).router: a step has either `if` (with `then`/`else`) or `router` (with `default`), not both",
            "steps[0] (a).if: \"yes\" is not a template: write a condition such as \"{{ trigger.body.priority == 'critical' }}\"",
            "steps[0] (a).then[0] (b).input.value: refers to step `a`, which this step is part of: its output is known only when it ends",
            "steps[1] (c).then: `then` and `else` go with `if`, not `router` (whose fallback is `default`)",
            "steps[1] (c).router[0].name: \"default\" must be snake_case (a-z, 0-9, _), at most 64 characters, and not `default`",
            "steps[1] (c).router[2].name: branch `e` is defined twice",
            "steps[1] (c).router[0].when: refers to step `d`, which runs after this step",
            "steps[2] (g).then: an `if` step needs steps in `then`, `else` or both",
            "steps[3] (h).default: `default` needs a `router`",
            "steps[3] (h).input.value: refers to step `b`, inside a branch of `a` that may not have run: refer to `steps.a.output` (the output of the branch that ran) or `steps.a.branch`",
            "steps[4] (j): an action step needs `piece` and `action` (other steps: `if`/`router`, `delay`/`until` or `wait_for`)",
        ]
    );
}

#[test]
fn a_branch_counts_its_steps_toward_the_limit_and_names_are_unique_across_branches() {
    let inner: Vec<String> = (0..200)
        .map(|i| format!("{{ name: s{i}, piece: data, action: set, input: {{ value: 1 }} }}"))
        .collect();
    let text = format!(
        "apiVersion: piecework/v1\nkind: Flow\nname: big\ntrigger: {{ piece: data, trigger: catch }}\nsteps:\n  - {{ name: top, if: \"{{{{ true }}}}\", then: [{}] }}\n",
        inner.join(", ")
    );
    assert_eq!(
        issues(&text),
        ["steps: a flow has at most 200 steps (branches included), this one has 201"]
    );
    let text = BRANCHES.replace("name: queue", "name: page");
    assert_eq!(
        issues(&text),
        ["steps[0] (triage).else[0].name: step `page` is defined twice"]
    );
}

#[test]
fn delay_and_wait_steps_validate_and_their_problems_are_named() {
    let good = r#"
apiVersion: piecework/v1
kind: Flow
name: waits
trigger: { piece: data, trigger: catch }
steps:
  - { name: pause, delay: 2s }
  - { name: later, until: "{{ trigger.body.at }}" }
  - name: approval
    wait_for: approval
    timeout: 1h
    on_timeout: [ { name: escalate, piece: data, action: set, input: { value: "{{ steps.pause.output }}" } } ]
  - { name: done, piece: data, action: set, input: { value: "{{ steps.approval.output }}" } }
"#;
    assert_eq!(issues(good), Vec::<String>::new());
    let def = FlowDefinition::parse(good, Format::Yaml).unwrap();
    assert_eq!(after(&def, "escalate").0, Some("done"));
    let bad = r#"
apiVersion: piecework/v1
kind: Flow
name: waits
trigger: { piece: data, trigger: catch }
steps:
  - { name: a, delay: 0s }
  - { name: b, delay: 1s, until: "2026-01-01T00:00:00Z", piece: data }
  - { name: c, until: "tomorrow" }
  - { name: d, wait_for: approval, on_timeout: [ { name: e, piece: data, action: set, input: { value: 1 } } ] }
  - { name: f, wait_for: approval, if: "{{ true }}", then: [ { name: g, piece: data, action: set, input: { value: 1 } } ] }
  - { name: h, piece: data, action: set, input: { value: 1 }, on_timeout: [ { name: i, piece: data, action: set, input: { value: 1 } } ] }
"#;
    assert_eq!(
        issues(bad),
        [
            "steps[0] (a).delay: must be more than zero and at most 366 days",
            "steps[1] (b).piece: is for action steps; a delay step only pauses the run",
            "steps[1] (b).until: a delay step takes `delay` (a duration) or `until` (an instant), not both",
            "steps[2] (c).until: \"tomorrow\" is neither an RFC 3339 instant (2026-12-24T18:00:00Z) nor a template that renders to one",
            "steps[3] (d).on_timeout: needs a `timeout`: without one the step waits until it is resumed or cancelled",
            "steps[4] (f): has `if`/`router` and `wait_for`: a step is an action, a branch, a delay or a wait, one at a time",
            "steps[5] (h).on_timeout: is for wait steps (`wait_for`)",
        ]
    );
}

#[test]
fn rates_parse_and_are_checked() {
    let def = FlowDefinition::parse(
        "apiVersion: piecework/v1\nkind: Flow\nname: r\ntrigger: { piece: data, trigger: catch }\nsteps:\n  - { name: a, piece: data, action: set, input: { value: 1 }, rate: 10/s }\n  - { name: b, piece: data, action: set, input: { value: 1 }, rate: 600/m, rate_key: shared }\n",
        Format::Yaml,
    )
    .unwrap();
    assert_eq!(
        def.steps[0].rate.unwrap().interval(),
        std::time::Duration::from_millis(100)
    );
    assert_eq!(def.steps[0].rate_key(), "piece:data");
    assert_eq!(def.steps[1].rate_key(), "shared");
    assert_eq!(
        serde_json::to_value(def.steps[1].rate).unwrap(),
        json!("600/m")
    );
    assert!(validated(def).is_ok());
    let err = FlowDefinition::parse(
        "apiVersion: piecework/v1\nkind: Flow\nname: r\ntrigger: { piece: data, trigger: catch }\nsteps:\n  - { name: a, piece: data, action: set, rate: 10/d }\n",
        Format::Yaml,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("\"10/d\" is not a rate: write a count per s, m or h, like `10/s`"),
        "{err}"
    );
    let text = "apiVersion: piecework/v1\nkind: Flow\nname: r\ntrigger: { piece: data, trigger: catch }\nsteps:\n  - { name: a, piece: data, action: set, input: { value: 1 }, rate_key: x }\n  - { name: b, delay: 1s, rate: 1/s }\n";
    assert_eq!(
        issues(text),
        [
            "steps[0] (a).rate_key: goes with `rate` or `max_in_flight`",
            "steps[1] (b).rate: is for action steps; a delay step only pauses the run",
        ]
    );
}

#[test]
fn loops_validate_with_their_own_scope_and_their_problems_are_named() {
    let good = r#"
apiVersion: piecework/v1
kind: Flow
name: loops
trigger: { piece: data, trigger: catch }
steps:
  - name: each
    for_each: "{{ trigger.body.items }}"
    max_items: 50
    steps:
      - { name: double, piece: data, action: set, input: { value: "{{ item * 2 }}" } }
      - { name: label, piece: data, action: set, input: { value: "{{ loop.index0 }}: {{ steps.double.output }}" } }
  - { name: after, piece: data, action: set, input: { value: "{{ steps.each.output }}" } }
"#;
    assert_eq!(issues(good), Vec::<String>::new());
    let def = FlowDefinition::parse(good, Format::Yaml).unwrap();
    assert_eq!(def.enclosing_loop("label").unwrap().name, "each");
    assert!(def.enclosing_loop("after").is_none());
    let bad = r#"
apiVersion: piecework/v1
kind: Flow
name: loops
trigger: { piece: data, trigger: catch }
steps:
  - name: each
    for_each: "items"
    parallelism: 65
    max_items: 0
    steps:
      - { name: inner, for_each: "{{ item }}", steps: [ { name: deep, piece: data, action: set, input: { value: 1 } } ] }
      - { name: own, piece: data, action: set, input: { value: "{{ steps.each.output }}" } }
  - { name: empty, for_each: "{{ trigger.body }}" }
  - { name: after, piece: data, action: set, input: { value: "{{ steps.own.output }} {{ item }}" }, max_items: 3 }
"#;
    assert_eq!(
        issues(bad),
        [
            "steps[0] (each).for_each: \"items\" is not a template: write the list to loop over, such as \"{{ trigger.body.items }}\"",
            "steps[0] (each).parallelism: must be between 1 and 64",
            "steps[0] (each).max_items: must be between 1 and 10000",
            "steps[0] (each).steps[0] (inner).for_each: a loop inside a loop is not supported: move the inner loop into a sub-flow, or flatten the list",
            "steps[0] (each).steps[1] (own).input.value: refers to step `each`, which this step is part of: its output is known only when it ends",
            "steps[1] (empty).steps: a loop needs steps to run for each item",
            "steps[2] (after).input.value: `item` is defined only in the steps of a `for_each` loop",
            "steps[2] (after).input.value: refers to step `own`, inside the loop `each`: refer to `steps.each.output`, the list of each item's last output",
            "steps[2] (after).max_items: is for loop steps (`for_each`)",
        ]
    );
}

#[test]
fn a_parallel_loop_holds_no_pauses() {
    let flow = |step: &str| {
        format!(
            r#"
apiVersion: piecework/v1
kind: Flow
name: fanout
trigger: {{ piece: data, trigger: catch }}
steps:
  - name: each
    for_each: "{{{{ trigger.body.items }}}}"
    parallelism: 4
    steps:
      - {{ name: double, piece: data, action: set, input: {{ value: "{{{{ item * 2 }}}}" }} }}
      - {step}
"#
        )
    };
    assert_eq!(
        issues(&flow("{ name: later, subflow: other, wait: false }")),
        Vec::<String>::new()
    );
    for pause in [
        "{ name: later, delay: 1s }",
        "{ name: later, wait_for: approval, timeout: 1h }",
        "{ name: later, subflow: other }",
    ] {
        assert_eq!(
            issues(&flow(pause)),
            [
                "steps[0] (each).steps[1] (later): a loop with `parallelism` above 1 cannot pause its items (delays, waits, sub-flows that wait): run them one after another, or start the sub-flow with `wait: false`"
            ],
            "{pause}"
        );
    }
}

#[test]
fn on_failure_branch_needs_catch_steps_which_see_the_failed_step() {
    let text = r#"
apiVersion: piecework/v1
kind: Flow
name: caught
trigger: { piece: data, trigger: catch }
steps:
  - name: risky
    piece: data
    action: set
    input: { value: 1 }
    on_failure: branch
    catch: [ { name: report, piece: data, action: set, input: { value: "{{ steps.risky.error }}" } } ]
  - { name: a, piece: data, action: set, input: { value: 1 }, on_failure: branch }
  - { name: b, piece: data, action: set, input: { value: 1 }, catch: [ { name: c, piece: data, action: set, input: { value: 1 } } ] }
  - { name: after, piece: data, action: set, input: { value: "{{ steps.report.output }}" } }
"#;
    assert_eq!(
        issues(text),
        [
            "steps[1] (a).catch: `on_failure: branch` needs the `catch` steps to run when the step fails",
            "steps[2] (b).catch: goes with `on_failure: branch`",
            "steps[3] (after).input.value: refers to step `report`, inside a branch of `risky` that may not have run: refer to `steps.risky.output` (the output of the branch that ran) or `steps.risky.branch`",
        ]
    );
    let def = FlowDefinition::parse(text, Format::Yaml).unwrap();
    assert_eq!(after(&def, "report").0, Some("a"));
}

#[test]
fn subflow_steps_name_a_flow_and_take_no_action_fields() {
    let text = r#"
apiVersion: piecework/v1
kind: Flow
name: parent
trigger: { piece: data, trigger: catch }
steps:
  - { name: a, subflow: child, input: { n: "{{ trigger.body.n }}" }, timeout: 1h }
  - { name: b, subflow: "Not A Flow", piece: data }
  - { name: c, subflow: child, wait: false, timeout: 1m }
  - { name: d, piece: data, action: set, input: { value: 1 }, wait: true }
"#;
    assert_eq!(
        issues(text),
        [
            "steps[1] (b).piece: is for action steps; a sub-flow step starts a run of another flow",
            "steps[1] (b).subflow: \"Not A Flow\" is not a flow name (lowercase letters, digits, '-' or '_')",
            "steps[2] (c).timeout: is how long the step waits for the run: it needs `wait` (the default)",
            "steps[3] (d).wait: is for sub-flow steps (`subflow`)",
        ]
    );
}

#[test]
fn debounce_takes_a_period_a_key_over_the_trigger_and_a_bound() {
    let flow = |fields: &str| {
        format!(
            "apiVersion: piecework/v1\nkind: Flow\nname: calm\ntrigger: {{ piece: data, trigger: catch }}\n{fields}steps:\n  - {{ name: a, piece: data, action: set, input: {{ value: 1 }} }}\n"
        )
    };
    assert_eq!(
        issues(&flow(
            "debounce: 30s\ndebounce_key: \"{{ trigger.body.ticket_id }}\"\ndebounce_max: 5m\n"
        )),
        Vec::<String>::new()
    );
    assert_eq!(issues(&flow("debounce: 1s\n")), Vec::<String>::new());
    assert_eq!(
        issues(&flow(
            "debounce: 0s\ndebounce_key: \"{{ steps.a.output }}\"\ndebounce_max: 8d\n"
        )),
        [
            "debounce: must be at least 1s and at most 7 days",
            "debounce_max: must be at least `debounce` and at most 7 days",
            "debounce_key: refers to `steps`: a debounce key sees only `trigger`, the item",
        ]
    );
    assert_eq!(
        issues(&flow("debounce: 1m\ndebounce_key: ticket\n")),
        [
            "debounce_key: \"ticket\" is not a template: write what groups items, such as \"{{ trigger.body.ticket_id }}\""
        ]
    );
    assert_eq!(
        issues(&flow(
            "debounce_key: \"{{ trigger.body }}\"\ndebounce_max: 1m\n"
        )),
        [
            "debounce_key: is only used with `debounce`",
            "debounce_max: is only used with `debounce`",
        ]
    );
}
