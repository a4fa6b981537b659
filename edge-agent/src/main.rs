//! Cairn edge agent: stores every write durably in SQLite before answering, serves the local
//! HTTP API, and keeps its documents in sync with its hub whenever the hub is reachable, and
//! the collections shared on the LAN with the site's other agents (feature `lan`).

mod config;
#[cfg(feature = "lan")]
mod lan_flags;

use std::sync::atomic::Ordering;

use anyhow::Context;
use cairn_shared::io::profile::LinkMonitor;
use cairn_shared::io::runtime::{init_logging, shutdown_signal, NodeSetup, RunningNode};
use cairn_shared::io::{doc_api, job_runner, jobs_api, ops_http, quic, repo_ws};
use cairn_shared::message::Role;
use cairn_shared::placement::NodeRole;
use clap::Parser;

use crate::config::{AgentConfig, Cli};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let config = AgentConfig::load(&Cli::parse())?;
    let data_dir = config.data_dir();
    let setup = NodeSetup {
        role: Role::Agent,
        tls: config.identity.paths(&data_dir),
        dev_certificates: !config.identity.no_dev_certificates,
        certificate_names: vec!["localhost".into(), "127.0.0.1".into()],
        data_dir,
        sync: config.sync.clone(),
    };
    let node = RunningNode::start(&setup).context("starting the agent")?;
    let endpoint = quic::client_endpoint(&node.identity, &config.link)
        .context("creating the QUIC endpoint")?;
    #[cfg(feature = "lan")]
    let lan = start_lan(&config, &node).await?;
    #[cfg(not(feature = "lan"))]
    if config.lan.is_some() {
        tracing::warn!("this build has no LAN mesh: the [lan] section is ignored");
    }
    let link = LinkMonitor::new();
    let dialer = tokio::spawn(quic::dial_hubs(
        endpoint.clone(),
        config.hub_list(),
        node.handle.clone(),
        config.link,
        link.clone(),
    ));
    let sync = repo_ws::SyncEndpoint {
        collection: config.sync_collection.clone(),
        max_frame_bytes: config.sync.max_frame_bytes,
    };
    let (jobs, job_runner) = job_runner::start(
        &node,
        config.jobs.clone(),
        NodeRole::Agent,
        setup.data_dir.clone(),
        config.profile_override.clone(),
        link,
    );
    let app = doc_api::router(doc_api::ApiState::of(&node))
        .merge(jobs_api::router(jobs))
        .merge(repo_ws::router(node.handle.clone(), sync));
    let app = doc_api::require_token(app, config.api_token.clone())
        .merge(ops_http::ops_router(node.ops.clone()));
    let node_id = node.identity.node_id;
    let preferred_hub = config.hub_list().first().map_or(config.hub, |h| h.addr);
    if let Some(socket) = &config.api_socket {
        // A stale socket from an earlier run would make bind fail.
        let _ = std::fs::remove_file(socket);
        let listener = tokio::net::UnixListener::bind(socket)
            .with_context(|| format!("binding the local API on {}", socket.display()))?;
        node.ops.ready.store(true, Ordering::Relaxed);
        println!(
            "edge-agent ready api=unix:{} node={node_id} hub={}",
            socket.display(),
            preferred_hub
        );
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("serving the local API")?;
    } else {
        let listener = tokio::net::TcpListener::bind(config.api_listen)
            .await
            .with_context(|| format!("binding the local API on {}", config.api_listen))?;
        let api_addr = listener.local_addr()?;
        node.ops.ready.store(true, Ordering::Relaxed);
        // Tests and scripts read this line; logs go to stderr.
        println!("edge-agent ready api=http://{api_addr} node={node_id} hub={preferred_hub}");
        tracing::info!(api = %api_addr, data_dir = %setup.data_dir.display(), "agent started");
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("serving the local API")?;
    }
    tracing::info!("shutting down");
    job_runner.stop().await;
    #[cfg(feature = "lan")]
    if let Some(lan) = lan {
        lan.stop().await;
    }
    dialer.abort();
    endpoint.close(0u32.into(), b"agent shutting down");
    node.stop().await.context("stopping the store")?;
    Ok(())
}

/// Joins the site's LAN mesh if it is enabled.
#[cfg(feature = "lan")]
async fn start_lan(
    config: &AgentConfig,
    node: &RunningNode,
) -> anyhow::Result<Option<cairn_shared::io::lan::LanMesh>> {
    use cairn_shared::io::lan::LanMesh;
    let lan = &config.lan;
    if !lan.enabled {
        return Ok(None);
    }
    // A shared collection this agent does not replicate at all would silently never cross.
    let unreplicated: Vec<_> =
        lan.collections.iter().filter(|c| !config.sync.collections.contains(c)).collect();
    if !unreplicated.is_empty() {
        tracing::warn!(?unreplicated, "LAN collections outside sync.collections do not cross");
    }
    let mesh = LanMesh::start(
        lan,
        node.handle.clone(),
        config.sync.max_frame_bytes,
        node.ops.metrics.backbone.clone(),
    )
    .await
    .context("joining the LAN mesh")?;
    tracing::info!(site = %lan.site, collections = ?lan.collections, "LAN mesh joined");
    Ok(Some(mesh))
}
