//! The fault proxy: first each fault on its own, with plain UDP sockets and an echo server,
//! then between real processes, where a partitioned agent keeps accepting writes, catches up
//! once the partition heals, and keeps syncing after its NAT mapping changes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use field_tests::{
    fault_seed, free_udp_port, wait_for, Agent, Direction, FaultCounts, FaultProxy, Hub, TestDir,
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);
/// How long one receive waits before the caller checks its condition again.
const POLL: Duration = Duration::from_millis(20);

/// An echo server on 127.0.0.1 that records each packet's source and number; stops on drop.
struct Echo {
    address: SocketAddr,
    socket: UdpSocket,
    seen: Arc<Mutex<Vec<(SocketAddr, u64)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    fn start() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_read_timeout(Some(POLL)).unwrap();
        let seen: Arc<Mutex<Vec<(SocketAddr, u64)>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (server, log, stopped) = (socket.try_clone().unwrap(), Arc::clone(&seen), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buffer = [0u8; 65_535];
            while !stopped.load(Ordering::Relaxed) {
                if let Ok((len, from)) = server.recv_from(&mut buffer) {
                    log.lock().unwrap().push((from, number(&buffer[..len])));
                    server.send_to(&buffer[..len], from).unwrap();
                }
            }
        });
        Self { address: socket.local_addr().unwrap(), socket, seen, stop, thread: Some(thread) }
    }

    fn seen(&self) -> Vec<(SocketAddr, u64)> {
        self.seen.lock().unwrap().clone()
    }

    fn received(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// The address the proxy's mapping for the client sends from.
    fn last_source(&self) -> SocketAddr {
        self.seen.lock().unwrap().last().expect("nothing received yet").0
    }

    /// Sends a packet of its own, not an echo.
    fn send(&self, to: SocketAddr, n: u64) {
        self.socket.send_to(&n.to_be_bytes(), to).unwrap();
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn number(payload: &[u8]) -> u64 {
    u64::from_be_bytes(payload[..8].try_into().unwrap())
}

/// A client socket that talks to the proxy.
struct Client {
    socket: UdpSocket,
}

impl Client {
    fn new(proxy: &FaultProxy) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.connect(proxy.local_addr()).unwrap();
        socket.set_read_timeout(Some(POLL)).unwrap();
        Self { socket }
    }

    /// Sends `n` padded to `len` bytes.
    fn send_padded(&self, n: u64, len: usize) {
        let mut payload = n.to_be_bytes().to_vec();
        payload.resize(len.max(8), 0);
        self.socket.send(&payload).unwrap();
    }

    fn send(&self, n: u64) {
        self.send_padded(n, 8);
    }

    fn try_recv(&self) -> Option<u64> {
        let mut buffer = [0u8; 65_535];
        self.socket.recv(&mut buffer).ok().map(|len| number(&buffer[..len]))
    }

    /// Receives until `done` holds for what arrived, failing after `WAIT`.
    fn recv_until(&self, mut done: impl FnMut(&[u64]) -> bool) -> anyhow::Result<Vec<u64>> {
        let deadline = Instant::now() + WAIT;
        let mut received = Vec::new();
        while !done(&received) {
            anyhow::ensure!(Instant::now() < deadline, "timed out; received {received:?}");
            received.extend(self.try_recv());
        }
        Ok(received)
    }

    fn exchange(&self, n: u64) -> anyhow::Result<()> {
        self.send(n);
        let received = self.recv_until(|r| !r.is_empty())?;
        anyhow::ensure!(received == [n], "sent {n}, received {received:?}");
        Ok(())
    }
}

fn setup() -> anyhow::Result<(Echo, FaultProxy, Client)> {
    let echo = Echo::start();
    let proxy = FaultProxy::start(echo.address, fault_seed()?)?;
    let client = Client::new(&proxy);
    Ok((echo, proxy, client))
}

#[test]
fn packets_pass_through_unchanged_from_one_source_address() -> anyhow::Result<()> {
    let (echo, proxy, client) = setup()?;
    for n in 0..100 {
        client.exchange(n)?;
    }
    let seen = echo.seen();
    assert_eq!(seen.iter().map(|s| s.1).collect::<Vec<_>>(), (0..100).collect::<Vec<_>>());
    assert!(seen.iter().all(|s| s.0 == seen[0].0), "the proxy used one mapping");
    assert_ne!(seen[0].0, client.socket.local_addr()?, "the echo server sees the proxy");
    assert_eq!(proxy.counts(), FaultCounts::default());
    Ok(())
}

#[test]
fn loss_drops_about_the_configured_share() -> anyhow::Result<()> {
    const BATCHES: u64 = 40;
    const BATCH: u64 = 50;
    let (echo, proxy, client) = setup()?;
    proxy.loss(Direction::ToUpstream, 0.2)?;
    let mut received = 0;
    // Batches keep the burst far below the socket buffers, so only the proxy drops packets.
    for batch in 0..BATCHES {
        let dropped_before = proxy.counts().dropped_loss;
        (0..BATCH).for_each(|i| client.send(batch * BATCH + i));
        let echoes = client.recv_until(|r| {
            r.len() as u64 + proxy.counts().dropped_loss - dropped_before == BATCH
        })?;
        received += echoes.len() as u64;
    }
    let dropped = proxy.counts().dropped_loss;
    assert_eq!(received + dropped, BATCHES * BATCH);
    assert_eq!(echo.received() as u64, received);
    // 20% of 2,000 is 400 with a standard deviation near 18; ±160 cannot flake.
    assert!((240..=560).contains(&dropped), "dropped {dropped} of 2000 at 20% loss");
    Ok(())
}

#[test]
fn duplication_sends_some_packets_twice() -> anyhow::Result<()> {
    let (echo, proxy, client) = setup()?;
    proxy.duplicate(Direction::ToClient, 0.5)?;
    let mut received = Vec::new();
    for batch in 0..4 {
        let duplicated_before = proxy.counts().duplicated;
        (0..50).for_each(|i| client.send(batch * 50 + i));
        received.extend(client.recv_until(|r| {
            r.len() as u64 == 50 + proxy.counts().duplicated - duplicated_before
        })?);
    }
    let duplicated = proxy.counts().duplicated;
    assert_eq!(echo.received(), 200, "the other direction is not duplicated");
    let mut twice = 0;
    for n in 0..200 {
        match received.iter().filter(|&&r| r == n).count() {
            1 => {}
            2 => twice += 1,
            other => panic!("{n} arrived {other} times"),
        }
    }
    assert_eq!(twice, duplicated);
    assert!((50..=150).contains(&duplicated), "{duplicated} of 200 duplicated at 50%");
    Ok(())
}

#[test]
fn delay_holds_each_packet_back_without_serializing_the_flow() -> anyhow::Result<()> {
    let (_echo, proxy, client) = setup()?;
    proxy.delay(Direction::ToUpstream, Duration::from_millis(150), Duration::from_millis(50));
    proxy.delay(Direction::ToClient, Duration::from_millis(50), Duration::ZERO);
    let started = Instant::now();
    let sent: Vec<Instant> = (0..100)
        .map(|n| {
            let at = Instant::now();
            client.send(n);
            at
        })
        .collect();
    let deadline = started + WAIT;
    let mut round_trips = Vec::new();
    while round_trips.len() < sent.len() {
        anyhow::ensure!(Instant::now() < deadline, "{} of 100 came back", round_trips.len());
        round_trips.extend(client.try_recv().map(|n| sent[n as usize].elapsed()));
    }
    let elapsed = started.elapsed();
    let shortest = round_trips.iter().min().unwrap();
    assert!(*shortest >= Duration::from_millis(200), "a round trip took only {shortest:?}");
    // One after another, 100 packets delayed by 200 ms would take 20 s.
    assert!(elapsed < Duration::from_secs(10), "100 delayed packets took {elapsed:?}");
    assert_eq!(proxy.counts().delayed, 200);
    Ok(())
}

#[test]
fn reordering_lets_later_packets_overtake() -> anyhow::Result<()> {
    let (_echo, proxy, client) = setup()?;
    proxy.reorder(Direction::ToUpstream, 0.3, Duration::from_millis(100))?;
    (0..100).for_each(|n| client.send(n));
    let received = client.recv_until(|r| r.len() == 100)?;
    let mut sorted = received.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..100).collect::<Vec<_>>(), "each packet arrives once");
    assert_ne!(received, sorted, "some packets were overtaken");
    let reordered = proxy.counts().reordered;
    // 30 expected, with a standard deviation near 4.6.
    assert!((10..=50).contains(&reordered), "{reordered} of 100 reordered at 30%");
    Ok(())
}

