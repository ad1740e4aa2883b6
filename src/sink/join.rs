//! The label join: a model's feedback records (features as fed, outputs, version) and the
//! labels that arrive minutes to days later, joined by event id into training examples.
//!
//! **State.** One Redis hash per event, `sluice:join:{<model>:<shard>}:e:<event id>`, holds
//! what has arrived (the feedback, the label, the position of each record) and the decision,
//! once taken; a sorted set per shard, `sluice:join:{<model>:<shard>}:due`, holds the
//! deadlines of undecided events. The braces make a shard one hash slot, so on a cluster each
//! script stays on one node and the shards spread over the nodes. Every instance of the
//! pipeline shares this state, whichever partitions it owns.
//!
//! **One decision per event.** Each record runs one script ([`RECORD`]) that looks at the
//! stored state and decides atomically:
//! - feedback first: stored, with the deadline max(scored at + `maturity`, now + `grace`);
//! - its label then: the event is *joined*: an example with the label is produced;
//! - a label first: it waits (its bytes kept) until now + `grace` for its feedback;
//! - a second label for an event (another record, not a replay): a dead letter
//!   `duplicate_label`; a label after the window was closed: `late_label`;
//! - a label whose feedback never came: at the deadline, a dead letter `unknown_event` with
//!   the label's original key and bytes;
//! - at the deadline of feedback without a label: an example with `default_label`, or
//!   nothing (`unlabelled = "drop"`).
//!
//! **Replays.** The record that decided is stored with the decision; when it is consumed
//! again (a crash before its offset was committed), the script answers with the same example,
//! which is produced again: examples are produced at least once, identical, keyed by event id,
//! and a reader (the trainer) keeps one per event id. Any other record of a decided event
//! changes nothing. Feedback older than `maturity + remember` is skipped (its decision may be
//! forgotten already) and counted.
//!
//! **Durability.** `write` returns once Redis has every record's outcome and the broker has
//! acknowledged every example: the runner commits the offsets after that. Deadlines are
//! handled by a sweeper task on every instance: a script claims due events with a lease
//! (their deadline moved `LEASE` ahead), the examples and dead letters are produced, and only
//! then are the events taken off the deadlines; an instance that dies in between leaves the
//! lease to expire, and another one produces the same records again.
//!
//! **Failures.** Redis unreachable: retried with backoff (readiness 503, a metric, a log
//! line), nothing committed meanwhile; a record whose script Redis refuses (a key of another
//! type): a dead letter of stage `redis`; examples that cannot be produced (topic gone,
//! refused): the pipeline fails.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use arrow::{
    array::{Array, AsArray},
    datatypes::{Float64Type, TimestampMicrosecondType, TimestampMillisecondType},
    record_batch::RecordBatch,
};
use rdkafka::message::{Header, OwnedHeaders};
use redis::{RedisError, Script, Value};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

use super::{
    dead_letter::DeadLetters,
    headers,
    predictions::{Predictions, Record},
    redis::{connect, Connection, RedisSinkError},
    Refusal, Sink, SinkError,
};
use crate::{
    config::{JoinSpec, Unlabelled},
    event::{Example, Failure, Originals, Rejected},
    failure::{self, Class, GaveUp, Retrying},
};

/// One record's part in the join. KEYS: the event's hash, its shard's deadlines. ARGV: kind
/// (`f` feedback, `l` label), the record's position, the event id, the deadline (ms) if it
/// waits, the hash's TTL (s); feedback: version, features, outputs, scored at (ms); label:
/// label, labelled at, original key (`k` + bytes, or empty), original payload, timestamp.
/// Answers `{status, version, features, outputs, scored at, label, labelled at}`.
const RECORD: &str = r#"
local h, due = KEYS[1], KEYS[2]
local kind, pos, id = ARGV[1], ARGV[2], ARGV[3]
local e = redis.call('HMGET', h, 'fs', 'ls', 'd', 'ds')
local function example(status)
  local x = redis.call('HMGET', h, 'v', 'x', 'y', 't', 'l', 'la')
  return {status, x[1], x[2], x[3], x[4], x[5], x[6] or ''}
