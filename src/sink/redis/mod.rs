//! The Redis sink: the online feature store. Each feature view keeps one hash per entity,
//! read with a single `HGETALL`.
//!
//! - **Replay safety.** Every write runs a server-side script that compares the event's time
//!   (then topic, partition and offset, to break ties) with the `_ts`, `_topic`, `_partition`
//!   and `_offset` fields stored with the hash, and writes only if the event is newer. Replays, duplicates and
//!   out-of-order events therefore never roll a feature back.
//! - **Coalescing.** Within a micro-batch only the newest event per key is sent.
//! - **Throughput.** Writes go out as pipelines of `pipeline_size` scripts, `max_in_flight` at
//!   a time, on one multiplexed connection; on a cluster, each script is routed by its key's
//!   slot and `max_in_flight * pipeline_size` of them are in flight at once.
//! - **Failures** ([`crate::failure`]). Each command's reply is classified on its own. A
//!   transient failure (the connection, `LOADING`, `TRYAGAIN`, `CLUSTERDOWN`, `OOM`, …) retries
//!   the pipeline with capped backoff until it succeeds or the pipeline shuts down; meanwhile
//!   nothing new is taken in (the source pauses), memory stays bounded, `/readyz` answers 503
//!   and no offset past the batch is committed. A command Redis refuses for its key alone
//!   (`WRONGTYPE`: the key holds another type; a script error on the stored fields) is
//!   returned as a refused row ([`Refusal`]): the pipeline dead-letters that event (stage `redis`) and
//!   goes on. A refused authorization or permission (`NOPERM`) fails the pipeline.
//!
//! Value encoding, stable for any client: strings as they are; integers and numbers in decimal
//! (`42`, `12.5`); booleans `true`/`false`; date-times as RFC 3339 in UTC with microseconds
//! (`2026-11-21T18:04:05.123456Z`); dates `YYYY-MM-DD`. A null value deletes the field.
//! `_ts` holds the event time in microseconds since the epoch; `_topic`, `_partition` and
//! `_offset` the event's source position.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use arrow::{
    array::{ArrayRef, AsArray},
    datatypes::{DataType, Date32Type, TimestampMicrosecondType},
    record_batch::RecordBatch,
};
use futures::StreamExt;
use redis::{
    aio::ConnectionManager, cluster_async::ClusterConnection, Pipeline, RedisError, Script,
};
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub mod aggregate;
mod lookup;

pub use self::lookup::Lookup;

use crate::{
    config::{KeyPart, RedisConnection, RedisSpec},
    event::Failure,
    failure::{self, Class, GaveUp, Retrying},
    sink::{Refusal, Sink, SinkError},
    util::text::{encode, render_key},
};

/// The latest-value views' write script. KEYS: the entities' hashes (up to
/// [`aggregate::KEYS_PER_CALL`]; one on a cluster, where a script's keys must share a slot).
/// ARGV, for each key in turn: the key's TTL in seconds (`0`: none), S, S x (field, value) to
/// set, the first four being `_ts`, `_topic`, `_partition` and `_offset` (the event's time in
/// µs, topic, partition and offset), D, D x field to delete, T, T x (field, TTL seconds).
/// Reply: one entry per key: 1 when written, 0 when the hash holds a newer event (by event
/// time, then topic, partition and offset: a replay or an out-of-order event), or
/// `{'error', message}` when Redis refuses the key (a key of another type).
///
/// Most of its cost is Lua's own, so it keeps to strings: the integers are compared as
/// written (sluice writes them without leading zeros), and the fields are set straight from
/// ARGV.
const SCRIPT: &str = r#"
local CHUNK = 4000
-- a < b for integers written in decimal without leading zeros.
local function less(a, b)
  if a:byte(1) == 45 or b:byte(1) == 45 then return tonumber(a) < tonumber(b) end
  return #a < #b or (#a == #b and a < b)
end
local reply = {}
local i = 1
for k = 1, #KEYS do
  local key = KEYS[k]
  local ttl, ns = ARGV[i], tonumber(ARGV[i + 1])
  local set = i + 2
  local last = set + 2 * ns - 1
  local ts, topic, part, off = ARGV[set + 1], ARGV[set + 3], ARGV[set + 5], ARGV[set + 7]
  local nd = tonumber(ARGV[last + 1])
  local del = last + 2
  local nt = tonumber(ARGV[del + nd])
  local fttl = del + nd + 1
  i = fttl + 2 * nt
  local cur = redis.pcall('HMGET', key, '_ts', '_topic', '_partition', '_offset')
  if cur.err then
    reply[k] = {'error', cur.err}
  else
    -- Newer than the stored event: by event time, then topic, partition and offset.
    local newer = true
    if cur[1] then
      local ct, cp = cur[2] or '', cur[3] or '-1'
      if cur[1] ~= ts then
        newer = less(cur[1], ts)
      elseif ct ~= topic then
        newer = ct < topic
      elseif cp ~= part then
        newer = less(cp, part)
      else
        newer = less(cur[4] or '-1', off)
      end
    end
    if newer then
      for a = set, last, CHUNK do
        redis.call('HSET', key, unpack(ARGV, a, math.min(a + CHUNK - 1, last)))
      end
      if nd > 0 then redis.call('HDEL', key, unpack(ARGV, del, del + nd - 1)) end
      if ttl ~= '0' then redis.call('EXPIRE', key, ttl) end
      for a = fttl, fttl + 2 * nt - 1, 2 do
        redis.call('HEXPIRE', key, ARGV[a + 1], 'FIELDS', 1, ARGV[a])
      end
      reply[k] = 1
    else
      reply[k] = 0
    end
  end
