//! The document HTTP API: create, edit and read documents as JSON.
//!
//! Agents serve all of it on their local API; hubs serve the read route for operators.
//! Every error is a 4xx or 5xx with a JSON body `{"error": {"code", "message"}}`, and a
//! rejected request applies nothing.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use std::time::Duration;

use tokio::sync::watch;

use super::driver::{DriverError, NodeHandle};
use super::runtime::RunningNode;
use super::store_reader::{StoreReader, MAX_PAGE};
use crate::durability::{Durability, DurabilityError};
use crate::ids::{Collection, DocId};
use crate::node::{self, Request, RequestError};
use crate::ops::{Op, PathSegment, ValueKind};

/// Largest request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// What the API handlers reach: the node, the store's read side and the feed signal.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// The node loop.
    pub node: NodeHandle,
    /// Read-only store queries.
    pub reader: Arc<StoreReader>,
    /// The newest committed change-feed position.
    pub feed_head: watch::Receiver<u64>,
}

impl ApiState {
    /// The API state of a running node.
    pub fn of(node: &RunningNode) -> Self {
        Self {
            node: node.handle.clone(),
            reader: node.reader.clone(),
            feed_head: node.feed_head.clone(),
        }
    }
}

/// The full document API (agents).
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/collections/{collection}/docs", post(create).get(list))
        .route("/v1/collections/{collection}/docs/automerge", post(create_from_bytes))
        .route("/v1/docs/{id}", get(read).delete(delete))
        .route("/v1/docs/{id}/ops", post(edit))
        .route("/v1/docs/{id}/writes", post(super::write_stream::write_stream))
        .route("/v1/docs/{id}/history", get(history))
        .route("/v1/docs/{id}/automerge", get(export).post(import))
        .route("/v1/docs/{id}/durability", get(durability))
        .route("/v1/changes", get(super::feed_api::changes))
        .route("/v1/status", get(status))
        .route("/v1/openapi.json", get(openapi))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// The OpenAPI description of this API, kept in the repository next to the handlers.
pub const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], OPENAPI)
}

/// Requires `Authorization: Bearer <token>` on every request, when a token is configured
/// (or, for the WebSocket sync endpoint, `?access_token=<token>`).
pub fn require_token(router: Router, token: Option<String>) -> Router {
    let Some(token) = token else { return router };
    let token: Arc<str> = token.into();
    router.layer(axum::middleware::from_fn(
        move |request: axum::extract::Request, next: axum::middleware::Next| {
            let token = token.clone();
            async move {
                let presented = request
                    .headers()
                    .get(axum::http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .or_else(|| websocket_token(&request));
                if presented.is_some_and(|p| same_secret(p.as_bytes(), token.as_bytes())) {
                    next.run(request).await
                } else {
                    ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "missing or wrong bearer token",
                    )
                    .into_response()
                }
            }
        },
    ))
}

/// The token of a WebSocket upgrade to the sync endpoint, from its `access_token` query
/// parameter: browsers cannot set headers on a WebSocket. Only there, since a token in a URL
/// can end up in logs.
fn websocket_token(request: &axum::extract::Request) -> Option<&str> {
    if request.uri().path() != super::repo_ws::SYNC_PATH {
        return None;
    }
    request.uri().query()?.split('&').find_map(|pair| pair.strip_prefix("access_token="))
}

/// Compares without stopping at the first difference, so timing does not reveal the prefix.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Only the read routes (hubs).
pub fn read_router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/collections/{collection}/docs", get(list))
        .route("/v1/docs/{id}", get(read))
        .route("/v1/docs/{id}/history", get(history))
        .route("/v1/docs/{id}/automerge", get(export))
        .route("/v1/changes", get(super::feed_api::changes))
        .route("/v1/status", get(status))
        .route("/v1/openapi.json", get(openapi))
        .with_state(state)
}

