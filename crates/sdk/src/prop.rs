//! Props: the typed inputs of actions, triggers and custom auth.
//!
//! Each prop carries the metadata a catalog or UI needs (name, label, kind, options) and the
//! rules the engine checks before `run` is called, so an action receives input that already
//! matches its declaration and every problem is reported against the prop that caused it.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One option of a dropdown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DropdownOption {
    pub label: String,
    pub value: Value,
}

/// The options of a dynamic dropdown as its piece loads them, with a connection, while a flow
/// is written (the framework's `DropdownState`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DropdownOptions {
    pub options: Vec<DropdownOption>,
    /// What to show instead when there are none (or the dropdown is disabled), such as
    /// "Choose a project first".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placeholder: Option<String>,
    /// The dropdown cannot be filled in yet: a prop it depends on is missing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
}

impl DropdownOptions {
    /// Options from `(label, value)` pairs.
    pub fn new<L, V>(options: impl IntoIterator<Item = (L, V)>) -> Self
    where
        L: Into<String>,
        V: Into<Value>,
    {
        Self {
            options: options
                .into_iter()
                .map(|(label, value)| DropdownOption {
                    label: label.into(),
                    value: value.into(),
                })
                .collect(),
            placeholder: None,
            disabled: false,
        }
    }

    /// No options yet, saying why: a refresher is missing, no connection was given.
    pub fn disabled(placeholder: impl Into<String>) -> Self {
        Self {
            options: Vec::new(),
            placeholder: Some(placeholder.into()),
            disabled: true,
        }
    }
}

/// Checks that `name` is a dynamic dropdown among `props` (of `member`, for the error).
pub fn dynamic_dropdown<'p>(
    props: &'p [Prop],
    member: &str,
    name: &str,
) -> Result<&'p Prop, crate::PieceError> {
    match props.iter().find(|p| p.name == name) {
        Some(prop) if matches!(prop.kind, PropKind::DynamicDropdown { .. }) => Ok(prop),
        Some(_) => Err(crate::PieceError::fatal(format!(
            "prop `{name}` of `{member}` is not a dynamic dropdown: its options are in its metadata"
        ))),
        None => Err(crate::PieceError::fatal(format!(
            "`{member}` has no prop `{name}`"
        ))),
    }
}

/// What kind of value a prop holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PropKind {
    ShortText,
    LongText,
    Number,
    Checkbox,
    StaticDropdown {
        options: Vec<DropdownOption>,
    },
    /// Options are loaded at design time with the connection; `refreshers` names the props
    /// whose change reloads them. At run time any scalar is accepted.
    DynamicDropdown {
        refreshers: Vec<String>,
    },
    Json,
    Array {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        items: Option<Box<PropKind>>,
    },
    Object,
    /// An RFC 3339 timestamp, e.g. `2026-11-25T10:00:00Z`.
    DateTime,
    /// A secret: masked in UIs and replaced by `"***"` wherever a step's input is recorded.
    SecretText,
}

impl PropKind {
    fn type_name(&self) -> &'static str {
        match self {
            PropKind::ShortText | PropKind::LongText => "text",
            PropKind::Number => "number",
            PropKind::Checkbox => "checkbox (true or false)",
            PropKind::StaticDropdown { .. } => "one of the dropdown options",
            PropKind::DynamicDropdown { .. } => "a dropdown value (string, number or boolean)",
            PropKind::Json => "JSON",
            PropKind::Array { .. } => "array",
            PropKind::Object => "object",
            PropKind::DateTime => "RFC 3339 date-time",
            PropKind::SecretText => "secret text",
        }
    }
}

/// A declared input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Prop {
    pub name: String,
    pub display_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    pub required: bool,
    #[serde(flatten)]
    pub kind: PropKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
}

