//! Route handlers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::Extension;
use axum::extract::{DefaultBodyLimit, FromRequestParts, MatchedPath, Request, State};
use axum::handler::Handler as _;
use axum::http::Method;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use bytes::Bytes;
use piecework_core::RunStatus;
use piecework_core::flow::{FlowDefinition, Format};
use piecework_core::run::new_run_id;
use piecework_runtime::webhooks;
use piecework_runtime::{Runtime, RuntimeError};
use piecework_sdk::{TriggerHandle, WebhookRequest};
use piecework_store::audit::AuditQuery;
use piecework_store::{RunCursor, RunQuery};
use piecework_telemetry::metrics::{
    self, HttpLabels, HttpRouteLabels, TriggerKind, WebhookRefusal, WebhookRefusedLabels,
};
use piecework_telemetry::propagation;
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::Instrument as _;
use tracing::field::Empty;

use crate::access::{Access::*, Authorized, RouteInfo, Routes};
use crate::error::ApiError;
use crate::{ApiConfig, answers};
use piecework_core::access::Permission;

const GET: Method = Method::GET;
const POST: Method = Method::POST;
const DELETE: Method = Method::DELETE;

#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) runtime: Arc<Runtime>,
    pub(crate) config: Arc<ApiConfig>,
    pub(crate) limits: Arc<crate::limits::WebhookLimits>,
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// axum's `Query`, answering a bad query string with the API's JSON error.
pub(crate) struct Query<T>(pub(crate) T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| Query(value))
            .map_err(|e| ApiError::BadRequest(e.body_text()))
    }
}

/// The request body, answering one over the route's limit (or unreadable) with the API's
/// JSON error instead of axum's plain text.
pub(crate) struct Body(pub(crate) Bytes);

impl<S: Send + Sync> axum::extract::FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(request, state)
            .await
            .map(Body)
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::TooLarge(
                        "the request body is over this route's limit (see [api] in the configuration)"
                            .into(),
                    )
                } else {
                    ApiError::BadRequest(e.body_text())
                }
            })
    }
}

/// axum's `Path`, answering a malformed path parameter with the API's JSON error.
pub(crate) struct Path<T>(pub(crate) T);

impl<T: serde::de::DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| Path(value))
            .map_err(|e| ApiError::BadRequest(e.body_text()))
    }
}

/// The API's routes.
pub fn router(runtime: Arc<Runtime>, config: ApiConfig) -> Router {
    let (routes, _) = all_routes(&config);
    let request_timeout = config.request_timeout;
    let limits =
        crate::limits::WebhookLimits::new(config.webhook_rate, config.webhook_rate_per_flow);
    let state = AppState {
        runtime,
        config: Arc::new(config),
        limits: Arc::new(limits),
    };
    routes
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(middleware::from_fn(move |request, next| {
            crate::server::limit_request_time(request_timeout, request, next)
        }))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(Extension(state.clone()))
        .with_state(state)
}

/// The types requests are read into, as the OpenAPI document describes them.
pub(crate) mod requests {
    pub(crate) use super::{
        AuditParams, CreateApiKey, ResumeRun, RunsParams, SaveConnection, StartRun, StatsParams,
        UpgradeRequest,
    };

    /// `GET /v1/runs/stats`: the listing's filters, without paging.
    #[derive(schemars::JsonSchema)]
    #[allow(dead_code)] // described, not read: the handler reads `RunsParams` and refuses the rest
    pub(crate) struct RunStatsParams {
        flow: Option<String>,
        /// RFC 3339 time, or a duration back from now (`15m`, `2h`).
        since: Option<String>,
        until: Option<String>,
        /// What started them: `webhook`, `schedule`, `api`, `flow`.
        trigger: Option<String>,
    }

    /// `GET /v1/pieces/{name}/props/{prop}/options`: which member's prop, with which
    /// connection; the member's other props so far as `input` (a JSON object) or as further
    /// parameters.
    #[derive(schemars::JsonSchema)]
    #[allow(dead_code)] // described, not read: the handler reads every parameter as text
    pub(crate) struct OptionsParams {
        /// The action whose prop it is (or `trigger`).
        action: Option<String>,
        /// The polling trigger whose prop it is (or `action`).
        trigger: Option<String>,
        /// The connection the options are loaded with.
        connection: Option<String>,
        /// The piece's version (default: the newest).
        version: Option<String>,
        /// The member's other props given so far, as a JSON object.
        input: Option<String>,
    }
}

