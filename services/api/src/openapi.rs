//! The API's OpenAPI 3.1 document, generated from the code: the route table
//! (`routes::all_routes`: every path, method and access policy), the types the
//! handlers answer with ([`crate::answers`]) and read (their request bodies and query
//! parameters), all described by `schemars` as JSON Schema 2020-12 — OpenAPI 3.1's own
//! dialect. What is written by hand is each operation's summary and which types it uses;
//! a test checks that every route has one, and `docs/openapi.json` is this document,
//! kept in sync by another.
//!
//! Served at `GET /openapi.json`.

use axum::http::Method;
use piecework_core::access::{Permission, Role};
use schemars::generate::{SchemaGenerator, SchemaSettings};
use schemars::{JsonSchema, Schema};
use serde_json::{Map, Value, json};

use crate::access::{Access, RouteInfo};
use crate::answers;
use crate::routes::requests;

/// Where the schemas of recursive request types live (a JSON pointer into the document).
const REQUEST_SCHEMAS: &str = "/x-request-schemas";

/// Makes the schema of a type (a reference into `components/schemas` for named types).
type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

fn schema<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    generator.subschema_for::<T>()
}

/// What an operation reads besides its path.
#[derive(Clone, Copy)]
enum Input {
    Nothing,
    /// A JSON body of this type.
    Json(SchemaFn),
    /// A JSON body of this type, which may be left out.
    OptionalBody(SchemaFn),
    /// Any JSON (a webhook's payload, a resume payload).
    AnyJson,
    /// A flow definition, as YAML or JSON.
    Flow,
    /// A `.piece.tgz`.
    Bundle,
}

