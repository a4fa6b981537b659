//! Which regions hold which collections: the replication policy, as a pure type.
//!
//! A policy is a list of rules, each naming a collection (or a subtree of collections, written
//! `prefix/**`) and the regions that hold it, plus the regions that hold every collection no
//! rule names (by default: every region). The most specific rule wins: an exact name beats any
//! subtree, and a longer subtree beats a shorter one. The policy reads no configuration file
//! and touches no network; hubs parse it from their configuration and ask it
//! [`ReplicationPolicy::holds`] before serving a collection.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ids::Collection;

/// Longest region name, in bytes (it appears in backbone key expressions and logs).
pub const MAX_REGION_BYTES: usize = 64;
/// Most rules in one policy, so a policy stays readable and matching stays cheap.
pub const MAX_RULES: usize = 1024;

/// A region name: 1 to [`MAX_REGION_BYTES`] of ASCII letters, digits, `-` and `_`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Region(String);

impl Region {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Region({})", self.0)
    }
}

impl FromStr for Region {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let valid = !s.is_empty()
            && s.len() <= MAX_REGION_BYTES
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if valid {
            Ok(Self(s.to_owned()))
        } else {
            Err(PolicyError::BadRegion(s.chars().take(80).collect()))
        }
    }
}

impl TryFrom<String> for Region {
    type Error = PolicyError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Region> for String {
    fn from(region: Region) -> Self {
        region.0
    }
}

/// A policy that could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A region name with characters outside `[A-Za-z0-9_-]`, empty, or too long.
    #[error("bad region name {0:?}: use 1 to 64 letters, digits, '-' or '_'")]
    BadRegion(String),
    /// A rule's collection pattern is neither a collection name nor `prefix/**`.
    #[error("bad collection pattern {pattern:?}: {reason}")]
    BadPattern {
        /// The pattern as written.
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A rule lists no region, so the collection would live nowhere.
    #[error("the rule for {0:?} names no region")]
    NoRegion(String),
    /// Two rules name the same pattern.
    #[error("two rules name {0:?}")]
    DuplicatePattern(String),
    /// More than [`MAX_RULES`] rules.
    #[error("{0} replication rules; at most {MAX_RULES} are allowed")]
    TooManyRules(usize),
}

/// A hub was asked for a collection its region does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("collection {collection} is not held in region {region}; it lives in {}", list(.held_in))]
pub struct NotHeldHere {
    /// The collection asked for.
    pub collection: String,
    /// This hub's region.
    pub region: Region,
    /// The regions that hold it.
    pub held_in: Vec<Region>,
}

fn list(regions: &[Region]) -> String {
    let names: Vec<&str> = regions.iter().map(Region::as_str).collect();
    format!("region(s) {}", names.join(", "))
}

/// Which collections a rule covers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Pattern {
    /// One collection.
    Exact(String),
    /// Every collection whose name starts with this prefix followed by `/` (and the prefix itself).
    Subtree(String),
}

impl Pattern {
    fn parse(text: &str) -> Result<Self, PolicyError> {
        let bad = |reason: &str| PolicyError::BadPattern {
            pattern: text.chars().take(120).collect(),
            reason: reason.into(),
        };
        let (name, subtree) = match text.strip_suffix("/**") {
            Some(prefix) => (prefix, true),
            None => (text, false),
        };
        if text == "**" {
            return Err(bad("use default_regions for every collection"));
        }
        Collection::from_str(name).map_err(|e| bad(&e.to_string()))?;
        if name.contains('*') {
            return Err(bad("'*' is only allowed as a trailing '/**'"));
        }
        Ok(if subtree { Self::Subtree(name.to_owned()) } else { Self::Exact(name.to_owned()) })
    }

    /// How specifically this pattern matches `collection`, or `None` if it does not.
    fn specificity(&self, collection: &str) -> Option<usize> {
        match self {
            Self::Exact(name) => (name == collection).then_some(usize::MAX),
            Self::Subtree(prefix) => {
                let inside = collection == prefix
                    || collection.strip_prefix(prefix.as_str()).is_some_and(|r| r.starts_with('/'));
                inside.then_some(prefix.len())
            }
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(name) => f.write_str(name),
            Self::Subtree(prefix) => write!(f, "{prefix}/**"),
        }
    }
}

