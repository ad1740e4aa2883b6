//! Pipeline files: load (`config` crate), substitute `${VAR}`, validate every key, and build the
//! typed [`Pipeline`] the runtime uses ("parse, then build").
//!
//! Validation never stops at the first problem: [`load`] returns every problem found, each
//! with its key path, e.g. `sink.parquet.max_file_size: expected a size like "128MiB", got "big"`.

mod aggregate;
mod env;
mod join;
mod model;
mod raw;
mod redis;
mod train;
pub mod units;

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use parquet::basic::{Compression, GzipLevel, ZstdLevel};

use self::raw::{Properties, RawParquet, RawPipeline, Setting};
pub use self::{
    aggregate::{AggregateFeature, AggregateSpec, Function, Part},
    join::{JoinSpec, Unlabelled},
    model::{
        default_cache, repository_location, BreakerSpec, DeviceChoice, Encoding, InputSpec,
        ModelSource, ModelSpec, OutputSpec, RepositoryLocation, ServingSpec, TimePart,
    },
    redis::{redact, KeyPart, RedisConnection, RedisSpec, ViewSpec},
    train::{GateSpec, OptimizerSpec, RolloutSpec, TrainSpec},
};
use crate::schema::{EventSchema, Kind};

/// A validated pipeline.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    /// The file it was loaded from.
    pub file: PathBuf,
    pub source: SourceSpec,
    pub schema_path: PathBuf,
    pub schema: Arc<EventSchema>,
    pub batch: BatchSpec,
    pub errors: ErrorSpec,
    pub parquet: Option<ParquetSpec>,
    pub redis: Option<RedisSpec>,
    /// Models that score every valid event; empty when none.
    pub models: Vec<ModelSpec>,
    /// Set for a join pipeline (feedback + labels → examples); it has no other sink.
    pub join: Option<JoinSpec>,
    /// Set for a trainer file (`sluice train`): examples → gated model versions.
    pub train: Option<TrainSpec>,
}

#[derive(Debug, Clone)]
pub struct SourceSpec {
    pub bootstrap_servers: String,
    pub topics: Vec<String>,
    pub group_id: String,
    pub start_from: StartFrom,
    pub properties: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    Earliest,
    Latest,
}

#[derive(Debug, Clone)]
pub struct BatchSpec {
    pub max_rows: usize,
    pub max_bytes: usize,
    pub max_delay: Duration,
    pub max_in_flight: usize,
    /// Close a micro-batch as soon as the consumer has nothing more ready and no earlier batch
    /// waits for the pipeline task (while it is busy, the next batch gathers what arrives; at
    /// full load batches still fill up).
    pub eager: bool,
}

#[derive(Debug, Clone)]
pub struct ErrorSpec {
    pub policy: ErrorPolicy,
    pub max_event_size: usize,
    pub max_depth: usize,
}

#[derive(Debug, Clone)]
pub enum ErrorPolicy {
    /// Rejected events go to this topic; their offsets are committed once the broker has them.
    DeadLetter {
        topic: String,
        producer_properties: BTreeMap<String, String>,
    },
    /// Rejected events are counted, logged at debug level and dropped.
    Skip,
    /// The first rejected event stops the pipeline with an error, nothing past it committed.
    Fail,
}

#[derive(Debug, Clone)]
pub struct ParquetSpec {
    pub location: Location,
    pub partition_by: Vec<PartitionKey>,
    pub time_field: Option<String>,
    pub compression: Compression,
    pub row_group_rows: usize,
    pub max_file_size: u64,
    pub max_file_age: Duration,
    pub idle_flush: Duration,
    pub max_open_files: usize,
    pub spool_dir: PathBuf,
    pub storage_options: BTreeMap<String, String>,
}

/// Where Parquet files go.
#[derive(Debug, Clone, PartialEq)]
pub enum Location {
    Local(PathBuf),
    ObjectStore(url::Url),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local(p) => write!(f, "{}", p.display()),
            Self::ObjectStore(u) => write!(f, "{u}"),
        }
    }
}

