//! A small blocking client for the Cairn edge agent's local API.
//!
//! Every call is one HTTP request to the agent (or, for the read routes, to a hub). The API
//! is described in full by `GET /v1/openapi.json`; this crate covers it with typed answers:
//!
//! ```no_run
//! use cairn_client::{ApiClient, FeedFilter, WriteOptions};
//! use serde_json::json;
//! use std::time::Duration;
//!
//! # fn main() -> Result<(), cairn_client::Error> {
//! let api = ApiClient::new("http://127.0.0.1:7780");
//! let written = api.create_with(
//!     "plant-7/sensors",
//!     &json!({"name": "pump"}),
//!     WriteOptions::hub(Duration::from_secs(2)),
//! )?;
//! if !written.reached {
//!     // Committed on the device; the hub has not confirmed it yet.
//! }
//! let events = api.changes(0, &FeedFilter::All, Duration::from_secs(10))?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use ureq::http;

/// Largest answer body read, in bytes (exports of large documents are the big ones).
const MAX_ANSWER_BYTES: u64 = 64 * 1024 * 1024;
/// Time budget of one request, beyond any long-poll wait it asks the server for.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a write stream may take end to end: it carries many writes.
const STREAM_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request did not complete: connection refused or reset, timeout.
    #[error("{method} {url}: {source}")]
    Transport {
        /// HTTP method.
        method: String,
        /// The full URL.
        url: String,
        /// What went wrong.
        #[source]
        source: ureq::Error,
    },
    /// The node answered with an error, or with a status this call does not expect.
    #[error("answer {status} {code}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The API's stable error code (empty if the body was not an API error).
        code: String,
        /// The message for people (or the raw body).
        message: String,
    },
    /// The answer does not have the shape the API describes.
    #[error("unexpected answer body: {0}")]
    Decode(#[from] serde_json::Error),
    /// [`ApiClient::send`] was asked for a method it does not speak.
    #[error("unsupported method {0}")]
    Method(String),
}

impl Error {
    /// The HTTP status, if the node answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The API's error code (`not_found`, `bad_json`, ...), if the node answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Api { code, .. } if !code.is_empty() => Some(code),
            _ => None,
        }
    }
}

/// Status and JSON body of one API call, whatever the status.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    /// HTTP status.
    pub status: u16,
    /// The body, parsed as JSON (`Null` when empty or not JSON).
    pub body: Value,
}

/// A document as the API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DocView {
    /// The document id (bs58check).
    pub id: String,
    /// Its collection.
    pub collection: String,
    /// Its heads, as hex.
    pub heads: Vec<String>,
    /// The materialized JSON.
    pub doc: Value,
}

/// How durable a write must be before it is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Committed on the device (the default).
    #[default]
    Local,
    /// Committed by the hub.
    Hub,
    /// Committed by hubs in this many regions (at most 255).
    Regions(u32),
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local => f.write_str("local"),
            Self::Hub => f.write_str("hub"),
            Self::Regions(n) => write!(f, "regions:{n}"),
        }
    }
}

/// The durability a write asks for, and how long the node may wait for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriteOptions {
    /// The level.
    pub durability: Durability,
    /// Longest wait for the level before the node answers `202` (node default: 5 s).
    pub timeout: Option<Duration>,
}

impl WriteOptions {
    /// Answered once the hub has committed the write, or with `202` after `timeout`.
    pub fn hub(timeout: Duration) -> Self {
        Self { durability: Durability::Hub, timeout: Some(timeout) }
    }

    /// Answered once hubs in `regions` regions have committed the write, or with `202` after
    /// `timeout`.
    pub fn regions(regions: u32, timeout: Duration) -> Self {
        Self { durability: Durability::Regions(regions), timeout: Some(timeout) }
    }

    fn query(&self) -> Vec<(&'static str, String)> {
        let mut query = vec![("durability", self.durability.to_string())];
        if let Some(timeout) = self.timeout {
            query.push(("timeout_ms", timeout.as_millis().to_string()));
        }
        query
    }
}

