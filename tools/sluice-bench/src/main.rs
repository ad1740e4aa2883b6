//! Tools for the demo, the benchmark and the tests: create topics, generate realistic commerce
//! events (a share of them broken on purpose), drain a topic with a bare consumer, and
//! summarize what a pipeline produced.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use rand::{rngs::SmallRng, Rng, SeedableRng};
use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    config::ClientConfig,
    consumer::{BaseConsumer, CommitMode, Consumer},
    error::{KafkaError, RDKafkaErrorCode},
    message::{Headers, Message},
    producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext},
    ClientContext, Offset, TopicPartitionList,
};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "sluice-bench",
    about = "Demo, benchmark and test tools for sluice."
)]
struct Cli {
    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = "KAFKA_BOOTSTRAP",
        default_value = "127.0.0.1:9092",
        global = true
    )]
    bootstrap: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a topic (no error if it exists).
    CreateTopic {
        topic: String,
        #[arg(long, default_value_t = 4)]
        partitions: i32,
    },
    /// Produce realistic order and payment events; print what was produced as JSON.
    Generate {
        topic: String,
        #[command(flatten)]
        events: Events,
        /// Events per second at most (default: as fast as possible).
        #[arg(long)]
        rate: Option<f64>,
    },
    /// Produce the labels of events that `generate` produced (the same count, first, seed,
    /// invalid ratio and customers): the fraud outcome the demo's world decides, `label` 1 for
    /// each fraud (a chargeback) and 0 for a share of the others (a confirmed delivery); the
    /// rest get none and take the join's default. Keyed by event id.
    Labels {
        topic: String,
        #[command(flatten)]
        events: Events,
        /// Share of legitimate events that get an explicit 0.
        #[arg(long, default_value_t = 0.3)]
        confirm_share: f64,
    },
    /// Measure a pipeline's first model as sluice runs it: demo events decoded into Arrow,
    /// encoded into features and scored by the model threads in batches of max_batch.
    Score {
        /// A pipeline file with a [[model]].
        pipeline: PathBuf,
        #[arg(long, default_value_t = 200_000)]
        rows: usize,
    },
    /// Load a trainer puts on the machine: fine-tune a trainer file's stable version, round
    /// after round, on synthetic examples as wide as the pipeline's first model, for
    /// `--seconds`; print the rounds and examples per second as JSON. The benchmark runs it
    /// beside `score` to measure what training costs the scoring path.
    TrainLoad {
        /// The trainer file ([train]).
        trainer: PathBuf,
        /// A pipeline whose first [[model]] gives the features per example.
        #[arg(long)]
        pipeline: PathBuf,
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Examples per round.
        #[arg(long, default_value_t = 20_000)]
        examples: usize,
        /// Stop at the end of the round during which this file appears.
        #[arg(long)]
        stop_file: Option<PathBuf>,
    },
    /// Measure the decode stage alone: demo events (3% broken) validated into Arrow batches
    /// of 10,000 rows by a pipeline's decoder, on one thread.
    Decode {
        pipeline: PathBuf,
        #[arg(long, default_value_t = 500_000)]
        rows: usize,
    },
    /// Drain a topic from the beginning with a bare consumer that only counts; print the rate.
    Drain {
        topic: String,
        /// Stop after this many messages (default: the topic's size at start).
        #[arg(long)]
        expect: Option<u64>,
        /// Join this consumer group (instead of assigning every partition) and commit at the
        /// end, so the run's life is that of a pipeline's: join, consume, commit.
        #[arg(long)]
        group: Option<String>,
    },
    /// Summarize a pipeline's output: Parquet rows and files, dead letters by reason, offsets.
    Summary {
        /// The Parquet output folder.
        #[arg(long)]
        output: PathBuf,
        #[arg(long)]
        topic: String,
        #[arg(long)]
        dead_letter_topic: String,
        #[arg(long)]
        group: String,
        /// Seconds the run took, for the rate.
        #[arg(long)]
        elapsed: Option<f64>,
    },
    /// Write a model's feedback records joined with the demo world's truth (the events of
    /// `generate` with the same settings) as JSON lines `{"event_id", "features", "label"}`,
    /// in event order: training data exactly as the model was fed it.
    Examples {
        /// The feedback topic.
        topic: String,
        #[command(flatten)]
        events: Events,
        #[arg(long)]
        out: PathBuf,
    },
    /// Summarize a predictions topic: how many, by model version, the score distribution, one
    /// example.
    Predictions {
        topic: String,
        /// The output field to histogram.
        #[arg(long, default_value = "score")]
        field: String,
    },
    /// Load an inference endpoint (Open Inference Protocol, REST) with closed-loop clients
    /// and print its latency and throughput as JSON.
    Load {
        /// The server, e.g. http://127.0.0.1:8000.
        url: String,
        #[arg(long, default_value = "fraud")]
        model: String,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Seconds of load before the measurement starts.
        #[arg(long, default_value_t = 2.0)]
        warmup: f64,
        /// Rows per request.
        #[arg(long, default_value_t = 1)]
        rows: usize,
        /// Features per row (the model's width).
        #[arg(long, default_value_t = 25)]
        features: usize,
    },
    /// Wait until a consumer group has committed every partition's end offset.
    WaitCommitted {
        topic: String,
        #[arg(long)]
        group: String,
        /// Instead of the end offsets, wait until the committed offsets add up to this many
        /// events (for brokers whose high watermarks are not reliable, like tansu's memory
        /// engine; assumes the topic's offsets start at 0).
        #[arg(long)]
        total: Option<i64>,
        #[arg(long, default_value = "600")]
        timeout_secs: u64,
        /// Give up as soon as this process is gone (the one expected to commit).
        #[arg(long)]
        while_running: Option<u32>,
    },
}

