//! Templates in step inputs: `{{ trigger.id }}`, `{{ steps.assign.output.url }}`.
//!
//! Rendering is minijinja with strict undefined values (a typo is an error, not an empty string)
//! and a fuel limit (a template cannot loop forever on a worker). A string that is exactly one
//! `{{ expression }}` keeps the JSON type of its value — a number stays a number, an object stays
//! an object — while any other string containing a template renders to a string.

use std::collections::BTreeSet;
use std::sync::LazyLock;

use minijinja::{Environment, UndefinedBehavior};
use serde_json::{Map, Value};

/// Roots a template may refer to.
pub const ROOTS: &[&str] = &["trigger", "steps", "run", "flow"];
/// Roots defined in the steps of a `for_each` loop: the item, and where it is in the list.
pub const LOOP_ROOTS: &[&str] = &["item", "loop"];

/// Enough for any reasonable input mapping, small enough to stop a runaway loop quickly.
const FUEL: u64 = 50_000;

static ENV: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(FUEL));
    env
});

/// A template that cannot be parsed or evaluated. `path` locates it in the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct TemplateError {
    pub path: String,
    pub message: String,
}

/// Whether a value holds a template (and so is only known at run time).
pub fn is_template(value: &Value) -> bool {
    value
        .as_str()
        .is_some_and(|s| s.contains("{{") || s.contains("{%"))
}

/// The expression of a whole-string template (`"{{ x.y }}"` → `"x.y"`), if it is one.
fn whole_expression(text: &str) -> Option<&str> {
    let inner = text.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    (!inner.contains("{{") && !inner.contains("}}") && !inner.contains("{%")).then(|| inner.trim())
}

fn describe(err: &minijinja::Error) -> String {
    let mut message = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// Whether `value` holds a template anywhere (in a string, an array or an object).
pub fn has_templates(value: &Value) -> bool {
    match value {
        Value::String(_) => is_template(value),
        Value::Array(items) => items.iter().any(has_templates),
        Value::Object(map) => map.values().any(has_templates),
        _ => false,
    }
}

/// Evaluates a branch condition: a template that must come out `true` or `false`.
pub fn condition(template: &str, context: &minijinja::Value) -> Result<bool, String> {
    let value = render_at(
        &Value::String(template.to_owned()),
        context,
        &mut String::new(),
    )
    .map_err(|err| err.message)?;
    match value {
        Value::Bool(value) => Ok(value),
        other => Err(format!(
            "evaluated to {other}, not true or false (compare it, e.g. `== 'critical'`, or test it with `is defined`)"
        )),
    }
}

/// Renders every template in `input` against `context`.
pub fn render(input: &Value, context: &minijinja::Value) -> Result<Value, TemplateError> {
    render_at(input, context, &mut String::from("input"))
}

fn render_at(
    value: &Value,
    context: &minijinja::Value,
    path: &mut String,
) -> Result<Value, TemplateError> {
    let fail = |path: &String, err: minijinja::Error| TemplateError {
        path: path.clone(),
        message: describe(&err),
    };
    match value {
        Value::String(text) if is_template(value) => {
            if let Some(expr_text) = whole_expression(text) {
                let expr = ENV
                    .compile_expression(expr_text)
                    .map_err(|e| fail(path, e))?;
                let out = expr.eval(context.clone()).map_err(|e| fail(path, e))?;
                if out.is_undefined() {
                    return Err(TemplateError {
                        path: path.clone(),
                        message: format!(
                            "undefined value: `{expr_text}` refers to something that does not exist"
                        ),
                    });
                }
                serde_json::to_value(&out).map_err(|e| TemplateError {
                    path: path.clone(),
                    message: format!("value is not representable as JSON: {e}"),
                })
            } else {
                ENV.render_str(text, context.clone())
                    .map(Value::String)
                    .map_err(|e| fail(path, e))
            }
        }
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                out.push(render_at(item, context, path)?);
                path.truncate(len);
            }
            Ok(Value::Array(out))
        }
        Value::Object(map) => {
            let mut out = Map::with_capacity(map.len());
            for (key, item) in map {
                let len = path.len();
                path.push('.');
                path.push_str(key);
                out.insert(key.clone(), render_at(item, context, path)?);
                path.truncate(len);
            }
            Ok(Value::Object(out))
        }
        other => Ok(other.clone()),
    }
}

/// One template found in an input, with what it refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateRef {
    /// Where in the input, e.g. `input.title`.
    pub path: String,
    /// Variables it reads, as dotted paths (`steps.assign.output.url`).
    pub variables: BTreeSet<String>,
}

