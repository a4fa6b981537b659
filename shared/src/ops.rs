//! JSON edit operations from the local API, applied to a document as one Automerge change.
//!
//! All operations of a request are applied in one transaction: if any of them fails, the
//! transaction is rolled back and the document is untouched.

use automerge::transaction::{CommitOptions, Transactable, Transaction};
use automerge::{AutomergeError, ObjId, ObjType, ReadDoc, ScalarValue, TextEncoding, Value, ROOT};
use serde::Deserialize;
use serde_json::Value as Json;

/// Most operations accepted in one change.
pub const MAX_OPS_PER_CHANGE: usize = 10_000;

/// Deepest nesting of paths and values accepted.
pub const MAX_NESTING_DEPTH: usize = 64;

/// One step of a path: a map key or a list/text index.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum PathSegment {
    /// A list or text index.
    Index(usize),
    /// A map key.
    Key(String),
}

/// How a JSON value is stored, for values where JSON alone is ambiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ValueKind {
    /// Infer from the JSON: strings become collaborative text, as in Automerge's JavaScript API.
    #[default]
    Auto,
    /// A string stored as an atomic scalar (last writer wins) rather than as text.
    String,
    /// An integer stored as a counter, so that concurrent increments add up.
    Counter,
}

/// One edit operation.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Op {
    /// Put a value at a map key or replace a list element.
    Set {
        /// Where; the last segment names the key or index.
        path: Vec<PathSegment>,
        /// The value (objects and arrays create nested maps and lists).
        value: Json,
        /// How to store the value.
        #[serde(default)]
        kind: ValueKind,
    },
    /// Remove a map key or a list element.
    Delete {
        /// Where; the last segment names the key or index.
        path: Vec<PathSegment>,
    },
    /// Insert a value into a list.
    Insert {
        /// The list.
        path: Vec<PathSegment>,
        /// Position, 0 to the list's length.
        index: usize,
        /// The value.
        value: Json,
        /// How to store the value.
        #[serde(default)]
        kind: ValueKind,
    },
    /// Delete and insert characters in a text.
    Splice {
        /// The text.
        path: Vec<PathSegment>,
        /// Position in characters.
        index: usize,
        /// How many characters to delete.
        #[serde(default)]
        delete: usize,
        /// What to insert.
        #[serde(default)]
        text: String,
    },
    /// Add to a counter.
    Increment {
        /// The counter.
        path: Vec<PathSegment>,
        /// The amount (may be negative).
        by: i64,
    },
}

/// Why an operation cannot be applied. Nothing of the request was applied.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum OpError {
    /// Too many operations or too deep a path or value.
    #[error("{0}")]
    OverLimit(String),
    /// The path is empty where a key or index is required.
    #[error("op {op}: path must not be empty")]
    EmptyPath {
        /// Index of the failing op in the request.
        op: usize,
    },
    /// Nothing at the path.
    #[error("op {op}: nothing at path {path}")]
    NotFound {
        /// Index of the failing op.
        op: usize,
        /// The path, as JSON.
        path: String,
    },
    /// The object at the path is not of the type the operation needs.
    #[error("op {op}: {path} is {found}, expected {expected}")]
    WrongType {
        /// Index of the failing op.
        op: usize,
        /// The path, as JSON.
        path: String,
        /// What the op needs.
        expected: &'static str,
        /// What is there.
        found: String,
    },
    /// An index past the end of a list or text.
    #[error("op {op}: index {index} is out of range for {path} of length {length}")]
    OutOfRange {
        /// Index of the failing op.
        op: usize,
        /// The path, as JSON.
        path: String,
        /// The index asked for.
        index: usize,
        /// The object's length.
        length: usize,
    },
    /// A value that cannot be stored (for example a counter that is not an integer).
    #[error("op {op}: {reason}")]
    BadValue {
        /// Index of the failing op.
        op: usize,
        /// What is wrong.
        reason: String,
    },
    /// Automerge refused the operation.
    #[error("op {op}: {reason}")]
    Rejected {
        /// Index of the failing op.
        op: usize,
        /// Automerge's error.
        reason: String,
    },
}