#[test]
fn a_one_way_blackhole_drops_only_that_way() -> anyhow::Result<()> {
    let (echo, proxy, client) = setup()?;
    proxy.blackhole(Direction::ToClient);
    (0..20).for_each(|n| client.send(n));
    wait_for("the echoes to be dropped", WAIT, || {
        (echo.received() == 20 && proxy.counts().dropped_blackhole == 20).then_some(())
    })?;
    // Every echo is accounted for as dropped, so this wait cannot miss a late one.
    assert_eq!(client.try_recv(), None);

    proxy.heal();
    proxy.blackhole(Direction::ToUpstream);
    (20..40).for_each(|n| client.send(n));
    wait_for("the requests to be dropped", WAIT, || {
        (proxy.counts().dropped_blackhole == 40).then_some(())
    })?;
    assert_eq!(echo.received(), 20, "nothing got through to the echo server");

    proxy.heal();
    client.exchange(40)
}

#[test]
fn hold_buffers_both_ways_and_release_delivers_in_order() -> anyhow::Result<()> {
    let (echo, proxy, client) = setup()?;
    client.exchange(0)?;
    let mapping = echo.last_source();
    proxy.hold();
    (1..=30).for_each(|n| client.send(n));
    (1001..=1030).for_each(|n| echo.send(mapping, n));
    wait_for("60 packets to be held", WAIT, || (proxy.counts().held == 60).then_some(()))?;
    assert_eq!(echo.received(), 1, "held requests stay in the proxy");
    assert_eq!(client.try_recv(), None, "held packets stay in the proxy");

    proxy.release();
    let received = client.recv_until(|r| r.len() == 60)?;
    let (own, echoes): (Vec<u64>, Vec<u64>) = received.iter().partition(|&&n| n > 1000);
    assert_eq!(own, (1001..=1030).collect::<Vec<_>>());
    assert_eq!(echoes, (1..=30).collect::<Vec<_>>());
    let at_echo: Vec<u64> = echo.seen().iter().map(|s| s.1).collect();
    assert_eq!(at_echo, (0..=30).collect::<Vec<_>>());
    Ok(())
}