/// Every route with its access policy (see [`crate::access`]).
pub(crate) fn all_routes(config: &ApiConfig) -> (Router<AppState>, Vec<RouteInfo>) {
    use Permission::*;
    let v1 = Routes::new("/v1")
        .merge(crate::pieces::routes(config))
        .add(GET, "/flows", Needs(Read), list_flows)
        .add(POST, "/flows", Needs(ManageFlows), apply_flow)
        .add(GET, "/flows/{id}", Needs(Read), get_flow)
        .add(
            GET,
            "/flows/{id}/versions/{version}",
            Needs(Read),
            get_flow_version,
        )
        .add(POST, "/flows/{id}/enable", Needs(ToggleFlows), enable_flow)
        .add(
            POST,
            "/flows/{id}/disable",
            Needs(ToggleFlows),
            disable_flow,
        )
        .add(
            POST,
            "/flows/{id}/upgrade",
            Needs(ManageFlows),
            upgrade_flow,
        )
        .add(POST, "/flows/{id}/runs", Needs(StartRuns), start_manual_run)
        .add(
            GET,
            "/flows/{id}/webhook-secret",
            Needs(ReadSecrets),
            read_webhook_secret,
        )
        .add(
            POST,
            "/flows/{id}/webhook-secret/rotate",
            Needs(ReadSecrets),
            rotate_webhook_secret,
        )
        .add(GET, "/runs", Needs(Read), list_runs)
        .add(GET, "/runs/stats", Needs(Read), run_stats)
        .add(GET, "/runs/{id}", Needs(Read), get_run)
        .add(POST, "/runs/{id}/cancel", Needs(OperateRuns), cancel_run)
        .add(POST, "/runs/{id}/retry", Needs(OperateRuns), retry_run)
        .add(POST, "/runs/{id}/resume", Needs(OperateRuns), resume_run)
        .add(GET, "/audit", Needs(Read), list_audit)
        .add(GET, "/whoami", Needs(Read), whoami)
        .add(GET, "/stats", Needs(Read), stats)
        .add(GET, "/connections", Needs(Read), list_connections)
        .add(
            POST,
            "/connections",
            Needs(ManageConnections),
            save_connection,
        )
        .add(GET, "/connections/{name}", Needs(Read), get_connection)
        .add(
            DELETE,
            "/connections/{name}",
            Needs(ManageConnections),
            delete_connection,
        )
        .add(POST, "/keys/rotate", Needs(ManageKeys), rotate_keys)
        .add(GET, "/api-keys", Needs(ManageKeys), list_api_keys)
        .add(POST, "/api-keys", Needs(ManageKeys), create_api_key)
        .add(
            DELETE,
            "/api-keys/{name}",
            Needs(ManageKeys),
            revoke_api_key,
        )
        .add(
            POST,
            "/webhooks/{flow}",
            Public,
            webhook.layer(DefaultBodyLimit::max(config.max_webhook_bytes)),
        )
        .add(
            POST,
            "/webhooks/{flow}/sync",
            Public,
            webhook_sync.layer(DefaultBodyLimit::max(config.max_webhook_bytes)),
        )
        .add(
            POST,
            "/resume/{token}",
            Public,
            resume_by_url.layer(DefaultBodyLimit::max(config.max_webhook_bytes)),
        );
    let (v1, mut table) = v1.into_parts();
    let (top, top_table) = Routes::new("")
        .add(GET, "/healthz", Public, healthz)
        .add(GET, "/readyz", Public, readyz)
        .add(GET, "/metrics", Needs(Read), metrics)
        .add(GET, "/openapi.json", Public, openapi)
        .add(GET, "/", Public, crate::console::index)
        .add(GET, "/console/app.js", Public, crate::console::app)
        .add(GET, "/console/style.css", Public, crate::console::style)
        .into_parts();
    table.extend(top_table);
    (top.nest("/v1", v1), table)
}

/// Runs every request in a server span (a child of the caller's `traceparent`, if any) and
/// counts it by method, route pattern and status.
async fn observe(
    State(state): State<AppState>,
    matched: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    let route = matched
        .as_ref()
        .map_or("unmatched", |m| m.as_str())
        .to_owned();
    let method = request.method().as_str().to_owned();
    let span = tracing::info_span!(
        "request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = %method,
        http.route = %route,
        url.path = %request.uri().path(),
        http.response.status_code = Empty,
    );
    let incoming: Vec<(String, String)> = [propagation::TRACEPARENT, propagation::TRACESTATE]
        .into_iter()
        .filter_map(|name| {
            let value = request.headers().get(name)?.to_str().ok()?;
            Some((name.to_owned(), value.to_owned()))
        })
        .collect();
    propagation::set_parent(&span, &incoming);
    let started = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    let metrics = &state.runtime.metrics;
    metrics
        .http_request_duration
        .get_or_create(&HttpRouteLabels {
            method: method.clone(),
            route: route.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    metrics
        .http_requests
        .get_or_create(&HttpLabels {
            method,
            route,
            status: status.as_u16(),
        })
        .inc();
    response
}

/// Prometheus scrape with a key (the labels name flows): adoption is counted from the enabled
/// flows at scrape time. Prometheus scrapes the health port instead, without a key.
async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        encode_metrics(&state.runtime).await,
    )
        .into_response()
}

/// The api's exposition, with adoption counted from the enabled flows now.
pub async fn encode_metrics(runtime: &Runtime) -> String {
    if let Err(err) = runtime.refresh_adoption().await {
        tracing::warn!(error = %err, "could not count enabled flows per piece for /metrics");
    }
    runtime.metrics.encode()
}

