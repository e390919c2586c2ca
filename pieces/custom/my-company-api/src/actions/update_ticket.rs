//! `update_ticket`: assigns a ticket or changes its status.

use piecework_sdk::prelude::*;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::MyCompanyAuth;

pub struct UpdateTicket;

#[derive(Deserialize)]
pub struct Input {
    ticket_id: String,
    #[serde(default)]
    assignee: Option<String>,
    #[serde(default)]
    status: Option<String>,
}

impl Action for UpdateTicket {
    type Input = Input;
    type Output = Value;

    fn spec(&self) -> ActionSpec {
        let statuses = [
            ("Open", "open"),
            ("In progress", "in_progress"),
            ("Closed", "closed"),
        ];
        ActionSpec::new("update_ticket", "Update Ticket")
            .description("Assign a ticket or change its status")
            .output("The updated ticket")
            .require_auth()
            .prop(Prop::short_text("ticket_id", "Ticket ID").required())
            .prop(Prop::short_text("assignee", "Assignee"))
            .prop(Prop::static_dropdown("status", "Status", statuses))
    }

    async fn run(&self, ctx: &Context, input: Input) -> Result<Value, PieceError> {
        if input.assignee.is_none() && input.status.is_none() {
            return Err(PieceError::fatal("set `assignee`, `status` or both"));
        }
        let auth: MyCompanyAuth = ctx.auth()?;
        let request = ctx
            .http
            .request(
                piecework_sdk::reqwest::Method::PATCH,
                &auth.endpoint(&format!("/tickets/{}", input.ticket_id)),
            )?
            .bearer_auth(&auth.api_key)
            .json(&json!({ "assignee": input.assignee, "status": input.status }));
        ctx.http.send_json(request).await
    }
}