end
if kind == 'f' then
  if e[1] then
    if e[3] == 'joined' and e[4] == pos then return example('replayed') end
    if e[1] == pos then return {'replayed'} end
    return {'duplicate'}
  end
  redis.call('HSET', h, 'fs', pos, 'v', ARGV[6], 'x', ARGV[7], 'y', ARGV[8], 't', ARGV[9])
  redis.call('EXPIRE', h, ARGV[5])
  if e[2] and not e[3] then
    redis.call('HSET', h, 'd', 'joined', 'ds', pos)
    redis.call('HDEL', h, 'lk', 'lp', 'lt')
    redis.call('ZREM', due, id)
    return example('joined')
  end
  redis.call('ZADD', due, ARGV[4], id)
  return {'stored'}
end
if e[2] then
  if e[3] == 'joined' and e[4] == pos then return example('replayed') end
  if e[2] == pos then return {'replayed'} end
  return {'duplicate', e[3] or 'waiting'}
end
if e[1] then
  if e[3] then return {'late', e[3]} end
  redis.call('HSET', h, 'ls', pos, 'l', ARGV[6], 'la', ARGV[7], 'd', 'joined', 'ds', pos)
  redis.call('ZREM', due, id)
  return example('joined')
end
redis.call('HSET', h, 'ls', pos, 'l', ARGV[6], 'la', ARGV[7], 'lk', ARGV[8], 'lp', ARGV[9],
  'lt', ARGV[10])
redis.call('EXPIRE', h, ARGV[5])
redis.call('ZADD', due, ARGV[4], id)
return {'waiting'}
"#;

/// Claims the due events of one shard. KEYS: the deadlines. ARGV: now (ms), lease (ms), at
/// most how many, the prefix of the events' hashes, the decision for feedback without a
/// label (`default` or `dropped`). Answers one `{id, decision, version, features, outputs,
/// scored at, label position, label key, label payload, label timestamp}` per claimed event.
const SWEEP: &str = r#"
local now = tonumber(ARGV[1])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  local h = ARGV[4] .. id
  local e = redis.call('HMGET', h, 'fs', 'ls', 'd', 'v', 'x', 'y', 't', 'lk', 'lp', 'lt')
  if (not e[1] and not e[2]) or e[3] == 'joined' then
    redis.call('ZREM', KEYS[1], id)
  else
    local d = e[3]
    if not d then
      if e[1] then d = ARGV[5] else d = 'unknown' end
      redis.call('HSET', h, 'd', d, 'ds', 'sweep')
    end
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), id)
    out[#out + 1] = {id, d, e[4] or '', e[5] or '', e[6] or '', e[7] or '', e[2] or '',
      e[8] or '', e[9] or '', e[10] or ''}
  end
end
return out
"#;

/// Ends a claimed event once its records are acknowledged. KEYS: the deadlines, the event's
/// hash. ARGV: the event id, the decision. A label found unknown is forgotten, unless its
/// feedback arrived meanwhile: then the feedback waits for its own deadline.
const FINISH: &str = r#"
if ARGV[2] == 'unknown' then
  if redis.call('HEXISTS', KEYS[2], 'fs') == 1 then
    redis.call('HDEL', KEYS[2], 'ls', 'l', 'la', 'lk', 'lp', 'lt', 'd', 'ds')
    return 0
  end
  redis.call('DEL', KEYS[2])
end
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
"#;

/// How long a claimed event is left to the instance that claimed it.
const LEASE: Duration = Duration::from_secs(60);
/// Events claimed per script run.
const SWEEP_LIMIT: usize = 500;
/// Scripts per pipeline (on one server).
const PIPELINE_SIZE: usize = 500;

/// The key prefix of one shard, e.g. `sluice:join:{fraud:3}:`.
fn shard_prefix(model: &str, shard: u32) -> String {
    format!("sluice:join:{{{model}:{shard}}}:")
}

/// The shard of an event id (FNV-1a: stable across versions and machines).
fn shard_of(id: &str, shards: u32) -> u32 {
    crate::util::hash::fnv1a(id.as_bytes()) % shards
}

