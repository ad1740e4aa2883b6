//! Scoring with real TorchScript files (written by PyTorch in `models.py`), a real broker and
//! the real `sluice` binary; predictions are checked against PyTorch's own output.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use common::*;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const DRAIN: Duration = Duration::from_secs(180);
const SESSION_TIMEOUT: Duration = Duration::from_millis(6_500);

/// Event `n` as JSON, if it is valid.
fn valid_json(n: u64) -> Option<Value> {
    let e = event(n);
    e.invalid
        .is_none()
        .then(|| serde_json::from_slice(&e.payload).unwrap())
}

/// PyTorch's scores and features for events, keyed by id.
fn reference(model: &Path, events: &[Value], dir: &Path) -> HashMap<String, (f64, Vec<f64>)> {
    let file = dir.join(format!("events-{}.jsonl", unique("ref")));
    let lines: Vec<String> = events.iter().map(Value::to_string).collect();
    fs::write(&file, lines.join("\n")).unwrap();
    python(&["reference", model.to_str().unwrap(), file.to_str().unwrap()])
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let features = v["features"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_f64().unwrap())
                .collect();
            (
                v["id"].as_str().unwrap().to_owned(),
                (v["score"].as_f64().unwrap(), features),
            )
        })
        .collect()
}

/// Prediction records by event id.
fn by_id(records: &[Record]) -> BTreeMap<String, Vec<(Value, &Record)>> {
    let mut out: BTreeMap<String, Vec<(Value, &Record)>> = BTreeMap::new();
    for r in records {
        let v: Value = serde_json::from_slice(&r.payload).unwrap();
        out.entry(v["event_id"].as_str().unwrap().to_owned())
            .or_default()
            .push((v, r));
    }
    out
}

