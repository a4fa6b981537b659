//! The automerge-repo sync endpoint (`/v1/sync`) with real clients.
//!
//! The first test runs unmodified automerge-repo JavaScript clients (`field-tests/interop`,
//! installed by `scripts/test.sh` with `npm ci`) against two agents and a hub. The others
//! speak the protocol by hand over a raw WebSocket: a well-behaved client syncs a document,
//! and every kind of broken message closes only the socket that sent it.

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use automerge::sync::{self, SyncDoc};
use automerge::Automerge;
use cairn_shared::ids::DocId;
use cairn_shared::repo_wire::{self, PeerId, RepoMessage};
use field_tests::{free_udp_port, wait_for, Agent, ApiClient, Hub, TestDir};
use serde_json::{json, Value};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message as WsMessage, WebSocket};

/// How long the JavaScript scenario may run.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a raw client waits for one message.
const READ_TIMEOUT: Duration = Duration::from_secs(15);
/// The frame limit of the agent under attack: small, so an oversized message is cheap.
const SMALL_FRAME_BYTES: usize = 1024 * 1024;

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("interop")
}

fn sync_url(api: &ApiClient) -> String {
    format!("{}/v1/sync", api.base().replacen("http://", "ws://", 1))
}

/// A config file in the test directory.
fn config_file(dir: &TestDir, name: &str, text: &str) -> anyhow::Result<Vec<String>> {
    let path = dir.path().join(name);
    std::fs::write(&path, text)?;
    Ok(vec!["--config".into(), path.display().to_string()])
}

/// Node.js and the installed packages, or a failure that says what is missing.
fn node_and_packages() -> anyhow::Result<()> {
    let version = Command::new("node").arg("--version").output().context(
        "`node` is not on PATH: the automerge-repo interop test needs Node.js 20 or later",
    )?;
    anyhow::ensure!(version.status.success(), "`node --version` failed");
    let modules = interop_dir().join("node_modules/@automerge/automerge-repo-network-websocket");
    anyhow::ensure!(
        modules.exists(),
        "{} is missing: run `(cd field-tests/interop && npm ci)` (scripts/test.sh does)",
        modules.display()
    );
    Ok(())
}

