//! `POST /v1/docs/{id}/writes`: an ordered stream of writes to one document in one request.
//!
//! The body is NDJSON, one write per line: `{"ops": [...]}` (one change, as `/ops` takes it)
//! or `{"automerge": "<base64>"}` (raw Automerge bytes, as `/automerge` takes them). Each
//! line goes to the node as soon as it has arrived, without waiting for the one before to be
//! durable, so the node applies the next write while the store commits the last and commits
//! many writes per fsync (group commit); a writer that waits for every answer pays an fsync
//! and a round trip per write instead. Every 250 ms the stream lets the writes in flight
//! commit, so peers hear of the document while it is being written. The answer comes once
//! every write is durable.
//!
//! Order is kept: writes are applied in the order of their lines, and once one fails, the
//! later ones are not applied (the node refuses them for this stream). The answer then names
//! the line that failed and how many writes before it are durable.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;

use super::doc_api::{ApiError, ApiState, MAX_BODY_BYTES};
use super::driver::{Answer, NodeHandle};
use crate::ids::DocId;
use crate::node::{self, Request, StreamId};
use crate::ops::Op;

/// Largest body of one stream, in bytes. Lines are handled as they arrive, so this bounds
/// the request's duration, not memory.
pub const MAX_STREAM_BYTES: usize = 1024 * 1024 * 1024;

/// Most writes in one stream.
pub const MAX_STREAM_WRITES: usize = 1_000_000;

/// Most writes sent to the node and not yet answered: enough to keep the store committing
/// in groups, few enough that a slow store pushes back on the writer.
const MAX_IN_FLIGHT: usize = 256;

/// Fewest writes kept in flight: the next is applied while the last commits.
const MIN_IN_FLIGHT: usize = 2;

/// Most bytes of lines sent to the node and not yet answered.
const MAX_IN_FLIGHT_BYTES: usize = 32 * 1024 * 1024;

/// How often the stream lets every write in flight commit before sending more. A node
/// offers a document to its peers only when none of its appends is in flight, so without
/// these short pauses (one commit's latency each) peers would hear of a streamed document
/// only once the stream ends. As long as the default sync batch window: a peer would not be
/// sent the document more often anyway.
const SETTLE_EVERY: Duration = Duration::from_millis(250);

/// One line of the body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamLine {
    ops: Option<Vec<Op>>,
    automerge: Option<String>,
}

/// A write sent to the node, waiting for its answer.
#[derive(Debug)]
struct InFlight {
    line: usize,
    bytes: usize,
    answer: Answer,
}

/// Where the stream stands.
#[derive(Debug)]
struct Progress {
    doc_id: DocId,
    stream: StreamId,
    node: NodeHandle,
    in_flight: VecDeque<InFlight>,
    in_flight_bytes: usize,
    /// Writes answered as durable, in line order.
    written: usize,
    /// The heads after the last durable write.
    heads: Vec<String>,
    /// The first line that failed, and why.
    failed: Option<(usize, ApiError)>,
    /// When every write sent so far was last settled.
    settled_at: Instant,
    /// Writes answered since then, which measure how fast the node takes them.
    answered_since_settled: usize,
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.node.end_stream(self.stream, self.doc_id);
    }
}

impl Progress {
    /// Sends one line's write to the node, after making room among the writes in flight.
    async fn send(&mut self, line: usize, text: &[u8]) {
        let request = match parse_line(self.doc_id, text) {
            Ok(request) => request,
            Err(error) => return self.fail(line, error),
        };
        if self.settled_at.elapsed() >= SETTLE_EVERY {
            self.settle_all().await;
            self.settled_at = Instant::now();
            self.answered_since_settled = 0;
        }
        while self.in_flight.len() >= self.in_flight_limit()
            || (self.in_flight_bytes + text.len() > MAX_IN_FLIGHT_BYTES
                && !self.in_flight.is_empty())
        {
            self.settle_oldest().await;
        }
        let write = Request::InStream { stream: self.stream, write: Box::new(request) };
        match self.node.submit(write).await {
            Ok(answer) => {
                self.in_flight_bytes += text.len();
                self.in_flight.push_back(InFlight { line, bytes: text.len(), answer });
            }
            Err(error) => self.fail(line, error.into()),
        }
    }

    /// How many writes to keep in flight: as many as the node answers in [`SETTLE_EVERY`]
    /// at the rate it has been answering, so the queue ahead of other work (a peer's
    /// heartbeat, another client) stays short whether writes take microseconds or a second.
    fn in_flight_limit(&self) -> usize {
        let elapsed = self.settled_at.elapsed().as_secs_f64();
        if self.answered_since_settled == 0 || elapsed <= 0.0 {
            return MIN_IN_FLIGHT;
        }
        let per_window = self.answered_since_settled as f64 / elapsed * SETTLE_EVERY.as_secs_f64();
        (per_window as usize).clamp(MIN_IN_FLIGHT, MAX_IN_FLIGHT)
    }

