//! The agent's configuration: defaults, then a TOML file, then environment and flags.

use std::net::SocketAddr;
use std::path::PathBuf;

use cairn_shared::config::SyncConfig;
use cairn_shared::ids::Collection;
use cairn_shared::io::job_runner::JobsConfig;
use cairn_shared::io::profile::ProfileOverride;
use cairn_shared::io::quic::{HubAddress, LinkTiming};
use cairn_shared::io::repo_ws;
use cairn_shared::io::runtime::{default_home, load_config_file, IdentityConfig};
use clap::Parser;
use serde::Deserialize;

/// Command line; every flag also reads an environment variable.
#[derive(Debug, Parser)]
#[command(
    name = "edge-agent",
    version,
    about = "Cairn edge agent: offline-first local store that syncs with a hub"
)]
pub struct Cli {
    /// TOML configuration file.
    #[arg(long, env = "CAIRN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory (database and node key).
    #[arg(long, env = "CAIRN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The hub's QUIC address.
    #[arg(long, env = "CAIRN_HUB")]
    pub hub: Option<SocketAddr>,
    /// Hubs to fail over between, most preferred first (comma-separated); replaces `hub`.
    #[arg(long, env = "CAIRN_HUBS", value_delimiter = ',')]
    pub hubs: Option<Vec<SocketAddr>>,
    /// Address of the local HTTP API (use port 0 for any free port).
    #[arg(long, env = "CAIRN_API_LISTEN")]
    pub api_listen: Option<SocketAddr>,
    /// Directory of the development CA shared by local nodes.
    #[arg(long, env = "CAIRN_CA_DIR")]
    pub ca_dir: Option<PathBuf>,
    /// Serve the local API on this Unix socket instead of TCP.
    #[arg(long, env = "CAIRN_API_SOCKET")]
    pub api_socket: Option<PathBuf>,
    /// Bearer token the local API requires (mandatory when it listens beyond loopback).
    #[arg(long, env = "CAIRN_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Run jobs and publish this node's capability profile (`jobs.enabled`).
    #[arg(long, env = "CAIRN_JOBS_ENABLED")]
    pub jobs_enabled: Option<bool>,
    /// LAN mesh (sync with the site's other agents over zenoh) settings.
    #[cfg(feature = "lan")]
    #[command(flatten)]
    pub lan: crate::lan_flags::LanFlags,
}

/// The agent's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Data directory (default: `<home>/agent`).
    pub data_dir: Option<PathBuf>,
    /// The hub's QUIC address, when there is one hub.
    pub hub: SocketAddr,
    /// The name the hub's certificate must carry.
    pub hub_server_name: String,
    /// Hubs to fail over between, most preferred first (this region's, then others');
    /// when set, `hub` is not used.
    pub hubs: Vec<HubAddress>,
    /// Local HTTP API address. Beyond loopback it requires `api_token`.
    pub api_listen: SocketAddr,
    /// Serve the local API on this Unix socket instead of TCP.
    pub api_socket: Option<PathBuf>,
    /// Bearer token the local API requires.
    pub api_token: Option<String>,
    /// TLS material.
    pub identity: IdentityConfig,
    /// Sync tuning.
    pub sync: SyncConfig,
    /// The collection a document goes into when an automerge-repo client (`/v1/sync`) is
    /// the first to sync it to this node.
    pub sync_collection: Collection,
    /// Heartbeat and reconnect timing.
    pub link: LinkTiming,
    /// Job execution, profile publication and the placement policy.
    pub jobs: JobsConfig,
    /// For tests and labs only: replaces measured profile values, so that nodes on one
    /// machine can present different capacities. Never set it in production.
    pub profile_override: ProfileOverride,
    /// Sync of the collections shared on the LAN directly with the site's other agents.
    #[cfg(feature = "lan")]
    pub lan: cairn_shared::io::lan::LanConfig,
    /// A build without the LAN mesh still reads the section, so one file serves every build;
    /// the agent warns that it is ignored.
    #[cfg(not(feature = "lan"))]
    pub lan: Option<serde_json::Value>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            data_dir: None,
            hub: ([127, 0, 0, 1], 7700).into(),
            hub_server_name: "localhost".into(),
            hubs: Vec::new(),
            api_listen: ([127, 0, 0, 1], 7780).into(),
            api_socket: None,
            api_token: None,
            identity: IdentityConfig::default(),
            sync: SyncConfig::edge(),
            sync_collection: repo_ws::default_collection(),
            link: LinkTiming::default(),
            jobs: JobsConfig::default(),
            profile_override: ProfileOverride::default(),
            lan: Default::default(),
        }
    }
}

