//! A raw protocol peer: dials a hub over QUIC with mutual TLS like an agent does, then sends
//! exactly the bytes it is given, so tests can see how a hub treats broken or hostile peers.
//!
//! The API is blocking, like the rest of the harness; the peer owns a small tokio runtime
//! whose worker keeps the QUIC connection alive between calls.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use cairn_shared::frame::{encode_frame, FrameDecoder};
use cairn_shared::ids::NodeId;
use cairn_shared::io::quic::{client_endpoint, LinkTiming};
use cairn_shared::io::runtime::default_tls_paths;
use cairn_shared::io::tls::{ensure_dev_certificates, Identity, TlsPaths};
use cairn_shared::message::{Envelope, Message, ALPN};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::rustls;
use quinn::rustls::pki_types::pem::PemObject;
use quinn::rustls::pki_types::CertificateDer;

/// The name the hub's development certificate carries.
const HUB_SERVER_NAME: &str = "localhost";
/// Far above any frame a hub sends, so the peer never refuses what it reads.
const MAX_FRAME_BYTES: usize = 256 * 1024 * 1024;

/// TLS material for a peer with a certificate signed by the fleet's development CA
/// (`root/ca`, shared with every node the harness starts), kept under `root/name`.
pub fn fleet_identity(root: &Path, name: &str) -> anyhow::Result<TlsPaths> {
    let paths = default_tls_paths(&root.join("ca"), &root.join(name));
    ensure_dev_certificates(&paths, &[name.to_owned()])?;
    Ok(paths)
}

/// TLS material for a peer whose certificate was signed by a CA of its own (`root/name/ca`),
/// not the fleet's; it still trusts the fleet CA, so only the hub's check can stop it.
pub fn foreign_identity(root: &Path, name: &str) -> anyhow::Result<TlsPaths> {
    let own = default_tls_paths(&root.join(name).join("ca"), &root.join(name));
    ensure_dev_certificates(&own, &[name.to_owned()])?;
    Ok(TlsPaths { ca_cert: root.join("ca").join("ca.crt"), ..own })
}

/// How a session with the hub ended.
#[derive(Debug)]
pub struct Ending {
    /// Every message the hub sent, in order.
    pub received: Vec<Envelope>,
    /// Why the connection closed.
    pub closed: quinn::ConnectionError,
}

impl Ending {
    /// The application close code and reason, if the hub closed the connection itself.
    pub fn application_close(&self) -> Option<(u64, String)> {
        match &self.closed {
            quinn::ConnectionError::ApplicationClosed(close) => Some((
                close.error_code.into_inner(),
                String::from_utf8_lossy(&close.reason).into_owned(),
            )),
            _ => None,
        }
    }

    /// The reason of the last `Refuse` the hub sent, with the protocol version it named.
    pub fn refusal(&self) -> Option<(String, u8)> {
        self.received.iter().rev().find_map(|e| match &e.message {
            Message::Refuse { reason, protocol_version } => {
                Some((reason.clone(), *protocol_version))
            }
            _ => None,
        })
    }
}

/// One connection to a hub, with its single bidirectional stream.
#[derive(Debug)]
pub struct RawPeer {
    runtime: tokio::runtime::Runtime,
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    /// The id the peer's certificate proves (`None` without a certificate).
    pub node_id: Option<NodeId>,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    // A worker thread, not a current-thread runtime: the connection must answer keep-alives
    // while the test is busy elsewhere.
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?)
}

impl RawPeer {
    /// Dials `hub` with the identity at `paths` and opens the protocol stream.
    pub fn connect(paths: &TlsPaths, hub: SocketAddr) -> anyhow::Result<Self> {
        let identity = Identity::load(paths)?;
        let runtime = runtime()?;
        let endpoint = {
            let _guard = runtime.enter();
            client_endpoint(&identity, &LinkTiming::default())?
        };
        Self::dial(runtime, endpoint, hub, Some(identity.node_id), None)
    }