/// `GET /v1/whoami`: the caller's key name and role (the console asks, to show what it may do).
async fn whoami(Extension(caller): Authorized) -> Json<answers::WhoAmI> {
    let permissions = piecework_core::access::Permission::ALL
        .into_iter()
        .filter(|p| caller.role.may(*p))
        .collect();
    Json(answers::WhoAmI {
        name: caller.name.clone(),
        role: caller.role,
        permissions,
    })
}

/// `GET /v1/stats` filter.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct StatsParams {
    /// RFC 3339 time, or a duration back from now (`15m`, `24h`); default `1h`.
    since: Option<String>,
}

/// `GET /v1/stats?since=1h`: executions, error rates and latencies per flow and per piece.
async fn stats(
    State(state): State<AppState>,
    Query(params): Query<StatsParams>,
) -> ApiResult<Json<piecework_runtime::stats::Stats>> {
    let since = time_param("since", params.since.as_deref().or(Some("1h")))?
        .and_then(chrono::DateTime::from_timestamp_millis)
        .unwrap_or_default();
    Ok(Json(state.runtime.stats(since).await?))
}

/// `GET /openapi.json`: the API's OpenAPI 3.1 document, made once.
async fn openapi() -> Response {
    static DOCUMENT: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    Json(DOCUMENT.get_or_init(crate::openapi::document)).into_response()
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AppState>) -> Response {
    let (store, bus) = state.runtime.readiness().await;
    let body = answers::Readiness {
        store: store.as_deref().unwrap_or("ok").to_owned(),
        bus: bus.as_deref().unwrap_or("ok").to_owned(),
    };
    let status = if store.is_none() && bus.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

fn format_of(headers: &HeaderMap) -> Format {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if content_type.starts_with("application/json") {
        Format::Json
    } else {
        Format::Yaml
    }
}

/// Applies a flow sent as YAML (default) or JSON (`Content-Type: application/json`).
async fn apply_flow(
    State(state): State<AppState>,
    Extension(caller): Authorized,
    headers: HeaderMap,
    Body(body): Body,
) -> ApiResult<Response> {
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::BadRequest("flow is not UTF-8 text".into()))?;
    let definition = FlowDefinition::parse(text, format_of(&headers))?;
    let result = state
        .runtime
        .apply_flow(definition, &caller.actor())
        .await?;
    let applied = &result.applied;
    let status = if applied.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let body = answers::AppliedFlow {
        flow: applied.record.clone(),
        version: applied.version,
        created: applied.created,
        // A new flow's secret is shown this once; admins can read it again
        // (GET /v1/flows/{id}/webhook-secret).
        webhook: result.webhook_auth.map(|auth| answers::WebhookInfo {
            auth,
            secret: result.webhook_secret,
        }),
    };
    Ok((status, Json(body)).into_response())
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpgradeRequest {
    pub(crate) piece: String,
    #[serde(default)]
    pub(crate) to: Option<String>,
    #[serde(default)]
    pub(crate) force: bool,
}

/// Moves a flow's steps of one piece to a newer version, checked; `409` with what breaks.
async fn upgrade_flow(
    State(state): State<AppState>,
    Extension(caller): Authorized,
    Path(id): Path<String>,
    Body(body): Body,
) -> ApiResult<Json<Value>> {
    let request: UpgradeRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("upgrade request: {e}")))?;
    let to = request
        .to
        .as_deref()
        .map(semver::VersionReq::parse)
        .transpose()
        .map_err(|e| ApiError::BadRequest(format!("`to` is not a semver range: {e}")))?;
    let upgraded = state
        .runtime
        .upgrade_flow(&id, &request.piece, to, request.force, &caller.actor())
        .await?;
    Ok(Json(
        serde_json::to_value(upgraded).expect("upgrades serialize"),
    ))
}

async fn list_flows(State(state): State<AppState>) -> ApiResult<Json<answers::Flows>> {
    Ok(Json(answers::Flows {
        flows: state.runtime.flow_records().await?,
    }))
}

