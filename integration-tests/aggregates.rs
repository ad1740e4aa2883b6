//! Black-box tests of the aggregate views: a real broker, a real `redis-server` (and a real
//! Redis Cluster), the real `sluice` binary. An oracle here computes every entity's windowed
//! aggregates from the records in the topic, following the semantics the README documents,
//! and the hashes Redis holds (read with a plain client, by the documented layout) must equal
//! it exactly: every bucket, every partial, the watermark and the guards.

mod common;

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use common::*;

const DRAIN: Duration = Duration::from_secs(180);
const BUCKET_MS: i64 = 60_000;
const LATENESS_MS: i64 = 600_000;
/// The windows (label, ms), shortest first.
const WINDOWS: [(&str, i64); 3] = [("10m", 600_000), ("1h", 3_600_000), ("6h", 21_600_000)];
/// 2026-11-21T00:00:00Z.
const BASE_MS: i64 = 1_795_219_200_000;

fn aggregate_section() -> &'static str {
    r#"
[[sink.redis.aggregates]]
name = "velocity"
key = "agg:{customer}"
bucket = "1m"
windows = ["10m", "1h", "6h"]
lateness = "10m"
features = [
  { name = "orders", function = "count" },
  { name = "usd", function = "count", column = "currency", equals = "USD" },
  { name = "amount_sum", function = "sum", column = "amount" },
  { name = "amount_avg", function = "avg", column = "amount" },
  { name = "amount_min", function = "min", column = "amount" },
  { name = "amount_max", function = "max", column = "amount" },
]
"#
}

/// A pipeline with a latest-value view and the aggregate view, on `redis` (a URL or a
/// `cluster_nodes = [...]` line); `extra`: more keys of `[sink.redis]`.
fn with_aggregates(p: &TestPipeline, redis: &str, extra: &str) {
    let connection = if redis.starts_with("cluster_nodes") {
        redis.to_owned()
    } else {
        format!("url = \"{redis}\"")
    };
    let mut text = std::fs::read_to_string(&p.file).unwrap();
    text.push_str(&format!(
        r#"
[sink.redis]
{connection}
time_field = "at"
pipeline_size = 50
{extra}
[[sink.redis.views]]
name = "customer"
key = "cust:{{customer}}"
columns = ["amount"]
{}
"#,
        aggregate_section()
    ));
    std::fs::write(&p.file, text).unwrap();
}

/// Event `n`: customer `c-(n % 12)` (its Kafka key, so one partition holds all of a customer's
/// events), every 20 s from BASE; every 17th 4 minutes early (out of order, within the
/// lateness), every 29th 3 hours early (beyond it), every 11th invalid; every 3rd in USD.
fn agg_event(n: u64) -> (String, Vec<u8>) {
    let customer = format!("c-{}", n % 12);
    if n % 11 == 5 {
        let bad = format!(
            r#"{{"id":"e-{n}","customer":"{customer}","amount":"oops","at":"2026-11-21T10:00:00Z"}}"#
        );
        return (customer, bad.into_bytes());
    }
    let mut ms = BASE_MS + n as i64 * 20_000 + (n as i64 % 7) * 13;
    if n % 17 == 3 {
        ms -= 240_000;
    }
    if n % 29 == 7 {
        ms -= 3 * 3_600_000;
    }
    let at = chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let currency = match (n / 12) % 3 {
        0 => r#","currency":"USD""#,
        1 => r#","currency":"EUR""#,
        _ => "",
    };
    let amount = (n * 37) % 500;
    let payload = format!(
        r#"{{"id":"e-{n}","customer":"{customer}","amount":{amount}.{},"at":"{at}"{currency}}}"#,
        n % 100
    );
    (customer, payload.into_bytes())
}

fn produce_agg(broker: &Broker, topic: &str, range: impl Iterator<Item = u64>) {
    produce_records(broker, topic, range.map(agg_event));
}

/// A valid event as the oracle sees it.
#[derive(Debug, Clone)]
struct Seen {
    id: String,
    customer: String,
    partition: i32,
    offset: i64,
    ms: i64,
    amount: f64,
    usd: bool,
}