/// Which durability levels a write has reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DurabilityReport {
    /// Committed on the device.
    pub local: bool,
    /// Committed by the hub (`None` when a local write did not ask).
    #[serde(default)]
    pub hub: Option<bool>,
    /// Regions whose hubs have committed it, as far as the node knows (empty when a local
    /// write did not ask).
    #[serde(default)]
    pub regions: Vec<String>,
}

/// The answer to a write.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Written {
    /// The document.
    pub id: String,
    /// Its `automerge:` URL (creations only).
    #[serde(default)]
    pub url: Option<String>,
    /// Its heads after the write, as hex.
    pub heads: Vec<String>,
    /// The levels reached when the node answered (creations and edits only).
    #[serde(default)]
    pub durability: Option<DurabilityReport>,
    /// Where to poll the durability when the level was not reached in time.
    #[serde(default)]
    pub status_url: Option<String>,
    /// The requested level was reached before the answer (`false` for a `202`). The write
    /// happened either way.
    #[serde(skip)]
    pub reached: bool,
}

/// One write of an ordered stream (see [`ApiClient::write_stream`]).
#[derive(Debug, Clone, Copy)]
pub enum StreamWrite<'a> {
    /// Operations applied as one change, as [`ApiClient::edit`] takes them (a JSON array).
    Ops(&'a Value),
    /// Raw Automerge bytes merged in, as [`ApiClient::import`] takes them.
    Automerge(&'a [u8]),
}

/// The body of a write stream: one NDJSON line per write. Built apart from the request so
/// that a caller can prepare it ahead of time.
pub fn stream_body<'a>(writes: impl IntoIterator<Item = StreamWrite<'a>>) -> Vec<u8> {
    use base64::Engine;
    let mut body = Vec::new();
    for write in writes {
        let line = match write {
            StreamWrite::Ops(ops) => json!({ "ops": ops }),
            StreamWrite::Automerge(bytes) => {
                json!({ "automerge": base64::engine::general_purpose::STANDARD.encode(bytes) })
            }
        };
        body.extend_from_slice(line.to_string().as_bytes());
        body.push(b'\n');
    }
    body
}

/// What a write stream did: the writes before the first failure are durable, none after it
/// was applied.
#[derive(Debug)]
pub struct StreamOutcome {
    /// Writes durable, counted from the first line.
    pub written: usize,
    /// The document's heads after the last durable write (empty if none was written).
    pub heads: Vec<String>,
    /// The line (counted from 1) that failed, and why.
    pub failed: Option<(usize, Error)>,
}

/// One document in a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocSummary {
    /// The document.
    pub id: String,
    /// Its heads, as hex.
    pub heads: Vec<String>,
    /// HLC time of its last committed change (64-bit NTP value).
    pub hlc: u64,
    /// The same time in RFC 3339.
    pub time: String,
}

/// A page of a collection's documents, in id order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    /// The documents.
    pub docs: Vec<DocSummary>,
    /// Pass as `after` for the next page; `None` on the last one.
    pub next: Option<String>,
}

/// One change in a document's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The change hash, hex.
    pub hash: String,
    /// The Automerge actor that made it, hex.
    pub actor: String,
    /// Its sequence number for that actor.
    pub seq: u64,
    /// Commit time in Unix seconds.
    pub time_secs: i64,
    /// The commit message, if any.
    pub message: Option<String>,
    /// The changes it depends on, hex.
    pub deps: Vec<String>,
}

/// A page of a document's history, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// The changes.
    pub changes: Vec<Change>,
    /// How many changes the document has in all.
    pub total: usize,
    /// Where this page starts.
    pub offset: usize,
}

/// One change-feed event: a document reached new heads on this node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FeedEvent {
    /// Position in the feed; resume after it.
    pub cursor: u64,
    /// The document.
    pub doc_id: String,
    /// Its collection.
    pub collection: String,
    /// Its heads after the change, as hex.
    pub heads: Vec<String>,
    /// The node the change came from (this node for local writes, else the delivering peer).
    pub origin: String,
    /// HLC time of the commit (64-bit NTP value).
    pub hlc: u64,
    /// The same time in RFC 3339.
    pub time: String,
    /// The change deleted the document.
    pub deleted: bool,
}

