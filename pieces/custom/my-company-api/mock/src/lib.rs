//! A mock of "the company's ticketing API", the internal system the `my-company-api` piece
//! integrates with: used by the piece's tests, the end-to-end tests and the `piecework dev`
//! demo, so none of them needs the network.
//!
//! It behaves like a real internal API would: every request needs `Authorization: Bearer
//! <token>` with a known token; routes live under `/v1` and `/v2` (production uses v2) and
//! each response says which version answered (`X-API-Version`); tickets are listed newest
//! first. Tests inject failures — a status (5xx, 429 with `Retry-After`) or a delay — for the
//! next requests, and read back every request it received.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// A ticket as the API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ticket {
    pub id: String,
    pub title: String,
    pub description: String,
    pub priority: String,
    pub team: String,
    pub assignee: Option<String>,
    pub status: String,
    pub created_at: DateTime<Utc>,
}

/// A failure to answer the next request with.
#[derive(Debug, Clone, Default)]
pub struct Fault {
    pub status: Option<u16>,
    pub retry_after: Option<u64>,
    pub delay: Option<Duration>,
}

/// One request the mock received.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// `v1` or `v2`, if the path had one.
    pub version: Option<String>,
    pub idempotency_key: Option<String>,
}

#[derive(Default)]
struct State_ {
    tokens: HashSet<String>,
    tickets: Vec<Ticket>,
    next_id: u64,
    faults: VecDeque<Fault>,
    seen: Vec<Seen>,
    /// `(user, action)` pairs that are refused; everything else is allowed.
    denied: HashSet<(String, String)>,
    /// Idempotency keys of created tickets, so a retried create returns the same ticket.
    created: HashMap<String, String>,
}

/// A running mock. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct MockTicketing {
    pub url: String,
    state: Arc<Mutex<State_>>,
    stop: Arc<tokio::sync::Notify>,
}

impl MockTicketing {
    /// Serves on `addr` (port 0 picks one) accepting `token`.
    pub async fn start(addr: SocketAddr, token: &str) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let state = Arc::new(Mutex::new(State_ {
            next_id: 1001,
            ..State_::default()
        }));
        state.lock().unwrap().tokens.insert(token.to_owned());
        let mock = Self {
            url,
            state,
            stop: Arc::new(tokio::sync::Notify::new()),
        };
        let app = router(mock.clone());
        let stop = mock.stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.notified().await })
                .await;
        });
        Ok(mock)
    }

    /// Adds a ticket, as if someone filed it; returns it.
    pub fn add_ticket(&self, title: &str, priority: &str, team: &str) -> Ticket {
        new_ticket(
            &mut self.state.lock().unwrap(),
            title,
            "",
            priority,
            team,
            None,
        )
    }

    pub fn tickets(&self) -> Vec<Ticket> {
        self.state.lock().unwrap().tickets.clone()
    }

    pub fn ticket(&self, id: &str) -> Option<Ticket> {
        self.state
            .lock()
            .unwrap()
            .tickets
            .iter()
            .find(|t| t.id == id)
            .cloned()
    }

    /// Answers the next request with `fault` (several calls queue several faults).
    pub fn inject(&self, fault: Fault) {
        self.state.lock().unwrap().faults.push_back(fault);
    }

    /// Stops accepting connections, as an API that went away.
    pub fn stop(&self) {
        self.stop.notify_one();
    }

    /// Stops accepting `token`, as a revoked key.
    pub fn revoke(&self, token: &str) {
        self.state.lock().unwrap().tokens.remove(token);
    }

    pub fn deny(&self, user: &str, action: &str) {
        self.state
            .lock()
            .unwrap()
            .denied
            .insert((user.to_owned(), action.to_owned()));
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Files a ticket every `every` with rotating priorities, for the demo.
    pub fn generate_tickets(&self, every: Duration) {
        let mock = self.clone();
        tokio::spawn(async move {
            let priorities = ["low", "medium", "high", "critical"];
            let titles = [
                "Printer on fire",
                "VPN drops every hour",
                "Cannot log in",
                "Dashboard is slow",
                "Disk almost full",
            ];
            for n in 0usize.. {
                tokio::time::sleep(every).await;
                mock.add_ticket(
                    titles[n % titles.len()],
                    priorities[n % priorities.len()],
                    "support",
                );
            }
        });
    }
}