mod load;

/// The same allocator as the `sluice` binary, so that stage measurements match it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::CreateTopic { topic, partitions } => {
            create_topic(&cli.bootstrap, &topic, partitions)
        }
        Command::Generate {
            topic,
            events,
            rate,
        } => generate(&cli.bootstrap, &topic, events, rate),
        Command::Labels {
            topic,
            events,
            confirm_share,
        } => labels(&cli.bootstrap, &topic, events, confirm_share),
        Command::Score { pipeline, rows } => score(&pipeline, rows),
        Command::Load {
            url,
            model,
            concurrency,
            seconds,
            warmup,
            rows,
            features,
        } => {
            let figures = load::run(&url, &model, concurrency, seconds, warmup, rows, features)?;
            println!("{}", serde_json::to_string(&figures)?);
            Ok(())
        }
        Command::TrainLoad {
            trainer,
            pipeline,
            seconds,
            examples,
            stop_file,
        } => train_load(&trainer, &pipeline, seconds, examples, stop_file.as_deref()),
        Command::Decode { pipeline, rows } => decode(&pipeline, rows),
        Command::Drain {
            topic,
            expect,
            group,
        } => drain(&cli.bootstrap, &topic, expect, group.as_deref()),
        Command::Summary {
            output,
            topic,
            dead_letter_topic,
            group,
            elapsed,
        } => summary(
            &cli.bootstrap,
            &output,
            &topic,
            &dead_letter_topic,
            &group,
            elapsed,
        ),
        Command::Predictions { topic, field } => predictions(&cli.bootstrap, &topic, &field),
        Command::Examples { topic, events, out } => examples(&cli.bootstrap, &topic, events, &out),
        Command::WaitCommitted {
            topic,
            group,
            total,
            timeout_secs,
            while_running,
        } => wait_committed(
            &cli.bootstrap,
            &topic,
            &group,
            total,
            Duration::from_secs(timeout_secs),
            while_running,
        ),
    }
}

fn create_topic(bootstrap: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let results = rt.block_on(admin.create_topics(
        &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
    ))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => bail!("creating topic {t}: {e}"),
        }
    }
    Ok(())
}

struct Deliveries {
    failed: AtomicU64,
}
impl ClientContext for Deliveries {}
impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if result.is_err() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

const COUNTRIES: [&str; 8] = ["FR", "DE", "US", "GB", "BR", "JP", "ES", "IT"];
const CURRENCIES: [&str; 5] = ["EUR", "USD", "GBP", "JPY", "BRL"];
const CHANNELS: [&str; 5] = ["web", "ios", "android", "store", "partner"];
const CITIES: [&str; 6] = [
    "Paris",
    "Berlin",
    "New York",
    "London",
    "São Paulo",
    "Tokyo",
];

/// A customer's usual spending, 0.3 to 3 times the catalogue's prices (deterministic), so
/// that an amount can be unusual against the customer's own history.
fn spending(customer: u32) -> f64 {
    let h = u64::from(customer).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
    0.3 + 2.7 * (h as f64 / (1u64 << 24) as f64)
}