/// Every valid event gets exactly one prediction equal to PyTorch's output for the version
/// that made it; version 2 published during the run takes over; a corrupt version 3 is
/// refused and version 2 keeps serving.
#[test]
fn predictions_match_pytorch_across_hot_reloads() {
    let broker = Broker::start();
    let s = scoring(&broker, "linear");
    let port = free_port();
    let mut sluice = s.p.spawn_listening("run.log", &format!("127.0.0.1:{port}"));
    produce(&broker, &s.p.topic, 0..1_500);
    s.p.wait_drained(&broker, DRAIN);

    let v2 = publish(&s.repo, 2, "linear", 2);
    s.p.wait_for_log("run.log", "Model version swapped in");
    produce(&broker, &s.p.topic, 1_500..3_000);
    s.p.wait_drained(&broker, DRAIN);

    let corrupt = s.repo.join("3/model.pt");
    fs::create_dir_all(corrupt.parent().unwrap()).unwrap();
    fs::write(&corrupt, b"PK\x03\x04 this is not a TorchScript archive").unwrap();
    s.p.wait_for_log("run.log", "Model version refused");
    produce(&broker, &s.p.topic, 3_000..4_500);
    s.p.wait_drained(&broker, DRAIN);

    let metrics = http_get(port, "/metrics").1;
    let reloads = |result: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("sluice_model_reloads_total")
                    && l.contains(&format!("result=\"{result}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    assert_eq!(reloads("loaded"), Some(1.0), "{metrics}");
    assert_eq!(reloads("refused"), Some(1.0), "{metrics}");
    assert!(
        metrics.contains("sluice_model_inference_seconds"),
        "{metrics}"
    );
    s.p.stop(&mut sluice, "run.log");
    assert!(
        s.p.log("run.log").contains("3/model.pt"),
        "the refusal names the file"
    );

    // Parquet and the DLQ are still exactly once.
    check_oracle(&broker, &s.p);

    let predictions = broker.read_all(&s.predictions);
    let predicted = by_id(&predictions);
    let v1 = s.repo.join("1/model.pt");
    let phase1: Vec<Value> = (0..1_500).filter_map(valid_json).collect();
    let later: Vec<Value> = (1_500..4_500).filter_map(valid_json).collect();
    let mut expected = reference(&v1, &phase1, s.p.dir.path());
    let expected_v2 = reference(&v2, &later, s.p.dir.path());
    let versions: HashMap<String, &str> = expected
        .keys()
        .map(|k| (k.clone(), "1"))
        .chain(expected_v2.keys().map(|k| (k.clone(), "2")))
        .collect();
    expected.extend(expected_v2);
    assert_eq!(
        predicted.len(),
        expected.len(),
        "one prediction per valid event"
    );
    let mut worst = 0f64;
    for (id, (score, _)) in &expected {
        let found = predicted
            .get(id)
            .unwrap_or_else(|| panic!("no prediction for {id}"));
        assert_eq!(found.len(), 1, "{id} predicted {} times", found.len());
        let (v, record) = &found[0];
        assert_eq!(v["model"], "risk");
        assert_eq!(v["model_version"], versions[id], "version of {id}");
        let got = v["outputs"]["score"].as_f64().unwrap();
        worst = worst.max((got - score).abs());
        assert!(
            (got - score).abs() <= 1e-5,
            "{id}: sluice {got}, PyTorch {score}"
        );
        // Provenance in the value and the headers; the key is the entity.
        let n: u64 = id.trim_start_matches("e-").parse().unwrap();
        assert_eq!(
            record.key.as_deref(),
            Some(format!("c-{}", n % 97).as_bytes())
        );
        assert_eq!(v["columns"]["customer"], format!("c-{}", n % 97));
        assert_eq!(v["source"]["topic"], s.p.topic.as_str());
        assert_eq!(record.header("sluice.topic"), Some(s.p.topic.as_str()));
        assert_eq!(
            record.header("sluice.offset"),
            Some(v["source"]["offset"].to_string().as_str())
        );
        assert_eq!(
            record.header("sluice.partition"),
            Some(v["source"]["partition"].to_string().as_str())
        );
        assert_eq!(record.header("sluice.model_version"), Some(versions[id]));
    }
    eprintln!(
        "{} predictions, largest difference from PyTorch {worst:e}",
        expected.len()
    );

    // Feedback: the features exactly as PyTorch computes them from the event, and the output.
    let feedback = broker.read_all(&s.feedback);
    let fed = by_id(&feedback);
    assert_eq!(
        fed.len(),
        expected.len(),
        "one feedback record per prediction"
    );
    for (id, (score, features)) in &expected {
        let (v, _) = &fed[id][0];
        let got: Vec<f64> = v["features"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_f64().unwrap())
            .collect();
        assert_eq!(&got, features, "features of {id}");
        assert!((v["outputs"][0].as_f64().unwrap() - score).abs() <= 1e-5);
        assert_eq!(v["model_version"], versions[id]);
    }
}

/// Review finding A20: a version that passes its warm-up of zeros but fails on real rows trips
/// the circuit breaker. Version 1 serves again, version 2 is refused and not loaded again, and
/// every valid event is either predicted by version 1 (as PyTorch computes it) or, for less
/// than one window of the breaker (100 rows), a dead letter with its bytes.
#[test]
fn a_version_failing_on_real_rows_is_rolled_back() {
    let broker = Broker::start();
    let s = scoring(&broker, "linear");
    let port = free_port();
    let mut sluice = s.p.spawn_listening("run.log", &format!("127.0.0.1:{port}"));
    produce(&broker, &s.p.topic, 0..1_000);
    s.p.wait_drained(&broker, DRAIN);
    publish(&s.repo, 2, "broken", 0);
    s.p.wait_for_log("run.log", "Model version swapped in");
    produce(&broker, &s.p.topic, 1_000..3_000);
    s.p.wait_drained(&broker, DRAIN);
    // Several reload intervals pass with version 2 still the newest in the repository.
    std::thread::sleep(Duration::from_secs(1));
    let metrics = http_get(port, "/metrics").1;
    s.p.stop(&mut sluice, "run.log");
    check_oracle(&broker, &s.p);

    let metric = |name: &str, label: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && l.contains(label))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    assert_eq!(
        metric("sluice_model_breaker_trips_total", "version=\"2\""),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric("sluice_model_reloads_total", "result=\"rolled_back\""),
        Some(1.0)
    );
    assert_eq!(
        metric("sluice_model_reloads_total", "result=\"loaded\""),
        Some(1.0),
        "version 2 is not loaded again"
    );
    let log = s.p.log("run.log");
    let trips: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("circuit breaker tripped"))
        .collect();
    assert_eq!(trips.len(), 1, "{log}");
    assert!(trips[0].contains("2/model.pt"), "{}", trips[0]);
    // The trip went to the repository's rollout, so every instance refuses version 2.
    let rollout: Value =
        serde_json::from_slice(&fs::read(s.repo.join("rollout.json")).unwrap()).unwrap();
    assert_eq!(
        (&rollout["stable"], &rollout["refused"]),
        (&Value::from("1"), &serde_json::json!(["2"])),
        "{rollout}"
    );

    let dead: BTreeMap<String, Vec<u8>> = broker
        .read_all(&s.p.dlq)
        .into_iter()
        .filter(|d| d.header("sluice.stage") == Some("inference"))
        .map(|d| {
            assert_eq!(d.header("sluice.reason"), Some("model_error"));
            let v: Value = serde_json::from_slice(&d.payload).expect("original bytes");
            (v["id"].as_str().unwrap().to_owned(), d.payload)
        })
        .collect();
    assert!(dead.len() < 100, "{} inference dead letters", dead.len());
    let predictions = broker.read_all(&s.predictions);
    let predicted = by_id(&predictions);
    let valid: Vec<Value> = (0..3_000).filter_map(valid_json).collect();
    let expected = reference(&s.repo.join("1/model.pt"), &valid, s.p.dir.path());
    for v in &valid {
        let id = v["id"].as_str().unwrap();
        match (predicted.get(id), dead.get(id)) {
            (Some(p), None) => {
                assert_eq!(p.len(), 1, "{id}");
                let (v, _) = &p[0];
                assert_eq!(v["model_version"], "1", "{id}");
                let got = v["outputs"]["score"].as_f64().unwrap();
                assert!((got - expected[id].0).abs() <= 1e-5, "{id}");
            }
            (None, Some(payload)) => {
                let n: u64 = id.trim_start_matches("e-").parse().unwrap();
                assert!(n >= 1_000, "{id} was scored before version 2");
                assert_eq!(payload, &event(n).payload);
            }
            other => panic!("{id}: predicted and dead-lettered: {other:?}"),
        }
    }
}