end
return reply
"#;

/// Why the Redis sink failed.
#[derive(Debug, Error)]
pub enum RedisSinkError {
    /// Connecting or authenticating failed at start (the URL is shown without its password).
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: RedisError,
    },
    /// A view sets `field_ttl` but the server has no HEXPIRE.
    #[error("{url} runs Redis {version}; field TTLs (HEXPIRE) need Redis 7.4 or later")]
    NoFieldTtl { url: String, version: String },
    /// A write failed in a way that no retry can mend (permissions, authentication).
    #[error("Redis refuses sluice's writes ({source}); check the user's ACL and credentials")]
    Fatal {
        #[source]
        source: RedisError,
    },
    /// Shutdown came while the batch was being written: nothing is known to be durable.
    #[error("shutdown interrupted a Redis write")]
    Cancelled,
}

/// A stored field as a model input: numbers as they are, booleans 1 / 0.
fn number(text: Option<&str>) -> Option<f64> {
    match text? {
        "true" => Some(1.0),
        "false" => Some(0.0),
        t => t.parse().ok(),
    }
}

/// The rows of an aggregate entry whose key Redis refused for good, with its error.
fn refusals(rows: &[usize], error: &str) -> Vec<Refusal> {
    let reason = if error.contains("WRONGTYPE") {
        "wrong_type"
    } else {
        "refused"
    };
    rows.iter()
        .map(|row| refused(*row, reason, error.to_owned()))
        .collect()
}

/// A row whose features Redis refused for good (`reason`: `wrong_type`, `script_error`,
/// `refused`, `future_event_time`); the pipeline dead-letters its event.
fn refused(row: usize, reason: &'static str, error: String) -> Refusal {
    Refusal {
        row,
        failure: Failure::Redis { reason, error },
    }
}

/// A connection to one server (reconnecting by itself) or to a cluster.
#[derive(Clone)]
pub(crate) enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Connection {
    pub(crate) async fn query<T: redis::FromRedisValue>(
        &mut self,
        pipe: &Pipeline,
    ) -> Result<T, RedisError> {
        match self {
            Self::Single(c) => pipe.query_async(c).await,
            Self::Cluster(c) => pipe.query_async(c).await,
        }
    }

    pub(crate) async fn load(&mut self, script: &Script) -> Result<(), RedisError> {
        match self {
            Self::Single(c) => script.prepare_invoke().load_async(c).await.map(|_| ()),
            Self::Cluster(c) => script.prepare_invoke().load_async(c).await.map(|_| ()),
        }
    }
}

/// Opens a connection (or cluster connection) and checks it with PING.
pub(crate) async fn connect(spec: &RedisConnection) -> Result<Connection, RedisSinkError> {
    let shown = spec.shown();
    let fail = |source| RedisSinkError::Connect {
        url: shown.clone(),
        source,
    };
    let certificates = match &spec.tls_ca_file {
        Some(file) => Some(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(file).map_err(|e| {
                fail(RedisError::from((
                    redis::ErrorKind::Io,
                    "cannot read tls_ca_file",
                    e.to_string(),
                )))
            })?),
        }),
        None => None,
    };
    let mut conn = if spec.cluster {
        let mut builder = redis::cluster::ClusterClientBuilder::new(spec.urls.clone());
        if let Some(certs) = certificates {
            builder = builder.certs(certs);
        }
        let client = builder.build().map_err(fail)?;
        Connection::Cluster(client.get_async_connection().await.map_err(fail)?)
    } else {
        let url = spec.urls[0].as_str();
        let client = match certificates {
            Some(certs) => redis::Client::build_with_tls(url, certs),
            None => redis::Client::open(url),
        }
        .map_err(fail)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_number_of_retries(1);
        let manager = tokio::time::timeout(
            Duration::from_secs(10),
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| {
            fail(RedisError::from((
                redis::ErrorKind::Io,
                "timed out connecting",
            )))
        })?
        .map_err(fail)?;
        Connection::Single(manager)
    };
    conn.query::<()>(redis::pipe().cmd("PING").ignore())
        .await
        .map_err(fail)?;
    Ok(conn)
}

/// Reads an entity's hash (for `sluice features get`).
pub async fn read_entity(
    spec: &RedisSpec,
    key: &str,
) -> Result<Vec<(String, String)>, RedisSinkError> {
    let mut conn = connect(&spec.connection).await?;
    let mut fields: Vec<(String, String)> = conn
        .query::<(HashMap<String, String>,)>(redis::pipe().hgetall(key))
        .await
        .map_err(|source| RedisSinkError::Connect {
            url: spec.connection.shown(),
            source,
        })?
        .0
        .into_iter()
        .collect();
    fields.sort();
    Ok(fields)
}

/// An entity's aggregates as of a time: per window, its label, the buckets it used (first
/// bucket start and end, ms since the epoch, end exclusive) and each feature's value.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// `_parts` of the hash: its bucket length and partials.
    pub parts: String,
    /// The entity's newest applied event time (ms).
    pub watermark: Option<i64>,
    pub windows: Vec<WindowReading>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WindowReading {
    pub window: String,
    pub from_ms: i64,
    pub to_ms: i64,
    /// `(<feature>_<window>, value)`; `None`: no value (an `avg`, `min` or `max` of nothing).
    pub features: Vec<(String, Option<f64>)>,
}

