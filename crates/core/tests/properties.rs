//! Property tests of what users write: flow documents and templates. Whatever the text, the
//! parser and validator answer — a flow, or errors that name the problem — and never panic;
//! flows built from the grammar validate and survive a round trip; templates keep their
//! promises. `PROPTEST_CASES` sets how many cases run (`just fuzz` runs millions).

use piecework_core::flow::{FlowDefinition, FlowError, Format, validate};
use piecework_core::{Registry, template};
use piecework_sdk::prelude::*;
use proptest::prelude::*;
use serde_json::{Value, json};

struct Set;

impl Action for Set {
    type Input = Value;
    type Output = Value;

    fn spec(&self) -> ActionSpec {
        ActionSpec::new("set", "Set").prop(Prop::json("value", "Value").required())
    }

    async fn run(&self, _ctx: &Context, input: Value) -> Result<Value, PieceError> {
        Ok(input["value"].clone())
    }
}

struct Catch;

impl WebhookTrigger for Catch {
    type Input = Value;

    fn spec(&self) -> TriggerSpec {
        TriggerSpec::webhook("catch", "Catch")
    }
}

fn registry() -> Registry {
    let mut registry = Registry::new();
    registry
        .register_built(
            Piece::builder("data", "Data")
                .version("1.0.0")
                .action(Set)
                .webhook_trigger(Catch)
                .build(),
        )
        .unwrap();
    registry
}

/// Parses and validates `text` as a flow document; panics only if the parser or validator
/// does, or an error says nothing.
fn check(text: &str, format: Format) -> Result<(), String> {
    let definition = FlowDefinition::parse(text, format).map_err(|e| e.to_string())?;
    let registry = registry();
    let validated = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(validate(definition, &registry));
    match validated {
        Ok(_) => Ok(()),
        Err(FlowError::Invalid { issues, .. }) => {
            assert!(!issues.is_empty(), "refused without an issue");
            for issue in &issues {
                assert!(
                    !issue.path.is_empty() && !issue.message.is_empty(),
                    "{issue:?}"
                );
            }
            Err(issues[0].to_string())
        }
        Err(other) => Err(other.to_string()),
    }
}

const FLOW: &str = r#"apiVersion: piecework/v1
kind: Flow
name: sample
trigger: { piece: data, trigger: catch }
steps:
  - name: first
    piece: data
    action: set
    input: { value: "{{ trigger.body.items }}" }
    retry: { max_attempts: 3, initial_interval: 1s }
  - name: each
    for_each: "{{ steps.first.output }}"
    parallelism: 2
    steps:
      - { name: double, piece: data, action: set, input: { value: "{{ item * 2 }}" } }
  - name: gate
    if: "{{ steps.each.output | length > 1 }}"
    then:
      - { name: approval, wait_for: approval, timeout: 1h }
    else:
      - { name: pause, delay: 5m }
  - name: last
    piece: data
    action: set
    input: { value: { n: "{{ steps.each.output | length }}", list: ["{{ trigger.body }}", 1] } }
"#;

/// One step of a generated flow: an action, or a branch or loop around more steps.
#[derive(Debug, Clone)]
enum Gen {
    Set(i64),
    Branch(Vec<Gen>, Vec<Gen>),
    Loop(u32, Vec<Gen>),
}

fn steps(depth: u32, in_loop: bool) -> BoxedStrategy<Vec<Gen>> {
    let leaf = any::<i64>().prop_map(Gen::Set);
    let step = if depth == 0 {
        leaf.boxed()
    } else {
        let branch = (steps(depth - 1, in_loop), steps(depth - 1, in_loop))
            .prop_map(|(then, other)| Gen::Branch(then, other));
        if in_loop {
            prop_oneof![3 => leaf, 1 => branch].boxed()
        } else {
            // Loops do not nest (a flow says so with a sub-flow).
            let each =
                (1..=4u32, steps(depth - 1, true)).prop_map(|(lanes, body)| Gen::Loop(lanes, body));
            prop_oneof![3 => leaf, 1 => branch, 1 => each].boxed()
        }
    };
    proptest::collection::vec(step, 1..4).boxed()
}

/// Writes generated steps as YAML, naming them `s0`, `s1`, … in order.
fn write(steps: &[Gen], indent: usize, next: &mut usize, out: &mut String) {
    let pad = " ".repeat(indent);
    for step in steps {
        let name = format!("s{next}");
        *next += 1;
        match step {
            Gen::Set(n) => out.push_str(&format!(
                "{pad}- {{ name: {name}, piece: data, action: set, input: {{ value: {n} }} }}\n"
            )),
            Gen::Branch(then, other) => {
                out.push_str(&format!(
                    "{pad}- name: {name}\n{pad}  if: \"{{{{ trigger.body.n > {n} }}}}\"\n{pad}  then:\n",
                    n = *next
                ));
                write(then, indent + 4, next, out);
                out.push_str(&format!("{pad}  else:\n"));
                write(other, indent + 4, next, out);
            }
            Gen::Loop(lanes, body) => {
                out.push_str(&format!(
                    "{pad}- name: {name}\n{pad}  for_each: \"{{{{ trigger.body.items }}}}\"\n{pad}  parallelism: {lanes}\n{pad}  steps:\n"
                ));
                write(body, indent + 4, next, out);
            }
        }
    }
}

