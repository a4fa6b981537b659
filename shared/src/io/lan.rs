//! The LAN mesh: agents of one site syncing the collections marked shared-on-LAN directly
//! with each other over zenoh, with or without a hub, so a site keeps collaborating while its
//! uplink is down.
//!
//! It is the backbone's carrier (see `io::backbone`) with other keys and a restriction: each
//! agent declares a token under `cairn/<fleet>/lan/<site>/agents/`, attaches one node
//! connection per neighbour of the same site, and limits every such connection to
//! `collections`. The neighbours are `Role::Agent` node peers to the core: reconciliation and
//! per-document sync run as with a hub, but they never make a write hub-durable.
//!
//! Neighbours are found through the configured zenoh endpoints (`listen`, `connect`) or, when
//! `multicast_scouting` is on, by UDP multicast on the LAN. Trust is zenoh's mutual TLS with
//! the fleet CA (`tls`), as on the backbone; without it any process reaching the endpoints can
//! join, which is for labs only.

use std::collections::BTreeSet;

use super::backbone::{
    check_key_segment, Backbone, BackboneConfig, BackboneError, BackboneMode, BackboneTls,
    Membership,
};
use super::backbone_metrics::BackboneMetrics;
use super::driver::NodeHandle;
use crate::ids::{Collection, NodeId};
use crate::scope::{CollectionScope, MAX_SCOPE_COLLECTIONS};

/// LAN mesh settings (the agent's `[lan]` section).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LanConfig {
    /// Whether the agent joins its site's LAN mesh at all.
    pub enabled: bool,
    /// The collections shared on the LAN; no other collection crosses a LAN link.
    pub collections: BTreeSet<Collection>,
    /// The site: only agents of the same fleet and site become neighbours.
    pub site: String,
    /// Key prefix separating fleets that share a zenoh network.
    pub fleet: String,
    /// Peer (the usual choice: neighbours talk directly), client or router.
    pub mode: BackboneMode,
    /// zenoh endpoints to listen on, such as `tcp/0.0.0.0:7448` or `tls/0.0.0.0:7448`.
    /// Empty: listen nowhere (this agent only dials).
    pub listen: Vec<String>,
    /// zenoh endpoints of neighbours (or a router) to connect to; retried until they answer.
    pub connect: Vec<String>,
    /// Find neighbours by UDP multicast on the LAN; off so nothing is found by accident.
    pub multicast_scouting: bool,
    /// A zenoh link silent this long is dead, and the neighbours behind it leave, in
    /// milliseconds.
    pub lease_ms: u64,
    /// zenoh's mutual TLS with the fleet CA; required outside a lab.
    pub tls: Option<BackboneTls>,
}

impl Default for LanConfig {
    fn default() -> Self {
        let carrier = BackboneConfig::default();
        Self {
            enabled: false,
            collections: BTreeSet::new(),
            site: "default".into(),
            fleet: carrier.fleet,
            mode: carrier.mode,
            listen: carrier.listen,
            connect: carrier.connect,
            multicast_scouting: carrier.multicast_scouting,
            lease_ms: carrier.lease_ms,
            tls: carrier.tls,
        }
    }
}

impl LanConfig {
    /// Checks the settings; an enabled mesh must share at least one collection.
    pub fn validate(&self) -> Result<(), BackboneError> {
        check_key_segment("lan", "site", &self.site)?;
        if self.collections.len() > MAX_SCOPE_COLLECTIONS {
            return Err(BackboneError::Config(format!(
                "lan.collections names {} collections, at most {MAX_SCOPE_COLLECTIONS}",
                self.collections.len()
            )));
        }
        if self.enabled && self.collections.is_empty() {
            return Err(BackboneError::Config(
                "lan.collections is empty: name the collections shared on the LAN".into(),
            ));
        }
        self.carrier().validate_section("lan")
    }

    /// The collections a LAN link carries.
    pub fn scope(&self) -> CollectionScope {
        CollectionScope::only(self.collections.iter().cloned())
    }

    /// The zenoh settings, in the backbone's terms.
    fn carrier(&self) -> BackboneConfig {
        BackboneConfig {
            enabled: self.enabled,
            mode: self.mode,
            listen: self.listen.clone(),
            connect: self.connect.clone(),
            multicast_scouting: self.multicast_scouting,
            fleet: self.fleet.clone(),
            lease_ms: self.lease_ms,
            tls: self.tls.clone(),
        }
    }
}