/// Review finding A20, with nothing to go back to: a version failing on real rows from the
/// start stops the pipeline (exit 1, one `ERROR` line naming the file) rather than sending the
/// whole stream to the dead-letter topic.
#[test]
fn a_version_failing_on_real_rows_from_the_start_stops_the_pipeline() {
    let broker = Broker::start();
    let s = scoring(&broker, "broken");
    produce(&broker, &s.p.topic, 0..1_000);
    let mut sluice = s.p.spawn("run.log");
    let status = wait_exit(&mut sluice.0, Duration::from_secs(90));
    let log = s.p.log("run.log");
    assert_eq!(status.code(), Some(1), "{log}");
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "one ERROR line:\n{log}");
    assert!(
        errors[0].contains("1/model.pt") && errors[0].contains("no earlier version"),
        "{}",
        errors[0]
    );
    assert!(broker.read_all(&s.predictions).is_empty());
    let dead = broker
        .read_all(&s.p.dlq)
        .iter()
        .filter(|d| d.header("sluice.stage") == Some("inference"))
        .count();
    assert!(dead < 100, "{dead} inference dead letters");
}

/// Two pipelines naming one model share it in the process's inference service: it is loaded
/// once, and both pipelines' events are scored by it. The same name with another path is a
/// configuration error at start (exit 2, one `ERROR` line).
#[test]
fn pipelines_naming_one_model_share_it() {
    let broker = Broker::start();
    let a = scoring(&broker, "linear");
    let b = scoring(&broker, "linear");
    b.p.edit("name = \"test\"", "name = \"test-b\"");
    b.p.edit(
        "path = \"models/risk\"",
        &format!("path = \"{}\"", a.repo.display()),
    );
    produce(&broker, &a.p.topic, 0..600);
    produce(&broker, &b.p.topic, 600..1_200);
    let mut sluice = a.p.spawn_together(&[&b.p], "run.log");
    // One process, so one log (in a's folder) for both.
    for p in [&a.p, &b.p] {
        broker
            .wait_committed(&p.topic, &p.group, DRAIN)
            .unwrap_or_else(|e| panic!("{e}\n{}", a.p.log("run.log")));
    }
    a.p.stop(&mut sluice, "run.log");
    let log = a.p.log("run.log");
    assert_eq!(log.matches("Model loaded.").count(), 1, "{log}");
    for (s, range) in [(&a, 0..600), (&b, 600..1_200)] {
        let records = broker.read_all(&s.predictions);
        let predicted = by_id(&records);
        let valid: BTreeSet<String> = range
            .filter(|n| valid_json(*n).is_some())
            .map(|n| format!("e-{n}"))
            .collect();
        assert_eq!(predicted.keys().cloned().collect::<BTreeSet<_>>(), valid);
    }
    check_oracle(&broker, &a.p);

    // The same name with another path (after the run: a process that fails at start may leave
    // a member behind that tansu waits for).
    let c = scoring(&broker, "linear");
    c.p.edit("name = \"test\"", "name = \"test-c\"");
    let mut conflict = c.p.spawn_together(&[&a.p], "conflict.log");
    let status = wait_exit(&mut conflict.0, Duration::from_secs(60));
    let log = c.p.log("conflict.log");
    assert_eq!(status.code(), Some(2), "{log}");
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{log}");
    assert!(
        errors[0].contains("\"risk\" is declared twice"),
        "{}",
        errors[0]
    );
}