/// Runs the JavaScript scenario; returns its JSON result.
fn run_scenario(args: &[String]) -> anyhow::Result<Value> {
    let mut child = Command::new("node")
        .arg("repo_interop.mjs")
        .args(args)
        .current_dir(interop_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting node")?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > SCENARIO_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("the JavaScript scenario ran longer than {SCENARIO_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child.stdout.take().context("no stdout")?.read_to_string(&mut stdout)?;
    child.stderr.take().context("no stderr")?.read_to_string(&mut stderr)?;
    anyhow::ensure!(status.success(), "the JavaScript scenario failed ({status}):\n{stderr}");
    let line = stdout.lines().last().context("the scenario printed nothing")?;
    serde_json::from_str(line).with_context(|| format!("scenario output {line:?}"))
}

#[test]
fn automerge_repo_clients_sync_through_two_agents() -> anyhow::Result<()> {
    node_and_packages()?;
    let dir = TestDir::new("repo-interop")?;
    let config = config_file(&dir, "sync.toml", "sync_collection = \"shared-notes\"\n")?;
    let hub = Hub::start_with(dir.path(), "hub", free_udp_port()?, &config)?;
    let a = Agent::start_with(dir.path(), "agent-a", hub.quic, &config)?;
    let b = Agent::start_with(dir.path(), "agent-b", hub.quic, &config)?;

    let result = run_scenario(&[sync_url(&a.api), sync_url(&b.api), b.api.base().to_owned()])?;

    assert_eq!(result["disconnects"], json!([]), "an agent dropped a client: {result}");
    // Ephemeral delivery is best effort: client 1 repeats its broadcast until one arrives.
    let ephemeral = &result["ephemeral"];
    assert_eq!(ephemeral["fromClient1"], true, "{ephemeral}");
    assert!(ephemeral["message"]["cursor"].as_u64().is_some_and(|c| c >= 1), "{ephemeral}");
    assert_eq!(result["heads1"], result["heads2"], "clients did not converge: {result}");
    assert_eq!(result["doc1"], result["doc2"], "clients did not converge: {result}");
    let doc = &result["doc1"];
    assert_eq!(doc["title"], "hello");
    assert_eq!((doc["one"].clone(), doc["two"].clone()), (json!(1), json!(2)));
    let mut items: Vec<String> = serde_json::from_value(doc["items"].clone())?;
    items.sort();
    assert_eq!(items, ["concurrent-1", "concurrent-2", "from-1", "from-2", "from-3"]);

    let id = result["documentId"].as_str().context("no documentId")?;
    let mut heads: Vec<String> = serde_json::from_value(result["heads1"].clone())?;
    heads.sort();
    for (name, api) in [("agent A", &a.api), ("agent B", &b.api), ("the hub", &hub.http)] {
        let seen = wait_for(&format!("{name} to hold the clients' heads"), READ_TIMEOUT, || {
            api.try_read(id).filter(|d| {
                let mut theirs = d.heads.clone();
                theirs.sort();
                theirs == heads
            })
        })?;
        assert_eq!(&seen.doc, doc, "{name} materializes another document");
        assert_eq!(seen.collection, "shared-notes", "{name} filed it elsewhere");
    }
    // The hub serves the same endpoint.
    let mut at_hub = RawClient::joined(&sync_url(&hub.http), "hub-reader")?;
    at_hub.sync_until(id.parse()?, &heads)?;
    Ok(())
}

/// A raw automerge-repo client over a blocking WebSocket.
struct RawClient {
    socket: WebSocket<MaybeTlsStream<TcpStream>>,
    peer_id: PeerId,
}

impl RawClient {
    fn connect(url: &str, peer_id: &str) -> anyhow::Result<Self> {
        let (socket, _) = tungstenite::connect(url).with_context(|| format!("connecting {url}"))?;
        if let MaybeTlsStream::Plain(stream) = socket.get_ref() {
            stream.set_read_timeout(Some(READ_TIMEOUT))?;
        }
        Ok(Self { socket, peer_id: PeerId::new(peer_id)? })
    }

    /// Connects and completes the handshake.
    fn joined(url: &str, peer_id: &str) -> anyhow::Result<Self> {
        let mut client = Self::connect(url, peer_id)?;
        client.send(&RepoMessage::Join {
            sender_id: client.peer_id.clone(),
            peer_metadata: None,
            supported_protocol_versions: Some(vec!["1".into()]),
        })?;
        match client.receive()? {
            RepoMessage::Peer { target_id, selected_protocol_version, .. } => {
                anyhow::ensure!(target_id == client.peer_id && selected_protocol_version == "1");
            }
            other => anyhow::bail!("expected peer, got {other:?}"),
        }
        Ok(client)
    }

    fn send(&mut self, message: &RepoMessage) -> anyhow::Result<()> {
        self.send_raw(WsMessage::Binary(repo_wire::encode(message).into()))
    }

    fn send_raw(&mut self, message: WsMessage) -> anyhow::Result<()> {
        self.socket.send(message)?;
        Ok(())
    }

    /// The next protocol message.
    fn receive(&mut self) -> anyhow::Result<RepoMessage> {
        loop {
            match self.socket.read()? {
                WsMessage::Binary(bytes) => return Ok(repo_wire::decode(&bytes)?),
                WsMessage::Ping(_) | WsMessage::Pong(_) => {}
                other => anyhow::bail!("unexpected websocket message {other:?}"),
            }
        }
    }

    /// Expects an `error` message and then the end of the connection; returns the error text.
    fn expect_error_and_close(mut self) -> anyhow::Result<String> {
        let text = match self.receive()? {
            RepoMessage::Error { message, .. } => message,
            other => anyhow::bail!("expected an error message, got {other:?}"),
        };
        loop {
            match self.socket.read() {
                Ok(WsMessage::Close(_)) => {}
                Ok(other) => anyhow::bail!("after the error, got {other:?}"),
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return Ok(text)
                }
                Err(tungstenite::Error::Io(e)) if e.kind() != std::io::ErrorKind::WouldBlock => {
                    return Ok(text)
                }
                Err(error) => anyhow::bail!("the socket did not close: {error}"),
            }
        }
    }

    /// Syncs `doc` with the node until it holds `heads` (sending `request` first).
    fn sync_until(&mut self, doc_id: DocId, heads: &[String]) -> anyhow::Result<Automerge> {
        let mut doc = Automerge::new();
        let mut state = sync::State::new();
        let mut first = true;
        let deadline = Instant::now() + READ_TIMEOUT;
        while !heads_equal(&doc, heads) {
            anyhow::ensure!(Instant::now() < deadline, "no convergence on {doc_id}");
            if let Some(message) = doc.generate_sync_message(&mut state) {
                let (sender_id, target_id) = (self.peer_id.clone(), server()?);
                let data = message.encode();
                self.send(&if first {
                    RepoMessage::Request { sender_id, target_id, document_id: doc_id, data }
                } else {
                    RepoMessage::Sync { sender_id, target_id, document_id: doc_id, data }
                })?;
                first = false;
            }
            match self.receive()? {
                RepoMessage::Sync { document_id, data, .. } if document_id == doc_id => {
                    doc.receive_sync_message(&mut state, sync::Message::decode(&data)?)?;
                }
                other => anyhow::bail!("expected sync for {doc_id}, got {other:?}"),
            }
        }
        Ok(doc)
    }
}

/// What raw clients call the server: any target id will do, the server answers on the socket.
fn server() -> anyhow::Result<PeerId> {
    Ok(PeerId::new("cairn")?)
}

fn heads_equal(doc: &Automerge, heads: &[String]) -> bool {
    let mut ours: Vec<String> = doc.get_heads().iter().map(|h| h.to_string()).collect();
    let mut theirs = heads.to_vec();
    ours.sort();
    theirs.sort();
    ours == theirs
}

/// A `sync` message from `sender`.
fn sync_message(sender: &str, doc_id: DocId, data: Vec<u8>) -> anyhow::Result<RepoMessage> {
    Ok(RepoMessage::Sync {
        sender_id: PeerId::new(sender)?,
        target_id: server()?,
        document_id: doc_id,
        data,
    })
}

#[test]
fn a_raw_client_syncs_and_broken_messages_close_only_their_socket() -> anyhow::Result<()> {
    let dir = TestDir::new("repo-ws-hostile")?;
    let config = config_file(
        &dir,
        "agent.toml",
        &format!("sync_collection = \"ws\"\n[sync]\nmax_frame_bytes = {SMALL_FRAME_BYTES}\n"),
    )?;
    // No hub: the agent serves its sync endpoint alone.
    let agent = Agent::start_with(dir.path(), "agent", free_unused_quic()?, &config)?;
    let url = sync_url(&agent.api);
    let id: DocId = agent.api.create("notes", &json!({"title": "bystander"}))?.parse()?;
    let heads = agent.api.read(&id.to_string())?.context("created document")?.heads;

    // A well-behaved client stays connected through everything below.
    let mut bystander = RawClient::joined(&url, "bystander")?;
    bystander.sync_until(id, &heads)?;
    let missing = DocId::from_slice(&[9; 16])?;
    bystander.send(&RepoMessage::Request {
        sender_id: PeerId::new("bystander")?,
        target_id: server()?,
        document_id: missing,
        data: Automerge::new()
            .generate_sync_message(&mut sync::State::new())
            .context("a first sync message")?
            .encode(),
    })?;
    assert!(
        matches!(bystander.receive()?, RepoMessage::DocUnavailable { document_id, .. } if document_id == missing)
    );

    for (what, expected, attack) in attacks() {
        let text = attack(&url).and_then(RawClient::expect_error_and_close).context(what)?;
        assert!(text.contains(expected), "{what}: error {text:?} does not mention {expected:?}");
    }

    // The bystander still syncs a new edit, and the HTTP API still answers.
    let ops = json!([{"op": "set", "path": ["after"], "value": true}]);
    let heads = agent.api.edit(&id.to_string(), &ops)?;
    let mut fresh = RawClient::joined(&url, "bystander-2")?;
    fresh.sync_until(id, &heads)?;
    bystander.sync_until(id, &heads)?;

    // Shutting down with clients connected does not hang.
    let status = agent.terminate()?;
    assert!(status.success(), "agent exited with {status}");
    Ok(())
}

/// A QUIC port nobody listens on.
fn free_unused_quic() -> anyhow::Result<std::net::SocketAddr> {
    Ok(([127, 0, 0, 1], free_udp_port()?).into())
}

type Attack = fn(&str) -> anyhow::Result<RawClient>;

/// Each attack: what it is, words the error must contain, and how to open and abuse a socket.
fn attacks() -> Vec<(&'static str, &'static str, Attack)> {
    vec![
        ("garbage before join", "CBOR", |url| {
            let mut c = RawClient::connect(url, "a1")?;
            c.send_raw(WsMessage::Binary(vec![0xff, 0x00, 0x13].into()))?;
            Ok(c)
        }),
        ("text frame", "text", |url| {
            let mut c = RawClient::connect(url, "a2")?;
            c.send_raw(WsMessage::Text("hello".into()))?;
            Ok(c)
        }),
        ("sync before join", "join", |url| {
            let mut c = RawClient::connect(url, "a3")?;
            c.send(&sync_message("a3", DocId::from_slice(&[1; 16])?, vec![0x42])?)?;
            Ok(c)
        }),
        ("unknown type", "unknown message type", |url| {
            let mut c = RawClient::joined(url, "a4")?;
            let leave = repo_wire::encode(&RepoMessage::Leave { sender_id: PeerId::new("a4")? });
            let at = leave.windows(5).position(|w| w == b"leave").context("type")?;
            let mut shout = leave.clone();
            shout[at..at + 5].copy_from_slice(b"shout");
            c.send_raw(WsMessage::Binary(shout.into()))?;
            Ok(c)
        }),
        ("oversized message", "exceeds the limit", |url| {
            let mut c = RawClient::joined(url, "a5")?;
            c.send_raw(WsMessage::Binary(vec![0u8; SMALL_FRAME_BYTES + 1].into()))?;
            Ok(c)
        }),
        ("truncated CBOR", "CBOR", |url| {
            let mut c = RawClient::joined(url, "a6")?;
            let doc_id = DocId::from_slice(&[2; 16])?;
            let whole = repo_wire::encode(&sync_message("a6", doc_id, vec![1; 64])?);
            c.send_raw(WsMessage::Binary(whole[..whole.len() / 2].to_vec().into()))?;
            Ok(c)
        }),
        ("another sender id", "joined by", |url| {
            let mut c = RawClient::joined(url, "a7")?;
            c.send(&sync_message("someone-else", DocId::from_slice(&[3; 16])?, vec![0x42])?)?;
            Ok(c)
        }),
        ("bad Automerge sync data", "sync", |url| {
            let mut c = RawClient::joined(url, "a8")?;
            c.send(&sync_message("a8", DocId::from_slice(&[4; 16])?, vec![1, 2, 3])?)?;
            Ok(c)
        }),
    ]
}