/// An API error: status, a stable code and a message for people.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    /// An error with this status, stable code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }

    /// A 400 with a stable code.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// A 500: something on this node failed, not the request.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl ApiError {
    /// The error's response, with `details` (a JSON object) beside `error` in the body.
    pub fn with_details(self, details: Value) -> Response {
        let mut body = json!({"error": {"code": self.code, "message": self.message}});
        if let (Some(body), Value::Object(details)) = (body.as_object_mut(), details) {
            body.extend(details);
        }
        self.respond(body)
    }

    fn respond(self, body: Value) -> Response {
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // The unread rest of the body makes the connection unusable; say so, so clients
            // do not send their next request on it.
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        response
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        self.respond(body)
    }
}

impl From<DriverError> for ApiError {
    fn from(error: DriverError) -> Self {
        match error {
            DriverError::Request(RequestError::NotFound(id)) => {
                Self::new(StatusCode::NOT_FOUND, "not_found", format!("document {id} not found"))
            }
            DriverError::Request(e @ RequestError::AlreadyExists(_)) => {
                Self::new(StatusCode::CONFLICT, "exists", e.to_string())
            }
            DriverError::Request(e @ RequestError::Unavailable(_)) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string())
            }
            DriverError::Request(RequestError::BadOps(e)) => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_op", e.to_string())
            }
            DriverError::Request(e @ RequestError::BadHeads(_)) => {
                Self::new(StatusCode::BAD_REQUEST, "bad_heads", e.to_string())
            }
            DriverError::Request(e @ RequestError::Deleted(_)) => {
                Self::new(StatusCode::GONE, "deleted", e.to_string())
            }
            DriverError::Request(e @ RequestError::BadBytes(_)) => {
                Self::new(StatusCode::BAD_REQUEST, "bad_automerge", e.to_string())
            }
            DriverError::Request(e @ RequestError::Quarantined { .. }) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "quarantined", e.to_string())
            }
            DriverError::Request(
                e @ (RequestError::TooLarge { .. } | RequestError::TooManyChanges { .. }),
            ) => Self::new(StatusCode::PAYLOAD_TOO_LARGE, "document_too_large", e.to_string()),
            DriverError::Request(e @ RequestError::StreamStopped) => {
                Self::new(StatusCode::CONFLICT, "stream_stopped", e.to_string())
            }
            DriverError::Request(e @ RequestError::NotAStreamWrite) => {
                Self::new(StatusCode::BAD_REQUEST, "not_a_stream_write", e.to_string())
            }
            DriverError::Stopped => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "stopped", "node is shutting down")
            }
        }
    }
}

fn body_json<T: for<'de> Deserialize<'de>>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|rejection| {
        let status = rejection.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE { "too_large" } else { "bad_body" };
        ApiError::new(status, code, format!("{rejection} (limit {MAX_BODY_BYTES} bytes)"))
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_json", e.to_string()))
}

fn parse_doc_id(id: &str) -> Result<DocId, ApiError> {
    id.parse().map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_id", format!("{e}")))
}

/// Durability options of a write, from the query string (and, for edits, the body).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteQuery {
    /// `local` (default), `hub` or `regions:N`.
    durability: Option<String>,
    /// How long to wait for the durability level before answering 202, in milliseconds.
    timeout_ms: Option<u64>,
}

/// Default and largest wait for a durability level.
const DEFAULT_DURABILITY_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_DURABILITY_TIMEOUT: Duration = Duration::from_secs(60);

impl WriteQuery {
    fn level(&self) -> Result<(Durability, Duration), ApiError> {
        let level = match &self.durability {
            Some(text) => text.parse().map_err(|e: DurabilityError| {
                ApiError::bad_request("bad_durability", e.to_string())
            })?,
            None => Durability::Local,
        };
        let timeout =
            self.timeout_ms.map(Duration::from_millis).unwrap_or(DEFAULT_DURABILITY_TIMEOUT);
        Ok((level, timeout.min(MAX_DURABILITY_TIMEOUT)))
    }
}