/// RELIABILITY.md scenario 8: processing much slower than `max.poll.interval.ms` (6 s here;
/// the model takes ~0.5 s per batch of 64 rows and queue_rows is one micro-batch, so the
/// backlog takes about 20 s to score). The source pauses and keeps polling: the member is
/// never expelled (no MAXPOLL, no revocation), every valid event gets one prediction, and the
/// oracle holds.
#[test]
fn processing_slower_than_max_poll_interval_keeps_the_member() {
    let broker = Broker::start();
    let s = scoring(&broker, "slow");
    s.p.edit(
        "\"session.timeout.ms\" = \"6000\"",
        "\"session.timeout.ms\" = \"6000\"\n\"max.poll.interval.ms\" = \"6000\"",
    );
    produce(&broker, &s.p.topic, 0..3_000);
    let started = Instant::now();
    let mut sluice = s.p.spawn("run.log");
    s.p.wait_drained(&broker, DRAIN);
    let took = started.elapsed();
    s.p.stop(&mut sluice, "run.log");
    let log = s.p.log("run.log");
    eprintln!("drained in {took:?}");
    assert!(
        took > Duration::from_secs(9),
        "scoring took only {took:?}: the test did not outlast max.poll.interval.ms"
    );
    // Until shutdown (which leaves the group, revoking everything).
    let running = log.split("SIGTERM received").next().unwrap();
    assert!(!running.contains("MAXPOLL"), "{log}");
    assert!(!running.contains("Partitions revoked"), "{log}");
    assert_eq!(running.matches("Partitions assigned").count(), 1, "{log}");
    check_oracle(&broker, &s.p);
    let records = broker.read_all(&s.predictions);
    let predicted = by_id(&records);
    let valid = (0..3_000).filter(|n| valid_json(*n).is_some()).count();
    assert_eq!(predicted.len(), valid);
    assert!(predicted.values().all(|p| p.len() == 1));
}

