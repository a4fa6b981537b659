//! Built-in job kinds as pure functions over JSON, so every node that runs a job computes the
//! same result from the same inputs.
//!
//! - `window_stats`: a numeric time series in a document, aggregated into fixed windows
//!   (count, min, max, mean, sum).
//! - `export_ndjson`: a collection's documents as newline-delimited JSON.
//! - `compact`: the runner writes the input's current state as a fresh document with a
//!   one-change history; [`compact_summary`] describes what it did.
//!
//! Any other kind of the form `exec:<name>` runs an executable the node's operator
//! allow-listed under that name; nodes advertise each such name as the label
//! [`exec_label`], which the job then requires.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Value};

use super::record::MAX_OUTPUT_BYTES;

/// Most windows one `window_stats` result holds.
pub const MAX_WINDOWS: usize = 10_000;
/// Most documents one `export_ndjson` job exports.
pub const MAX_EXPORT_DOCS: usize = 10_000;
/// Job kinds of the form `exec:<name>` run the executable allow-listed as `name`.
pub const EXEC_KIND_PREFIX: &str = "exec:";

/// A built-in job kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuiltIn {
    /// Window statistics of a numeric time series.
    WindowStats,
    /// A document's current state as a fresh document with one change.
    Compact,
    /// A collection as NDJSON.
    ExportNdjson,
}

impl BuiltIn {
    /// The built-in kind named `kind`, if it is one.
    pub fn parse(kind: &str) -> Option<Self> {
        match kind {
            "window_stats" => Some(Self::WindowStats),
            "compact" => Some(Self::Compact),
            "export_ndjson" => Some(Self::ExportNdjson),
            _ => None,
        }
    }
}

/// The executable name of an `exec:<name>` kind.
pub fn exec_name(kind: &str) -> Option<&str> {
    kind.strip_prefix(EXEC_KIND_PREFIX).filter(|name| !name.is_empty())
}

/// The label (key, value) a node carries when it may run executable `name`.
pub fn exec_label(name: &str) -> (String, String) {
    (format!("{EXEC_KIND_PREFIX}{name}"), "yes".to_owned())
}

/// Why an operator could not produce a result. Deterministic: every node fails the same way.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum OperatorError {
    /// The parameters do not fit the kind.
    #[error("bad parameters: {0}")]
    Params(String),
    /// The input is not what the kind needs.
    #[error("bad input: {0}")]
    Input(String),
    /// The result would exceed its bound.
    #[error("result too large: {0}")]
    TooLarge(String),
}

/// Parameters of `window_stats`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct WindowParams {
    /// Map keys leading to the series (a list) in the input document. Default `["series"]`.
    #[serde(default = "default_series_path")]
    path: Vec<String>,
    /// Field of a point holding its time. Default `t`.
    #[serde(default = "default_time_field")]
    time_field: String,
    /// Field of a point holding its value. Default `v`.
    #[serde(default = "default_value_field")]
    value_field: String,
    /// Window length, in the series' time unit; windows start at multiples of it.
    window: f64,
}

fn default_series_path() -> Vec<String> {
    vec!["series".into()]
}
fn default_time_field() -> String {
    "t".into()
}
fn default_value_field() -> String {
    "v".into()
}

/// Running statistics of one window.
#[derive(Debug, Clone, Copy)]
struct Window {
    count: u64,
    min: f64,
    max: f64,
    sum: f64,
}

/// Aggregates the series in `doc` into windows of `params.window`. Points are objects with
/// a time and a value field, `[time, value]` pairs, or bare numbers (time = position).
/// Points without a finite numeric time and value are counted as skipped.
pub fn window_stats(doc: &Value, params: &Value) -> Result<Value, OperatorError> {
    let params: WindowParams =
        serde_json::from_value(params.clone()).map_err(|e| OperatorError::Params(e.to_string()))?;
    if !(params.window.is_finite() && params.window > 0.0) {
        return Err(OperatorError::Params("window must be a positive number".into()));
    }
    let series = params
        .path
        .iter()
        .try_fold(doc, |value, name| value.get(name))
        .and_then(Value::as_array)
        .ok_or_else(|| OperatorError::Input(format!("no list at {:?}", params.path)))?;
    let mut windows: BTreeMap<i64, Window> = BTreeMap::new();
    let mut skipped = 0u64;
    for (position, point) in series.iter().enumerate() {
        let Some((time, value)) = point_of(point, position, &params) else {
            skipped += 1;
            continue;
        };
        let index = (time / params.window).floor();
        if !(i64::MIN as f64..i64::MAX as f64).contains(&index) {
            skipped += 1;
            continue;
        }
        let window = windows.entry(index as i64).or_insert(Window {
            count: 0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            sum: 0.0,
        });
        window.count += 1;
        window.min = window.min.min(value);
        window.max = window.max.max(value);
        window.sum += value;
        if windows.len() > MAX_WINDOWS {
            return Err(OperatorError::TooLarge(format!("more than {MAX_WINDOWS} windows")));
        }
    }
    let rows: Vec<Value> = windows
        .iter()
        .map(|(&index, w)| {
            let start = index as f64 * params.window;
            json!({
                "start": start,
                "end": start + params.window,
                "count": w.count,
                "min": w.min,
                "max": w.max,
                "sum": w.sum,
                "mean": w.sum / w.count as f64,
            })
        })
        .collect();
    Ok(
        json!({"window": params.window, "points": series.len() as u64 - skipped, "skipped": skipped, "windows": rows}),
    )
}

