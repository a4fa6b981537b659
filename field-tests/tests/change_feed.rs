//! The change feed (`GET /v1/changes`) delivers every committed change exactly once, in order,
//! to a subscriber that resumes from its saved cursor: across crashes and restarts of the
//! agent it reads from, and across a hub crash. It serves NDJSON long-polls and Server-Sent
//! Events, and filters by collection and by document.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use field_tests::client::{FeedEvent, FeedFilter};
use field_tests::{free_udp_port, wait_for, Agent, ApiClient, Hub, TestDir};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(40);
/// Long-polls return after this much quiet, so a subscriber loop can check its condition.
const POLL_WAIT: Duration = Duration::from_millis(500);

/// Link timing that notices a dead hub within about two seconds and redials within half a
/// second (the defaults allow 8 s and 10 s).
fn fast_link(dir: &TestDir) -> Vec<String> {
    let path = dir.path().join("fast-link.toml");
    let toml = "[link]\nkeep_alive_ms = 300\nidle_timeout_ms = 2000\n\
                backoff_initial_ms = 50\nbackoff_max_ms = 500\n";
    std::fs::write(&path, toml).unwrap();
    vec!["--config".into(), path.display().to_string()]
}

/// Writes to agent A until stopped: new documents in two collections and edits to them.
struct Writer {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicUsize>,
    thread: JoinHandle<BTreeMap<String, Vec<String>>>,
}

impl Writer {
    fn start(api: ApiClient) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicUsize::new(0));
        let (stop_flag, counter) = (stop.clone(), count.clone());
        let thread = std::thread::spawn(move || {
            // The heads each document reached with its last write.
            let mut last: BTreeMap<String, Vec<String>> = BTreeMap::new();
            let mut ids: Vec<String> = Vec::new();
            let mut n = 0usize;
            while !stop_flag.load(Ordering::Relaxed) {
                if n % 8 == 0 {
                    let collection = if ids.len() % 2 == 0 { "feed-even" } else { "feed-odd" };
                    let written =
                        api.create_with(collection, &json!({"n": 0}), Default::default()).unwrap();
                    ids.push(written.id.clone());
                    last.insert(written.id, written.heads);
                } else {
                    let id = &ids[n % ids.len()];
                    let heads =
                        api.edit(id, &json!([{"op": "set", "path": ["n"], "value": n}])).unwrap();
                    last.insert(id.clone(), heads);
                }
                n += 1;
                counter.store(n, Ordering::Relaxed);
                // A steady trickle rather than a flood, so restarts land mid-stream.
                std::thread::sleep(Duration::from_millis(10));
            }
            last
        });
        Self { stop, count, thread }
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Waits until `more` writes have been made from now on.
    fn wait_for_more(&self, more: usize) {
        let target = self.count() + more;
        wait_for("more writes on agent A", DEADLINE, || (self.count() >= target).then_some(()))
            .unwrap();
    }

    /// Stops writing; returns the last heads of every document written, and how many writes
    /// there were.
    fn finish(self) -> (BTreeMap<String, Vec<String>>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let finals = self.thread.join().unwrap();
        (finals, self.count.load(Ordering::Relaxed))
    }
}

/// An application following B's feed: what it has processed and the cursor it saved.
#[derive(Default)]
struct Subscriber {
    cursor: u64,
    events: Vec<FeedEvent>,
}

impl Subscriber {
    /// One long-poll of a few events; a node that is down or restarting yields nothing.
    fn poll(&mut self, api: &ApiClient) {
        let Ok(events) = api.changes_page(self.cursor, &FeedFilter::All, POLL_WAIT, Some(7)) else {
            return;
        };
        for event in events {
            assert!(
                event.cursor > self.cursor,
                "cursor went from {} to {}: {event:?}",
                self.cursor,
                event.cursor
            );
            self.cursor = event.cursor;
            self.events.push(event);
        }
    }

    /// Follows the feed until `done` holds.
    fn follow_until(&mut self, api: &ApiClient, what: &str, mut done: impl FnMut(&Self) -> bool) {
        wait_for(what, DEADLINE, || {
            self.poll(api);
            done(self).then_some(())
        })
        .unwrap();
    }