/// Applies `ops` to `doc` as one change; returns `Ok(false)` if they changed nothing.
///
/// `commit_time_secs` is advisory metadata stored in the change.
pub fn apply_ops(
    doc: &mut automerge::Automerge,
    ops: &[Op],
    commit_time_secs: i64,
) -> Result<bool, OpError> {
    if ops.len() > MAX_OPS_PER_CHANGE {
        return Err(OpError::OverLimit(format!(
            "{} ops, at most {MAX_OPS_PER_CHANGE} per change",
            ops.len()
        )));
    }
    let encoding = doc.text_encoding();
    let mut tx = doc.transaction();
    let mut text_target = None;
    for (index, op) in ops.iter().enumerate() {
        if let Err(error) = apply_op(&mut tx, index, op, &mut text_target, encoding) {
            tx.rollback();
            return Err(error);
        }
    }
    if tx.pending_ops() == 0 {
        tx.rollback();
        return Ok(false);
    }
    tx.commit_with(CommitOptions::default().with_time(commit_time_secs));
    Ok(true)
}

/// The text object the last splice resolved its path to, and its length after it. A run of
/// splices into one text (an editor's keystrokes) resolves the path and asks Automerge for
/// the length once; any other op may replace the object at that path, so it forgets both.
#[derive(Debug)]
struct TextTarget<'a> {
    path: &'a [PathSegment],
    obj: ObjId,
    /// `None` where the length cannot be counted here (grapheme clusters depend on the
    /// characters around an insertion).
    length: Option<usize>,
}

/// The length of `text` in the units the document counts text in, where that does not
/// depend on the text around it.
fn text_units(text: &str, encoding: TextEncoding) -> Option<usize> {
    match encoding {
        TextEncoding::UnicodeCodePoint => Some(text.chars().count()),
        TextEncoding::Utf8CodeUnit => Some(text.len()),
        TextEncoding::Utf16CodeUnit => Some(text.encode_utf16().count()),
        TextEncoding::GraphemeCluster => None,
    }
}

fn apply_op<'a>(
    tx: &mut Transaction<'_>,
    op_index: usize,
    op: &'a Op,
    text_target: &mut Option<TextTarget<'a>>,
    encoding: TextEncoding,
) -> Result<(), OpError> {
    if !matches!(op, Op::Splice { .. }) {
        *text_target = None;
    }
    let path = match op {
        Op::Set { path, .. }
        | Op::Delete { path }
        | Op::Insert { path, .. }
        | Op::Splice { path, .. }
        | Op::Increment { path, .. } => path,
    };
    if path.first() == Some(&PathSegment::Key(crate::document::TOMBSTONE_KEY.to_owned())) {
        return Err(OpError::BadValue { op: op_index, reason: "that key is reserved".into() });
    }
    let rejected = |e: AutomergeError| OpError::Rejected { op: op_index, reason: e.to_string() };
    match op {
        Op::Set { path, value, kind } => {
            let (parent, last) = split_path(op_index, path)?;
            let (obj, obj_type) = resolve(tx, op_index, parent)?;
            match (obj_type, last) {
                (ObjType::Map, PathSegment::Key(key)) => {
                    put_value(tx, op_index, &obj, Slot::Key(key), value, *kind, 0)
                }
                (ObjType::List, PathSegment::Index(i)) => {
                    check_index(tx, op_index, path, &obj, *i, false)?;
                    put_value(tx, op_index, &obj, Slot::Replace(*i), value, *kind, 0)
                }
                (found, _) => Err(wrong_type(
                    op_index,
                    parent,
                    "a map (with a key) or a list (with an index)",
                    found,
                )),
            }
        }
        Op::Delete { path } => {
            let (parent, last) = split_path(op_index, path)?;
            let (obj, obj_type) = resolve(tx, op_index, parent)?;
            match (obj_type, last) {
                (ObjType::Map, PathSegment::Key(key)) => {
                    if tx.get(&obj, key.as_str()).map_err(rejected)?.is_none() {
                        return Err(OpError::NotFound { op: op_index, path: path_json(path) });
                    }
                    tx.delete(&obj, key.as_str()).map_err(rejected)
                }
                (ObjType::List, PathSegment::Index(i)) => {
                    check_index(tx, op_index, path, &obj, *i, false)?;
                    tx.delete(&obj, *i).map_err(rejected)
                }
                (found, _) => Err(wrong_type(
                    op_index,
                    parent,
                    "a map (with a key) or a list (with an index)",
                    found,
                )),
            }
        }
        Op::Insert { path, index, value, kind } => {
            let (obj, obj_type) = resolve(tx, op_index, path)?;
            if obj_type != ObjType::List {
                return Err(wrong_type(op_index, path, "a list", obj_type));
            }
            check_index(tx, op_index, path, &obj, *index, true)?;
            put_value(tx, op_index, &obj, Slot::Insert(*index), value, *kind, 0)
        }
        Op::Splice { path, index, delete, text } => {
            let (obj, known_length) = match text_target.take() {
                Some(target) if target.path == path.as_slice() => (target.obj, target.length),
                _ => {
                    let (obj, obj_type) = resolve(tx, op_index, path)?;
                    if obj_type != ObjType::Text {
                        return Err(wrong_type(op_index, path, "text", obj_type));
                    }
                    (obj, None)
                }
            };
            let length = known_length.unwrap_or_else(|| tx.length(&obj));
            let after = text_units(text, encoding)
                .map(|inserted| length.saturating_sub(*delete).saturating_add(inserted));
            *text_target =
                Some(TextTarget { path: path.as_slice(), obj: obj.clone(), length: after });
            if *index > length || delete.saturating_add(*index) > length {
                let past = index.saturating_add(*delete);
                return Err(OpError::OutOfRange {
                    op: op_index,
                    path: path_json(path),
                    index: past,
                    length,
                });
            }
            let delete = isize::try_from(*delete).map_err(|_| OpError::BadValue {
                op: op_index,
                reason: "delete count too large".into(),
            })?;
            tx.splice_text(&obj, *index, delete, text).map_err(rejected)
        }
        Op::Increment { path, by } => {
            let (parent, last) = split_path(op_index, path)?;
            let (obj, _) = resolve(tx, op_index, parent)?;
            let current = match last {
                PathSegment::Key(key) => tx.get(&obj, key.as_str()),
                PathSegment::Index(i) => tx.get(&obj, *i),
            }
            .map_err(rejected)?;
            match current {
                Some((Value::Scalar(s), _)) if matches!(s.as_ref(), ScalarValue::Counter(_)) => {
                    match last {
                        PathSegment::Key(key) => tx.increment(&obj, key.as_str(), *by),
                        PathSegment::Index(i) => tx.increment(&obj, *i, *by),
                    }
                    .map_err(rejected)
                }
                Some((value, _)) => Err(OpError::WrongType {
                    op: op_index,
                    path: path_json(path),
                    expected: "a counter",
                    found: describe(&value),
                }),
                None => Err(OpError::NotFound { op: op_index, path: path_json(path) }),
            }
        }
    }
}