/// One rule: the collections it covers and the regions that hold them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// A collection name, or `prefix/**` for the collection `prefix` and every one below it.
    pub collections: String,
    /// The regions that hold them (at least one).
    pub regions: Vec<Region>,
}

/// The policy as written in configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicySpec {
    /// Regions holding every collection no rule names; empty means every region.
    pub default_regions: Vec<Region>,
    /// The rules.
    pub rules: Vec<RuleSpec>,
}

/// Which regions hold which collections. Built from a [`PolicySpec`], checked once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PolicySpec", into = "PolicySpec")]
pub struct ReplicationPolicy {
    default_regions: BTreeSet<Region>,
    rules: Vec<(Pattern, BTreeSet<Region>)>,
}

impl TryFrom<PolicySpec> for ReplicationPolicy {
    type Error = PolicyError;

    fn try_from(spec: PolicySpec) -> Result<Self, Self::Error> {
        if spec.rules.len() > MAX_RULES {
            return Err(PolicyError::TooManyRules(spec.rules.len()));
        }
        let mut rules: Vec<(Pattern, BTreeSet<Region>)> = Vec::with_capacity(spec.rules.len());
        for rule in spec.rules {
            let pattern = Pattern::parse(&rule.collections)?;
            if rule.regions.is_empty() {
                return Err(PolicyError::NoRegion(rule.collections));
            }
            if rules.iter().any(|(p, _)| *p == pattern) {
                return Err(PolicyError::DuplicatePattern(rule.collections));
            }
            rules.push((pattern, rule.regions.into_iter().collect()));
        }
        Ok(Self { default_regions: spec.default_regions.into_iter().collect(), rules })
    }
}

impl From<ReplicationPolicy> for PolicySpec {
    fn from(policy: ReplicationPolicy) -> Self {
        Self {
            default_regions: policy.default_regions.into_iter().collect(),
            rules: policy
                .rules
                .into_iter()
                .map(|(pattern, regions)| RuleSpec {
                    collections: pattern.to_string(),
                    regions: regions.into_iter().collect(),
                })
                .collect(),
        }
    }
}

/// Where a collection lives, as a policy answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement<'a> {
    /// Every region holds it.
    Everywhere,
    /// Only these regions hold it.
    Regions(&'a BTreeSet<Region>),
}

impl ReplicationPolicy {
    /// The policy where every region holds every collection.
    pub fn everywhere() -> Self {
        Self::default()
    }

