//! The hub's configuration: defaults, then a TOML file, then environment and flags.

use std::net::SocketAddr;
use std::path::PathBuf;

use cairn_shared::config::SyncConfig;
use cairn_shared::ids::Collection;
use cairn_shared::io::job_runner::JobsConfig;
use cairn_shared::io::profile::ProfileOverride;
use cairn_shared::io::quic::LinkTiming;
use cairn_shared::io::repo_ws;
use cairn_shared::io::runtime::{default_home, load_config_file, IdentityConfig};
use cairn_shared::io::scaling::ScalingConfig;
use cairn_shared::replication::{Region, ReplicationPolicy};
use clap::Parser;
use serde::Deserialize;

/// Command line; every flag also reads an environment variable.
#[derive(Debug, Parser)]
#[command(name = "cloud-hub", version, about = "Cairn regional hub: QUIC endpoint for edge agents")]
pub struct Cli {
    /// TOML configuration file.
    #[arg(long, env = "CAIRN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory (database and node key).
    #[arg(long, env = "CAIRN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// QUIC address agents connect to.
    #[arg(long, env = "CAIRN_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address of the HTTP endpoints (health, readiness, metrics, document reads).
    #[arg(long, env = "CAIRN_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Directory of the development CA shared by local nodes.
    #[arg(long, env = "CAIRN_CA_DIR")]
    pub ca_dir: Option<PathBuf>,
    /// Run jobs and publish this node's capability profile (`jobs.enabled`).
    #[arg(long, env = "CAIRN_JOBS_ENABLED")]
    pub jobs_enabled: Option<bool>,
    /// The region this hub serves.
    #[arg(long, env = "CAIRN_REGION")]
    pub region: Option<Region>,
    /// The QUIC address (host:port) agents dial for this hub, as other hubs report it.
    #[arg(long, env = "CAIRN_ADVERTISE")]
    pub advertise: Option<String>,
    /// Backbone (hub-to-hub replication over zenoh) settings.
    #[cfg(feature = "backbone")]
    #[command(flatten)]
    pub backbone: crate::backbone_flags::BackboneFlags,
}

/// The hub's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HubConfig {
    /// Data directory (default: `<home>/hub`).
    pub data_dir: Option<PathBuf>,
    /// QUIC address agents connect to.
    pub listen: SocketAddr,
    /// HTTP address for operators and probes.
    pub http_listen: SocketAddr,
    /// Names (DNS or IP) a generated development certificate carries.
    pub certificate_names: Vec<String>,
    /// Most agent connections at once; more are refused and retry with backoff.
    pub max_connections: usize,
    /// New agent connections admitted per second on average (0: no limit). Agents beyond it
    /// are told when to come back, so a restart does not turn into a reconnect storm.
    pub admission_rate_per_s: u32,
    /// New agent connections admitted at once before the rate applies.
    pub admission_burst: u32,
    /// TLS material.
    pub identity: IdentityConfig,
    /// Sync tuning.
    pub sync: SyncConfig,
    /// The collection a document goes into when an automerge-repo client (`/v1/sync`) is
    /// the first to sync it to this node.
    pub sync_collection: Collection,
    /// Heartbeat timing.
    pub link: LinkTiming,
    /// The region this hub serves; the replication policy names regions.
    pub region: Region,
    /// The QUIC address (host:port) agents dial for this hub, announced to the other hubs and
    /// shown by `/v1/topology` (default: `listen`, unless it is an unspecified address).
    pub advertise: Option<String>,
    /// Which regions hold which collections.
    pub replication: ReplicationPolicy,
    /// Job execution, profile publication and the placement policy.
    pub jobs: JobsConfig,
    /// For tests and labs only: replaces measured profile values. Never set it in production.
    pub profile_override: ProfileOverride,
    /// Load signals, forecast and the recommended replica count (`/v1/scaling`).
    pub scaling: ScalingConfig,
    /// Replication with the other hubs over zenoh.
    #[cfg(feature = "backbone")]
    pub backbone: cairn_shared::io::backbone::BackboneConfig,
    /// A build without the backbone still reads the section, so one file serves every build;
    /// the hub warns that it is ignored.
    #[cfg(not(feature = "backbone"))]
    pub backbone: Option<serde_json::Value>,
}

