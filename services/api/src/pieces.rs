//! `/v1/pieces`: the catalog, each piece's versions, publishing bundles to the registry and
//! yanking them, and the options of dynamic dropdowns, loaded through the piece.
//!
//! `POST /v1/pieces` takes the `.piece.tgz` as the body (any content type) and its signature,
//! when there is one, as the JSON of the `.sig` file in the `Piecework-Signature` header.

use axum::extract::{DefaultBodyLimit, State};
use axum::handler::Handler as _;
use axum::http::Method;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use piecework_bundle::Signature;
use semver::Version;
use serde_json::Value;

use crate::access::{Access::Needs, Authorized, Routes};
use crate::error::ApiError;
use crate::routes::{ApiResult, AppState, Body, Path, Query};
use crate::{ApiConfig, answers};
use piecework_core::access::Permission;

/// The header that carries a bundle's signature on publish.
pub const SIGNATURE_HEADER: &str = "piecework-signature";

pub(crate) fn routes(config: &ApiConfig) -> Routes {
    use Permission::*;
    let publish = publish.layer(DefaultBodyLimit::max(config.max_bundle_bytes));
    Routes::new("/v1")
        .add(Method::GET, "/pieces", Needs(Read), list_pieces)
        .add(Method::POST, "/pieces", Needs(ManagePieces), publish)
        .add(Method::GET, "/pieces/{name}", Needs(Read), get_piece)
        .add(Method::GET, "/pieces/{name}/docs", Needs(Read), piece_docs)
        .add(
            Method::GET,
            "/pieces/{name}/versions",
            Needs(Read),
            list_versions,
        )
        .add(
            Method::GET,
            "/pieces/{name}/versions/{version}",
            Needs(Read),
            get_version,
        )
        .add(
            Method::DELETE,
            "/pieces/{name}/versions/{version}",
            Needs(ManagePieces),
            yank,
        )
        // Writing a flow: the options come from the system behind the connection.
        .add(
            Method::GET,
            "/pieces/{name}/props/{prop}/options",
            Needs(ManageFlows),
            prop_options,
        )
}

/// Query parameters of the options route that are not prop values.
const OPTIONS_PARAMS: [&str; 5] = ["action", "trigger", "connection", "version", "input"];

/// `GET /v1/pieces/{name}/props/{prop}/options?action=…&connection=…&project=ops`: the options
/// of a dynamic dropdown, loaded by the piece with the connection. The member's other props
/// given so far come as `input` (a JSON object) and as further parameters (strings).
async fn prop_options(
    State(state): State<AppState>,
    Path((name, prop)): Path<(String, String)>,
    Query(params): Query<std::collections::BTreeMap<String, String>>,
) -> ApiResult<Json<piecework_sdk::DropdownOptions>> {
    let mut input = match params.get("input") {
        None => serde_json::Map::new(),
        Some(text) => match serde_json::from_str(text) {
            Ok(Value::Object(values)) => values,
            Ok(_) => return Err(ApiError::BadRequest("`input` must be a JSON object".into())),
            Err(e) => {
                return Err(ApiError::BadRequest(format!("`input` is not JSON: {e}")));
            }
        },
    };
    for (key, value) in &params {
        if !OPTIONS_PARAMS.contains(&key.as_str()) {
            input.insert(key.clone(), Value::String(value.clone()));
        }
    }
    let query = piecework_runtime::OptionsQuery {
        piece: &name,
        version: params.get("version").map(String::as_str),
        action: params.get("action").map(String::as_str),
        trigger: params.get("trigger").map(String::as_str),
        prop: &prop,
        connection: params.get("connection").map(String::as_str),
        input: Value::Object(input),
    };
    let options = state.runtime.prop_options(query).await?;
    Ok(Json(options))
}

async fn list_pieces(State(state): State<AppState>) -> Response {
    let registry = state.runtime.pieces();
    Json(answers::Pieces {
        pieces: registry.catalog(),
    })
    .into_response()
}