/// A burst in progress: a fraudster placing several large orders within seconds on one
/// customer's account (the signal that velocity features reveal).
#[derive(Clone, Copy)]
struct Burst {
    customer: u32,
    left: u32,
}

/// One valid commerce event, and whether it belongs to a burst. Event times advance 100 ms per
/// event.
fn valid_event(
    rng: &mut SmallRng,
    i: u64,
    customers: u32,
    base_ms: i64,
    burst: &mut Option<Burst>,
) -> (String, serde_json::Value, bool) {
    if burst.is_none() && rng.random_bool(0.01) {
        *burst = Some(Burst {
            customer: rng.random_range(0..customers),
            left: rng.random_range(4..9),
        });
    }
    let (number, in_burst) = match burst {
        Some(b) => {
            let c = b.customer;
            b.left -= 1;
            if b.left == 0 {
                *burst = None;
            }
            (c, true)
        }
        None => (rng.random_range(0..customers), false),
    };
    let scale = spending(number) * if in_burst { 5.0 } else { 1.0 };
    let customer = format!("c-{number:06}");
    let kind = match rng.random_range(0..100) {
        0..=54 => "order_placed",
        55..=89 => "payment_captured",
        90..=96 => "payment_failed",
        _ => "refund",
    };
    let c = rng.random_range(0..COUNTRIES.len());
    let at = chrono::DateTime::from_timestamp_millis(base_ms + i as i64 * 100).unwrap_or_default();
    let items: Vec<_> = (0..rng.random_range(1..4))
        .map(|_| {
            json!({"sku": format!("sku-{}", rng.random_range(0..500)),
                   "quantity": rng.random_range(1..5),
                   "unit_price": (rng.random_range(100..20_000) as f64 * scale).round() / 100.0})
        })
        .collect();
    let amount: f64 = items
        .iter()
        .map(|it| it["quantity"].as_f64().unwrap_or(0.0) * it["unit_price"].as_f64().unwrap_or(0.0))
        .sum();
    let event = json!({
        "event_id": format!("e-{i:012}"),
        "event_type": kind,
        "customer_id": customer,
        "order_id": if kind == "order_placed" || rng.random_bool(0.8) { json!(format!("o-{}", i / 2)) } else { json!(null) },
        "amount": (amount * 100.0).round() / 100.0,
        "currency": CURRENCIES[c % CURRENCIES.len()],
        "country": COUNTRIES[c],
        "channel": CHANNELS[rng.random_range(0..CHANNELS.len())],
        "items": items,
        "shipping": {"city": CITIES[c % CITIES.len()], "postcode": format!("{:05}", rng.random_range(0..99_999))},
        "new_customer": rng.random_bool(0.1),
        "customer_since": "2024-03-15",
        "created_at": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "client": {"ip": "203.0.113.7", "agent": "demo"}
    });
    (customer, event, in_burst)
}

/// A broken event and the reason sluice should give for it.
fn broken_event(rng: &mut SmallRng, valid: serde_json::Value) -> (Vec<u8>, &'static str) {
    let text = valid.to_string();
    let mut obj = valid;
    match rng.random_range(0..10) {
        0 => (b"order #1 for c-000001".to_vec(), "invalid_json"),
        1 => (text.as_bytes()[..text.len() / 2].to_vec(), "truncated_json"),
        2 => {
            let mut b = text.into_bytes();
            b.insert(10, 0xff);
            (b, "not_utf8")
        }
        3 => (Vec::new(), "empty"),
        4 => (b"[1,2,3]".to_vec(), "not_object"),
        5 => {
            obj.as_object_mut().map(|o| o.remove("customer_id"));
            (obj.to_string().into_bytes(), "missing_field")
        }
        6 => {
            obj["amount"] = json!("12.50");
            (obj.to_string().into_bytes(), "wrong_type")
        }
        7 => {
            obj["amount"] = json!(-5);
            (obj.to_string().into_bytes(), "out_of_range")
        }
        8 => {
            obj["currency"] = json!("XYZ");
            (obj.to_string().into_bytes(), "not_in_enum")
        }
        _ => {
            obj["created_at"] = json!("21/11/2026 18:00");
            (obj.to_string().into_bytes(), "bad_timestamp")
        }
    }
}