/// The valid records of the topic, in offset order per partition.
fn seen(broker: &Broker, topic: &str) -> Vec<Seen> {
    let mut out: Vec<Seen> = broker
        .read_all(topic)
        .into_iter()
        .filter_map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.payload).ok()?;
            let amount = v["amount"].as_f64()?;
            let at = chrono::DateTime::parse_from_rfc3339(v["at"].as_str()?).ok()?;
            Some(Seen {
                id: v["id"].as_str()?.to_owned(),
                customer: v["customer"].as_str()?.to_owned(),
                partition: r.partition,
                offset: r.offset,
                ms: at.timestamp_millis(),
                amount,
                usd: v["currency"].as_str() == Some("USD"),
            })
        })
        .collect();
    out.sort_by_key(|s| (s.partition, s.offset));
    out
}

/// One bucket's partials, in the view's `_parts` order: n, c:usd, s:amount, k:amount,
/// lo:amount, hi:amount.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Partial {
    n: f64,
    usd: f64,
    sum: f64,
    k: f64,
    lo: Option<f64>,
    hi: Option<f64>,
}

impl Partial {
    fn add(&mut self, e: &Seen) {
        self.n += 1.0;
        if e.usd {
            self.usd += 1.0;
        }
        self.sum += e.amount;
        self.k += 1.0;
        self.lo = Some(self.lo.map_or(e.amount, |x| x.min(e.amount)));
        self.hi = Some(self.hi.map_or(e.amount, |x| x.max(e.amount)));
    }

    fn merge(&mut self, o: &Partial) {
        self.n += o.n;
        self.usd += o.usd;
        self.sum += o.sum;
        self.k += o.k;
        self.lo = match (self.lo, o.lo) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.hi = match (self.hi, o.hi) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }

    /// The documented form: a JSON array of the partials in `_parts` order, `null` for a
    /// missing min or max (17 significant digits: the same double, which is what is compared).
    fn parse(text: &str) -> Self {
        // Parsed by hand: serde_json's default float parsing may miss the last bit of a
        // 17-digit number, where `str::parse` is exact.
        let inner = text
            .strip_prefix('[')
            .and_then(|t| t.strip_suffix(']'))
            .unwrap_or_else(|| panic!("partials {text:?}: not a JSON array"));
        let v: Vec<Option<f64>> = inner
            .split(',')
            .map(|x| match x {
                "null" => None,
                x => Some(
                    x.parse()
                        .unwrap_or_else(|e| panic!("partials {text:?}: {e}")),
                ),
            })
            .collect();
        assert_eq!(v.len(), 6, "partials {text:?}");
        Self {
            n: v[0].unwrap(),
            usd: v[1].unwrap(),
            sum: v[2].unwrap(),
            k: v[3].unwrap(),
            lo: v[4],
            hi: v[5],
        }
    }

    /// The features: orders, usd, amount_sum, amount_avg, amount_min, amount_max.
    fn features(&self) -> [Option<f64>; 6] {
        [
            Some(self.n),
            Some(self.usd),
            Some(self.sum),
            (self.k > 0.0).then(|| self.sum / self.k),
            self.lo,
            self.hi,
        ]
    }
}

/// One entity as the oracle keeps it.
#[derive(Debug, Default, Clone)]
struct Entity {
    wm: Option<i64>,
    buckets: BTreeMap<i64, Partial>,
    /// The first bucket start any event was applied to.
    first: Option<i64>,
    /// Last offset per partition (applied or judged late).
    guards: BTreeMap<i32, i64>,
    late: u64,
}

impl Entity {
    fn too_late(&self, ms: i64) -> bool {
        self.wm.is_some_and(|wm| ms < wm - LATENESS_MS)
    }

    fn apply(&mut self, e: &Seen) {
        self.guards.insert(e.partition, e.offset);
        if self.too_late(e.ms) {
            self.late += 1;
            return;
        }
        let start = e.ms - e.ms.rem_euclid(BUCKET_MS);
        self.buckets.entry(start).or_default().add(e);
        self.first = Some(self.first.map_or(start, |f| f.min(start)));
        self.wm = Some(self.wm.map_or(e.ms, |w| w.max(e.ms)));
    }

