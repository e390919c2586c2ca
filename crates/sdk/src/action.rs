//! Actions: the steps of a flow.
//!
//! An author implements [`Action`] with typed `Input` and `Output`; the framework erases it to
//! [`DynAction`], which validates the JSON input against the declared props, deserializes it,
//! runs the action and serializes the output. The engine only ever sees `DynAction`.

use std::future::Future;

use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::context::Context;
use crate::error::PieceError;
use crate::prop::{DropdownOptions, Prop, dynamic_dropdown, validate_props};

/// An action's metadata: the guide's `createAction` fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ActionSpec {
    pub name: String,
    pub display_name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub props: Vec<Prop>,
    /// Whether a step using this action must name a connection.
    #[serde(default)]
    pub require_auth: bool,
    /// What the action outputs, for generated documentation.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub output: String,
    /// This action's output (`{status, headers, body}`) is the flow's response to a synchronous
    /// webhook call.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub webhook_response: bool,
    /// This action checks the health of the system behind the piece: its output's `status`
    /// (`healthy` or anything else) is exported as the `piecework_piece_healthy` metric when a
    /// flow runs it, e.g. on a schedule. Set with the builder method of the same name.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub health_check: bool,
}

impl ActionSpec {
    pub fn new(name: impl Into<String>, display_name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            display_name: display_name.into(),
            description: String::new(),
            props: Vec::new(),
            require_auth: false,
            output: String::new(),
            webhook_response: false,
            health_check: false,
        }
    }

    /// Marks the action as the piece's health check: its `status` output becomes a metric.
    pub fn health_check(mut self) -> Self {
        self.health_check = true;
        self
    }

    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    pub fn prop(mut self, prop: Prop) -> Self {
        self.props.push(prop);
        self
    }

    /// Describes the output (documentation only).
    pub fn output(mut self, description: impl Into<String>) -> Self {
        self.output = description.into();
        self
    }

    pub fn require_auth(mut self) -> Self {
        self.require_auth = true;
        self
    }

    pub fn webhook_response(mut self) -> Self {
        self.webhook_response = true;
        self
    }
}

/// An action, as a piece author writes it.
///
/// ```
/// use piecework_sdk::prelude::*;
///
/// #[derive(serde::Deserialize)]
/// struct Input { name: String }
///
/// struct Greet;
///
/// impl Action for Greet {
///     type Input = Input;
///     type Output = serde_json::Value;
///
///     fn spec(&self) -> ActionSpec {
///         ActionSpec::new("greet", "Greet").prop(Prop::short_text("name", "Name").required())
///     }
///
///     async fn run(&self, _ctx: &Context, input: Input) -> Result<serde_json::Value, PieceError> {
///         Ok(serde_json::json!({ "greeting": format!("hello, {}", input.name) }))
///     }
/// }
/// ```
pub trait Action: Send + Sync + 'static {
    type Input: DeserializeOwned + Send;
    type Output: Serialize + Send;

    fn spec(&self) -> ActionSpec;

    fn run(
        &self,
        ctx: &Context,
        input: Self::Input,
    ) -> impl Future<Output = Result<Self::Output, PieceError>> + Send;

    /// Loads the options of the dynamic dropdown `prop` while a flow is written
    /// (`GET /v1/pieces/{piece}/props/{prop}/options`): `ctx.auth()` is the chosen connection,
    /// `input` the values of the other props given so far (its refreshers), unvalidated. Only
    /// called for a prop declared with [`Prop::dynamic_dropdown`]; the default loads none.
    fn options(
        &self,
        ctx: &Context,
        prop: &str,
        input: Value,
    ) -> impl Future<Output = Result<DropdownOptions, PieceError>> + Send {
        let _ = (ctx, input);
        let none = PieceError::fatal(format!(
            "the action loads no options for `{prop}` (it does not implement `Action::options`)"
        ));
        async move { Err(none) }
    }
}

/// The object-safe form of [`Action`] that the engine calls.
pub trait DynAction: Send + Sync {
    fn spec(&self) -> &ActionSpec;

    /// Validates `input` against the props, runs the action, returns its output as JSON.
    fn run_json<'a>(
        &'a self,
        ctx: &'a Context,
        input: Value,
    ) -> BoxFuture<'a, Result<Value, PieceError>>;

    /// Loads the options of dynamic dropdown `prop` (see [`Action::options`]); a prop that is
    /// not one is refused.
    fn options_json<'a>(
        &'a self,
        ctx: &'a Context,
        prop: &'a str,
        input: Value,
    ) -> BoxFuture<'a, Result<DropdownOptions, PieceError>>;
}

pub(crate) struct ActionHandle<A> {
    spec: ActionSpec,
    action: A,
}

impl<A: Action> ActionHandle<A> {
    pub(crate) fn new(action: A) -> Self {
        Self {
            spec: action.spec(),
            action,
        }
    }
}

/// Validates JSON input against props and deserializes it into the author's type.
pub(crate) fn typed_input<T: DeserializeOwned>(
    props: &[Prop],
    input: &Value,
) -> Result<T, PieceError> {
    let map = validate_props(props, input)?;
    serde_json::from_value(Value::Object(map))
        .map_err(|e| PieceError::fatal(format!("input does not match the declared props: {e}")))
}

impl<A: Action> DynAction for ActionHandle<A> {
    fn spec(&self) -> &ActionSpec {
        &self.spec
    }

    fn run_json<'a>(
        &'a self,
        ctx: &'a Context,
        input: Value,
    ) -> BoxFuture<'a, Result<Value, PieceError>> {
        Box::pin(async move {
            let input: A::Input = typed_input(&self.spec.props, &input)?;
            let output = self.action.run(ctx, input).await?;
            serde_json::to_value(output)
                .map_err(|e| PieceError::fatal(format!("output is not serializable as JSON: {e}")))
        })
    }

    fn options_json<'a>(
        &'a self,
        ctx: &'a Context,
        prop: &'a str,
        input: Value,
    ) -> BoxFuture<'a, Result<DropdownOptions, PieceError>> {
        Box::pin(async move {
            dynamic_dropdown(&self.spec.props, &self.spec.name, prop)?;
            self.action.options(ctx, prop, input).await
        })
    }
}