/// A template context, as a run makes one.
fn context(value: Value) -> minijinja::Value {
    minijinja::Value::from(minijinja::value::Serde(value))
}

/// JSON values as a trigger or a step may produce them.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e12f64..1e12).prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{1,6}", inner, 0..4)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// Text that looks like templates: their marks, names, filters and operators, and noise.
fn template_text() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("{{ ".to_owned()),
        Just(" }}".to_owned()),
        Just("{% ".to_owned()),
        Just(" %}".to_owned()),
        Just("trigger".to_owned()),
        Just("steps.a.output".to_owned()),
        Just(".".to_owned()),
        Just(" | length".to_owned()),
        Just(" | default('x')".to_owned()),
        Just("for i in range(100000000)".to_owned()),
        Just("endfor".to_owned()),
        Just("if".to_owned()),
        Just("endif".to_owned()),
        Just(" ~ ".to_owned()),
        Just(" + 1".to_owned()),
        Just("(".to_owned()),
        Just(")".to_owned()),
        Just("[0]".to_owned()),
        ".{0,3}",
    ];
    proptest::collection::vec(token, 0..12).prop_map(|tokens| tokens.concat())
}

proptest! {
    #[test]
    fn any_text_is_a_flow_or_refused_with_a_reason(text in ".{0,200}") {
        for format in [Format::Yaml, Format::Json] {
            if let Err(reason) = check(&text, format) {
                prop_assert!(!reason.is_empty());
            }
        }
    }

    #[test]
    fn a_damaged_flow_is_refused_with_a_reason_or_still_valid(
        cut in any::<prop::sample::Index>(),
        length in 0usize..40,
        insert in ".{0,8}",
    ) {
        let at = cut.index(FLOW.len());
        let at = (0..=at).rev().find(|i| FLOW.is_char_boundary(*i)).unwrap_or(0);
        let end = (at + length).min(FLOW.len());
        let end = (end..=FLOW.len()).find(|i| FLOW.is_char_boundary(*i)).unwrap_or(FLOW.len());
        let damaged = format!("{}{insert}{}", &FLOW[..at], &FLOW[end..]);
        if let Err(reason) = check(&damaged, Format::Yaml) {
            prop_assert!(!reason.is_empty());
        }
    }

    #[test]
    fn flows_from_the_grammar_validate_and_survive_a_round_trip(steps in steps(2, false)) {
        let mut text = String::from(
            "apiVersion: piecework/v1\nkind: Flow\nname: generated\ntrigger: { piece: data, trigger: catch }\nsteps:\n",
        );
        write(&steps, 2, &mut 0, &mut text);
        prop_assert_eq!(check(&text, Format::Yaml), Ok(()), "{}", text);
        let parsed = FlowDefinition::parse(&text, Format::Yaml).unwrap();
        let again = FlowDefinition::parse(&serde_json::to_string(&parsed).unwrap(), Format::Json).unwrap();
        prop_assert_eq!(again, parsed);
    }

    #[test]
    fn a_lone_expression_keeps_the_json_value_it_names(value in json_value()) {
        let context = context(json!({ "trigger": { "body": value } }));
        let rendered = template::render(&json!("{{ trigger.body }}"), &context).unwrap();
        prop_assert_eq!(rendered, value);
    }

    #[test]
    fn text_without_template_marks_is_left_as_it_is(text in ".{0,40}", value in json_value()) {
        let input = json!({ "a": text, "b": [value] });
        prop_assume!(!template::has_templates(&input));
        let rendered = template::render(&input, &minijinja::Value::from(())).unwrap();
        prop_assert_eq!(rendered, input);
    }

    #[test]
    fn any_template_renders_or_fails_saying_where(text in template_text()) {
        let context = context(json!({
            "trigger": { "body": [1, 2] },
            "steps": { "a": { "output": "x" } },
        }));
        let input = json!({ "list": [{ "t": text }] });
        if let Err(err) = template::render(&input, &context) {
            prop_assert_eq!(err.path, "input.list[0].t");
            prop_assert!(!err.message.is_empty());
        }
        // Syntax is checked at apply time the same way.
        if let Err(err) = template::analyze(&input) {
            prop_assert!(!err.message.is_empty());
        }
    }
}