fn point_of(point: &Value, position: usize, params: &WindowParams) -> Option<(f64, f64)> {
    let (time, value) = match point {
        Value::Number(value) => (position as f64, value.as_f64()?),
        Value::Array(pair) if pair.len() == 2 => (pair[0].as_f64()?, pair[1].as_f64()?),
        Value::Object(fields) => {
            (fields.get(&params.time_field)?.as_f64()?, fields.get(&params.value_field)?.as_f64()?)
        }
        _ => return None,
    };
    (time.is_finite() && value.is_finite()).then_some((time, value))
}

/// Parameters of `export_ndjson`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportParams {
    /// The collection to export.
    pub collection: String,
}

impl ExportParams {
    /// Reads the parameters of an `export_ndjson` job.
    pub fn parse(params: &Value) -> Result<Self, OperatorError> {
        serde_json::from_value(params.clone()).map_err(|e| OperatorError::Params(e.to_string()))
    }
}

/// The documents `(id, content)` of a collection, in id order, as NDJSON: one line
/// `{"id", "doc"}` per document. Fails past [`MAX_OUTPUT_BYTES`].
pub fn export_ndjson(collection: &str, docs: &[(String, Value)]) -> Result<Value, OperatorError> {
    let mut sorted: Vec<&(String, Value)> = docs.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut ndjson = String::new();
    for (id, doc) in sorted {
        ndjson.push_str(&json!({"id": id, "doc": doc}).to_string());
        ndjson.push('\n');
        if ndjson.len() > MAX_OUTPUT_BYTES {
            return Err(OperatorError::TooLarge(format!(
                "the export exceeds {MAX_OUTPUT_BYTES} bytes"
            )));
        }
    }
    Ok(json!({"collection": collection, "count": docs.len(), "ndjson": ndjson}))
}

/// What a `compact` job reports: the input's history length and stored size before, and the
/// document that now holds its state with a single change.
pub fn compact_summary(
    input: &str,
    changes_before: usize,
    bytes_before: usize,
    compacted: &str,
    bytes_after: usize,
) -> Value {
    json!({
        "input": input,
        "changes_before": changes_before,
        "bytes_before": bytes_before,
        "compacted": compacted,
        "changes_after": 1,
        "bytes_after": bytes_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_stats_aggregate_every_point_shape() {
        let doc = json!({"series": [
            {"t": 0, "v": 1.0}, {"t": 5, "v": 3.0}, [10, 10.0], {"t": 19.5, "v": -2},
            {"t": "bad", "v": 1}, "nope"
        ]});
        let result = window_stats(&doc, &json!({"window": 10})).unwrap();
        assert_eq!(result["points"], 4);
        assert_eq!(result["skipped"], 2);
        let windows = result["windows"].as_array().unwrap();
        assert_eq!(windows.len(), 2);
        assert_eq!(
            windows[0],
            json!({"start": 0.0, "end": 10.0, "count": 2, "min": 1.0, "max": 3.0, "sum": 4.0, "mean": 2.0})
        );
        assert_eq!(windows[1]["count"], 2);
        assert_eq!(windows[1]["sum"], 8.0);

        let bare = window_stats(
            &json!({"x": {"y": [1, 2, 3]}}),
            &json!({"window": 2, "path": ["x", "y"]}),
        )
        .unwrap();
        assert_eq!(bare["windows"][0]["sum"], 3.0, "times 0 and 1");
    }

    #[test]
    fn window_stats_refuse_bad_parameters_and_inputs() {
        let doc = json!({"series": [1]});
        for params in
            [json!({}), json!({"window": 0}), json!({"window": -1}), json!({"window": 1, "x": 1})]
        {
            assert!(
                matches!(window_stats(&doc, &params), Err(OperatorError::Params(_))),
                "{params}"
            );
        }
        let missing = window_stats(&json!({"other": 1}), &json!({"window": 1}));
        assert!(matches!(missing, Err(OperatorError::Input(_))));
        let many: Vec<Value> = (0..=MAX_WINDOWS as u64).map(|t| json!([t, 1])).collect();
        let too_many = window_stats(&json!({"series": many}), &json!({"window": 1}));
        assert!(matches!(too_many, Err(OperatorError::TooLarge(_))));
    }

    #[test]
    fn export_is_in_id_order_and_bounded() {
        let docs = vec![("b".to_owned(), json!({"n": 2})), ("a".to_owned(), json!({"n": 1}))];
        let result = export_ndjson("c", &docs).unwrap();
        assert_eq!(
            result["ndjson"],
            "{\"doc\":{\"n\":1},\"id\":\"a\"}\n{\"doc\":{\"n\":2},\"id\":\"b\"}\n"
        );
        let big = vec![("a".to_owned(), json!("x".repeat(MAX_OUTPUT_BYTES)))];
        assert!(matches!(export_ndjson("c", &big), Err(OperatorError::TooLarge(_))));
    }

    #[test]
    fn kinds_parse() {
        assert_eq!(BuiltIn::parse("compact"), Some(BuiltIn::Compact));
        assert_eq!(BuiltIn::parse("exec:x"), None);
        assert_eq!(exec_name("exec:resize"), Some("resize"));
        assert_eq!(exec_name("exec:"), None);
    }
}
