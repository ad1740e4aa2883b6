//! Black-box tests of the learning loop: the label join (feedback + labels → examples, state
//! in a real `redis-server`), against a real broker and the real `sluice` binary. The oracle
//! reads the examples and dead-letter topics back with an independent client.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    time::Duration,
};

use common::*;

const DRAIN: Duration = Duration::from_secs(180);

/// A join pipeline: the feedback topic is `p.topic`, with a labels and an examples topic.
struct Join {
    p: TestPipeline,
    labels: String,
    examples: String,
}

impl Join {
    fn new(broker: &Broker, redis: &RedisServer, partitions: i32, join_extra: &str) -> Self {
        let p = TestPipeline::new(broker, partitions, "");
        let labels = format!("{}.labels", p.topic);
        let examples = format!("{}.examples", p.topic);
        broker.create_topic(&labels, partitions);
        broker.create_topic(&examples, 1);
        fs::write(
            &p.file,
            format!(
                r#"
name = "{name}"
[source]
bootstrap_servers = "{bootstrap}"
group_id = "{group}"
{SOURCE_PROPERTIES}
[batch]
max_rows = 100
max_delay = "100ms"
[errors]
dead_letter_topic = "{dlq}"
[join]
model = "{model}"
feedback_topic = "{feedback}"
labels_topic = "{labels}"
examples_topic = "{examples}"
sweep_interval = "200ms"
{join_extra}
[join.redis]
url = "{url}"
"#,
                bootstrap = broker.bootstrap,
                group = p.group,
                dlq = p.dlq,
                model = unique("m"),
                name = unique("join"),
                feedback = p.topic,
                url = redis.url(),
            ),
        )
        .unwrap();
        Self {
            p,
            labels,
            examples,
        }
    }

    /// Waits until the group has committed both topics to their ends.
    fn wait_drained(&self, broker: &Broker) {
        self.p.wait_drained(broker, DRAIN);
        broker
            .wait_committed(&self.labels, &self.p.group, DRAIN)
            .unwrap();
    }

    /// The examples produced, by event id: every copy of one event's example must be the same.
    fn examples(&self, broker: &Broker) -> BTreeMap<String, serde_json::Value> {
        let mut out: BTreeMap<String, serde_json::Value> = BTreeMap::new();
        for r in broker.read_all(&self.examples) {
            let e: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
            let id = e["event_id"].as_str().unwrap().to_owned();
            assert_eq!(r.key.as_deref(), Some(id.as_bytes()), "keyed by event id");
            if let Some(first) = out.get(&id) {
                assert_eq!(first, &e, "two different examples of event {id}");
            }
            out.insert(id, e);
        }
        out
    }

    /// (reason, event id) of every dead letter, and the payload of each.
    fn dead_letters(&self, broker: &Broker) -> BTreeMap<(String, String), Vec<u8>> {
        broker
            .read_all(&self.p.dlq)
            .into_iter()
            .map(|r| {
                let id = serde_json::from_slice::<serde_json::Value>(&r.payload).unwrap()
                    ["event_id"]
                    .as_str()
                    .unwrap()
                    .to_owned();
                assert_eq!(r.header("sluice.stage"), Some("join"));
                (
                    (r.header("sluice.reason").unwrap().to_owned(), id),
                    r.payload,
                )
            })
            .collect()
    }
}

/// The join's sorted sets of deadlines (Redis drops one when it is empty).
fn deadlines(redis: &RedisServer) -> Vec<String> {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut con = client.get_connection().unwrap();
    redis::cmd("KEYS")
        .arg("sluice:join:*:due")
        .query(&mut con)
        .unwrap()
}

