//! `return_response`: what `POST /v1/webhooks/{flow}/sync` answers.

use std::collections::BTreeMap;

use piecework_sdk::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub struct ReturnResponse;

#[derive(Deserialize, Serialize)]
pub struct Response {
    status: u16,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    body: Value,
}

impl Action for ReturnResponse {
    type Input = Response;
    type Output = Response;

    fn spec(&self) -> ActionSpec {
        ActionSpec::new("return_response", "Return response")
            .description("Sets the response of a synchronous webhook call")
            .prop(Prop::number("status", "Status code").default_value(200))
            .prop(Prop::object("headers", "Headers"))
            .prop(
                Prop::json("body", "Body")
                    .description("A string is sent as text, anything else as JSON"),
            )
            .webhook_response()
    }

    async fn run(&self, _ctx: &Context, input: Response) -> Result<Response, PieceError> {
        if !(100..=599).contains(&input.status) {
            return Err(PieceError::fatal(format!(
                "status {} is not an HTTP status code",
                input.status
            )));
        }
        Ok(input)
    }
}