    /// Waits for the oldest write in flight.
    async fn settle_oldest(&mut self) {
        let Some(InFlight { line, bytes, answer }) = self.in_flight.pop_front() else { return };
        self.in_flight_bytes -= bytes;
        let before_failure = self.failed.as_ref().is_none_or(|(failed, _)| line < *failed);
        self.answered_since_settled += 1;
        match answer.await {
            Ok(node::Response::Written { heads, .. }) if before_failure => {
                self.written += 1;
                self.heads = heads;
            }
            Ok(_) => {}
            // Writes after a failed one are refused by the node; the first failure is kept.
            Err(error) => self.fail(line, error.into()),
        }
    }

    fn fail(&mut self, line: usize, error: ApiError) {
        if self.failed.as_ref().is_none_or(|(first, _)| line < *first) {
            self.failed = Some((line, error));
        }
    }

    async fn settle_all(&mut self) {
        while !self.in_flight.is_empty() {
            self.settle_oldest().await;
        }
    }
}

fn parse_line(doc_id: DocId, text: &[u8]) -> Result<Request, ApiError> {
    let line: StreamLine = serde_json::from_slice(text)
        .map_err(|e| ApiError::bad_request("bad_json", e.to_string()))?;
    match (line.ops, line.automerge) {
        (Some(ops), None) => Ok(Request::Edit { doc_id, ops }),
        (None, Some(encoded)) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|e| ApiError::bad_request("bad_base64", e.to_string()))?;
            Ok(Request::Import { doc_id, collection: None, bytes })
        }
        _ => Err(ApiError::bad_request(
            "bad_write",
            "each line holds exactly one of \"ops\" and \"automerge\"",
        )),
    }
}

/// The handler: reads lines as they arrive, sends each to the node, answers once all are
/// durable (200) or with the first failure (its status) and what was written before it.
pub(super) async fn write_stream(
    State(ApiState { node, .. }): State<ApiState>,
    Path(id): Path<String>,
    body: Body,
) -> Response {
    let doc_id = match id.parse::<DocId>() {
        Ok(doc_id) => doc_id,
        Err(e) => return ApiError::bad_request("bad_id", format!("{e}")).into_response(),
    };
    let stream = node.new_stream();
    let mut progress = Progress {
        doc_id,
        stream,
        node,
        in_flight: VecDeque::new(),
        in_flight_bytes: 0,
        written: 0,
        heads: Vec::new(),
        failed: None,
        settled_at: Instant::now(),
        answered_since_settled: 0,
    };
    let mut chunks = body.into_data_stream();
    let mut pending: Vec<u8> = Vec::new();
    let mut line = 0;
    let mut received = 0usize;
    'read: while progress.failed.is_none() {
        let chunk = match chunks.next().await {
            Some(Ok(chunk)) => chunk,
            Some(Err(error)) => {
                let error = ApiError::bad_request("bad_body", error.to_string());
                progress.fail(line + 1, error);
                break;
            }
            None => break,
        };
        received += chunk.len();
        if received > MAX_STREAM_BYTES {
            let message = format!("the stream is over {MAX_STREAM_BYTES} bytes");
            progress
                .fail(line + 1, ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message));
            break;
        }
        let mut rest: &[u8] = &chunk;
        while let Some(end) = rest.iter().position(|b| *b == b'\n') {
            pending.extend_from_slice(&rest[..end]);
            rest = &rest[end + 1..];
            line += 1;
            if !send_pending(&mut progress, line, &mut pending).await {
                break 'read;
            }
        }
        pending.extend_from_slice(rest);
        if pending.len() > MAX_BODY_BYTES {
            let message = format!("line {} is over {MAX_BODY_BYTES} bytes", line + 1);
            let error = ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "line_too_large", message);
            progress.fail(line + 1, error);
            break;
        }
    }
    if progress.failed.is_none() && !pending.is_empty() {
        line += 1;
        send_pending(&mut progress, line, &mut pending).await;
    }
    progress.settle_all().await;
    let (written, heads) = (progress.written, std::mem::take(&mut progress.heads));
    match progress.failed.take() {
        None => Json(json!({"id": doc_id.to_string(), "written": written, "heads": heads}))
            .into_response(),
        Some((line, error)) => {
            error.with_details(json!({"line": line, "written": written, "heads": heads}))
        }
    }
}

/// Sends the line gathered in `pending` (blank lines are skipped); false once the stream
/// must stop.
async fn send_pending(progress: &mut Progress, line: usize, pending: &mut Vec<u8>) -> bool {
    let text = std::mem::take(pending);
    if text.iter().all(u8::is_ascii_whitespace) {
        return true;
    }
    if progress.written + progress.in_flight.len() >= MAX_STREAM_WRITES {
        let message = format!("a stream holds at most {MAX_STREAM_WRITES} writes");
        progress
            .fail(line, ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_many_writes", message));
        return false;
    }
    progress.send(line, &text).await;
    progress.failed.is_none()
}
