//! The change feed over HTTP: `GET /v1/changes` as Server-Sent Events or NDJSON long-poll.
//!
//! Events come from the store's feed table, which is written in the same transaction as the
//! changes, so a subscriber that resumes from its last cursor after a restart of either side
//! sees every event exactly once. Waiting costs nothing: subscribers sleep on the store's
//! feed-head signal and query only when it moves.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use serde::Deserialize;
use tokio::sync::watch;

use super::doc_api::{ApiError, ApiState};
use super::store_reader::{FeedEvent, FeedFilter, StoreReader};

/// Events fetched per store query.
const FEED_BATCH: usize = 256;
/// Longest a long-poll waits for new events.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// Query parameters of `/v1/changes`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedQuery {
    /// Resume after this cursor (default: from the beginning).
    cursor: Option<u64>,
    /// Only this collection.
    collection: Option<String>,
    /// Only this document.
    doc: Option<String>,
    /// Most events in one long-poll answer.
    limit: Option<usize>,
    /// How long a long-poll waits when there is nothing new, in milliseconds.
    wait_ms: Option<u64>,
}

impl FeedQuery {
    fn filter(&self) -> Result<FeedFilter, ApiError> {
        match (&self.collection, &self.doc) {
            (Some(_), Some(_)) => {
                Err(ApiError::bad_request("bad_query", "filter by collection or by doc, not both"))
            }
            (Some(c), None) => c
                .parse()
                .map(FeedFilter::Collection)
                .map_err(|e| ApiError::bad_request("bad_collection", format!("{e}"))),
            (None, Some(d)) => d
                .parse()
                .map(FeedFilter::Document)
                .map_err(|e| ApiError::bad_request("bad_id", format!("{e}"))),
            (None, None) => Ok(FeedFilter::All),
        }
    }
}

/// `GET /v1/changes`: SSE when the client accepts `text/event-stream`, else NDJSON long-poll.
pub async fn changes(
    State(state): State<ApiState>,
    headers: HeaderMap,
    query: Result<Query<FeedQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let filter = query.filter()?;
    let wants_sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    // SSE clients resume with the standard Last-Event-ID header; it wins over the query.
    let last_event_id =
        headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let cursor = last_event_id.or(query.cursor).unwrap_or(0);
    if wants_sse {
        return Ok(
            sse(state.reader.clone(), filter, cursor, state.feed_head.clone()).into_response()
        );
    }
    let limit = query.limit.unwrap_or(FEED_BATCH).clamp(1, super::store_reader::MAX_PAGE);
    let wait = Duration::from_millis(query.wait_ms.unwrap_or(25_000)).min(MAX_WAIT);
    let events =
        long_poll(&state.reader, &filter, cursor, limit, wait, state.feed_head.clone()).await?;
    let mut body = String::new();
    for event in &events {
        body.push_str(&serde_json::to_string(event).unwrap_or_default());
        body.push('\n');
    }
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

async fn read_feed(
    reader: &Arc<StoreReader>,
    filter: &FeedFilter,
    cursor: u64,
    limit: usize,
) -> Result<Vec<FeedEvent>, ApiError> {
    let reader = reader.clone();
    let filter = filter.clone();
    tokio::task::spawn_blocking(move || reader.feed(cursor, &filter, limit))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(e.to_string()))
}

async fn long_poll(
    reader: &Arc<StoreReader>,
    filter: &FeedFilter,
    cursor: u64,
    limit: usize,
    wait: Duration,
    mut feed_head: watch::Receiver<u64>,
) -> Result<Vec<FeedEvent>, ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        // Mark the current head as seen before querying, so a commit in between wakes us.
        feed_head.borrow_and_update();
        let events = read_feed(reader, filter, cursor, limit).await?;
        if !events.is_empty() {
            return Ok(events);
        }
        match tokio::time::timeout_at(deadline, feed_head.changed()).await {
            Ok(Ok(())) => continue,
            Ok(Err(_)) | Err(_) => return Ok(Vec::new()),
        }
    }
}

struct SseState {
    reader: Arc<StoreReader>,
    filter: FeedFilter,
    cursor: u64,
    feed_head: watch::Receiver<u64>,
    pending: VecDeque<FeedEvent>,
}

fn sse(
    reader: Arc<StoreReader>,
    filter: FeedFilter,
    cursor: u64,
    feed_head: watch::Receiver<u64>,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let state = SseState { reader, filter, cursor, feed_head, pending: VecDeque::new() };
    let events = stream::unfold(state, |mut state| async move {
        loop {
            if let Some(event) = state.pending.pop_front() {
                state.cursor = event.cursor;
                let data = serde_json::to_string(&event).unwrap_or_default();
                let sse_event =
                    Event::default().id(event.cursor.to_string()).event("change").data(data);
                return Some((Ok(sse_event), state));
            }
            state.feed_head.borrow_and_update();
            match read_feed(&state.reader, &state.filter, state.cursor, FEED_BATCH).await {
                Ok(events) if !events.is_empty() => state.pending.extend(events),
                Ok(_) => {
                    if state.feed_head.changed().await.is_err() {
                        return None;
                    }
                }
                Err(error) => {
                    tracing::warn!(?error, "change feed query failed; closing the stream");
                    return None;
                }
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}