/// Where a value goes in its parent.
enum Slot<'a> {
    Key(&'a str),
    Replace(usize),
    Insert(usize),
}

fn put_value(
    tx: &mut Transaction<'_>,
    op: usize,
    obj: &ObjId,
    slot: Slot<'_>,
    value: &Json,
    kind: ValueKind,
    depth: usize,
) -> Result<(), OpError> {
    if depth > MAX_NESTING_DEPTH {
        return Err(OpError::OverLimit(format!(
            "op {op}: value nested deeper than {MAX_NESTING_DEPTH}"
        )));
    }
    let rejected = |e: AutomergeError| OpError::Rejected { op, reason: e.to_string() };
    let object_type = match (value, kind) {
        (Json::Object(_), _) => Some(ObjType::Map),
        (Json::Array(_), _) => Some(ObjType::List),
        (Json::String(_), ValueKind::Auto) => Some(ObjType::Text),
        _ => None,
    };
    let Some(object_type) = object_type else {
        let scalar = scalar(op, value, kind)?;
        return match slot {
            Slot::Key(key) => tx.put(obj, key, scalar),
            Slot::Replace(i) => tx.put(obj, i, scalar),
            Slot::Insert(i) => tx.insert(obj, i, scalar),
        }
        .map_err(rejected);
    };
    let child = match slot {
        Slot::Key(key) => tx.put_object(obj, key, object_type),
        Slot::Replace(i) => tx.put_object(obj, i, object_type),
        Slot::Insert(i) => tx.insert_object(obj, i, object_type),
    }
    .map_err(rejected)?;
    match value {
        Json::Object(fields) => {
            for (key, field) in fields {
                put_value(tx, op, &child, Slot::Key(key), field, ValueKind::Auto, depth + 1)?;
            }
        }
        Json::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                put_value(tx, op, &child, Slot::Insert(i), item, ValueKind::Auto, depth + 1)?;
            }
        }
        Json::String(text) => tx.splice_text(&child, 0, 0, text).map_err(rejected)?,
        _ => {}
    }
    Ok(())
}

