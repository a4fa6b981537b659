//! Prometheus metrics of the zenoh carrier (`cairn_backbone_*`): the hub backbone on hubs,
//! the LAN mesh on agents (the sample and link counters count whichever the node runs). They
//! live outside the backbone module so the registry has them in every build; without the
//! carrier they stay 0.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Backbone gauges and counters; clones share the same values.
#[derive(Debug, Clone, Default)]
pub struct BackboneMetrics {
    /// Other hubs whose liveliness token is present.
    pub hubs_seen: Gauge,
    /// Other hubs with an attached link that has carried frames from them.
    pub hubs_connected: Gauge,
    /// Agents of the same site present on the LAN.
    pub lan_neighbours_seen: Gauge,
    /// Agents of the same site with an attached LAN link that has carried frames from them.
    pub lan_neighbours_connected: Gauge,
    /// Samples handed to the node.
    pub samples_delivered: Counter,
    /// Samples larger than a frame may be, dropped.
    pub samples_oversized: Counter,
    /// Samples from an ended link, or from a member whose token never came, dropped.
    pub samples_dropped: Counter,
    /// Publications zenoh refused.
    pub publish_errors: Counter,
    /// Links attached to the node since start.
    pub links_attached: Counter,
}

impl BackboneMetrics {
    /// Registers every metric under `backbone_`.
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("backbone");
        registry.register(
            "hubs_seen",
            "Other hubs present on the backbone",
            self.hubs_seen.clone(),
        );
        registry.register(
            "hubs_connected",
            "Other hubs whose backbone link carries frames",
            self.hubs_connected.clone(),
        );
        registry.register(
            "lan_neighbours_seen",
            "Agents of the same site present on the LAN",
            self.lan_neighbours_seen.clone(),
        );
        registry.register(
            "lan_neighbours_connected",
            "Agents of the same site whose LAN link carries frames",
            self.lan_neighbours_connected.clone(),
        );
        let counters = [
            ("samples_delivered", "Backbone samples handed to the node", &self.samples_delivered),
            (
                "samples_oversized",
                "Backbone samples over the frame limit, dropped",
                &self.samples_oversized,
            ),
            (
                "samples_dropped",
                "Backbone samples of ended links or unknown members, dropped",
                &self.samples_dropped,
            ),
            ("publish_errors", "Backbone publications zenoh refused", &self.publish_errors),
            ("links_attached", "Backbone links attached to the node", &self.links_attached),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
    }
}
