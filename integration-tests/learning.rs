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
    // Every feedback record of both pipelines is in Redis (a lagging one would record some
    // after the deadlines below are all gone, and join their late labels)...
    for j in [&default, &drop] {
        j.wait_drained(&broker);
    }
    // ...and both windows are closed once no deadline is left (Redis drops an empty sorted
    // set).
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

/// Examples `from..from + n` of model `risk`, with the features of the scoring tests' model
/// (amount, EUR, USD, hour) and labels drawn from a logistic truth; those before `flip_until`
/// get the opposite label (a labelling bug). Keyed by event id, in the order scored.
fn examples(from: u64, n: u64, flip_until: Option<u64>) -> Vec<(String, Vec<u8>)> {
    examples_scored_from(from, n, flip_until, 1_796_000_000_000)
}

/// [`examples`], the first scored at `first_ms` (ms since the epoch), one a second after.
fn examples_scored_from(
    from: u64,
    n: u64,
    flip_until: Option<u64>,
    first_ms: i64,
) -> Vec<(String, Vec<u8>)> {
    use rand::{Rng, SeedableRng};
    (from..from + n)
        .map(|i| {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(i);
            let amount = f64::from(rng.random_range(0..50_000u32)) / 100.0;
            let currency = rng.random_range(0..3u8);
            let hour = f64::from(rng.random_range(0..24u8));
            let (eur, usd) = (
                f64::from(u8::from(currency == 0)),
                f64::from(u8::from(currency == 1)),
            );
            let logit = 0.02 * (amount - 250.0) + 1.5 * eur - 1.0 * usd;
            let truth = rng.random::<f64>() < 1.0 / (1.0 + (-logit).exp());
            let label = if flip_until.is_some_and(|f| i < f) {
                !truth
            } else {
                truth
            };
            let id = format!("x-{i:06}");
            let example = serde_json::json!({
                "event_id": id, "model": "risk", "model_version": "1",
                "features": [amount, eur, usd, hour], "outputs": [0.5],
                "label": f64::from(u8::from(label)), "labelled": true,
                "scored_at": first_ms + (i - from) as i64 * 1_000, "labelled_at": null,
            });
            (id, serde_json::to_vec(&example).unwrap())
        })
        .collect()
}

/// A trainer file in `dir` for the repository `dir/models/risk`, on `topic`.
fn trainer_file(
    dir: &std::path::Path,
    broker: &Broker,
    topic: &str,
    extra: &str,
) -> std::path::PathBuf {
    let file = dir.join(format!("{}.toml", unique("trainer")));
    fs::write(
        &file,
        format!(
            r#"
name = "risk_trainer"
[source]
bootstrap_servers = "{bootstrap}"
group_id = "{group}"
{SOURCE_PROPERTIES}
[train]
model = "risk"
repository = "models/risk"
examples_topic = "{topic}"
optimizer = "adam"
learning_rate = 0.02
batch_size = 32
epochs = 3
round_examples = 1000
holdout = 0.2
min_examples = 100
max_auc_decrease = 0.02
{extra}
"#,
            bootstrap = broker.bootstrap,
            group = unique("trainer"),
        ),
    )
    .unwrap();
    file
}

/// `sluice train FILE --rounds 1`, which must exit 0; its log.
fn train_one_round(file: &std::path::Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["train", file.to_str().unwrap(), "--rounds", "1"])
        .env("RUST_LOG", "info,sluice=debug")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "sluice train failed:\n{log}");
    log
}

