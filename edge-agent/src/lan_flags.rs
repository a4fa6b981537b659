//! Command-line flags (and their environment variables) for the LAN mesh settings; each one
//! given overrides the configuration file.

use std::path::PathBuf;

use cairn_shared::ids::Collection;
use cairn_shared::io::backbone::{BackboneMode, BackboneTls};
use cairn_shared::io::lan::LanConfig;

/// LAN mesh flags.
#[derive(Debug, Clone, clap::Args)]
pub struct LanFlags {
    /// Join the site's LAN mesh (true or false).
    #[arg(long, env = "CAIRN_LAN_ENABLED")]
    pub lan_enabled: Option<bool>,
    /// The collections shared on the LAN, comma-separated.
    #[arg(long, env = "CAIRN_LAN_COLLECTIONS", value_delimiter = ',')]
    pub lan_collections: Option<Vec<Collection>>,
    /// The site: only agents of the same site become neighbours.
    #[arg(long, env = "CAIRN_LAN_SITE")]
    pub lan_site: Option<String>,
    /// Key prefix separating fleets that share a zenoh network.
    #[arg(long, env = "CAIRN_LAN_FLEET")]
    pub lan_fleet: Option<String>,
    /// How this agent takes part in the zenoh network (peer, client or router).
    #[arg(long, env = "CAIRN_LAN_MODE")]
    pub lan_mode: Option<BackboneMode>,
    /// zenoh endpoints to listen on, comma-separated (e.g. `tcp/0.0.0.0:7448`).
    #[arg(long, env = "CAIRN_LAN_LISTEN", value_delimiter = ',')]
    pub lan_listen: Option<Vec<String>>,
    /// zenoh endpoints of neighbours to connect to, comma-separated.
    #[arg(long, env = "CAIRN_LAN_CONNECT", value_delimiter = ',')]
    pub lan_connect: Option<Vec<String>>,
    /// Find neighbours by UDP multicast (true or false).
    #[arg(long, env = "CAIRN_LAN_MULTICAST_SCOUTING")]
    pub lan_multicast_scouting: Option<bool>,
    /// How long a silent zenoh link lives before the neighbours behind it leave, in
    /// milliseconds.
    #[arg(long, env = "CAIRN_LAN_LEASE_MS")]
    pub lan_lease_ms: Option<u64>,
    /// Fleet CA certificate (PEM) for zenoh's mutual TLS; needs the two flags below.
    #[arg(
        long,
        env = "CAIRN_LAN_TLS_ROOT_CA",
        requires_all = ["lan_tls_certificate", "lan_tls_private_key"]
    )]
    pub lan_tls_root_ca: Option<PathBuf>,
    /// This agent's certificate (PEM) for zenoh's mutual TLS.
    #[arg(long, env = "CAIRN_LAN_TLS_CERTIFICATE")]
    pub lan_tls_certificate: Option<PathBuf>,
    /// This agent's private key (PEM) for zenoh's mutual TLS.
    #[arg(long, env = "CAIRN_LAN_TLS_PRIVATE_KEY")]
    pub lan_tls_private_key: Option<PathBuf>,
}

impl LanFlags {
    /// Overrides `config` with every flag given.
    pub fn apply(&self, config: &mut LanConfig) {
        if let Some(enabled) = self.lan_enabled {
            config.enabled = enabled;
        }
        if let Some(collections) = &self.lan_collections {
            config.collections = collections.iter().cloned().collect();
        }
        if let Some(site) = &self.lan_site {
            config.site = site.clone();
        }
        if let Some(fleet) = &self.lan_fleet {
            config.fleet = fleet.clone();
        }
        if let Some(mode) = self.lan_mode {
            config.mode = mode;
        }
        if let Some(listen) = &self.lan_listen {
            config.listen = listen.iter().filter(|e| !e.is_empty()).cloned().collect();
        }
        if let Some(connect) = &self.lan_connect {
            config.connect = connect.iter().filter(|e| !e.is_empty()).cloned().collect();
        }
        if let Some(multicast) = self.lan_multicast_scouting {
            config.multicast_scouting = multicast;
        }
        if let Some(lease_ms) = self.lan_lease_ms {
            config.lease_ms = lease_ms;
        }
        if let (Some(root_ca), Some(certificate), Some(private_key)) =
            (&self.lan_tls_root_ca, &self.lan_tls_certificate, &self.lan_tls_private_key)
        {
            config.tls = Some(BackboneTls {
                root_ca: root_ca.clone(),
                certificate: certificate.clone(),
                private_key: private_key.clone(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::config::{AgentConfig, Cli};

    #[test]
    fn flags_override_the_lan_defaults() {
        let cli = Cli::parse_from([
            "edge-agent",
            "--lan-enabled",
            "true",
            "--lan-collections",
            "site,plant-7/notes",
            "--lan-site",
            "plant-7",
            "--lan-listen",
            "tcp/127.0.0.1:7448",
            "--lan-connect",
            "tcp/127.0.0.1:7449,tcp/127.0.0.1:7450",
            "--lan-mode",
            "client",
            "--lan-lease-ms",
            "2000",
        ]);
        let config = AgentConfig::load(&cli).unwrap();
        let lan = &config.lan;
        assert!(lan.enabled);
        let collections: Vec<&str> = lan.collections.iter().map(|c| c.as_str()).collect();
        assert_eq!(collections, ["plant-7/notes", "site"]);
        assert_eq!(lan.site, "plant-7");
        assert_eq!(lan.listen, ["tcp/127.0.0.1:7448"]);
        assert_eq!(lan.connect, ["tcp/127.0.0.1:7449", "tcp/127.0.0.1:7450"]);
        assert_eq!(lan.mode, cairn_shared::io::backbone::BackboneMode::Client);
        assert_eq!(lan.lease_ms, 2000);
        assert!(!lan.multicast_scouting);
    }

    #[test]
    fn an_enabled_mesh_without_collections_or_with_a_bad_site_is_refused() {
        let empty = Cli::parse_from(["edge-agent", "--lan-enabled", "true"]);
        let error = AgentConfig::load(&empty).unwrap_err();
        assert!(format!("{error:#}").contains("lan.collections"), "{error:#}");
        let bad_site = Cli::parse_from(["edge-agent", "--lan-site", "a/b"]);
        let error = AgentConfig::load(&bad_site).unwrap_err();
        assert!(format!("{error:#}").contains("lan.site"), "{error:#}");
        assert!(Cli::try_parse_from(["edge-agent", "--lan-collections", "bad//name"]).is_err());
    }
}
