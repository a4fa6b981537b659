//! The hub's place among hubs: `/v1/topology` (its region, the replication policy, the other
//! hubs on the backbone) and the refusal of document routes for collections its region does
//! not hold.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use cairn_shared::ids::NodeId;
use cairn_shared::io::backbone_metrics::BackboneMetrics;
use cairn_shared::replication::{NotHeldHere, Region, ReplicationPolicy};
use serde_json::json;

/// Largest document read this hub inspects for its collection before answering, in bytes;
/// the node's own document limit is far below it.
const MAX_CHECKED_READ_BYTES: usize = 256 * 1024 * 1024;

/// What the topology route reports and the refusal layer checks.
#[derive(Clone)]
pub struct Topology {
    /// This hub's node id.
    pub node_id: NodeId,
    /// This hub's region.
    pub region: Region,
    /// The QUIC address its agents dial, if it announces one.
    pub agent_address: Option<String>,
    /// Which regions hold which collections.
    pub policy: Arc<ReplicationPolicy>,
    /// The backbone's metrics (zero without a backbone).
    pub metrics: BackboneMetrics,
    /// The other hubs on the backbone, if this hub joined it.
    #[cfg(feature = "backbone")]
    pub backbone: Option<Arc<cairn_shared::io::backbone::Backbone>>,
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topology")
            .field("node_id", &self.node_id)
            .field("region", &self.region)
            .finish()
    }
}

impl Topology {
    fn hubs(&self) -> serde_json::Value {
        #[cfg(feature = "backbone")]
        if let Some(backbone) = &self.backbone {
            return json!(backbone.hubs());
        }
        json!([])
    }

    #[cfg(feature = "backbone")]
    fn joined(&self) -> bool {
        self.backbone.is_some()
    }

    #[cfg(not(feature = "backbone"))]
    fn joined(&self) -> bool {
        false
    }

    fn backbone_metrics(&self) -> serde_json::Value {
        let m = &self.metrics;
        json!({
            "joined": self.joined(),
            "hubs_seen": m.hubs_seen.get(),
            "hubs_connected": m.hubs_connected.get(),
            "samples_delivered": m.samples_delivered.get(),
            "samples_oversized": m.samples_oversized.get(),
            "samples_dropped": m.samples_dropped.get(),
            "publish_errors": m.publish_errors.get(),
            "links_attached": m.links_attached.get(),
        })
    }
}

/// `GET /v1/topology`: this hub, its region, the policy, and every other hub it sees.
pub fn router(topology: Topology) -> Router {
    Router::new().route("/v1/topology", get(topology_route)).with_state(topology)
}

async fn topology_route(State(topology): State<Topology>) -> impl IntoResponse {
    Json(json!({
        "node_id": topology.node_id.to_string(),
        "region": topology.region,
        "agent_address": topology.agent_address,
        "replication": *topology.policy,
        "hubs": topology.hubs(),
        "backbone": topology.backbone_metrics(),
    }))
}

/// Wraps the document routes so that a collection this hub's region does not hold is refused
/// with `421 Misdirected Request` and the regions where it lives, instead of being served.
pub fn refuse_unheld(router: Router, topology: Topology) -> Router {
    router.layer(axum::middleware::from_fn_with_state(topology, check_collection))
}

async fn check_collection(
    State(topology): State<Topology>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_owned();
    if let Some(collection) = named_collection(&path) {
        if let Err(refusal) = topology.policy.check(&topology.region, &collection) {
            return refusal_response(&refusal);
        }
        return next.run(request).await;
    }
    let response = next.run(request).await;
    if !is_document_read(&path) || response.status() != StatusCode::OK {
        return response;
    }
    // A document read names its collection only in the answer: check it there.
    let (parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_CHECKED_READ_BYTES).await else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "document too large to check").into_response();
    };
    let collection = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.get("collection").and_then(|c| c.as_str()).map(str::to_owned));
    if let Some(collection) = collection {
        if let Err(refusal) = topology.policy.check(&topology.region, &collection) {
            return refusal_response(&refusal);
        }
    }
    Response::from_parts(parts, axum::body::Body::from(bytes))
}

/// The collection a `/v1/collections/{collection}/...` path names, percent-decoded (clients
/// send the `/` inside a collection name as `%2F`).
fn named_collection(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/v1/collections/")?;
    let segment = rest.split('/').next().filter(|c| !c.is_empty())?;
    percent_decode(segment)
}

/// Decodes `%XX` escapes; `None` for a malformed escape or bytes that are not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `/v1/docs/{id}`, the JSON read that names the document's collection.
fn is_document_read(path: &str) -> bool {
    path.strip_prefix("/v1/docs/").is_some_and(|id| !id.is_empty() && !id.contains('/'))
}

fn refusal_response(refusal: &NotHeldHere) -> Response {
    let body = json!({"error": {
        "code": "collection_not_held_here",
        "message": refusal.to_string(),
        "collection": refusal.collection,
        "region": refusal.region,
        "held_in": refusal.held_in,
    }});
    (StatusCode::MISDIRECTED_REQUEST, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collection_and_document_paths_are_recognised() {
        let named = |path| named_collection(path);
        assert_eq!(
            named("/v1/collections/plant-7%2Fsensors/docs").as_deref(),
            Some("plant-7/sensors")
        );
        assert_eq!(named("/v1/collections/a/docs/automerge").as_deref(), Some("a"));
        assert_eq!(named("/v1/collections/bad%2/docs"), None);
        assert_eq!(named("/v1/docs/x"), None);
        assert!(is_document_read("/v1/docs/abc"));
        assert!(!is_document_read("/v1/docs/abc/history"));
        assert!(!is_document_read("/v1/docs/"));
    }
}