async fn get_flow(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let record = state
        .runtime
        .flow_record(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no flow `{id}`")))?;
    let latest = state
        .runtime
        .flow_version(&id, record.latest_version)
        .await?;
    let detail = answers::FlowDetail {
        flow: record,
        latest: latest.as_deref(),
    };
    Ok(Json(detail).into_response())
}

async fn get_flow_version(
    State(state): State<AppState>,
    Path((id, version)): Path<(String, u32)>,
) -> ApiResult<Response> {
    let found = state
        .runtime
        .flow_version(&id, version)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no version {version} of flow `{id}`")))?;
    Ok(Json(answers::FlowVersionDetail { version: &found }).into_response())
}

async fn enable_flow(
    state: State<AppState>,
    caller: Authorized,
    id: Path<String>,
) -> ApiResult<Json<answers::FlowState>> {
    set_enabled(state, caller, id, true).await
}

async fn disable_flow(
    state: State<AppState>,
    caller: Authorized,
    id: Path<String>,
) -> ApiResult<Json<answers::FlowState>> {
    set_enabled(state, caller, id, false).await
}

async fn set_enabled(
    State(state): State<AppState>,
    Extension(caller): Authorized,
    Path(id): Path<String>,
    enabled: bool,
) -> ApiResult<Json<answers::FlowState>> {
    let record = state
        .runtime
        .set_flow_enabled(&id, enabled, &caller.actor())
        .await?;
    Ok(Json(answers::FlowState { flow: record }))
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RunsParams {
    pub(crate) flow: Option<String>,
    pub(crate) status: Option<String>,
    /// RFC 3339 time, or a duration back from now (`15m`, `2h`).
    pub(crate) since: Option<String>,
    pub(crate) until: Option<String>,
    /// What started them: `webhook`, `schedule`, `api`, `flow`.
    pub(crate) trigger: Option<String>,
    /// The `next` of the page before.
    pub(crate) after: Option<String>,
    pub(crate) limit: Option<usize>,
}

impl RunsParams {
    /// The store's query for these parameters, with `limit` rows.
    fn query(&self, limit: usize) -> ApiResult<RunQuery> {
        let status = self
            .status
            .as_deref()
            .map(str::parse::<RunStatus>)
            .transpose()
            .map_err(ApiError::BadRequest)?;
        if let Some(trigger) = self.trigger.as_deref()
            && !matches!(trigger, "webhook" | "schedule" | "api" | "flow")
        {
            return Err(ApiError::BadRequest(format!(
                "trigger must be webhook, schedule, api or flow, not {trigger:?}"
            )));
        }
        let time = |name: &str, value: &Option<String>| {
            time_param(name, value.as_deref())
                .map(|ms| ms.and_then(chrono::DateTime::from_timestamp_millis))
        };
        Ok(RunQuery {
            flow_id: self.flow.clone(),
            status,
            since: time("since", &self.since)?,
            until: time("until", &self.until)?,
            started_by: self.trigger.clone(),
            after: self
                .after
                .as_deref()
                .map(str::parse)
                .transpose()
                .map_err(ApiError::BadRequest)?,
            limit,
        })
    }
}

/// A page of runs, newest first, and the cursor of the next (`null` at the end).
async fn list_runs(
    State(state): State<AppState>,
    Query(params): Query<RunsParams>,
) -> ApiResult<Json<answers::Runs>> {
    let limit = page_limit(params.limit, 50)?;
    let query = params.query(limit)?;
    let runs = state.runtime.runs(&query).await?;
    let next = (runs.len() == limit)
        .then(|| runs.last().map(|last| RunCursor::after(last).to_string()))
        .flatten();
    Ok(Json(answers::Runs { runs, next }))
}

/// How many runs are in each status, over the same filters as the listing.
async fn run_stats(
    State(state): State<AppState>,
    Query(params): Query<RunsParams>,
) -> ApiResult<Json<piecework_store::RunStats>> {
    if params.status.is_some() || params.after.is_some() || params.limit.is_some() {
        return Err(ApiError::BadRequest(
            "stats take flow, since, until and trigger; they count every status and page".into(),
        ));
    }
    let stats = state.runtime.run_stats(&params.query(1)?).await?;
    Ok(Json(stats))
}

async fn get_run(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<answers::RunDetail>> {
    let run = state
        .runtime
        .run(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no run `{id}`")))?;
    Ok(Json(answers::RunDetail { run }))
}

/// A listing's `limit`: 1 to 1000, `default` when absent.
fn page_limit(limit: Option<usize>, default: usize) -> ApiResult<usize> {
    match limit.unwrap_or(default) {
        limit @ 1..=1000 => Ok(limit),
        _ => Err(ApiError::BadRequest(
            "limit must be between 1 and 1000".into(),
        )),
    }
}

async fn cancel_run(
    State(state): State<AppState>,
    Extension(caller): Authorized,
    Path(id): Path<String>,
) -> ApiResult<Json<answers::RunDetail>> {
    let run = state.runtime.cancel_run(&id, &caller.actor()).await?;
    Ok(Json(answers::RunDetail { run }))
}

async fn retry_run(
    State(state): State<AppState>,
    Extension(caller): Authorized,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let run = state.runtime.retry_run(&id, &caller.actor()).await?;
    Ok((StatusCode::ACCEPTED, Json(answers::RunDetail { run })).into_response())
}

/// `POST /v1/runs/{id}/resume`: `{"step": "approval", "payload": {…}}` resumes a run waiting on
/// its wait step `step`; the payload (default `{}`) becomes the step's output.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResumeRun {
    pub(crate) step: String,
    #[serde(default = "empty_object")]
    pub(crate) payload: Value,
}

async fn resume_run(
    State(state): State<AppState>,
    Extension(caller): Authorized,
    Path(id): Path<String>,
    Body(body): Body,
) -> ApiResult<Response> {
    let request: ResumeRun = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("expected {{\"step\", \"payload\"}}: {e}")))?;
    let run = state
        .runtime
        .resume_waiting_run(&id, &request.step, request.payload, &caller.actor())
        .await?;
    Ok((StatusCode::ACCEPTED, Json(answers::RunDetail { run })).into_response())
}

/// `POST /v1/resume/{token}`: a run's resume URL (`{{ run.resume_url }}`), for whoever holds
/// it — no API key, the token is the proof. The JSON body (none: `{}`) becomes the output of
/// the webhook wait the run waits on. A token that is not genuine gets 404.
async fn resume_by_url(
    State(state): State<AppState>,
    Path(token): Path<String>,
    Body(body): Body,
) -> ApiResult<Response> {
    let payload = if body.is_empty() {
        empty_object()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("the body is not JSON: {e}")))?
    };
    let run = state.runtime.resume_by_token(&token, payload).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(answers::RunResumed {
            run_id: run.id,
            status: run.status,
        }),
    )
        .into_response())
}