    /// Follows the feed until every document has an event with its final heads, then checks
    /// that nothing more arrives.
    fn catch_up(&mut self, api: &ApiClient, finals: &BTreeMap<String, Vec<String>>) {
        self.follow_until(api, "the subscriber to see every final write", |s| {
            let seen: HashSet<(&str, &[String])> =
                s.events.iter().map(|e| (e.doc_id.as_str(), e.heads.as_slice())).collect();
            finals.iter().all(|(id, heads)| seen.contains(&(id.as_str(), heads.as_slice())))
        });
        let late = api.changes(self.cursor, &FeedFilter::All, Duration::from_millis(300)).unwrap();
        assert!(late.is_empty(), "events after the final writes: {late:?}");
    }
}

/// The whole feed of a node from the start.
fn whole_feed(api: &ApiClient, filter: &FeedFilter) -> Vec<FeedEvent> {
    let mut events: Vec<FeedEvent> = Vec::new();
    loop {
        let cursor = events.last().map_or(0, |e| e.cursor);
        let page = api.changes_page(cursor, filter, Duration::ZERO, Some(1000)).unwrap();
        if page.is_empty() {
            return events;
        }
        events.extend(page);
    }
}

/// What the subscriber processed is exactly B's feed: in order, no gaps, no duplicates, and
/// every document ends at the heads of its last write on A.
fn check_exactly_once(
    b: &ApiClient,
    subscriber: &Subscriber,
    finals: &BTreeMap<String, Vec<String>>,
) {
    let feed = whole_feed(b, &FeedFilter::All);
    assert_eq!(subscriber.events.len(), feed.len(), "the subscriber missed or repeated events");
    assert_eq!(subscriber.events, feed, "the subscriber's events differ from B's feed");
    let cursors: Vec<u64> = feed.iter().map(|e| e.cursor).collect();
    assert_eq!(cursors, (1..=feed.len() as u64).collect::<Vec<_>>(), "the feed has gaps");
    assert_eq!(b.status().unwrap().feed_cursor, feed.len() as u64);
    let distinct: HashSet<(&str, &[String])> =
        feed.iter().map(|e| (e.doc_id.as_str(), e.heads.as_slice())).collect();
    assert_eq!(distinct.len(), feed.len(), "the feed repeats a document's heads");
    let mut last: BTreeMap<&str, &[String]> = BTreeMap::new();
    for event in &feed {
        last.insert(&event.doc_id, &event.heads);
    }
    let expected: BTreeMap<&str, &[String]> =
        finals.iter().map(|(id, heads)| (id.as_str(), heads.as_slice())).collect();
    assert_eq!(last, expected, "B's feed does not end at the last write of every document");
}

/// Every write on A is one event in A's own feed, with the heads the write answered.
fn check_writer_feed(a: &ApiClient, finals: &BTreeMap<String, Vec<String>>, writes: usize) {
    let feed = whole_feed(a, &FeedFilter::All);
    assert_eq!(feed.len(), writes, "agent A's feed has one event per write");
    for (id, heads) in finals {
        let last = feed.iter().rfind(|e| &e.doc_id == id).expect("a written document");
        assert_eq!(&last.heads, heads);
    }
}

#[derive(Debug, Clone, Copy)]
enum Stop {
    Kill,
    Terminate,
}

fn resume_across_agent_restarts(name: &str, stop: Stop) {
    let dir = TestDir::new(name).unwrap();
    let hub = Hub::start(dir.path(), "hub", free_udp_port().unwrap()).unwrap();
    let a = Agent::start(dir.path(), "agent-a", hub.quic).unwrap();
    let mut b = Agent::start(dir.path(), "agent-b", hub.quic).unwrap();
    let writer = Writer::start(a.api.clone());
    let mut subscriber = Subscriber::default();
    for round in 1..=2 {
        let target = subscriber.events.len() + 12;
        subscriber.follow_until(&b.api, "events on B", |s| s.events.len() >= target);
        match stop {
            Stop::Kill => b.kill(),
            Stop::Terminate => assert!(b.terminate().unwrap().success()),
        }
        // Writes go on while B is down; B catches up from the hub after its restart.
        writer.wait_for_more(15);
        b = Agent::start(dir.path(), "agent-b", hub.quic).unwrap();
        let target = subscriber.events.len() + 5 * round;
        subscriber.follow_until(&b.api, "events after B restarted", |s| s.events.len() >= target);
    }
    let (finals, writes) = writer.finish();
    subscriber.catch_up(&b.api, &finals);
    check_exactly_once(&b.api, &subscriber, &finals);
    check_writer_feed(&a.api, &finals, writes);
}

