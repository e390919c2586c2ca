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

    /// The newest page of tickets and, when the flow has read them before, older pages until
    /// one reaches the last ticket it saw (at most [`MAX_PAGES`]): a backlog filed while the
    /// flow was paused is read whole.
    async fn poll(&self, ctx: &Context, input: Input) -> Result<Vec<PolledItem>, PieceError> {
        let auth: MyCompanyAuth = ctx.auth()?;
        let mut items: Vec<PolledItem> = Vec::new();
        for _ in 0..MAX_PAGES {
            let mut query = vec![("limit", PAGE.to_string())];
            query.extend(input.team.clone().map(|team| ("team", team)));
            query.extend(
                input
                    .priority
                    .clone()
                    .map(|priority| ("priority", priority)),
            );
            query.extend(
                items
                    .last()
                    .and_then(|t| t.id.clone())
                    .map(|id| ("before", id)),
            );
            let request = ctx
                .http
                .get(&auth.endpoint("/tickets"))?
                .bearer_auth(&auth.api_key)
                .query(&query);
            let page: Value = ctx.http.send_json(request).await?;
            let tickets = page["tickets"]
                .as_array()
                .ok_or_else(|| PieceError::fatal("the ticket list has no `tickets` array"))?;
            let page: Vec<PolledItem> = tickets
                .iter()
                .map(|ticket| {
                    PolledItem::new(ticket.clone()).id(ticket["id"].as_str().unwrap_or_default())
                })
                .collect();
            let done = page.len() < PAGE || ctx.poll_cursor().is_none_or(|c| c.reaches(&page));
            items.extend(page);
            if done {
                break;
            }
        }
        Ok(items)
    }
}

/// Tickets per request.
const PAGE: usize = 100;
/// Pages one poll reads at most: a backlog longer than this is reported as a gap.
const MAX_PAGES: usize = 10;
