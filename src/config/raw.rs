//! The pipeline file as written: every key optional, every leaf a [`Setting`] that records a
//! type error instead of failing, so validation can report all problems in one pass.
//! The doc comments here are the user documentation of each key; `pipelines/orders.toml`
//! shows them in use.

use std::collections::BTreeMap;

use serde::{de::DeserializeOwned, Deserialize, Deserializer};
use serde_json::Value;

use super::{
    env,
    units::{HumanDuration, HumanSize},
};

/// A leaf value after `${VAR}` substitution: the typed value, or why it could not be read.
#[derive(Debug, Clone)]
pub struct Setting<T>(pub Result<T, String>);

impl<'de, T: DeserializeOwned> Deserialize<'de> for Setting<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(d)?;
        let substituted = matches!(&value, Value::String(s) if s.contains("${"));
        Ok(Setting(expand(value).and_then(|v| {
            T::deserialize(v.clone()).or_else(|e| match &v {
                // `"${N:-10}"` is a string in TOML: after substitution it may be a number or a
                // boolean.
                Value::String(text) if substituted => match serde_json::from_str::<Value>(text) {
                    Ok(n @ (Value::Number(_) | Value::Bool(_))) => {
                        T::deserialize(n).map_err(|e| e.to_string())
                    }
                    _ => Err(e.to_string()),
                },
                _ => Err(e.to_string()),
            })
        })))
    }
}

/// Applies `${VAR}` substitution to every string inside a value.
fn expand(value: Value) -> Result<Value, String> {
    Ok(match value {
        Value::String(s) => Value::String(env::substitute(&s, |k| std::env::var(k).ok())?),
        Value::Array(items) => {
            Value::Array(items.into_iter().map(expand).collect::<Result<_, _>>()?)
        }
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| Ok((k, expand(v)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other,
    })
}

/// A librdkafka property value: TOML strings, integers and booleans are all passed as text.
#[derive(Debug, Clone)]
pub struct PropertyValue(pub String);

impl<'de> Deserialize<'de> for PropertyValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Self(s)),
            Value::Number(n) => Ok(Self(n.to_string())),
            Value::Bool(b) => Ok(Self(b.to_string())),
            other => Err(serde::de::Error::custom(format!(
                "expected a string, number or boolean, got {other}"
            ))),
        }
    }
}

pub type Properties = BTreeMap<String, PropertyValue>;