    /// The windows ending at `t`: buckets whose start is in (bucket(t) - W, bucket(t)].
    fn windows(&self, t: i64) -> Vec<Partial> {
        let cur = t - t.rem_euclid(BUCKET_MS);
        WINDOWS
            .iter()
            .map(|(_, w)| {
                let mut acc = Partial::default();
                for (_, b) in self.buckets.range(cur - w + 1..=cur) {
                    acc.merge(b);
                }
                acc
            })
            .collect()
    }

    /// The horizon of the watermark: buckets at or before it are deleted.
    fn horizon(&self) -> i64 {
        let edge = self.wm.expect("an entity with events") - LATENESS_MS;
        edge - edge.rem_euclid(BUCKET_MS) - WINDOWS[2].1
    }

    /// The buckets a hash keeps: those after the horizon of its watermark.
    fn kept(&self) -> BTreeMap<i64, Partial> {
        if self.wm.is_none() {
            return BTreeMap::new();
        }
        self.buckets
            .range(self.horizon() + 1..)
            .map(|(k, v)| (*k, *v))
            .collect()
    }

    /// `_lo`, as documented: the later of the first bucket ever applied and the bucket after
    /// the horizon (no bucket starts before it).
    fn lo(&self) -> i64 {
        self.first
            .expect("an entity with events")
            .max(self.horizon() + BUCKET_MS)
    }
}

/// Every entity after all the records, in offset order per partition.
fn oracle(records: &[Seen]) -> BTreeMap<String, Entity> {
    let mut entities: BTreeMap<String, Entity> = BTreeMap::new();
    for e in records {
        entities.entry(e.customer.clone()).or_default().apply(e);
    }
    entities
}

/// Stands for the `_v` field in an expected hash: the last write's own, which nobody predicts.
const ANY_VERSION: &str = "<any>";

/// The hashes Redis must hold, field by field, by the documented layout.
fn expected_hashes(
    entities: &BTreeMap<String, Entity>,
    topic: &str,
) -> BTreeMap<String, BTreeMap<String, String>> {
    entities
        .iter()
        .map(|(customer, e)| {
            let mut h = BTreeMap::new();
            h.insert(
                "_parts".to_owned(),
                "60000;n,c:usd,s:amount,k:amount,lo:amount,hi:amount".to_owned(),
            );
            h.insert("_wm".to_owned(), e.wm.unwrap().to_string());
            h.insert("_lo".to_owned(), e.lo().to_string());
            h.insert("_v".to_owned(), ANY_VERSION.to_owned());
            for (p, o) in &e.guards {
                h.insert(format!("_o:{topic}:{p}"), o.to_string());
            }
            for (start, b) in e.kept() {
                h.insert(start.to_string(), format!("{b:?}"));
            }
            (format!("agg:{customer}"), h)
        })
        .collect()
}

/// Compares Redis's hashes with the oracle's: the same keys and fields, and the same numbers
/// in every bucket (parsed from Redis's text).
fn assert_hashes(
    got: &BTreeMap<String, BTreeMap<String, String>>,
    want: &BTreeMap<String, BTreeMap<String, String>>,
    entities: &BTreeMap<String, Entity>,
) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "aggregate keys"
    );
    for (key, hash) in want {
        let have = &got[key];
        let entity = &entities[key.strip_prefix("agg:").unwrap()];
        assert_eq!(
            have.keys().collect::<Vec<_>>(),
            hash.keys().collect::<Vec<_>>(),
            "{key}: fields"
        );
        for (field, value) in hash {
            match field.parse::<i64>() {
                Ok(start) => assert_eq!(
                    Partial::parse(&have[field]),
                    entity.buckets[&start],
                    "{key}: bucket {field}"
                ),
                Err(_) if value == ANY_VERSION => {
                    assert!(!have[field].is_empty(), "{key}: {field} is empty")
                }
                Err(_) => assert_eq!(&have[field], value, "{key}: {field}"),
            }
        }
    }
}