/// One answer of an operation.
#[derive(Clone, Copy)]
enum Answer {
    /// A JSON body of this type.
    Reply(u16, &'static str, SchemaFn),
    /// Any JSON body the flow decides (a synchronous webhook's response).
    FlowDefined(&'static str),
    /// Text of this media type.
    Text(u16, &'static str, &'static str),
    Empty(u16, &'static str),
}

struct Operation {
    summary: &'static str,
    tag: &'static str,
    query: Option<SchemaFn>,
    input: Input,
    answers: &'static [Answer],
}

const fn op(
    summary: &'static str,
    tag: &'static str,
    input: Input,
    answers: &'static [Answer],
) -> Operation {
    Operation {
        summary,
        tag,
        query: None,
        input,
        answers,
    }
}

const fn op_query(
    summary: &'static str,
    tag: &'static str,
    query: SchemaFn,
    answers: &'static [Answer],
) -> Operation {
    Operation {
        summary,
        tag,
        query: Some(query),
        input: Input::Nothing,
        answers,
    }
}

/// The hand-written part of each route's description: what it does and which types it
/// reads and answers. `None` for a route nobody described (a test fails on it).
fn describe(method: &Method, path: &str) -> Option<Operation> {
    use Answer::*;
    use Input::{AnyJson, Bundle, Flow, Json, Nothing, OptionalBody};
    let get = method == Method::GET;
    let post = method == Method::POST;
    let delete = method == Method::DELETE;
    Some(match path {
        "/healthz" if get => op(
            "Liveness",
            "health",
            Nothing,
            &[Text(200, "ok", "text/plain")],
        ),
        "/readyz" if get => op(
            "Readiness: the store and the bus answer",
            "health",
            Nothing,
            &[
                Reply(200, "ready", schema::<answers::Readiness>),
                Reply(503, "a backend is down", schema::<answers::Readiness>),
            ],
        ),
        "/metrics" if get => op(
            "Prometheus metrics",
            "health",
            Nothing,
            &[Text(
                200,
                "the OpenMetrics text exposition",
                "application/openmetrics-text",
            )],
        ),
        "/" if get => op(
            "The web console",
            "console",
            Nothing,
            &[Text(200, "the console's page", "text/html")],
        ),
        "/console/app.js" if get => op(
            "The console's script",
            "console",
            Nothing,
            &[Text(200, "JavaScript", "text/javascript")],
        ),
        "/console/style.css" if get => op(
            "The console's style sheet",
            "console",
            Nothing,
            &[Text(200, "CSS", "text/css")],
        ),
        "/openapi.json" if get => op(
            "This document",
            "health",
            Nothing,
            &[Reply(200, "OpenAPI 3.1", schema::<Value>)],
        ),
        "/v1/pieces" if get => op(
            "List pieces (the newest version of each)",
            "pieces",
            Nothing,
            &[Reply(
                200,
                "the catalog",
                schema::<answers::Pieces<'static>>,
            )],
        ),
        "/v1/pieces" if post => op(
            "Publish a bundle to the registry",
            "pieces",
            Bundle,
            &[
                Reply(201, "published", schema::<answers::PiecePublished>),
                Reply(200, "already published", schema::<answers::PiecePublished>),
            ],
        ),
        "/v1/pieces/{name}" if get => op(
            "A piece's newest version and the versions served",
            "pieces",
            Nothing,
            &[Reply(
                200,
                "the piece",
                schema::<answers::PieceDetail<'static>>,
            )],
        ),
        "/v1/pieces/{name}/docs" if get => op(
            "A piece's documentation, as `piece docs` writes it",
            "pieces",
            Nothing,
            &[Text(200, "Markdown", "text/markdown")],
        ),
        "/v1/stats" if get => op_query(
            "Executions, error rates and latencies per flow and per piece",
            "runs",
            schema::<requests::StatsParams>,
            &[Reply(
                200,
                "the figures",
                schema::<piecework_runtime::stats::Stats>,
            )],
        ),
        "/v1/whoami" if get => op(
            "The caller's key and role",
            "keys",
            Nothing,
            &[Reply(200, "the caller", schema::<answers::WhoAmI>)],
        ),
        "/v1/pieces/{name}/versions" if get => op(
            "Every version of a piece, with where it comes from",
            "pieces",
            Nothing,
            &[Reply(200, "the versions", schema::<answers::PieceVersions>)],
        ),
        "/v1/pieces/{name}/versions/{version}" if get => op(
            "One version of a piece",
            "pieces",
            Nothing,
            &[Reply(
                200,
                "the version",
                schema::<answers::PieceVersion<'static>>,
            )],
        ),
        "/v1/pieces/{name}/versions/{version}" if delete => op(
            "Yank a published version (refused while an enabled flow uses it)",
            "pieces",
            Nothing,
            &[Reply(200, "yanked", schema::<answers::PieceYanked>)],
        ),
        "/v1/pieces/{name}/props/{prop}/options" if get => op_query(
            "The options of a dynamic dropdown, loaded by the piece",
            "pieces",
            schema::<requests::OptionsParams>,
            &[Reply(
                200,
                "the options",
                schema::<piecework_sdk::DropdownOptions>,
            )],
        ),
        "/v1/flows" if get => op(
            "List flows",
            "flows",
            Nothing,
            &[Reply(200, "the flows", schema::<answers::Flows>)],
        ),
        "/v1/flows" if post => op(
            "Apply a flow (YAML, or JSON with `Content-Type: application/json`)",
            "flows",
            Flow,
            &[
                Reply(201, "a new version", schema::<answers::AppliedFlow>),
                Reply(200, "unchanged", schema::<answers::AppliedFlow>),
            ],
        ),
        "/v1/flows/{id}" if get => op(
            "A flow and its latest version",
            "flows",
            Nothing,
            &[Reply(
                200,
                "the flow",
                schema::<answers::FlowDetail<'static>>,
            )],
        ),
        "/v1/flows/{id}/versions/{version}" if get => op(
            "One version of a flow",
            "flows",
            Nothing,
            &[Reply(
                200,
                "the version",
                schema::<answers::FlowVersionDetail<'static>>,
            )],
        ),
        "/v1/flows/{id}/enable" if post => op(
            "Enable a flow (runs its trigger's enable hook)",
            "flows",
            Nothing,
            &[Reply(200, "enabled", schema::<answers::FlowState>)],
        ),
        "/v1/flows/{id}/disable" if post => op(
            "Disable a flow (runs its trigger's disable hook)",
            "flows",
            Nothing,
            &[Reply(200, "disabled", schema::<answers::FlowState>)],
        ),
        "/v1/flows/{id}/upgrade" if post => op(
            "Move a flow's steps of one piece to a newer version, checked",
            "flows",
            Json(schema::<requests::UpgradeRequest>),
            &[Reply(
                200,
                "upgraded",
                schema::<piecework_runtime::upgrade::Upgraded>,
            )],
        ),
        "/v1/flows/{id}/runs" if post => op(
            "Start a run of the flow by hand",
            "runs",
            OptionalBody(schema::<requests::StartRun>),
            &[Reply(202, "started", schema::<answers::RunStarted>)],
        ),
        "/v1/flows/{id}/webhook-secret" if get => op(
            "A webhook flow's secret (audited)",
            "flows",
            Nothing,
            &[Reply(200, "the secret", schema::<answers::WebhookSecret>)],
        ),
        "/v1/flows/{id}/webhook-secret/rotate" if post => op(
            "Replace a webhook flow's secret",
            "flows",
            Nothing,
            &[Reply(
                200,
                "the new secret",
                schema::<answers::WebhookSecret>,
            )],
        ),
        "/v1/runs" if get => op_query(
            "A page of runs, newest first",
            "runs",
            schema::<requests::RunsParams>,
            &[Reply(200, "the runs", schema::<answers::Runs>)],
        ),
        "/v1/runs/stats" if get => op_query(
            "How many runs are in each status",
            "runs",
            schema::<requests::RunStatsParams>,
            &[Reply(
                200,
                "the counts",
                schema::<piecework_store::RunStats>,
            )],
        ),
        "/v1/runs/{id}" if get => op(
            "A run with its steps",
            "runs",
            Nothing,
            &[Reply(200, "the run", schema::<answers::RunDetail>)],
        ),
        "/v1/runs/{id}/cancel" if post => op(
            "Cancel a run",
            "runs",
            Nothing,
            &[Reply(200, "cancelled", schema::<answers::RunDetail>)],
        ),
        "/v1/runs/{id}/retry" if post => op(
            "Retry a failed run from its failed step",
            "runs",
            Nothing,
            &[Reply(202, "retrying", schema::<answers::RunDetail>)],
        ),
        "/v1/runs/{id}/resume" if post => op(
            "Resume a run waiting on a wait step",
            "runs",
            Json(schema::<requests::ResumeRun>),
            &[Reply(202, "resumed", schema::<answers::RunDetail>)],
        ),
        "/v1/resume/{token}" if post => op(
            "Resume a run from its resume URL (the token is the proof)",
            "runs",
            AnyJson,
            &[Reply(202, "resumed", schema::<answers::RunResumed>)],
        ),
        "/v1/audit" if get => op_query(
            "The audit trail, filtered",
            "audit",
            schema::<requests::AuditParams>,
            &[Reply(200, "the entries", schema::<answers::AuditEntries>)],
        ),
        "/v1/connections" if get => op(
            "List connections (names and pieces, never values)",
            "connections",
            Nothing,
            &[Reply(
                200,
                "the connections",
                schema::<answers::Connections>,
            )],
        ),
        "/v1/connections" if post => op(
            "Save a connection (checked by the piece, encrypted at rest)",
            "connections",
            Json(schema::<requests::SaveConnection>),
            &[
                Reply(201, "created", schema::<answers::ConnectionDetail>),
                Reply(200, "replaced", schema::<answers::ConnectionDetail>),
            ],
        ),
        "/v1/connections/{name}" if get => op(
            "A connection (never its values)",
            "connections",
            Nothing,
            &[Reply(
                200,
                "the connection",
                schema::<answers::ConnectionDetail>,
            )],
        ),
        "/v1/connections/{name}" if delete => op(
            "Delete a connection",
            "connections",
            Nothing,
            &[Empty(204, "deleted")],
        ),
        "/v1/keys/rotate" if post => op(
            "Re-seal every secret under the current encryption key",
            "keys",
            Nothing,
            &[Reply(
                200,
                "what was re-sealed",
                schema::<piecework_runtime::rotation::Rotation>,
            )],
        ),
        "/v1/api-keys" if get => op(
            "List API keys (never the keys)",
            "keys",
            Nothing,
            &[Reply(200, "the keys", schema::<answers::ApiKeys>)],
        ),
        "/v1/api-keys" if post => op(
            "Create an API key (shown this once)",
            "keys",
            Json(schema::<requests::CreateApiKey>),
            &[Reply(201, "created", schema::<answers::ApiKeyCreated>)],
        ),
        "/v1/api-keys/{name}" if delete => op(
            "Revoke an API key, at once",
            "keys",
            Nothing,
            &[Empty(204, "revoked")],
        ),
        "/v1/webhooks/{flow}" if post => op(
            "Call a webhook flow: one run per item its trigger makes",
            "webhooks",
            AnyJson,
            &[Reply(202, "accepted", schema::<answers::WebhookAccepted>)],
        ),
        "/v1/webhooks/{flow}/sync" if post => op(
            "Call a webhook flow and wait for its response",
            "webhooks",
            AnyJson,
            &[
                FlowDefined(
                    "the flow's response: a `webhook_response` step's, else the last step's output",
                ),
                Reply(
                    202,
                    "still running after `sync_timeout`",
                    schema::<answers::StillRunning>,
                ),
            ],
        ),
        _ => return None,
    })
}

/// The whole document.
pub fn document() -> Value {
    let mut answers_schemas = SchemaSettings::draft2020_12()
        .with(|s| s.definitions_path = "/components/schemas".into())
        .for_serialize()
        .into_generator();
    // Request schemas are inlined, so their names never meet the answers' (which may differ:
    // a field with a default is optional to send, always there in an answer); the recursive
    // ones (a flow's steps) are kept apart, under `x-request-schemas`.
    let mut request_schemas = SchemaSettings::draft2020_12()
        .with(|s| {
            s.inline_subschemas = true;
            s.definitions_path = REQUEST_SCHEMAS.into();
        })
        .for_deserialize()
        .into_generator();
    let error = schema::<answers::ErrorBody>(&mut answers_schemas);
    let mut paths = Map::new();
    for route in documented_routes() {
        let operation = describe(&route.method, &route.path)
            .unwrap_or_else(|| panic!("{} {} is not described", route.method, route.path));
        let entry = paths
            .entry(route.path.clone())
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("paths hold objects");
        let document = operation_document(
            &route,
            &operation,
            &mut answers_schemas,
            &mut request_schemas,
            &error,
        );
        entry.insert(route.method.as_str().to_ascii_lowercase(), document);
    }
    let tags: Vec<Value> = [
        "pieces",
        "flows",
        "runs",
        "webhooks",
        "connections",
        "audit",
        "keys",
        "health",
        "console",
    ]
    .map(|name| json!({ "name": name }))
    .into();
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "piecework",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The piecework API: pieces, flows, runs, connections, webhooks and the audit trail. Every route but the health checks, webhooks and resume URLs needs an API key (`Authorization: Bearer pwk_…`) whose role grants what the route does; `piecework dev` on loopback needs none.",
        },
        "servers": [{ "url": "/" }],
        "tags": tags,
        "paths": paths,
        "x-request-schemas": request_schemas.take_definitions(true),
        "components": {
            "schemas": answers_schemas.take_definitions(true),
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A piecework API key (`pwk_NAME_SECRET`), made with `piecework api-key create NAME --role ROLE`.",
                },
            },
        },
    })
}