#[test]
fn rebind_moves_the_client_to_a_new_source_port() -> anyhow::Result<()> {
    let (echo, proxy, client) = setup()?;
    client.exchange(0)?;
    let before = echo.last_source();
    proxy.rebind()?;
    client.exchange(1)?;
    let after = echo.last_source();
    assert_ne!(before.port(), after.port(), "the echo server sees a new source port");
    assert_eq!(after.ip(), before.ip());
    assert_eq!(proxy.counts().rebinds, 1);
    Ok(())
}

#[test]
fn a_bandwidth_cap_paces_the_bytes() -> anyhow::Result<()> {
    const PACKETS: u64 = 40;
    const BYTES: usize = 1_000;
    const CAP: u64 = 50_000;
    let (_echo, proxy, client) = setup()?;
    proxy.bandwidth(Direction::ToUpstream, CAP)?;
    let started = Instant::now();
    (0..PACKETS).for_each(|n| client.send_padded(n, BYTES));
    let received = client.recv_until(|r| r.len() as u64 == PACKETS)?;
    let elapsed = started.elapsed();
    assert_eq!(received, (0..PACKETS).collect::<Vec<_>>(), "a cap only delays");
    // 40,000 bytes at 50,000 B/s take 0.8 s; a little slack for float rounding.
    let least = Duration::from_secs_f64((PACKETS * BYTES as u64) as f64 / CAP as f64) * 97 / 100;
    assert!(elapsed >= least, "{PACKETS} packets of {BYTES} B took {elapsed:?} at {CAP} B/s");
    let counts = proxy.counts();
    assert_eq!(counts.dropped_queue_full, 0, "40 KB fit the queue");
    assert_eq!(counts.delayed, PACKETS);
    Ok(())
}