/// `POST /v1/flows/{id}/runs`: `{"trigger": …}` (default `{}`) starts a run of the flow's
/// current version by hand, as the caller.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct StartRun {
    #[serde(default = "empty_object")]
    pub(crate) trigger: Value,
}

fn empty_object() -> Value {
    json!({})
}

async fn start_manual_run(
    State(state): State<AppState>,
    Extension(caller): Authorized,
    Path(id): Path<String>,
    Body(body): Body,
) -> ApiResult<Response> {
    let request: StartRun = if body.is_empty() {
        StartRun {
            trigger: empty_object(),
        }
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("expected {{\"trigger\": …}}: {e}")))?
    };
    let run_id = state
        .runtime
        .audited(
            &caller.actor(),
            "run.start",
            &format!("flow/{id}"),
            start_run_by_hand(&state, &caller, &id, request.trigger),
        )
        .await?;
    Ok((StatusCode::ACCEPTED, Json(answers::RunStarted { run_id })).into_response())
}

async fn start_run_by_hand(
    state: &AppState,
    caller: &piecework_runtime::access::Caller,
    flow_id: &str,
    trigger: Value,
) -> ApiResult<String> {
    let runtime = &state.runtime;
    let record = runtime
        .flow_record(flow_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no flow `{flow_id}`")))?;
    if !record.enabled {
        return Err(ApiError::Conflict(format!("flow `{flow_id}` is disabled")));
    }
    let flow = runtime
        .flow_version(flow_id, record.latest_version)
        .await?
        .ok_or_else(|| {
            ApiError::Internal(format!(
                "flow `{flow_id}` has no version {}",
                record.latest_version
            ))
        })?;
    let run_id = new_run_id();
    runtime
        .start_run_as(
            &flow,
            run_id.clone(),
            trigger,
            TriggerKind::manual,
            caller.principal(),
        )
        .await?;
    Ok(run_id)
}

/// `GET /v1/flows/{id}/webhook-secret` (admins): the secret callers sign with. Audited.
async fn read_webhook_secret(
    State(state): State<AppState>,
    Extension(caller): Authorized,
    Path(id): Path<String>,
) -> ApiResult<Json<answers::WebhookSecret>> {
    let read = async {
        state.runtime.webhook_secret(&id).await?.ok_or_else(|| {
            ApiError::NotFound(format!(
                "flow `{id}` has no webhook secret (it is not a webhook flow with `auth: hmac` or `auth: token`)"
            ))
        })
    };
    let secret = state
        .runtime
        .audited(
            &caller.actor(),
            "flow.webhook_secret.read",
            &format!("flow/{id}"),
            read,
        )
        .await?;
    Ok(Json(answers::WebhookSecret { flow: id, secret }))
}

/// `POST /v1/flows/{id}/webhook-secret/rotate` (admins): a new secret, effective at once.
async fn rotate_webhook_secret(
    State(state): State<AppState>,
    Extension(caller): Authorized,
    Path(id): Path<String>,
) -> ApiResult<Json<answers::WebhookSecret>> {
    let secret = state
        .runtime
        .rotate_webhook_secret(&id, &caller.actor())
        .await?;
    Ok(Json(answers::WebhookSecret { flow: id, secret }))
}

/// `POST /v1/api-keys`: `{"name", "role"}`; the answer holds the key, shown this once.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateApiKey {
    /// 1–64 lowercase letters, digits and `-`, starting with a letter.
    #[schemars(pattern(r"^[a-z][a-z0-9-]*$"), length(min = 1, max = 64))]
    pub(crate) name: String,
    /// Parsed by the handler, which names the roles when it is none of them.
    #[schemars(with = "piecework_core::access::Role")]
    pub(crate) role: String,
}

