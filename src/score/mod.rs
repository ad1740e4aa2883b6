//! The scoring stage: TorchScript models ([`tch`]) run on every valid event, in batches, on
//! their own threads; predictions and feedback go to Kafka.
//!
//! Per micro-batch, on the pipeline task: the rows are encoded into a feature matrix straight
//! from the Arrow columns ([`features`]), admitted into the model's queue (waiting while
//! `queue_rows` rows are already in flight: backpressure), and a future is returned. The
//! future, polled by the pipeline beside its other acknowledgements, waits for the model
//! threads ([`runtime`]), produces one prediction per scored event to `output_topic` and one
//! feedback record to `feedback_topic` ([`crate::sink::predictions`]), and resolves when the
//! broker has acknowledged them all, with the events that could not be scored (they become
//! dead letters with stage `inference`). Until it resolves, the batch's offsets are held:
//! nothing at or after them is committed, and no Parquet segment containing them is finished.
//!
//! Versions ([`model`]): the newest version is loaded and warmed up at start (a failure is a
//! configuration error); a reloader checks the repository every `reload_interval`, loads a new
//! or replaced version off the hot path, warms it up, and swaps it in atomically. A version
//! that fails is refused with a log line and `sluice_model_reloads_total{result="refused"}`,
//! and the current one keeps serving. A version that fails on most real rows trips the
//! circuit breaker ([`versions`]): the previous version serves again, or, with none, the
//! pipeline fails.
//!
//! Rollout ([`rollout`]): a repository's `rollout.json` pins the stable version and may name a
//! canary (a share of entities, by a hash of the prediction key, routed per row before
//! admission) and a shadow (every row scored again if the queue has room now, its predictions
//! to `shadow_topic` from a task of its own that holds nothing).

pub mod features;
pub mod model;
pub mod rollout;
pub mod runtime;
/// The process's models, shared by every pipeline that names them.
pub mod service;
pub mod store;
pub mod versions;

use std::{sync::Arc, time::Instant};

use arrow::{
    array::{Array, ArrayRef, AsArray},
    datatypes::DataType,
    record_batch::RecordBatch,
};
use futures::future::BoxFuture;
use rdkafka::message::{Header, OwnedHeaders};
use serde::ser::{SerializeMap, Serializer};
use thiserror::Error;
use tracing::{error, warn};

use self::{
    features::{Encoded, FeatureEncoder},
    model::{LoadedModel, Shape},
    runtime::JobResult,
    service::{Model, Service},
    versions::{Served, Slot, Versions},
};
use crate::{
    config::{ModelSpec, OutputSpec},
    event::{Failure, InferenceError, Originals, Rejected, TopicPartition},
    sink::{
        headers,
        predictions::{Predictions, Record},
    },
    util::text::{encode as text, render_key},
};

/// A model version that cannot serve at start: a configuration error (exit code 2).
#[derive(Debug, Error)]
#[error("model {model:?} cannot serve: {reason}")]
pub struct ModelRefused {
    pub model: String,
    pub reason: String,
}

/// The outcome of one submitted batch, once every prediction is acknowledged.
#[derive(Debug)]
pub struct Scored {
    /// The holds taken at submission, to release.
    pub holds: Vec<(TopicPartition, i64)>,
    /// Events that could not be scored.
    pub rejected: Vec<Rejected>,
    /// Why the batch could not be completed; the pipeline fails and keeps its holds.
    pub failure: Option<ScoreError>,
}

/// A scored batch that cannot be completed.
#[derive(Debug, Error)]
pub enum ScoreError {
    #[error("model {model}: {source}")]
    Delivery {
        model: Arc<str>,
        #[source]
        source: crate::sink::predictions::PredictionError,
    },
    /// Every model thread stopped (a panic, or libtorch aborting a thread).
    #[error("model {model}: its threads stopped")]
    ThreadsStopped { model: Arc<str> },
    /// The circuit breaker found the model failing with no earlier version to go back to.
    #[error("model {model}: {reason}")]
    Broken { model: Arc<str>, reason: Arc<str> },
    /// An event that was not scored has no original bytes to dead-letter (a bug).
    #[error("model {model}: event {event} was not scored and its original bytes are gone")]
    NoOriginal { model: Arc<str>, event: String },
}

