//! `my-company-api`: the private piece of the guide, for the company's internal ticketing API.
//!
//! - auth (`auth.rs`): an API key plus an environment (prod, staging, dev) that selects the base
//!   URL and API version (prod uses v2, the others v1), validated against `/me`;
//! - actions: `create_ticket` (after a permission check for the flow's owner), `update_ticket`,
//!   `health_check`;
//! - trigger: `new_ticket`, polling, filtered by team and priority; each ticket fires once.

mod actions;
mod auth;
mod triggers;

pub use auth::{API_KEY_HELP, MyCompanyAuth};
use piecework_sdk::{Piece, PieceDefinitionError, category};

pub const NAME: &str = "my-company-api";

pub fn piece() -> Result<Piece, PieceDefinitionError> {
    Piece::builder(NAME, "My Company API")
        .description("Internal company API integration: tickets of the support system")
        .version(env!("CARGO_PKG_VERSION"))
        .auth(auth::definition())
        .validate_auth(auth::CheckKey)
        .logo_url("https://cdn.company.example/logo.png")
        .categories([category::BUSINESS_INTELLIGENCE])
        .authors(["platform-team"])
        .minimum_supported_release("0.1.0")
        .action(actions::create_ticket::CreateTicket)
        .action(actions::update_ticket::UpdateTicket)
        .action(actions::health_check::HealthCheck)
        .polling_trigger(triggers::new_ticket::NewTicket)
        .build()
}
