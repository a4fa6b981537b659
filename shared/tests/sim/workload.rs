//! What clients do: create documents and edit them with JSON ops generated from the state they
//! just read, so every op is valid when the node applies it.

use cairn_shared::ids::Collection;
use cairn_shared::ops::Op;
use rand::rngs::StdRng;
use rand::Rng;
use serde_json::{json, Value as Json};

const COLLECTIONS: [&str; 2] = ["plant-7/sensors", "fleet/trucks"];
/// ASCII only: text indexes then mean the same in every text encoding.
const WORDS: [&str; 8] = ["pump", "valve", "temp", "ok", "alarm", "flow", "x", "north wing"];
const META_KEYS: [&str; 4] = ["owner", "state", "zone", "note"];

/// A collection for a new document.
pub fn collection(rng: &mut StdRng) -> Collection {
    COLLECTIONS[rng.gen_range(0..COLLECTIONS.len())].parse().expect("valid collection name")
}

/// A new document: text title, list of items, counter of hits, map of metadata.
pub fn create_ops(rng: &mut StdRng) -> Vec<Op> {
    to_ops(json!([
        {"op": "set", "path": ["title"], "value": word(rng)},
        {"op": "set", "path": ["items"], "value": [item(rng)]},
        {"op": "set", "path": ["hits"], "value": 0, "kind": "counter"},
        {"op": "set", "path": ["meta"], "value": {}},
    ]))
}

/// One to three ops against the document's current materialized state.
pub fn edit_ops(rng: &mut StdRng, doc: &Json) -> Vec<Op> {
    let mut shape = Shape::of(doc);
    let count = rng.gen_range(1..=3);
    to_ops(Json::Array((0..count).map(|_| random_op(rng, &mut shape)).collect()))
}

/// The parts of a document the edits touch, updated as a batch is generated, because the ops
/// of one request apply in sequence.
struct Shape {
    title_len: usize,
    items_len: usize,
    meta_keys: Vec<String>,
}

impl Shape {
    fn of(doc: &Json) -> Self {
        let title =
            doc["title"].as_str().unwrap_or_else(|| panic!("document without a text title: {doc}"));
        let items = doc["items"]
            .as_array()
            .unwrap_or_else(|| panic!("document without an item list: {doc}"));
        let meta =
            doc["meta"].as_object().unwrap_or_else(|| panic!("document without a meta map: {doc}"));
        Self {
            title_len: title.len(),
            items_len: items.len(),
            meta_keys: meta.keys().cloned().collect(),
        }
    }
}

fn random_op(rng: &mut StdRng, shape: &mut Shape) -> Json {
    match rng.gen_range(0..10) {
        0..=2 => splice_title(rng, shape),
        3 => replace_title(rng, shape),
        4 => {
            let index = rng.gen_range(0..=shape.items_len);
            shape.items_len += 1;
            json!({"op": "insert", "path": ["items"], "index": index, "value": item(rng)})
        }
        5 if shape.items_len > 0 => {
            let index = rng.gen_range(0..shape.items_len);
            shape.items_len -= 1;
            json!({"op": "delete", "path": ["items", index]})
        }
        6 if shape.items_len > 0 => {
            let index = rng.gen_range(0..shape.items_len);
            json!({"op": "set", "path": ["items", index], "value": item(rng)})
        }
        7 => {
            let key = META_KEYS[rng.gen_range(0..META_KEYS.len())];
            if !shape.meta_keys.iter().any(|k| k == key) {
                shape.meta_keys.push(key.to_owned());
            }
            // A string stored as a scalar is last-writer-wins, unlike text.
            let (value, kind) = if rng.gen_bool(0.5) {
                (json!(rng.gen_range(0..100)), "auto")
            } else {
                (json!(word(rng)), "string")
            };
            json!({"op": "set", "path": ["meta", key], "value": value, "kind": kind})
        }
        8 if !shape.meta_keys.is_empty() => {
            let key = shape.meta_keys.swap_remove(rng.gen_range(0..shape.meta_keys.len()));
            json!({"op": "delete", "path": ["meta", key]})
        }
        _ => json!({"op": "increment", "path": ["hits"], "by": rng.gen_range(-3..=7)}),
    }
}

fn splice_title(rng: &mut StdRng, shape: &mut Shape) -> Json {
    let index = rng.gen_range(0..=shape.title_len);
    let delete = rng.gen_range(0..=(shape.title_len - index).min(3));
    let text = if rng.gen_bool(0.8) { word(rng) } else { "" };
    shape.title_len = shape.title_len - delete + text.len();
    json!({"op": "splice", "path": ["title"], "index": index, "delete": delete, "text": text})
}

/// Replacing the whole text makes concurrent splices of the old text lose, as they should.
fn replace_title(rng: &mut StdRng, shape: &mut Shape) -> Json {
    let text = word(rng);
    shape.title_len = text.len();
    json!({"op": "set", "path": ["title"], "value": text})
}

fn item(rng: &mut StdRng) -> Json {
    match rng.gen_range(0..4) {
        0 => json!(rng.gen_range(-50..50)),
        1 => json!({"sensor": word(rng), "reading": rng.gen_range(0..1000)}),
        2 => json!(word(rng)),
        _ => json!([word(rng), rng.gen_bool(0.5)]),
    }
}

fn word(rng: &mut StdRng) -> &'static str {
    WORDS[rng.gen_range(0..WORDS.len())]
}

fn to_ops(ops: Json) -> Vec<Op> {
    serde_json::from_value(ops).expect("generated ops follow the op schema")
}
