//! `get`, `put`, `delete`.

use piecework_sdk::prelude::*;
use serde::Deserialize;
use serde_json::{Value, json};

fn key_prop() -> Prop {
    Prop::short_text("key", "Key").required()
}

fn scope_prop() -> Prop {
    Prop::static_dropdown(
        "scope",
        "Scope",
        [("This flow", "flow"), ("All flows", "global")],
    )
    .default_value("flow")
    .description("Values of a flow are private to it; global values are shared")
}

fn check_key(key: &str) -> Result<(), PieceError> {
    if key.is_empty() || key.len() > 512 {
        return Err(PieceError::fatal("prop `key`: must be 1 to 512 characters"));
    }
    Ok(())
}

pub struct Get;

#[derive(Deserialize)]
pub struct GetInput {
    key: String,
    scope: Scope,
    #[serde(default)]
    default: Option<Value>,
}

impl Action for Get {
    type Input = GetInput;
    type Output = Value;

    fn spec(&self) -> ActionSpec {
        ActionSpec::new("get", "Get value")
            .description("Reads a value; outputs {key, value, found}")
            .prop(key_prop())
            .prop(scope_prop())
            .prop(
                Prop::json("default", "Default")
                    .description("Returned as `value` when the key is missing"),
            )
    }

    async fn run(&self, ctx: &Context, input: GetInput) -> Result<Value, PieceError> {
        check_key(&input.key)?;
        let found = ctx.store.get(input.scope, &input.key).await?;
        let value = found.clone().or(input.default).unwrap_or(Value::Null);
        Ok(json!({ "key": input.key, "value": value, "found": found.is_some() }))
    }
}

pub struct Put;

#[derive(Deserialize)]
pub struct PutInput {
    key: String,
    scope: Scope,
    value: Value,
}

impl Action for Put {
    type Input = PutInput;
    type Output = Value;

    fn spec(&self) -> ActionSpec {
        ActionSpec::new("put", "Put value")
            .description("Stores a value under a key; outputs {key, value}")
            .prop(key_prop())
            .prop(scope_prop())
            .prop(Prop::json("value", "Value").required())
    }

    async fn run(&self, ctx: &Context, input: PutInput) -> Result<Value, PieceError> {
        check_key(&input.key)?;
        ctx.store
            .put(input.scope, &input.key, input.value.clone())
            .await?;
        Ok(json!({ "key": input.key, "value": input.value }))
    }
}

pub struct Delete;

#[derive(Deserialize)]
pub struct DeleteInput {
    key: String,
    scope: Scope,
}

impl Action for Delete {
    type Input = DeleteInput;
    type Output = Value;

    fn spec(&self) -> ActionSpec {
        ActionSpec::new("delete", "Delete value")
            .description("Removes a key; outputs {key, deleted}")
            .prop(key_prop())
            .prop(scope_prop())
    }

    async fn run(&self, ctx: &Context, input: DeleteInput) -> Result<Value, PieceError> {
        check_key(&input.key)?;
        let deleted = ctx.store.delete(input.scope, &input.key).await?;
        Ok(json!({ "key": input.key, "deleted": deleted }))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[tokio::test]
    async fn put_get_delete_round_trip_within_a_scope() {
        let piece = crate::piece().unwrap();
        let ctx = piecework_sdk::Context::for_test("s");
        let run = |action: &'static str, input| {
            let piece = piece.clone();
            let ctx = ctx.clone();
            async move {
                piece
                    .action(action)
                    .unwrap()
                    .run_json(&ctx, input)
                    .await
                    .unwrap()
            }
        };
        run("put", json!({"key": "n", "value": 3})).await;
        assert_eq!(run("get", json!({"key": "n"})).await["value"], json!(3));
        let global = run("get", json!({"key": "n", "scope": "global", "default": 0})).await;
        assert_eq!(global, json!({"key": "n", "value": 0, "found": false}));
        assert_eq!(
            run("delete", json!({"key": "n"})).await["deleted"],
            json!(true)
        );
        assert_eq!(run("get", json!({"key": "n"})).await["found"], json!(false));
    }
}
