//! Jobs on a real hub and three real agents with different capacities (set through the
//! test-only `[profile_override]` section): jobs land where the cost model says, results
//! reach the result documents on every node, and an agent flooded with jobs sheds new ones.

use std::path::Path;
use std::time::{Duration, Instant};

use field_tests::{free_udp_port, wait_for, Agent, ApiClient, Hub, TestDir};
use serde_json::{json, Value};

/// Jobs of this kind sleep briefly and echo their input, so a flood keeps a node busy.
const SLOW_KIND: &str = "exec:slow";
const PATIENCE: Duration = Duration::from_secs(30);

/// Every node uses the same policy; `shed_queue_len` is small so a flood is quick to make.
fn config(dir: &Path, name: &str, speed_score: f64, executables: bool) -> anyhow::Result<String> {
    let exec = if executables {
        "[jobs.executables.slow]\npath = \"/bin/sh\"\nargs = [\"-c\", \"sleep 0.5; cat >/dev/null; echo '{\\\"slept\\\": true}'\"]\ntimeout_ms = 10000\n"
    } else {
        ""
    };
    let text = format!(
        "[jobs]\npoll_ms = 100\nprofile_refresh_ms = 1000\nmax_parallel = 2\n\n\
         [jobs.policy]\nshed_queue_len = 3\n\n{exec}\n\
         [profile_override]\nspeed_score = {speed_score}\ncores = 2\nrtt_ms = 20\n\
         bandwidth_bytes_per_sec = 1000000\ncpu = 0.0\n"
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text)?;
    Ok(path.display().to_string())
}

fn get(api: &ApiClient, path: &str) -> Option<Value> {
    let response = api.send("GET", path, None).ok()?;
    (response.status == 200).then_some(response.body)
}

fn node_id(api: &ApiClient) -> anyhow::Result<String> {
    Ok(api.status()?.node)
}

fn submit(api: &ApiClient, job: &Value) -> anyhow::Result<Value> {
    let response = api.send("POST", "/v1/jobs", Some(job.to_string().as_bytes()))?;
    anyhow::ensure!(
        response.status == 201,
        "submit answered {}: {}",
        response.status,
        response.body
    );
    Ok(response.body)
}

/// Waits until `api` reports the job's result, and returns the job.
/// Waits until job `id` is done and its result has reached this node: the job record and the
/// result document replicate separately, so one may arrive before the other.
fn finished(api: &ApiClient, id: &str) -> anyhow::Result<Value> {
    wait_for(&format!("job {id} to finish and its result to arrive"), PATIENCE, || {
        get(api, &format!("/v1/jobs/{id}")).filter(|job| {
            job["reported"]["state"] == "done" && !job["reported"]["output"].is_null()
        })
    })
}

