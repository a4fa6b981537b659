//! Command-line flags (and their environment variables) for the backbone settings; each one
//! given overrides the configuration file.

use std::path::PathBuf;

use cairn_shared::io::backbone::{BackboneConfig, BackboneMode, BackboneTls};

/// Backbone flags.
#[derive(Debug, Clone, clap::Args)]
pub struct BackboneFlags {
    /// Join the backbone (true or false).
    #[arg(long, env = "CAIRN_BACKBONE_ENABLED")]
    pub backbone_enabled: Option<bool>,
    /// How this hub takes part in the zenoh network.
    #[arg(long, env = "CAIRN_BACKBONE_MODE", value_parser = parse_mode)]
    pub backbone_mode: Option<BackboneMode>,
    /// zenoh endpoints to listen on, comma-separated (e.g. `tcp/0.0.0.0:7447`).
    #[arg(long, env = "CAIRN_BACKBONE_LISTEN", value_delimiter = ',')]
    pub backbone_listen: Option<Vec<String>>,
    /// zenoh endpoints to connect to, comma-separated.
    #[arg(long, env = "CAIRN_BACKBONE_CONNECT", value_delimiter = ',')]
    pub backbone_connect: Option<Vec<String>>,
    /// Find peers by UDP multicast (true or false).
    #[arg(long, env = "CAIRN_BACKBONE_MULTICAST_SCOUTING")]
    pub backbone_multicast_scouting: Option<bool>,
    /// Key prefix separating fleets that share a zenoh network.
    #[arg(long, env = "CAIRN_BACKBONE_FLEET")]
    pub backbone_fleet: Option<String>,
    /// How long a silent zenoh link lives before the hubs behind it leave, in milliseconds.
    #[arg(long, env = "CAIRN_BACKBONE_LEASE_MS")]
    pub backbone_lease_ms: Option<u64>,
    /// Fleet CA certificate (PEM) for zenoh's mutual TLS; needs the two flags below.
    #[arg(
        long,
        env = "CAIRN_BACKBONE_TLS_ROOT_CA",
        requires_all = ["backbone_tls_certificate", "backbone_tls_private_key"]
    )]
    pub backbone_tls_root_ca: Option<PathBuf>,
    /// This hub's certificate (PEM) for zenoh's mutual TLS.
    #[arg(long, env = "CAIRN_BACKBONE_TLS_CERTIFICATE")]
    pub backbone_tls_certificate: Option<PathBuf>,
    /// This hub's private key (PEM) for zenoh's mutual TLS.
    #[arg(long, env = "CAIRN_BACKBONE_TLS_PRIVATE_KEY")]
    pub backbone_tls_private_key: Option<PathBuf>,
}

impl BackboneFlags {
    /// Overrides `config` with every flag given.
    pub fn apply(&self, config: &mut BackboneConfig) {
        if let Some(enabled) = self.backbone_enabled {
            config.enabled = enabled;
        }
        if let Some(mode) = self.backbone_mode {
            config.mode = mode;
        }
        if let Some(listen) = &self.backbone_listen {
            config.listen = listen.iter().filter(|e| !e.is_empty()).cloned().collect();
        }
        if let Some(connect) = &self.backbone_connect {
            config.connect = connect.iter().filter(|e| !e.is_empty()).cloned().collect();
        }
        if let Some(multicast) = self.backbone_multicast_scouting {
            config.multicast_scouting = multicast;
        }
        if let Some(fleet) = &self.backbone_fleet {
            config.fleet = fleet.clone();
        }
        if let Some(lease_ms) = self.backbone_lease_ms {
            config.lease_ms = lease_ms;
        }
        if let (Some(root_ca), Some(certificate), Some(private_key)) = (
            &self.backbone_tls_root_ca,
            &self.backbone_tls_certificate,
            &self.backbone_tls_private_key,
        ) {
            config.tls = Some(BackboneTls {
                root_ca: root_ca.clone(),
                certificate: certificate.clone(),
                private_key: private_key.clone(),
            });
        }
    }
}

fn parse_mode(text: &str) -> Result<BackboneMode, String> {
    match text {
        "peer" => Ok(BackboneMode::Peer),
        "client" => Ok(BackboneMode::Client),
        "router" => Ok(BackboneMode::Router),
        other => Err(format!("{other:?}: expected peer, client or router")),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::config::{Cli, HubConfig};

    #[test]
    fn flags_override_the_backbone_defaults() {
        let cli = Cli::parse_from([
            "cloud-hub",
            "--region",
            "eu-west",
            "--backbone-listen",
            "tcp/127.0.0.1:7447",
            "--backbone-connect",
            "tcp/127.0.0.1:7448,tcp/127.0.0.1:7449",
            "--backbone-fleet",
            "lab",
            "--backbone-mode",
            "client",
            "--backbone-lease-ms",
            "2000",
        ]);
        let config = HubConfig::load(&cli).unwrap();
        assert_eq!(config.region.as_str(), "eu-west");
        assert_eq!(config.backbone.listen, ["tcp/127.0.0.1:7447"]);
        assert_eq!(config.backbone.connect, ["tcp/127.0.0.1:7448", "tcp/127.0.0.1:7449"]);
        assert_eq!(config.backbone.fleet, "lab");
        assert_eq!(config.backbone.mode, cairn_shared::io::backbone::BackboneMode::Client);
        assert_eq!(config.backbone.lease_ms, 2000);
        assert!(config.backbone.enabled);
    }

    #[test]
    fn a_bad_region_or_endpoint_is_refused() {
        assert!(Cli::try_parse_from(["cloud-hub", "--region", "eu/west"]).is_err());
        let cli = Cli::parse_from(["cloud-hub", "--backbone-connect", "nonsense"]);
        let error = HubConfig::load(&cli).unwrap_err();
        assert!(format!("{error:#}").contains("nonsense"), "{error:#}");
    }
}