/// Which change-feed events to receive.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum FeedFilter {
    /// Every event.
    #[default]
    All,
    /// Events of one collection.
    Collection(String),
    /// Events of one document.
    Doc(String),
}

/// The hub link as an agent sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubStatus {
    /// A hub connection is up.
    pub connected: bool,
    /// The connected hub's node id.
    #[serde(default)]
    pub id: Option<String>,
    /// When the hub last confirmed everything (RFC 3339), if ever.
    pub last_sync: Option<String>,
    /// Documents with changes the hub has not confirmed.
    pub documents_pending: u64,
}

/// A node's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The node id.
    pub node: String,
    /// The hub link.
    pub hub: HubStatus,
    /// Peers with a completed handshake.
    pub connected_peers: u64,
    /// Documents held.
    pub documents: u64,
    /// The node's hybrid logical clock (RFC 3339).
    pub clock: String,
    /// Size of the store on disk.
    pub store_bytes: u64,
    /// The newest change-feed cursor.
    pub feed_cursor: u64,
}

/// Talks to one node's HTTP API. Cheap to clone; clones share connections.
#[derive(Debug, Clone)]
pub struct ApiClient {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

/// A finished exchange: status and raw body.
struct Raw {
    status: u16,
    body: Vec<u8>,
}

impl Raw {
    fn json<T: for<'de> Deserialize<'de>>(&self) -> Result<T, Error> {
        Ok(serde_json::from_slice(&self.body)?)
    }

    /// `Ok` for one of `expected`, else the API error the body describes.
    fn expect(self, expected: &[u16]) -> Result<Self, Error> {
        if expected.contains(&self.status) {
            return Ok(self);
        }
        let parsed: Option<Value> = serde_json::from_slice(&self.body).ok();
        let field =
            |name: &str| parsed.as_ref().and_then(|v| v["error"][name].as_str()).map(str::to_owned);
        Err(Error::Api {
            status: self.status,
            code: field("code").unwrap_or_default(),
            message: field("message")
                .unwrap_or_else(|| String::from_utf8_lossy(&self.body).into_owned()),
        })
    }
}

impl ApiClient {
    /// A client for `base`, such as `http://127.0.0.1:7780`.
    pub fn new(base: impl Into<String>) -> Self {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(REQUEST_TIMEOUT))
            .build();
        let base = base.into().trim_end_matches('/').to_owned();
        Self { base, token: None, agent: ureq::Agent::new_with_config(config) }
    }

    /// Sends `Authorization: Bearer <token>` with every request (agents configured with
    /// `api_token`).
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn exchange(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Raw, Error> {
        let url = format!("{}{}", self.base, path);
        let transport =
            |source| Error::Transport { method: method.to_owned(), url: url.clone(), source };
        let mut builder = http::Request::builder().method(method).uri(&url);
        if let Some(token) = &self.token {
            builder = builder.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if let Some(content_type) = content_type {
            builder = builder.header(http::header::CONTENT_TYPE, content_type);
        }
        let response = match body {
            Some(body) => {
                let request = builder.body(body).map_err(|e| transport(e.into()))?;
                let request =
                    self.agent.configure_request(request).timeout_global(Some(timeout)).build();
                self.agent.run(request)
            }
            None => {
                let request = builder.body(()).map_err(|e| transport(e.into()))?;
                let request =
                    self.agent.configure_request(request).timeout_global(Some(timeout)).build();
                self.agent.run(request)
            }
        };
        let mut response = response.map_err(transport)?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER_BYTES)
            .read_to_vec()
            .map_err(transport)?;
        Ok(Raw { status, body })
    }

    fn get(&self, path: &str) -> Result<Raw, Error> {
        self.get_waiting(path, REQUEST_TIMEOUT)
    }

    /// A GET, tried a second time on a transport error: a node may close a kept-alive
    /// connection without saying so (after refusing an oversized body, for one), and reads
    /// are safe to repeat.
    fn get_waiting(&self, path: &str, timeout: Duration) -> Result<Raw, Error> {
        match self.exchange("GET", path, None, None, timeout) {
            Err(Error::Transport { source: ureq::Error::Io(_), .. }) => {
                self.exchange("GET", path, None, None, timeout)
            }
            other => other,
        }
    }

    fn post_json(&self, path: &str, body: &Value) -> Result<Raw, Error> {
        let body = body.to_string();
        self.exchange(
            "POST",
            path,
            Some("application/json"),
            Some(body.as_bytes()),
            REQUEST_TIMEOUT,
        )
    }

    fn post_bytes(&self, path: &str, bytes: &[u8]) -> Result<Raw, Error> {
        self.exchange("POST", path, Some("application/octet-stream"), Some(bytes), REQUEST_TIMEOUT)
    }

    /// Sends a request with an optional JSON body; any status is returned, not turned into an
    /// error. `path` is sent as given (no encoding), starting with `/`.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<ApiResponse, Error> {
        if !["GET", "POST", "DELETE", "PUT", "PATCH"].contains(&method) {
            return Err(Error::Method(method.to_owned()));
        }
        let content_type = body.map(|_| "application/json");
        let raw = match (method, body) {
            ("GET", None) => self.get(path)?,
            _ => self.exchange(method, path, content_type, body, REQUEST_TIMEOUT)?,
        };
        let body = serde_json::from_slice(&raw.body).unwrap_or(Value::Null);
        Ok(ApiResponse { status: raw.status, body })
    }