/// The routes of the API plus this document's own.
fn documented_routes() -> Vec<RouteInfo> {
    let (_, mut routes) = crate::routes::all_routes(&crate::ApiConfig::default());
    routes.sort_by(|a, b| (&a.path, a.method.as_str()).cmp(&(&b.path, b.method.as_str())));
    routes
}

fn operation_document(
    route: &RouteInfo,
    operation: &Operation,
    answers_schemas: &mut SchemaGenerator,
    request_schemas: &mut SchemaGenerator,
    error: &Schema,
) -> Value {
    let mut parameters: Vec<Value> = path_parameters(&route.path);
    if let Some(query) = operation.query {
        parameters.extend(query_parameters(&query(request_schemas)));
    }
    if route.path.starts_with("/v1/webhooks/") {
        parameters.extend(webhook_headers());
    }
    let mut document = json!({
        "operationId": operation_id(&route.method, &route.path),
        "summary": operation.summary,
        "tags": [operation.tag],
        "parameters": parameters,
        "responses": responses(route, operation, answers_schemas, error),
    });
    match route.access {
        Access::Public => document["security"] = json!([]),
        Access::Needs(permission) => {
            document["security"] = json!([{ "apiKey": [] }]);
            document["description"] = json!(format!(
                "Needs a key whose role may {}: {}.",
                permission_text(permission),
                roles_with(permission)
            ));
        }
    }
    if let Some(body) = request_body(operation.input, request_schemas) {
        document["requestBody"] = body;
    }
    document
}