/// Reads an aggregate view's hash with [`aggregate::READ`] as of `at_ms`; `None` when the
/// key is absent. A hash written under another definition of the view is an error.
pub async fn read_aggregate(
    connection: &RedisConnection,
    view: &crate::config::AggregateSpec,
    key: &str,
    at_ms: i64,
) -> Result<Option<Reading>, RedisSinkError> {
    let mut conn = connect(connection).await?;
    let script = Script::new(aggregate::READ);
    let mut call = script.prepare_invoke();
    call.key(key).arg(at_ms);
    for (_, d) in &view.windows {
        call.arg(d.as_millis() as u64);
    }
    let fail = |source| RedisSinkError::Connect {
        url: connection.shown(),
        source,
    };
    let reply: redis::Value = match &mut conn {
        Connection::Single(c) => call.invoke_async(c).await,
        Connection::Cluster(c) => call.invoke_async(c).await,
    }
    .map_err(fail)?;
    let text = |v: &redis::Value| -> String {
        match v {
            redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            redis::Value::SimpleString(s) => s.clone(),
            redis::Value::Int(n) => n.to_string(),
            _ => String::new(),
        }
    };
    let redis::Value::Array(items) = reply else {
        return Ok(None);
    };
    if items.len() < 2 {
        return Ok(None);
    }
    let parts = text(&items[0]);
    if parts != view.description() {
        return Err(fail(RedisError::from((
            redis::ErrorKind::Parse,
            "the hash was written under another definition of the view",
            format!("stored {parts:?}, configured {:?}", view.description()),
        ))));
    }
    let configured = view.parts();
    let mut windows = Vec::new();
    for ((label, _), row) in view.windows.iter().zip(&items[2..]) {
        let redis::Value::Array(row) = row else {
            continue;
        };
        let values: Vec<String> = row.iter().map(text).collect();
        let partials: Vec<Option<f64>> = values[3..].iter().map(|v| v.parse().ok()).collect();
        windows.push(WindowReading {
            window: label.clone(),
            from_ms: values[1].parse().unwrap_or_default(),
            to_ms: values[2].parse().unwrap_or_default(),
            features: (0..view.features.len())
                .map(|f| {
                    (
                        format!("{}_{label}", view.features[f].name),
                        aggregate::finish(view, &configured, &partials, f),
                    )
                })
                .collect(),
        });
    }
    Ok(Some(Reading {
        parts,
        watermark: text(&items[1]).parse().ok(),
        windows,
    }))
}

/// Reads hash fields (`ARGV`) of `KEYS[1]`: the state a batch's latest-value inputs start from.
const READ_FIELDS: &str = "return redis.call('HMGET', KEYS[1], unpack(ARGV))";

/// One view, resolved against the batch schema.
struct View {
    name: String,
    /// The (hash field, column) pairs that models take as inputs.
    enrich: Vec<(String, String)>,
    key: Vec<KeyPart>,
    fields: Vec<(String, String)>,
    ttl_secs: u64,
    field_ttl: Vec<(String, u64)>,
}

/// Writes feature views to Redis.
pub struct RedisSink {
    pipeline: String,
    spec: RedisSpec,
    conn: Connection,
    script: Script,
    views: Vec<View>,
    aggregate_script: Script,
    swap_script: Script,
    read_script: Script,
    aggregates: Vec<aggregate::View>,
    /// The point-in-time features of the last batch written, for the models.
    enrichment: Vec<(String, ArrayRef)>,
    /// False while writes are failing; `/readyz` reports it.
    healthy: Arc<AtomicBool>,
}

/// Rows Redis refused for good, and the batch's enrichment columns.
type Written = (Vec<Refusal>, Vec<(String, ArrayRef)>);