    /// Creates a document from a JSON object (durable on the device); returns its id.
    pub fn create(&self, collection: &str, content: &Value) -> Result<String, Error> {
        Ok(self.create_with(collection, content, WriteOptions::default())?.id)
    }

    /// Creates a document, answered once it is durable at `options`' level or at its timeout
    /// (then [`Written::reached`] is `false` and [`Written::status_url`] says where to poll).
    pub fn create_with(
        &self,
        collection: &str,
        content: &Value,
        options: WriteOptions,
    ) -> Result<Written, Error> {
        let path = format!(
            "/v1/collections/{}/docs{}",
            encode(collection),
            query_string(&options.query())
        );
        written(self.post_json(&path, content)?, 201)
    }

    /// Creates a document from Automerge bytes (a saved document or changes).
    pub fn create_from_bytes(&self, collection: &str, bytes: &[u8]) -> Result<Written, Error> {
        let path = format!("/v1/collections/{}/docs/automerge", encode(collection));
        written(self.post_bytes(&path, bytes)?, 201)
    }

    /// Applies `ops` (a JSON array of operations) as one change; returns the new heads.
    pub fn edit(&self, id: &str, ops: &Value) -> Result<Vec<String>, Error> {
        Ok(self.edit_with(id, ops, WriteOptions::default())?.heads)
    }

    /// Applies `ops` as one change, answered as [`ApiClient::create_with`] describes.
    pub fn edit_with(
        &self,
        id: &str,
        ops: &Value,
        options: WriteOptions,
    ) -> Result<Written, Error> {
        let mut body = json!({"ops": ops, "durability": options.durability.to_string()});
        if let Some(timeout) = options.timeout {
            body["timeout_ms"] = json!(timeout.as_millis() as u64);
        }
        written(self.post_json(&format!("/v1/docs/{}/ops", encode(id)), &body)?, 200)
    }

    /// Reads a document; `None` if this node does not have it (yet).
    pub fn read(&self, id: &str) -> Result<Option<DocView>, Error> {
        let raw = self.get(&format!("/v1/docs/{}", encode(id)))?;
        if raw.status == 404 {
            return Ok(None);
        }
        raw.expect(&[200])?.json().map(Some)
    }

    /// Reads a document, treating every failure as "not there" (for polling a node that
    /// restarts).
    pub fn try_read(&self, id: &str) -> Option<DocView> {
        self.read(id).ok().flatten()
    }

    /// Reads a document as it was at `heads`.
    pub fn read_at(&self, id: &str, heads: &[String]) -> Result<DocView, Error> {
        let query = query_string(&[("heads", heads.join(","))]);
        self.get(&format!("/v1/docs/{}{query}", encode(id)))?.expect(&[200])?.json()
    }