/// A clean run, the same events produced again (old event times: late or out of order), and
/// a replay of everything by a new group: Redis equals the oracle after each, and the replay
/// changes nothing. `sluice features get --at` finishes the windows as the oracle does.
#[test]
fn aggregates_equal_the_oracle_across_late_out_of_order_and_replayed_events() {
    let broker = Broker::start();
    let redis = RedisServer::start(&[]);
    let p = TestPipeline::new(&broker, 3, "idle_flush = \"300ms\"");
    with_aggregates(&p, &redis.url(), "");
    produce_agg(&broker, &p.topic, 0..3_000);
    let port = free_port();
    let mut sluice = p.spawn_listening("run.log", &format!("127.0.0.1:{port}"));
    p.wait_drained(&broker, DRAIN);
    let metrics = http_get(port, "/metrics").1;
    p.stop(&mut sluice, "run.log");
    let records = seen(&broker, &p.topic);
    let entities = oracle(&records);
    assert_eq!(entities.len(), 12);
    let late: u64 = entities.values().map(|e| e.late).sum();
    assert!(late > 50, "the events should include late ones");
    let counted: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("sluice_redis_aggregate_events_total{") && l.contains("result=\"late\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(
        counted as u64, late,
        "too-late events counted in the metric:\n{metrics}"
    );
    // After its first write, an entity was written by compare-and-set from sluice's snapshot
    // (its first write of each of the twelve took the write script), and the write script never
    // decided an event otherwise than sluice does.
    let swaps: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("sluice_redis_aggregate_swaps_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(!p.log("run.log").contains("otherwise than sluice"));
    assert!(swaps >= 10.0, "compare-and-set writes: {swaps}");
    assert_hashes(
        &redis.hashes("agg:"),
        &expected_hashes(&entities, &p.topic),
        &entities,
    );
    let ttl = redis.ttl("agg:c-1");
    assert!((22_000..=22_261).contains(&ttl), "TTL {ttl}");

    // The same events again: new records with old event times.
    produce_agg(&broker, &p.topic, (0..3_000).step_by(7));
    p.run_until_drained(&broker, DRAIN, "again.log");
    let records = seen(&broker, &p.topic);
    let entities = oracle(&records);
    let want = expected_hashes(&entities, &p.topic);
    assert_hashes(&redis.hashes("agg:"), &want, &entities);

    // The read path: the windows as of a time, as `sluice features get` finishes them.
    let t = BASE_MS + 3_000 * 20_000;
    let at = chrono::DateTime::from_timestamp_millis(t)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let out = run_ok(
        std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["features", "get"])
            .arg(&p.file)
            .args(["agg:c-5", "--at", &at]),
        "sluice features get",
    );
    let names = [
        "orders",
        "usd",
        "amount_sum",
        "amount_avg",
        "amount_min",
        "amount_max",
    ];
    let printed: HashMap<&str, &str> = out
        .lines()
        .filter_map(|l| l.trim().split_once(" = "))
        .collect();
    for ((label, _), window) in WINDOWS.iter().zip(entities["c-5"].windows(t)) {
        for (name, value) in names.iter().zip(window.features()) {
            let name = format!("{name}_{label}");
            let shown = printed
                .get(name.as_str())
                .unwrap_or_else(|| panic!("{name} in:\n{out}"));
            match value {
                // Redis merges the buckets in its own order: the last digits may differ.
                Some(v) => {
                    let got: f64 = shown.parse().unwrap();
                    assert!(
                        (got - v).abs() <= 1e-9 * v.abs().max(1.0),
                        "{name}: {got} vs {v}"
                    );
                }
                None => assert_eq!(*shown, "null", "{name}"),
            }
        }
    }
    assert!(
        out.contains("window 1h [2026-11-21T15:41:00Z .. 2026-11-21T16:41:00Z)"),
        "{out}"
    );

    // A group reset: everything again from the earliest offset, in a new group.
    let before = redis.hashes("agg:");
    p.edit(
        &format!("group_id = \"{}\"", p.group),
        "group_id = \"replay\"",
    );
    p.edit("path = \"out\"", "path = \"out-replay\"");
    let mut replay = p.spawn("replay.log");
    broker.wait_committed(&p.topic, "replay", DRAIN).unwrap();
    p.stop(&mut replay, "replay.log");
    assert_eq!(
        redis.hashes("agg:"),
        before,
        "a replay changed the aggregates"
    );
}