#[test]
fn a_saved_cursor_resumes_exactly_once_after_the_agent_crashes() {
    resume_across_agent_restarts("feed-kill", Stop::Kill);
}

#[test]
fn a_saved_cursor_resumes_exactly_once_after_the_agent_stops() {
    resume_across_agent_restarts("feed-term", Stop::Terminate);
}

#[test]
fn a_subscriber_misses_nothing_while_the_hub_crashes_and_returns() {
    let dir = TestDir::new("feed-hub").unwrap();
    let port = free_udp_port().unwrap();
    let mut hub = Hub::start(dir.path(), "hub", port).unwrap();
    let link = fast_link(&dir);
    let a = Agent::start_with(dir.path(), "agent-a", hub.quic, &link).unwrap();
    let b = Agent::start_with(dir.path(), "agent-b", hub.quic, &link).unwrap();
    let writer = Writer::start(a.api.clone());
    let mut subscriber = Subscriber::default();
    for _ in 0..2 {
        let target = subscriber.events.len() + 12;
        subscriber.follow_until(&b.api, "events on B", |s| s.events.len() >= target);
        hub.kill();
        // Stay subscribed on B through the outage while A keeps writing.
        let target = writer.count() + 15;
        subscriber.follow_until(&b.api, "writes during the outage", |_| writer.count() >= target);
        hub = Hub::start(dir.path(), "hub", port).unwrap();
    }
    let (finals, writes) = writer.finish();
    subscriber.catch_up(&b.api, &finals);
    check_exactly_once(&b.api, &subscriber, &finals);
    check_writer_feed(&a.api, &finals, writes);
}

/// A Server-Sent Events stream of a node's feed, read with a plain blocking HTTP client.
struct SseStream {
    lines: std::io::Lines<BufReader<ureq::BodyReader<'static>>>,
}

