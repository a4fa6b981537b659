//! Cairn regional hub: accepts edge agents over QUIC with mutual TLS, stores every change
//! durably, forwards live changes to the other agents, and serves catch-up on reconnect.

#[cfg(feature = "backbone")]
mod backbone_flags;
mod config;
mod topology;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cairn_shared::io::profile::LinkMonitor;
use cairn_shared::io::runtime::{init_logging, shutdown_signal, NodeSetup, RunningNode};
use cairn_shared::io::scaling::Scaling;
use cairn_shared::io::{doc_api, job_runner, jobs_api, ops_http, quic, repo_ws, scaling};
use cairn_shared::message::Role;
use cairn_shared::placement::NodeRole;
use cairn_shared::scope::HoldingRule;
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
    // The region's share of the replication policy, enforced inside sync too: a peer that
    // offers a collection this region does not hold is told where it lives.
    let (policy, region) = (config.replication.clone(), config.region.clone());
    let holding = HoldingRule::new(move |collection| {
        policy.check(&region, collection.as_str()).map_err(|refusal| refusal.to_string())
    });
    node.handle.set_holding(holding).await.context("applying the replication policy")?;
    let own_region = config.region.as_str().to_owned();
    node.handle.set_regions(own_region, Default::default()).await.context("setting the region")?;
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
            admission_rate_per_s: config.admission_rate_per_s,
            admission_burst: config.admission_burst,
        },
        wait_for(stop_rx.clone()),
    ));
    let sync = repo_ws::SyncEndpoint {
        collection: config.sync_collection.clone(),
        max_frame_bytes: config.sync.max_frame_bytes,
    };
    // Unspecified addresses (0.0.0.0) mean nothing to agents elsewhere: announce none then.
    let agent_address = config
        .advertise
        .clone()
        .or_else(|| (!quic_addr.ip().is_unspecified()).then(|| quic_addr.to_string()));
    #[cfg(feature = "backbone")]
    let backbone = start_backbone(&config, &node, agent_address.clone()).await?;
    #[cfg(not(feature = "backbone"))]
    if config.backbone.is_some() {
        tracing::warn!("this build has no backbone: the [backbone] section is ignored");
    }
    #[cfg(feature = "backbone")]
    let directory = tokio::spawn(advertise_hubs(
        node.handle.clone(),
        backbone.clone(),
        node.identity.node_id,
        config.region.clone(),
        agent_address.clone(),
        wait_for(stop_rx.clone()),
    ));
    let topology = topology::Topology {
        node_id: node.identity.node_id,
        region: config.region.clone(),
        agent_address,
        policy: Arc::new(config.replication.clone()),
        metrics: node.ops.metrics.backbone.clone(),
        #[cfg(feature = "backbone")]
        backbone: backbone.clone(),
    };
    let documents = doc_api::read_router(doc_api::ApiState::of(&node));
    let (jobs, job_runner) = job_runner::start(
        &node,
        config.jobs.clone(),
        NodeRole::Hub,
        setup.data_dir.clone(),
        config.profile_override.clone(),
        LinkMonitor::new(),
    );
    let scaling = Scaling::default();
    let scaler = tokio::spawn(scaling.clone().run(
        config.scaling.clone(),
        node.handle.clone(),
        node.ops.metrics.scaling.clone(),
        stop_rx.clone(),
    ));
    let app = ops_http::ops_router(node.ops.clone())
        .merge(jobs_api::router(jobs))
        .merge(scaling::router(scaling))
        .merge(topology::refuse_unheld(documents, topology.clone()))
        .merge(topology::router(topology))
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
    #[cfg(feature = "backbone")]
    let _ = directory.await;
    job_runner.stop().await;
    let _ = scaler.await;
    #[cfg(feature = "backbone")]
    if let Some(backbone) = backbone.and_then(Arc::into_inner) {
        backbone.stop().await;
    }
    node.stop().await.context("stopping the store")?;
    Ok(())
}

/// Keeps the hub directory the node advertises to its agents equal to the backbone's view:
/// this hub, then the other hubs of its region, then the rest, each where its agents dial it.
#[cfg(feature = "backbone")]
async fn advertise_hubs(
    node: cairn_shared::io::driver::NodeHandle,
    backbone: Option<Arc<cairn_shared::io::backbone::Backbone>>,
    node_id: cairn_shared::ids::NodeId,
    region: cairn_shared::replication::Region,
    agent_address: Option<String>,
    stop: impl std::future::Future<Output = ()>,
) {
    use cairn_shared::message::HubInfo;
    tokio::pin!(stop);
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = &mut stop => return,
        }
        let own = agent_address.clone().map(|addr| HubInfo {
            node_id,
            region: region.as_str().to_owned(),
            addr,
        });
        let remote: Vec<_> = backbone.iter().flat_map(|backbone| backbone.hubs()).collect();
        // Every hub's region counts for `regions:N` durability, whether agents can dial it or not.
        let regions = remote.iter().map(|hub| (hub.node_id, hub.region.as_str().to_owned()));
        if node.set_regions(region.as_str().to_owned(), regions.collect()).await.is_err() {
            return;
        }
        let mut others: Vec<HubInfo> = remote
            .into_iter()
            .filter_map(|hub| {
                let addr = hub.agent_address?;
                Some(HubInfo { node_id: hub.node_id, region: hub.region.as_str().to_owned(), addr })
            })
            .collect();
        others.sort_by_key(|hub| (hub.region != region.as_str(), hub.region.clone(), hub.node_id));
        let hubs: Vec<HubInfo> = own.into_iter().chain(others).collect();
        if node.set_hub_directory(hubs).await.is_err() {
            return;
        }
    }
}

/// Joins the hub backbone unless it is disabled.
#[cfg(feature = "backbone")]
async fn start_backbone(
    config: &HubConfig,
    node: &RunningNode,
    agent_address: Option<String>,
) -> anyhow::Result<Option<Arc<cairn_shared::io::backbone::Backbone>>> {
    use cairn_shared::io::backbone::{Announcement, Backbone};
    if !config.backbone.enabled {
        tracing::info!("backbone disabled: this hub replicates with no other hub");
        return Ok(None);
    }
    let announcement = Announcement::new(config.region.clone(), agent_address)?;
    let backbone = Backbone::start(
        &config.backbone,
        announcement,
        node.handle.clone(),
        config.sync.max_frame_bytes,
        node.ops.metrics.backbone.clone(),
    )
    .await
    .context("joining the backbone")?;
    Ok(Some(Arc::new(backbone)))
}

async fn wait_for(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}