/// Answers a committed write: at once for `local`; for `hub` or `regions:N` once that many
/// hold it, or `202` at the deadline with where to ask again. The write has happened either way.
async fn answer_write(
    node: &NodeHandle,
    doc_id: DocId,
    heads: Vec<String>,
    (level, timeout): (Durability, Duration),
    done: StatusCode,
) -> Result<Response, ApiError> {
    let mut body = json!({"id": doc_id.to_string(), "url": doc_id.url(), "heads": heads});
    if level == Durability::Local {
        body["durability"] = json!({"local": true});
        return Ok((done, Json(body)).into_response());
    }
    let deadline = std::time::Instant::now() + timeout;
    let request = Request::AwaitDurable { doc_id, heads: heads.clone(), level, deadline };
    let node::Response::Durability(report) = node.request(request).await? else {
        return Err(ApiError::internal("unexpected answer to a durability request"));
    };
    body["durability"] = report_json(&report);
    if report.meets(level) {
        return Ok((done, Json(body)).into_response());
    }
    body["status_url"] = json!(format!("/v1/docs/{doc_id}/durability?heads={}", heads.join(",")));
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

fn report_json(report: &node::DurabilityReport) -> Value {
    json!({"local": report.local, "hub": report.hub, "regions": report.regions})
}

/// Heads to ask about, comma-separated.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeadsQuery {
    heads: String,
}

async fn durability(
    State(ApiState { node, .. }): State<ApiState>,
    Path(id): Path<String>,
    query: Result<Query<HeadsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let doc_id = parse_doc_id(&id)?;
    let Query(query) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let heads = split_heads(&query.heads);
    // Asking about every region also asks the hub again, so a later look knows more.
    let level = Durability::Regions(u8::MAX);
    let request =
        Request::AwaitDurable { doc_id, heads, level, deadline: std::time::Instant::now() };
    let node::Response::Durability(report) = node.request(request).await? else {
        return Err(ApiError::internal("unexpected answer to a durability request"));
    };
    Ok(Json(report_json(&report)))
}

async fn create(
    State(ApiState { node, .. }): State<ApiState>,
    Path(collection): Path<String>,
    query: Result<Query<WriteQuery>, axum::extract::rejection::QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let level = query.level()?;
    let collection: Collection = collection
        .parse()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_collection", format!("{e}")))?;
    refuse_reserved(&collection)?;
    let Value::Object(fields) = body_json::<Value>(body)? else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            "the document must be a JSON object",
        ));
    };
    let ops = fields
        .into_iter()
        .map(|(key, value)| Op::Set {
            path: vec![PathSegment::Key(key)],
            value,
            kind: ValueKind::Auto,
        })
        .collect();
    let doc_id = DocId::random(&mut rand::thread_rng());
    match node.request(Request::Create { doc_id, collection, ops }).await? {
        node::Response::Written { doc_id, heads } => {
            answer_write(&node, doc_id, heads, level, StatusCode::CREATED).await
        }
        other => Err(unexpected(&other)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EditBody {
    ops: Vec<Op>,
    /// `local` (default), `hub` or `regions:N`.
    durability: Option<String>,
    /// How long to wait for the durability level, in milliseconds.
    timeout_ms: Option<u64>,
}

async fn edit(
    State(ApiState { node, .. }): State<ApiState>,
    Path(id): Path<String>,
    query: Result<Query<WriteQuery>, axum::extract::rejection::QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let doc_id = parse_doc_id(&id)?;
    let Query(query) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let EditBody { ops, durability, timeout_ms } = body_json(body)?;
    let write = WriteQuery {
        durability: durability.or(query.durability),
        timeout_ms: timeout_ms.or(query.timeout_ms),
    };
    let level = write.level()?;
    match node.request(Request::Edit { doc_id, ops }).await? {
        node::Response::Written { heads, .. } => {
            answer_write(&node, doc_id, heads, level, StatusCode::OK).await
        }
        other => Err(unexpected(&other)),
    }
}

/// Optional heads to read a document at (comma-separated hex).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadQuery {
    heads: Option<String>,
}

async fn read(
    State(ApiState { node, .. }): State<ApiState>,
    Path(id): Path<String>,
    query: Result<Query<ReadQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let doc_id = parse_doc_id(&id)?;
    let Query(query) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let request = match query.heads {
        Some(heads) => Request::ReadAt { doc_id, heads: split_heads(&heads) },
        None => Request::Read { doc_id },
    };
    match node.request(request).await? {
        node::Response::Document { doc_id, collection, heads, doc } => Ok(Json(json!({
            "id": doc_id.to_string(),
            "collection": collection.as_str(),
            "heads": heads,
            "doc": doc,
        }))),
        other => Err(unexpected(&other)),
    }
}

fn split_heads(text: &str) -> Vec<String> {
    text.split(',').filter(|h| !h.is_empty()).map(str::to_owned).collect()
}

async fn delete(
    State(ApiState { node, .. }): State<ApiState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let doc_id = parse_doc_id(&id)?;
    match node.request(Request::Delete { doc_id }).await? {
        node::Response::Written { heads, .. } => {
            Ok(Json(json!({"id": doc_id.to_string(), "heads": heads, "deleted": true})))
        }
        other => Err(unexpected(&other)),
    }
}

/// A page of history.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    offset: Option<usize>,
    limit: Option<usize>,
}