impl RedisSink {
    /// Connects, checks the server supports what the views need, and loads the scripts.
    /// `enrich`: the inputs models take from Redis (`<view>.<field or feature>`).
    pub async fn open(
        pipeline: &str,
        spec: &RedisSpec,
        healthy: Arc<AtomicBool>,
        enrich: &[String],
    ) -> Result<Self, RedisSinkError> {
        let mut conn = connect(&spec.connection).await?;
        let shown = spec.connection.shown();
        if spec.views.iter().any(|v| !v.field_ttl.is_empty()) {
            let info: String = conn
                .query::<(String,)>(redis::pipe().cmd("INFO").arg("server"))
                .await
                .map_err(|source| RedisSinkError::Connect {
                    url: shown.clone(),
                    source,
                })?
                .0;
            let version = info
                .lines()
                .find_map(|l| l.strip_prefix("redis_version:"))
                .unwrap_or("unknown")
                .trim()
                .to_owned();
            let parts: Vec<u32> = version.split('.').filter_map(|p| p.parse().ok()).collect();
            if parts.len() < 2 || (parts[0], parts[1]) < (7, 4) {
                return Err(RedisSinkError::NoFieldTtl {
                    url: shown,
                    version,
                });
            }
        }
        let script = Script::new(SCRIPT);
        let aggregate_script = Script::new(aggregate::WRITE);
        let swap_script = Script::new(aggregate::SWAP);
        let read_script = Script::new(READ_FIELDS);
        for s in [&script, &aggregate_script, &swap_script, &read_script] {
            conn.load(s)
                .await
                .map_err(|source| RedisSinkError::Connect {
                    url: shown.clone(),
                    source,
                })?;
        }
        info!(url = %shown, cluster = spec.connection.cluster, views = spec.views.len(), "Connected to Redis.");
        healthy.store(true, Ordering::Release);
        let views = spec
            .views
            .iter()
            .map(|v| View {
                name: v.name.clone(),
                enrich: v
                    .fields
                    .iter()
                    .filter(|(_, f)| enrich.contains(&format!("{}.{f}", v.name)))
                    .map(|(c, f)| (f.clone(), c.clone()))
                    .collect(),
                key: v.key.clone(),
                fields: v.fields.clone(),
                ttl_secs: v.ttl.map_or(0, |t| t.as_secs()),
                field_ttl: v
                    .field_ttl
                    .iter()
                    .map(|(f, d)| (f.clone(), d.as_secs()))
                    .collect(),
            })
            .collect();
        let read = |a: &crate::config::AggregateSpec| {
            enrich
                .iter()
                .any(|e| e.split('.').next() == Some(a.name.as_str()))
        };
        // The snapshots' memory, shared by the aggregate views.
        let readers = spec.aggregates.len();
        let aggregates = spec
            .aggregates
            .iter()
            .map(|a| {
                let used = read(a);
                let memory = (spec.aggregate_cache as usize) / readers.max(1);
                aggregate::View::new(a, used, memory)
            })
            .collect();
        Ok(Self {
            pipeline: pipeline.to_owned(),
            spec: spec.clone(),
            conn,
            script,
            views,
            aggregate_script,
            swap_script,
            read_script,
            aggregates,
            enrichment: Vec::new(),
            healthy,
        })
    }

    /// Writes a batch's features and aggregates and returns once Redis has acknowledged every
    /// write, retrying transient failures with backoff; returns the rows whose writes Redis
    /// refused for good.
    pub async fn write(
        &mut self,
        batch: &RecordBatch,
        cancel: &CancellationToken,
    ) -> Result<Vec<Refusal>, RedisSinkError> {
        self.enrichment.clear();
        let (refused, enrichment) = self.write_views_and_aggregates(batch, cancel).await?;
        self.enrichment = enrichment;
        Ok(refused)
    }

    /// [`Self::write`]: the latest-value views and the aggregate views side by side.
    async fn write_views_and_aggregates(
        &self,
        batch: &RecordBatch,
        cancel: &CancellationToken,
    ) -> Result<Written, RedisSinkError> {
        if batch.num_rows() == 0 {
            return Ok(Default::default());
        }
        let started = Instant::now();
        let times = event_times(batch, &self.spec.time_field);
        let mut refused = self.future(&times);
        let mut skip = vec![false; batch.num_rows()];
        for r in &refused {
            skip[r.row] = true;
        }
        // The aggregates first: most of Redis's work, so that it starts at once.
        let (aggregates, views) = futures::join!(
            async {
                match self.aggregates.is_empty() {
                    true => Ok(Written::default()),
                    false => self.write_aggregates(batch, &times, &skip, cancel).await,
                }
            },
            async {
                match self.views.is_empty() {
                    true => Ok(Written::default()),
                    false => self.write_views(batch, &times, &skip, cancel).await,
                }
            }
        );
        let mut enrichment = Vec::new();
        for written in [views?, aggregates?] {
            refused.extend(written.0);
            enrichment.extend(written.1);
        }
        let labels = [("pipeline", self.pipeline.clone())];
        metrics::histogram!("sluice_redis_write_seconds", &labels)
            .record(started.elapsed().as_secs_f64());
        refused.sort_by_key(|r| r.row);
        refused.dedup_by_key(|r| r.row);
        Ok((refused, enrichment))
    }

    async fn write_views(
        &self,
        batch: &RecordBatch,
        times: &[i64],
        skip: &[bool],
        cancel: &CancellationToken,
    ) -> Result<Written, RedisSinkError> {
        let previous = self.previous(batch, times, skip, cancel).await?;
        let invocations = self.build(batch, times, skip);
        let sent = invocations.len();
        let labels = [("pipeline", self.pipeline.clone())];
        metrics::counter!("sluice_redis_rows_coalesced_total", &labels).increment(
            (skip.iter().filter(|s| !**s).count() * self.views.len()).saturating_sub(sent) as u64,
        );
        let per_call = if self.spec.connection.cluster {
            1
        } else {
            aggregate::KEYS_PER_CALL
        };
        let (mut accepted, mut refused) = (0, Vec::new());
        let mut pending = invocations;
        // A call Redis refuses as a whole goes again as one call per entity (a second write
        // of an event is a no-op), so that only the entity it cannot take is refused.
        for per_call in [per_call, 1] {
            let mut again = Vec::new();
            for (chunk, reply) in self.call_views(&pending, per_call, cancel).await? {
                let answers = reply.and_then(|v| {
                    aggregate::swapped(v, chunk.len()).map_err(|e| ("script_error", e))
                });
                match answers {
                    Ok(answers) => {
                        for (inv, answer) in chunk.iter().zip(answers) {
                            match answer {
                                Ok(written) => accepted += u64::from(written),
                                Err(error) => refused.extend(refusals(&[inv.row], &error)),
                            }
                        }
                    }
                    Err(_) if chunk.len() > 1 => again.extend(chunk.iter().cloned()),
                    Err((reason, error)) => refused.extend(
                        chunk
                            .iter()
                            .map(|i| self::refused(i.row, reason, error.clone())),
                    ),
                }
            }
            pending = again;
            if pending.is_empty() {
                break;
            }
        }
        metrics::counter!("sluice_redis_rows_total", &labels).increment(accepted);
        metrics::counter!("sluice_redis_rows_stale_total", &labels)
            .increment((sent - refused.len()) as u64 - accepted);
        Ok((refused, previous))
    }

