use proptest::prelude::*;

use super::*;

/// A fixed HLC time: 1000 s in NTP64.
const NOW: u64 = 1000 << 32;
const MIB: u64 = 1024 * 1024;

fn node(n: u8) -> NodeId {
    NodeId::from_bytes([n; 16])
}

fn doc(n: u8) -> DocId {
    DocId::from_slice(&[n; 16]).unwrap()
}

/// An idle agent on mains with a 10 MB/s unmetered link, measured at `NOW`.
fn agent(n: u8, speed_score: f64) -> CapabilityProfile {
    CapabilityProfile {
        node_id: node(n),
        role: NodeRole::Agent,
        arch: "aarch64".into(),
        cores: 4,
        speed_score,
        memory_free_bytes: 1 << 30,
        storage_free_bytes: 1 << 40,
        power: Power::Mains,
        link: Link { rtt_ms: 20, bandwidth_bytes_per_sec: 10_000_000, metered: false },
        load: Load { cpu: 0.0, queued_jobs: 0 },
        labels: BTreeMap::new(),
        measured_at: NOW,
    }
}

fn job(id: &str, work_units: f64, inputs: &[(u8, u64)]) -> JobSpec {
    JobSpec {
        id: id.into(),
        kind: "transform".into(),
        inputs: inputs
            .iter()
            .map(|&(d, size_bytes)| JobInput { doc_id: doc(d), size_bytes })
            .collect(),
        work_units,
        sensitivity: 1.0,
        constraints: Constraints::default(),
    }
}

fn replicas(held: &[(u8, u8)]) -> ReplicaMap {
    let mut map = ReplicaMap::new();
    for &(d, n) in held {
        map.insert(doc(d), node(n));
    }
    map
}

fn choose(job: &JobSpec, nodes: &[CapabilityProfile], held: &[(u8, u8)]) -> Placement {
    place(job, nodes, &replicas(held), NOW, &PlacementPolicy::default()).unwrap()
}

fn row(placement: &Placement, n: u8) -> &ScoreRow {
    placement.table.iter().find(|row| row.node_id == node(n)).unwrap()
}

fn with(
    mut profile: CapabilityProfile,
    change: impl FnOnce(&mut CapabilityProfile),
) -> CapabilityProfile {
    change(&mut profile);
    profile
}

#[test]
fn data_heavy_job_stays_with_its_data_on_a_slower_node() {
    let job = job("etl", 1_000.0, &[(1, 1024 * MIB)]);
    let placement = choose(&job, &[agent(1, 50.0), agent(2, 200.0)], &[(1, 1)]);
    assert_eq!(placement.chosen, Some(node(1)));
    assert_eq!(row(&placement, 1).bytes_to_move, 0);
    assert_eq!(row(&placement, 2).bytes_to_move, 1024 * MIB);
}

#[test]
fn compute_heavy_job_with_small_input_moves_to_the_fastest_node() {
    let job = job("render", 100_000.0, &[(1, 1024)]);
    let nodes = [agent(1, 50.0), agent(2, 200.0), agent(3, 400.0)];
    assert_eq!(choose(&job, &nodes, &[(1, 1)]).chosen, Some(node(3)));
}

#[test]
fn low_battery_and_metered_links_are_avoided() {
    let low = |p: &mut CapabilityProfile| p.power = Power::Battery { level_percent: 10 };
    let full = |p: &mut CapabilityProfile| p.power = Power::Battery { level_percent: 90 };
    let metered = |p: &mut CapabilityProfile| p.link.metered = true;
    let moving = job("moving", 1_000.0, &[(1, 100 * MIB)]);
    let local = job("local", 1_000.0, &[]);
    // Node 1 is always the faster one; the penalty decides whether that is enough.
    let cases: [(&str, &JobSpec, CapabilityProfile, u8); 4] = [
        ("battery below threshold", &local, with(agent(1, 120.0), low), 2),
        ("battery above threshold", &local, with(agent(1, 120.0), full), 1),
        ("metered link, data moves", &moving, with(agent(1, 120.0), metered), 2),
        ("metered link, nothing moves", &local, with(agent(1, 120.0), metered), 1),
    ];
    for (name, job, fast, expected) in cases {
        let placement = choose(job, &[fast, agent(2, 100.0)], &[]);
        assert_eq!(placement.chosen, Some(node(expected)), "{name}");
    }
}