/// Which demo events: the same settings give the same events.
#[derive(Clone, Copy, clap::Args)]
struct Events {
    /// Number of the first event (its id `e-<first>`; event times follow it).
    #[arg(long, default_value_t = 0)]
    first: u64,
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Share of events broken on purpose, in several ways.
    #[arg(long, default_value_t = 0.03)]
    invalid_ratio: f64,
    #[arg(long, default_value_t = 5_000)]
    customers: u32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

impl Events {
    /// The events in order.
    fn iter(self) -> impl Iterator<Item = Generated> {
        let mut rng = SmallRng::seed_from_u64(self.seed);
        let base_ms = 1_795_000_000_000; // 2026-11-18
        let mut burst = None;
        (self.first..self.first + self.count).map(move |i| {
            let (key, event, in_burst) =
                valid_event(&mut rng, i, self.customers, base_ms, &mut burst);
            let (payload, kind) = if rng.random_bool(self.invalid_ratio) {
                broken_event(&mut rng, event.clone())
            } else {
                (event.to_string().into_bytes(), "valid")
            };
            Generated {
                i,
                key,
                payload,
                kind,
                event,
                burst: in_burst,
            }
        })
    }
}

/// One generated event: its number, key, bytes, kind (`valid` or why it is broken), the valid
/// event it came from, and whether it is part of a burst (hidden from the event itself).
struct Generated {
    i: u64,
    key: String,
    payload: Vec<u8>,
    kind: &'static str,
    event: serde_json::Value,
    burst: bool,
}

/// Whether the demo's world makes event `i` a fraud. The rule the shipped model learned
/// (models/fraud.py) has drifted: fraud moved from partners to the iOS app and from Brazil to
/// Germany; the rest (large night-time orders from new customers) still holds. Bursts of
/// orders on one account, at amounts unusual for that customer, are the fraud that only
/// velocity features see.
fn fraud(i: u64, event: &serde_json::Value, burst: bool) -> bool {
    // The amount against the customer's usual spending, which only its history reveals.
    let customer: u32 = event["customer_id"].as_str().unwrap_or("c-0")[2..]
        .parse()
        .unwrap_or(0);
    let amount = event["amount"].as_f64().unwrap_or(0.0) / spending(customer);
    let hour: u32 = event["created_at"].as_str().unwrap_or("")[11..13]
        .parse()
        .unwrap_or(12);
    let logit = -6.5
        + 0.6 * amount.ln_1p()
        + 1.8 * f64::from(u8::from(event["new_customer"] == true))
        + 1.6 * f64::from(u8::from(event["channel"] == "ios"))
        + 1.2 * f64::from(u8::from(event["country"] == "DE"))
        + 1.4 * f64::from(u8::from(hour < 6))
        + 3.0 * f64::from(u8::from(burst));
    let mut rng = SmallRng::seed_from_u64(i ^ 0x9e37_79b9_7f4a_7c15);
    rng.random_bool(1.0 / (1.0 + (-logit).exp()))
}

/// Sends `record`, waiting while the producer's queue is full.
fn send(
    producer: &BaseProducer<Deliveries>,
    mut record: BaseRecord<'_, String, Vec<u8>>,
) -> anyhow::Result<()> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                producer.poll(Duration::from_millis(20));
            }
            Err((e, _)) => bail!("producing: {e}"),
        }
    }
}

fn labels(bootstrap: &str, topic: &str, events: Events, confirm_share: f64) -> anyhow::Result<()> {
    let producer: BaseProducer<Deliveries> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "20")
        .create_with_context(Deliveries {
            failed: AtomicU64::new(0),
        })?;
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let (mut frauds, mut confirmed, mut unlabelled) = (0u64, 0u64, 0u64);
    for g in events.iter() {
        let (i, event) = (g.i, &g.event);
        if g.kind != "valid" {
            continue;
        }
        let label = if fraud(i, event, g.burst) {
            frauds += 1;
            1
        } else if SmallRng::seed_from_u64(i).random_bool(confirm_share) {
            confirmed += 1;
            0
        } else {
            unlabelled += 1;
            continue;
        };
        let id = event["event_id"].as_str().unwrap_or_default().to_owned();
        let payload = json!({"event_id": id, "label": label, "labelled_at": now})
            .to_string()
            .into_bytes();
        send(&producer, BaseRecord::to(topic).key(&id).payload(&payload))?;
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(120))?;
    let failed = producer.context().failed.load(Ordering::Relaxed);
    if failed > 0 {
        bail!("{failed} labels were not delivered");
    }
    println!(
        "{}",
        json!({"topic": topic, "frauds": frauds, "confirmed": confirmed, "unlabelled": unlabelled})
    );
    Ok(())
}