    /// The latest-value views' script calls for `invocations`, `per_call` entities each, and
    /// each call's reply.
    #[allow(clippy::type_complexity)]
    async fn call_views<'i>(
        &self,
        invocations: &'i [Invocation],
        per_call: usize,
        cancel: &CancellationToken,
    ) -> Result<
        Vec<(
            &'i [Invocation],
            Result<redis::Value, (&'static str, String)>,
        )>,
        RedisSinkError,
    > {
        let chunks: Vec<&[Invocation]> = invocations.chunks(per_call.max(1)).collect();
        let calls: Vec<(Vec<String>, Vec<String>)> = chunks
            .iter()
            .map(|chunk| {
                let keys = chunk.iter().map(|i| i.key.clone()).collect();
                let args = chunk.iter().flat_map(|i| i.args.iter().cloned()).collect();
                (keys, args)
            })
            .collect();
        let keyed: Vec<(&[String], &[String])> = calls
            .iter()
            .map(|(k, a)| (k.as_slice(), a.as_slice()))
            .collect();
        let replies = self
            .execute::<redis::Value>(&self.script, &keyed, per_call, cancel)
            .await?;
        Ok(chunks.into_iter().zip(replies).collect())
    }

    /// The latest-value inputs of the batch's rows: for each row, the field as of its
    /// entity's newest event before it (by event time, then topic, partition and offset) among
    /// what the hash held before the batch and the batch's earlier rows; null when there is
    /// none, or when what is known is not older than the row (a replay, an out-of-order event).
    async fn previous(
        &self,
        batch: &RecordBatch,
        times: &[i64],
        skip: &[bool],
        cancel: &CancellationToken,
    ) -> Result<Vec<(String, ArrayRef)>, RedisSinkError> {
        // Event time, topic, partition, offset: the stored event's topic is owned, a row's
        // borrowed from the batch.
        type Order<'a> = (i64, &'a str, i32, i64);
        let (topics, partitions, offsets) = crate::schema::provenance(batch);

        let mut out = Vec::new();
        for view in self.views.iter().filter(|v| !v.enrich.is_empty()) {
            let mut keys: Vec<String> = Vec::new();
            let mut rows: HashMap<String, Vec<usize>> = HashMap::new();
            for row in (0..batch.num_rows()).filter(|r| !skip[*r]) {
                let key = render_key(&view.key, batch, row);
                rows.entry(key.clone())
                    .or_insert_with(|| {
                        keys.push(key);
                        Vec::new()
                    })
                    .push(row);
            }
            let mut fields: Vec<String> = ["_ts", "_topic", "_partition", "_offset"]
                .map(String::from)
                .to_vec();
            fields.extend(view.enrich.iter().map(|(f, _)| f.clone()));
            let calls: Vec<(&[String], &[String])> = keys
                .iter()
                .map(|k| (std::slice::from_ref(k), fields.as_slice()))
                .collect();
            let replies = self
                .execute::<Vec<Option<String>>>(&self.read_script, &calls, 1, cancel)
                .await?;
            let mut values = vec![vec![None; batch.num_rows()]; view.enrich.len()];
            for (key, reply) in keys.iter().zip(replies) {
                // A key Redis refuses to read (another type) has no previous values; its write
                // is refused below, and its events dead-lettered.
                let stored = reply.unwrap_or_default();
                let field = |i: usize| stored.get(i).and_then(|v| v.as_deref());
                let mut known: Option<(Order, Vec<Option<f64>>)> = match (
                    field(0).and_then(|t| t.parse().ok()),
                    field(2).and_then(|p| p.parse().ok()),
                    field(3).and_then(|o| o.parse().ok()),
                ) {
                    (Some(ts), Some(p), Some(o)) => Some((
                        (ts, field(1).unwrap_or_default(), p, o),
                        (0..view.enrich.len())
                            .map(|f| number(field(4 + f)))
                            .collect(),
                    )),
                    _ => None,
                };
                for &row in &rows[key] {
                    let order: Order = (
                        times[row],
                        topics.value(row),
                        partitions.value(row),
                        offsets.value(row),
                    );
                    if let Some((_, v)) = known.as_ref().filter(|(o, _)| *o < order) {
                        for (f, value) in v.iter().enumerate() {
                            values[f][row] = *value;
                        }
                    }
                    if known.as_ref().is_none_or(|(o, _)| order > *o) {
                        let own = view
                            .enrich
                            .iter()
                            .map(|(_, c)| {
                                let column = batch.column_by_name(c).expect("validated column");
                                number(encode(column, row).as_deref())
                            })
                            .collect();
                        known = Some((order, own));
                    }
                }
            }
            for ((field, _), v) in view.enrich.iter().zip(values) {
                out.push((
                    format!("{}.{field}", view.name),
                    Arc::new(arrow::array::Float64Array::from(v)) as ArrayRef,
                ));
            }
        }
        Ok(out)
    }

    /// One entry per (view, entity, partition), so that a partition's events reach each
    /// entity's guard in offset order. The entries whose snapshot is current are applied here
    /// and set by compare-and-set; the others (and those whose hash changed since) go through
    /// the write script; see [`aggregate`]. Up to [`aggregate::KEYS_PER_CALL`] entries per
    /// call; with models taking the features, they come back as the batch's enrichment
    /// columns.
    async fn write_aggregates(
        &self,
        batch: &RecordBatch,
        times: &[i64],
        skip: &[bool],
        cancel: &CancellationToken,
    ) -> Result<Written, RedisSinkError> {
        use aggregate::Prepared;
        let per_call = if self.spec.connection.cluster {
            1
        } else {
            aggregate::KEYS_PER_CALL
        };
        let views = &self.aggregates;
        let mut finished = Vec::new();
        let mut refused = Vec::new();
        let mut swaps = Vec::new();
        let mut written: Vec<Vec<aggregate::Entry>> = views.iter().map(|_| Vec::new()).collect();
        for (v, view) in views.iter().enumerate() {
            for entry in aggregate::plan(v, view, batch, skip, times) {
                match view.prepare(entry) {
                    Prepared::Done(done) => finished.push(done),
                    Prepared::Swapped(swap) => swaps.push(swap),
                    Prepared::Written(entry) => written[v].push(entry),
                }
            }
        }
        let swapped = swaps.len();

        // 1. Compare-and-set of what changes, where the snapshot is current.
        let calls = aggregate::swap_calls(views, &swaps, per_call);
        let keyed: Vec<(&[String], &[String])> = calls
            .iter()
            .map(|(k, a)| (k.as_slice(), a.as_slice()))
            .collect();
        let replies = self
            .execute::<redis::Value>(&self.swap_script, &keyed, per_call, cancel)
            .await?;
        let mut swaps = swaps.into_iter();
        for ((keys, _), reply) in calls.iter().zip(replies) {
            let chunk: Vec<Box<aggregate::Swap>> = swaps.by_ref().take(keys.len()).collect();
            let answers = reply
                .map_err(|(_, e)| e)
                .and_then(|v| aggregate::swapped(v, keys.len()));
            match answers {
                Ok(answers) => {
                    for (swap, answer) in chunk.into_iter().zip(answers) {
                        let view = &views[swap.entry.view];
                        match answer {
                            Ok(true) => finished.push(view.swapped(swap)),
                            // The hash changed since the snapshot: the write script applies
                            // the events to it as it is.
                            Ok(false) => written[swap.entry.view].push(swap.entry),
                            Err(error) => refused.extend(refusals(&swap.entry.rows, &error)),
                        }
                    }
                }
                // Refused as a whole (nothing was set): the write script takes them.
                Err(_) => {
                    for swap in chunk {
                        written[swap.entry.view].push(swap.entry);
                    }
                }
            }
        }

        // 2. The write script, for the rest.
        for (v, entries) in written.into_iter().enumerate() {
            let view = &views[v];
            let calls = aggregate::write_calls(view, &entries, per_call);
            let keyed: Vec<(&[String], &[String])> = calls
                .iter()
                .map(|(k, a, _)| (k.as_slice(), a.as_slice()))
                .collect();
            let replies = self
                .execute::<redis::Value>(&self.aggregate_script, &keyed, per_call, cancel)
                .await?;
            let mut entries = entries.into_iter();
            let mut again = Vec::new();
            for ((keys, _, versions), reply) in calls.iter().zip(replies) {
                let chunk: Vec<aggregate::Entry> = entries.by_ref().take(keys.len()).collect();
                let answers = reply
                    .map_err(|(_, e)| e)
                    .and_then(|v| aggregate::reply(view, v, keys.len()));
                match answers {
                    Ok(answers) => {
                        for ((entry, version), answer) in
                            chunk.into_iter().zip(versions).zip(answers)
                        {
                            match answer {
                                Ok(answer) => finished.push(view.written(entry, version, answer)),
                                Err(error) => refused.extend(refusals(&entry.rows, &error)),
                            }
                        }
                    }
                    // A call Redis refused as a whole goes again as one call per entity, so
                    // that only the one it cannot take is refused.
                    Err(_) if chunk.len() > 1 => again.extend(chunk),
                    Err(error) => {
                        refused.extend(chunk.iter().flat_map(|e| refusals(&e.rows, &error)))
                    }
                }
            }
            if !again.is_empty() {
                let calls = aggregate::write_calls(view, &again, 1);
                let keyed: Vec<(&[String], &[String])> = calls
                    .iter()
                    .map(|(k, a, _)| (k.as_slice(), a.as_slice()))
                    .collect();
                let replies = self
                    .execute::<redis::Value>(&self.aggregate_script, &keyed, 1, cancel)
                    .await?;
                for ((entry, (_, _, versions)), reply) in again.into_iter().zip(&calls).zip(replies)
                {
                    let answer = reply
                        .map_err(|(_, e)| e)
                        .and_then(|v| aggregate::reply(view, v, 1))
                        .and_then(|mut a| a.pop().expect("one entry"));
                    match answer {
                        Ok(answer) => finished.push(view.written(entry, &versions[0], answer)),
                        Err(error) => refused.extend(refusals(&entry.rows, &error)),
                    }
                }
            }
        }

        let labels = [("pipeline", self.pipeline.clone())];
        metrics::counter!("sluice_redis_aggregate_swaps_total", &labels).increment(swapped as u64);
        let mut counts = vec![aggregate::Counts::default(); views.len()];
        for done in &finished {
            counts[done.view] += done.counts();
        }
        for (view, c) in views.iter().zip(&counts) {
            for (result, n) in [
                ("applied", c.applied),
                ("replayed", c.replayed),
                ("late", c.late),
            ] {
                metrics::counter!("sluice_redis_aggregate_events_total",
                    "pipeline" => self.pipeline.clone(), "view" => view.spec.name.clone(),
                    "result" => result)
                .increment(n);
            }
        }
        let mut enrichment = Vec::new();
        for (v, view) in views.iter().enumerate().filter(|(_, v)| v.enriches()) {
            let mine = finished.iter().filter(|f| f.view == v);
            enrichment.extend(aggregate::columns(view, batch.num_rows(), mine));
        }
        Ok((refused, enrichment))
    }

    /// Runs `script` once per `(keys, args)` call (of up to `keys_per_call` keys), as pipelines
    /// (about `pipeline_size` keys, `max_in_flight` at a time; one call each on a cluster,
    /// where a pipeline must stay within one slot), until Redis has answered every call;
    /// returns each call's reply, or why Redis refused it for good.
    async fn execute<T: redis::FromRedisValue + Send>(
        &self,
        script: &Script,
        calls: &[(&[String], &[String])],
        keys_per_call: usize,
        cancel: &CancellationToken,
    ) -> Result<Vec<Result<T, (&'static str, String)>>, RedisSinkError> {
        // A pipeline holds about `pipeline_size` keys.
        let (chunk, concurrency) = if self.spec.connection.cluster {
            (1, self.spec.max_in_flight * self.spec.pipeline_size)
        } else {
            (
                self.spec.pipeline_size.div_ceil(keys_per_call.max(1)),
                self.spec.max_in_flight,
            )
        };
        let size = chunk;
        let pipes: Vec<(usize, Pipeline)> = calls
            .chunks(size)
            .enumerate()
            .map(|(i, chunk)| (i * size, pipeline(script, chunk.iter().copied())))
            .collect();
        let who = self.who();
        let results: Vec<(usize, Sent<T>)> = futures::stream::iter(pipes)
            .map(|(at, pipe)| {
                let conn = self.conn.clone();
                let who = &who;
                async move { (at, send::<T>(conn, script, &pipe, who, cancel).await) }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        let mut replies: Vec<Option<Result<T, (&'static str, String)>>> =
            (0..calls.len()).map(|_| None).collect();
        for (at, r) in results {
            match r {
                Ok(rs) => {
                    for (i, reply) in rs.into_iter().enumerate() {
                        replies[at + i] = Some(reply);
                    }
                }
                Err(GaveUp::Cancelled) => return Err(RedisSinkError::Cancelled),
                Err(GaveUp::Failed(_, source)) => return Err(RedisSinkError::Fatal { source }),
            }
        }
        Ok(replies
            .into_iter()
            .map(|r| r.unwrap_or(Err(("refused", "no reply".into()))))
            .collect())
    }

    fn who(&self) -> Retrying<'_> {
        Retrying {
            pipeline: &self.pipeline,
            metric: "sluice_redis_retries_total",
            what: "Redis write",
            healthy: Some(&self.healthy),
        }
    }

    /// The rows whose event time is too far in the future to be written at all: such an event
    /// would win over every real event of its entity until then (review finding A8). It also
    /// keeps event times far below 2^53 µs, where the scripts' numbers (doubles) stop being
    /// exact.
    fn future(&self, times: &[i64]) -> Vec<Refusal> {
        let skew = self.spec.max_event_time_skew;
        let limit = chrono::Utc::now().timestamp_micros() + skew.as_micros() as i64;
        (0..times.len())
            .filter(|r| times[*r] > limit)
            .map(|row| {
                refused(
                    row,
                    "future_event_time",
                    format!(
                        "event time {} is more than {} after now (sink.redis.max_event_time_skew)",
                        chrono::DateTime::from_timestamp_micros(times[row])
                            .map_or_else(|| times[row].to_string(), |t| t.to_rfc3339()),
                        humantime::format_duration(skew)
                    ),
                )
            })
            .collect()
    }

    /// One script invocation per (view, key): the newest event of the batch for that key.
    fn build(&self, batch: &RecordBatch, times: &[i64], skip: &[bool]) -> Vec<Invocation> {
        let (topics, partitions, offsets) = crate::schema::provenance(batch);
        let mut out = Vec::new();
        for view in &self.views {
            // Newest row per key: by event time, then topic, partition and offset.
            let mut newest: HashMap<String, usize> = HashMap::new();
            for row in (0..batch.num_rows()).filter(|r| !skip[*r]) {
                let key = render_key(&view.key, batch, row);
                let order = |r: usize| {
                    (
                        times[r],
                        topics.value(r),
                        partitions.value(r),
                        offsets.value(r),
                    )
                };
                newest
                    .entry(key)
                    .and_modify(|best| {
                        if order(row) > order(*best) {
                            *best = row;
                        }
                    })
                    .or_insert(row);
            }
            // Looked up once per batch, not per entity.
            let columns: Vec<(&ArrayRef, &String)> = view
                .fields
                .iter()
                .map(|(c, f)| (batch.column_by_name(c).expect("validated column"), f))
                .collect();
            let ttl = view.ttl_secs.to_string();
            for (key, row) in newest {
                // The script's arguments: the TTL, S (filled in below), then the fields to set,
                // the guard first (the script reads the event's order from these four).
                let mut args = vec![
                    ttl.clone(),
                    String::new(),
                    "_ts".to_owned(),
                    times[row].to_string(),
                    "_topic".to_owned(),
                    topics.value(row).to_owned(),
                    "_partition".to_owned(),
                    partitions.value(row).to_string(),
                    "_offset".to_owned(),
                    offsets.value(row).to_string(),
                ];
                let mut del = Vec::new();
                for &(column, field) in &columns {
                    match encode(column, row) {
                        Some(v) => {
                            args.push(field.clone());
                            args.push(v);
                        }
                        None => del.push(field.clone()),
                    }
                }
                args[1] = ((args.len() - 2) / 2).to_string();
                args.push(del.len().to_string());
                args.extend(del);
                args.push(view.field_ttl.len().to_string());
                for (f, secs) in &view.field_ttl {
                    args.push(f.clone());
                    args.push(secs.to_string());
                }
                out.push(Invocation { key, args, row });
            }
        }
        out
    }
}

/// The event times of a batch, µs since the epoch (a date is its midnight UTC).
fn event_times(batch: &RecordBatch, field: &str) -> Vec<i64> {
    let time = batch.column_by_name(field).expect("validated time field");
    match time.data_type() {
        DataType::Timestamp(..) => time
            .as_primitive::<TimestampMicrosecondType>()
            .values()
            .to_vec(),
        _ => time
            .as_primitive::<Date32Type>()
            .values()
            .iter()
            .map(|d| *d as i64 * 86_400_000_000)
            .collect(),
    }
}

/// Each command's reply, or why Redis refused it for good (`wrong_type`, `script_error`,
/// `refused`) and the error.
type Replies<T> = Vec<Result<T, (&'static str, String)>>;

/// What sending one pipeline came to.
type Sent<T> = Result<Replies<T>, GaveUp<RedisError>>;

/// One run of the script: for `key`, from the batch's `row`.
#[derive(Clone)]
struct Invocation {
    key: String,
    args: Vec<String>,
    row: usize,
}

/// A pipeline of `script` calls, `(keys, args)` each; each command's reply stands on its own,
/// so that one refused key fails only itself.
fn pipeline<'a>(
    script: &Script,
    calls: impl IntoIterator<Item = (&'a [String], &'a [String])>,
) -> Pipeline {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for (keys, args) in calls {
        let mut call = script.prepare_invoke();
        for key in keys {
            call.key(key.as_str());
        }
        for a in args {
            call.arg(a.as_bytes());
        }
        pipe.invoke_script(&call);
    }
    pipe
}

/// Sends one pipeline until Redis has answered every command, retrying transient failures;
/// returns each command's reply, or why Redis refused it for good.
async fn send<T: redis::FromRedisValue>(
    conn: Connection,
    script: &Script,
    pipe: &Pipeline,
    who: &Retrying<'_>,
    cancel: &CancellationToken,
) -> Sent<T> {
    let retried = &AtomicBool::new(false);
    failure::retry(who, cancel, failure::redis, || {
        let mut conn = conn.clone();
        async move {
            if retried.swap(true, Ordering::Relaxed) {
                // After a restart the server has forgotten the script.
                let _ = conn.load(script).await;
            }
            let replies = conn.query::<Vec<redis::RedisResult<T>>>(pipe).await?;
            let mut out = Vec::with_capacity(replies.len());
            for reply in replies {
                match reply {
                    Ok(v) => out.push(Ok(v)),
                    Err(error) => match failure::redis(&error) {
                        Class::PerRecord => out.push(Err((
                            match error.code() {
                                Some("WRONGTYPE") => "wrong_type",
                                _ if error.to_string().contains("script") => "script_error",
                                _ => "refused",
                            },
                            error.to_string(),
                        ))),
                        // Transient: the whole pipeline again (the scripts' guards make a
                        // second write of the same event a no-op); fatal: give up.
                        _ => return Err(error),
                    },
                }
            }
            Ok(out)
        }
    })
    .await
}
#[async_trait::async_trait]
impl Sink for RedisSink {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn enriches(&self) -> bool {
        self.aggregates.iter().any(aggregate::View::enriches)
            || self.views.iter().any(|v| !v.enrich.is_empty())
    }

    fn enrichment(&mut self) -> Vec<(String, ArrayRef)> {
        std::mem::take(&mut self.enrichment)
    }

    /// Durable once written: the features are acknowledged by Redis before the call returns,
    /// and a replay is a no-op (the guard), so Redis needs no position and never rolls back.
    async fn write(
        &mut self,
        rows: &RecordBatch,
        _originals: Option<&crate::event::Originals>,
        cancel: &CancellationToken,
    ) -> Result<Vec<Refusal>, SinkError> {
        let started = Instant::now();
        let refused = RedisSink::write(self, rows, cancel)
            .await
            .map_err(|e| match e {
                RedisSinkError::Cancelled => SinkError::Cancelled,
                e => SinkError::failed(e),
            })?;
        crate::telemetry::stage(&self.pipeline, "redis", started);
        Ok(refused)
    }
}