/// The decisions in the repository's candidates, oldest first.
fn decisions(repo: &std::path::Path) -> Vec<serde_json::Value> {
    let mut dirs: Vec<_> = fs::read_dir(repo.join("candidates"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    dirs.sort();
    dirs.iter()
        .map(|d| serde_json::from_slice(&fs::read(d.join("decision.json")).unwrap()).unwrap())
        .collect()
}

/// One round on 1,000 examples (and copies of some, which count once): the candidate's
/// weights are those PyTorch computes from the same base, examples, order and optimizer; it
/// loads in `torch.jit.load` in evaluation mode, passes the gates and is published as version
/// 2 with its decision.
#[test]
fn a_round_is_the_round_pytorch_computes_and_a_better_candidate_is_published() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("models/risk");
    publish(&repo, 1, "linear", 1);
    let topic = unique("examples");
    broker.create_topic(&topic, 1);
    let mut records = examples(0, 1000, None);
    records.extend(records.iter().step_by(40).cloned().collect::<Vec<_>>());
    produce_records(&broker, &topic, records.clone().into_iter());
    let file = trainer_file(dir.path(), &broker, &topic, "");
    let log = train_one_round(&file);

    let decision = &decisions(&repo)[0];
    eprintln!("{}", serde_json::to_string_pretty(decision).unwrap());
    assert_eq!(decision["passed"], true, "{log}");
    assert_eq!(decision["published_as"], "2");
    assert_eq!(
        (
            decision["examples"].as_u64(),
            decision["holdout_examples"].as_u64()
        ),
        (Some(1000), Some(200))
    );
    assert!(repo.join("2/model.pt").is_file() && repo.join("2/decision.json").is_file());
    let (c, s) = (&decision["candidate"], &decision["serving"]);
    assert!(
        c["log_loss"].as_f64() < s["log_loss"].as_f64(),
        "the candidate is better"
    );

    let jsonl = dir.path().join("examples.jsonl");
    let lines: Vec<String> = records
        .iter()
        .map(|(_, p)| String::from_utf8(p.clone()).unwrap())
        .collect();
    fs::write(&jsonl, lines.join("\n")).unwrap();
    let round = fs::read_dir(repo.join("candidates"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let reference: serde_json::Value = serde_json::from_str(&python(&[
        "train-reference",
        repo.join("1/model.pt").to_str().unwrap(),
        round.join("model.pt").to_str().unwrap(),
        jsonl.to_str().unwrap(),
        "--optimizer",
        "adam",
        "--lr",
        "0.02",
        "--batch",
        "32",
        "--epochs",
        "3",
        "--holdout",
        "0.2",
    ]))
    .unwrap();
    eprintln!("PyTorch reference: {reference}");
    assert_eq!(reference["trained_on"], 800);
    assert_eq!(
        reference["candidate_training_flag"], false,
        "saved in evaluation mode"
    );
    // float32 weights of magnitude ~0.1-1 after 75 Adam steps: libtorch's C++ Adam and
    // PyTorch's differ only in the order of float operations (about 1e-7 per step).
    let diff = reference["max_abs_diff"].as_f64().unwrap();
    assert!(diff < 1e-5, "weights differ from PyTorch's by {diff}");
    assert!(
        reference["moved"].as_f64().unwrap() > 1e-3,
        "the round changed the weights"
    );
}

/// A round trained on corrupted labels (the older examples' labels flipped; the newest, the
/// holdout, right) is refused with its reasons, and the serving version stays; the next round,
/// on good labels, is published, and the running scoring pipeline's later predictions carry
/// the new version.
#[test]
fn a_round_on_corrupted_labels_is_refused_and_a_good_one_reaches_the_scoring_pipeline() {
    let broker = Broker::start();
    let s = scoring(&broker, "linear");
    let mut sluice = s.p.spawn("score.log");
    let topic = unique("examples");
    broker.create_topic(&topic, 1);
    let file = trainer_file(s.p.dir.path(), &broker, &topic, "");

    produce_records(&broker, &topic, examples(0, 1000, Some(800)).into_iter());
    train_one_round(&file);
    let first = &decisions(&s.repo)[0];
    eprintln!("{}", serde_json::to_string_pretty(first).unwrap());
    assert_eq!(first["passed"], false);
    assert!(!first["reasons"].as_array().unwrap().is_empty());
    assert!(!s.repo.join("2").exists(), "nothing published");

    produce_records(&broker, &topic, examples(1000, 1000, None).into_iter());
    train_one_round(&file);
    let second = &decisions(&s.repo)[1];
    assert_eq!(
        (second["passed"].as_bool(), second["published_as"].as_str()),
        (Some(true), Some("2")),
        "{second}"
    );
    assert_eq!(second["serving_version"], "1");

    s.p.wait_for_log("score.log", "Model version swapped in");
    produce(&broker, &s.p.topic, 0..300);
    s.p.wait_drained(&broker, DRAIN);
    s.p.stop(&mut sluice, "score.log");
    let predictions = broker.read_all(&s.predictions);
    assert!(!predictions.is_empty());
    for r in &predictions {
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        assert_eq!(v["model_version"], "2", "{v}");
    }
}

/// The repository's rollout file.
fn rollout(repo: &std::path::Path) -> serde_json::Value {
    fs::read(repo.join("rollout.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// `sluice train FILE` running until stopped, its log in `dir/name`.
fn spawn_trainer(
    dir: &std::path::Path,
    file: &std::path::Path,
    name: &str,
    listen: &str,
) -> KillOnDrop {
    let log = fs::File::create(dir.join(name)).unwrap();
    KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["train", file.to_str().unwrap(), "--listen", listen])
            .env("RUST_LOG", "info,sluice=debug")
            .env("NO_COLOR", "1")
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

/// The versions of the predictions of events `e-<from>` and later.
fn versions_from(broker: &Broker, topic: &str, from: u64) -> BTreeSet<String> {
    broker
        .read_all(topic)
        .iter()
        .filter_map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.payload).ok()?;
            let n: u64 = v["event_id"]
                .as_str()?
                .trim_start_matches("e-")
                .parse()
                .ok()?;
            (n >= from).then(|| v["model_version"].as_str().unwrap().to_owned())
        })
        .collect()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Issue 12, rollout by the trainer: a round's candidate goes out as a canary of half the
/// customers (the scoring pipeline serves both versions), is watched on labels of events scored
/// after its publication, does better than version 1 on them and is promoted: the scoring
/// pipeline then serves it alone.
#[test]
fn a_canary_that_does_better_on_fresh_labels_is_promoted() {
    let broker = Broker::start();
    let s = scoring(&broker, "linear");
    let mut sluice = s.p.spawn("score.log");
    let topic = unique("examples");
    broker.create_topic(&topic, 1);
    let extra = "rollout = \"canary\"\ncanary_weight = 0.5\nwatch_examples = 300";
    let file = trainer_file(s.p.dir.path(), &broker, &topic, extra);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut trainer = spawn_trainer(s.p.dir.path(), &file, "train.log", &listen);
    produce_records(&broker, &topic, examples(0, 1000, None).into_iter());
    wait_until(
        DRAIN,
        || format!("a canary: {}", rollout(&s.repo)),
        || rollout(&s.repo)["canary"]["version"] == "2",
    );
    s.p.wait_for_log("score.log", "Model rollout changed");
    produce(&broker, &s.p.topic, 0..500);
    s.p.wait_drained(&broker, DRAIN);
    let both = versions_from(&broker, &s.predictions, 0);
    assert_eq!(both, BTreeSet::from(["1".into(), "2".into()]));

    let fresh = examples_scored_from(1000, 400, None, now_ms());
    produce_records(&broker, &topic, fresh.into_iter());
    wait_until(
        DRAIN,
        || format!("a promotion: {}", rollout(&s.repo)),
        || rollout(&s.repo)["stable"] == "2",
    );
    let r = rollout(&s.repo);
    assert_eq!(
        (r["canary"].is_null(), r["watch"].is_null()),
        (true, true),
        "{r}"
    );
    let watch: serde_json::Value =
        serde_json::from_slice(&fs::read(s.repo.join("2/watch.json")).unwrap()).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&watch).unwrap());
    assert_eq!(watch["result"], "promoted");
    assert!(watch["examples"].as_u64().unwrap() >= 300);
    // Online metrics of the version that scored the examples, from what it answered (0.5 for
    // each: a log loss of ln 2, every score at the 0.5 threshold).
    let gauge = |text: &str, name: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")) && l.contains("version=\"1\""))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    wait_until(
        Duration::from_secs(30),
        || http_get(port, "/metrics").1,
        || gauge(&http_get(port, "/metrics").1, "sluice_online_examples") == Some(1400.0),
    );
    let metrics = http_get(port, "/metrics").1;
    let log_loss = gauge(&metrics, "sluice_online_log_loss").unwrap();
    assert!(
        (log_loss - std::f64::consts::LN_2).abs() < 1e-6,
        "{log_loss}"
    );
    assert_eq!(gauge(&metrics, "sluice_online_prediction_rate"), Some(1.0));
    assert_eq!(gauge(&metrics, "sluice_online_auc"), Some(0.5));
    let positives = gauge(&metrics, "sluice_online_positives_rate").unwrap();
    assert!(positives > 0.2 && positives < 0.8, "{positives}");
    s.p.wait_for_log("score.log", "to=none");
    produce(&broker, &s.p.topic, 500..1000);
    s.p.wait_drained(&broker, DRAIN);
    sigterm(&trainer.0);
    wait_exit(&mut trainer.0, Duration::from_secs(30));
    s.p.stop(&mut sluice, "score.log");
    assert_eq!(
        versions_from(&broker, &s.predictions, 500),
        BTreeSet::from(["2".into()])
    );
}

