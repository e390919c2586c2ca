//! `set`: outputs its `value` (templates already rendered), so later steps can refer to it.

use piecework_sdk::prelude::*;
use serde_json::Value;

pub struct Set;

#[derive(serde::Deserialize)]
pub struct Input {
    value: Value,
}

impl Action for Set {
    type Input = Input;
    type Output = Value;

    fn spec(&self) -> ActionSpec {
        ActionSpec::new("set", "Set value")
            .description("Outputs the given value")
            .prop(
                Prop::json("value", "Value")
                    .required()
                    .description("Any JSON value; templates keep their type"),
            )
    }

    async fn run(&self, _ctx: &Context, input: Input) -> Result<Value, PieceError> {
        Ok(input.value)
    }
}