    /// Where `collection` lives.
    pub fn placement(&self, collection: &str) -> Placement<'_> {
        let best = self
            .rules
            .iter()
            .filter_map(|(pattern, regions)| Some((pattern.specificity(collection)?, regions)))
            .max_by_key(|(specificity, _)| *specificity);
        match best {
            Some((_, regions)) => Placement::Regions(regions),
            None if self.default_regions.is_empty() => Placement::Everywhere,
            None => Placement::Regions(&self.default_regions),
        }
    }

    /// Whether `region` holds `collection`.
    pub fn holds(&self, region: &Region, collection: &str) -> bool {
        match self.placement(collection) {
            Placement::Everywhere => true,
            Placement::Regions(regions) => regions.contains(region),
        }
    }

    /// `Ok` if `region` holds `collection`, else the error naming where it lives.
    pub fn check(&self, region: &Region, collection: &str) -> Result<(), NotHeldHere> {
        match self.placement(collection) {
            Placement::Everywhere => Ok(()),
            Placement::Regions(regions) if regions.contains(region) => Ok(()),
            Placement::Regions(regions) => Err(NotHeldHere {
                collection: collection.to_owned(),
                region: region.clone(),
                held_in: regions.iter().cloned().collect(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(name: &str) -> Region {
        name.parse().unwrap()
    }

    fn policy(default_regions: &[&str], rules: &[(&str, &[&str])]) -> ReplicationPolicy {
        PolicySpec {
            default_regions: default_regions.iter().map(|r| region(r)).collect(),
            rules: rules
                .iter()
                .map(|(collections, regions)| RuleSpec {
                    collections: (*collections).into(),
                    regions: regions.iter().map(|r| region(r)).collect(),
                })
                .collect(),
        }
        .try_into()
        .unwrap()
    }

    #[test]
    fn without_rules_every_region_holds_every_collection() {
        let policy = ReplicationPolicy::everywhere();
        assert!(policy.holds(&region("eu"), "plant-7/sensors"));
        assert!(policy.check(&region("us"), "anything").is_ok());
    }

    #[test]
    fn the_most_specific_rule_decides() {
        let policy = policy(
            &[],
            &[
                ("plant-7/**", &["eu"]),
                ("plant-7/shared", &["eu", "us"]),
                ("plant-7/a/**", &["ap"]),
            ],
        );
        assert!(policy.holds(&region("eu"), "plant-7/sensors"));
        assert!(!policy.holds(&region("us"), "plant-7/sensors"));
        assert!(policy.holds(&region("us"), "plant-7/shared"));
        assert!(policy.holds(&region("ap"), "plant-7/a/b"));
        assert!(!policy.holds(&region("eu"), "plant-7/a/b"));
        assert!(policy.holds(&region("eu"), "plant-7"));
        // A sibling that merely shares the prefix is not in the subtree.
        assert!(policy.holds(&region("us"), "plant-70/sensors"));
    }

    #[test]
    fn default_regions_cover_collections_no_rule_names() {
        let policy = policy(&["eu", "us"], &[("ap/**", &["ap"])]);
        assert!(policy.holds(&region("us"), "fleet/profiles"));
        assert!(!policy.holds(&region("ap"), "fleet/profiles"));
        assert!(policy.holds(&region("ap"), "ap/x"));
    }

    #[test]
    fn the_refusal_names_where_the_collection_lives() {
        let policy = policy(&[], &[("plant-7/**", &["eu-north", "eu-west"])]);
        let error = policy.check(&region("us-east"), "plant-7/sensors").unwrap_err();
        assert_eq!(error.held_in, vec![region("eu-north"), region("eu-west")]);
        let message = error.to_string();
        assert!(message.contains("plant-7/sensors"), "{message}");
        assert!(message.contains("us-east"), "{message}");
        assert!(message.contains("eu-north, eu-west"), "{message}");
    }

    #[test]
    fn bad_policies_are_refused_with_a_reason() {
        assert!(matches!("".parse::<Region>(), Err(PolicyError::BadRegion(_))));
        assert!(matches!("eu/west".parse::<Region>(), Err(PolicyError::BadRegion(_))));
        let spec = |collections: &str, regions: Vec<Region>| PolicySpec {
            default_regions: vec![],
            rules: vec![RuleSpec { collections: collections.into(), regions }],
        };
        let no_region = ReplicationPolicy::try_from(spec("a", vec![]));
        assert!(matches!(no_region, Err(PolicyError::NoRegion(_))));
        let star = ReplicationPolicy::try_from(spec("a/*/b", vec![region("eu")]));
        assert!(matches!(star, Err(PolicyError::BadPattern { .. })));
        let everything = ReplicationPolicy::try_from(spec("**", vec![region("eu")]));
        assert!(matches!(everything, Err(PolicyError::BadPattern { .. })));
        let twice = PolicySpec {
            default_regions: vec![],
            rules: vec![
                RuleSpec { collections: "a".into(), regions: vec![region("eu")] },
                RuleSpec { collections: "a".into(), regions: vec![region("us")] },
            ],
        };
        assert!(matches!(
            ReplicationPolicy::try_from(twice),
            Err(PolicyError::DuplicatePattern(_))
        ));
    }

    #[test]
    fn a_policy_round_trips_through_its_written_form() {
        let policy = policy(&["eu"], &[("plant-7/**", &["eu", "us"]), ("x", &["ap"])]);
        let spec = PolicySpec::from(policy.clone());
        assert_eq!(ReplicationPolicy::try_from(spec).unwrap(), policy);
    }
}
