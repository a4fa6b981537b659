//! A small blocking client for the document API of agents (and the read route of hubs).

use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;
use serde_json::{json, Value};

/// A document as the API returns it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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

/// Status and JSON body of one API call.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    /// HTTP status.
    pub status: u16,
    /// The body, parsed as JSON (`Null` when empty or not JSON).
    pub body: Value,
}

/// Talks to one node's HTTP API.
#[derive(Debug, Clone)]
pub struct ApiClient {
    base: String,
    agent: ureq::Agent,
}

impl ApiClient {
    /// A client for `base`, such as `http://127.0.0.1:7780`.
    pub fn new(base: impl Into<String>) -> Self {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build();
        Self {
            base: base.into(),
            agent: ureq::Agent::new_with_config(config),
        }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request with a raw body; any status is returned, not turned into an error.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> anyhow::Result<ApiResponse> {
        let url = format!("{}{}", self.base, path);
        let mut response = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            ("POST", Some(body)) => self
                .agent
                .post(&url)
                .content_type("application/json")
                .send(body),
            ("POST", None) => self.agent.post(&url).send_empty(),
            _ => anyhow::bail!("unsupported method {method}"),
        }
        .with_context(|| format!("{method} {url}"))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_string()
            .unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(ApiResponse { status, body })
    }

    /// Creates a document; returns its id.
    pub fn create(&self, collection: &str, content: &Value) -> anyhow::Result<String> {
        let response = self.send(
            "POST",
            &format!("/v1/collections/{collection}/docs"),
            Some(content.to_string().as_bytes()),
        )?;
        anyhow::ensure!(
            response.status == 201,
            "create answered {}: {}",
            response.status,
            response.body
        );
        response.body["id"]
            .as_str()
            .map(str::to_owned)
            .context("create answer has no id")
    }

    /// Applies ops as one change; returns the new heads.
    pub fn edit(&self, id: &str, ops: &Value) -> anyhow::Result<Vec<String>> {
        let body = json!({ "ops": ops }).to_string();
        let response = self.send("POST", &format!("/v1/docs/{id}/ops"), Some(body.as_bytes()))?;
        anyhow::ensure!(
            response.status == 200,
            "edit answered {}: {}",
            response.status,
            response.body
        );
        Ok(serde_json::from_value(response.body["heads"].clone())?)
    }

    /// Reads a document; `None` if this node does not have it (yet).
    pub fn read(&self, id: &str) -> anyhow::Result<Option<DocView>> {
        let response = self.send("GET", &format!("/v1/docs/{id}"), None)?;
        match response.status {
            200 => Ok(Some(serde_json::from_value(response.body)?)),
            404 => Ok(None),
            other => anyhow::bail!("read answered {other}: {}", response.body),
        }
    }

    /// Reads a document, treating connection errors as "not there" (for polling a node that restarts).
    pub fn try_read(&self, id: &str) -> Option<DocView> {
        self.read(id).ok().flatten()
    }

    /// The Prometheus metrics text.
    pub fn metrics(&self) -> anyhow::Result<String> {
        let url = format!("{}/metrics", self.base);
        let mut response = self
            .agent
            .get(&url)
            .call()
            .with_context(|| format!("GET {url}"))?;
        Ok(response.body_mut().read_to_string()?)
    }

    /// The value of one metric without labels, if present.
    pub fn metric(&self, name: &str) -> anyhow::Result<Option<f64>> {
        let text = self.metrics()?;
        Ok(text.lines().find_map(|line| {
            let (key, value) = line.split_once(' ')?;
            (key == name).then(|| value.trim().parse().ok()).flatten()
        }))
    }
}
