//! `catch`: every request to `/v1/webhooks/{flow}` starts one run whose trigger output is
//! `{method, headers, query, body}` (credential headers removed).

use piecework_sdk::prelude::*;
use serde_json::Value;

pub struct Catch;

impl WebhookTrigger for Catch {
    type Input = Value;

    fn spec(&self) -> TriggerSpec {
        TriggerSpec::webhook("catch", "Catch webhook").description("Starts a run for every request")
    }
}