/// A model that raises, returns NaN or the wrong shape: exactly those events become dead
/// letters (stage `inference`) with their original bytes; every other event is scored.
#[test]
fn a_failing_model_dead_letters_only_its_events() {
    let broker = Broker::start();
    let s = scoring(&broker, "faulty");
    produce(&broker, &s.p.topic, 0..2_100);
    let mut sluice = s.p.spawn("run.log");
    s.p.wait_drained(&broker, DRAIN);
    s.p.stop(&mut sluice, "run.log");
    check_oracle(&broker, &s.p);

    let mut expected_failures = BTreeMap::new();
    let mut scored = BTreeSet::new();
    for n in 0..2_100u64 {
        let Some(v) = valid_json(n) else { continue };
        // The cues of models.py's Faulty model.
        let amount = v["amount"].as_f64().unwrap();
        let reason = [
            (13.5, "model_error"),
            (17.5, "non_finite_output"),
            (19.5, "wrong_output_shape"),
        ]
        .into_iter()
        .find(|(cue, _)| *cue == amount)
        .map(|(_, r)| r);
        match reason {
            Some(r) => {
                expected_failures.insert(format!("e-{n}"), (r, event(n).payload));
            }
            None => {
                scored.insert(format!("e-{n}"));
            }
        }
    }
    assert!(expected_failures.len() >= 4, "{expected_failures:?}");

    let dead = broker.read_all(&s.p.dlq);
    let mut failures = BTreeMap::new();
    for d in dead
        .iter()
        .filter(|d| d.header("sluice.stage") == Some("inference"))
    {
        let v: Value = serde_json::from_slice(&d.payload).expect("original bytes");
        let id = v["id"].as_str().unwrap().to_owned();
        assert!(
            d.header("sluice.error").unwrap().contains("model risk"),
            "{:?}",
            d.header("sluice.error")
        );
        assert!(d.header("sluice.offset").is_some());
        failures.insert(
            id,
            (
                d.header("sluice.reason").unwrap().to_owned(),
                d.payload.clone(),
            ),
        );
    }
    let want: BTreeMap<String, (String, Vec<u8>)> = expected_failures
        .into_iter()
        .map(|(id, (r, p))| (id, (r.to_owned(), p)))
        .collect();
    assert_eq!(failures, want, "inference dead letters");

    let predictions = broker.read_all(&s.predictions);
    let predicted = by_id(&predictions);
    let got: BTreeSet<String> = predicted.keys().cloned().collect();
    assert_eq!(got, scored, "every other valid event is scored");
    assert!(predicted.values().all(|v| v.len() == 1));

    // The feedback records as training data: pipelines/fraud_feedback.toml keeps them in
    // Parquet, one row per scored event.
    let out = s.p.dir.path().join("feedback-parquet");
    let dlq = format!("{}.dlq", s.feedback);
    broker.create_topic(&dlq, 1);
    let group = unique("feedback");
    let log = fs::File::create(s.p.dir.path().join("feedback.log")).unwrap();
    let mut feedback = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("run")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/fraud_feedback.toml"))
            .args(["--listen", "off"])
            .env("KAFKA_BOOTSTRAP", &broker.bootstrap)
            .env("FRAUD_FEEDBACK_TOPIC", &s.feedback)
            .env("FEEDBACK_GROUP", &group)
            .env("FEEDBACK_DLQ", &dlq)
            .env("FEEDBACK_OUTPUT", &out)
            .env("FEEDBACK_IDLE_FLUSH", "300ms")
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    broker
        .wait_committed(&s.feedback, &group, DRAIN)
        .unwrap_or_else(|e| panic!("{e}\n{}", s.p.log("feedback.log")));
    sigterm(&feedback.0);
    assert!(wait_exit(&mut feedback.0, Duration::from_secs(30)).success());
    let count = run_ok(
        Command::new("python3")
            .args([
                "-c",
                "import sys, pyarrow.dataset as ds; \
                 print(ds.dataset(sys.argv[1], format='parquet').count_rows())",
            ])
            .arg(&out),
        "pyarrow",
    );
    assert_eq!(count.trim(), scored.len().to_string());
}