fn generate(bootstrap: &str, topic: &str, events: Events, rate: Option<f64>) -> anyhow::Result<()> {
    let producer: BaseProducer<Deliveries> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("compression.type", "lz4")
        .create_with_context(Deliveries {
            failed: AtomicU64::new(0),
        })?;
    let mut produced: BTreeMap<&str, u64> = BTreeMap::new();
    let count = events.count;
    // At a rate, the events are made first, so that making them takes no CPU from what is
    // measured meanwhile; then each millisecond sends those due by then.
    let made: Vec<Generated> = match rate {
        Some(_) => events.iter().collect(),
        None => Vec::new(),
    };
    let started = Instant::now();
    let mut all: Box<dyn Iterator<Item = Generated>> = match rate {
        Some(_) => Box::new(made.into_iter()),
        None => Box::new(events.iter()),
    };
    let mut sent = 0u64;
    loop {
        let due = match rate {
            Some(rate) => ((started.elapsed().as_secs_f64() * rate) as u64 + 1).min(count),
            None => sent + 1000,
        };
        let mut more = false;
        while sent < due {
            let Some(g) = all.next() else { break };
            more = true;
            *produced.entry(g.kind).or_default() += 1;
            send(
                &producer,
                BaseRecord::to(topic).key(&g.key).payload(&g.payload),
            )?;
            sent += 1;
        }
        if !more && sent >= count {
            break;
        }
        producer.poll(Duration::ZERO);
        if rate.is_some() {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    producer.flush(Duration::from_secs(120))?;
    let failed = producer.context().failed.load(Ordering::Relaxed);
    if failed > 0 {
        bail!("{failed} events were not delivered");
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"topic": topic, "count": count, "by_kind": produced, "seconds": secs,
                          "events_per_second": count as f64 / secs})
    );
    Ok(())
}

fn high_watermarks(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<Vec<(i32, i64, i64)>> {
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(30))?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .context("topic not found")?;
    let mut out = Vec::new();
    for p in t.partitions() {
        let (lo, hi) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(30))?;
        out.push((p.id(), lo, hi));
    }
    out.sort();
    Ok(out)
}

fn drain(
    bootstrap: &str,
    topic: &str,
    expect: Option<u64>,
    group: Option<&str>,
) -> anyhow::Result<()> {
    let own_group = format!("sluice-bench-drain-{}", std::process::id());
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group.unwrap_or(&own_group))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    let marks = high_watermarks(&consumer, topic)?;
    let total: u64 =
        expect.unwrap_or_else(|| marks.iter().map(|(_, lo, hi)| (hi - lo) as u64).sum());
    if group.is_some() {
        consumer.subscribe(&[topic])?;
    } else {
        let mut tpl = TopicPartitionList::new();
        for (p, _, _) in &marks {
            tpl.add_partition_offset(topic, *p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
    }
    let (mut n, mut bytes) = (0u64, 0u64);
    let started = Instant::now();
    let mut last = started;
    while n < total {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                n += 1;
                bytes += m.payload_len() as u64;
                last = Instant::now();
            }
            Some(Err(e)) => bail!("consume error: {e}"),
            // None: a timeout, or a rebalance served inside poll. Joining a group may take a
            // while; after the first message, 10 s of silence is an error.
            None => {
                let patience = Duration::from_secs(if n == 0 { 120 } else { 10 });
                if last.elapsed() > patience {
                    bail!("no message for {patience:?} after {n} of {total}");
                }
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    if group.is_some() {
        consumer.commit_consumer_state(CommitMode::Sync)?;
    }
    println!(
        "{}",
        json!({"topic": topic, "messages": n, "bytes": bytes, "seconds": secs,
                          "events_per_second": n as f64 / secs})
    );
    Ok(())
}

fn group_reader(bootstrap: &str, group: &str) -> anyhow::Result<BaseConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .create()?)
}

