//! Every local API route refuses bad input with a 4xx JSON error, applies nothing, and keeps
//! serving: malformed and oversized bodies, unknown and malformed ids, ops that do not fit the
//! document, bad queries, and requests without the bearer token.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cairn_shared::ids::DocId;
use field_tests::{free_udp_port, Agent, ApiClient, TestDir};
use serde_json::{json, Value};

/// Bigger than the API's 8 MiB body limit.
const OVERSIZED: usize = 9 * 1024 * 1024;

/// What a rejection must leave untouched.
#[derive(Debug, PartialEq)]
struct Snapshot {
    feed_cursor: u64,
    documents: u64,
    doc: Option<(Vec<String>, Value)>,
}

/// One agent (its hub is never started: nothing here needs one) and a document to aim at.
struct Fixture {
    _dir: TestDir,
    agent: Agent,
    /// `{"title": "text", "n": 1, "list": [1], "nested": {"k": "v"}}`.
    id: String,
}

impl Fixture {
    fn new(name: &str) -> anyhow::Result<Self> {
        let dir = TestDir::new(name)?;
        let agent = Agent::start(dir.path(), "agent", nowhere()?)?;
        let id = agent.api.create(
            "notes",
            &json!({"title": "text", "n": 1, "list": [1], "nested": {"k": "v"}}),
        )?;
        Ok(Self { _dir: dir, agent, id })
    }

    fn api(&self) -> &ApiClient {
        &self.agent.api
    }

    fn snapshot(&self) -> Snapshot {
        let status = self.api().status().unwrap();
        let doc = match self.api().read(&self.id) {
            Ok(Some(view)) => Some((view.heads, view.doc)),
            _ => None,
        };
        Snapshot { feed_cursor: status.feed_cursor, documents: status.documents, doc }
    }

    /// Sends a request that must be refused with `status` and `code`, changing nothing.
    fn refused(&self, method: &str, path: &str, body: Option<&[u8]>, status: u16, code: &str) {
        let text = body.map(|b| String::from_utf8_lossy(&b[..b.len().min(120)]).into_owned());
        self.refused_by(&format!("{method} {path} {text:?}"), status, code, || {
            let response = self.api().send(method, path, body).unwrap();
            (response.status, response.body)
        });
    }

    /// Posts an oversized body, which must be refused with 413, changing nothing.
    fn refused_oversized(&self, path: &str, body: Vec<u8>) {
        let what = format!("POST {path} with {} bytes", body.len());
        self.refused_by(&what, 413, "too_large", || post_oversized(self.api(), path, body));
    }

    fn refused_by(&self, what: &str, status: u16, code: &str, send: impl FnOnce() -> (u16, Value)) {
        let before = self.snapshot();
        let (answered, body) = send();
        assert_eq!(answered, status, "{what}: answered {body}");
        assert_eq!(body["error"]["code"], code, "{what}: {body}");
        assert!(
            body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: no message in {body}"
        );
        assert_eq!(self.snapshot(), before, "{what} applied something");
    }

    /// Like [`Fixture::refused`] with a JSON body.
    fn refused_json(&self, method: &str, path: &str, body: &Value, status: u16, code: &str) {
        self.refused(method, path, Some(body.to_string().as_bytes()), status, code);
    }

    /// An edit of the fixture document that must be refused, changing nothing.
    fn refused_ops(&self, ops: Value, status: u16, code: &str) {
        let path = format!("/v1/docs/{}/ops", self.id);
        self.refused_json("POST", &path, &json!({ "ops": ops }), status, code);
    }

    /// A valid write still succeeds after everything that was refused.
    fn still_serves(&self) {
        let before = self.snapshot();
        let heads = self
            .api()
            .edit(&self.id, &json!([{"op": "set", "path": ["after"], "value": true}]))
            .unwrap();
        let after = self.snapshot();
        assert_eq!(after.feed_cursor, before.feed_cursor + 1);
        assert_eq!(after.doc.as_ref().map(|(h, _)| h), Some(&heads));
        let id = self.api().create("notes", &json!({"fresh": 1})).unwrap();
        assert!(self.api().read(&id).unwrap().is_some());
    }
}

