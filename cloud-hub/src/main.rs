//! Cairn regional hub: accepts edge agents over QUIC with mutual TLS, stores every change
//! durably, forwards live changes to the other agents, and serves catch-up on reconnect.

mod config;

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use cairn_shared::io::runtime::{init_logging, shutdown_signal, NodeSetup, RunningNode};
use cairn_shared::io::{doc_api, ops_http, quic, repo_ws};
use cairn_shared::message::Role;
use clap::Parser;
use tokio::sync::watch;

use crate::config::{Cli, HubConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let config = HubConfig::load(&Cli::parse())?;
    let data_dir = config.data_dir();
    let setup = NodeSetup {
        role: Role::Hub,
        tls: config.identity.paths(&data_dir),
        dev_certificates: !config.identity.no_dev_certificates,
        certificate_names: config.certificate_names.clone(),
        data_dir,
        sync: config.sync.clone(),
    };
    let node = RunningNode::start(&setup).context("starting the hub")?;
    let endpoint = quic::server_endpoint(&node.identity, config.listen, &config.link)
        .context("binding the QUIC endpoint")?;
    let quic_addr = endpoint.local_addr()?;
    let listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("binding the HTTP endpoint on {}", config.http_listen))?;
    let http_addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let acceptor = tokio::spawn(quic::accept_loop(
        endpoint.clone(),
        node.handle.clone(),
        quic::AcceptLimits {
            max_connections: config.max_connections,
            stream_timeout: Duration::from_millis(config.sync.hello_timeout_ms),
        },
        wait_for(stop_rx.clone()),
    ));
    let sync = repo_ws::SyncEndpoint {
        collection: config.sync_collection.clone(),
        max_frame_bytes: config.sync.max_frame_bytes,
    };
    let app = ops_http::ops_router(node.ops.clone())
        .merge(doc_api::read_router(doc_api::ApiState::of(&node)))
        .merge(repo_ws::router(node.handle.clone(), sync));
    node.ops.ready.store(true, Ordering::Relaxed);
    // Tests and scripts read this line; logs go to stderr.
    println!(
        "cloud-hub ready quic={quic_addr} http=http://{http_addr} node={}",
        node.identity.node_id
    );
    tracing::info!(quic = %quic_addr, http = %http_addr, "hub started");
    let ready = node.ops.ready.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            ready.store(false, Ordering::Relaxed);
            let _ = stop_tx.send(true);
        })
        .await
        .context("serving HTTP")?;
    tracing::info!("shutting down");
    let _ = acceptor.await;
    node.stop().await.context("stopping the store")?;
    Ok(())
}

async fn wait_for(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}