/// Link timing that declares a silent hub dead in two seconds and redials within half a
/// second, so a partition costs the test little time (the defaults allow 8 s and 10 s).
fn fast_link(root: &Path) -> anyhow::Result<Vec<String>> {
    let path = root.join("fast-link.toml");
    std::fs::write(
        &path,
        "[link]\nkeep_alive_ms = 300\nidle_timeout_ms = 2000\nbackoff_initial_ms = 50\nbackoff_max_ms = 500\n",
    )?;
    Ok(vec!["--config".into(), path.display().to_string()])
}

/// Connections the hub has accepted, from its log.
fn hub_connections(root: &Path) -> anyhow::Result<usize> {
    Ok(std::fs::read_to_string(root.join("hub.log"))?.matches("peer connected").count())
}

#[test]
fn a_partitioned_agent_catches_up_after_healing_and_survives_rebinding() -> anyhow::Result<()> {
    let dir = TestDir::new("fault-proxy")?;
    let link = fast_link(dir.path())?;
    let hub_port = free_udp_port()?;
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], hub_port)), fault_seed()?)?;
    // The hub tells its agents the proxy's address as its own, as a hub behind a load balancer
    // would; otherwise agent A would fail over to the hub's own address, around the partition.
    let mut hub_args = link.clone();
    hub_args.extend(["--advertise".to_owned(), proxy.local_addr().to_string()]);
    let hub = Hub::start_with(dir.path(), "hub", hub_port, &hub_args)?;
    let a = Agent::start_with(dir.path(), "agent-a", proxy.local_addr(), &link)?;
    let b = Agent::start_with(dir.path(), "agent-b", hub.quic, &link)?;
    let result = partition_heal_rebind(dir.path(), &hub, &proxy, &a, &b);
    if result.is_err() {
        eprintln!("fault log:\n{}", proxy.log_lines().join("\n"));
    }
    result
}

fn partition_heal_rebind(
    root: &Path,
    hub: &Hub,
    proxy: &FaultProxy,
    a: &Agent,
    b: &Agent,
) -> anyhow::Result<()> {
    let id = a.api.create("notes", &json!({"n": 0}))?;
    let set = |n: u64| json!([{"op": "set", "path": ["n"], "value": n}]);
    let heads = a.api.edit(&id, &set(1))?;
    wait_for("agent B to have the first write", WAIT, || {
        b.api.try_read(&id).filter(|d| d.heads == heads)
    })?;

    proxy.blackhole(Direction::Both);
    let offline = a.api.edit(&id, &set(2))?;
    // Once agent A has given up on the hub, the write has had every chance to leave.
    wait_for("agent A to notice the partition", WAIT, || {
        a.api.status().ok().filter(|s| !s.hub.connected && s.hub.documents_pending > 0)
    })?;
    let counts = proxy.counts();
    assert!(counts.dropped_blackhole > 0, "{counts:?}");
    assert_eq!(b.api.read(&id)?.expect("agent B lost the document").heads, heads);
    assert_eq!(hub.http.read(&id)?.expect("the hub lost the document").heads, heads);
    assert_eq!(a.api.read(&id)?.expect("agent A lost its write").doc, json!({"n": 2}));

    proxy.heal();
    let seen = wait_for("agent B to have the offline write", WAIT, || {
        b.api.try_read(&id).filter(|d| d.heads == offline)
    })?;
    assert_eq!(seen.doc, json!({"n": 2}));

    wait_for("agent A to be connected", WAIT, || {
        a.api.status().ok().filter(|s| s.hub.connected && s.hub.documents_pending == 0)
    })?;
    let connections = hub_connections(root)?;
    proxy.rebind()?;
    let rebound = a.api.edit(&id, &set(3))?;
    let seen = wait_for("agent B to have the write after rebinding", WAIT, || {
        b.api.try_read(&id).filter(|d| d.heads == rebound)
    })?;
    assert_eq!(seen.doc, json!({"n": 3}));
    let reconnections = hub_connections(root)? - connections;
    eprintln!(
        "after rebinding: {}",
        if reconnections == 0 {
            "the QUIC connection migrated to the new address".to_owned()
        } else {
            format!("agent A reconnected ({reconnections} new connections at the hub)")
        }
    );
    eprintln!("fault counts: {:?}", proxy.counts());
    Ok(())
}