/// Why a pipeline cannot use a model at start.
#[derive(Debug, Error)]
pub enum OpenError {
    #[error(transparent)]
    Service(#[from] service::ServiceError),
    #[error("creating the predictions producer")]
    Producer(#[source] rdkafka::error::KafkaError),
    #[error(transparent)]
    Topic(#[from] crate::sink::TopicError),
}

impl OpenError {
    /// A problem of the configuration (the model files or their declarations).
    pub fn is_config(&self) -> bool {
        matches!(self, Self::Service(s) if s.is_config())
    }
}

/// Loads the newest version of a model and checks it; the error says why it cannot serve.
pub fn load_newest(spec: &ModelSpec) -> Result<LoadedModel, String> {
    let device = model::device(spec.device)?;
    let candidate = model::targets(&spec.source, &[])?.stable;
    let path = candidate.path.display().to_string();
    model::fetch(&spec.source, &candidate).map_err(|e| format!("{path}: {e}"))?;
    LoadedModel::load(candidate, device, shape(spec)).map_err(|e| format!("{path}: {e}"))
}

fn shape(spec: &ModelSpec) -> Shape {
    Shape {
        features: spec.features(),
        outputs: spec.output.width(),
        max_batch: spec.max_batch,
    }
}

/// One model of a pipeline: encoder, threads, reloader and producer.
pub struct Scorer {
    spec: Arc<ModelSpec>,
    name: Arc<str>,
    encoder: FeatureEncoder,
    /// The model in the process's inference service, shared with other pipelines naming it.
    model: Arc<Model>,
    out: Predictions,
    output_topic: Arc<str>,
    feedback_topic: Option<Arc<str>>,
    shadow_topic: Option<Arc<str>>,
    pipeline: Arc<str>,
}

impl Scorer {
    /// The model `spec` names, from the process's inference service (loaded and warmed up on
    /// first use), with this pipeline's encoder and predictions producer.
    pub async fn open(
        pipeline: &str,
        bootstrap: &str,
        spec: &ModelSpec,
        service: &Service,
    ) -> Result<Self, OpenError> {
        let model = service.model(spec).await?;
        let spec = Arc::new(spec.clone());
        let out = Predictions::new(pipeline, bootstrap, &spec.producer_properties)
            .map_err(OpenError::Producer)?;
        let topics = std::iter::once(&spec.output_topic)
            .chain(&spec.feedback_topic)
            .chain(&spec.shadow_topic);
        for topic in topics {
            out.check_topic(topic).await?;
        }
        Ok(Self {
            name: Arc::from(spec.name.as_str()),
            encoder: FeatureEncoder::new(&spec.inputs),
            out,
            output_topic: Arc::from(spec.output_topic.as_str()),
            feedback_topic: spec.feedback_topic.as_deref().map(Arc::from),
            shadow_topic: spec.shadow_topic.as_deref().map(Arc::from),
            pipeline: Arc::from(pipeline),
            model,
            spec,
        })
    }

    /// Encodes `rows` and queues them, waiting for admission; the future resolves once every
    /// prediction is acknowledged. `holds` are returned in [`Scored::holds`] unchanged.
    ///
    /// The batch completes (records built and delivered, admission given back) in its own
    /// task, whether or not the returned future is polled: a caller waiting to admit its next
    /// batch would otherwise wait on itself once `queue_rows` are all held.
    pub async fn submit(
        &self,
        rows: RecordBatch,
        originals: Option<Arc<Originals>>,
        holds: Vec<(TopicPartition, i64)>,
        consumed_at: Instant,
    ) -> BoxFuture<'static, Scored> {
        let started = Instant::now();
        let served = self.model.runtime.versions.served();
        let (mut encoded, canary) = tokio::task::block_in_place(|| {
            let mut encoded = self.encoder.encode(&rows);
            let canary = self.route(&rows, &mut encoded, &served);
            (encoded, canary)
        });
        crate::telemetry::stage(&self.pipeline, "features", started);
        let admitted = encoded.rows.len().min(self.spec.queue_rows);
        let values = Arc::new(std::mem::take(&mut encoded.values));
        let segments = [
            (Slot::Stable, encoded.rows.len() - canary),
            (Slot::Canary, canary),
        ];
        let (permit, replies) = self
            .model
            .runtime
            .submit(values.clone(), admitted, &segments)
            .await;
        let ctx = Context {
            spec: self.spec.clone(),
            name: self.name.clone(),
            output_topic: self.output_topic.clone(),
            feedback_topic: self.feedback_topic.clone(),
            pipeline: self.pipeline.clone(),
            width: self.encoder.width(),
            shadow: false,
        };
        if served.shadow.is_some() && !encoded.rows.is_empty() {
            self.shadow(&rows, &encoded.rows, &values);
        }
        let out = self.out.clone();
        let queued = Instant::now();
        let completion = tokio::spawn(async move {
            let failed = |failure| Scored {
                holds: Vec::new(),
                rejected: Vec::new(),
                failure: Some(failure),
            };
            let mut results = Vec::with_capacity(replies.len());
            for r in replies {
                // A closed channel means the threads stopped (the runtime is only dropped after
                // the pipeline stops taking batches): fail, keeping the holds.
                match r.await {
                    Ok(JobResult {
                        broken: Some(reason),
                        ..
                    }) => {
                        return failed(ScoreError::Broken {
                            model: ctx.name.clone(),
                            reason,
                        })
                    }
                    Ok(result) => results.push(result),
                    Err(_) => {
                        return failed(ScoreError::ThreadsStopped {
                            model: ctx.name.clone(),
                        })
                    }
                }
            }
            // The latency's parts: queued at the model until its last result, building the
            // records, then the broker's acknowledgement.
            crate::telemetry::stage(&ctx.pipeline, "scoring", queued);
            let started = Instant::now();
            let built = tokio::task::block_in_place(|| {
                ctx.records(&rows, &encoded.rows, &values, &results)
            });
            crate::telemetry::stage(&ctx.pipeline, "records", started);
            let started = Instant::now();
            if let Err(source) = out.deliver(&built.records).await {
                return failed(ScoreError::Delivery {
                    model: ctx.name.clone(),
                    source,
                });
            }
            crate::telemetry::stage(&ctx.pipeline, "deliver", started);
            drop(permit);
            // Once per prediction: from its batch's first event's consumption (an upper bound
            // for the others) to the broker's acknowledgement.
            metrics::histogram!("sluice_prediction_latency_seconds", "model" => ctx.name.to_string())
                .record_many(consumed_at.elapsed().as_secs_f64(), built.predictions);
            metrics::counter!("sluice_predictions_total", "model" => ctx.name.to_string())
                .increment(built.predictions as u64);
            let (topic, partition, offset) = crate::schema::provenance(&rows);
            let mut failures = Vec::new();
            for (row, error) in encoded.rejected.into_iter().chain(built.failed) {
                let (t, p, o) = (topic.value(row), partition.value(row), offset.value(row));
                let failure = Failure::Inference {
                    model: ctx.name.clone(),
                    error,
                };
                match originals
                    .as_ref()
                    .and_then(|x| x.rejected(t, p, o, failure))
                {
                    Some(r) => failures.push(r),
                    // Never drop an event that was not scored: fail, keeping the holds.
                    None => {
                        return failed(ScoreError::NoOriginal {
                            model: ctx.name.clone(),
                            event: format!("{t}/{p}@{o}"),
                        })
                    }
                }
            }
            Scored {
                holds,
                rejected: failures,
                failure: None,
            }
        });
        Box::pin(async move {
            match completion.await {
                Ok(scored) => scored,
                // Cancelled at shutdown: nothing past its holds is committed.
                Err(_) => futures::future::pending().await,
            }
        })
    }
}

impl Scorer {
    /// With a canary in service, moves the rows of the entities in its share (by a hash of
    /// the record key, so an entity always sees one version) to the end of `encoded`;
    /// returns how many there are.
    fn route(&self, batch: &RecordBatch, encoded: &mut Encoded, served: &Served) -> usize {
        let Some((_, weight)) = &served.canary else {
            return 0;
        };
        let width = self.encoder.width();
        let canary: Vec<bool> = encoded
            .rows
            .iter()
            .map(|&row| {
                rollout::in_share(render_key(&self.spec.key, batch, row).as_bytes(), *weight)
            })
            .collect();
        let n = canary.iter().filter(|c| **c).count();
        if n == 0 {
            return 0;
        }
        let mut rows = Vec::with_capacity(encoded.rows.len());
        let mut values = Vec::with_capacity(encoded.values.len());
        for pass in [false, true] {
            for (m, _) in canary.iter().enumerate().filter(|(_, c)| **c == pass) {
                rows.push(encoded.rows[m]);
                values.extend_from_slice(&encoded.values[m * width..(m + 1) * width]);
            }
        }
        encoded.rows = rows;
        encoded.values = values;
        n
    }

    /// Scores the batch's rows with the shadow version too, if there is room in the model's
    /// queue now, and produces its predictions to `shadow_topic` in a task of its own: the
    /// shadow never holds offsets, never waits for admission and never makes dead letters.
    fn shadow(&self, batch: &RecordBatch, rows: &[usize], values: &Arc<Vec<f32>>) {
        let name = self.name.to_string();
        let count = move |result: &'static str, n: usize| {
            metrics::counter!("sluice_shadow_rows_total", "model" => name.clone(),
                "result" => result)
            .increment(n as u64);
        };
        let Some(topic) = &self.shadow_topic else {
            return count("no_topic", rows.len());
        };
        let Some((permit, replies)) = self.model.runtime.try_submit(values.clone(), Slot::Shadow)
        else {
            return count("skipped", rows.len());
        };
        let ctx = Context {
            spec: self.spec.clone(),
            name: self.name.clone(),
            output_topic: topic.clone(),
            feedback_topic: None,
            pipeline: self.pipeline.clone(),
            width: self.encoder.width(),
            shadow: true,
        };
        let (out, batch, rows, values) = (
            self.out.clone(),
            batch.clone(),
            rows.to_vec(),
            values.clone(),
        );
        tokio::spawn(async move {
            let mut results = Vec::with_capacity(replies.len());
            for r in replies {
                match r.await {
                    Ok(result) => results.push(result),
                    Err(_) => return,
                }
            }
            drop(permit);
            let built =
                tokio::task::block_in_place(|| ctx.records(&batch, &rows, &values, &results));
            count("failed", built.failed.len());
            match out.deliver(&built.records).await {
                Ok(()) => count("scored", built.predictions),
                Err(e) => {
                    count("undelivered", built.predictions);
                    warn!(model = %ctx.name, error = %e, "Shadow predictions not delivered.");
                }
            }
        });
    }
}

/// What the completion of a batch needs, detached from the [`Scorer`].
struct Context {
    spec: Arc<ModelSpec>,
    name: Arc<str>,
    output_topic: Arc<str>,
    feedback_topic: Option<Arc<str>>,
    pipeline: Arc<str>,
    width: usize,
    /// Records of the shadow version: predictions only, marked.
    shadow: bool,
}

struct Built {
    records: Vec<Record>,
    predictions: usize,
    /// Batch rows the model failed on.
    failed: Vec<(usize, InferenceError)>,
}

impl Context {
    /// Prediction and feedback records of every scored row.
    fn records(
        &self,
        batch: &RecordBatch,
        rows: &[usize],
        features: &[f32],
        results: &[runtime::JobResult],
    ) -> Built {
        let w = self.spec.output.width();
        let mut built = Built {
            records: Vec::with_capacity(
                rows.len() * (1 + usize::from(self.feedback_topic.is_some())),
            ),
            predictions: 0,
            failed: Vec::new(),
        };
        let (topics, partitions, offsets) = crate::schema::provenance(batch);
        let timestamps = batch.column_by_name("_timestamp").map(|c| {
            c.as_primitive::<arrow::datatypes::TimestampMillisecondType>()
                .clone()
        });
        let id = self
            .spec
            .id_column
            .as_ref()
            .and_then(|c| batch.column_by_name(c));
        let pass: Vec<(&str, &ArrayRef)> = self
            .spec
            .pass_through
            .iter()
            .filter_map(|c| Some((c.as_str(), batch.column_by_name(c)?)))
            .collect();
        let mut m = 0; // matrix row
        for result in results {
            let mut failed = result.failed.iter().peekable();
            for j in 0..result.outputs.len() / w.max(1) {
                let row = rows[m];
                let x = &features[m * self.width..(m + 1) * self.width];
                m += 1;
                if failed.peek().is_some_and(|(r, _)| *r == j) {
                    let (_, e) = failed.next().expect("peeked");
                    built.failed.push((row, e.clone()));
                    continue;
                }
                let y = &result.outputs[j * w..(j + 1) * w];
                let source = Source {
                    topic: topics.value(row),
                    partition: partitions.value(row),
                    offset: offsets.value(row),
                };
                let event_id = id.and_then(|c| text(c, row));
                let key = render_key(&self.spec.key, batch, row).into_bytes();
                let headers = self.headers(&source, &result.version);
                let timestamp = timestamps
                    .as_ref()
                    .filter(|t| t.is_valid(row))
                    .map(|t| t.value(row));
                let prediction = Prediction {
                    shadow: self.shadow,
                    event_id: event_id.as_deref(),
                    model: &self.name,
                    model_version: &result.version,
                    outputs: Outputs(&self.spec.output, y),
                    columns: Columns(&pass, row),
                    source: &source,
                };
                built.records.push(Record {
                    topic: self.output_topic.clone(),
                    key: key.clone(),
                    payload: serde_json::to_vec(&prediction).expect("serializable"),
                    headers: headers.clone(),
                    timestamp,
                });
                if let Some(topic) = &self.feedback_topic {
                    let feedback = Feedback {
                        event_id: event_id.as_deref(),
                        model: &self.name,
                        model_version: &result.version,
                        features: x,
                        outputs: y,
                        source: &source,
                    };
                    built.records.push(Record {
                        topic: topic.clone(),
                        key,
                        payload: serde_json::to_vec(&feedback).expect("serializable"),
                        headers,
                        timestamp,
                    });
                }
                built.predictions += 1;
            }
        }
        built
    }