/// The feedback record of event `n`, as a scoring pipeline writes it.
fn feedback(n: u64) -> (String, Vec<u8>) {
    let id = format!("e-{n}");
    let features: Vec<f64> = vec![n as f64 * 0.5, (n % 7) as f64, 0.1 + (n % 3) as f64];
    let payload = serde_json::json!({
        "event_id": id, "model": "fraud", "model_version": "1",
        "features": features, "outputs": [((n % 100) as f64) / 100.0],
        "source": {"topic": "orders", "partition": 0, "offset": n},
    });
    (id, serde_json::to_vec(&payload).unwrap())
}

/// A label of event `id`; keyed by the event id, so duplicates follow in one partition.
fn label(id: &str, value: f64) -> (String, Vec<u8>) {
    let payload =
        format!(r#"{{"event_id":"{id}","label":{value},"labelled_at":"2026-12-02T10:00:00Z"}}"#);
    (id.to_owned(), payload.into_bytes())
}

/// The label the truth gives event `n` (the duplicates carry the opposite one).
fn truth(n: u64) -> f64 {
    f64::from(u8::from(n.is_multiple_of(3)))
}

/// Labels of 500 of 600 events, half before their feedback and half after, through a kill -9
/// and a second instance joining: each labelled event has exactly one example (copies of it
/// identical) with the first label and the features as fed; no event without a label has one
/// (its window is an hour); duplicate labels and labels of unknown events are dead letters
/// with their reason, the unknown ones with their original bytes.
#[test]
fn every_label_is_joined_once_across_a_kill_and_a_second_instance() {
    let broker = Broker::start();
    let redis = RedisServer::start(&[]);
    let j = Join::new(&broker, &redis, 3, "maturity = \"1h\"\ngrace = \"3s\"");
    let labels = |range: std::ops::Range<u64>| {
        range
            .map(|n| label(&format!("e-{n}"), truth(n)))
            .collect::<Vec<_>>()
    };
    // Labels of 0..150 come before their feedback; those of 150..300 after.
    produce_records(&broker, &j.labels, labels(0..150).into_iter());
    produce_records(&broker, &j.p.topic, (0..300).map(feedback));
    produce_records(&broker, &j.labels, labels(150..300).into_iter());

    let mut members = Members::start(&j.p, &["a"]);
    wait_until(
        DRAIN,
        || "no example after the first member started".into(),
        || !broker.read_all(&j.examples).is_empty(),
    );
    members.kill(0);
    members.add("b");
    produce_records(&broker, &j.labels, labels(300..400).into_iter());
    produce_records(&broker, &j.p.topic, (300..600).map(feedback));
    produce_records(&broker, &j.labels, labels(400..500).into_iter());
    // Duplicates (another record, the opposite label) and labels of events never scored.
    let duplicates: Vec<u64> = (0..500).step_by(25).collect();
    produce_records(
        &broker,
        &j.labels,
        duplicates
            .iter()
            .map(|n| label(&format!("e-{n}"), 1.0 - truth(*n))),
    );
    let unknown: Vec<(String, Vec<u8>)> = (0..10).map(|i| label(&format!("u-{i}"), 1.0)).collect();
    produce_records(&broker, &j.labels, unknown.clone().into_iter());

    members.settle(&broker, 6);
    j.wait_drained(&broker);
    // The unknown labels become dead letters once their grace has passed.
    wait_until(
        DRAIN,
        || format!("dead letters: {:?}", j.dead_letters(&broker).keys()),
        || {
            j.dead_letters(&broker)
                .keys()
                .filter(|(r, _)| r == "unknown_event")
                .count()
                == 10
        },
    );
    members.stop_all();

    let examples = j.examples(&broker);
    let copies = broker.read_all(&j.examples).len();
    eprintln!(
        "{} examples ({copies} records) for 500 labels",
        examples.len()
    );
    let expected: BTreeSet<String> = (0..500).map(|n| format!("e-{n}")).collect();
    assert_eq!(
        examples.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "exactly the labelled events have examples"
    );
    for n in 0..500u64 {
        let e = &examples[&format!("e-{n}")];
        let fed: serde_json::Value = serde_json::from_slice(&feedback(n).1).unwrap();
        assert_eq!(
            e["label"],
            serde_json::json!(truth(n)),
            "e-{n}: the first label counts"
        );
        assert_eq!(e["labelled"], serde_json::json!(true));
        assert_eq!(e["features"], fed["features"], "e-{n}: features as fed");
        assert_eq!(e["outputs"], fed["outputs"]);
        assert_eq!(e["model_version"], "1");
    }
    let letters = j.dead_letters(&broker);
    let mut want: BTreeSet<(String, String)> = duplicates
        .iter()
        .map(|n| ("duplicate_label".to_owned(), format!("e-{n}")))
        .collect();
    want.extend((0..10).map(|i| ("unknown_event".to_owned(), format!("u-{i}"))));
    assert_eq!(letters.keys().cloned().collect::<BTreeSet<_>>(), want);
    for (id, payload) in &unknown {
        assert_eq!(
            &letters[&("unknown_event".to_owned(), id.clone())],
            payload,
            "the unknown label's original bytes"
        );
    }
}

/// Windows that end: feedback without a label becomes an example with the default label
/// (`unlabelled = "default"`) or nothing (`"drop"`); a label after that is a dead letter
/// `late_label`, and changes no example.
#[test]
fn matured_events_take_the_default_label_or_are_dropped_and_late_labels_are_dead_letters() {
    let broker = Broker::start();
    let redis = RedisServer::start(&[]);
    let windows = "maturity = \"2s\"\ngrace = \"1s\"";
    let default = Join::new(
        &broker,
        &redis,
        2,
        &format!("{windows}\nunlabelled = \"default\"\ndefault_label = 0.25"),
    );
    let drop = Join::new(
        &broker,
        &redis,
        2,
        &format!("{windows}\nunlabelled = \"drop\""),
    );
    for j in [&default, &drop] {
        produce_records(&broker, &j.p.topic, (0..40).map(feedback));
        // Labels for 0..10 in time.
        produce_records(
            &broker,
            &j.labels,
            (0..10).map(|n| label(&format!("e-{n}"), 1.0)),
        );
    }
    let mut a = default.p.spawn_together(&[&drop.p], "a.log");
    wait_until(
        DRAIN,
        || {
            format!(
                "the default examples never came:\n{}",
                default.p.log("a.log")
            )
        },
        || default.examples(&broker).len() == 40,
    );
    // Both windows are closed once no deadline is left (Redis drops an empty sorted set).
    wait_until(
        DRAIN,
        || "events are still waiting for their deadline".into(),
        || deadlines(&redis).is_empty(),
    );
    for j in [&default, &drop] {
        produce_records(
            &broker,
            &j.labels,
            (10..15).map(|n| label(&format!("e-{n}"), 1.0)),
        );
    }
    for j in [&default, &drop] {
        j.wait_drained(&broker);
    }
    default.p.stop(&mut a, "a.log");

    let examples = default.examples(&broker);
    for n in 0..40u64 {
        let e = &examples[&format!("e-{n}")];
        if n < 10 {
            assert_eq!(
                (e["label"].as_f64(), e["labelled"].as_bool()),
                (Some(1.0), Some(true))
            );
        } else {
            assert_eq!(
                (e["label"].as_f64(), e["labelled"].as_bool()),
                (Some(0.25), Some(false)),
                "e-{n} matured without a label"
            );
        }
    }
    let dropped = drop.examples(&broker);
    assert_eq!(
        dropped.keys().cloned().collect::<BTreeSet<_>>(),
        (0..10).map(|n| format!("e-{n}")).collect(),
        "with drop, only labelled events"
    );
    for j in [&default, &drop] {
        let late: BTreeSet<(String, String)> = (10..15)
            .map(|n| ("late_label".to_owned(), format!("e-{n}")))
            .collect();
        assert_eq!(
            j.dead_letters(&broker)
                .keys()
                .cloned()
                .collect::<BTreeSet<_>>(),
            late
        );
    }
}