macro_rules! constructors {
    ($($(#[$doc:meta])* $fn_name:ident => $kind:expr;)*) => {
        $(
            $(#[$doc])*
            pub fn $fn_name(name: impl Into<String>, display_name: impl Into<String>) -> Self {
                Self::new(name, display_name, $kind)
            }
        )*
    };
}

impl Prop {
    pub fn new(name: impl Into<String>, display_name: impl Into<String>, kind: PropKind) -> Self {
        Self {
            name: name.into(),
            display_name: display_name.into(),
            description: String::new(),
            required: false,
            kind,
            default: None,
        }
    }

    constructors! {
        short_text => PropKind::ShortText;
        long_text => PropKind::LongText;
        number => PropKind::Number;
        checkbox => PropKind::Checkbox;
        json => PropKind::Json;
        object => PropKind::Object;
        date_time => PropKind::DateTime;
        secret_text => PropKind::SecretText;
        /// An array of any values; see [`Prop::array_of`] to type the items.
        array => PropKind::Array { items: None };
    }

    pub fn array_of(
        name: impl Into<String>,
        display_name: impl Into<String>,
        items: PropKind,
    ) -> Self {
        Self::new(
            name,
            display_name,
            PropKind::Array {
                items: Some(Box::new(items)),
            },
        )
    }

    /// A dropdown with fixed `(label, value)` options.
    pub fn static_dropdown<L, V>(
        name: impl Into<String>,
        display_name: impl Into<String>,
        options: impl IntoIterator<Item = (L, V)>,
    ) -> Self
    where
        L: Into<String>,
        V: Into<Value>,
    {
        let options = options
            .into_iter()
            .map(|(label, value)| DropdownOption {
                label: label.into(),
                value: value.into(),
            })
            .collect();
        Self::new(name, display_name, PropKind::StaticDropdown { options })
    }

    pub fn dynamic_dropdown(
        name: impl Into<String>,
        display_name: impl Into<String>,
        refreshers: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        let refreshers = refreshers.into_iter().map(Into::into).collect();
        Self::new(name, display_name, PropKind::DynamicDropdown { refreshers })
    }

    pub fn required(mut self) -> Self {
        self.required = true;
        self
    }

    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    pub fn default_value(mut self, value: impl Into<Value>) -> Self {
        self.default = Some(value.into());
        self
    }

    pub fn is_secret(&self) -> bool {
        matches!(self.kind, PropKind::SecretText)
    }
}

/// A prop value that does not match its declaration. The message names the prop.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("prop `{prop}`: {problem}")]
pub struct PropError {
    pub prop: String,
    pub problem: String,
}

impl PropError {
    pub fn new(prop: impl Into<String>, problem: impl fmt::Display) -> Self {
        Self {
            prop: prop.into(),
            problem: problem.to_string(),
        }
    }
}

/// How strictly values are checked.
#[derive(Debug, Clone, Copy)]
pub enum Check {
    /// At run time: every value is final, so types and presence are enforced.
    Runtime,
    /// When a flow is applied: a value for which `deferred` holds (a template) is only known
    /// at run time, so only its presence is checked.
    Static { deferred: fn(&Value) -> bool },
}

impl Check {
    fn defers(&self, value: &Value) -> bool {
        match self {
            Check::Runtime => false,
            Check::Static { deferred } => deferred(value),
        }
    }
}

/// Checks `input` against `props`: unknown keys, missing required props, and the type of each
/// value. Returns every problem found, in declaration order.
pub fn check_props(props: &[Prop], input: &Map<String, Value>, check: Check) -> Vec<PropError> {
    let mut errors = Vec::new();
    for key in input.keys() {
        if !props.iter().any(|p| &p.name == key) {
            let known: Vec<&str> = props.iter().map(|p| p.name.as_str()).collect();
            let known = if known.is_empty() {
                "it takes no props".to_owned()
            } else {
                format!("known props: {}", known.join(", "))
            };
            errors.push(PropError::new(key, format!("unknown prop ({known})")));
        }
    }
    for prop in props {
        match input.get(&prop.name) {
            None | Some(Value::Null) => {
                if prop.required && prop.default.is_none() {
                    errors.push(PropError::new(&prop.name, "is required"));
                }
            }
            Some(value) if check.defers(value) => {}
            Some(value) => {
                if let Err(problem) = check_value(&prop.kind, value, check) {
                    errors.push(PropError::new(&prop.name, problem));
                }
            }
        }
    }
    errors
}

/// Validates and normalises input for `run`: applies defaults, coerces unambiguous strings
/// (`"5"` for a number, `"true"` for a checkbox, as a mixed template renders them) and fails on
/// the first problem, naming the prop.
pub fn validate_props(props: &[Prop], input: &Value) -> Result<Map<String, Value>, PropError> {
    let mut map = match input {
        Value::Object(map) => map.clone(),
        Value::Null => Map::new(),
        other => {
            return Err(PropError::new(
                "(input)",
                format!("expected an object of props, got {}", json_type(other)),
            ));
        }
    };
    for prop in props {
        let missing = matches!(map.get(&prop.name), None | Some(Value::Null));
        if missing {
            match &prop.default {
                Some(default) => {
                    map.insert(prop.name.clone(), default.clone());
                }
                None => {
                    map.remove(&prop.name);
                }
            }
            continue;
        }
        if let Some(value) = map.get_mut(&prop.name) {
            coerce(&prop.kind, value);
        }
    }
    match check_props(props, &map, Check::Runtime).into_iter().next() {
        Some(err) => Err(err),
        None => Ok(map),
    }
}

/// Replaces the values of secret props with `"***"`, for recording inputs.
pub fn redact_secrets(props: &[Prop], input: &mut Value) {
    if let Value::Object(map) = input {
        for prop in props.iter().filter(|p| p.is_secret()) {
            if let Some(value) = map.get_mut(&prop.name)
                && !value.is_null()
            {
                *value = Value::String("***".into());
            }
        }
    }
}

fn coerce(kind: &PropKind, value: &mut Value) {
    let Value::String(text) = value else { return };
    let trimmed = text.trim();
    match kind {
        PropKind::Number => {
            if let Ok(n) = trimmed.parse::<i64>() {
                *value = Value::from(n);
            } else if let Some(n) = trimmed
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
            {
                *value = Value::Number(n);
            }
        }
        PropKind::Checkbox => match trimmed {
            "true" => *value = Value::Bool(true),
            "false" => *value = Value::Bool(false),
            _ => {}
        },
        _ => {}
    }
}

/// Checks `value` against `kind`; inside a list, an item `check` defers (a template among
/// fixed items) is left to run time like a whole value.
fn check_value(kind: &PropKind, value: &Value, check: Check) -> Result<(), String> {
    let ok = match kind {
        PropKind::ShortText | PropKind::LongText | PropKind::SecretText => value.is_string(),
        PropKind::Number => value.is_number(),
        PropKind::Checkbox => value.is_boolean(),
        PropKind::Json => true,
        PropKind::Object => value.is_object(),
        PropKind::DynamicDropdown { .. } => {
            value.is_string() || value.is_number() || value.is_boolean()
        }
        PropKind::StaticDropdown { options } => {
            if options.iter().any(|o| &o.value == value) {
                true
            } else {
                let allowed: Vec<String> = options.iter().map(|o| o.value.to_string()).collect();
                return Err(format!(
                    "{} is not one of the options ({})",
                    value,
                    allowed.join(", ")
                ));
            }
        }
        PropKind::DateTime => match value {
            Value::String(s) => {
                if chrono::DateTime::parse_from_rfc3339(s).is_err() {
                    return Err(format!(
                        "{s:?} is not an RFC 3339 date-time (e.g. 2026-11-25T10:00:00Z)"
                    ));
                }
                true
            }
            _ => false,
        },
        PropKind::Array { items } => match value {
            Value::Array(values) => {
                if let Some(item_kind) = items {
                    for (i, item) in values.iter().enumerate() {
                        if check.defers(item) {
                            continue;
                        }
                        check_value(item_kind, item, check)
                            .map_err(|e| format!("item {i}: {e}"))?;
                    }
                }
                true
            }
            _ => false,
        },
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "expected {}, got {}",
            kind.type_name(),
            json_type(value)
        ))
    }
}

pub(crate) fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn props() -> Vec<Prop> {
        vec![
            Prop::short_text("title", "Title").required(),
            Prop::number("count", "Count").default_value(1),
            Prop::checkbox("urgent", "Urgent"),
            Prop::static_dropdown("priority", "Priority", [("Low", "low"), ("High", "high")]),
            Prop::array_of("tags", "Tags", PropKind::ShortText),
            Prop::date_time("due", "Due"),
            Prop::secret_text("token", "Token"),
        ]
    }

    #[test]
    fn missing_required_prop_is_named() {
        let err = validate_props(&props(), &json!({})).unwrap_err();
        assert_eq!(err.to_string(), "prop `title`: is required");
    }

    #[test]
    fn wrong_type_names_prop_and_types() {
        let err = validate_props(&props(), &json!({"title": 5})).unwrap_err();
        assert_eq!(err.to_string(), "prop `title`: expected text, got a number");
    }

    #[test]
    fn unknown_prop_lists_known_ones() {
        let err = validate_props(&props(), &json!({"title": "x", "titel": "y"})).unwrap_err();
        assert_eq!(err.prop, "titel");
        assert!(err.problem.contains("known props: title, count"), "{err}");
    }

    #[test]
    fn dropdown_rejects_values_outside_options() {
        let err =
            validate_props(&props(), &json!({"title": "x", "priority": "urgent"})).unwrap_err();
        assert_eq!(err.prop, "priority");
        assert!(err.problem.contains("\"low\", \"high\""), "{err}");
    }

    #[test]
    fn array_items_and_dates_are_checked() {
        let err = validate_props(&props(), &json!({"title": "x", "tags": ["a", 3]})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "prop `tags`: item 1: expected text, got a number"
        );
        let err = validate_props(&props(), &json!({"title": "x", "due": "tomorrow"})).unwrap_err();
        assert_eq!(err.prop, "due");
    }

    #[test]
    fn defaults_apply_and_strings_coerce() {
        let map = validate_props(&props(), &json!({"title": "x", "urgent": "true"})).unwrap();
        assert_eq!(map["count"], json!(1));
        assert_eq!(map["urgent"], json!(true));
        let map = validate_props(&props(), &json!({"title": "x", "count": "2.5"})).unwrap();
        assert_eq!(map["count"], json!(2.5));
    }

    #[test]
    fn static_check_defers_templates_but_not_presence() {
        let is_template = |v: &Value| v.as_str().is_some_and(|s| s.contains("{{"));
        let input = json!({"title": "{{ trigger.title }}", "count": "{{ n }}"});
        let errors = check_props(
            &props(),
            input.as_object().unwrap(),
            Check::Static {
                deferred: is_template,
            },
        );
        assert!(errors.is_empty(), "{errors:?}");
        let errors = check_props(
            &props(),
            &Map::new(),
            Check::Static {
                deferred: is_template,
            },
        );
        assert_eq!(errors, vec![PropError::new("title", "is required")]);
    }

    #[test]
    fn static_check_defers_templates_inside_lists_but_checks_fixed_items() {
        let is_template = |v: &Value| v.as_str().is_some_and(|s| s.contains("{{"));
        let objects = [Prop::array_of("objects", "Objects", PropKind::Object).required()];
        let check = Check::Static {
            deferred: is_template,
        };
        let templated = json!({"objects": ["{{ steps.label.output.body }}", {"a": 1}]});
        let errors = check_props(&objects, templated.as_object().unwrap(), check);
        assert!(errors.is_empty(), "{errors:?}");
        let wrong = json!({"objects": ["{{ steps.label.output.body }}", "plain"]});
        let errors = check_props(&objects, wrong.as_object().unwrap(), check);
        assert_eq!(
            errors,
            vec![PropError::new(
                "objects",
                "item 1: expected object, got a string"
            )]
        );
        // At run time the template is rendered: a string is a string.
        let rendered = json!({"objects": ["{{ not rendered }}", {"a": 1}]});
        let errors = check_props(&objects, rendered.as_object().unwrap(), Check::Runtime);
        assert_eq!(errors.len(), 1, "{errors:?}");
    }

    #[test]
    fn secrets_are_redacted() {
        let mut input = json!({"title": "x", "token": "s3cr3t"});
        redact_secrets(&props(), &mut input);
        assert_eq!(input["token"], json!("***"));
        assert_eq!(input["title"], json!("x"));
    }

    #[test]
    fn metadata_serializes_kind_inline() {
        let prop = Prop::static_dropdown("env", "Environment", [("Prod", "prod")]).required();
        let json = serde_json::to_value(&prop).unwrap();
        assert_eq!(json["type"], "static_dropdown");
        assert_eq!(json["options"][0]["value"], "prod");
        let back: Prop = serde_json::from_value(json).unwrap();
        assert_eq!(back, prop);
    }
}
