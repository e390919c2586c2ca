//! Who may call which route. Every route is added through [`Routes`], which takes the route's
//! [`Access`] with its handler, so a route cannot exist without a policy, and
//! [`route_table`] lists them all (the route × role test walks it).
//!
//! A route that needs a permission authenticates the caller from `Authorization: Bearer
//! <key>` — the bootstrap admin key of the configuration, or a named key from the store,
//! checked on every request — and answers `401` without a valid key, `403` when the key's role
//! lacks the permission. The handler finds the [`Caller`] in the request's extensions.

use axum::extract::Request;
use axum::handler::Handler;
use axum::http::{Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, on};
use axum::{Extension, Router};
use piecework_core::access::{Permission, Role};
use piecework_runtime::access::{BOOTSTRAP, Caller};
use serde::Serialize;

use crate::error::ApiError;
use crate::routes::AppState;

/// What a route asks of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Anyone: health checks, webhooks (which authenticate by flow), metrics.
    Public,
    /// A key whose role grants the permission.
    Needs(Permission),
}

/// One route of the API and its policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteInfo {
    #[serde(serialize_with = "method_name")]
    pub method: Method,
    /// The full pattern, as axum matches it (`/v1/flows/{id}`).
    pub path: String,
    pub access: Access,
}

fn method_name<S: serde::Serializer>(method: &Method, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(method.as_str())
}

/// A router under construction, with the policy of each route it holds.
pub(crate) struct Routes {
    prefix: &'static str,
    router: Router<AppState>,
    table: Vec<RouteInfo>,
}

impl Routes {
    pub(crate) fn new(prefix: &'static str) -> Self {
        Self {
            prefix,
            router: Router::new(),
            table: Vec::new(),
        }
    }

    /// Adds `method path` served by `handler`, for callers that `access` lets in.
    pub(crate) fn add<H, T>(
        mut self,
        method: Method,
        path: &'static str,
        access: Access,
        handler: H,
    ) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        let filter = MethodFilter::try_from(method.clone()).expect("standard HTTP methods");
        let route = match access {
            Access::Public => on(filter, handler),
            Access::Needs(permission) => on(filter, handler).route_layer(middleware::from_fn(
                move |request: Request, next: Next| authorize(permission, request, next),
            )),
        };
        self.router = self.router.route(path, route);
        self.table.push(RouteInfo {
            method,
            path: format!("{}{path}", self.prefix),
            access,
        });
        self
    }

    /// Takes in the routes of `other` (built with the same prefix).
    pub(crate) fn merge(mut self, other: Routes) -> Self {
        self.router = self.router.merge(other.router);
        self.table.extend(other.table);
        self
    }

    pub(crate) fn into_parts(self) -> (Router<AppState>, Vec<RouteInfo>) {
        (self.router, self.table)
    }
}

/// Every route of the API with its policy.
pub fn route_table(config: &crate::ApiConfig) -> Vec<RouteInfo> {
    crate::routes::all_routes(config).1
}

/// Lets the request through when its caller may `permission`, with the [`Caller`] in its
/// extensions.
async fn authorize(permission: Permission, mut request: Request, next: Next) -> Response {
    let state = request
        .extensions()
        .get::<AppState>()
        .cloned()
        .expect("the router puts its state in every request");
    let key = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|k| k.trim().to_owned());
    let caller = match identify(&state, key.as_deref()).await {
        Ok(caller) => caller,
        Err(err) => return err.into_response(),
    };
    if !caller.role.may(permission) {
        return ApiError::Forbidden(format!(
            "the key `{}` has the {} role, which may not {}",
            caller.name,
            caller.role,
            describe(permission)
        ))
        .into_response();
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// Who is calling: anyone is an admin on an open API (`piecework dev` on loopback).
async fn identify(state: &AppState, key: Option<&str>) -> Result<Caller, ApiError> {
    if state.config.open {
        return Ok(Caller {
            name: "anonymous".to_owned(),
            role: Role::Admin,
        });
    }
    let key = key.ok_or(ApiError::Unauthorized)?;
    if let Some(bootstrap) = state.config.api_key.as_deref()
        && piecework_runtime::secrets::constant_time_eq(key.as_bytes(), bootstrap.as_bytes())
    {
        return Ok(Caller {
            name: BOOTSTRAP.to_owned(),
            role: Role::Admin,
        });
    }
    state
        .runtime
        .authenticate(key)
        .await?
        .ok_or(ApiError::Unauthorized)
}

fn describe(permission: Permission) -> &'static str {
    match permission {
        Permission::Read => "read",
        Permission::ManageFlows => "apply or upgrade flows",
        Permission::ToggleFlows => "enable or disable flows",
        Permission::ManagePieces => "publish or yank pieces",
        Permission::ManageConnections => "save or delete connections",
        Permission::OperateRuns => "retry, cancel or resume runs",
        Permission::StartRuns => "start runs",
        Permission::ManageKeys => "manage API keys",
        Permission::ReadSecrets => "read or rotate webhook secrets",
    }
}

/// The caller of a route that needs a permission, for handlers.
pub(crate) type Authorized = Extension<Caller>;