/// kill -9 of the only member, several times while events arrive: after a clean drain every
/// event counts exactly once. Parquet finishes its files (and so commits) only every 3 s, so
/// that each kill leaves seconds of events applied to Redis but not committed, which the next
/// member consumes again.
#[test]
fn kill_9_mid_run_counts_every_event_once() {
    let broker = Broker::start();
    let redis = RedisServer::start(&[]);
    let p = TestPipeline::new(&broker, 2, "idle_flush = \"5s\"\nmax_file_age = \"3s\"");
    with_aggregates(&p, &redis.url(), "");
    let producer = {
        let (bootstrap, topic) = (broker.bootstrap.clone(), p.topic.clone());
        std::thread::spawn(move || {
            let b = Broker::external(&bootstrap);
            for chunk in 0..12 {
                produce_agg(&b, &topic, chunk * 250..(chunk + 1) * 250);
                std::thread::sleep(Duration::from_millis(700));
            }
        })
    };
    let mut group = Members::start(&p, &["m0"]);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(2_000));
        group.kill(0);
    }
    producer.join().unwrap();
    group.settle(&broker, 5);
    p.wait_drained(&broker, DRAIN);
    group.stop_all();
    let entities = oracle(&seen(&broker, &p.topic));
    assert_hashes(
        &redis.hashes("agg:"),
        &expected_hashes(&entities, &p.topic),
        &entities,
    );
}

/// The aggregate view on a three-node Redis Cluster: each entity's hash equals the oracle's,
/// wherever its slot lives. Here sluice keeps no snapshots, so every write goes through the
/// write script, reading only the fields its events touch.
#[test]
fn aggregates_in_a_redis_cluster() {
    let cluster = RedisCluster::start();
    let broker = Broker::start();
    let p = TestPipeline::new(&broker, 2, "idle_flush = \"300ms\"");
    with_aggregates(
        &p,
        &format!("cluster_nodes = {:?}", cluster.urls()),
        "aggregate_cache = \"0\"",
    );
    produce_agg(&broker, &p.topic, 0..1_500);
    p.run_until_drained(&broker, Duration::from_secs(60), "run.log");
    let entities = oracle(&seen(&broker, &p.topic));
    assert_hashes(
        &cluster.hashes("agg:"),
        &expected_hashes(&entities, &p.topic),
        &entities,
    );
    let holding = cluster
        .nodes
        .iter()
        .filter(|n| !n.hashes("agg:").is_empty())
        .count();
    assert!(holding >= 2, "the keys should spread over the nodes");
}

/// Adds a model to the pipeline that takes the amount and five of the view's aggregates (and,
/// with `latest`, the customer's previous amount), with its predictions and feedback topics.
fn with_model(p: &TestPipeline, predictions: &str, feedback: &str, latest: bool) {
    let latest = if latest {
        "{ latest = \"customer.amount\", null = -1.0 },"
    } else {
        ""
    };
    let mut text = std::fs::read_to_string(&p.file).unwrap();
    text.push_str(&format!(
        r#"
[[model]]
name = "velocity"
path = "models/velocity"
device = "cpu"
max_batch = 64
max_delay = "1ms"
reload_interval = "0s"
output_topic = "{predictions}"
feedback_topic = "{feedback}"
key = "{{customer}}"
id_column = "id"
inputs = [
  {{ column = "amount" }},
  {{ aggregate = "velocity.orders_10m", null = -1.0 }},
  {{ aggregate = "velocity.usd_1h", null = -1.0 }},
  {{ aggregate = "velocity.amount_sum_1h", null = -1.0 }},
  {{ aggregate = "velocity.amount_avg_6h", null = -1.0 }},
  {{ aggregate = "velocity.amount_max_6h", null = -1.0 }},
  {latest}
]
output = {{ kind = "score" }}
"#
    ));
    std::fs::write(&p.file, text).unwrap();
    let repo = p.dir.path().join("models/velocity");
    std::fs::create_dir_all(repo.join("1")).unwrap();
    python(&["any-width", repo.join("1/model.pt").to_str().unwrap()]);
}