/// One level of Hive partitioning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionKey {
    /// `dt=YYYY-MM-DD` of the time field, UTC.
    Date,
    /// `hour=HH` of the time field, UTC.
    Hour,
    /// `name=value` of a top-level field.
    Field(String),
}

/// Every problem found in one pipeline file.
#[derive(Debug)]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: {} problem(s)",
            self.file.display(),
            self.problems.len()
        )?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Properties that sluice sets itself; overriding them would break the delivery guarantees.
const RESERVED_CONSUMER_PROPERTIES: [&str; 5] = [
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
];

/// Loads, validates and builds one pipeline file.
pub fn load(file: &Path) -> Result<Pipeline, ConfigErrors> {
    let fail = |problems| ConfigErrors {
        file: file.to_owned(),
        problems,
    };
    let settings = config::Config::builder()
        .add_source(config::File::from(file).format(config::FileFormat::Toml))
        .build()
        .map_err(|e| fail(vec![e.to_string()]))?;
    let mut unknown = Vec::new();
    let raw: RawPipeline = serde_ignored::deserialize(settings, |path| {
        // serde_ignored writes `?` for each Option level; key paths do not show them.
        let path = path.to_string().replace(".?", "");
        unknown.push(format!("{}: unknown key", path.trim_start_matches("?.")))
    })
    .map_err(|e| fail(vec![e.to_string()]))?;
    let base = file.parent().unwrap_or(Path::new("."));
    let mut p = Problems(unknown);
    let pipeline = build(&raw, file, base, &mut p);
    match pipeline {
        Some(pipeline) if p.0.is_empty() => Ok(pipeline),
        _ => Err(fail(p.0)),
    }
}

/// Collects problems with their key paths.
struct Problems(Vec<String>);

impl Problems {
    fn push(&mut self, path: &str, message: impl fmt::Display) {
        self.0.push(format!("{path}: {message}"));
    }

    /// `Ok(None)` when absent, `Err(())` (recorded) when invalid.
    fn read<T: Clone>(
        &mut self,
        path: &str,
        setting: &Option<Setting<T>>,
    ) -> Result<Option<T>, ()> {
        match setting {
            None => Ok(None),
            Some(Setting(Ok(v))) => Ok(Some(v.clone())),
            Some(Setting(Err(e))) => {
                self.push(path, e);
                Err(())
            }
        }
    }

    /// The value of an optional setting, `default` when absent, `None` (recorded) when invalid.
    fn get<T: Clone>(&mut self, path: &str, setting: &Option<Setting<T>>, default: T) -> Option<T> {
        self.read(path, setting).ok().map(|v| v.unwrap_or(default))
    }

    /// The value of a required setting.
    fn required<T: Clone>(&mut self, path: &str, setting: &Option<Setting<T>>) -> Option<T> {
        match self.read(path, setting) {
            Ok(Some(v)) => Some(v),
            Ok(None) => {
                self.push(path, "is required");
                None
            }
            Err(()) => None,
        }
    }

    fn positive<T: PartialOrd + Default + Copy>(&mut self, path: &str, v: Option<T>) -> Option<T> {
        match v {
            Some(x) if x <= T::default() => {
                self.push(path, "must be greater than 0");
                None
            }
            other => other,
        }
    }
}