impl AgentConfig {
    /// Defaults, overridden by the file, overridden by environment and flags.
    pub fn load(cli: &Cli) -> anyhow::Result<Self> {
        let mut config: Self = load_config_file(cli.config.as_deref())?;
        if let Some(dir) = &cli.data_dir {
            config.data_dir = Some(dir.clone());
        }
        if let Some(hub) = cli.hub {
            config.hub = hub;
            config.hubs.clear();
        }
        if let Some(hubs) = &cli.hubs {
            let server_name = config.hub_server_name.clone();
            config.hubs = hubs
                .iter()
                .map(|addr| HubAddress { addr: *addr, server_name: server_name.clone() })
                .collect();
        }
        if let Some(listen) = cli.api_listen {
            config.api_listen = listen;
        }
        if let Some(dir) = &cli.ca_dir {
            config.identity.ca_dir = Some(dir.clone());
        }
        if let Some(socket) = &cli.api_socket {
            config.api_socket = Some(socket.clone());
        }
        if let Some(token) = &cli.api_token {
            config.api_token = Some(token.clone());
        }
        if let Some(enabled) = cli.jobs_enabled {
            config.jobs.enabled = enabled;
        }
        #[cfg(feature = "lan")]
        {
            cli.lan.apply(&mut config.lan);
            config.lan.validate()?;
        }
        config.sync.validate()?;
        config.jobs.validate()?;
        let exposed = config.api_socket.is_none() && !config.api_listen.ip().is_loopback();
        anyhow::ensure!(
            !exposed || config.api_token.as_deref().is_some_and(|t| !t.is_empty()),
            "the local API on {} is reachable beyond this device: set api_token (CAIRN_API_TOKEN)",
            config.api_listen
        );
        Ok(config)
    }

    /// The hubs to dial, most preferred first.
    pub fn hub_list(&self) -> Vec<HubAddress> {
        if self.hubs.is_empty() {
            vec![HubAddress { addr: self.hub, server_name: self.hub_server_name.clone() }]
        } else {
            self.hubs.clone()
        }
    }

    /// The data directory, with its default filled in.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| default_home().join("agent"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_config_parses_and_matches_the_defaults() {
        let text = include_str!("../../deploy/agent.example.toml");
        let parsed: AgentConfig = toml::from_str(text).unwrap();
        let defaults = AgentConfig::default();
        assert_eq!(parsed.hub, defaults.hub);
        assert_eq!(parsed.api_listen, defaults.api_listen);
        assert_eq!(parsed.sync, defaults.sync);
        assert_eq!(parsed.sync_collection, defaults.sync_collection);
        assert_eq!(parsed.link, defaults.link);
        assert_eq!(parsed.identity, defaults.identity);
        assert_eq!(parsed.jobs, defaults.jobs);
        assert_eq!(parsed.profile_override, defaults.profile_override);
        #[cfg(feature = "lan")]
        assert_eq!(parsed.lan, defaults.lan);
    }

    #[test]
    fn flags_override_the_file() {
        let dir = std::env::temp_dir().join(format!("cairn-agent-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("agent.toml");
        std::fs::write(&file, "hub = \"10.0.0.1:7700\"\napi_listen = \"127.0.0.1:9000\"\n")
            .unwrap();
        let cli = Cli::parse_from([
            "edge-agent",
            "--config",
            file.to_str().unwrap(),
            "--api-listen",
            "127.0.0.1:9001",
        ]);
        let config = AgentConfig::load(&cli).unwrap();
        assert_eq!(config.hub, "10.0.0.1:7700".parse().unwrap());
        assert_eq!(config.api_listen, "127.0.0.1:9001".parse().unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_api_beyond_loopback_needs_a_token() {
        let open = Cli::parse_from(["edge-agent", "--api-listen", "0.0.0.0:7780"]);
        let error = AgentConfig::load(&open).unwrap_err();
        assert!(error.to_string().contains("api_token"), "{error}");
        let guarded = Cli::parse_from([
            "edge-agent",
            "--api-listen",
            "0.0.0.0:7780",
            "--api-token",
            "s3cret",
        ]);
        assert!(AgentConfig::load(&guarded).is_ok());
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<AgentConfig>("hubb = \"127.0.0.1:1\"").is_err());
    }
}