/// Issue 12, automatic rollback: a promoted version that does worse than the one it replaced
/// on the labels of events scored after its publication (here the labels flipped: a labelling
/// bug that its holdout did not have) is rolled back for every instance, and refused.
#[test]
fn a_promoted_version_that_does_worse_on_fresh_labels_is_rolled_back() {
    let broker = Broker::start();
    let s = scoring(&broker, "linear");
    let mut sluice = s.p.spawn("score.log");
    let topic = unique("examples");
    broker.create_topic(&topic, 1);
    let file = trainer_file(s.p.dir.path(), &broker, &topic, "watch_examples = 300");
    let mut trainer = spawn_trainer(s.p.dir.path(), &file, "train.log", "off");
    produce_records(&broker, &topic, examples(0, 1000, None).into_iter());
    s.p.wait_for_log("score.log", "from=1 to=2");
    assert_eq!(rollout(&s.repo)["watch"]["version"], "2");

    let flipped = examples_scored_from(1000, 400, Some(2000), now_ms());
    produce_records(&broker, &topic, flipped.into_iter());
    s.p.wait_for_log("score.log", "from=2 to=1");
    let r = rollout(&s.repo);
    assert_eq!(r["stable"], "1", "{r}");
    assert_eq!(r["refused"], serde_json::json!(["2"]), "{r}");
    let watch: serde_json::Value =
        serde_json::from_slice(&fs::read(s.repo.join("2/watch.json")).unwrap()).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&watch).unwrap());
    assert_eq!(watch["result"], "rolled_back");
    assert!(!watch["reasons"].as_array().unwrap().is_empty());
    produce(&broker, &s.p.topic, 0..300);
    s.p.wait_drained(&broker, DRAIN);
    sigterm(&trainer.0);
    wait_exit(&mut trainer.0, Duration::from_secs(30));
    s.p.stop(&mut sluice, "score.log");
    assert_eq!(
        versions_from(&broker, &s.predictions, 0),
        BTreeSet::from(["1".into()])
    );
}