#[derive(Debug, Default, Deserialize)]
pub struct RawPipeline {
    /// Pipeline name: letters, digits, `_`, `-`, `.`; used in metrics, logs and file metadata.
    pub name: Option<Setting<String>>,
    /// JSON Schema file of the events, relative to this file.
    pub schema: Option<Setting<String>>,
    pub source: Option<RawSource>,
    pub batch: Option<RawBatch>,
    pub errors: Option<RawErrors>,
    pub sink: Option<RawSinks>,
    /// `[[model]]` sections: TorchScript models that score every valid event.
    pub model: Option<Vec<RawModel>>,
    /// `[join]`: this pipeline joins a model's feedback with labels into training examples.
    pub join: Option<super::join::RawJoin>,
    /// `[train]`: this file configures the trainer of a model (`sluice train`).
    pub train: Option<super::train::RawTrain>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawSource {
    /// Comma-separated `host:port` list.
    pub bootstrap_servers: Option<Setting<String>>,
    /// Topics to consume.
    pub topics: Option<Setting<Vec<String>>>,
    /// Consumer group; every instance of the pipeline uses the same one.
    pub group_id: Option<Setting<String>>,
    /// Where a partition without a committed offset starts: `earliest` (default) or `latest`.
    pub start_from: Option<Setting<String>>,
    /// Raw librdkafka consumer properties, passed through (security, timeouts, fetch sizes).
    pub properties: Option<Setting<Properties>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawBatch {
    /// Rows per micro-batch (default 10000).
    pub max_rows: Option<Setting<usize>>,
    /// Payload bytes per micro-batch (default "16MiB").
    pub max_bytes: Option<Setting<HumanSize>>,
    /// Longest a micro-batch waits to fill up (default "500ms").
    pub max_delay: Option<Setting<HumanDuration>>,
    /// Micro-batches queued between the source and the sinks before consumption pauses
    /// (default 4).
    pub max_in_flight: Option<Setting<usize>>,
    /// Close a micro-batch as soon as the consumer has nothing more ready, while the pipeline
    /// waits for input (default true): milliseconds from consumption to the sinks at moderate
    /// load; at full load (the pipeline busy) batches still fill to their limits. false: only
    /// the limits close a batch.
    pub eager: Option<Setting<bool>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawErrors {
    /// `dead_letter` (default), `skip` or `fail`.
    pub policy: Option<Setting<String>>,
    /// Topic that receives rejected events; required with `dead_letter`.
    pub dead_letter_topic: Option<Setting<String>>,
    /// Raw librdkafka producer properties for the dead-letter producer.
    pub producer_properties: Option<Setting<Properties>>,
    /// Larger payloads are rejected (default "1MiB").
    pub max_event_size: Option<Setting<HumanSize>>,
    /// Deeper JSON nesting is rejected (default 32, at most 128).
    pub max_depth: Option<Setting<usize>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawSinks {
    pub parquet: Option<RawParquet>,
    pub redis: Option<RawRedis>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawRedis {
    /// `redis://[user:password@]host:port[/db]` or `rediss://` for TLS; secrets through
    /// `${VAR}`. A URL ending in `#insecure` (no certificate check) is refused.
    pub url: Option<Setting<String>>,
    /// Cluster mode: seed node URLs (same scheme and credentials); `url` is then not used.
    pub cluster_nodes: Option<Setting<Vec<String>>>,
    /// PEM file of the CA that signed the server's certificate, for `rediss://` servers whose
    /// certificate the system's roots do not cover (relative to this file).
    pub tls_ca_file: Option<Setting<String>>,
    /// The event-time field (date-time or date): a write never replaces a newer event.
    pub time_field: Option<Setting<String>>,
    /// Pipelined writes in flight at once (default 4).
    pub max_in_flight: Option<Setting<usize>>,
    /// Commands per pipeline (default 500).
    pub pipeline_size: Option<Setting<usize>>,
    /// How far past now an event time may be (default "1h"): a later one would make every
    /// real event of its entity look older, so it is a dead letter (`future_event_time`).
    pub max_event_time_skew: Option<Setting<HumanDuration>>,
    /// Memory for sluice's snapshots of the aggregate views' hashes, as its writes left them
    /// (default "64MiB", shared by the views; "0" keeps none). A write of an entity whose
    /// snapshot is current sets only what changes, by compare-and-set: a fraction of Redis's
    /// work.
    pub aggregate_cache: Option<Setting<HumanSize>>,
    /// Feature views: each writes one hash per entity.
    pub views: Option<Vec<RawView>>,
    /// Aggregate views: windowed count/sum/avg/min/max per entity, one hash per entity.
    pub aggregates: Option<Vec<RawAggregate>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawAggregate {
    /// View name; letters, digits, `_`, `-`. Model inputs name its features
    /// `<name>.<feature>_<window>`.
    pub name: Option<Setting<String>>,
    /// Key template of the entity's hash, e.g. `velocity:{customer_id}`.
    pub key: Option<Setting<String>>,
    /// Event-time bucket of the partial aggregates (whole seconds, e.g. "1m"); every window
    /// is a whole number of buckets, and its trailing edge moves a bucket at a time.
    pub bucket: Option<Setting<HumanDuration>>,
    /// Sliding windows in event time, e.g. ["1h", "24h", "7d"].
    pub windows: Option<Setting<Vec<String>>>,
    /// How far behind the entity's newest event time an event still counts (default "0s");
    /// a later one is counted in `sluice_redis_aggregate_events_total{result="late"}` only.
    pub lateness: Option<Setting<HumanDuration>>,
    /// EXPIRE of each entity's hash, refreshed on every write (default and minimum: the
    /// longest window, the lateness and one bucket).
    pub ttl: Option<Setting<HumanDuration>>,
    /// The aggregates, each over every window.
    pub features: Option<Vec<RawAggregateFeature>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawAggregateFeature {
    /// Feature name (letters, digits, `_`); stored values are `<name>_<window>`.
    pub name: Option<Setting<String>>,
    /// `count`, `sum`, `avg`, `min` or `max`.
    pub function: Option<Setting<String>>,
    /// The column: a number for `sum`, `avg`, `min`, `max`; with `count`, the column that
    /// must equal `equals` for an event to count.
    pub column: Option<Setting<String>>,
    /// With `count` and `column`: count only events whose column has this value.
    pub equals: Option<Setting<Value>>,
}

/// Where a Redis server or cluster is (the same keys as in `[sink.redis]`).
#[derive(Debug, Default, Deserialize)]
pub struct RawRedisConnection {
    /// `redis://[user:password@]host:port[/db]` or `rediss://` for TLS; secrets through `${VAR}`.
    pub url: Option<Setting<String>>,
    /// Cluster mode: seed node URLs; `url` is then not used.
    pub cluster_nodes: Option<Setting<Vec<String>>>,
    /// PEM file of the CA that signed the server's certificate (relative to this file).
    pub tls_ca_file: Option<Setting<String>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawView {
    /// View name; letters, digits, `_`, `-`.
    pub name: Option<Setting<String>>,
    /// Key template: text with `{column}` placeholders, e.g. `cust:{customer_id}`.
    pub key: Option<Setting<String>>,
    /// Prefix every key with `<name>:` (default false).
    pub prefix_keys: Option<Setting<bool>>,
    /// Columns stored as hash fields.
    pub columns: Option<Setting<Vec<String>>>,
    /// Hash field name of a column, when not the column's name.
    pub field_names: Option<Setting<BTreeMap<String, String>>>,
    /// EXPIRE of each entity's hash, refreshed on every accepted write (with `field_ttl` and no
    /// `ttl`: the largest field TTL, so that no hash outlives its fields).
    pub ttl: Option<Setting<HumanDuration>>,
    /// HEXPIRE of single fields, by hash field name (Redis 7.4 or later).
    pub field_ttl: Option<Setting<BTreeMap<String, HumanDuration>>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawParquet {
    /// A local directory (relative to this file) or `file://`, `s3://`, `gs://`, `az://` URL.
    pub path: Option<Setting<String>>,
    /// Hive partitions, in order: `dt` and `hour` come from `time_field`; any other name is a
    /// top-level string, integer, boolean or date field.
    pub partition_by: Option<Setting<Vec<String>>>,
    /// The event-time field (`format: date-time`, or `date` for `dt` only).
    pub time_field: Option<Setting<String>>,
    /// `zstd` (default), `zstd:LEVEL`, `snappy`, `lz4`, `gzip` or `none`.
    pub compression: Option<Setting<String>>,
    /// Rows per row group (default 100000).
    pub row_group_rows: Option<Setting<usize>>,
    /// A file is finished when it reaches this size (default "128MiB").
    pub max_file_size: Option<Setting<HumanSize>>,
    /// A file is finished when it is this old (default "5m").
    pub max_file_age: Option<Setting<HumanDuration>>,
    /// A file is finished when no row was added for this long (default "30s").
    pub idle_flush: Option<Setting<HumanDuration>>,
    /// Files open at once per Kafka partition, one per Hive folder (default 32): a batch that
    /// needs more finishes the partition's segment and goes on in a new one.
    pub max_open_files: Option<Setting<usize>>,
    /// Local folder for files being written before upload (object stores only; default: the
    /// system temporary folder).
    pub spool_dir: Option<Setting<String>>,
    /// `object_store` options such as `aws_endpoint`, `aws_region`, `aws_allow_http`.
    pub storage_options: Option<Setting<Properties>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawModel {
    /// Model name; letters, digits, `_`, `-`. Used in predictions, headers and metrics.
    pub name: Option<Setting<String>>,
    /// A model repository (`<path>/<version>/model.pt`, the highest version is served) or one
    /// TorchScript file (relative to this file).
    pub path: Option<Setting<String>>,
    /// `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when available, else CPU).
    pub device: Option<Setting<String>>,
    /// Threads that run the model (default 1); each runs one batch at a time.
    pub threads: Option<Setting<usize>>,
    /// libtorch intra-op threads (process-wide: the largest value of all models; default 1).
    pub intra_op_threads: Option<Setting<usize>>,
    /// Rows per forward pass at most (default 256).
    pub max_batch: Option<Setting<usize>>,
    /// How long a model thread waits for more rows to fill a batch (default "0ms": a pass
    /// takes what is queued; under load rows queue while a pass runs, so passes fill by
    /// themselves).
    pub max_delay: Option<Setting<HumanDuration>>,
    /// Rows admitted and not yet scored at most; when full, intake waits (default 20000).
    pub queue_rows: Option<Setting<usize>>,
    /// How often the repository or file is checked for a new version ("0s": never; default "5s").
    pub reload_interval: Option<Setting<HumanDuration>>,
    /// Share of rows failing (raised, wrong shape, non-finite) in a window of
    /// `breaker_min_rows` that takes a version out of service (0 < rate ≤ 1; default 0.5).
    pub breaker_failure_rate: Option<Setting<f64>>,
    /// Rows per window of the circuit breaker (default 100).
    pub breaker_min_rows: Option<Setting<usize>>,
    /// The feature vector, in order.
    pub inputs: Option<Vec<RawInput>>,
    /// What the model returns.
    pub output: Option<RawOutput>,
    /// Topic of the predictions.
    pub output_topic: Option<Setting<String>>,
    /// Topic of the feedback records (features as fed, outputs, version); optional.
    pub feedback_topic: Option<Setting<String>>,
    /// `object_store` options for a repository on an object store (`path = "s3://…"`).
    pub storage_options: Option<Setting<Properties>>,
    /// Where an object store's versions are downloaded (default: the temporary folder).
    pub cache_dir: Option<Setting<String>>,
    /// Topic of a shadow version's predictions (see `rollout.json`); optional.
    pub shadow_topic: Option<Setting<String>>,
    /// Message key of predictions and feedback: a template like `{customer_id}`.
    pub key: Option<Setting<String>>,
    /// The column that identifies an event (`event_id` in predictions).
    pub id_column: Option<Setting<String>>,
    /// Columns copied into each prediction as they are.
    pub pass_through: Option<Setting<Vec<String>>>,
    /// Raw librdkafka properties for the predictions producer.
    pub producer_properties: Option<Setting<Properties>>,
    /// How the inference API shares the model with the stream.
    pub serving: Option<RawServing>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawServing {
    /// Rows of requests admitted at once (default 1024); beyond it a request is refused with
    /// 429 / `RESOURCE_EXHAUSTED` and a retry hint, never queued without bound.
    pub queue_rows: Option<Setting<usize>>,
    /// Share of each forward pass reserved for requests while the stream's rows also wait
    /// (0 < share < 1, default 0.25): a backlog on the stream delays a request by one forward
    /// pass at most, and requests never take more than their share from the stream.
    pub share: Option<Setting<f64>>,
    /// A request's deadline unless it asks for a shorter one (default "1s"): past it, the
    /// request is answered 504 / `DEADLINE_EXCEEDED`.
    pub timeout: Option<Setting<HumanDuration>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawInput {
    /// The column the feature(s) come from.
    pub column: Option<Setting<String>>,
    /// Instead of a column: an aggregate from Redis for the event's entity,
    /// `<view>.<feature>_<window>` (the windows ending at the event's own event time).
    pub aggregate: Option<Setting<String>>,
    /// Instead of a column: a latest-value view's field for the event's entity,
    /// `<view>.<hash field>` (a number or boolean), as of the entity's previous event.
    pub latest: Option<Setting<String>>,
    /// Value used when the column is null or absent; without it, such an event is a dead
    /// letter (stage `inference`, reason `null_input`).
    pub null: Option<Setting<f64>>,
    /// Categorical: one feature per value, 1.0 for the event's value (unknown, null: all 0).
    pub one_hot: Option<Setting<Vec<String>>>,
    /// Categorical: one feature, the value's position in this list (unknown, null: its length).
    pub index: Option<Setting<Vec<String>>>,
    /// From a date-time: `hour` (0-23, UTC), `day_of_week` (0 = Monday) or `epoch_seconds`.
    pub extract: Option<Setting<String>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawOutput {
    /// `score` (one value per event), `probabilities` (one per class) or `label` (the class
    /// with the highest value, and that value).
    pub kind: Option<Setting<String>>,
    /// Name of the score (default "score").
    pub name: Option<Setting<String>>,
    /// Class names, in the order of the model's output columns.
    pub classes: Option<Setting<Vec<String>>>,
}