    /// A page of at most `limit` documents of `collection`, after the id `after`.
    pub fn list(&self, collection: &str, after: Option<&str>, limit: usize) -> Result<Page, Error> {
        let mut query = vec![("limit", limit.to_string())];
        if let Some(after) = after {
            query.push(("after", after.to_owned()));
        }
        let path = format!("/v1/collections/{}/docs{}", encode(collection), query_string(&query));
        self.get(&path)?.expect(&[200])?.json()
    }

    /// Deletes a document (a tombstone change that replicates); later reads answer `410`.
    pub fn delete(&self, id: &str) -> Result<Written, Error> {
        let raw = self.exchange(
            "DELETE",
            &format!("/v1/docs/{}", encode(id)),
            None,
            None,
            REQUEST_TIMEOUT,
        )?;
        written(raw, 200)
    }

    /// A page of a document's change history, oldest first.
    pub fn history(&self, id: &str, offset: usize, limit: usize) -> Result<History, Error> {
        let query = query_string(&[("offset", offset.to_string()), ("limit", limit.to_string())]);
        self.get(&format!("/v1/docs/{}/history{query}", encode(id)))?.expect(&[200])?.json()
    }

    /// The document as Automerge bytes (a saved document).
    pub fn export(&self, id: &str) -> Result<Vec<u8>, Error> {
        Ok(self.get(&format!("/v1/docs/{}/automerge", encode(id)))?.expect(&[200])?.body)
    }

    /// Merges Automerge bytes (a saved document or changes) into an existing document.
    pub fn import(&self, id: &str, bytes: &[u8]) -> Result<Written, Error> {
        written(self.post_bytes(&format!("/v1/docs/{}/automerge", encode(id)), bytes)?, 200)
    }

    /// Sends a whole stream of writes to one document in one request (`body` from
    /// [`stream_body`]). The agent applies them in order as they arrive, without a round trip
    /// or an fsync per write, and answers once all are durable or one failed.
    pub fn write_stream(&self, id: &str, body: &[u8]) -> Result<StreamOutcome, Error> {
        #[derive(Deserialize)]
        struct Answer {
            written: usize,
            heads: Vec<String>,
            #[serde(default)]
            line: Option<usize>,
        }
        let path = format!("/v1/docs/{}/writes", encode(id));
        let raw =
            self.exchange("POST", &path, Some("application/x-ndjson"), Some(body), STREAM_TIMEOUT)?;
        let answer: Answer = match raw.json() {
            Ok(answer) => answer,
            // Not a stream's answer (a bad id, an unknown route): the plain API error.
            Err(_) => {
                return Err(raw.expect(&[200]).err().unwrap_or(Error::Api {
                    status: 200,
                    code: String::new(),
                    message: "an answer without a stream's fields".into(),
                }))
            }
        };
        let failed = match answer.line {
            Some(line) => raw.expect(&[200]).err().map(|error| (line, error)),
            None => None,
        };
        Ok(StreamOutcome { written: answer.written, heads: answer.heads, failed })
    }

    /// Which levels the changes up to `heads` of a document have reached now.
    pub fn durability(&self, id: &str, heads: &[String]) -> Result<DurabilityReport, Error> {
        let query = query_string(&[("heads", heads.join(","))]);
        self.get(&format!("/v1/docs/{}/durability{query}", encode(id)))?.expect(&[200])?.json()
    }

    /// Hub link, pending documents, clock, store size and feed position.
    pub fn status(&self) -> Result<Status, Error> {
        self.get("/v1/status")?.expect(&[200])?.json()
    }

    /// Change-feed events after `cursor`, waiting up to `wait` (at most 60 s) when there are
    /// none yet: an empty answer means nothing happened in that time. Resume with the last
    /// event's cursor; a saved cursor stays valid across restarts of either side.
    pub fn changes(
        &self,
        cursor: u64,
        filter: &FeedFilter,
        wait: Duration,
    ) -> Result<Vec<FeedEvent>, Error> {
        self.changes_page(cursor, filter, wait, None)
    }

