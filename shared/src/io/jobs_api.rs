//! The jobs HTTP API: `GET /v1/nodes` (capability profiles), `POST /v1/jobs` (submit),
//! `GET /v1/jobs` (list) and `GET /v1/jobs/{id}` (state, runs, reported result and the
//! score table that chose the node). Agents and hubs serve all of it.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::doc_api::ApiError;
use super::driver::DriverError;
use super::job_runner::{read_doc, Jobs, JobsError};
use super::store_reader::MAX_PAGE;
use crate::ids::DocId;
use crate::jobs::operators::{self, BuiltIn};
use crate::jobs::{self, JobRecord, JobView, ResultEntry, JOBS_COLLECTION};
use crate::node::{Request, RequestError, Response as NodeResponse};
use crate::placement::{Constraints, JobInput, JobSpec, MAX_JOB_INPUTS};

/// The jobs routes.
pub fn router(jobs: Jobs) -> Router {
    Router::new()
        .route("/v1/nodes", get(nodes))
        .route("/v1/jobs", get(list).post(submit))
        .route("/v1/jobs/{id}", get(show))
        .with_state(jobs)
}

impl From<JobsError> for ApiError {
    fn from(error: JobsError) -> Self {
        match error {
            JobsError::Node(error) => error.into(),
            other => ApiError::internal(other.to_string()),
        }
    }
}

async fn nodes(State(jobs): State<Jobs>) -> Result<impl IntoResponse, ApiError> {
    let now = jobs.now().await?;
    let own = jobs.own_profile(now);
    let board = jobs.board();
    let mut profiles = board.profiles().clone();
    profiles.insert(own.node_id, own);
    let rows: Vec<Value> = profiles
        .values()
        .map(|profile| {
            let stale = board.policy().is_stale(profile.measured_at, now);
            let mut row = json!(profile);
            row["stale"] = json!(stale);
            row["doc_id"] = json!(jobs::profile_doc_id(&profile.node_id).to_string());
            row
        })
        .collect();
    Ok(Json(json!({"now": now, "nodes": rows})))
}

/// A job as submitted through the API.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Submission {
    /// Unique id; one is generated when absent.
    id: Option<String>,
    kind: String,
    #[serde(default)]
    params: Value,
    /// Input document ids; each must be on this node.
    #[serde(default)]
    inputs: Vec<String>,
    work_units: f64,
    #[serde(default)]
    sensitivity: f64,
    #[serde(default)]
    constraints: Constraints,
    /// Where the result goes (default: a document in `_cairn.results` derived from the id).
    result_doc: Option<String>,
}

async fn submit(
    State(jobs): State<Jobs>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body.map_err(|e| ApiError::bad_request("bad_body", e.to_string()))?;
    let submission: Submission = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request("bad_json", e.to_string()))?;
    let record = record_of(&jobs, submission).await?;
    let now = record.submitted_at;
    let own = jobs.own_profile(now);
    let placement = jobs
        .board()
        .place_new(&record.spec, record.submitted_by, &own, now)
        .map_err(|e| ApiError::bad_request("bad_job", e.to_string()))?;
    let doc_id = jobs::job_doc_id(&record.spec.id);
    let request = Request::Create {
        doc_id,
        collection: jobs::system_collection(JOBS_COLLECTION),
        ops: JobView::create_ops(&record, &placement),
    };
    match jobs.node().request(request).await {
        Ok(_) => {}
        Err(DriverError::Request(RequestError::AlreadyExists(_))) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "exists",
                format!("job {} exists", record.spec.id),
            ))
        }
        Err(error) => return Err(error.into()),
    }
    let id = record.spec.id.clone();
    let result_doc = record.result_doc;
    jobs.observe_job(JobView { record, placement: Some(placement.clone()), runs: BTreeMap::new() });
    let body = json!({
        "id": id,
        "doc_id": doc_id.to_string(),
        "result_doc": result_doc.to_string(),
        "placement": placement,
    });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// Validates a submission and sizes its inputs, which must be on this node.