/// `topic/partition/offset` (topic names have no `/`).
fn position(topic: &str, partition: i32, offset: i64) -> String {
    format!("{topic}/{partition}/{offset}")
}

fn parse_position(pos: &str) -> Option<(&str, i32, i64)> {
    let mut parts = pos.rsplitn(3, '/');
    let offset = parts.next()?.parse().ok()?;
    let partition = parts.next()?.parse().ok()?;
    Some((parts.next()?, partition, offset))
}

/// The stored fields an example is made of, as the scripts return them.
struct Stored {
    version: String,
    features: String,
    outputs: String,
    scored_at: String,
}

impl Stored {
    fn example(
        &self,
        spec: &JoinSpec,
        id: &str,
        label: Option<(f64, Option<String>)>,
    ) -> Option<Example> {
        let (label, labelled, labelled_at) = match label {
            Some((l, at)) => (l, true, at),
            None => match spec.unlabelled {
                Unlabelled::Default(l) => (l, false, None),
                Unlabelled::Drop => return None,
            },
        };
        Some(Example {
            event_id: id.to_owned(),
            model: spec.model.clone(),
            model_version: self.version.clone(),
            features: serde_json::from_str(&self.features).ok()?,
            outputs: serde_json::from_str(&self.outputs).ok()?,
            label,
            labelled,
            scored_at: self.scored_at.parse().ok()?,
            labelled_at,
        })
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        _ => String::new(),
    }
}

fn bytes(v: &Value) -> Vec<u8> {
    match v {
        Value::BulkString(b) => b.clone(),
        other => text(other).into_bytes(),
    }
}

fn items(v: &Value) -> &[Value] {
    match v {
        Value::Array(items) => items,
        _ => &[],
    }
}

/// One record's script run, built from a row.
struct Invocation {
    row: usize,
    key: String,
    args: Vec<Vec<u8>>,
}

/// A record the join cannot use: a dead letter of stage `join`.
fn refusal(row: usize, reason: &'static str, error: String) -> Refusal {
    Refusal {
        row,
        failure: Failure::Join { reason, error },
    }
}

/// Counts of what the join did, by kind and result (`sluice_join_records_total`).
fn count(pipeline: &str, kind: &'static str, result: &'static str) {
    metrics::counter!("sluice_join_records_total", "pipeline" => pipeline.to_owned(),
        "kind" => kind, "result" => result)
    .increment(1);
}

/// Redis, the scripts and the producers, shared by the sink and its sweeper.
struct Shared {
    pipeline: Arc<str>,
    spec: JoinSpec,
    conn: Connection,
    record: Script,
    sweep: Script,
    finish: Script,
    examples: Predictions,
    dead_letters: DeadLetters,
    healthy: Arc<AtomicBool>,
}

impl Shared {
    fn example_record(&self, example: &Example) -> Record {
        let mut hs = OwnedHeaders::new_with_capacity(3);
        for (key, value) in [
            (headers::PIPELINE, &*self.pipeline),
            (headers::MODEL, example.model.as_str()),
            (headers::MODEL_VERSION, example.model_version.as_str()),
        ] {
            hs = hs.insert(Header {
                key,
                value: Some(value),
            });
        }
        Record {
            topic: Arc::from(self.spec.examples_topic.as_str()),
            key: example.event_id.clone().into_bytes(),
            payload: serde_json::to_vec(example).expect("serializable"),
            headers: hs,
            timestamp: Some(example.scored_at),
        }
    }