fn permission_text(permission: Permission) -> &'static str {
    match permission {
        Permission::Read => "read",
        Permission::ManageFlows => "manage flows",
        Permission::ToggleFlows => "enable and disable flows",
        Permission::ManagePieces => "manage pieces",
        Permission::ManageConnections => "manage connections",
        Permission::OperateRuns => "operate runs",
        Permission::StartRuns => "start runs",
        Permission::ManageKeys => "manage keys",
        Permission::ReadSecrets => "read secrets",
    }
}

fn roles_with(permission: Permission) -> String {
    Role::ALL
        .iter()
        .filter(|role| role.may(permission))
        .map(|role| role.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `GET /v1/flows/{id}/versions/{version}` → `getFlowsIdVersionsVersion`.
fn operation_id(method: &Method, path: &str) -> String {
    let mut id = method.as_str().to_ascii_lowercase();
    for word in path
        .split(['/', '-', '.', '{', '}'])
        .filter(|w| !w.is_empty() && *w != "v1")
    {
        let mut chars = word.chars();
        if let Some(first) = chars.next() {
            id.push(first.to_ascii_uppercase());
            id.extend(chars);
        }
    }
    id
}

fn path_parameters(path: &str) -> Vec<Value> {
    path.split('/')
        .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
        .map(|name| {
            // A flow's versions are numbered; a piece's are semver.
            let schema = if name == "version" && path.starts_with("/v1/flows/") {
                json!({ "type": "integer", "minimum": 0, "maximum": u32::MAX })
            } else {
                json!({ "type": "string" })
            };
            json!({ "name": name, "in": "path", "required": true, "schema": schema })
        })
        .collect()
}

/// A query struct's properties as query parameters.
fn query_parameters(schema: &Schema) -> Vec<Value> {
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|names| names.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let Some(properties) = schema.get("properties").and_then(Value::as_object) else {
        return Vec::new();
    };
    properties
        .iter()
        .map(|(name, property)| {
            let mut property = property.clone();
            let description = property
                .as_object_mut()
                .and_then(|p| p.remove("description"));
            let mut parameter = json!({
                "name": name,
                "in": "query",
                "required": required.contains(&name.as_str()),
                "schema": property,
            });
            if let Some(description) = description {
                parameter["description"] = description;
            }
            parameter
        })
        .collect()
}

fn webhook_headers() -> Vec<Value> {
    use piecework_runtime::webhooks::{SIGNATURE_HEADER, TIMESTAMP_HEADER};
    [
        (
            TIMESTAMP_HEADER,
            "`auth: hmac` (the default): the Unix time the call was signed at",
        ),
        (
            SIGNATURE_HEADER,
            "`auth: hmac`: `sha256=` and the hex HMAC-SHA256 of `<timestamp>.<body>` under the flow's secret",
        ),
        (
            "x-piecework-token",
            "`auth: token`: the flow's secret (the flow may name another header)",
        ),
        (
            "idempotency-key",
            "A retried call with the same key starts no second run",
        ),
    ]
    .into_iter()
    .map(|(name, description)| {
        json!({
            "name": name,
            "in": "header",
            "required": false,
            "description": description,
            "schema": { "type": "string" },
        })
    })
    .collect()
}

fn request_body(input: Input, request_schemas: &mut SchemaGenerator) -> Option<Value> {
    let json_body = |schema: Value, required: bool| json!({ "required": required, "content": { "application/json": { "schema": schema } } });
    Some(match input {
        Input::Nothing => return None,
        Input::Json(schema) => json_body(schema(request_schemas).to_value(), true),
        Input::OptionalBody(schema) => json_body(schema(request_schemas).to_value(), false),
        Input::AnyJson => json_body(json!({}), false),
        Input::Flow => {
            let definition = request_schemas
                .subschema_for::<piecework_core::FlowDefinition>()
                .to_value();
            json!({
                "required": true,
                "content": {
                    "application/yaml": { "schema": { "type": "string" } },
                    "application/json": { "schema": definition },
                },
            })
        }
        Input::Bundle => json!({
            "required": true,
            "description": "The `.piece.tgz`; its signature (the `.sig` file's JSON) in the `piecework-signature` header.",
            "content": { "application/octet-stream": { "schema": { "type": "string", "format": "binary" } } },
        }),
    })
}

fn responses(
    route: &RouteInfo,
    operation: &Operation,
    answers_schemas: &mut SchemaGenerator,
    error: &Schema,
) -> Value {
    let mut responses = Map::new();
    for answer in operation.answers {
        let (status, value) = match *answer {
            Answer::Reply(status, description, schema) => (
                status.to_string(),
                json!({
                    "description": description,
                    "content": { "application/json": { "schema": schema(answers_schemas) } },
                }),
            ),
            Answer::FlowDefined(description) => (
                "200".to_owned(),
                json!({ "description": description, "content": { "*/*": { "schema": {} } } }),
            ),
            Answer::Text(status, description, media) => (
                status.to_string(),
                json!({ "description": description, "content": { media: { "schema": { "type": "string" } } } }),
            ),
            Answer::Empty(status, description) => {
                (status.to_string(), json!({ "description": description }))
            }
        };
        responses.insert(status, value);
    }
    let error_answer = |description: &str| {
        json!({
            "description": description,
            "content": { "application/json": { "schema": error } },
        })
    };
    if let Access::Needs(_) = route.access {
        responses.insert(
            "401".into(),
            error_answer("no key, or a wrong or revoked one"),
        );
        responses.insert("403".into(), error_answer("the key's role may not do this"));
    }
    if route.path.starts_with("/v1/webhooks/") {
        responses.insert(
            "429".into(),
            error_answer("too many calls: see `Retry-After`"),
        );
    }
    let default = if route.path.ends_with("/sync") {
        // A failed run answers 500 `run_failed`; a flow may answer any status it likes.
        json!({ "description": "an error, or the status the flow's response sets", "content": { "*/*": { "schema": {} } } })
    } else {
        error_answer("an error: `{\"error\": {\"code\", \"message\"}}`")
    };
    responses.insert("default".into(), default);
    Value::Object(responses)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_described_and_every_description_has_a_route() {
        let routes = documented_routes();
        for route in &routes {
            assert!(
                describe(&route.method, &route.path).is_some(),
                "{} {} has no description in openapi.rs",
                route.method,
                route.path
            );
        }
        let document = document();
        let paths = document["paths"].as_object().unwrap();
        let operations: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
        assert_eq!(operations, routes.len());
    }

    /// `docs/openapi.json` is this document. After changing the API, rewrite it with
    /// `PW_UPDATE_OPENAPI=1 cargo test -p piecework-api openapi` (or `just openapi`).
    #[test]
    fn the_committed_document_is_the_generated_one() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
        let generated = serde_json::to_string_pretty(&document()).unwrap() + "\n";
        if std::env::var_os("PW_UPDATE_OPENAPI").is_some() {
            std::fs::write(path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == generated,
            "docs/openapi.json is not the API's document: run `just openapi` and commit it"
        );
    }

    #[test]
    fn operation_ids_are_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for route in documented_routes() {
            let id = operation_id(&route.method, &route.path);
            assert!(seen.insert(id.clone()), "{id} twice");
        }
        assert!(seen.contains("getFlowsIdVersionsVersion"));
    }

    #[test]
    fn query_parameters_come_from_the_query_types() {
        let document = document();
        let parameters = document["paths"]["/v1/runs"]["get"]["parameters"]
            .as_array()
            .unwrap();
        let names: Vec<&str> = parameters
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        for name in [
            "flow", "status", "since", "until", "trigger", "after", "limit",
        ] {
            assert!(names.contains(&name), "{names:?}");
        }
    }
}