/// The newest version's metadata and every version's number.
async fn get_piece(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult<Response> {
    let registry = state.runtime.pieces();
    let newest = registry
        .newest(&name)
        .ok_or_else(|| ApiError::NotFound(format!("no piece `{name}`")))?;
    let origin = registry
        .entry(&name, newest.version())
        .map(|e| e.origin.clone());
    let versions: Vec<String> = registry
        .versions(&name)
        .iter()
        .map(ToString::to_string)
        .collect();
    let detail = answers::PieceDetail {
        piece: newest.metadata(),
        origin,
        versions,
    };
    Ok(Json(detail).into_response())
}

/// The newest version's documentation, as `piecework piece docs` writes it (Markdown).
async fn piece_docs(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let registry = state.runtime.pieces();
    let newest = registry
        .newest(&name)
        .ok_or_else(|| ApiError::NotFound(format!("no piece `{name}`")))?;
    let markdown = piecework_core::docs::markdown(newest.metadata());
    let content_type = [(
        axum::http::header::CONTENT_TYPE,
        "text/markdown; charset=utf-8",
    )];
    Ok((content_type, markdown).into_response())
}

async fn list_versions(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<answers::PieceVersions>> {
    let versions = state.runtime.piece_versions(&name).await?;
    Ok(Json(answers::PieceVersions {
        piece: name,
        versions,
    }))
}

fn parse_version(text: &str) -> ApiResult<Version> {
    Version::parse(text)
        .map_err(|e| ApiError::BadRequest(format!("{text:?} is not a semver version: {e}")))
}

async fn get_version(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Response> {
    let version = parse_version(&version)?;
    let registry = state.runtime.pieces();
    let entry = registry
        .entry(&name, &version)
        .ok_or_else(|| ApiError::NotFound(format!("no piece `{name}` {version}")))?;
    let found = answers::PieceVersion {
        piece: entry.piece.metadata(),
        origin: entry.origin.clone(),
    };
    Ok(Json(found).into_response())
}

async fn publish(
    State(state): State<AppState>,
    Extension(caller): Authorized,
    headers: HeaderMap,
    Body(body): Body,
) -> ApiResult<Response> {
    if body.is_empty() {
        return Err(ApiError::BadRequest(
            "send the .piece.tgz as the request body".into(),
        ));
    }
    let signature = match headers.get(SIGNATURE_HEADER) {
        None => None,
        Some(value) => {
            let text = value
                .to_str()
                .map_err(|_| ApiError::BadRequest(format!("{SIGNATURE_HEADER} is not ASCII")))?;
            Some(serde_json::from_str::<Signature>(text).map_err(|e| {
                ApiError::BadRequest(format!(
                    "{SIGNATURE_HEADER} is not a bundle signature (the JSON of the .sig file): {e}"
                ))
            })?)
        }
    };
    let outcome = state
        .runtime
        .publish_piece(body, signature, &caller.actor())
        .await?;
    let status = if outcome.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let piece = &outcome.piece;
    let body = answers::PiecePublished {
        piece: answers::PublishedBundle {
            name: piece.name.clone(),
            version: piece.version.clone(),
            digest: piece.digest.to_string(),
            size: piece.size,
            publisher: piece.publisher.clone(),
            published_at: piece.published_at,
            signed_by: piece.signature.as_ref().map(|s| s.key.clone()),
        },
        created: outcome.created,
    };
    Ok((status, Json(body)).into_response())
}

async fn yank(
    State(state): State<AppState>,
    Extension(caller): Authorized,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Json<answers::PieceYanked>> {
    let version = parse_version(&version)?;
    let yanked = state
        .runtime
        .yank_piece(&name, &version, &caller.actor())
        .await?;
    Ok(Json(answers::PieceYanked {
        yanked: answers::YankedBundle {
            name: yanked.name,
            version: yanked.version,
            digest: yanked.digest.to_string(),
        },
    }))
}