/// A broker, a Redis server and a pipeline with the aggregate view and the model of
/// [`with_model`]; returns them and the model's feedback topic.
fn scored_pipeline(latest: bool) -> (Broker, RedisServer, TestPipeline, String) {
    let broker = Broker::start();
    let redis = RedisServer::start(&[]);
    let feedback = unique("feedback");
    let predictions = format!("{feedback}.predictions");
    broker.create_topic(&feedback, 1);
    broker.create_topic(&predictions, 1);
    let p = TestPipeline::new(&broker, 2, "idle_flush = \"300ms\"");
    with_aggregates(&p, &redis.url(), "");
    with_model(&p, &predictions, &feedback, latest);
    (broker, redis, p, feedback)
}

/// Every feedback record in `topic` carries the features `want` has for its event, and every
/// event of `want` has one.
fn check_feedback(broker: &Broker, topic: &str, want: &HashMap<String, Vec<f64>>) {
    let got = broker.read_all(topic);
    let mut ids = std::collections::BTreeSet::new();
    for r in &got {
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        let id = v["event_id"].as_str().unwrap().to_owned();
        let features: Vec<f64> = v["features"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let expected = &want[&id];
        assert_eq!(features.len(), expected.len(), "{id}: features");
        for (i, (a, b)) in features.iter().zip(expected).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "{id}: feature {i} fed {a}, the oracle has {b} ({features:?} vs {expected:?})"
            );
        }
        ids.insert(id);
    }
    assert_eq!(ids.len(), want.len(), "every valid event scored");
}

/// The model's inputs take aggregates and a latest value: each scored event's feedback record
/// carries the windows ending at its own event time, the event included (nulls, as -1, for a
/// too-late event), and the amount of its customer's newest earlier event, as the oracle
/// computes them from the records before it; the hashes equal the oracle's (with a `_v` of
/// the writer's). A replay by a new group then finds every event of the partition already
/// applied: each event's windows hold every event of its entity in buckets up to its own,
/// and no latest value is older than the event, as documented.
#[test]
fn scored_events_carry_the_aggregates_at_their_point_in_time() {
    let (broker, redis, p, feedback) = scored_pipeline(true);
    produce_agg(&broker, &p.topic, 0..1_500);
    p.run_until_drained(&broker, DRAIN, "run.log");

    let records = seen(&broker, &p.topic);
    // Point in time: the entity as the oracle has it right after the event; its latest
    // amount, from its newest event before this one (by event time, partition, offset).
    let mut entities: HashMap<String, Entity> = HashMap::new();
    let mut newest: HashMap<String, ((i64, i32, i64), f64)> = HashMap::new();
    let mut first: HashMap<String, Vec<f64>> = HashMap::new();
    for e in &records {
        let entity = entities.entry(e.customer.clone()).or_default();
        let late = entity.too_late(e.ms);
        entity.apply(e);
        let order = (e.ms, e.partition, e.offset);
        let latest = match newest.get(&e.customer) {
            Some((o, amount)) if *o < order => *amount,
            _ => -1.0,
        };
        if newest.get(&e.customer).is_none_or(|(o, _)| order > *o) {
            newest.insert(e.customer.clone(), (order, e.amount));
        }
        let mut features = fed(e, entity, late);
        features.push(latest);
        first.insert(e.id.clone(), features);
    }
    check_feedback(&broker, &feedback, &first);
    let after = oracle(&records);
    assert_hashes(
        &redis.hashes("agg:"),
        &expected_hashes(&after, &p.topic),
        &after,
    );

    // A replay: every event is already in the buckets.
    let replayed = format!("{feedback}.replay");
    broker.create_topic(&replayed, 1);
    p.edit(
        &format!("group_id = \"{}\"", p.group),
        "group_id = \"replay\"",
    );
    p.edit("path = \"out\"", "path = \"out-replay\"");
    p.edit(
        &format!("feedback_topic = \"{feedback}\""),
        &format!("feedback_topic = \"{replayed}\""),
    );
    let mut replay = p.spawn("replay.log");
    broker.wait_committed(&p.topic, "replay", DRAIN).unwrap();
    p.stop(&mut replay, "replay.log");
    let second: HashMap<String, Vec<f64>> = records
        .iter()
        .map(|e| {
            let entity = &after[&e.customer];
            // Redis holds each customer's newest event, never older than a replayed one.
            let mut features = fed(e, entity, entity.too_late(e.ms));
            features.push(-1.0);
            (e.id.clone(), features)
        })
        .collect();
    check_feedback(&broker, &replayed, &second);
}

