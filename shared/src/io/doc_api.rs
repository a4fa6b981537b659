//! The document HTTP API: create, edit and read documents as JSON.
//!
//! Agents serve all of it on their local API; hubs serve the read route for operators.
//! Every error is a 4xx or 5xx with a JSON body `{"error": {"code", "message"}}`, and a
//! rejected request applies nothing.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::driver::{DriverError, NodeHandle};
use crate::ids::{Collection, DocId};
use crate::node::{self, Request, RequestError};
use crate::ops::{Op, PathSegment, ValueKind};

/// Largest request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// The full document API (agents).
pub fn router(node: NodeHandle) -> Router {
    Router::new()
        .route("/v1/collections/{collection}/docs", post(create))
        .route("/v1/docs/{id}", get(read))
        .route("/v1/docs/{id}/ops", post(edit))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(node)
}

/// Only the read route (hubs).
pub fn read_router(node: NodeHandle) -> Router {
    Router::new()
        .route("/v1/docs/{id}", get(read))
        .with_state(node)
}

/// An API error: status, a stable code and a message for people.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response()
    }
}

impl From<DriverError> for ApiError {
    fn from(error: DriverError) -> Self {
        match error {
            DriverError::Request(RequestError::NotFound(id)) => Self::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("document {id} not found"),
            ),
            DriverError::Request(e @ RequestError::AlreadyExists(_)) => {
                Self::new(StatusCode::CONFLICT, "exists", e.to_string())
            }
            DriverError::Request(e @ RequestError::Unavailable(_)) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            ),
            DriverError::Request(RequestError::BadOps(e)) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_op",
                e.to_string(),
            ),
            DriverError::Stopped => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "stopped",
                "node is shutting down",
            ),
        }
    }
}

fn body_json<T: for<'de> Deserialize<'de>>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|rejection| {
        let status = rejection.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "too_large"
        } else {
            "bad_body"
        };
        ApiError::new(
            status,
            code,
            format!("{rejection} (limit {MAX_BODY_BYTES} bytes)"),
        )
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_json", e.to_string()))
}

fn parse_doc_id(id: &str) -> Result<DocId, ApiError> {
    id.parse()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_id", format!("{e}")))
}

async fn create(
    State(node): State<NodeHandle>,
    Path(collection): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let collection: Collection = collection
        .parse()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_collection", format!("{e}")))?;
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
    match node
        .request(Request::Create {
            doc_id,
            collection,
            ops,
        })
        .await?
    {
        node::Response::Written { doc_id, heads } => Ok((
            StatusCode::CREATED,
            Json(json!({"id": doc_id.to_string(), "url": doc_id.url(), "heads": heads})),
        )),
        other => Err(unexpected(&other)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EditBody {
    ops: Vec<Op>,
}

async fn edit(
    State(node): State<NodeHandle>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let doc_id = parse_doc_id(&id)?;
    let EditBody { ops } = body_json(body)?;
    match node.request(Request::Edit { doc_id, ops }).await? {
        node::Response::Written { heads, .. } => Ok(Json(json!({"heads": heads}))),
        other => Err(unexpected(&other)),
    }
}

async fn read(
    State(node): State<NodeHandle>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let doc_id = parse_doc_id(&id)?;
    match node.request(Request::Read { doc_id }).await? {
        node::Response::Document {
            doc_id,
            collection,
            heads,
            doc,
        } => Ok(Json(json!({
            "id": doc_id.to_string(),
            "collection": collection.as_str(),
            "heads": heads,
            "doc": doc,
        }))),
        other => Err(unexpected(&other)),
    }
}

fn unexpected(response: &node::Response) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("unexpected answer {response:?}"),
    )
}
