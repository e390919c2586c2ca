//! `create_ticket`: files a ticket, after checking that the flow's owner may (the guide's
//! role-based access). Retries are safe: the request carries the step's idempotency key.

use piecework_sdk::prelude::*;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::MyCompanyAuth;

pub struct CreateTicket;

#[derive(Deserialize)]
pub struct Input {
    title: String,
    description: String,
    priority: String,
    #[serde(default)]
    assignee: Option<String>,
    #[serde(default)]
    team: Option<String>,
}

pub fn priorities() -> [(&'static str, &'static str); 4] {
    [
        ("Low", "low"),
        ("Medium", "medium"),
        ("High", "high"),
        ("Critical", "critical"),
    ]
}

impl Action for CreateTicket {
    type Input = Input;
    type Output = Value;

    fn spec(&self) -> ActionSpec {
        ActionSpec::new("create_ticket", "Create Ticket")
            .description("Create a new support ticket")
            .output("Ticket ID (`id`), created timestamp (`created_at`), ticket URL (`url`)")
            .require_auth()
            .prop(
                Prop::short_text("title", "Title")
                    .required()
                    .description("Ticket title"),
            )
            .prop(
                Prop::long_text("description", "Description")
                    .required()
                    .description("Detailed description"),
            )
            .prop(
                Prop::static_dropdown("priority", "Priority", priorities()).default_value("medium"),
            )
            .prop(
                Prop::dynamic_dropdown("team", "Team", Vec::<String>::new())
                    .description("The team the ticket is for, from the ticketing system"),
            )
            .prop(
                Prop::dynamic_dropdown("assignee", "Assignee", ["team"])
                    .description("User ID of the assignee: a member of the team"),
            )
    }

    /// The teams, and the chosen team's members, from the ticketing system.
    async fn options(
        &self,
        ctx: &Context,
        prop: &str,
        input: Value,
    ) -> Result<DropdownOptions, PieceError> {
        let Ok(auth) = ctx.auth::<MyCompanyAuth>() else {
            return Ok(DropdownOptions::disabled("Choose a connection first"));
        };
        let (path, list) = match prop {
            "team" => ("/teams".to_owned(), "teams"),
            "assignee" => match input["team"].as_str().filter(|t| !t.is_empty()) {
                Some(team) => (format!("/teams/{team}/members"), "members"),
                None => return Ok(DropdownOptions::disabled("Choose a team first")),
            },
            other => return Err(PieceError::fatal(format!("no options for `{other}`"))),
        };
        let request = ctx
            .http
            .get(&auth.endpoint(&path))?
            .bearer_auth(&auth.api_key);
        let found: Value = ctx.http.send_json(request).await?;
        let options = found[list].as_array().into_iter().flatten().map(|entry| {
            let label = entry["name"].as_str().unwrap_or_default().to_owned();
            (label, entry["id"].clone())
        });
        Ok(DropdownOptions::new(options))
    }

    async fn run(&self, ctx: &Context, input: Input) -> Result<Value, PieceError> {
        let auth: MyCompanyAuth = ctx.auth()?;
        check_permission(ctx, &auth, "create_ticket").await?;
        let body = json!({
            "title": input.title,
            "description": input.description,
            "priority": input.priority,
            "assignee": input.assignee,
            "team": input.team,
        });
        let request = ctx
            .http
            .post(&auth.endpoint("/tickets"))?
            .bearer_auth(&auth.api_key)
            .header("Idempotency-Key", &ctx.run.idempotency_key)
            .json(&body);
        let created: Value = ctx.http.send_json(request).await?;
        Ok(
            json!({ "id": created["id"], "created_at": created["created_at"], "url": created["url"] }),
        )
    }
}

/// Fails fatally unless the flow's owner may perform `action`.
pub async fn check_permission(
    ctx: &Context,
    auth: &MyCompanyAuth,
    action: &str,
) -> Result<(), PieceError> {
    let owner = &ctx.owner.id;
    if owner.is_empty() {
        return Err(PieceError::fatal(format!(
            "{action} needs the flow to have an owner (set `owner:` in the flow)"
        )));
    }
    let request = ctx
        .http
        .get(&auth.endpoint(&format!("/permissions/{owner}/{action}")))?
        .bearer_auth(&auth.api_key);
    let answer: Value = ctx.http.send_json(request).await?;
    if answer["allowed"].as_bool() == Some(true) {
        Ok(())
    } else {
        Err(PieceError::fatal(format!(
            "insufficient permissions: `{owner}` may not {action}"
        )))
    }
}
