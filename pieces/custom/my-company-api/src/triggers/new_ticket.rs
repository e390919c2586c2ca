//! `new_ticket`: fires once per new ticket, optionally only for a team or a priority. The API
//! lists tickets newest first, so the last-item strategy applies.

use std::time::Duration;

use piecework_sdk::prelude::*;
use serde::Deserialize;
use serde_json::Value;

use crate::actions::create_ticket::priorities;
use crate::auth::MyCompanyAuth;

pub struct NewTicket;

#[derive(Deserialize)]
pub struct Input {
    #[serde(default)]
    team: Option<String>,
    #[serde(default)]
    priority: Option<String>,
}

impl PollingTrigger for NewTicket {
    type Input = Input;

    fn spec(&self) -> TriggerSpec {
        TriggerSpec::polling("new_ticket", "New Ticket", DedupeStrategy::LastItem)
            .description("Triggers when a new ticket is created")
            .require_auth()
            .default_interval(Duration::from_secs(60))
            .prop(Prop::short_text("team", "Team").description("Only tickets of this team"))
            .prop(
                Prop::static_dropdown("priority", "Priority", priorities())
                    .description("Only tickets of this priority"),
            )
    }

    async fn poll(&self, ctx: &Context, input: Input) -> Result<Vec<PolledItem>, PieceError> {
        let auth: MyCompanyAuth = ctx.auth()?;
        let mut query = vec![("limit", "100".to_owned())];
        query.extend(input.team.map(|team| ("team", team)));
        query.extend(input.priority.map(|priority| ("priority", priority)));
        let request = ctx
            .http
            .get(&auth.endpoint("/tickets"))?
            .bearer_auth(&auth.api_key)
            .query(&query);
        let page: Value = ctx.http.send_json(request).await?;
        let tickets = page["tickets"]
            .as_array()
            .ok_or_else(|| PieceError::fatal("the ticket list has no `tickets` array"))?;
        Ok(tickets
            .iter()
            .map(|ticket| {
                PolledItem::new(ticket.clone()).id(ticket["id"].as_str().unwrap_or_default())
            })
            .collect())
    }
}