    /// Runs `calls` in order, in pipelines, retrying transient failures; one reply per call, a
    /// per-record refusal as an `Err`.
    async fn run(
        &self,
        calls: &[Call<'_>],
        cancel: &CancellationToken,
    ) -> Result<Vec<Result<Value, RedisError>>, GaveUp<RedisError>> {
        // A cluster routes each command by its key's slot: there, every script goes alone.
        let (chunk, window) = if self.spec.redis.cluster {
            (1, 256)
        } else {
            (PIPELINE_SIZE, 4)
        };
        let chunks: Vec<&[Call<'_>]> = calls.chunks(chunk).collect();
        let mut out = Vec::with_capacity(calls.len());
        for group in chunks.chunks(window) {
            let mut sends = Vec::with_capacity(group.len());
            for c in group {
                sends.push(self.send(c, cancel));
            }
            for r in futures::future::join_all(sends).await {
                out.extend(r?);
            }
        }
        Ok(out)
    }

    /// One pipeline, until Redis has answered every command.
    async fn send(
        &self,
        chunk: &[Call<'_>],
        cancel: &CancellationToken,
    ) -> Result<Vec<Result<Value, RedisError>>, GaveUp<RedisError>> {
        let who = Retrying {
            pipeline: &self.pipeline,
            metric: "sluice_join_redis_retries_total",
            what: "Join state update",
            healthy: Some(&self.healthy),
        };
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for (script, keys, args) in chunk {
            let mut call = script.prepare_invoke();
            for k in keys {
                call.key(k);
            }
            for a in args {
                call.arg(a.as_slice());
            }
            pipe.invoke_script(&call);
        }
        let retried = AtomicBool::new(false);
        let (pipe, retried) = (&pipe, &retried);
        failure::retry(&who, cancel, failure::redis, || async move {
            let mut conn = self.conn.clone();
            if retried.swap(true, Ordering::Relaxed) {
                // After a restart the server has forgotten the scripts.
                for s in [&self.record, &self.sweep, &self.finish] {
                    let _ = conn.load(s).await;
                }
            }
            let replies = conn.query::<Vec<redis::RedisResult<Value>>>(pipe).await?;
            // A transient error on one command: the whole pipeline again (each script is a
            // no-op the second time, or gives the same answer).
            if let Some(Err(e)) = replies
                .iter()
                .find(|r| matches!(r, Err(e) if failure::redis(e) != Class::PerRecord))
            {
                return Err(e.clone());
            }
            Ok(replies)
        })
        .await
    }
}

/// One script run: the script, its keys, its arguments.
type Call<'a> = (&'a Script, Vec<String>, Vec<Vec<u8>>);

/// The join's sink: every batch's records through [`RECORD`], the examples they decide
/// produced before `write` returns.
pub struct JoinSink {
    shared: Arc<Shared>,
    /// Why the sweeper stopped, if it failed.
    sweeper_failed: Arc<Mutex<Option<String>>>,
    stop: CancellationToken,
}

impl Drop for JoinSink {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Why the join cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Redis(#[from] RedisSinkError),
    #[error("Redis refuses the join's scripts ({0}); check the user's ACL and credentials")]
    Fatal(#[source] RedisError),
    #[error(transparent)]
    Examples(#[from] super::predictions::PredictionError),
    #[error(transparent)]
    DeadLetter(#[from] super::dead_letter::DeadLetterError),
    #[error("the sweeper of matured events stopped: {0}")]
    Sweeper(String),
    #[error("creating the examples producer")]
    Producer(#[source] rdkafka::error::KafkaError),
    #[error(transparent)]
    Topic(#[from] super::TopicError),
}

impl JoinSink {
    /// Connects to Redis, loads the scripts, checks the examples topic and starts the sweeper.
    pub async fn open(
        pipeline: &str,
        bootstrap: &str,
        spec: &JoinSpec,
        dead_letters: DeadLetters,
        healthy: Arc<AtomicBool>,
    ) -> Result<Self, JoinError> {
        let mut conn = connect(&spec.redis).await?;
        let (record, sweep, finish) =
            (Script::new(RECORD), Script::new(SWEEP), Script::new(FINISH));
        for s in [&record, &sweep, &finish] {
            conn.load(s)
                .await
                .map_err(|source| RedisSinkError::Connect {
                    url: spec.redis.shown(),
                    source,
                })?;
        }
        let examples = Predictions::new(pipeline, bootstrap, &spec.producer_properties)
            .map_err(JoinError::Producer)?;
        examples.check_topic(&spec.examples_topic).await?;
        healthy.store(true, Ordering::Release);
        info!(url = %spec.redis.shown(), model = %spec.model, maturity = ?spec.maturity,
              "Join state in Redis.");
        let shared = Arc::new(Shared {
            pipeline: Arc::from(pipeline),
            spec: spec.clone(),
            conn,
            record,
            sweep,
            finish,
            examples,
            dead_letters,
            healthy,
        });
        let stop = CancellationToken::new();
        let sweeper_failed = Arc::new(Mutex::new(None));
        tokio::spawn(sweeper(
            shared.clone(),
            stop.clone(),
            sweeper_failed.clone(),
        ));
        Ok(Self {
            shared,
            sweeper_failed,
            stop,
        })
    }

    /// The script run of each row, or why the row cannot be joined.
    fn invocations(
        &self,
        rows: &RecordBatch,
        originals: Option<&Originals>,
    ) -> (Vec<Invocation>, Vec<Refusal>) {
        let spec = &self.shared.spec;
        let pipeline = &self.shared.pipeline;
        let now = chrono::Utc::now().timestamp_millis();
        let (maturity, grace, remember) = (
            spec.maturity.as_millis() as i64,
            spec.grace.as_millis() as i64,
            spec.remember.as_millis() as i64,
        );
        let (topics, partitions, offsets) = crate::schema::provenance(rows);
        let column = |name| rows.column_by_name(name).expect("the built-in join schema");
        let ids = column("event_id").as_string::<i32>();
        let versions = column("model_version").as_string::<i32>();
        let features = column("features").as_list::<i32>();
        let outputs = column("outputs").as_list::<i32>();
        let labels = column("label").as_primitive::<Float64Type>();
        let labelled_at = column("labelled_at").as_primitive::<TimestampMicrosecondType>();
        let timestamps = column("_timestamp").as_primitive::<TimestampMillisecondType>();
        let numbers = |list: &arrow::array::ListArray, row: usize| -> Option<String> {
            if list.is_null(row) {
                return None;
            }
            let values = list.value(row);
            let values = values.as_primitive::<Float64Type>();
            (values.null_count() == 0 && values.values().iter().all(|v| v.is_finite()))
                .then(|| serde_json::to_string(values.values().as_ref()).expect("numbers"))
        };
        let (mut calls, mut refused) = (Vec::new(), Vec::new());
        for row in 0..rows.num_rows() {
            let (topic, partition, offset) =
                (topics.value(row), partitions.value(row), offsets.value(row));
            let id = ids.value(row);
            let shard = shard_prefix(&spec.model, shard_of(id, spec.shards));
            let pos = position(topic, partition, offset);
            let ts = timestamps.is_valid(row).then(|| timestamps.value(row));
            let mut args: Vec<Vec<u8>> = Vec::with_capacity(11);
            // The arguments every record has: kind, position, id, deadline, TTL (s).
            let head = |args: &mut Vec<Vec<u8>>, kind: &str, deadline: i64, keep_ms: i64| {
                args.extend([
                    kind.as_bytes().to_vec(),
                    pos.as_bytes().to_vec(),
                    id.as_bytes().to_vec(),
                    deadline.to_string().into_bytes(),
                    (keep_ms / 1000 + 1).to_string().into_bytes(),
                ]);
            };
            if topic == spec.feedback_topic {
                let (Some(x), Some(y)) = (numbers(features, row), numbers(outputs, row)) else {
                    refused.push(refusal(
                        row,
                        "not_feedback",
                        "a feedback record needs `features` and `outputs` (finite numbers)".into(),
                    ));
                    continue;
                };
                if versions.is_null(row) {
                    refused.push(refusal(
                        row,
                        "not_feedback",
                        "a feedback record needs `model_version`".into(),
                    ));
                    continue;
                }
                let scored_at = ts.unwrap_or(now);
                if scored_at + maturity + remember < now {
                    // Its decision may be forgotten already: joining it again could count it
                    // twice.
                    count(pipeline, "feedback", "expired");
                    debug!(%id, topic, partition, offset, "Feedback older than maturity + remember skipped.");
                    continue;
                }
                let deadline = (scored_at + maturity).max(now + grace);
                head(&mut args, "f", deadline, deadline - now + remember);
                args.extend([
                    versions.value(row).as_bytes().to_vec(),
                    x.into_bytes(),
                    y.into_bytes(),
                    scored_at.to_string().into_bytes(),
                ]);
            } else {
                if labels.is_null(row) || !labels.value(row).is_finite() {
                    refused.push(refusal(
                        row,
                        "no_label",
                        "a label record needs `label` (a finite number)".into(),
                    ));
                    continue;
                }
                let original = originals.and_then(|o| o.message(topic, partition, offset));
                let (key, payload) = original.unwrap_or_default();
                let at = labelled_at
                    .is_valid(row)
                    .then(|| {
                        chrono::DateTime::from_timestamp_micros(labelled_at.value(row))
                            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
                    })
                    .flatten()
                    .unwrap_or_default();
                head(&mut args, "l", now + grace, grace + remember);
                args.extend([
                    labels.value(row).to_string().into_bytes(),
                    at.into_bytes(),
                    key.map_or_else(Vec::new, |k| [b"k".as_slice(), &k].concat()),
                    payload.unwrap_or_default(),
                    ts.map(|t| t.to_string()).unwrap_or_default().into_bytes(),
                ]);
            }
            calls.push(Invocation {
                row,
                key: format!("{shard}e:{id}"),
                args: {
                    let mut a = args;
                    a.insert(0, format!("{shard}due").into_bytes());
                    a
                },
            });
        }
        (calls, refused)
    }

    async fn write(
        &mut self,
        rows: &RecordBatch,
        originals: Option<&Originals>,
        cancel: &CancellationToken,
    ) -> Result<Vec<Refusal>, JoinError> {
        let shared = &self.shared;
        let (invocations, mut refused) = self.invocations(rows, originals);
        let calls: Vec<Call<'_>> = invocations
            .iter()
            .map(|inv| {
                let due = String::from_utf8(inv.args[0].clone()).expect("a key");
                (
                    &shared.record,
                    vec![inv.key.clone(), due],
                    inv.args[1..].to_vec(),
                )
            })
            .collect();
        let replies = match shared.run(&calls, cancel).await {
            Ok(r) => r,
            Err(GaveUp::Cancelled) => return Err(RedisSinkError::Cancelled.into()),
            Err(GaveUp::Failed(_, e)) => return Err(JoinError::Fatal(e)),
        };
        let mut examples = Vec::new();
        let ids = rows
            .column_by_name("event_id")
            .expect("the built-in join schema")
            .as_string::<i32>();
        for (inv, reply) in invocations.iter().zip(replies) {
            let kind = if inv.args[1] == b"f" {
                "feedback"
            } else {
                "label"
            };
            let reply = match reply {
                Ok(r) => r,
                Err(e) => {
                    count(&shared.pipeline, kind, "refused");
                    refused.push(Refusal {
                        row: inv.row,
                        failure: Failure::Redis {
                            reason: if e.code() == Some("WRONGTYPE") {
                                "wrong_type"
                            } else {
                                "refused"
                            },
                            error: e.to_string(),
                        },
                    });
                    continue;
                }
            };
            let r = items(&reply);
            let status = r.first().map(text).unwrap_or_default();
            let id = ids.value(inv.row);
            match status.as_str() {
                "joined" | "replayed" if r.len() >= 7 => {
                    let stored = Stored {
                        version: text(&r[1]),
                        features: text(&r[2]),
                        outputs: text(&r[3]),
                        scored_at: text(&r[4]),
                    };
                    let label: f64 = text(&r[5]).parse().unwrap_or(f64::NAN);
                    let at = Some(text(&r[6])).filter(|s| !s.is_empty());
                    match stored.example(&shared.spec, id, Some((label, at))) {
                        Some(e) => examples.push(e),
                        None => error!(%id, "Stored join state does not parse; no example."),
                    }
                    count(
                        &shared.pipeline,
                        kind,
                        if status == "joined" {
                            "joined"
                        } else {
                            "replayed"
                        },
                    );
                }
                "replayed" => count(&shared.pipeline, kind, "replayed"),
                "stored" => count(&shared.pipeline, kind, "stored"),
                "waiting" => count(&shared.pipeline, kind, "waiting"),
                "duplicate" if kind == "feedback" => {
                    // sluice's own at-least-once output scored twice: the first one counts.
                    count(&shared.pipeline, kind, "duplicate");
                }
                "duplicate" => {
                    count(&shared.pipeline, kind, "duplicate");
                    let state = r.get(1).map(text).unwrap_or_default();
                    refused.push(refusal(
                        inv.row,
                        "duplicate_label",
                        format!(
                            "event {id} already has a label (state: {state}); the first label \
                             counts"
                        ),
                    ));
                }
                "late" => {
                    count(&shared.pipeline, kind, "late");
                    let decision = r.get(1).map(text).unwrap_or_default();
                    refused.push(refusal(
                        inv.row,
                        "late_label",
                        format!(
                            "the label of event {id} arrived after its maturity window closed \
                             (decision: {decision})"
                        ),
                    ));
                }
                other => error!(%id, status = other, "Unexpected answer of the join script."),
            }
        }
        if !examples.is_empty() {
            let records: Vec<Record> = examples.iter().map(|e| shared.example_record(e)).collect();
            shared.examples.deliver(&records).await?;
            metrics::counter!("sluice_join_examples_total", "pipeline" => shared.pipeline.to_string(),
                "labelled" => "true")
            .increment(examples.len() as u64);
        }
        refused.sort_by_key(|r| r.row);
        Ok(refused)
    }
}

#[async_trait::async_trait]
impl Sink for JoinSink {
    fn name(&self) -> &'static str {
        "join"
    }

    /// Durable once written: the join state is in Redis and the decided examples are
    /// acknowledged by the broker before the call returns; a replay decides nothing new.
    async fn write(
        &mut self,
        rows: &RecordBatch,
        originals: Option<&Originals>,
        cancel: &CancellationToken,
    ) -> Result<Vec<Refusal>, SinkError> {
        let started = std::time::Instant::now();
        let refused = JoinSink::write(self, rows, originals, cancel)
            .await
            .map_err(|e| match e {
                JoinError::Redis(RedisSinkError::Cancelled) => SinkError::Cancelled,
                e => SinkError::failed(e),
            })?;
        crate::telemetry::stage(&self.shared.pipeline, "join", started);
        Ok(refused)
    }

    fn background_failure(&mut self) -> Option<SinkError> {
        let failed = self.sweeper_failed.lock().expect("not poisoned").take()?;
        Some(SinkError::failed(JoinError::Sweeper(failed)))
    }
}

/// Every `sweep_interval`, on every shard: claims the due events, produces their examples
/// and dead letters, and ends them.
async fn sweeper(shared: Arc<Shared>, stop: CancellationToken, failed: Arc<Mutex<Option<String>>>) {
    let mut ticker = tokio::time::interval(shared.spec.sweep_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        for shard in 0..shared.spec.shards {
            loop {
                match sweep_shard(&shared, shard, &stop).await {
                    Ok(n) if n == SWEEP_LIMIT => continue,
                    Ok(_) => break,
                    Err(JoinError::Redis(RedisSinkError::Cancelled)) => return,
                    Err(e) => {
                        error!(pipeline = %shared.pipeline, error = %e, "Join sweeper failed.");
                        *failed.lock().expect("not poisoned") = Some(e.to_string());
                        return;
                    }
                }
            }
        }
    }
}

/// One round on one shard; returns how many events it claimed.
async fn sweep_shard(
    shared: &Shared,
    shard: u32,
    stop: &CancellationToken,
) -> Result<usize, JoinError> {
    let spec = &shared.spec;
    let prefix = shard_prefix(&spec.model, shard);
    let due = format!("{prefix}due");
    let now = chrono::Utc::now().timestamp_millis();
    let decision = match spec.unlabelled {
        Unlabelled::Default(_) => "default",
        Unlabelled::Drop => "dropped",
    };
    let args = [
        now.to_string(),
        LEASE.as_millis().to_string(),
        SWEEP_LIMIT.to_string(),
        format!("{prefix}e:"),
        decision.to_owned(),
    ]
    .map(String::into_bytes)
    .to_vec();
    let gave_up = |e: GaveUp<RedisError>| match e {
        GaveUp::Cancelled => JoinError::Redis(RedisSinkError::Cancelled),
        GaveUp::Failed(_, e) => JoinError::Fatal(e),
    };
    let reply = shared
        .run(&[(&shared.sweep, vec![due.clone()], args)], stop)
        .await
        .map_err(gave_up)?
        .pop()
        .expect("one reply")
        .map_err(JoinError::Fatal)?;
    let claimed = items(&reply);
    if claimed.is_empty() {
        return Ok(0);
    }
    let (mut examples, mut letters, mut ends) = (Vec::new(), Vec::new(), Vec::new());
    for c in claimed {
        let f = items(c);
        if f.len() < 10 {
            continue;
        }
        let (id, decision) = (text(&f[0]), text(&f[1]));
        match decision.as_str() {
            "default" => {
                let stored = Stored {
                    version: text(&f[2]),
                    features: text(&f[3]),
                    outputs: text(&f[4]),
                    scored_at: text(&f[5]),
                };
                if let Some(e) = stored.example(spec, &id, None) {
                    examples.push(e);
                }
            }
            "unknown" => {
                let pos = text(&f[6]);
                let (topic, partition, offset) = parse_position(&pos).unwrap_or(("", -1, -1));
                let key = bytes(&f[7]);
                letters.push(Rejected {
                    topic: Arc::from(topic),
                    partition,
                    offset,
                    timestamp: text(&f[9]).parse().ok(),
                    key: key.strip_prefix(b"k").map(<[u8]>::to_vec),
                    payload: Some(bytes(&f[8])),
                    headers: Vec::new(),
                    error: Failure::Join {
                        reason: "unknown_event",
                        error: format!(
                            "no feedback record of event {id} arrived within join.grace ({}) \
                             of its label",
                            humantime::format_duration(spec.grace)
                        ),
                    },
                });
            }
            _ => {}
        }
        metrics::counter!("sluice_join_swept_total", "pipeline" => shared.pipeline.to_string(),
            "decision" => match decision.as_str() { "default" => "default", "unknown" => "unknown", _ => "dropped" })
        .increment(1);
        ends.push((
            &shared.finish,
            vec![due.clone(), format!("{prefix}e:{id}")],
            vec![id.into_bytes(), decision.into_bytes()],
        ));
    }
    if !examples.is_empty() {
        let records: Vec<Record> = examples.iter().map(|e| shared.example_record(e)).collect();
        shared.examples.deliver(&records).await?;
        metrics::counter!("sluice_join_examples_total", "pipeline" => shared.pipeline.to_string(),
            "labelled" => "false")
        .increment(examples.len() as u64);
    }
    let sends: Vec<_> = letters
        .into_iter()
        .map(|r| shared.dead_letters.send(r))
        .collect();
    for sent in futures::future::join_all(sends).await {
        sent?;
    }
    shared.run(&ends, stop).await.map_err(gave_up)?;
    Ok(claimed.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_and_positions_are_stable() {
        // FNV-1a of "a" is 0xe40c292c.
        assert_eq!(shard_of("a", 1 << 31), 0xe40c_292c % (1 << 31));
        assert!((0..1000).all(|i| shard_of(&format!("e-{i}"), 16) < 16));
        let spread: std::collections::BTreeSet<u32> =
            (0..1000).map(|i| shard_of(&format!("e-{i}"), 16)).collect();
        assert_eq!(spread.len(), 16, "a thousand ids use every shard");
        assert_eq!(shard_prefix("fraud", 3), "sluice:join:{fraud:3}:");
        let pos = position("orders.fraud.labels", 2, 41);
        assert_eq!(parse_position(&pos), Some(("orders.fraud.labels", 2, 41)));
    }
}