/// A hub address nobody listens on.
fn nowhere() -> anyhow::Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], free_udp_port()?)))
}

/// A well-formed document id that no node has.
fn unknown_id() -> String {
    DocId::from_slice(&[7; 16]).unwrap().to_string()
}

fn oversized_json() -> Vec<u8> {
    format!("{{\"blob\": \"{}\"}}", "x".repeat(OVERSIZED)).into_bytes()
}

/// Posts `body` on a fresh connection and reads the answer while still sending it. The agent
/// answers 413 as soon as the body passes the limit and then closes the connection, so a
/// client that reads only after sending everything may see a reset instead of the answer.
fn post_oversized(api: &ApiClient, path: &str, body: Vec<u8>) -> (u16, Value) {
    let addr = api.base().strip_prefix("http://").unwrap().to_owned();
    let stream = TcpStream::connect(&addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let sender = std::thread::spawn(move || {
        // Fails once the agent has closed the connection; the answer is read regardless.
        let _ = writer.write_all(head.as_bytes()).and_then(|()| writer.write_all(&body));
    });
    let mut answer = Vec::new();
    // Ends at the agent's close (or reset); what arrived before stays in `answer`.
    let _ = (&stream).read_to_end(&mut answer);
    sender.join().unwrap();
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").expect("no complete answer");
    let head = String::from_utf8_lossy(&answer[..split]);
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let length = head
        .lines()
        .find_map(|line| {
            line.to_ascii_lowercase().strip_prefix("content-length:")?.trim().parse().ok()
        })
        .unwrap_or(answer.len() - split - 4);
    let body = &answer[split + 4..(split + 4 + length).min(answer.len())];
    (status, serde_json::from_slice(body).unwrap_or(Value::Null))
}

fn nested(depth: usize) -> Value {
    (0..depth).fold(json!(1), |inner, _| json!({ "k": inner }))
}

#[test]
fn create_refuses_what_is_not_a_json_object_in_a_valid_collection() {
    let f = Fixture::new("bad-create").unwrap();
    let docs = "/v1/collections/notes/docs";
    for body in [&b"[1, 2]"[..], b"\"text\"", b"null", b"42", b"{\"a\":", b"", b"\xff\xfe"] {
        f.refused("POST", docs, Some(body), 400, "bad_json");
    }
    // Past serde's recursion limit, and within it but past the ops' nesting limit.
    f.refused_json("POST", docs, &nested(200), 400, "bad_json");
    f.refused_json("POST", docs, &nested(100), 422, "invalid_op");
    f.refused_json("POST", docs, &json!({"_cairn_deleted": true}), 422, "invalid_op");
    let ok = json!({"a": 1});
    for collection in ["bad%21name", "a%2F%2Fb", "%2E%2E", "trailing%2F", &"c".repeat(129)] {
        let path = format!("/v1/collections/{collection}/docs");
        f.refused_json("POST", &path, &ok, 400, "bad_collection");
    }
    f.refused_json("POST", &format!("{docs}?colour=red"), &ok, 400, "bad_query");
    f.refused_json("POST", &format!("{docs}?timeout_ms=soon"), &ok, 400, "bad_query");
    f.refused_json("POST", &format!("{docs}?durability=eventually"), &ok, 400, "bad_durability");
    f.refused_json("POST", &format!("{docs}?durability=regions:0"), &ok, 400, "bad_durability");
    f.refused_oversized(docs, oversized_json());
    let page = f.api().list("notes", None, 100).unwrap();
    assert_eq!(page.docs.len(), 1, "only the fixture document exists: {page:?}");
    f.still_serves();
}

#[test]
fn edit_refuses_unknown_documents_and_ops_that_do_not_fit() {
    let f = Fixture::new("bad-edit").unwrap();
    let set = json!({"ops": [{"op": "set", "path": ["x"], "value": 1}]});
    f.refused_json("POST", &format!("/v1/docs/{}/ops", unknown_id()), &set, 404, "not_found");
    for id in ["not-an-id", "1111", "automerge%3Axyz"] {
        f.refused_json("POST", &format!("/v1/docs/{id}/ops"), &set, 400, "bad_id");
    }
    // Ops on the wrong type of value.
    f.refused_ops(json!([{"op": "increment", "path": ["title"], "by": 1}]), 422, "invalid_op");
    f.refused_ops(json!([{"op": "increment", "path": ["n"], "by": 1}]), 422, "invalid_op");
    f.refused_ops(
        json!([{"op": "splice", "path": ["n"], "index": 0, "text": "x"}]),
        422,
        "invalid_op",
    );
    f.refused_ops(
        json!([{"op": "insert", "path": ["nested"], "index": 0, "value": 1}]),
        422,
        "invalid_op",
    );
    f.refused_ops(json!([{"op": "set", "path": ["n", "deeper"], "value": 1}]), 422, "invalid_op");
    f.refused_ops(json!([{"op": "set", "path": ["nested", 0], "value": 1}]), 422, "invalid_op");
    f.refused_ops(json!([{"op": "set", "path": [], "value": 1}]), 422, "invalid_op");
    // Indexes out of range.
    f.refused_ops(
        json!([{"op": "insert", "path": ["list"], "index": 5, "value": 2}]),
        422,
        "invalid_op",
    );
    f.refused_ops(json!([{"op": "delete", "path": ["list", 1]}]), 422, "invalid_op");
    f.refused_ops(json!([{"op": "set", "path": ["list", 9], "value": 2}]), 422, "invalid_op");
    f.refused_ops(
        json!([{"op": "splice", "path": ["title"], "index": 99, "text": "x"}]),
        422,
        "invalid_op",
    );
    f.refused_ops(
        json!([{"op": "splice", "path": ["title"], "index": 0, "delete": 99}]),
        422,
        "invalid_op",
    );
    f.refused_ops(json!([{"op": "delete", "path": ["missing"]}]), 422, "invalid_op");
    f.refused_ops(
        json!([{"op": "set", "path": ["_cairn_deleted"], "value": true}]),
        422,
        "invalid_op",
    );
    // One change or nothing: a valid op before a bad one is not applied either.
    f.refused_ops(
        json!([
            {"op": "set", "path": ["title2"], "value": "applied?"},
            {"op": "increment", "path": ["n"], "by": 1}
        ]),
        422,
        "invalid_op",
    );
    // Shapes serde refuses: unknown op, unknown fields, wrong types.
    f.refused_ops(json!([{"op": "frobnicate", "path": ["n"]}]), 400, "bad_json");
    f.refused_ops(
        json!([{"op": "set", "path": ["n"], "value": 2, "colour": "red"}]),
        400,
        "bad_json",
    );
    f.refused_ops(json!([{"op": "set", "path": "n", "value": 2}]), 400, "bad_json");
    f.refused_ops(json!([{"op": "set", "path": [-1], "value": 2}]), 400, "bad_json");
    f.refused_ops(json!([{"op": "increment", "path": ["n"], "by": "1"}]), 400, "bad_json");
    f.refused_ops(
        json!([{"op": "set", "path": ["n"], "value": 2, "kind": "float"}]),
        400,
        "bad_json",
    );
    f.refused_ops(json!([{"path": ["n"], "value": 2}]), 400, "bad_json");
    f.refused_ops(json!("set n 2"), 400, "bad_json");
    let path = format!("/v1/docs/{}/ops", f.id);
    f.refused_json("POST", &path, &json!({"ops": [], "extra": 1}), 400, "bad_json");
    f.refused_json("POST", &path, &json!({"op": "set"}), 400, "bad_json");
    f.refused_json("POST", &path, &json!([]), 400, "bad_json");
    f.refused("POST", &path, Some(b"{\"ops\": ["), 400, "bad_json");
    f.refused("POST", &path, None, 400, "bad_json");
    let regions =
        json!({"ops": [{"op": "set", "path": ["x"], "value": 1}], "durability": "regions:999"});
    f.refused_json("POST", &path, &regions, 400, "bad_durability");
    let big = json!({"ops": [{"op": "set", "path": ["blob"], "value": "x".repeat(OVERSIZED)}]});
    f.refused_oversized(&path, big.to_string().into_bytes());
    f.still_serves();
}

#[test]
fn reads_refuse_bad_ids_and_heads() {
    let f = Fixture::new("bad-read").unwrap();
    let heads = f.api().read(&f.id).unwrap().unwrap().heads;
    for path in ["/v1/docs/not-an-id", "/v1/docs/not-an-id/history", "/v1/docs/not-an-id/automerge"]
    {
        f.refused("GET", path, None, 400, "bad_id");
    }
    let unknown = unknown_id();
    for suffix in ["", "/history", "/automerge"] {
        f.refused("GET", &format!("/v1/docs/{unknown}{suffix}"), None, 404, "not_found");
    }
    let doc = format!("/v1/docs/{}", f.id);
    let zeros = "0".repeat(64);
    for bad in ["zz", "abc", &zeros, &format!("{},zz", heads[0])] {
        f.refused("GET", &format!("{doc}?heads={bad}"), None, 400, "bad_heads");
    }
    f.refused("GET", &format!("{doc}?colour=red"), None, 400, "bad_query");
    f.refused("GET", &format!("{doc}/history?limit=many"), None, 400, "bad_query");
    f.refused("GET", &format!("{doc}/history?offset=-1"), None, 400, "bad_query");
    // Durability status.
    let durability = format!("{doc}/durability");
    f.refused("GET", &durability, None, 400, "bad_query");
    f.refused("GET", &format!("{durability}?heads=zz"), None, 400, "bad_heads");
    // Well-formed heads this node does not have are not durable anywhere yet.
    let unknown_heads = f.api().durability(&f.id, std::slice::from_ref(&zeros)).unwrap();
    assert_eq!((unknown_heads.local, unknown_heads.hub), (false, Some(false)));
    f.refused(
        "GET",
        &format!("/v1/docs/{unknown}/durability?heads={}", heads[0]),
        None,
        404,
        "not_found",
    );
    // Listings.
    let list = "/v1/collections/notes/docs";
    f.refused("GET", &format!("{list}?limit=many"), None, 400, "bad_query");
    f.refused("GET", &format!("{list}?limit=-1"), None, 400, "bad_query");
    f.refused("GET", &format!("{list}?colour=red"), None, 400, "bad_query");
    f.refused("GET", &format!("{list}?after=not-an-id"), None, 400, "bad_id");
    f.refused("GET", "/v1/collections/bad%21name/docs", None, 400, "bad_collection");
    // The change feed answers bad queries at once instead of long-polling.
    let started = Instant::now();
    for query in ["cursor=abc", "cursor=-1", "limit=many", "wait_ms=soon", "colour=red"] {
        f.refused("GET", &format!("/v1/changes?{query}"), None, 400, "bad_query");
    }
    let both = format!("/v1/changes?collection=notes&doc={}", f.id);
    f.refused("GET", &both, None, 400, "bad_query");
    f.refused("GET", "/v1/changes?doc=not-an-id", None, 400, "bad_id");
    f.refused("GET", "/v1/changes?collection=bad%21name", None, 400, "bad_collection");
    assert!(started.elapsed() < Duration::from_secs(10), "refusals waited like long-polls");
    // Valid reads still answer.
    assert_eq!(f.api().read_at(&f.id, &heads).unwrap().heads, heads);
    f.still_serves();
}

#[test]
fn deleting_twice_or_an_unknown_document_is_refused() {
    let f = Fixture::new("bad-delete").unwrap();
    f.refused("DELETE", &format!("/v1/docs/{}", unknown_id()), None, 404, "not_found");
    f.refused("DELETE", "/v1/docs/not-an-id", None, 400, "bad_id");
    let victim = f.api().create("notes", &json!({"doomed": true})).unwrap();
    let deleted = f.api().delete(&victim).unwrap();
    assert!(deleted.reached);
    let path = format!("/v1/docs/{victim}");
    f.refused("DELETE", &path, None, 410, "deleted");
    f.refused("GET", &path, None, 410, "deleted");
    let ops = json!({"ops": [{"op": "set", "path": ["back"], "value": true}]});
    f.refused_json("POST", &format!("{path}/ops"), &ops, 410, "deleted");
    let error = f.api().read(&victim).unwrap_err();
    assert_eq!((error.status(), error.code()), (Some(410), Some("deleted")));
    f.still_serves();
}

#[test]
fn raw_automerge_uploads_refuse_garbage_and_empty_bodies() {
    let f = Fixture::new("bad-automerge").unwrap();
    let exported = f.api().export(&f.id).unwrap();
    let import = format!("/v1/docs/{}/automerge", f.id);
    let create = "/v1/collections/notes/docs/automerge";
    let truncated = &exported[..exported.len() / 2];
    f.refused("POST", create, Some(truncated), 400, "bad_automerge");
    for path in [import.as_str(), create] {
        f.refused("POST", path, None, 400, "bad_automerge");
        f.refused("POST", path, Some(b"not automerge at all"), 400, "bad_automerge");
        f.refused_oversized(path, vec![0x85; OVERSIZED]);
    }
    let unknown = format!("/v1/docs/{}/automerge", unknown_id());
    f.refused("POST", &unknown, Some(&exported), 404, "not_found");
    f.refused("POST", "/v1/docs/not-an-id/automerge", Some(&exported), 400, "bad_id");
    f.refused(
        "POST",
        "/v1/collections/bad%21name/docs/automerge",
        Some(&exported),
        400,
        "bad_collection",
    );
    // The same bytes are fine where they belong: a copy in a new document.
    let copy = f.api().create_from_bytes("copies", &exported).unwrap();
    let original = f.api().read(&f.id).unwrap().unwrap();
    assert_eq!(f.api().read(&copy.id).unwrap().unwrap().doc, original.doc);
    f.still_serves();
}

#[test]
fn a_merge_of_corrupt_bytes_is_refused_whole() {
    use automerge::transaction::Transactable;
    let f = Fixture::new("bad-merge").unwrap();
    let exported = f.api().export(&f.id).unwrap();
    let import = format!("/v1/docs/{}/automerge", f.id);
    let cut = &exported[..exported.len() / 2];
    // A saved document cut short.
    f.refused("POST", &import, Some(cut), 400, "bad_automerge");
    // A valid new change followed by a damaged chunk: all or nothing.
    let mut fork =
        automerge::AutoCommit::load(&exported).unwrap().with_actor(automerge::ActorId::random());
    let base = fork.get_heads();
    fork.put(automerge::ROOT, "merged", true).unwrap();
    let mut damaged = fork.save_after(&base);
    damaged.extend_from_slice(cut);
    f.refused("POST", &import, Some(&damaged), 400, "bad_automerge");
    f.still_serves();
}

#[test]
fn an_incremental_save_merges_and_history_the_document_lacks_is_refused() {
    use automerge::transaction::Transactable;
    let f = Fixture::new("incremental").unwrap();
    let exported = f.api().export(&f.id).unwrap();
    let mut fork =
        automerge::AutoCommit::load(&exported).unwrap().with_actor(automerge::ActorId::random());
    let base = fork.get_heads();
    fork.put(automerge::ROOT, "step", 1).unwrap();
    let middle = fork.get_heads();
    fork.put(automerge::ROOT, "step", 2).unwrap();
    // Changes that build on history the document lacks are refused, and change nothing.
    let import = format!("/v1/docs/{}/automerge", f.id);
    f.refused("POST", &import, Some(&fork.save_after(&middle)), 400, "bad_automerge");
    // An incremental save on top of what the document has is merged.
    let written = f.api().import(&f.id, &fork.save_after(&base)).unwrap();
    let expected: Vec<String> = fork.get_heads().iter().map(ToString::to_string).collect();
    assert_eq!(written.heads, expected);
    assert_eq!(f.api().read(&f.id).unwrap().unwrap().doc["step"], 2);
}

#[test]
fn a_token_guarded_api_answers_401_without_the_token() {
    let dir = TestDir::new("bad-token").unwrap();
    let args = ["--api-token".to_owned(), "t".to_owned()];
    let agent = Agent::start_with(dir.path(), "agent", nowhere().unwrap(), &args).unwrap();
    let anonymous = agent.api.clone();
    let wrong = ApiClient::new(agent.api.base()).with_token("wrong");
    let right = ApiClient::new(agent.api.base()).with_token("t");
    let create = ("POST", "/v1/collections/notes/docs", Some(&b"{\"a\": 1}"[..]));
    let requests = [
        ("GET", "/v1/status", None),
        ("GET", "/v1/changes?wait_ms=0", None),
        ("GET", "/v1/collections/notes/docs", None),
        ("GET", "/v1/openapi.json", None),
        ("GET", "/v1/sync", None),
        create,
    ];
    for client in [&anonymous, &wrong] {
        for (method, path, body) in requests {
            let response = client.send(method, path, body).unwrap();
            assert_eq!(response.status, 401, "{method} {path}: {}", response.body);
            assert_eq!(response.body["error"]["code"], "unauthorized");
        }
    }
    // Browsers cannot send headers on a WebSocket: the sync endpoint takes the token as a
    // query parameter, and no other route does.
    for (path, expected) in
        [("/v1/sync?access_token=wrong", 401), ("/v1/status?access_token=t", 401)]
    {
        assert_eq!(anonymous.send("GET", path, None).unwrap().status, expected, "{path}");
    }
    let upgrade_without_handshake = anonymous.send("GET", "/v1/sync?access_token=t", None).unwrap();
    assert_ne!(
        upgrade_without_handshake.status, 401,
        "the query token must open the sync endpoint"
    );
    let status = right.status().unwrap();
    assert_eq!((status.documents, status.feed_cursor), (0, 0), "a refused write was applied");
    let id = right.create("notes", &json!({"a": 1})).unwrap();
    assert_eq!(right.read(&id).unwrap().unwrap().doc, json!({"a": 1}));
    assert_eq!(wrong.read(&id).unwrap_err().status(), Some(401));
}

/// Starts an agent that must refuse to start, and returns its stderr.
fn refused_start(dir: &Path, name: &str, extra: &[&str]) -> String {
    let log = dir.join(format!("{name}.log"));
    let mut child = Command::new(field_tests::process::binary("edge-agent").unwrap())
        .args(["--data-dir", &dir.join(name).display().to_string()])
        .args(["--ca-dir", &dir.join("ca").display().to_string()])
        .args(["--hub", &nowhere().unwrap().to_string()])
        .args(extra)
        .env_remove("CAIRN_API_TOKEN")
        .env_remove("CAIRN_API_LISTEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the agent with {extra:?} kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
    assert!(!status.success(), "the agent with {extra:?} exited with {status}");
    assert!(!stdout.contains("ready"), "the agent with {extra:?} started serving: {stdout}");
    std::fs::read_to_string(&log).unwrap()
}

#[test]
fn an_api_beyond_loopback_without_a_token_refuses_to_start() {
    let dir = TestDir::new("bad-exposed").unwrap();
    for (name, extra) in [
        ("open", &["--api-listen", "0.0.0.0:0"][..]),
        ("empty-token", &["--api-listen", "0.0.0.0:0", "--api-token", ""][..]),
    ] {
        let stderr = refused_start(dir.path(), name, extra);
        assert!(
            stderr.contains("api_token") && stderr.contains("0.0.0.0"),
            "the refusal does not say why: {stderr}"
        );
        assert!(!stderr.contains("binding"), "it got as far as binding: {stderr}");
    }
}