    fn headers(&self, source: &Source<'_>, version: &str) -> OwnedHeaders {
        let (partition, offset) = (source.partition.to_string(), source.offset.to_string());
        let mut hs = OwnedHeaders::new_with_capacity(6);
        for (key, value) in [
            (headers::TOPIC, source.topic),
            (headers::PARTITION, &partition),
            (headers::OFFSET, &offset),
            (headers::PIPELINE, &self.pipeline),
            (headers::MODEL, &self.name),
            (headers::MODEL_VERSION, version),
        ] {
            hs = hs.insert(Header {
                key,
                value: Some(value),
            });
        }
        hs
    }
}

#[derive(serde::Serialize)]
struct Source<'a> {
    topic: &'a str,
    partition: i32,
    offset: i64,
}

/// The value of a prediction record.
#[derive(serde::Serialize)]
struct Prediction<'a> {
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    shadow: bool,
    event_id: Option<&'a str>,
    model: &'a str,
    model_version: &'a str,
    outputs: Outputs<'a>,
    columns: Columns<'a>,
    source: &'a Source<'a>,
}

/// The value of a feedback record: the features exactly as fed to the model.
#[derive(serde::Serialize)]
struct Feedback<'a> {
    event_id: Option<&'a str>,
    model: &'a str,
    model_version: &'a str,
    features: &'a [f32],
    outputs: &'a [f32],
    source: &'a Source<'a>,
}