#[test]
fn jobs_go_where_the_cost_model_says_and_results_reach_every_node() -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = TestDir::new("jobs")?;
    let root = dir.path();
    let with_config =
        |path: String| vec!["--config".to_owned(), path, "--jobs-enabled".into(), "true".into()];
    let hub_config = config(root, "hub", 10.0, false)?;
    let scaling_section = "\n[scaling]\ninterval_ms = 200\n";
    std::fs::write(&hub_config, std::fs::read_to_string(&hub_config)? + scaling_section)?;
    let hub = Hub::start_with(root, "hub", free_udp_port()?, &with_config(hub_config))?;
    let slow =
        Agent::start_with(root, "slow", hub.quic, &with_config(config(root, "slow", 50.0, true)?))?;
    let mid =
        Agent::start_with(root, "mid", hub.quic, &with_config(config(root, "mid", 200.0, true)?))?;
    let fast = Agent::start_with(
        root,
        "fast",
        hub.quic,
        &with_config(config(root, "fast", 1000.0, true)?),
    )?;
    let agents = [&slow.api, &mid.api, &fast.api];
    let everyone = [&slow.api, &mid.api, &fast.api, &hub.http];
    let (slow_id, fast_id) = (node_id(&slow.api)?, node_id(&fast.api)?);

    for api in everyone {
        wait_for("every node to see four fresh profiles", PATIENCE, || {
            let nodes = get(api, "/v1/nodes")?;
            let fresh = nodes["nodes"].as_array()?.iter().filter(|n| n["stale"] == false).count();
            (fresh == 4).then_some(())
        })?;
    }

    // A time series on the slow agent; apps cannot write into the reserved collections.
    let series: Vec<Value> = (0..600).map(|t| json!({"t": t, "v": (t % 10) as f64})).collect();
    let input = slow.api.create("plant-7/sensors", &json!({"series": series}))?;
    let reserved = slow.api.send("POST", "/v1/collections/_cairn.jobs/docs", Some(b"{}"))?;
    assert_eq!(reserved.status, 403, "{}", reserved.body);

    // Data-heavy: little work, high sensitivity. It stays on the slow agent holding the data.
    let heavy = submit(
        &slow.api,
        &json!({
            "id": "heavy", "kind": "window_stats", "params": {"window": 100},
            "inputs": [input], "work_units": 10.0, "sensitivity": 1000.0,
        }),
    )?;
    assert_eq!(heavy["placement"]["chosen"], slow_id.as_str(), "{heavy}");
    // Compute-heavy with a small input: it moves to the fastest agent.
    let compute = submit(
        &slow.api,
        &json!({
            "id": "compute", "kind": "window_stats", "params": {"window": 100},
            "inputs": [input], "work_units": 100000.0, "sensitivity": 0.01,
        }),
    )?;
    assert_eq!(compute["placement"]["chosen"], fast_id.as_str(), "{compute}");

    for (id, runner) in [("heavy", &slow_id), ("compute", &fast_id)] {
        let job = finished(&slow.api, id)?;
        assert_eq!(job["reported"]["node_id"], runner.as_str(), "{job}");
        assert_eq!(job["placement"]["table"].as_array().map(Vec::len), Some(4), "{job}");
        let result_doc = job["result_doc"].as_str().unwrap_or_default().to_owned();
        for api in everyone {
            let doc = wait_for(&format!("{id}'s result on every node"), PATIENCE, || {
                api.try_read(&result_doc)
                    .filter(|d| d.doc["reported"]["node_id"] == runner.as_str())
            })?;
            let windows = &doc.doc["reported"]["output"]["windows"];
            assert_eq!(windows.as_array().map(Vec::len), Some(6), "{}", doc.doc);
            assert_eq!(windows[0]["mean"], 4.5);
        }
    }

    // Bad submissions are refused with a reason and record nothing.
    let missing_doc = "2Vph4dEBk73s42ytmGRebjmuWbB1";
    let params = "x".repeat(70_000);
    let refused = [
        (json!({"kind": "nope", "work_units": 1.0}), 400),
        (json!({"id": "a/b", "kind": "compact", "work_units": 1.0}), 400),
        (json!({"kind": "compact", "work_units": -1.0}), 400),
        (json!({"kind": "compact", "work_units": 1.0, "params": params}), 400),
        (json!({"kind": "compact", "work_units": 1.0, "inputs": [missing_doc]}), 404),
        (json!({"id": "heavy", "kind": "compact", "work_units": 1.0}), 409),
    ];
    for (job, status) in refused {
        let response = slow.api.send("POST", "/v1/jobs", Some(job.to_string().as_bytes()))?;
        assert_eq!(response.status, status, "{job}: {}", response.body);
        assert!(response.body["error"]["code"].is_string(), "{}", response.body);
    }
    assert_eq!(slow.api.send("GET", "/v1/jobs/nope", None)?.status, 404);

    // A flood at the fast agent: once three jobs are placed on it, it sheds the rest.
    let flood: Vec<String> = (0..8).map(|i| format!("flood-{i}")).collect();
    let mut shed = 0;
    for id in &flood {
        let job = json!({"id": id, "kind": SLOW_KIND, "work_units": 100.0, "sensitivity": 0.0});
        let placed = submit(&fast.api, &job)?;
        if placed["placement"]["chosen"] != fast_id.as_str() {
            shed += 1;
            let rows = placed["placement"]["table"].as_array().cloned().unwrap_or_default();
            let fast_row = rows.iter().find(|row| row["node_id"] == fast_id.as_str());
            assert_eq!(fast_row.map(|row| &row["reason"]), Some(&json!("overloaded")), "{placed}");
        }
    }
    assert!(shed >= 4, "the flooded agent kept {} of 8 jobs", 8 - shed);
    let mut runners = std::collections::BTreeSet::new();
    for id in &flood {
        let job = finished(&fast.api, id)?;
        assert_eq!(job["reported"]["output"], json!({"slept": true}), "{job}");
        assert_eq!(
            job["reported"]["node_id"], job["placement"]["chosen"],
            "ran where placed: {job}"
        );
        runners.insert(job["reported"]["node_id"].as_str().unwrap_or_default().to_owned());
    }
    assert!(runners.len() >= 2, "the flood ran on {runners:?}");
    assert!(
        !runners.iter().any(|n| *n == node_id(&hub.http).unwrap_or_default()),
        "the hub lacks the executable"
    );
    for api in agents {
        let jobs = get(api, "/v1/jobs?limit=1000").unwrap_or_default();
        assert_eq!(jobs["jobs"].as_array().map(Vec::len), Some(10), "every agent knows every job");
    }
    // The hub advises a replica count from its load signals.
    let scaling = wait_for("the hub's scaling advice", PATIENCE, || {
        get(&hub.http, "/v1/scaling").filter(|advice| advice["recommended_replicas"].is_u64())
    })?;
    assert_eq!(scaling["signals"]["connected_agents"], 3, "{scaling}");
    // CPU counts too, and the machine running the test may be busy: at least one replica.
    let recommended = hub.http.metric("cairn_scaling_recommended_replicas")?;
    assert!(recommended.is_some_and(|r| r >= 1.0), "{recommended:?}");
    eprintln!("jobs field test took {:?}", started.elapsed());
    Ok(())
}