fn properties(
    p: &mut Problems,
    path: &str,
    s: &Option<Setting<Properties>>,
) -> BTreeMap<String, String> {
    p.get(path, s, Properties::new())
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect()
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn build(raw: &RawPipeline, file: &Path, base: &Path, p: &mut Problems) -> Option<Pipeline> {
    let name = p.required("name", &raw.name);
    if let Some(n) = name.as_deref().filter(|n| !valid_name(n)) {
        p.push(
            "name",
            format!("{n:?} may only use letters, digits, `_`, `-` and `.`"),
        );
    }

    let join = raw.join.as_ref().map(|j| join::build_join(j, base, p));
    let train = raw.train.as_ref().map(|t| train::build_train(t, base, p));
    if join.is_some() && train.is_some() {
        p.push("train", "a file is a join pipeline or a trainer, not both");
    }
    // Join pipelines and trainers read sluice's own records: their schemas are built in.
    let built_in = match (&join, &train) {
        (Some(_), _) => Some(("join", join::SCHEMA, "feedback records and labels")),
        (None, Some(_)) => Some(("train", train::SCHEMA, "training examples")),
        (None, None) => None,
    };
    let (schema_path, schema) = if let Some((kind, text, what)) = built_in {
        if raw.schema.is_some() {
            p.push(
                "schema",
                format!("a {kind} file reads {what}, whose schema is built in; leave it out"),
            );
        }
        let schema = EventSchema::compile(&serde_json::from_str(text).expect("JSON"))
            .expect("the built-in schemas compile");
        (
            Some(PathBuf::from(format!("<built-in: {kind}>"))),
            Some(Arc::new(schema)),
        )
    } else {
        let schema_path = p.required("schema", &raw.schema).map(|s| base.join(s));
        let schema = schema_path
            .as_ref()
            .and_then(|path| match EventSchema::load(path) {
                Ok(s) => Some(Arc::new(s)),
                Err(errors) => {
                    for e in errors {
                        p.push("schema", e);
                    }
                    None
                }
            });
        (schema_path, schema)
    };

    let source = {
        let s = raw.source.as_ref();
        if s.is_none() {
            p.push("source", "is required");
        }
        let s = s.map(|s| {
            let bootstrap = p.required("source.bootstrap_servers", &s.bootstrap_servers);
            if bootstrap.as_deref().is_some_and(|b| b.trim().is_empty()) {
                p.push("source.bootstrap_servers", "must not be empty");
            }
            let derived = match (&join, &train) {
                (Some(j), _) => Some((
                    j.as_ref().map(JoinSpec::topics),
                    "a join pipeline consumes join.feedback_topic and join.labels_topic",
                )),
                (None, Some(t)) => Some((
                    t.as_ref().map(|t| vec![t.examples_topic.clone()]),
                    "a trainer consumes train.examples_topic",
                )),
                (None, None) => None,
            };
            let topics = match derived {
                Some((topics, why)) => {
                    if s.topics.is_some() {
                        p.push("source.topics", format!("{why}; leave it out"));
                    }
                    topics
                }
                None => p.required("source.topics", &s.topics),
            };
            if let Some(t) = &topics {
                if t.is_empty() {
                    p.push("source.topics", "must name at least one topic");
                }
                for bad in t.iter().filter(|t| !valid_name(t) || t.len() > 249) {
                    p.push(
                        "source.topics",
                        format!("{bad:?} is not a valid topic name"),
                    );
                }
            }
            let group_id = p.required("source.group_id", &s.group_id);
            let start_from = match p.get("source.start_from", &s.start_from, "earliest".into()) {
                Some(v) if v == "earliest" => Some(StartFrom::Earliest),
                Some(v) if v == "latest" => Some(StartFrom::Latest),
                Some(v) => {
                    p.push(
                        "source.start_from",
                        format!("expected \"earliest\" or \"latest\", got {v:?}"),
                    );
                    None
                }
                None => None,
            };
            let props = properties(p, "source.properties", &s.properties);
            for key in props
                .keys()
                .filter(|k| RESERVED_CONSUMER_PROPERTIES.contains(&k.as_str()))
            {
                p.push(
                    &format!("source.properties.{key}"),
                    "is set by sluice (use the source keys; offsets are committed only after \
                     the data is durable)",
                );
            }
            Some(SourceSpec {
                bootstrap_servers: bootstrap?,
                topics: topics?,
                group_id: group_id?,
                start_from: start_from?,
                properties: props,
            })
        });
        s.flatten()
    };

    let default_batch = Default::default();
    let b = raw.batch.as_ref().unwrap_or(&default_batch);
    let max_rows = p.get("batch.max_rows", &b.max_rows, 10_000);
    let max_rows = p.positive("batch.max_rows", max_rows);
    let max_bytes = p
        .get("batch.max_bytes", &b.max_bytes, units::HumanSize(16 << 20))
        .map(|s| s.0);
    let max_bytes = p.positive("batch.max_bytes", max_bytes);
    let max_delay = p
        .get(
            "batch.max_delay",
            &b.max_delay,
            units::HumanDuration(Duration::from_millis(500)),
        )
        .map(|d| d.0);
    let max_delay = p.positive("batch.max_delay", max_delay);
    let max_in_flight = p.get("batch.max_in_flight", &b.max_in_flight, 4);
    let max_in_flight = p.positive("batch.max_in_flight", max_in_flight);
    let eager = p.get("batch.eager", &b.eager, true);

    let default_errors = Default::default();
    let e = raw.errors.as_ref().unwrap_or(&default_errors);
    if train.is_some() && raw.errors.is_some() {
        p.push(
            "errors",
            "a trainer produces no dead letters (examples it cannot read are counted and \
             skipped); leave it out",
        );
    }
    let default_policy = if train.is_some() {
        "skip"
    } else {
        "dead_letter"
    };
    let policy = match p
        .get("errors.policy", &e.policy, default_policy.into())
        .as_deref()
    {
        Some("dead_letter") => {
            let topic = p.required("errors.dead_letter_topic", &e.dead_letter_topic);
            if let Some(t) = topic.as_deref().filter(|t| !valid_name(t)) {
                p.push(
                    "errors.dead_letter_topic",
                    format!("{t:?} is not a valid topic name"),
                );
            }
            if let (Some(t), Some(s)) = (&topic, &source) {
                if s.topics.contains(t) {
                    p.push(
                        "errors.dead_letter_topic",
                        "must differ from the source topics",
                    );
                }
            }
            let producer_properties =
                properties(p, "errors.producer_properties", &e.producer_properties);
            topic.map(|topic| ErrorPolicy::DeadLetter {
                topic,
                producer_properties,
            })
        }
        Some("skip") | Some("fail") if e.dead_letter_topic.is_some() => {
            p.push(
                "errors.dead_letter_topic",
                "is only used with policy = \"dead_letter\"",
            );
            None
        }
        Some("skip") => Some(ErrorPolicy::Skip),
        Some("fail") => Some(ErrorPolicy::Fail),
        Some(other) => {
            p.push(
                "errors.policy",
                format!("expected \"dead_letter\", \"skip\" or \"fail\", got {other:?}"),
            );
            None
        }
        None => None,
    };
    let max_event_size = p
        .get(
            "errors.max_event_size",
            &e.max_event_size,
            units::HumanSize(1 << 20),
        )
        .map(|s| s.0 as usize);
    let max_event_size = p.positive("errors.max_event_size", max_event_size);
    let max_depth = match p.get("errors.max_depth", &e.max_depth, 32) {
        Some(d) if (1..=128).contains(&d) => Some(d),
        Some(d) => {
            p.push(
                "errors.max_depth",
                format!("must be between 1 and 128, got {d}"),
            );
            None
        }
        None => None,
    };

    let sinks = raw.sink.as_ref();
    let parquet = sinks
        .and_then(|s| s.parquet.as_ref())
        .map(|pq| build_parquet(pq, base, schema.as_deref(), p));
    let redis = sinks
        .and_then(|s| s.redis.as_ref())
        .map(|r| redis::build_redis(r, base, schema.as_deref(), p));
    let mut topics: Vec<String> = source
        .as_ref()
        .map(|s| s.topics.clone())
        .unwrap_or_default();
    if let Some(ErrorPolicy::DeadLetter { topic, .. }) = &policy {
        topics.push(topic.clone());
    }
    let models = raw.model.as_deref().unwrap_or_default();
    let numeric = |column: &str| {
        schema
            .as_deref()
            .and_then(|s| s.field(column))
            .is_some_and(|f| {
                matches!(
                    f.kind,
                    Kind::Integer { .. } | Kind::Number { .. } | Kind::Boolean
                )
            })
    };
    let specs: Vec<&RedisSpec> = redis.iter().flatten().collect();
    let from_redis = model::RedisInputs {
        aggregates: specs
            .iter()
            .flat_map(|r| &r.aggregates)
            .flat_map(|a| {
                a.feature_names()
                    .into_iter()
                    .map(move |f| format!("{}.{f}", a.name))
            })
            .collect(),
        latest: specs
            .iter()
            .flat_map(|r| &r.views)
            .flat_map(|v| {
                v.fields
                    .iter()
                    .filter(|(c, _)| numeric(c))
                    .map(move |(_, f)| format!("{}.{f}", v.name))
            })
            .collect(),
    };
    let models = model::build_models(models, base, schema.as_deref(), &topics, &from_redis, p);
    if let Some(j) = &join {
        if parquet.is_some() || redis.is_some() || models.as_ref().is_some_and(|m| !m.is_empty()) {
            p.push(
                "join",
                "a join pipeline produces examples only: give sinks and models a pipeline of \
                 their own",
            );
        }
        if policy
            .as_ref()
            .is_some_and(|p| !matches!(p, ErrorPolicy::DeadLetter { .. }))
        {
            p.push(
                "errors.policy",
                "a join pipeline needs \"dead_letter\": duplicate, late and unknown labels go \
                 there",
            );
        }
        if let (Some(j), Some(ErrorPolicy::DeadLetter { topic, .. })) = (j, &policy) {
            if *topic == j.examples_topic {
                p.push(
                    "errors.dead_letter_topic",
                    "must differ from join.examples_topic",
                );
            }
        }
    } else if train.is_some() {
        if parquet.is_some() || redis.is_some() || models.as_ref().is_some_and(|m| !m.is_empty()) {
            p.push(
                "train",
                "a trainer reads examples only: give sinks and models a pipeline of their own",
            );
        }
    } else if parquet.is_none() && redis.is_none() && models.as_ref().is_some_and(Vec::is_empty) {
        p.push(
            "sink",
            "at least one sink is required (sink.parquet, sink.redis, or a [[model]])",
        );
    }

    Some(Pipeline {
        name: name?,
        file: file.to_owned(),
        source: source?,
        schema_path: schema_path?,
        schema: schema?,
        batch: BatchSpec {
            max_rows: max_rows?,
            max_bytes: max_bytes? as usize,
            max_delay: max_delay?,
            eager: eager?,
            max_in_flight: max_in_flight?,
        },
        errors: ErrorSpec {
            policy: policy?,
            max_event_size: max_event_size?,
            max_depth: max_depth?,
        },
        parquet: match parquet {
            Some(spec) => Some(spec?),
            None => None,
        },
        redis: match redis {
            Some(spec) => Some(spec?),
            None => None,
        },
        models: models?,
        join: match join {
            Some(spec) => Some(spec?),
            None => None,
        },
        train: match train {
            Some(spec) => Some(spec?),
            None => None,
        },
    })
}

fn build_parquet(
    raw: &RawParquet,
    base: &Path,
    schema: Option<&EventSchema>,
    p: &mut Problems,
) -> Option<ParquetSpec> {
    const AT: &str = "sink.parquet";
    let location = p
        .required(&format!("{AT}.path"), &raw.path)
        .and_then(|path| match location(&path, base) {
            Ok(l) => Some(l),
            Err(e) => {
                p.push(&format!("{AT}.path"), e);
                None
            }
        });
    let time_field = p.read(&format!("{AT}.time_field"), &raw.time_field).ok();
    let partition_by: Option<Vec<PartitionKey>> = p
        .get(&format!("{AT}.partition_by"), &raw.partition_by, vec![])
        .map(|keys| {
            keys.into_iter()
                .map(|k| match k.as_str() {
                    "dt" => PartitionKey::Date,
                    "hour" => PartitionKey::Hour,
                    _ => PartitionKey::Field(k),
                })
                .collect()
        });
    if let (Some(keys), Some(time_field), Some(schema)) = (&partition_by, &time_field, schema) {
        let path = format!("{AT}.partition_by");
        let time_kind = time_field.as_deref().map(|t| (t, schema.field(t)));
        match time_kind {
            None if keys.iter().any(|k| !matches!(k, PartitionKey::Field(_))) => p.push(
                &format!("{AT}.time_field"),
                "is required to partition by `dt` or `hour`",
            ),
            Some((t, None)) => p.push(
                &format!("{AT}.time_field"),
                format!("`{t}` is not a field of the schema"),
            ),
            Some((t, Some(f))) => {
                if !f.required || f.nullable {
                    p.push(
                        &format!("{AT}.time_field"),
                        format!("`{t}` must be required and not nullable"),
                    );
                }
                match f.kind {
                    Kind::DateTime => {}
                    Kind::Date if !keys.contains(&PartitionKey::Hour) => {}
                    Kind::Date => p.push(
                        &path,
                        format!("`hour` needs a date-time, and `{t}` is a date"),
                    ),
                    _ => p.push(
                        &format!("{AT}.time_field"),
                        format!("`{t}` must have format date-time or date"),
                    ),
                }
            }
            None => {}
        }
        for key in keys {
            if let PartitionKey::Field(name) = key {
                match schema.field(name).map(|f| &f.kind) {
                    None => p.push(
                        &path,
                        format!("`{name}` is not a field of the schema (nor `dt` or `hour`)"),
                    ),
                    Some(
                        Kind::String { .. } | Kind::Integer { .. } | Kind::Boolean | Kind::Date,
                    ) => {}
                    Some(_) => p.push(
                        &path,
                        format!("`{name}` must be a string, integer, boolean or date field"),
                    ),
                }
            }
        }
        let mut seen = Vec::new();
        for key in keys {
            if seen.contains(&key) {
                p.push(&path, format!("{key:?} is listed twice"));
            }
            seen.push(key);
        }
    }
    let compression = p
        .get(
            &format!("{AT}.compression"),
            &raw.compression,
            "zstd".into(),
        )
        .and_then(|c| match compression(&c) {
            Ok(c) => Some(c),
            Err(e) => {
                p.push(&format!("{AT}.compression"), e);
                None
            }
        });
    let row_group_rows = p.get(
        &format!("{AT}.row_group_rows"),
        &raw.row_group_rows,
        100_000,
    );
    let row_group_rows = p.positive(&format!("{AT}.row_group_rows"), row_group_rows);
    let max_file_size = p
        .get(
            &format!("{AT}.max_file_size"),
            &raw.max_file_size,
            units::HumanSize(128 << 20),
        )
        .map(|s| s.0);
    let max_file_size = p.positive(&format!("{AT}.max_file_size"), max_file_size);
    // A file too large for a multipart upload would fail only when it is finished.
    let max_remote = OBJECT_STORE_PART_SIZE * OBJECT_STORE_MAX_PARTS;
    if let (Some(Location::ObjectStore(_)), Some(size)) = (&location, max_file_size) {
        if size > max_remote {
            p.push(
                &format!("{AT}.max_file_size"),
                format!(
                    "at most {} GiB on an object store ({} parts of {} MiB)",
                    max_remote >> 30,
                    OBJECT_STORE_MAX_PARTS,
                    OBJECT_STORE_PART_SIZE >> 20
                ),
            );
        }
    }
    let age =
        |p: &mut Problems, key: &str, s: &Option<Setting<units::HumanDuration>>, default: u64| {
            let path = format!("{AT}.{key}");
            let d = p
                .get(&path, s, units::HumanDuration(Duration::from_secs(default)))
                .map(|d| d.0);
            p.positive(&path, d)
        };
    let max_file_age = age(p, "max_file_age", &raw.max_file_age, 300);
    let idle_flush = age(p, "idle_flush", &raw.idle_flush, 30);
    let max_open_files = p.get(&format!("{AT}.max_open_files"), &raw.max_open_files, 32);
    let max_open_files = p.positive(&format!("{AT}.max_open_files"), max_open_files);
    let spool_dir = p
        .read(&format!("{AT}.spool_dir"), &raw.spool_dir)
        .ok()
        .map(|d| {
            d.map(|d| base.join(d))
                .unwrap_or_else(|| std::env::temp_dir().join("sluice-spool"))
        });
    let storage_options = properties(p, &format!("{AT}.storage_options"), &raw.storage_options);
    Some(ParquetSpec {
        location: location?,
        partition_by: partition_by?,
        time_field: time_field?,
        compression: compression?,
        row_group_rows: row_group_rows?,
        max_file_size: max_file_size?,
        max_file_age: max_file_age?,
        idle_flush: idle_flush?,
        max_open_files: max_open_files?,
        spool_dir: spool_dir?,
        storage_options,
    })
}

/// A local path (relative to the pipeline file) or an object-store URL.
/// Part size of sluice's multipart uploads to object stores.
pub const OBJECT_STORE_PART_SIZE: u64 = 16 << 20;
/// The most parts of one multipart upload (S3's limit).
pub const OBJECT_STORE_MAX_PARTS: u64 = 10_000;

fn location(path: &str, base: &Path) -> Result<Location, String> {
    if path.trim().is_empty() {
        return Err("must not be empty".into());
    }
    match url::Url::parse(path) {
        Ok(u) if u.scheme() == "file" => u
            .to_file_path()
            .map(Location::Local)
            .map_err(|_| format!("{path:?} is not a valid file URL")),
        Ok(u) if matches!(u.scheme(), "s3" | "s3a" | "gs" | "az" | "abfs" | "abfss") => {
            if u.host_str().is_none_or(str::is_empty) {
                Err(format!("{path:?} names no bucket or container"))
            } else {
                Ok(Location::ObjectStore(u))
            }
        }
        Ok(u) if u.scheme().len() > 1 => Err(format!(
            "unsupported scheme {:?} (supported: a local path, file://, s3://, gs://, az://)",
            u.scheme()
        )),
        _ => Ok(Location::Local(base.join(path))),
    }
}

fn compression(text: &str) -> Result<Compression, String> {
    let (name, level) = match text.split_once(':') {
        Some((n, l)) => (
            n,
            Some(
                l.parse::<i32>()
                    .map_err(|_| format!("level {l:?} is not a number"))?,
            ),
        ),
        None => (text, None),
    };
    Ok(match (name, level) {
        ("zstd", l) => {
            Compression::ZSTD(ZstdLevel::try_new(l.unwrap_or(3)).map_err(|e| e.to_string())?)
        }
        ("gzip", l) => {
            Compression::GZIP(GzipLevel::try_new(l.unwrap_or(6) as u32).map_err(|e| e.to_string())?)
        }
        ("snappy", None) => Compression::SNAPPY,
        ("lz4", None) => Compression::LZ4_RAW,
        ("none", None) => Compression::UNCOMPRESSED,
        _ => {
            return Err(format!(
                "expected zstd, zstd:LEVEL, gzip, gzip:LEVEL, snappy, lz4 or none, got {text:?}"
            ))
        }
    })
}

#[cfg(test)]
mod tests;