fn scalar(op: usize, value: &Json, kind: ValueKind) -> Result<ScalarValue, OpError> {
    let bad = |reason: &str| OpError::BadValue { op, reason: reason.to_owned() };
    Ok(match (value, kind) {
        (Json::Number(n), ValueKind::Counter) => {
            ScalarValue::counter(n.as_i64().ok_or_else(|| bad("a counter must be an integer"))?)
        }
        (_, ValueKind::Counter) => return Err(bad("a counter must be an integer")),
        (Json::String(s), _) => ScalarValue::Str(s.as_str().into()),
        (Json::Null, _) => ScalarValue::Null,
        (Json::Bool(b), _) => ScalarValue::Boolean(*b),
        (Json::Number(n), _) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => ScalarValue::Int(i),
            (None, Some(u), _) => ScalarValue::Uint(u),
            (_, _, Some(f)) => ScalarValue::F64(f),
            _ => return Err(bad("number out of range")),
        },
        (Json::Object(_) | Json::Array(_), _) => {
            return Err(bad("kind \"string\" needs a string value"))
        }
    })
}

fn split_path(op: usize, path: &[PathSegment]) -> Result<(&[PathSegment], &PathSegment), OpError> {
    match path.split_last() {
        Some((last, parent)) => Ok((parent, last)),
        None => Err(OpError::EmptyPath { op }),
    }
}

/// Walks `path` from the root to an object; fails if any step is missing or not an object.
fn resolve(
    tx: &Transaction<'_>,
    op: usize,
    path: &[PathSegment],
) -> Result<(ObjId, ObjType), OpError> {
    if path.len() > MAX_NESTING_DEPTH {
        return Err(OpError::OverLimit(format!("op {op}: path deeper than {MAX_NESTING_DEPTH}")));
    }
    let mut current = (ROOT, ObjType::Map);
    for (depth, segment) in path.iter().enumerate() {
        let here = &path[..=depth];
        let found = match (current.1, segment) {
            (ObjType::Map | ObjType::Table, PathSegment::Key(key)) => {
                tx.get(&current.0, key.as_str())
            }
            (ObjType::List, PathSegment::Index(i)) => {
                check_index(tx, op, here, &current.0, *i, false)?;
                tx.get(&current.0, *i)
            }
            (found, _) => {
                return Err(wrong_type(
                    op,
                    &path[..depth],
                    "a map or list matching the path segment",
                    found,
                ))
            }
        }
        .map_err(|e| OpError::Rejected { op, reason: e.to_string() })?;
        current = match found {
            Some((Value::Object(obj_type), id)) => (id, obj_type),
            Some((value, _)) => {
                return Err(OpError::WrongType {
                    op,
                    path: path_json(here),
                    expected: "an object",
                    found: describe(&value),
                })
            }
            None => return Err(OpError::NotFound { op, path: path_json(here) }),
        };
    }
    Ok(current)
}

fn check_index(
    tx: &Transaction<'_>,
    op: usize,
    path: &[PathSegment],
    obj: &ObjId,
    index: usize,
    inserting: bool,
) -> Result<(), OpError> {
    let length = tx.length(obj);
    let in_range = if inserting { index <= length } else { index < length };
    if in_range {
        Ok(())
    } else {
        Err(OpError::OutOfRange { op, path: path_json(path), index, length })
    }
}

fn wrong_type(op: usize, path: &[PathSegment], expected: &'static str, found: ObjType) -> OpError {
    OpError::WrongType {
        op,
        path: path_json(path),
        expected,
        found: format!("a {}", obj_type_name(found)),
    }
}

fn obj_type_name(obj_type: ObjType) -> &'static str {
    match obj_type {
        ObjType::Map | ObjType::Table => "map",
        ObjType::List => "list",
        ObjType::Text => "text",
    }
}

fn describe(value: &Value<'_>) -> String {
    match value {
        Value::Object(t) => format!("a {}", obj_type_name(*t)),
        Value::Scalar(s) => format!("a scalar ({})", s.as_ref()),
    }
}