async fn create_api_key(
    State(state): State<AppState>,
    Extension(caller): Authorized,
    Body(body): Body,
) -> ApiResult<Response> {
    let request: CreateApiKey = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("expected {{\"name\", \"role\"}}: {e}")))?;
    let role = request
        .role
        .parse::<piecework_core::access::Role>()
        .map_err(ApiError::BadRequest)?;
    let (info, key) = state
        .runtime
        .create_api_key(&request.name, role, &caller.actor())
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(answers::ApiKeyCreated { api_key: info, key }),
    )
        .into_response())
}

/// `POST /v1/keys/rotate`: re-seals every connection and webhook secret under the current
/// encryption key; answers what it did and which old keys are still needed.
async fn rotate_keys(
    State(state): State<AppState>,
    Extension(caller): Authorized,
) -> ApiResult<Json<piecework_runtime::rotation::Rotation>> {
    let rotation = state.runtime.rotate_keys(&caller.actor()).await?;
    Ok(Json(rotation))
}

async fn list_api_keys(State(state): State<AppState>) -> ApiResult<Json<answers::ApiKeys>> {
    Ok(Json(answers::ApiKeys {
        api_keys: state.runtime.list_api_keys().await?,
    }))
}

async fn revoke_api_key(
    State(state): State<AppState>,
    Extension(caller): Authorized,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    state.runtime.revoke_api_key(&name, &caller.actor()).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/connections`: `{"name", "piece", "values"}`.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SaveConnection {
    /// 1–100 lowercase letters, digits, `-` and `_`.
    #[schemars(pattern(r"^[a-z0-9_-]+$"), length(min = 1, max = 100))]
    pub(crate) name: String,
    /// The piece the connection is for (its auth says what `values` hold).
    pub(crate) piece: String,
    /// The connection's values, as the piece's auth describes them (`GET /v1/pieces/{name}`).
    pub(crate) values: Value,
}

/// Creates or replaces a connection. The answer never contains the values.
async fn save_connection(
    State(state): State<AppState>,
    Extension(caller): Authorized,
    Body(body): Body,
) -> ApiResult<Response> {
    // The body holds secrets: the parse error must not echo it (serde's messages do not).
    let request: SaveConnection = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!("expected {{\"name\", \"piece\", \"values\"}}: {e}"))
    })?;
    let info = state
        .runtime
        .save_connection(
            &request.name,
            &request.piece,
            request.values,
            &caller.actor(),
        )
        .await?;
    // A new connection was created and updated at the same instant.
    let status = if info.created_at == info.updated_at {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(answers::ConnectionDetail { connection: info })).into_response())
}

async fn list_connections(State(state): State<AppState>) -> ApiResult<Json<answers::Connections>> {
    Ok(Json(answers::Connections {
        connections: state.runtime.list_connections().await?,
    }))
}

async fn get_connection(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<answers::ConnectionDetail>> {
    let info = state
        .runtime
        .connection_info(&name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no connection `{name}`")))?;
    Ok(Json(answers::ConnectionDetail { connection: info }))
}

async fn delete_connection(
    State(state): State<AppState>,
    Extension(caller): Authorized,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    state
        .runtime
        .delete_connection(&name, &caller.actor())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/audit` filters: see [`AuditQuery`] for how they match.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditParams {
    pub(crate) after: Option<String>,
    pub(crate) limit: Option<usize>,
    /// RFC 3339 time, or a duration back from now (`15m`, `2h`).
    pub(crate) since: Option<String>,
    pub(crate) until: Option<String>,
    pub(crate) actor: Option<String>,
    pub(crate) action: Option<String>,
    pub(crate) resource: Option<String>,
    pub(crate) outcome: Option<String>,
}

/// Parses `since`/`until`: an RFC 3339 time or a duration back from now.
fn time_param(name: &str, value: Option<&str>) -> ApiResult<Option<i64>> {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    if let Ok(time) = chrono::DateTime::parse_from_rfc3339(value) {
        return Ok(Some(time.timestamp_millis()));
    }
    let ago = humantime::parse_duration(value).map_err(|_| {
        ApiError::BadRequest(format!(
            "{name} must be an RFC 3339 time (2026-11-25T10:00:00Z) or a duration back from now (15m), not {value:?}"
        ))
    })?;
    let ago = chrono::Duration::from_std(ago)
        .map_err(|_| ApiError::BadRequest(format!("{name} is too far back")))?;
    Ok(Some((chrono::Utc::now() - ago).timestamp_millis()))
}

async fn list_audit(
    State(state): State<AppState>,
    Query(params): Query<AuditParams>,
) -> ApiResult<Json<answers::AuditEntries>> {
    let limit = page_limit(params.limit, 100)?;
    if let Some(outcome) = params.outcome.as_deref()
        && !matches!(outcome, "success" | "failure")
    {
        return Err(ApiError::BadRequest(format!(
            "outcome must be success or failure, not {outcome:?}"
        )));
    }
    let query = AuditQuery {
        since_ms: time_param("since", params.since.as_deref())?,
        until_ms: time_param("until", params.until.as_deref())?,
        after: params.after,
        actor: params.actor,
        action: params.action,
        resource: params.resource,
        outcome: params.outcome,
        limit,
    };
    let page = state.runtime.query_audit(&query).await?;
    let entries = page
        .entries
        .into_iter()
        .map(|e| answers::AuditEntry {
            id: e.id,
            actor: e.event.actor,
            action: e.event.action,
            resource: e.event.resource,
            outcome: e.event.outcome,
            time: chrono::DateTime::from_timestamp_millis(e.event.time_unix_ms),
            duration_ms: e.event.duration_ms,
            error: (!e.event.error.is_empty()).then_some(e.event.error),
        })
        .collect();
    Ok(Json(answers::AuditEntries {
        entries,
        next: page.next,
        cursor: page.cursor,
    }))
}

/// What every refused webhook call gets — unknown, disabled, not a webhook flow, wrong
/// credentials alike — so that callers without the flow's secret learn nothing.
const NO_WEBHOOK: &str = "no such webhook";

/// Lets a webhook call in, or refuses it: counted by reason, logged at debug, not audited
/// (anonymous callers must not be able to flood the audit trail).
async fn admit(
    state: &AppState,
    flow_id: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> ApiResult<(
    Arc<piecework_core::FlowVersion>,
    Arc<dyn piecework_sdk::trigger::DynWebhook>,
)> {
    let runtime = &state.runtime;
    let limited = |reason: WebhookRefusal, retry_after| {
        runtime
            .metrics
            .webhook_refused
            .get_or_create(&WebhookRefusedLabels { reason })
            .inc();
        ApiError::TooManyRequests { retry_after }
    };
    state
        .limits
        .check_total()
        .map_err(|wait| limited(WebhookRefusal::rate_limited, wait))?;
    let refuse = |reason: WebhookRefusal| {
        runtime
            .metrics
            .webhook_refused
            .get_or_create(&WebhookRefusedLabels { reason })
            .inc();
        tracing::debug!(flow = flow_id, ?reason, "webhook call refused");
        ApiError::NotFound(NO_WEBHOOK.into())
    };
    let Some(record) = runtime.admission_record(flow_id).await? else {
        return Err(refuse(WebhookRefusal::unknown_flow));
    };
    let flow = runtime
        .flow_version(flow_id, record.latest_version)
        .await?
        .ok_or_else(|| {
            ApiError::Internal(format!(
                "flow `{flow_id}` has no version {}",
                record.latest_version
            ))
        })?;
    let trigger = &flow.definition.trigger;
    let piece = match flow.trigger_version() {
        Some(version) => runtime
            .catalog()
            .get_or_fetch(&trigger.piece, version)
            .await
            .map_err(ApiError::Unavailable)?,
        None => None,
    };
    let handle = piece.as_ref().and_then(|p| p.trigger(&trigger.trigger));
    let Some(TriggerHandle::Webhook(webhook)) = handle else {
        return Err(refuse(WebhookRefusal::not_webhook));
    };
    let webhook = webhook.clone();
    if !record.enabled {
        return Err(refuse(WebhookRefusal::disabled));
    }
    let secret = if trigger.auth.unwrap_or_default().needs_secret() {
        runtime.webhook_secret(flow_id).await?
    } else {
        None
    };
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let now = chrono::Utc::now().timestamp();
    if let Err(refusal) = webhooks::check_call(trigger, secret.as_deref(), header, body, now) {
        return Err(refuse(match refusal {
            webhooks::Refusal::Missing => WebhookRefusal::missing,
            webhooks::Refusal::Stale => WebhookRefusal::stale,
            webhooks::Refusal::Wrong => WebhookRefusal::wrong,
        }));
    }
    state
        .limits
        .check_flow(flow_id)
        .map_err(|wait| limited(WebhookRefusal::flow_rate_limited, wait))?;
    runtime.remember_admission(&record);
    Ok((flow, webhook))
}

/// The webhook call as a trigger sees it.
fn webhook_request(
    headers: &HeaderMap,
    query: BTreeMap<String, String>,
    body: &Bytes,
) -> ApiResult<WebhookRequest> {
    Ok(WebhookRequest {
        method: "POST".into(),
        headers: headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect(),
        query,
        body: parse_body(headers, body)?,
    })
}

fn parse_body(headers: &HeaderMap, body: &Bytes) -> ApiResult<Value> {
    if body.is_empty() {
        return Ok(Value::Null);
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if content_type.contains("json") {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("body is not valid JSON: {e}")))
    } else {
        Ok(Value::String(String::from_utf8_lossy(body).into_owned()))
    }
}

async fn webhook(
    State(state): State<AppState>,
    Path(flow_id): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    Body(body): Body,
) -> ApiResult<Response> {
    let started = audited_webhook(&state, &flow_id, &headers, query, body).await?;
    let answer = answers::WebhookAccepted {
        run_id: started.run_ids.first().cloned(),
        run_ids: started.run_ids,
        // The flow debounces: the run starts once the calls stop.
        held_until: started.held_until,
        trace_id: propagation::trace_id_of(&tracing::Span::current()),
    };
    Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
}

/// Admits the call and starts the webhook's runs (audited by the runtime).
async fn audited_webhook(
    state: &AppState,
    flow_id: &str,
    headers: &HeaderMap,
    query: BTreeMap<String, String>,
    body: Bytes,
) -> ApiResult<piecework_runtime::webhooks::WebhookRuns> {
    let request = webhook_request(headers, query, &body)?;
    let mut fresh = false;
    loop {
        let (flow, webhook) = admit(state, flow_id, headers, &body).await?;
        match state
            .runtime
            .start_webhook_runs(&flow, webhook.as_ref(), &request)
            .await
        {
            // Admitted on a cached record that changed: once more from the current one.
            Err(RuntimeError::StaleAdmission(_)) if !fresh => fresh = true,
            result => return Ok(result?),
        }
    }
}

/// Starts a run and answers with the flow's response once it finishes: the output of a
/// `webhook_response` action (`{status, headers, body}`), else the last step's output. The
/// answer comes with the run's finish notification; the run is not read.
async fn webhook_sync(
    State(state): State<AppState>,
    Path(flow_id): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    Body(body): Body,
) -> ApiResult<Response> {
    let request = webhook_request(&headers, query, &body)?;
    let mut fresh = false;
    let (run_id, watch) = loop {
        let (flow, webhook) = admit(&state, &flow_id, &headers, &body).await?;
        match state
            .runtime
            .start_sync_webhook_run(&flow, webhook.as_ref(), &request)
            .await
        {
            // Admitted on a cached record that changed: once more from the current one.
            Err(RuntimeError::StaleAdmission(_)) if !fresh => fresh = true,
            result => break result?,
        }
    };
    let Some(ended) = watch
        .ended(state.config.sync_timeout)
        .await
        .map_err(ApiError::from)?
    else {
        return still_going(&state, &run_id).await;
    };
    match ended.status {
        RunStatus::Succeeded => Ok(match ended.response {
            Some(response) => flow_response(&response),
            None => {
                let mut response = Json(ended.output.unwrap_or(Value::Null)).into_response();
                insert_run_id(&mut response, &run_id);
                response
            }
        }),
        _ => {
            let body = answers::ErrorBody {
                error: answers::ErrorDetail {
                    code: "run_failed".into(),
                    message: ended.error.unwrap_or_default(),
                    details: None,
                    run_id: Some(run_id),
                },
            };
            Ok((StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response())
        }
    }
}

/// The answer to a synchronous call whose run did not finish within `sync_timeout` (or
/// whose first job waits in the outbox while NATS is away): `202` with the run's id and
/// status, where to follow it (`Location`, `status_url`: the run, for a key with the viewer
/// role) and when to look again (`Retry-After`).
async fn still_going(state: &AppState, run_id: &str) -> ApiResult<Response> {
    let status = match state.runtime.run(run_id).await {
        Ok(Some(run)) => run.status,
        // Accepted, so a run that cannot be read now is still one the caller can follow.
        Ok(None) | Err(_) => RunStatus::Running,
    };
    let status_url = format!("/v1/runs/{run_id}");
    let body = answers::StillRunning {
        run_id: run_id.to_owned(),
        run_ids: vec![run_id.to_owned()],
        status,
        message: format!(
            "the run did not finish within {}; it goes on: follow it at {status_url}",
            humantime::format_duration(state.config.sync_timeout)
        ),
        status_url: status_url.clone(),
    };
    let mut response = (StatusCode::ACCEPTED, Json(body)).into_response();
    insert_run_id(&mut response, run_id);
    let headers = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(&status_url) {
        headers.insert(axum::http::header::LOCATION, location);
    }
    headers.insert(
        axum::http::header::RETRY_AFTER,
        HeaderValue::from_static("1"),
    );
    Ok(response)
}

fn insert_run_id(response: &mut Response, run_id: &str) {
    if let Ok(value) = HeaderValue::from_str(run_id) {
        response.headers_mut().insert("x-piecework-run-id", value);
    }
}

/// Builds the HTTP response a `webhook_response` action described.
fn flow_response(response: &Value) -> Response {
    let status = response
        .get("status")
        .and_then(Value::as_u64)
        .and_then(|s| u16::try_from(s).ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let body = response.get("body").cloned().unwrap_or(Value::Null);
    let mut out = match body {
        Value::String(text) => (status, text).into_response(),
        other => (status, Json(other)).into_response(),
    };
    if let Some(headers) = response.get("headers").and_then(Value::as_object) {
        for (name, value) in headers {
            let (Ok(name), Some(Ok(value))) = (
                HeaderName::try_from(name.as_str()),
                value.as_str().map(HeaderValue::from_str),
            ) else {
                continue;
            };
            out.headers_mut().insert(name, value);
        }
    }
    out
}