async fn record_of(jobs: &Jobs, submission: Submission) -> Result<JobRecord, ApiError> {
    let bad = |message: String| ApiError::bad_request("bad_job", message);
    if submission.inputs.len() > MAX_JOB_INPUTS {
        return Err(bad(format!("at most {MAX_JOB_INPUTS} inputs")));
    }
    let mut constraints = submission.constraints;
    match (BuiltIn::parse(&submission.kind), operators::exec_name(&submission.kind)) {
        (Some(_), _) => {}
        (None, Some(name)) => {
            let (key, value) = operators::exec_label(name);
            constraints.required_labels.insert(key, value);
        }
        (None, None) => return Err(bad(format!("unknown job kind {:?}", submission.kind))),
    }
    let mut inputs = Vec::with_capacity(submission.inputs.len());
    for text in &submission.inputs {
        let doc_id: DocId = text.parse().map_err(|e| bad(format!("input {text:?}: {e}")))?;
        let size_bytes = match jobs.node().request(Request::Export { doc_id }).await {
            Ok(NodeResponse::Bytes(bytes)) => bytes.len() as u64,
            Ok(_) => return Err(ApiError::internal("unexpected answer to an export")),
            Err(error) => return Err(error.into()),
        };
        inputs.push(JobInput { doc_id, size_bytes });
    }
    let id = submission.id.unwrap_or_else(|| {
        let bytes: [u8; 8] = rand::random();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    });
    let result_doc = match &submission.result_doc {
        Some(text) => text.parse().map_err(|e| bad(format!("result_doc: {e}")))?,
        None => jobs::result_doc_id(&id),
    };
    let record = JobRecord {
        spec: JobSpec {
            id,
            kind: submission.kind,
            inputs,
            work_units: submission.work_units,
            sensitivity: submission.sensitivity,
            constraints,
        },
        params: submission.params,
        result_doc,
        submitted_by: jobs.node().node_id(),
        submitted_at: jobs.now().await?,
    };
    record.validate().map_err(|e| bad(e.to_string()))?;
    Ok(record)
}

/// A page of jobs.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Continue after this job id.
    after: Option<String>,
    /// Page size (default 100, at most 1000).
    limit: Option<usize>,
}

async fn list(
    State(jobs): State<Jobs>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let limit = query.limit.unwrap_or(100).clamp(1, MAX_PAGE);
    let board = jobs.board();
    let rows: Vec<Value> = board
        .jobs()
        .range::<str, _>((
            query.after.as_deref().map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded),
            std::ops::Bound::Unbounded,
        ))
        .take(limit)
        .map(|(_, job)| summary(job))
        .collect();
    let next = (rows.len() == limit).then(|| rows.last().map(|row| row["id"].clone())).flatten();
    Ok(Json(json!({"jobs": rows, "next": next})))
}

fn summary(job: &JobView) -> Value {
    let state = if let Some((_, run)) = job.reported() {
        json!(run.state)
    } else if job.runs.is_empty() {
        json!("pending")
    } else {
        json!("claimed")
    };
    json!({
        "id": job.id(),
        "kind": job.record.spec.kind,
        "state": state,
        "reported_node": job.reported().map(|(node, _)| node.to_string()),
        "chosen": job.deciding_placement().and_then(|p| p.chosen).map(|n| n.to_string()),
        "submitted_at": job.record.submitted_at,
    })
}

async fn show(State(jobs): State<Jobs>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let doc_id = jobs::job_doc_id(&id);
    let Some(doc) = read_doc(jobs.node(), doc_id).await? else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("job {id} not found"),
        ));
    };
    let job = JobView::from_doc(&doc).map_err(|e| ApiError::internal(e.to_string()))?;
    let result = read_doc(jobs.node(), job.record.result_doc).await?;
    let reported = job.reported().map(|(node, run)| {
        let entry = result.as_ref().and_then(|doc| ResultEntry::all_in(doc).remove(&node));
        json!({
            "node_id": node.to_string(),
            "claimed_at": run.claimed_at,
            "state": run.state,
            "error": run.error,
            "output": entry.map(|e| e.output),
        })
    });
    let runs: BTreeMap<String, Value> =
        job.runs.iter().map(|(node, run)| (node.to_string(), json!(run))).collect();
    let mut body = summary(&job);
    body["doc_id"] = json!(doc_id.to_string());
    body["record"] = json!(job.record);
    body["placement"] = json!(job.deciding_placement());
    body["submitted_placement"] = json!(job.placement);
    body["runs"] = json!(runs);
    body["reported"] = json!(reported);
    body["result_doc"] = json!(job.record.result_doc.to_string());
    Ok(Json(body).into_response())
}
