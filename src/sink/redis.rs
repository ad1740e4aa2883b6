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
    array::{Array, AsArray},
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

use crate::{
    config::{KeyPart, RedisConnection, RedisSpec},
    event::Failure,
    failure::{self, Class, GaveUp, Retrying},
    sink::{Refusal, Sink, SinkError},
    util::text::{encode, render_key},
};

const SCRIPT: &str = r#"
local key = KEYS[1]
local ts, part, off, topic = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local cur = redis.call('HMGET', key, '_ts', '_topic', '_partition', '_offset')
if cur[1] then
  local cts, ct = tonumber(cur[1]), cur[2] or ''
  local cp, co = tonumber(cur[3]) or -1, tonumber(cur[4]) or -1
  if cts > ts or (cts == ts and (ct > topic or (ct == topic and
      (cp > part or (cp == part and co >= off))))) then
    return 0
  end
end
local i = 5
local ttl = tonumber(ARGV[i]); i = i + 1
local nset = tonumber(ARGV[i]); i = i + 1
local hset = {'_ts', ARGV[1], '_topic', ARGV[4], '_partition', ARGV[2], '_offset', ARGV[3]}
for _ = 1, nset do
  hset[#hset + 1] = ARGV[i]; hset[#hset + 1] = ARGV[i + 1]; i = i + 2
end
redis.call('HSET', key, unpack(hset))
local ndel = tonumber(ARGV[i]); i = i + 1
if ndel > 0 then
  local del = {}
  for j = 1, ndel do del[j] = ARGV[i]; i = i + 1 end
  redis.call('HDEL', key, unpack(del))
end
if ttl > 0 then redis.call('EXPIRE', key, ttl) end
local nttl = tonumber(ARGV[i]); i = i + 1
for _ = 1, nttl do
  redis.call('HEXPIRE', key, ARGV[i + 1], 'FIELDS', 1, ARGV[i]); i = i + 2
end
return 1
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

/// One view, resolved against the batch schema.
struct View {
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
    /// False while writes are failing; `/readyz` reports it.
    healthy: Arc<AtomicBool>,
}

impl RedisSink {
    /// Connects, checks the server supports what the views need, and loads the script.
    pub async fn open(
        pipeline: &str,
        spec: &RedisSpec,
        healthy: Arc<AtomicBool>,
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
        conn.load(&script)
            .await
            .map_err(|source| RedisSinkError::Connect {
                url: shown.clone(),
                source,
            })?;
        info!(url = %shown, cluster = spec.connection.cluster, views = spec.views.len(), "Connected to Redis.");
        healthy.store(true, Ordering::Release);
        let views = spec
            .views
            .iter()
            .map(|v| View {
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
        Ok(Self {
            pipeline: pipeline.to_owned(),
            spec: spec.clone(),
            conn,
            script,
            views,
            healthy,
        })
    }

    /// Writes a batch's features and returns once Redis has acknowledged every write, retrying
    /// transient failures with backoff; returns the rows whose writes Redis refused for good.
    pub async fn write(
        &mut self,
        batch: &RecordBatch,
        cancel: &CancellationToken,
    ) -> Result<Vec<Refusal>, RedisSinkError> {
        if batch.num_rows() == 0 {
            return Ok(Vec::new());
        }
        let started = Instant::now();
        let (invocations, future) = self.build(batch);
        let sent = invocations.len();
        let labels = [("pipeline", self.pipeline.clone())];
        metrics::counter!("sluice_redis_rows_coalesced_total", &labels)
            .increment((batch.num_rows() * self.views.len()).saturating_sub(sent) as u64);
        // A cluster routes each command by its key's slot, and a pipeline must stay within one
        // slot: there, every script goes alone, and the multiplexed connections pipeline them
        // on the wire, `max_in_flight * pipeline_size` at a time.
        let (chunk, concurrency) = if self.spec.connection.cluster {
            (1, self.spec.max_in_flight * self.spec.pipeline_size)
        } else {
            (self.spec.pipeline_size, self.spec.max_in_flight)
        };
        let pipes: Vec<(Pipeline, Vec<usize>)> = invocations
            .chunks(chunk)
            .map(|chunk| {
                let mut pipe = redis::pipe();
                // Each command's reply on its own, so that one refused key fails only itself.
                pipe.ignore_errors();
                for inv in chunk {
                    let mut call = self.script.prepare_invoke();
                    call.key(&inv.key);
                    for a in &inv.args {
                        call.arg(a.as_bytes());
                    }
                    pipe.invoke_script(&call);
                }
                (pipe, chunk.iter().map(|inv| inv.row).collect())
            })
            .collect();
        let who = Retrying {
            pipeline: &self.pipeline,
            metric: "sluice_redis_retries_total",
            what: "Redis write",
            healthy: Some(&self.healthy),
        };
        let results: Vec<Result<Sent, GaveUp<RedisError>>> = futures::stream::iter(pipes)
            .map(|(pipe, rows)| {
                let conn = self.conn.clone();
                let script = &self.script;
                let who = &who;
                async move { send(conn, script, &pipe, &rows, who, cancel).await }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        let (mut accepted, mut refused) = (0, Vec::new());
        for r in results {
            match r {
                Ok((n, mut bad)) => {
                    accepted += n;
                    refused.append(&mut bad);
                }
                Err(GaveUp::Cancelled) => return Err(RedisSinkError::Cancelled),
                Err(GaveUp::Failed(_, source)) => return Err(RedisSinkError::Fatal { source }),
            }
        }
        metrics::counter!("sluice_redis_rows_total", &labels).increment(accepted);
        metrics::counter!("sluice_redis_rows_stale_total", &labels)
            .increment((sent - refused.len()) as u64 - accepted);
        metrics::histogram!("sluice_redis_write_seconds", &labels)
            .record(started.elapsed().as_secs_f64());
        refused.extend(future);
        refused.sort_by_key(|r| r.row);
        Ok(refused)
    }

    /// One script invocation per (view, key): the newest event of the batch for that key; and
    /// the rows whose event time is too far in the future to be written at all.
    fn build(&self, batch: &RecordBatch) -> (Vec<Invocation>, Vec<Refusal>) {
        let time = batch
            .column_by_name(&self.spec.time_field)
            .expect("validated time field");
        let times: Vec<i64> = match time.data_type() {
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
        };
        let (topics, partitions, offsets) = crate::schema::provenance(batch);
        // An event time far in the future would win over every real event of its entity
        // until then: such rows are refused (review finding A8). It also keeps event times far
        // below 2^53 µs, where the script's numbers (doubles) stop being exact.
        let skew = self.spec.max_event_time_skew;
        let limit = chrono::Utc::now().timestamp_micros() + skew.as_micros() as i64;
        let future: Vec<Refusal> = (0..batch.num_rows())
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
            .collect();
        let mut out = Vec::new();
        for view in &self.views {
            // Newest row per key: by event time, then topic, partition and offset.
            let mut newest: HashMap<String, usize> = HashMap::new();
            for row in (0..batch.num_rows()).filter(|r| times[*r] <= limit) {
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
            for (key, row) in newest {
                let mut set = Vec::new();
                let mut del = Vec::new();
                for (column, field) in &view.fields {
                    match encode(batch.column_by_name(column).expect("validated column"), row) {
                        Some(v) => {
                            set.push(field.clone());
                            set.push(v);
                        }
                        None => del.push(field.clone()),
                    }
                }
                let mut args = vec![
                    times[row].to_string(),
                    partitions.value(row).to_string(),
                    offsets.value(row).to_string(),
                    topics.value(row).to_owned(),
                    view.ttl_secs.to_string(),
                    (set.len() / 2).to_string(),
                ];
                args.extend(set);
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
        (out, future)
    }
}

/// What one pipeline did: how many scripts wrote, and the rows Redis refused for good.
type Sent = (u64, Vec<Refusal>);

/// One run of the script: for `key`, from the batch's `row`.
struct Invocation {
    key: String,
    args: Vec<String>,
    row: usize,
}

/// Sends one pipeline until Redis has answered every command, retrying transient failures;
/// returns how many scripts wrote (the others found a newer event already stored) and the
/// rows (`rows[i]` for the pipeline's command `i`) whose commands Redis refused for good.
async fn send(
    conn: Connection,
    script: &Script,
    pipe: &Pipeline,
    rows: &[usize],
    who: &Retrying<'_>,
    cancel: &CancellationToken,
) -> Result<Sent, GaveUp<RedisError>> {
    let retried = &AtomicBool::new(false);
    failure::retry(who, cancel, failure::redis, || {
        let mut conn = conn.clone();
        async move {
            if retried.swap(true, Ordering::Relaxed) {
                // After a restart the server has forgotten the script.
                let _ = conn.load(script).await;
            }
            let replies = conn.query::<Vec<redis::RedisResult<u64>>>(pipe).await?;
            let (mut written, mut refused) = (0, Vec::new());
            for (i, reply) in replies.into_iter().enumerate() {
                match reply {
                    Ok(n) => written += n,
                    Err(error) => match failure::redis(&error) {
                        Class::PerRecord => refused.push(self::refused(
                            rows[i],
                            match error.code() {
                                Some("WRONGTYPE") => "wrong_type",
                                _ if error.to_string().contains("script") => "script_error",
                                _ => "refused",
                            },
                            error.to_string(),
                        )),
                        // Transient: the whole pipeline again (the script makes a second write of
                        // the same event a no-op); fatal: give up.
                        _ => return Err(error),
                    },
                }
            }
            Ok((written, refused))
        }
    })
    .await
}
#[async_trait::async_trait]
impl Sink for RedisSink {
    fn name(&self) -> &'static str {
        "redis"
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