#[test]
fn constraints_are_honoured_and_no_eligible_node_means_none() {
    let x86 = with(agent(1, 100.0), |p| p.arch = "x86_64".into());
    let zone_a = with(agent(2, 100.0), |p| {
        p.labels.insert("zone".into(), "a".into());
    });
    let nodes = [x86, zone_a, agent(3, 500.0)];
    let zone = |value: &str| BTreeMap::from([("zone".to_owned(), value.to_owned())]);
    let cases = [
        ("arch", Some("x86_64"), BTreeMap::new(), Some(1), Ineligible::WrongArch),
        ("label", None, zone("a"), Some(2), Ineligible::MissingLabel),
        ("no label match", None, zone("b"), None, Ineligible::MissingLabel),
        ("no arch match", Some("riscv64"), BTreeMap::new(), None, Ineligible::WrongArch),
    ];
    for (name, arch, required_labels, expected, reason) in cases {
        let mut spec = job("constrained", 1_000.0, &[]);
        spec.constraints = Constraints { required_labels, arch: arch.map(str::to_owned) };
        let placement = choose(&spec, &nodes, &[]);
        assert_eq!(placement.chosen, expected.map(node), "{name}");
        assert_eq!(row(&placement, 3).reason, Some(reason), "{name}: fast node 3 is excluded");
        if expected.is_none() {
            assert!(placement.table.iter().all(|row| !row.eligible && row.reason.is_some()));
        }
    }
}

#[test]
fn exact_ties_are_broken_by_the_hash_whatever_the_order() {
    let nodes = [agent(1, 100.0), agent(2, 100.0), agent(3, 100.0)];
    let orders = [[0, 1, 2], [2, 1, 0], [1, 0, 2], [2, 0, 1]];
    let mut winners = BTreeSet::new();
    for j in 0..16 {
        let spec = job(&format!("tie-{j}"), 1_000.0, &[]);
        let expected = (1..=3).min_by_key(|&n| tie_hash(&spec.id, &node(n))).map(node);
        for order in orders {
            let shuffled: Vec<_> = order.iter().map(|&i| nodes[i].clone()).collect();
            assert_eq!(choose(&spec, &shuffled, &[]).chosen, expected, "{}", spec.id);
        }
        winners.extend(expected);
    }
    assert!(winners.len() > 1, "tied jobs spread across nodes");
}

#[test]
fn stale_profile_loses_its_job_to_the_next_best() {
    let policy = PlacementPolicy::default();
    let spec = job("stale", 10_000.0, &[]);
    // Node 2 published again 50 s later; node 1 went quiet.
    let nodes = [agent(1, 400.0), with(agent(2, 200.0), |p| p.measured_at = NOW + (50 << 32))];
    let first = place(&spec, &nodes, &ReplicaMap::new(), NOW, &policy).unwrap();
    assert_eq!(first.chosen, Some(node(1)));

    let soon = NOW + (10 << 32);
    let kept = replace_stale(&first, &spec, &nodes, &ReplicaMap::new(), soon, &policy).unwrap();
    assert_eq!(kept, None, "a fresh choice is kept");

    let later = NOW + (61 << 32);
    let moved = replace_stale(&first, &spec, &nodes, &ReplicaMap::new(), later, &policy).unwrap();
    let moved = moved.expect("stale choice is replaced");
    assert_eq!(moved.chosen, Some(node(2)));
    assert_eq!(row(&moved, 1).reason, Some(Ineligible::Stale));
}

#[test]
fn an_overloaded_choice_keeps_its_placed_jobs_but_a_vanished_one_loses_them() {
    let policy = PlacementPolicy::default();
    let spec = job("queued", 10_000.0, &[]);
    let nodes = [agent(1, 400.0), agent(2, 200.0)];
    let first = place(&spec, &nodes, &ReplicaMap::new(), NOW, &policy).unwrap();
    assert_eq!(first.chosen, Some(node(1)));

    let busy =
        [with(agent(1, 400.0), |p| p.load.queued_jobs = policy.shed_queue_len), agent(2, 200.0)];
    let kept = replace_stale(&first, &spec, &busy, &ReplicaMap::new(), NOW, &policy).unwrap();
    assert_eq!(kept, None, "the job waits in the overloaded node's queue");
    let fresh = place(&spec, &busy, &ReplicaMap::new(), NOW, &policy).unwrap();
    assert_eq!(fresh.chosen, Some(node(2)), "a new job goes elsewhere");

    let gone = replace_stale(&first, &spec, &nodes[1..], &ReplicaMap::new(), NOW, &policy).unwrap();
    assert_eq!(gone.and_then(|p| p.chosen), Some(node(2)), "a vanished node loses its job");
}