async fn history(
    State(ApiState { node, .. }): State<ApiState>,
    Path(id): Path<String>,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let doc_id = parse_doc_id(&id)?;
    let Query(query) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let offset = query.offset.unwrap_or(0);
    let limit = query.limit.unwrap_or(100).clamp(1, MAX_PAGE);
    match node.request(Request::History { doc_id, offset, limit }).await? {
        node::Response::History { changes, total } => {
            Ok(Json(json!({"changes": changes, "total": total, "offset": offset})))
        }
        other => Err(unexpected(&other)),
    }
}

async fn export(
    State(ApiState { node, .. }): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let doc_id = parse_doc_id(&id)?;
    match node.request(Request::Export { doc_id }).await? {
        node::Response::Bytes(bytes) => {
            Ok(([(axum::http::header::CONTENT_TYPE, "application/octet-stream")], bytes)
                .into_response())
        }
        other => Err(unexpected(&other)),
    }
}

fn raw_body(body: Result<Bytes, BytesRejection>) -> Result<Vec<u8>, ApiError> {
    let bytes = body.map_err(|rejection| {
        let status = rejection.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE { "too_large" } else { "bad_body" };
        ApiError::new(status, code, format!("{rejection} (limit {MAX_BODY_BYTES} bytes)"))
    })?;
    if bytes.is_empty() {
        return Err(ApiError::bad_request("bad_automerge", "empty body"));
    }
    Ok(bytes.to_vec())
}

/// Merges uploaded Automerge bytes (a saved document or changes) into an existing document.
async fn import(
    State(ApiState { node, .. }): State<ApiState>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let doc_id = parse_doc_id(&id)?;
    let bytes = raw_body(body)?;
    match node.request(Request::Import { doc_id, collection: None, bytes }).await? {
        node::Response::Written { heads, .. } => {
            Ok(Json(json!({"id": doc_id.to_string(), "heads": heads})))
        }
        other => Err(unexpected(&other)),
    }
}

/// Creates a document from uploaded Automerge bytes.
async fn create_from_bytes(
    State(ApiState { node, .. }): State<ApiState>,
    Path(collection): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let collection: Collection =
        collection.parse().map_err(|e| ApiError::bad_request("bad_collection", format!("{e}")))?;
    refuse_reserved(&collection)?;
    let bytes = raw_body(body)?;
    let doc_id = DocId::random(&mut rand::thread_rng());
    match node.request(Request::Import { doc_id, collection: Some(collection), bytes }).await? {
        node::Response::Written { heads, .. } => Ok((
            StatusCode::CREATED,
            Json(json!({"id": doc_id.to_string(), "url": doc_id.url(), "heads": heads})),
        )),
        other => Err(unexpected(&other)),
    }
}

/// System records (profiles, jobs, results) are written by the nodes themselves; apps
/// create no documents in their reserved collections.
fn refuse_reserved(collection: &Collection) -> Result<(), ApiError> {
    if crate::jobs::is_reserved(collection) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "reserved_collection",
            format!(
                "collections starting with {} are reserved for system records",
                crate::jobs::RESERVED_COLLECTION_PREFIX
            ),
        ));
    }
    Ok(())
}