/// `{"score": 0.93}`, `{"a": 0.1, "b": 0.9}` or `{"label": "b", "confidence": 0.9}`.
struct Outputs<'a>(&'a OutputSpec, &'a [f32]);

impl serde::Serialize for Outputs<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            OutputSpec::Score { name } => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry(name, &self.1[0])?;
                m.end()
            }
            OutputSpec::Probabilities { classes } => {
                let mut m = s.serialize_map(Some(classes.len()))?;
                for (c, v) in classes.iter().zip(self.1) {
                    m.serialize_entry(c, v)?;
                }
                m.end()
            }
            OutputSpec::Label { classes } => {
                let (best, value) =
                    self.1
                        .iter()
                        .enumerate()
                        .fold((0, f32::NEG_INFINITY), |acc, (i, v)| {
                            if *v > acc.1 {
                                (i, *v)
                            } else {
                                acc
                            }
                        });
                let mut m = s.serialize_map(Some(2))?;
                m.serialize_entry("label", &classes[best])?;
                m.serialize_entry("confidence", &value)?;
                m.end()
            }
        }
    }
}

/// Pass-through columns of one row: numbers and booleans as JSON values, the rest as text.
struct Columns<'a>(&'a [(&'a str, &'a ArrayRef)], usize);

impl serde::Serialize for Columns<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let row = self.1;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (name, column) in self.0 {
            if column.is_null(row) {
                m.serialize_entry(name, &())?;
                continue;
            }
            match column.data_type() {
                DataType::Int64 => m.serialize_entry(
                    name,
                    &column
                        .as_primitive::<arrow::datatypes::Int64Type>()
                        .value(row),
                )?,
                DataType::Float64 => m.serialize_entry(
                    name,
                    &column
                        .as_primitive::<arrow::datatypes::Float64Type>()
                        .value(row),
                )?,
                DataType::Boolean => m.serialize_entry(name, &column.as_boolean().value(row))?,
                _ => m.serialize_entry(name, &text(column, row))?,
            }
        }
        m.end()
    }
}