/// Each partition's end offset and the group's committed offset.
fn committed(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<Vec<(i32, i64, Option<i64>)>> {
    let marks = high_watermarks(consumer, topic)?;
    let mut tpl = TopicPartitionList::new();
    for (p, _, _) in &marks {
        tpl.add_partition(topic, *p);
    }
    let c = consumer.committed_offsets(tpl, Duration::from_secs(30))?;
    Ok(marks
        .iter()
        .map(|(p, _, hi)| {
            let at = c.find_partition(topic, *p).and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
            (*p, *hi, at)
        })
        .collect())
}

fn wait_committed(
    bootstrap: &str,
    topic: &str,
    group: &str,
    total: Option<i64>,
    timeout: Duration,
    while_running: Option<u32>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    // One client for the whole wait: the benchmark measures sluice, not this loop.
    let consumer = group_reader(bootstrap, group)?;
    loop {
        let c = committed(&consumer, topic)?;
        let done = match total {
            Some(total) => c.iter().map(|(_, _, at)| at.unwrap_or(0)).sum::<i64>() >= total,
            None => c.iter().all(|(_, hi, at)| *at == Some(*hi)),
        };
        if done {
            return Ok(());
        }
        if started.elapsed() > timeout {
            bail!("not everything committed after {timeout:?}: {c:?}");
        }
        if let Some(pid) = while_running.filter(|p| !Path::new(&format!("/proc/{p}")).exists()) {
            bail!("process {pid} exited before committing everything: {c:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `rows` demo payloads, a share `invalid_ratio` of them broken, always the same ones.
fn demo_payloads(rows: usize, invalid_ratio: f64) -> Vec<Vec<u8>> {
    let mut rng = SmallRng::seed_from_u64(7);
    let mut burst = None;
    (0..rows)
        .map(|i| {
            let (_, event, _) =
                valid_event(&mut rng, i as u64, 5_000, 1_795_000_000_000, &mut burst);
            if invalid_ratio > 0.0 && rng.random_bool(invalid_ratio) {
                broken_event(&mut rng, event).0
            } else {
                event.to_string().into_bytes()
            }
        })
        .collect()
}

fn decode(pipeline: &Path, rows: usize) -> anyhow::Result<()> {
    use sluice::decode::{Decoder, Limits, Origin};
    let spec = sluice::config::load(pipeline)?;
    let payloads = demo_payloads(rows, 0.03);
    let bytes: usize = payloads.iter().map(Vec::len).sum();
    let mut decoder = Decoder::new(spec.schema.clone(), Limits::from(&spec.errors));
    let (mut valid, mut batches) = (0usize, 0usize);
    let started = Instant::now();
    for (i, payload) in payloads.iter().enumerate() {
        let origin = Origin {
            topic: "bench",
            partition: 0,
            offset: i as i64,
            timestamp: Some(1_795_000_000_000),
        };
        valid += usize::from(decoder.push(origin, Some(payload)).is_ok());
        if decoder.rows() == 10_000 {
            batches += decoder.finish().num_rows().min(1);
        }
    }
    batches += decoder.finish().num_rows().min(1);
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"events": rows, "valid": valid, "batches": batches, "bytes": bytes,
               "seconds": secs, "events_per_second": rows as f64 / secs,
               "us_per_event": secs * 1e6 / rows as f64,
               "mb_per_second": bytes as f64 / secs / 1e6})
    );
    Ok(())
}

fn train_load(
    trainer: &std::path::Path,
    pipeline: &std::path::Path,
    seconds: u64,
    n: usize,
    stop_file: Option<&Path>,
) -> anyhow::Result<()> {
    let spec = sluice::config::load(trainer)?
        .train
        .context("not a trainer file ([train])")?;
    tch::set_num_threads(spec.threads as i32);
    let width = sluice::config::load(pipeline)?
        .models
        .first()
        .context("the pipeline has no [[model]]")?
        .features();
    let (_, base) = sluice::train::repository::open(&spec.repository)
        .and_then(|r| sluice::train::repository::serving(&r))
        .map_err(anyhow::Error::msg)?;
    let mut rng = SmallRng::seed_from_u64(7);
    let examples: Vec<sluice::event::Example> = (0..n)
        .map(|i| sluice::event::Example {
            event_id: format!("x-{i}"),
            model: spec.model.clone(),
            model_version: "1".into(),
            features: (0..width).map(|_| rng.random::<f64>()).collect(),
            outputs: vec![0.5],
            label: f64::from(u8::from(rng.random::<f64>() < 0.1)),
            labelled: true,
            scored_at: i as i64,
            labelled_at: None,
        })
        .collect();
    let refs: Vec<&sluice::event::Example> = examples.iter().collect();
    let out = std::env::temp_dir().join(format!("sluice-train-load-{}.pt", std::process::id()));
    let started = Instant::now();
    let (mut rounds, mut trained) = (0usize, 0usize);
    while started.elapsed() < Duration::from_secs(seconds) && !stop_file.is_some_and(Path::exists) {
        let t = sluice::train::round::fine_tune(&base, &out, &refs, &spec)
            .map_err(anyhow::Error::msg)?;
        rounds += 1;
        trained += t.examples * t.epochs;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&out);
    println!(
        "{}",
        serde_json::json!({
            "rounds": rounds, "examples_trained": trained, "seconds": elapsed,
            "examples_per_second": trained as f64 / elapsed,
        })
    );
    Ok(())
}

fn score(pipeline: &std::path::Path, rows: usize) -> anyhow::Result<()> {
    use sluice::{
        decode::{Decoder, Limits, Origin},
        score::{
            features::FeatureEncoder,
            runtime::{Runtime, RuntimeSpec},
        },
    };
    let spec = sluice::config::load(pipeline)?;
    let model = spec
        .models
        .first()
        .context("the pipeline has no [[model]]")?;
    tch::set_num_threads(model.intra_op_threads as i32);
    let loaded = sluice::score::load_newest(model).map_err(anyhow::Error::msg)?;
    let device = format!("{:?}", loaded.device);
    let version = loaded.version.clone();
    // Demo events, decoded into Arrow batches of 10,000 rows as the pipeline would.
    let mut decoder = Decoder::new(spec.schema.clone(), Limits::from(&spec.errors));
    let mut batches = Vec::new();
    for (i, payload) in demo_payloads(rows, 0.0).iter().enumerate() {
        let origin = Origin {
            topic: "bench",
            partition: 0,
            offset: i as i64,
            timestamp: None,
        };
        decoder
            .push(origin, Some(payload))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if decoder.rows() == 10_000 {
            batches.push(decoder.finish());
        }
    }
    if decoder.rows() > 0 {
        batches.push(decoder.finish());
    }
    let encoder = FeatureEncoder::new(&model.inputs);
    let runtime = Runtime::start(RuntimeSpec::from(model), loaded);
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let started = Instant::now();
    let width = model.output.width();
    let scored = rt.block_on(async {
        let mut answers = tokio::task::JoinSet::new();
        for b in &batches {
            let encoded = encoder.encode(b);
            let n = encoded.rows.len();
            let segments = [(sluice::score::versions::Slot::Stable, n)];
            let (permit, replies) = runtime
                .submit(std::sync::Arc::new(encoded.values), n, &segments)
                .await;
            answers.spawn(async move {
                let mut scored = 0;
                for r in replies {
                    let r = r.await.expect("answered");
                    scored += r.outputs.len() / width - r.failed.len();
                }
                drop(permit);
                scored
            });
        }
        let mut scored = 0usize;
        while let Some(n) = answers.join_next().await {
            scored += n.expect("no panic");
        }
        scored
    });
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"model": model.name, "version": &*version, "device": device,
               "rows": scored, "max_batch": model.max_batch, "threads": model.threads,
               "intra_op_threads": model.intra_op_threads, "seconds": secs,
               "rows_per_second": scored as f64 / secs})
    );
    Ok(())
}