fn unexpected(response: &node::Response) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("unexpected answer {response:?}"),
    )
}

/// Query parameters of a listing.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Continue after this document id (the previous page's `next`).
    after: Option<String>,
    /// Page size (default 100, at most 1000).
    limit: Option<usize>,
}

async fn list(
    State(state): State<ApiState>,
    Path(collection): Path<String>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let collection: Collection =
        collection.parse().map_err(|e| ApiError::bad_request("bad_collection", format!("{e}")))?;
    let after = query.after.as_deref().map(parse_doc_id).transpose()?;
    let limit = query.limit.unwrap_or(100).clamp(1, MAX_PAGE);
    let reader = state.reader.clone();
    let docs = tokio::task::spawn_blocking(move || reader.list(&collection, after, limit))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let next = (docs.len() == limit).then(|| docs.last().map(|d| d.id.clone())).flatten();
    Ok(Json(json!({"docs": docs, "next": next})))
}

async fn status(State(state): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    let node::Response::Status(report) = state.node.request(Request::Status).await? else {
        return Err(ApiError::internal("unexpected answer to a status request"));
    };
    let reader = state.reader.clone();
    let store_bytes = tokio::task::spawn_blocking(move || reader.size_bytes())
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let peers = state.node.status().ready_peers;
    Ok(Json(json!({
        "node": state.node.node_id().to_string(),
        "hub": {
            "connected": report.hub_connected,
            "id": report.hub.map(|id| id.to_string()),
            "advertised_hubs": report.advertised_hubs.iter()
                .map(|hub| json!({
                    "node": hub.node_id.to_string(),
                    "region": hub.region,
                    "addr": hub.addr,
                }))
                .collect::<Vec<_>>(),
            "refused_collections": report.refused_collections.iter()
                .map(|(peer, collection, reason)| json!({
                    "peer": peer.to_string(),
                    "collection": collection.as_str(),
                    "reason": reason,
                }))
                .collect::<Vec<_>>(),
            "last_sync": report.last_hub_sync.map(|t| t.get_time().to_string_rfc3339_lossy()),
            "documents_pending": report.documents_pending_hub,
        },
        "connected_peers": peers,
        "documents": report.documents,
        "cache": { "documents": report.cache.0, "bytes": report.cache.1 },
        "quarantined": {
            "total": report.quarantined_total,
            "documents": report.quarantined.iter()
                .map(|(id, reason)| json!({ "id": id.to_string(), "reason": reason }))
                .collect::<Vec<_>>(),
        },
        "replication": {
            "peers": report.replication_lag.iter().map(|lag| json!({
                "peer": lag.peer.to_string(),
                "role": format!("{:?}", lag.role).to_lowercase(),
                "lag_ms": u64::try_from(lag.lag.as_millis()).unwrap_or(u64::MAX),
                "pending_documents": lag.pending_documents,
            })).collect::<Vec<_>>(),
        },
        "clock": report.clock.get_time().to_string_rfc3339_lossy(),
        "store_bytes": store_bytes,
        "feed_cursor": *state.feed_head.borrow(),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Paths registered with `.route("...")` in a source file.
    fn routes_in(source: &str) -> BTreeSet<String> {
        source
            .split(".route(\"")
            .skip(1)
            .filter_map(|rest| rest.split('"').next())
            .filter(|path| path.starts_with('/'))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn the_openapi_description_lists_exactly_the_served_routes() {
        let spec: Value = serde_json::from_str(OPENAPI).unwrap();
        let documented: BTreeSet<String> =
            spec["paths"].as_object().unwrap().keys().cloned().collect();
        let mut served = routes_in(include_str!("doc_api.rs"));
        served.extend(routes_in(include_str!("ops_http.rs")));
        served.extend(routes_in(include_str!("jobs_api.rs")));
        served.extend(routes_in(include_str!("scaling.rs")));
        served.insert(super::super::repo_ws::SYNC_PATH.to_owned());
        assert_eq!(documented, served);
    }

    #[test]
    fn secrets_compare_by_content_and_length() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
    }
}