/// Another agent of the same site on the LAN.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Neighbour {
    /// Its node id.
    #[serde(serialize_with = "as_text")]
    pub node_id: NodeId,
    /// Which run of that agent this is (drawn at its start).
    pub incarnation: String,
    /// Whether a link is attached and the neighbour has sent frames on it.
    pub connected: bool,
}

fn as_text<S: serde::Serializer>(node_id: &NodeId, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(node_id)
}

/// A running membership of the site's LAN mesh.
#[derive(Debug)]
pub struct LanMesh {
    membership: Backbone,
}

impl LanMesh {
    /// Joins the site's LAN mesh and starts attaching neighbours to `node`, each link limited
    /// to the shared-on-LAN collections.
    ///
    /// `max_frame_bytes` bounds a sample (one frame plus its length prefix); `metrics` are
    /// the registry's carrier metrics, whose `lan_neighbours_*` gauges this mesh feeds.
    pub async fn start(
        config: &LanConfig,
        node: NodeHandle,
        max_frame_bytes: usize,
        metrics: BackboneMetrics,
    ) -> Result<Self, BackboneError> {
        config.validate()?;
        let membership =
            Membership::LanAgent { site: config.site.clone(), collections: config.scope() };
        let carrier = config.carrier();
        let membership =
            Backbone::join(&carrier, membership, node, max_frame_bytes, metrics).await?;
        Ok(Self { membership })
    }

    /// The neighbours currently present.
    pub fn neighbours(&self) -> Vec<Neighbour> {
        let members = self.membership.members().into_iter();
        members
            .map(|member| Neighbour {
                node_id: member.node_id,
                incarnation: format!("{:016x}", member.incarnation),
                connected: member.connected,
            })
            .collect()
    }

    /// Leaves the mesh: detaches every link, withdraws the token, closes the session.
    pub async fn stop(self) {
        self.membership.stop().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site_only() -> LanConfig {
        LanConfig {
            enabled: true,
            collections: ["site".parse().unwrap()].into(),
            ..LanConfig::default()
        }
    }

    #[test]
    fn the_default_is_off_and_valid_and_an_enabled_mesh_needs_collections() {
        let defaults = LanConfig::default();
        assert!(!defaults.enabled);
        assert!(defaults.validate().is_ok());
        let empty = LanConfig { enabled: true, ..LanConfig::default() };
        let error = empty.validate().unwrap_err();
        assert!(error.to_string().contains("lan.collections"), "{error}");
        assert!(site_only().validate().is_ok());
    }

    #[test]
    fn bad_sites_leases_and_endpoints_are_refused_naming_the_lan_section() {
        for site in ["", "a/b", "*", &"s".repeat(65)] {
            let config = LanConfig { site: site.into(), ..site_only() };
            let error = config.validate().unwrap_err();
            assert!(error.to_string().contains("lan.site"), "{site}: {error}");
        }
        let short_lease = LanConfig { lease_ms: 10, ..site_only() };
        assert!(short_lease.validate().unwrap_err().to_string().contains("lan.lease_ms"));
        let endpoint = LanConfig { connect: vec!["nonsense".into()], ..site_only() };
        assert!(endpoint.validate().unwrap_err().to_string().contains("lan endpoint"));
    }

    #[test]
    fn a_lan_link_carries_only_the_shared_collections() {
        let config = LanConfig {
            collections: ["site".parse().unwrap(), "site/notes".parse().unwrap()].into(),
            ..site_only()
        };
        let scope = config.scope();
        assert!(scope.contains(&"site".parse().unwrap()));
        assert!(scope.contains(&"site/notes".parse().unwrap()));
        assert!(!scope.contains(&"private".parse().unwrap()));
    }

    #[test]
    fn the_section_parses_from_toml() {
        let text = "enabled = true\ncollections = [\"site\"]\nsite = \"plant-7\"\n\
                    listen = [\"tcp/127.0.0.1:7448\"]\nmulticast_scouting = true\n";
        let config: LanConfig = toml::from_str(text).unwrap();
        assert_eq!(config.site, "plant-7");
        assert!(config.multicast_scouting);
        assert!(config.validate().is_ok());
        assert!(config.carrier().zenoh_config().is_ok());
        assert!(toml::from_str::<LanConfig>("colections = []").is_err());
        let with_tls = format!(
            "{text}[tls]\nroot_ca = \"/etc/cairn/ca/ca.crt\"\n\
             certificate = \"/etc/cairn/node.crt\"\nprivate_key = \"/etc/cairn/node.key\"\n"
        );
        let config: LanConfig = toml::from_str(&with_tls).unwrap();
        assert!(config.tls.is_some());
        assert!(config.carrier().zenoh_config().is_ok());
    }
}