#[test]
fn overloaded_node_sheds_and_load_raises_its_own_cost() {
    let policy = PlacementPolicy::default();
    let spec = job("busy", 1_000.0, &[]);
    let full = with(agent(1, 400.0), |p| p.load.queued_jobs = policy.shed_queue_len);
    let placement = choose(&spec, &[full, agent(2, 100.0)], &[]);
    assert_eq!(placement.chosen, Some(node(2)));
    assert_eq!(row(&placement, 1).reason, Some(Ineligible::Overloaded));

    let loads = [(0.0, 0), (0.5, 0), (1.0, 0), (1.0, 2), (1.0, 7)];
    let costs: Vec<f64> = loads
        .iter()
        .map(|&(cpu, queued_jobs)| {
            let busy = with(agent(1, 100.0), |p| p.load = Load { cpu, queued_jobs });
            row(&choose(&spec, &[busy], &[]), 1).compute_s
        })
        .collect();
    assert!(costs.windows(2).all(|pair| pair[0] < pair[1]), "{costs:?}");
}

#[test]
fn hubs_hold_every_input_and_bad_profiles_are_skipped() {
    let hub = with(agent(1, 50.0), |p| p.role = NodeRole::Hub);
    let broken = with(agent(2, f64::NAN), |p| p.load.cpu = 2.0);
    let placement = choose(&job("hub", 100.0, &[(1, 1024 * MIB)]), &[hub, broken], &[]);
    assert_eq!(placement.chosen, Some(node(1)));
    assert_eq!(row(&placement, 1).bytes_to_move, 0);
    assert_eq!(row(&placement, 2).reason, Some(Ineligible::InvalidProfile));
    let json = serde_json::to_string(&placement).unwrap();
    assert_eq!(serde_json::from_str::<Placement>(&json).unwrap(), placement);
}

#[test]
fn network_input_is_validated() {
    let bad_profiles = [
        (with(agent(1, 0.0), |_| {}), ProfileError::SpeedScore),
        (with(agent(1, f64::INFINITY), |_| {}), ProfileError::SpeedScore),
        (with(agent(1, 1.0), |p| p.load.cpu = -0.1), ProfileError::Cpu),
        (with(agent(1, 1.0), |p| p.link.bandwidth_bytes_per_sec = 0), ProfileError::Bandwidth),
        (with(agent(1, 1.0), |p| p.cores = 0), ProfileError::Cores),
        (
            with(agent(1, 1.0), |p| p.power = Power::Battery { level_percent: 101 }),
            ProfileError::BatteryLevel(101),
        ),
    ];
    for (profile, error) in bad_profiles {
        assert_eq!(profile.validate(), Err(error));
    }
    let too_many: Vec<(u8, u64)> = vec![(0, 1); MAX_JOB_INPUTS + 1];
    let bad_jobs = [
        (job("", 1.0, &[]), JobError::Id),
        (job("a/b", 1.0, &[]), JobError::Id),
        (job("j", f64::NAN, &[]), JobError::WorkUnits),
        (job("j", -1.0, &[]), JobError::WorkUnits),
        (job("j", 1.0, &[(1, 1), (1, 2)]), JobError::DuplicateInput(doc(1))),
        (job("j", 1.0, &too_many), JobError::TooManyInputs(MAX_JOB_INPUTS + 1)),
    ];
    for (spec, error) in bad_jobs {
        let result =
            place(&spec, &[agent(1, 1.0)], &ReplicaMap::new(), NOW, &PlacementPolicy::default());
        assert_eq!(result, Err(PlacementError::Job(error)));
    }
    let twice = [agent(1, 1.0), agent(1, 2.0)];
    let result =
        place(&job("j", 1.0, &[]), &twice, &ReplicaMap::new(), NOW, &PlacementPolicy::default());
    assert_eq!(result, Err(PlacementError::DuplicateCandidate(node(1))));
}

/// Candidates with few distinct speeds, so that exact ties occur.
fn candidates() -> impl Strategy<Value = Vec<CapabilityProfile>> {
    let one = (
        prop::sample::select(vec![50.0, 100.0, 200.0]),
        prop::sample::select(vec![0.0, 0.5]),
        0u32..10,
        any::<bool>(),
        0u8..=100,
        any::<bool>(),
    );
    prop::collection::vec(one, 1..8).prop_map(|rows| {
        rows.into_iter()
            .enumerate()
            .map(|(i, (speed, cpu, queued_jobs, metered, level_percent, on_battery))| {
                with(agent(i as u8, speed), |p| {
                    p.load = Load { cpu, queued_jobs };
                    p.link.metered = metered;
                    if on_battery {
                        p.power = Power::Battery { level_percent };
                    }
                })
            })
            .collect()
    })
}

proptest! {
    #[test]
    fn shuffled_candidates_give_the_same_placement(
        (nodes, shuffled) in candidates().prop_flat_map(|v| (Just(v.clone()), Just(v).prop_shuffle())),
        held in prop::collection::vec((0u8..3, 0u8..8), 0..6),
        work in 0.0f64..10_000.0,
    ) {
        let spec = job("prop", work, &[(0, 10 * MIB), (1, MIB), (2, 1024)]);
        prop_assert_eq!(choose(&spec, &nodes, &held), choose(&spec, &shuffled, &held));
    }
}