/// kill -9 at random moments: every valid event still gets at least one prediction, each
/// with its model version, and Parquet stays exactly once.
#[test]
fn kill_9_loses_no_prediction() {
    let broker = Broker::start();
    let s = scoring(&broker, "linear");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(9);
    produce(&broker, &s.p.topic, 0..2_000);
    let mut next = 2_000;
    for round in 0..3 {
        let log = format!("run-{round}.log");
        let mut sluice = s.p.spawn(&log);
        // Killed while predictions are flowing: once more of them exist than before.
        let before: i64 = broker.end_offsets(&s.predictions).values().sum();
        let started = Instant::now();
        while broker.end_offsets(&s.predictions).values().sum::<i64>() <= before {
            assert!(
                started.elapsed() < DRAIN,
                "no predictions:\n{}",
                s.p.log(&log)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Predictions can also grow from the previous instance's last records becoming
        // visible: kill only an instance that has joined, as this test means to.
        s.p.wait_for_log(&log, "Partitions assigned");
        std::thread::sleep(Duration::from_millis(rng.random_range(0..400)));
        sigkill(&mut sluice.0);
        produce(&broker, &s.p.topic, next..next + 500);
        next += 500;
        std::thread::sleep(SESSION_TIMEOUT);
    }
    let mut sluice = s.p.spawn("final.log");
    s.p.wait_drained(&broker, DRAIN);
    s.p.stop(&mut sluice, "final.log");
    check_oracle(&broker, &s.p);

    let predictions = broker.read_all(&s.predictions);
    let predicted = by_id(&predictions);
    let valid: Vec<String> = (0..next)
        .filter(|n| valid_json(*n).is_some())
        .map(|n| format!("e-{n}"))
        .collect();
    for id in &valid {
        let p = predicted
            .get(id)
            .unwrap_or_else(|| panic!("no prediction for {id}"));
        assert!(p.iter().all(|(v, _)| v["model_version"] == "1"));
    }
    assert_eq!(
        predicted.len(),
        valid.len(),
        "no prediction for an unknown event"
    );
    let again = predicted.values().filter(|v| v.len() > 1).count();
    eprintln!(
        "{} events, {} predictions, {again} events predicted more than once after kills",
        valid.len(),
        predictions.len()
    );
}

/// A corrupt model file at start is a configuration error: `validate` and `run` exit 2 and
/// say which file and why.
#[test]
fn a_corrupt_model_at_start_is_a_configuration_error() {
    let broker = Broker::start();
    let s = scoring(&broker, "linear");
    fs::write(s.repo.join("1/model.pt"), b"garbage").unwrap();
    for command in ["validate", "run"] {
        let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args([command, s.p.file.to_str().unwrap()])
            .args(if command == "run" {
                &["--listen", "off"][..]
            } else {
                &[]
            })
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {stderr}");
        assert!(
            stderr.contains("1/model.pt") && stderr.contains("not a loadable TorchScript file"),
            "{command}: {stderr}"
        );
    }
}

/// Issue 12, rollout: with version 1 stable (pinned by `sluice model promote`, though 4 is
/// newer), version 2 as a canary of 30 % and version 3 in the shadow, every event is predicted
/// once, each customer by the one version its key's hash gives (checked with the test's own
/// FNV-1a), each with PyTorch's score for that version; the shadow's predictions go to the
/// shadow topic, marked. A shadow that fails on every row (version 4) trips its breaker and is
/// withdrawn, while the production path loses nothing and dead-letters nothing.
#[test]
fn a_canary_serves_its_share_of_entities_and_a_shadow_never_touches_production() {
    let broker = Broker::start();
    let s = scoring(&broker, "linear");
    let shadow = format!("{}.shadow", s.predictions);
    broker.create_topic(&shadow, 1);
    // Room in the queue beside a whole micro-batch: the shadow only takes what is free.
    s.p.edit("queue_rows = 500", "queue_rows = 5000");
    s.p.edit(
        "feedback_topic = ",
        &format!("shadow_topic = \"{shadow}\"\nfeedback_topic = "),
    );
    publish(&s.repo, 2, "linear", 2);
    publish(&s.repo, 3, "linear", 3);
    let repo = s.repo.to_str().unwrap();
    sluice_model(&["promote", repo, "1"]);
    sluice_model(&["canary", repo, "2", "--weight", "0.3"]);
    sluice_model(&["shadow", repo, "3"]);
    publish(&s.repo, 4, "broken", 0);
    let status = sluice_model(&["status", repo]);
    assert!(status.contains("canary 30%"), "{status}");

    let port = free_port();
    let mut sluice = s.p.spawn_listening("run.log", &format!("127.0.0.1:{port}"));
    produce(&broker, &s.p.topic, 0..2_000);
    s.p.wait_drained(&broker, DRAIN);
    let phase_one: Vec<Value> = (0..2_000).filter_map(valid_json).collect();
    wait_until(
        Duration::from_secs(60),
        || "the shadow's predictions".into(),
        || broker.read_all(&shadow).len() >= phase_one.len() * 9 / 10,
    );
    sluice_model(&["shadow", repo, "4"]);
    s.p.wait_for_log("run.log", "to=4");
    produce(&broker, &s.p.topic, 2_000..4_000);
    s.p.wait_drained(&broker, DRAIN);
    s.p.wait_for_log("run.log", "it is withdrawn");
    let metrics = http_get(port, "/metrics").1;
    s.p.stop(&mut sluice, "run.log");
    check_oracle(&broker, &s.p);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sluice_model_breaker_trips_total")
                && l.contains("slot=\"shadow\"")
                && l.contains("version=\"4\"")),
        "{metrics}"
    );

    let valid: Vec<Value> = (0..4_000).filter_map(valid_json).collect();
    let dir = s.p.dir.path();
    let expected: HashMap<&str, HashMap<String, (f64, Vec<f64>)>> = ["1", "2", "3"]
        .into_iter()
        .map(|v| (v, reference(&s.repo.join(v).join("model.pt"), &valid, dir)))
        .collect();
    let predictions = broker.read_all(&s.predictions);
    let predicted = by_id(&predictions);
    let mut customers: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for v in &valid {
        let id = v["id"].as_str().unwrap();
        let p = predicted
            .get(id)
            .unwrap_or_else(|| panic!("{id} not predicted"));
        assert_eq!(p.len(), 1, "{id}");
        let (p, _) = &p[0];
        let customer = v["customer"].as_str().unwrap();
        let version = p["model_version"].as_str().unwrap();
        let want = if in_canary(customer, 0.3) { "2" } else { "1" };
        assert_eq!(version, want, "{id} of {customer}");
        assert!(p.get("shadow").is_none(), "{p}");
        let score = p["outputs"]["score"].as_f64().unwrap();
        assert!((score - expected[version][id].0).abs() <= 1e-5, "{id}");
        customers
            .entry(customer.to_owned())
            .or_default()
            .insert(version.to_owned());
    }
    let on_canary = customers.values().filter(|v| v.contains("2")).count();
    let share = on_canary as f64 / customers.len() as f64;
    eprintln!(
        "canary: {on_canary} of {} customers ({share:.3})",
        customers.len()
    );
    assert!((0.18..=0.42).contains(&share), "{share}");

    let shadowed = broker.read_all(&shadow);
    let mut seen = BTreeSet::new();
    for r in &shadowed {
        let v: Value = serde_json::from_slice(&r.payload).unwrap();
        assert_eq!(v["shadow"], true, "{v}");
        assert_eq!(v["model_version"], "3", "version 4 never scores a row: {v}");
        let id = v["event_id"].as_str().unwrap();
        assert!(seen.insert(id.to_owned()), "{id} twice in the shadow");
        let score = v["outputs"]["score"].as_f64().unwrap();
        assert!((score - expected["3"][id].0).abs() <= 1e-5, "{id}");
    }
    eprintln!("shadow: {} predictions", shadowed.len());
    let rollout: Value =
        serde_json::from_slice(&fs::read(s.repo.join("rollout.json")).unwrap()).unwrap();
    assert_eq!(
        rollout["shadow"],
        Value::Null,
        "the trip withdrew it for all: {rollout}"
    );
    assert_eq!(rollout["refused"], serde_json::json!(["4"]));
    assert_eq!(rollout["canary"]["version"], "2", "the canary stays");
}