/// Reads a whole topic until it is quiet for 3 s, handing each message to `each`.
/// Every JSON value in a topic, from the beginning (other payloads are skipped).
fn read_json(
    bootstrap: &str,
    topic: &str,
    mut each: impl FnMut(serde_json::Value),
) -> anyhow::Result<()> {
    read_topic(bootstrap, topic, |m| {
        if let Some(v) = m
            .payload()
            .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
        {
            each(v);
        }
    })
}

fn read_topic(
    bootstrap: &str,
    topic: &str,
    mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
) -> anyhow::Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set(
            "group.id",
            format!("sluice-bench-reader-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .create()?;
    let marks = high_watermarks(&consumer, topic).unwrap_or_default();
    let mut tpl = TopicPartitionList::new();
    for (p, _, _) in &marks {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    loop {
        match consumer.poll(Duration::from_secs(3)) {
            Some(Ok(m)) => each(&m),
            Some(Err(e)) => bail!("reading {topic}: {e}"),
            None => return Ok(()),
        }
    }
}

fn examples(bootstrap: &str, topic: &str, events: Events, out: &Path) -> anyhow::Result<()> {
    let truth: HashMap<String, (u64, bool)> = events
        .iter()
        .filter(|g| g.kind == "valid")
        .map(|g| {
            let id = g.event["event_id"].as_str().unwrap_or_default().to_owned();
            (id, (g.i, fraud(g.i, &g.event, g.burst)))
        })
        .collect();
    let mut rows: BTreeMap<u64, String> = BTreeMap::new();
    read_json(bootstrap, topic, |v| {
        if let Some((i, label)) = v["event_id"].as_str().and_then(|id| truth.get(id)) {
            let line = json!({"event_id": v["event_id"], "features": v["features"],
                              "label": u8::from(*label)});
            rows.insert(*i, line.to_string());
        }
    })?;
    let mut text = String::new();
    for line in rows.values() {
        text.push_str(line);
        text.push('\n');
    }
    std::fs::write(out, text)?;
    println!("{}", json!({"examples": rows.len(), "out": out}));
    Ok(())
}

fn predictions(bootstrap: &str, topic: &str, field: &str) -> anyhow::Result<()> {
    // Per version: predictions, sum of the field, how many at 0.5 or more.
    let mut versions: BTreeMap<String, (u64, f64, u64)> = BTreeMap::new();
    let mut buckets = [0u64; 10];
    let mut example = None;
    let mut n = 0u64;
    read_json(bootstrap, topic, |v| {
        n += 1;
        let version = v["model_version"].as_str().unwrap_or("?").to_owned();
        let entry = versions.entry(version).or_default();
        entry.0 += 1;
        if let Some(score) = v["outputs"][field].as_f64() {
            buckets[((score * 10.0) as usize).min(9)] += 1;
            entry.1 += score;
            entry.2 += u64::from(score >= 0.5);
        }
        example.get_or_insert(v);
    })?;
    println!("predictions in {topic}: {n}");
    for (v, (count, sum, high)) in &versions {
        println!(
            "    model version {v}: {count}, mean {field} {:.4}, {:.2}% at 0.5 or more",
            sum / *count as f64,
            100.0 * *high as f64 / *count as f64
        );
    }
    println!("distribution of outputs.{field}:");
    let max = buckets.iter().copied().max().unwrap_or(1).max(1);
    for (i, count) in buckets.iter().enumerate() {
        println!(
            "    {:.1}-{:.1} {:>8} {}",
            i as f64 / 10.0,
            (i + 1) as f64 / 10.0,
            count,
            "#".repeat((count * 40).div_ceil(max) as usize)
        );
    }
    if let Some(e) = example {
        println!("one prediction: {e}");
    }
    Ok(())
}

fn summary(
    bootstrap: &str,
    output: &std::path::Path,
    topic: &str,
    dlq: &str,
    group: &str,
    elapsed: Option<f64>,
) -> anyhow::Result<()> {
    let mut files = Vec::new();
    let mut stack = vec![output.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let p = e?.path();
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if p.is_dir() && !name.starts_with('_') {
                stack.push(p);
            } else if name.ends_with(".parquet") {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut rows = 0usize;
    let mut bytes = 0u64;
    for f in &files {
        let file = std::fs::File::open(f)?;
        bytes += file.metadata()?.len();
        let reader = parquet::file::reader::SerializedFileReader::new(file)?;
        use parquet::file::reader::FileReader;
        rows += reader.metadata().file_metadata().num_rows() as usize;
    }
    // Dead letters by reason.
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    read_topic(bootstrap, dlq, |m| {
        let header = |key: &str| {
            m.headers()
                .and_then(|h| h.iter().find(|h| h.key == key))
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_else(|| "?".into())
        };
        let reason = format!("{}/{}", header("sluice.stage"), header("sluice.reason"));
        *reasons.entry(reason).or_default() += 1;
    })?;
    let offsets = committed(&group_reader(bootstrap, group)?, topic)?;
    let events: i64 = offsets.iter().map(|(_, _, at)| at.unwrap_or(0)).sum();
    println!("events committed:      {events}");
    println!("rows in Parquet:       {rows}");
    println!(
        "Parquet files:         {} ({:.1} MiB)",
        files.len(),
        bytes as f64 / (1 << 20) as f64
    );
    for f in files.iter().take(5) {
        println!("    {}", f.display());
    }
    if files.len() > 5 {
        println!("    ... and {} more", files.len() - 5);
    }
    println!("dead letters:          {}", reasons.values().sum::<u64>());
    for (r, n) in &reasons {
        println!("    {r:<28} {n}");
    }
    for (p, _, at) in &offsets {
        println!(
            "partition {p}: committed offset {}",
            at.map_or("none".into(), |a| a.to_string())
        );
    }
    if let Some(secs) = elapsed {
        println!(
            "elapsed:               {secs:.1} s ({:.0} events/s)",
            events as f64 / secs
        );
    }
    Ok(())
}