    /// Dials `hub` trusting the CA at `ca_cert`, offering no client certificate at all.
    pub fn connect_without_certificate(ca_cert: &Path, hub: SocketAddr) -> anyhow::Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_file(ca_cert)?)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
        config.transport_config(LinkTiming::default().transport());
        let runtime = runtime()?;
        let endpoint = {
            let _guard = runtime.enter();
            quinn::Endpoint::client(([127, 0, 0, 1], 0).into())?
        };
        Self::dial(runtime, endpoint, hub, None, Some(config))
    }

    fn dial(
        runtime: tokio::runtime::Runtime,
        endpoint: quinn::Endpoint,
        hub: SocketAddr,
        node_id: Option<NodeId>,
        config: Option<quinn::ClientConfig>,
    ) -> anyhow::Result<Self> {
        let (connection, send, recv) = runtime.block_on(async {
            let connecting = match config {
                Some(config) => endpoint.connect_with(config, hub, HUB_SERVER_NAME)?,
                None => endpoint.connect(hub, HUB_SERVER_NAME)?,
            };
            let connection = tokio::time::timeout(Duration::from_secs(10), connecting)
                .await
                .context("QUIC handshake timed out")??;
            // Opening a stream is free; the hub only learns of it with the first bytes sent.
            let (send, recv) = connection.open_bi().await?;
            anyhow::Ok((connection, send, recv))
        })?;
        Ok(Self {
            runtime,
            endpoint,
            connection,
            send,
            recv,
            decoder: FrameDecoder::new(MAX_FRAME_BYTES),
            node_id,
        })
    }

    /// Writes raw bytes to the stream. Errors once the hub has closed the connection.
    pub fn send_bytes(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let send = &mut self.send;
        self.runtime.block_on(send.write_all(bytes))?;
        Ok(())
    }

    /// Writes one frame whose payload is `payload` (version byte included).
    pub fn send_payload(&mut self, payload: &[u8]) -> anyhow::Result<()> {
        let frame = encode_frame(payload, MAX_FRAME_BYTES)?;
        self.send_bytes(&frame)
    }

    /// Writes one well-formed frame carrying `message`, stamped with the current time.
    pub fn send_message(&mut self, message: Message) -> anyhow::Result<()> {
        let payload = self.envelope(message)?.encode();
        self.send_payload(&payload)
    }

    /// `message` in an envelope stamped with the wall clock, as a node's clock would stamp it.
    pub fn envelope(&self, message: Message) -> anyhow::Result<Envelope> {
        let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH)?;
        // NTP64: seconds in the high 32 bits, the fraction of a second in the low 32 bits.
        let fraction = (u64::from(since_epoch.subsec_nanos()) << 32) / 1_000_000_000;
        let time = (since_epoch.as_secs() << 32) | fraction;
        let clock_id = self.node_id.map(|id| *id.as_bytes()).unwrap_or([0x5a; 16]);
        // The timestamp type is only reachable through its serde form here.
        let sent_at = serde_json::from_value(serde_json::json!({ "time": time, "id": clock_id }))
            .context("building a timestamp")?;
        Ok(Envelope { sent_at, message })
    }

    /// Why the connection closed, or `None` while it is open.
    pub fn close_reason(&self) -> Option<quinn::ConnectionError> {
        self.connection.close_reason()
    }

    /// Reads until the hub ends the stream or closes the connection, then waits (at most
    /// `timeout` in all) for the connection to close, and reports what the hub sent and why
    /// it closed. Fails if the hub keeps the connection open past `timeout`.
    pub fn read_until_closed(&mut self, timeout: Duration) -> anyhow::Result<Ending> {
        let Self { runtime, connection, recv, decoder, .. } = self;
        let mut received = Vec::new();
        let closed = runtime.block_on(async {
            tokio::time::timeout(timeout, async {
                let mut buffer = vec![0u8; 64 * 1024];
                while let Ok(Some(n)) = recv.read(&mut buffer).await {
                    decoder.push(&buffer[..n]);
                    while let Some(payload) = decoder.next_frame()? {
                        received
                            .push(Envelope::decode(&payload).context("the hub sent a bad frame")?);
                    }
                }
                anyhow::Ok(connection.closed().await)
            })
            .await
            .context("the hub kept the connection open")?
        })?;
        Ok(Ending { received, closed })
    }
}

impl Drop for RawPeer {
    fn drop(&mut self) {
        self.connection.close(0u32.into(), b"done");
        // Let the close reach the hub, so it does not hold the connection until it times out.
        let endpoint = self.endpoint.clone();
        self.runtime.block_on(async move {
            let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
        });
    }
}