/// Issue 12: `sluice model rollback` changes the repository's rollout once and every instance
/// of the group follows: after it, both members serve version 1 again.
#[test]
fn a_rollback_by_command_reaches_every_instance() {
    let broker = Broker::start();
    let s = scoring(&broker, "linear");
    publish(&s.repo, 2, "linear", 2);
    let mut members = Members::start(&s.p, &["a", "b"]);
    produce(&broker, &s.p.topic, 0..1_000);
    s.p.wait_drained(&broker, DRAIN);
    let out = sluice_model(&["rollback", s.repo.to_str().unwrap()]);
    assert!(out.contains("rolled back"), "{out}");
    for log in ["a.log", "b.log"] {
        s.p.wait_for_log(log, "Model version swapped in");
        assert!(s.p.log(log).contains("from=2 to=1"), "{log}");
    }
    produce(&broker, &s.p.topic, 1_000..2_000);
    s.p.wait_drained(&broker, DRAIN);
    members.stop_all();
    check_oracle(&broker, &s.p);
    let predictions = broker.read_all(&s.predictions);
    let mut partitions = BTreeSet::new();
    for (id, p) in by_id(&predictions) {
        let n: u64 = id.trim_start_matches("e-").parse().unwrap();
        let (v, _) = &p[0];
        let want = if n < 1_000 { "2" } else { "1" };
        assert_eq!(v["model_version"], want, "{id}");
        if n >= 1_000 {
            partitions.insert(v["source"]["partition"].as_i64().unwrap());
        }
    }
    assert_eq!(
        partitions.len(),
        3,
        "every partition scored after the rollback"
    );
}

