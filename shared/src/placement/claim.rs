//! Claims: which node says it runs a job, and which claim is reported.
//!
//! Execution is at-least-once. A node claims a job by writing a [`Claim`] into the job's
//! document; during a partition two nodes may each claim and run the same job. When their
//! claims merge, every node reports the same one, the earliest by (HLC time, node id), so
//! readers agree on whose result counts without any coordination.

use serde::{Deserialize, Serialize};

use crate::ids::NodeId;

/// A node's claim to run a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The job claimed.
    pub job_id: String,
    /// The node that claimed it.
    #[serde(with = "super::text_id")]
    pub node_id: NodeId,
    /// When, as an HLC time (NTP64).
    pub claimed_at: u64,
}

/// The claim to report among one job's claims: the earliest by (HLC time, node id).
pub fn reported_claim(claims: &[Claim]) -> Option<&Claim> {
    claims.iter().min_by_key(|claim| (claim.claimed_at, claim.node_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(node: u8, claimed_at: u64) -> Claim {
        Claim { job_id: "j".into(), node_id: NodeId::from_bytes([node; 16]), claimed_at }
    }

    #[test]
    fn reported_claim_is_the_earliest_by_hlc_then_node_id() {
        let cases: [(&str, Vec<Claim>, Option<Claim>); 4] = [
            ("no claims", vec![], None),
            ("one claim", vec![claim(5, 9)], Some(claim(5, 9))),
            ("earlier hlc wins", vec![claim(1, 20), claim(9, 10)], Some(claim(9, 10))),
            ("same hlc: lower node id", vec![claim(7, 10), claim(3, 10)], Some(claim(3, 10))),
        ];
        for (name, claims, expected) in cases {
            assert_eq!(reported_claim(&claims), expected.as_ref(), "{name}");
            let reversed: Vec<Claim> = claims.iter().rev().cloned().collect();
            assert_eq!(reported_claim(&reversed), expected.as_ref(), "{name}, reversed");
        }
    }
}