/// Checks the model's source every `every` and follows it ([`refresh`]).
pub(super) async fn reload(
    spec: Arc<ModelSpec>,
    versions: Arc<Versions>,
    every: std::time::Duration,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        refresh(&spec, &versions).await;
    }
}

/// Brings the versions in service in line with the model's source: loads and warms up (off
/// the async workers) each version of the rollout not loaded yet, then puts them in service
/// together. A version that fails to load is refused with a log line and the one in its slot
/// keeps serving (for a canary or a shadow: none).
pub(super) async fn refresh(spec: &Arc<ModelSpec>, versions: &Arc<Versions>) {
    let (s, v) = (spec.clone(), versions.clone());
    match tokio::task::spawn_blocking(move || plan(&s, &v)).await {
        Ok(Ok(Some(next))) => versions.apply(next),
        Ok(Ok(None)) => {}
        Ok(Err(reason)) => {
            metrics::counter!("sluice_model_reloads_total", "model" => spec.name.clone(),
                "result" => "unreadable")
            .increment(1);
            warn!(model = %spec.name, %reason, "Cannot read the model repository; the versions in service keep serving.");
        }
        Err(e) => warn!(model = %spec.name, error = %e, "Model reload task failed."),
    }
}

/// What should serve now, loading what is not loaded; `None` when that is what serves.
fn plan(spec: &ModelSpec, versions: &Versions) -> Result<Option<Served>, String> {
    let served = versions.served();
    let refused = versions.refused();
    let known: Vec<&model::Candidate> =
        served.all().map(|m| &m.candidate).chain(&refused).collect();
    let targets = model::targets(&spec.source, &known)?;
    let device = served.stable.device;
    let load = |c: model::Candidate| -> Option<Arc<LoadedModel>> {
        if let Some(m) = versions.loaded(&c) {
            return Some(m);
        }
        if refused.contains(&c) {
            return None;
        }
        let result = |r: &'static str| {
            metrics::counter!("sluice_model_reloads_total", "model" => spec.name.clone(),
                "result" => r)
            .increment(1);
        };
        if let Err(reason) = model::fetch(&spec.source, &c) {
            // Transient (the store is unreachable): not a verdict on the version.
            warn!(model = %spec.name, version = %c.version, %reason,
                  "Cannot download the model version; trying again at the next reload.");
            return None;
        }
        match LoadedModel::load(c.clone(), device, shape(spec)) {
            Ok(m) => {
                result("loaded");
                Some(Arc::new(m))
            }
            Err(reason) => {
                error!(model = %spec.name, version = %c.version, path = %c.path.display(),
                       %reason, "Model version refused; the current version keeps serving.");
                result("refused");
                versions.refuse(c);
                None
            }
        }
    };
    let next = Served {
        stable: load(targets.stable).unwrap_or_else(|| served.stable.clone()),
        canary: targets.canary.and_then(|(c, w)| Some((load(c)?, w))),
        shadow: targets.shadow.and_then(load),
    };
    Ok((!next.same_as(&served)).then_some(next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_follow_the_configured_kind() {
        let json = |spec: &OutputSpec, v: &[f32]| serde_json::to_string(&Outputs(spec, v)).unwrap();
        let classes = vec!["ok".to_string(), "review".into(), "block".into()];
        assert_eq!(
            json(
                &OutputSpec::Score {
                    name: "fraud".into()
                },
                &[0.25]
            ),
            r#"{"fraud":0.25}"#
        );
        assert_eq!(
            json(
                &OutputSpec::Probabilities {
                    classes: classes.clone()
                },
                &[0.5, 0.25, 0.25]
            ),
            r#"{"ok":0.5,"review":0.25,"block":0.25}"#
        );
        assert_eq!(
            json(&OutputSpec::Label { classes }, &[0.125, 0.75, 0.125]),
            r#"{"label":"review","confidence":0.75}"#
        );
    }
}