/// Parses every template in `input` (syntax errors are reported with their path) and returns
/// what each refers to, for checking references when a flow is applied.
pub fn analyze(input: &Value) -> Result<Vec<TemplateRef>, TemplateError> {
    let mut refs = Vec::new();
    analyze_at(input, &mut String::from("input"), &mut refs)?;
    Ok(refs)
}

fn analyze_at(
    value: &Value,
    path: &mut String,
    refs: &mut Vec<TemplateRef>,
) -> Result<(), TemplateError> {
    match value {
        Value::String(text) if is_template(value) => {
            let fail = |err: minijinja::Error| TemplateError {
                path: path.clone(),
                message: describe(&err),
            };
            let variables = match whole_expression(text) {
                Some(expr) => ENV
                    .compile_expression(expr)
                    .map_err(fail)?
                    .undeclared_variables(true),
                None => ENV
                    .template_from_str(text)
                    .map_err(fail)?
                    .undeclared_variables(true),
            };
            refs.push(TemplateRef {
                path: path.clone(),
                variables: variables.into_iter().collect(),
            });
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                analyze_at(item, path, refs)?;
                path.truncate(len);
            }
        }
        Value::Object(map) => {
            for (key, item) in map {
                let len = path.len();
                path.push('.');
                path.push_str(key);
                analyze_at(item, path, refs)?;
                path.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> minijinja::Value {
        minijinja::Value::from(minijinja::value::Serde(json!({
            "trigger": {"id": 42, "title": "Printer on fire", "tags": ["hw", "urgent"]},
            "steps": {"assign": {"output": {"url": "https://t/42", "user": {"name": "ada"}}}},
        })))
    }

    #[test]
    fn templates_are_found_at_any_depth() {
        assert!(!has_templates(&json!({"a": 1, "b": ["x", {"c": "plain"}]})));
        assert!(has_templates(&json!({"a": [{"b": "{{ trigger.id }}"}]})));
        assert!(has_templates(&json!({"a": "{% if x %}y{% endif %}"})));
    }

    #[test]
    fn whole_string_templates_keep_their_json_type() {
        let input = json!({
            "id": "{{ trigger.id }}",
            "tags": "{{ trigger.tags }}",
            "user": " {{ steps.assign.output.user }} ",
            "next": "{{ trigger.id + 1 }}",
        });
        let out = render(&input, &ctx()).unwrap();
        assert_eq!(out["id"], json!(42));
        assert_eq!(out["tags"], json!(["hw", "urgent"]));
        assert_eq!(out["user"], json!({"name": "ada"}));
        assert_eq!(out["next"], json!(43));
    }

    #[test]
    fn mixed_templates_render_to_strings() {
        let input = json!({"text": "#{{ trigger.id }}: {{ trigger.title | upper }}", "n": ["{{ trigger.id }}"]});
        let out = render(&input, &ctx()).unwrap();
        assert_eq!(out["text"], json!("#42: PRINTER ON FIRE"));
        assert_eq!(out["n"], json!([42]));
    }

    #[test]
    fn undefined_references_fail_with_the_path() {
        let err = render(&json!({"a": {"b": "{{ steps.nope.output }}"}}), &ctx()).unwrap_err();
        assert_eq!(err.path, "input.a.b");
        assert!(err.message.contains("undefined"), "{err}");
    }

    #[test]
    fn syntax_errors_are_found_before_running() {
        let err = analyze(&json!({"x": "{{ trigger.id "})).unwrap_err();
        assert_eq!(err.path, "input.x");
        let err = analyze(&json!({"x": ["ok", "{% if %}"]})).unwrap_err();
        assert_eq!(err.path, "input.x[1]");
    }

    #[test]
    fn references_are_reported_as_dotted_paths() {
        let refs = analyze(&json!({"u": "{{ steps.assign.output.url }}", "t": "{{ trigger.title }} by {{ run.id }}"})).unwrap();
        let all: Vec<_> = refs
            .iter()
            .flat_map(|r| r.variables.iter().cloned())
            .collect();
        assert!(
            all.contains(&"steps.assign.output.url".to_owned()),
            "{all:?}"
        );
        assert!(all.contains(&"trigger.title".to_owned()), "{all:?}");
        assert!(all.contains(&"run.id".to_owned()), "{all:?}");
    }

    #[test]
    fn runaway_templates_run_out_of_fuel() {
        let err = render(
            &json!(
                "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
            ),
            &ctx(),
        )
        .unwrap_err();
        assert!(err.message.contains("fuel"), "{err}");
    }
}