/// sluice keeps its own snapshot of each aggregate hash, and a write whose snapshot is current
/// only sets what changes; the snapshot serves only while the hash is as sluice left it. Here
/// a running instance scores events of its topic; then another pipeline (another process on
/// another topic, with no model) writes the same customers' hashes; then the first instance
/// scores more events: their windows hold the other pipeline's events too, exactly as the
/// oracle computes them from every event in the order they were applied.
#[test]
fn a_snapshot_is_not_used_once_another_writer_changed_the_hash() {
    let (broker, redis, p, feedback) = scored_pipeline(false);
    let other = TestPipeline::new(&broker, 1, "idle_flush = \"300ms\"");
    with_aggregates(&other, &redis.url(), "");

    let mut sluice = p.spawn("run.log");
    produce_agg(&broker, &p.topic, 0..600);
    p.wait_drained(&broker, DRAIN);
    produce_agg(&broker, &other.topic, 600..900);
    other.run_until_drained(&broker, DRAIN, "other.log");
    produce_agg(&broker, &p.topic, 900..1_500);
    p.wait_drained(&broker, DRAIN);
    p.stop(&mut sluice, "run.log");

    // Each customer's events in the order applied: this topic's first 600, the other
    // pipeline's, then this topic's others.
    let number = |e: &Seen| e.id.trim_start_matches("e-").parse::<u64>().unwrap();
    let mine = seen(&broker, &p.topic);
    let (early, late): (Vec<Seen>, Vec<Seen>) = mine.into_iter().partition(|e| number(e) < 600);
    let others = seen(&broker, &other.topic);
    assert!(!others.is_empty() && !late.is_empty());
    let mut entities: HashMap<String, Entity> = HashMap::new();
    let mut want: HashMap<String, Vec<f64>> = HashMap::new();
    for (e, scored) in early
        .iter()
        .map(|e| (e, true))
        .chain(others.iter().map(|e| (e, false)))
        .chain(late.iter().map(|e| (e, true)))
    {
        let entity = entities.entry(e.customer.clone()).or_default();
        let too_late = entity.too_late(e.ms);
        entity.apply(e);
        if scored {
            want.insert(e.id.clone(), fed(e, entity, too_late));
        }
    }
    check_feedback(&broker, &feedback, &want);
}

/// The feature vector the test model is fed for `e` when its entity is `entity`: amount,
/// orders_10m, usd_1h, amount_sum_1h, amount_avg_6h, amount_max_6h, each -1 when null (a
/// too-late event has only nulls).
fn fed(e: &Seen, entity: &Entity, late: bool) -> Vec<f64> {
    if late {
        return vec![e.amount, -1.0, -1.0, -1.0, -1.0, -1.0];
    }
    let w = entity.windows(e.ms);
    let f = |p: &Partial, i: usize| p.features()[i].unwrap_or(-1.0);
    vec![
        e.amount,
        f(&w[0], 0),
        f(&w[1], 1),
        f(&w[1], 2),
        f(&w[2], 3),
        f(&w[2], 5),
    ]
}