/// Issue 12, a model repository on S3 (moto): two scoring instances in one group serve
/// version 1 from `s3://models/risk`; the trainer, on the same repository, publishes version 2
/// (`decision.json`, then `model.pt`) and promotes it in the repository's `rollout.json`; both
/// instances download it into their cache and swap to it, and every later prediction carries
/// it. `sluice model status` reads the same repository.
#[test]
fn a_repository_on_s3_takes_the_trainers_version_to_every_instance() {
    let moto = Moto::start();
    moto.run(&["create", "models"]);
    let broker = Broker::start();
    let s = scoring(&broker, "linear");
    let v1 = s.repo.join("1/model.pt");
    moto.run(&["put", "models", "risk/1/model.pt", v1.to_str().unwrap()]);
    let url = "s3://models/risk";
    s.p.edit(
        "path = \"models/risk\"",
        &format!(
            "path = \"{url}\"\ncache_dir = \"cache\"\nstorage_options = {}",
            moto.inline_options()
        ),
    );
    let mut members = Members::start(&s.p, &["a", "b"]);
    produce(&broker, &s.p.topic, 0..500);
    s.p.wait_drained(&broker, DRAIN);
    assert_eq!(
        versions_from(&broker, &s.predictions, 0),
        BTreeSet::from(["1".into()])
    );

    let topic = unique("examples");
    broker.create_topic(&topic, 1);
    let file = trainer_file(s.p.dir.path(), &broker, &topic, "");
    let text = fs::read_to_string(&file).unwrap().replace(
        "repository = \"models/risk\"",
        &format!(
            "repository = \"{url}\"\ncache_dir = \"trainer-cache\"\nstorage_options = {}",
            moto.inline_options()
        ),
    );
    fs::write(&file, text).unwrap();
    let mut trainer = spawn_trainer(s.p.dir.path(), &file, "train.log", "off");
    produce_records(&broker, &topic, examples(0, 1000, None).into_iter());
    for log in ["a.log", "b.log"] {
        s.p.wait_for_log(log, "from=1 to=2");
    }
    let keys = moto.run(&["list", "models", "risk/"]);
    for key in [
        "risk/2/model.pt",
        "risk/2/decision.json",
        "risk/rollout.json",
    ] {
        assert!(keys.lines().any(|k| k == key), "{key} not in {keys}");
    }
    let mut status_args = vec!["status".to_owned(), url.to_owned()];
    for (k, v) in moto.options() {
        status_args.extend(["--option".to_owned(), format!("{k}={v}")]);
    }
    let args: Vec<&str> = status_args.iter().map(String::as_str).collect();
    let status = sluice_model(&args);
    assert!(
        status
            .lines()
            .any(|l| l.contains("version    2") && l.contains("stable")),
        "{status}"
    );

    produce(&broker, &s.p.topic, 500..1500);
    s.p.wait_drained(&broker, DRAIN);
    sigterm(&trainer.0);
    wait_exit(&mut trainer.0, Duration::from_secs(30));
    members.stop_all();
    check_oracle(&broker, &s.p);
    assert_eq!(
        versions_from(&broker, &s.predictions, 500),
        BTreeSet::from(["2".into()])
    );
}