fn path_json(path: &[PathSegment]) -> String {
    let parts: Vec<Json> = path
        .iter()
        .map(|segment| match segment {
            PathSegment::Key(k) => Json::String(k.clone()),
            PathSegment::Index(i) => Json::from(*i),
        })
        .collect();
    Json::Array(parts).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ops(value: Json) -> Vec<Op> {
        serde_json::from_value(value).unwrap()
    }

    fn materialize(doc: &automerge::Automerge) -> Json {
        serde_json::to_value(automerge::AutoSerde::from(doc)).unwrap()
    }

    #[test]
    fn every_op_kind_applies_as_one_change() {
        let mut doc = automerge::Automerge::new();
        let batch = ops(json!([
            {"op": "set", "path": ["title"], "value": "hello"},
            {"op": "set", "path": ["tags"], "value": ["a", "b"]},
            {"op": "set", "path": ["hits"], "value": 1, "kind": "counter"},
            {"op": "set", "path": ["mode"], "value": "fast", "kind": "string"},
        ]));
        assert_eq!(apply_ops(&mut doc, &batch, 0), Ok(true));
        let batch = ops(json!([
            {"op": "splice", "path": ["title"], "index": 5, "text": " world"},
            {"op": "insert", "path": ["tags"], "index": 2, "value": {"nested": true}},
            {"op": "delete", "path": ["tags", 0]},
            {"op": "increment", "path": ["hits"], "by": 4},
            {"op": "delete", "path": ["mode"]},
        ]));
        assert_eq!(apply_ops(&mut doc, &batch, 0), Ok(true));
        assert_eq!(doc.get_changes(&[]).len(), 2);
        assert_eq!(
            materialize(&doc),
            json!({"title": "hello world", "tags": ["b", {"nested": true}], "hits": 5})
        );
    }

    #[test]
    fn a_failing_op_applies_nothing() {
        let mut doc = automerge::Automerge::new();
        apply_ops(&mut doc, &ops(json!([{"op": "set", "path": ["list"], "value": [1]}])), 0)
            .unwrap();
        let heads = doc.get_heads();
        let cases = [
            (
                json!([{"op": "set", "path": ["x"], "value": 1}, {"op": "insert", "path": ["list"], "index": 5, "value": 2}]),
                "out of range",
            ),
            (
                json!([{"op": "set", "path": ["x"], "value": 1}, {"op": "splice", "path": ["list"], "index": 0, "text": "a"}]),
                "expected text",
            ),
            (json!([{"op": "increment", "path": ["list"], "by": 1}]), "expected a counter"),
            (json!([{"op": "delete", "path": ["missing"]}]), "nothing at path"),
            (json!([{"op": "set", "path": [], "value": 1}]), "must not be empty"),
            (json!([{"op": "set", "path": ["a", "b"], "value": 1}]), "nothing at path"),
            (json!([{"op": "set", "path": ["c"], "value": 1.5, "kind": "counter"}]), "integer"),
        ];
        for (batch, expected) in cases {
            let error = apply_ops(&mut doc, &ops(batch.clone()), 0).unwrap_err();
            assert!(error.to_string().contains(expected), "{batch}: {error}");
            assert_eq!(doc.get_heads(), heads, "{batch} must apply nothing");
        }
    }

    #[test]
    fn a_run_of_splices_keeps_the_length_it_checks_against_true() {
        for encoding in [
            TextEncoding::UnicodeCodePoint,
            TextEncoding::Utf8CodeUnit,
            TextEncoding::Utf16CodeUnit,
            TextEncoding::GraphemeCluster,
        ] {
            let mut doc = automerge::Automerge::new_with_encoding(encoding);
            apply_ops(&mut doc, &ops(json!([{"op": "set", "path": ["t"], "value": ""}])), 0)
                .unwrap();
            let units = |s: &str| text_units(s, encoding).unwrap_or(s.chars().count());
            let (ab, e) = ("ab", "\u{e9}\u{1f600}");
            let run = json!([
                {"op": "splice", "path": ["t"], "index": 0, "text": ab},
                {"op": "splice", "path": ["t"], "index": units(ab), "text": e},
                {"op": "splice", "path": ["t"], "index": 1, "delete": 1, "text": "x"},
            ]);
            assert_eq!(apply_ops(&mut doc, &ops(run), 0), Ok(true), "{encoding:?}");
            assert_eq!(materialize(&doc)["t"], json!("ax\u{e9}\u{1f600}"), "{encoding:?}");
            let length = units("ax\u{e9}\u{1f600}");
            let past_end = json!([
                {"op": "splice", "path": ["t"], "index": 0, "text": "y"},
                {"op": "splice", "path": ["t"], "index": length + 2, "text": "z"},
            ]);
            let error = apply_ops(&mut doc, &ops(past_end), 0).unwrap_err();
            assert!(
                matches!(error, OpError::OutOfRange { length: l, .. } if l == length + 1),
                "{encoding:?}: {error}"
            );
            let at_end = json!([
                {"op": "splice", "path": ["t"], "index": 0, "text": "y"},
                {"op": "splice", "path": ["t"], "index": length + 1, "text": "z"},
            ]);
            assert_eq!(apply_ops(&mut doc, &ops(at_end), 0), Ok(true), "{encoding:?}");
        }
    }

    #[test]
    fn unknown_ops_and_fields_do_not_parse() {
        assert!(serde_json::from_value::<Vec<Op>>(json!([{"op": "explode", "path": []}])).is_err());
        assert!(serde_json::from_value::<Vec<Op>>(
            json!([{"op": "delete", "path": [], "extra": 1}])
        )
        .is_err());
    }
}