/// Issue 12: a canary that fails on every real row trips its own breaker: it is withdrawn (in
/// the process and in the rollout, for every instance), the rows it failed on are scored again
/// by the stable version, and no event becomes a dead letter or goes unpredicted.
#[test]
fn a_failing_canary_is_withdrawn_and_its_rows_are_scored_by_the_stable_version() {
    let broker = Broker::start();
    let s = scoring(&broker, "linear");
    publish(&s.repo, 2, "broken", 0);
    let repo = s.repo.to_str().unwrap();
    sluice_model(&["promote", repo, "1"]);
    sluice_model(&["canary", repo, "2", "--weight", "0.5"]);
    let mut sluice = s.p.spawn("run.log");
    produce(&broker, &s.p.topic, 0..2_000);
    s.p.wait_drained(&broker, DRAIN);
    s.p.wait_for_log("run.log", "it is withdrawn");
    s.p.stop(&mut sluice, "run.log");
    check_oracle(&broker, &s.p);
    let predictions = broker.read_all(&s.predictions);
    let predicted = by_id(&predictions);
    for v in (0..2_000).filter_map(valid_json) {
        let id = v["id"].as_str().unwrap();
        let p = predicted
            .get(id)
            .unwrap_or_else(|| panic!("{id} not predicted"));
        assert_eq!(p.len(), 1, "{id}");
        assert_eq!(p[0].0["model_version"], "1", "{id}");
    }
    let inference = broker
        .read_all(&s.p.dlq)
        .iter()
        .filter(|d| d.header("sluice.stage") == Some("inference"))
        .count();
    assert_eq!(inference, 0, "a canary's failures are not dead letters");
    let rollout: Value =
        serde_json::from_slice(&fs::read(s.repo.join("rollout.json")).unwrap()).unwrap();
    assert_eq!(
        (&rollout["canary"], &rollout["refused"]),
        (&Value::Null, &serde_json::json!(["2"])),
        "{rollout}"
    );
}