fn new_ticket(
    state: &mut State_,
    title: &str,
    description: &str,
    priority: &str,
    team: &str,
    assignee: Option<String>,
) -> Ticket {
    let ticket = Ticket {
        id: format!("T-{}", state.next_id),
        title: title.to_owned(),
        description: description.to_owned(),
        priority: priority.to_owned(),
        team: team.to_owned(),
        assignee,
        status: "open".into(),
        created_at: Utc::now(),
    };
    state.next_id += 1;
    state.tickets.push(ticket.clone());
    ticket
}

fn router(mock: MockTicketing) -> Router {
    Router::new()
        .route("/{version}/health", get(health))
        .route("/{version}/me", get(me))
        .route("/{version}/teams", get(teams))
        .route("/{version}/teams/{team}/members", get(members))
        .route("/{version}/tickets", get(list_tickets).post(create_ticket))
        .route("/{version}/tickets/{id}", patch(update_ticket))
        .route("/{version}/permissions/{user}/{action}", get(permission))
        .layer(middleware::from_fn_with_state(mock.clone(), gate))
        .with_state(mock)
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// Records the request, applies injected faults, checks the token and the version.
async fn gate(State(mock): State<MockTicketing>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    let method = request.method().to_string();
    let version = path
        .split('/')
        .nth(1)
        .filter(|v| v.starts_with('v'))
        .map(str::to_owned);
    let token = header(&request, header::AUTHORIZATION.as_str())
        .and_then(|v| v.strip_prefix("Bearer ").map(str::to_owned));
    let idempotency_key = header(&request, "idempotency-key");
    let (fault, authorized) = mock.observe(
        Seen {
            method,
            path,
            version: version.clone(),
            idempotency_key,
        },
        token,
    );
    if let Some(fault) = fault {
        if let Some(delay) = fault.delay {
            tokio::time::sleep(delay).await;
        }
        if let Some(status) = fault.status {
            let mut response = error(
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                "injected failure",
            );
            if let Some(seconds) = fault.retry_after {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            }
            return response;
        }
    }
    if !matches!(version.as_deref(), Some("v1" | "v2")) {
        return error(StatusCode::NOT_FOUND, "unknown API version (v1 or v2)");
    }
    if !authorized {
        return error(StatusCode::UNAUTHORIZED, "missing or invalid bearer token");
    }
    let mut response = next.run(request).await;
    if let Some(version) = version.and_then(|v| HeaderValue::from_str(&v).ok()) {
        response.headers_mut().insert("x-api-version", version);
    }
    response
}

fn header(request: &Request, name: &str) -> Option<String> {
    request
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

impl MockTicketing {
    /// Records a request; returns the fault to answer it with and whether its token is known.
    fn observe(&self, seen: Seen, token: Option<String>) -> (Option<Fault>, bool) {
        let mut state = self.state.lock().unwrap();
        state.seen.push(seen);
        (
            state.faults.pop_front(),
            token.is_some_and(|t| state.tokens.contains(&t)),
        )
    }
}

async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn me() -> Json<Value> {
    Json(json!({ "user": "piecework-service-account" }))
}

/// A team: its id, its name, and its members' ids and names.
type Team = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

/// The teams tickets are filed for, and who is in each.
const TEAMS: [Team; 3] = [
    (
        "support",
        "Support",
        &[("u-ada", "Ada"), ("u-grace", "Grace")],
    ),
    (
        "platform",
        "Platform",
        &[("u-linus", "Linus"), ("u-ken", "Ken")],
    ),
    ("billing", "Billing", &[("u-joan", "Joan")]),
];

async fn teams() -> Json<Value> {
    let teams: Vec<Value> = TEAMS
        .iter()
        .map(|(id, name, _)| json!({ "id": id, "name": name }))
        .collect();
    Json(json!({ "teams": teams }))
}

async fn members(Path((_, team)): Path<(String, String)>) -> Response {
    match TEAMS.iter().find(|(id, _, _)| *id == team) {
        Some((_, _, people)) => {
            let members: Vec<Value> = people
                .iter()
                .map(|(id, name)| json!({ "id": id, "name": name }))
                .collect();
            Json(json!({ "members": members })).into_response()
        }
        None => error(StatusCode::NOT_FOUND, &format!("no team `{team}`")),
    }
}

#[derive(Deserialize)]
struct ListParams {
    team: Option<String>,
    priority: Option<String>,
    limit: Option<usize>,
    /// Only tickets older than this one: the next page.
    before: Option<String>,
}

async fn list_tickets(
    State(mock): State<MockTicketing>,
    Query(params): Query<ListParams>,
) -> Json<Value> {
    let state = mock.state.lock().unwrap();
    let tickets: Vec<&Ticket> = state
        .tickets
        .iter()
        .rev()
        .skip_while(|t| params.before.as_ref().is_some_and(|id| &t.id != id))
        .skip(usize::from(params.before.is_some()))
        .filter(|t| params.team.as_ref().is_none_or(|team| &t.team == team))
        .filter(|t| params.priority.as_ref().is_none_or(|p| &t.priority == p))
        .take(params.limit.unwrap_or(50))
        .collect();
    Json(json!({ "tickets": tickets }))
}

#[derive(Deserialize)]
struct NewTicket {
    title: String,
    description: String,
    priority: String,
    #[serde(default)]
    team: Option<String>,
    #[serde(default)]
    assignee: Option<String>,
}

async fn create_ticket(
    State(mock): State<MockTicketing>,
    Path(version): Path<String>,
    headers: axum::http::HeaderMap,
    Json(body): Json<NewTicket>,
) -> Response {
    if body.title.trim().is_empty() {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "title must not be empty");
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut state = mock.state.lock().unwrap();
    let existing = key.as_ref().and_then(|k| state.created.get(k)).cloned();
    let ticket = match existing.and_then(|id| state.tickets.iter().find(|t| t.id == id).cloned()) {
        Some(ticket) => ticket,
        None => {
            let team = body.team.unwrap_or_else(|| "support".into());
            let ticket = new_ticket(
                &mut state,
                &body.title,
                &body.description,
                &body.priority,
                &team,
                body.assignee,
            );
            if let Some(key) = key {
                state.created.insert(key, ticket.id.clone());
            }
            ticket
        }
    };
    let url = format!("{}/{version}/tickets/{}", mock.url, ticket.id);
    (
        StatusCode::CREATED,
        Json(json!({ "id": ticket.id, "created_at": ticket.created_at, "url": url })),
    )
        .into_response()
}

#[derive(Deserialize)]
struct TicketUpdate {
    assignee: Option<String>,
    status: Option<String>,
}

async fn update_ticket(
    State(mock): State<MockTicketing>,
    Path((_, id)): Path<(String, String)>,
    Json(body): Json<TicketUpdate>,
) -> Response {
    let mut state = mock.state.lock().unwrap();
    let Some(ticket) = state.tickets.iter_mut().find(|t| t.id == id) else {
        return error(StatusCode::NOT_FOUND, "no such ticket");
    };
    if let Some(assignee) = body.assignee {
        ticket.assignee = Some(assignee);
    }
    if let Some(status) = body.status {
        ticket.status = status;
    }
    Json(json!(ticket)).into_response()
}

async fn permission(
    State(mock): State<MockTicketing>,
    Path((_, user, action)): Path<(String, String, String)>,
) -> Json<Value> {
    let allowed = !mock.state.lock().unwrap().denied.contains(&(user, action));
    Json(json!({ "allowed": allowed }))
}