/// The region a hub serves when none is configured.
pub fn default_region() -> Region {
    Region::try_from(String::from("local")).expect("\"local\" is a valid region name")
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            data_dir: None,
            listen: ([127, 0, 0, 1], 7700).into(),
            http_listen: ([127, 0, 0, 1], 7701).into(),
            certificate_names: vec!["localhost".into(), "127.0.0.1".into()],
            max_connections: 10_000,
            admission_rate_per_s: 200,
            admission_burst: 200,
            identity: IdentityConfig::default(),
            sync: SyncConfig::hub(),
            sync_collection: repo_ws::default_collection(),
            link: LinkTiming::default(),
            region: default_region(),
            advertise: None,
            replication: ReplicationPolicy::everywhere(),
            jobs: JobsConfig::default(),
            profile_override: ProfileOverride::default(),
            scaling: ScalingConfig::default(),
            backbone: Default::default(),
        }
    }
}

impl HubConfig {
    /// Defaults, overridden by the file, overridden by environment and flags.
    pub fn load(cli: &Cli) -> anyhow::Result<Self> {
        let mut config: Self = load_config_file(cli.config.as_deref())?;
        if let Some(dir) = &cli.data_dir {
            config.data_dir = Some(dir.clone());
        }
        if let Some(listen) = cli.listen {
            config.listen = listen;
        }
        if let Some(listen) = cli.http_listen {
            config.http_listen = listen;
        }
        if let Some(dir) = &cli.ca_dir {
            config.identity.ca_dir = Some(dir.clone());
        }
        if let Some(enabled) = cli.jobs_enabled {
            config.jobs.enabled = enabled;
        }
        if let Some(region) = &cli.region {
            config.region = region.clone();
        }
        if let Some(address) = &cli.advertise {
            config.advertise = Some(address.clone());
        }
        #[cfg(feature = "backbone")]
        {
            cli.backbone.apply(&mut config.backbone);
            config.backbone.validate()?;
        }
        config.sync.validate()?;
        config.jobs.validate()?;
        config.scaling.policy.validate()?;
        anyhow::ensure!(config.max_connections > 0, "max_connections must be at least 1");
        Ok(config)
    }

    /// The data directory, with its default filled in.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| default_home().join("hub"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_config_parses_and_matches_the_defaults() {
        let text = include_str!("../../deploy/hub.example.toml");
        let parsed: HubConfig = toml::from_str(text).unwrap();
        let defaults = HubConfig::default();
        assert_eq!(parsed.listen, defaults.listen);
        assert_eq!(parsed.http_listen, defaults.http_listen);
        assert_eq!(parsed.certificate_names, defaults.certificate_names);
        assert_eq!(parsed.max_connections, defaults.max_connections);
        assert_eq!(parsed.sync, defaults.sync);
        assert_eq!(parsed.sync_collection, defaults.sync_collection);
        assert_eq!(parsed.link, defaults.link);
        assert_eq!(parsed.region, defaults.region);
        assert_eq!(parsed.replication, defaults.replication);
        assert_eq!(parsed.jobs, defaults.jobs);
        assert_eq!(parsed.profile_override, defaults.profile_override);
        assert_eq!(parsed.scaling, defaults.scaling);
        #[cfg(feature = "backbone")]
        assert_eq!(parsed.backbone, defaults.backbone);
    }

    #[test]
    fn invalid_values_are_refused() {
        let dir = std::env::temp_dir().join(format!("cairn-hub-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("hub.toml");
        std::fs::write(&file, "[sync]\nmax_frame_bytes = 10\n").unwrap();
        let cli = Cli::parse_from(["cloud-hub", "--config", file.to_str().unwrap()]);
        let error = HubConfig::load(&cli).unwrap_err();
        assert!(format!("{error:#}").contains("max_frame_bytes"), "{error:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