    /// Like [`ApiClient::changes`], with at most `limit` events (1 to 1000).
    pub fn changes_page(
        &self,
        cursor: u64,
        filter: &FeedFilter,
        wait: Duration,
        limit: Option<usize>,
    ) -> Result<Vec<FeedEvent>, Error> {
        let mut query =
            vec![("cursor", cursor.to_string()), ("wait_ms", wait.as_millis().to_string())];
        match filter {
            FeedFilter::All => {}
            FeedFilter::Collection(c) => query.push(("collection", c.clone())),
            FeedFilter::Doc(d) => query.push(("doc", d.clone())),
        }
        if let Some(limit) = limit {
            query.push(("limit", limit.to_string()));
        }
        let path = format!("/v1/changes{}", query_string(&query));
        let raw = self.get_waiting(&path, REQUEST_TIMEOUT + wait)?.expect(&[200])?;
        parse_ndjson(&raw.body)
    }

    /// The Prometheus metrics text.
    pub fn metrics(&self) -> Result<String, Error> {
        let raw = self.get("/metrics")?.expect(&[200])?;
        Ok(String::from_utf8_lossy(&raw.body).into_owned())
    }

    /// The value of one metric without labels, if present.
    pub fn metric(&self, name: &str) -> Result<Option<f64>, Error> {
        let text = self.metrics()?;
        Ok(text.lines().find_map(|line| {
            let (key, value) = line.split_once(' ')?;
            (key == name).then(|| value.trim().parse().ok()).flatten()
        }))
    }
}

/// A write's answer: `done` or `202` (level not reached in time), else an error.
fn written(raw: Raw, done: u16) -> Result<Written, Error> {
    let raw = raw.expect(&[done, 202])?;
    let mut written: Written = raw.json()?;
    written.reached = raw.status == done;
    Ok(written)
}

fn parse_ndjson(body: &[u8]) -> Result<Vec<FeedEvent>, Error> {
    body.split(|&b| b == b'\n')
        .filter(|line| !line.trim_ascii().is_empty())
        .map(|line| Ok(serde_json::from_slice(line)?))
        .collect()
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so a collection such as
/// `plant-7/sensors` stays one path segment.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn query_string(pairs: &[(&str, String)]) -> String {
    let joined: Vec<String> =
        pairs.iter().map(|(key, value)| format!("{key}={}", encode(value))).collect();
    if joined.is_empty() {
        String::new()
    } else {
        format!("?{}", joined.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collections_with_slashes_stay_one_segment() {
        assert_eq!(encode("plant-7/sensors"), "plant-7%2Fsensors");
        assert_eq!(encode("a b?c"), "a%20b%3Fc");
    }

    #[test]
    fn durability_levels_print_as_the_api_spells_them() {
        assert_eq!(Durability::Local.to_string(), "local");
        assert_eq!(Durability::Hub.to_string(), "hub");
        assert_eq!(Durability::Regions(2).to_string(), "regions:2");
    }

    #[test]
    fn ndjson_skips_blank_lines_and_rejects_garbage() {
        let line = r#"{"cursor":3,"doc_id":"d","collection":"c","heads":["h"],"origin":"n","hlc":1,"time":"t","deleted":false}"#;
        let events = parse_ndjson(format!("{line}\n\n{line}\n").as_bytes()).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].cursor, 3);
        assert!(parse_ndjson(b"{not json}\n").is_err());
    }

    #[test]
    fn api_errors_carry_code_and_message() {
        let raw = Raw {
            status: 404,
            body: br#"{"error":{"code":"not_found","message":"gone"}}"#.to_vec(),
        };
        let error = raw.expect(&[200]).err().unwrap();
        assert_eq!(error.status(), Some(404));
        assert_eq!(error.code(), Some("not_found"));
        let raw = Raw { status: 502, body: b"bad gateway".to_vec() };
        let error = raw.expect(&[200]).err().unwrap();
        assert_eq!(error.code(), None);
        assert!(error.to_string().contains("bad gateway"));
    }
}