impl SseStream {
    fn open(api: &ApiClient, query: &str, last_event_id: Option<u64>) -> Self {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(DEADLINE))
            .build();
        let agent = ureq::Agent::new_with_config(config);
        let mut request = agent
            .get(format!("{}/v1/changes{query}", api.base()))
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        let response = request.call().unwrap();
        assert_eq!(response.status(), 200);
        let content_type = response.headers().get("content-type").unwrap().to_str().unwrap();
        assert!(content_type.starts_with("text/event-stream"), "{content_type}");
        Self { lines: BufReader::new(response.into_body().into_reader()).lines() }
    }

    /// The next event: its `id` field and its data, checked to be a `change`.
    fn next(&mut self) -> (u64, FeedEvent) {
        let (mut id, mut kind, mut data) = (None, None, String::new());
        loop {
            let line = self.lines.next().expect("the stream ended").unwrap();
            if line.is_empty() {
                if data.is_empty() {
                    continue; // A keep-alive comment's end.
                }
                assert_eq!(kind.as_deref(), Some("change"));
                let event: FeedEvent = serde_json::from_str(&data).unwrap();
                return (id.expect("an event without id"), event);
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((&line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => id = Some(value.parse().unwrap()),
                "event" => kind = Some(value.to_owned()),
                "data" => data.push_str(value),
                _ => {}
            }
        }
    }

    fn take(&mut self, n: usize) -> Vec<FeedEvent> {
        (0..n)
            .map(|_| {
                let (id, event) = self.next();
                assert_eq!(id, event.cursor, "the SSE id is the cursor");
                event
            })
            .collect()
    }
}

/// An agent with no hub and a few writes in two collections, one deleted document.
fn agent_with_history(dir: &TestDir) -> (Agent, Vec<String>) {
    let nowhere = SocketAddr::from(([127, 0, 0, 1], free_udp_port().unwrap()));
    let agent = Agent::start(dir.path(), "agent", nowhere).unwrap();
    let mut ids = Vec::new();
    for (i, collection) in ["plant-7/sensors", "logs", "plant-7/sensors", "logs"].iter().enumerate()
    {
        let id = agent.api.create(collection, &json!({"i": i})).unwrap();
        agent.api.edit(&id, &json!([{"op": "set", "path": ["edited"], "value": true}])).unwrap();
        ids.push(id);
    }
    agent.api.delete(&ids[3]).unwrap();
    (agent, ids)
}

#[test]
fn sse_streams_resume_from_last_event_id_and_push_new_writes() {
    let dir = TestDir::new("feed-sse").unwrap();
    let (agent, ids) = agent_with_history(&dir);
    let feed = whole_feed(&agent.api, &FeedFilter::All);
    assert_eq!(feed.len(), 9);
    assert!(feed[8].deleted && feed[8].doc_id == ids[3]);
    assert!(feed[..8].iter().all(|e| !e.deleted));

    let mut stream = SseStream::open(&agent.api, "", None);
    let first = stream.take(3);
    assert_eq!(first, feed[..3]);
    drop(stream);
    // Last-Event-ID is how EventSource resumes; it wins over a cursor in the query.
    let mut stream = SseStream::open(&agent.api, "?cursor=0", Some(first[2].cursor));
    assert_eq!(stream.take(feed.len() - 3), feed[3..]);
    // The open stream pushes a write made after it caught up.
    let heads = agent.api.edit(&ids[0], &json!([{"op": "set", "path": ["live"], "value": 1}]));
    let pushed = stream.take(1).remove(0);
    assert_eq!((pushed.doc_id.as_str(), pushed.cursor), (ids[0].as_str(), 10));
    assert_eq!(pushed.heads, heads.unwrap());

    let logs = "?collection=logs";
    let mut stream = SseStream::open(&agent.api, logs, None);
    let expected: Vec<FeedEvent> =
        feed.iter().filter(|e| e.collection == "logs").cloned().collect();
    assert_eq!(stream.take(expected.len()), expected);
}

#[test]
fn long_polls_filter_by_collection_and_document_and_wake_on_writes() {
    let dir = TestDir::new("feed-filter").unwrap();
    let (agent, ids) = agent_with_history(&dir);
    let api = &agent.api;
    let feed = whole_feed(api, &FeedFilter::All);
    for collection in ["plant-7/sensors", "logs"] {
        let filter = FeedFilter::Collection(collection.to_owned());
        let expected: Vec<FeedEvent> =
            feed.iter().filter(|e| e.collection == collection).cloned().collect();
        assert_eq!(expected.len(), if collection == "logs" { 5 } else { 4 });
        assert_eq!(whole_feed(api, &filter), expected);
        // Resuming mid-way with a filter skips what came before the cursor.
        let after = expected[1].cursor;
        assert_eq!(api.changes(after, &filter, Duration::ZERO).unwrap(), expected[2..]);
    }
    for id in &ids {
        let expected: Vec<FeedEvent> = feed.iter().filter(|e| &e.doc_id == id).cloned().collect();
        assert_eq!(whole_feed(api, &FeedFilter::Doc(id.clone())), expected);
    }
    let empty = FeedFilter::Collection("nobody-writes-here".into());
    assert!(whole_feed(api, &empty).is_empty());
    // A page limit is honoured, and a short wait with nothing new answers empty.
    assert_eq!(api.changes_page(0, &FeedFilter::All, Duration::ZERO, Some(2)).unwrap(), feed[..2]);
    let head = feed.last().unwrap().cursor;
    assert!(api.changes(head, &FeedFilter::All, Duration::from_millis(100)).unwrap().is_empty());

    // A long-poll waiting on one document wakes for its write, not for others'.
    let waiting = {
        let api = api.clone();
        let filter = FeedFilter::Doc(ids[1].clone());
        std::thread::spawn(move || {
            let started = Instant::now();
            (api.changes(head, &filter, Duration::from_secs(30)).unwrap(), started.elapsed())
        })
    };
    api.edit(&ids[0], &json!([{"op": "set", "path": ["other"], "value": 1}])).unwrap();
    let heads = api.edit(&ids[1], &json!([{"op": "set", "path": ["mine"], "value": 1}])).unwrap();
    let (events, waited) = waiting.join().unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!((events[0].doc_id.as_str(), &events[0].heads), (ids[1].as_str(), &heads));
    assert_eq!(events[0].cursor, head + 2);
    assert!(waited < Duration::from_secs(20), "the long-poll slept through the write: {waited:?}");
}
