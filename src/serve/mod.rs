//! The inference API: synchronous scoring beside the Kafka path, by the Open Inference
//! Protocol (KServe v2), over REST ([`http`]) and gRPC ([`grpc`]), each on its own listener.
//!
//! It serves the models of the process's inference service ([`crate::score::service`]): the
//! same threads, queue and versions as the stream, so a request shares forward passes with
//! the stream's rows and a new version reaches both at once. A request gives either
//!
//! - the model's input tensor, `features` (`FP32`, `[n, width]`): scored as it is; or
//! - named inputs that are the event's fields (one tensor per field, `[n]` each), or one
//!   `BYTES` tensor `event` of JSON events: each row goes through the pipeline's own schema
//!   validation, Redis enrichment ([`crate::sink::redis::Lookup`]: the row scored as its
//!   entity's next event, nothing written) and feature encoding, so that it is scored exactly
//!   as the same event on the stream would be.
//!
//! Every request is admitted at once or refused: a model admits `serving.queue_rows` rows of
//! requests at a time, apart from the stream's admission, and beyond it answers 429 /
//! `RESOURCE_EXHAUSTED` with a retry hint. A request has a deadline (`serving.timeout`, or
//! shorter if it asks), past which it is answered 504 / `DEADLINE_EXCEEDED`; and a share of
//! each forward pass is the requests' while the stream also waits (see
//! [`crate::score::runtime`]), so neither path starves the other. A request is scored by one
//! version, the one in service when it is admitted (or the one it names, if loaded), and the
//! answer names it.
//!
//! Both protocols parse their wire form into an [`InferRequest`] and write an
//! [`InferResponse`] back; [`Api::infer`] is the one path between, with one error type
//! ([`ApiError`]) that each protocol maps to its status codes.

pub mod grpc;
pub mod http;
pub mod tensor;

use std::{
    collections::BTreeMap,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use arrow::record_batch::RecordBatch;
use thiserror::Error;
use tracing::info;

use self::tensor::{Data, Tensor};
use crate::{
    config::{ModelSpec, OutputSpec, Pipeline},
    decode::{Decoder, Limits, Origin},
    schema::{EventSchema, Kind},
    score::{
        features::FeatureEncoder,
        model::LoadedModel,
        rollout,
        runtime::Refused,
        service::{Model, Service},
    },
    sink::redis::Lookup,
    telemetry::health::Status,
    util::{columns::with_columns, text::render_key},
};

/// The name of the model's input tensor (`[n, width]`, `FP32`).
pub const FEATURES: &str = "features";
/// The name of a `BYTES` input whose elements are whole JSON events.
pub const EVENT: &str = "event";

/// Why a request failed; each protocol maps it to its own status.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ApiError {
    #[error("model {0:?} is not served here")]
    ModelNotFound(String),
    #[error("model {model:?} has no version {version:?} loaded (loaded: {loaded})")]
    VersionNotFound {
        model: String,
        version: String,
        loaded: String,
    },
    /// The request cannot be scored as it is (its inputs, their shapes or values).
    #[error("{0}")]
    BadRequest(String),
    /// The model's queue for requests is full: retry after the hint.
    #[error("model {model:?} is at capacity: retry after {} ms", retry_after.as_millis())]
    Overloaded {
        model: String,
        retry_after: Duration,
    },
    #[error("the request's deadline passed before it was scored")]
    DeadlineExceeded,
    /// The model cannot serve (its circuit breaker found it broken, its threads stopped).
    #[error("model {model:?} cannot serve: {reason}")]
    Unavailable { model: String, reason: String },
    /// The model failed on the request's rows.
    #[error("model {model:?} failed: {reason}")]
    Failed { model: String, reason: String },
}

impl ApiError {
    /// The HTTP status code.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::ModelNotFound(_) | Self::VersionNotFound { .. } => 404,
            Self::BadRequest(_) => 400,
            Self::Overloaded { .. } => 429,
            Self::DeadlineExceeded => 504,
            Self::Unavailable { .. } => 503,
            Self::Failed { .. } => 500,
        }
    }

    /// A label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ModelNotFound(_) | Self::VersionNotFound { .. } => "not_found",
            Self::BadRequest(_) => "bad_request",
            Self::Overloaded { .. } => "overloaded",
            Self::DeadlineExceeded => "deadline",
            Self::Unavailable { .. } => "unavailable",
            Self::Failed { .. } => "failed",
        }
    }
}

/// A request, as either protocol carries it.
#[derive(Debug, Clone, Default)]
pub struct InferRequest {
    pub model: String,
    /// A version to score with (it must be loaded); `None`: the one in service.
    pub version: Option<String>,
    pub id: Option<String>,
    pub inputs: Vec<Tensor>,
    /// Outputs asked for by name; empty: all.
    pub outputs: Vec<String>,
    /// A deadline shorter than the model's `serving.timeout`.
    pub timeout: Option<Duration>,
}

/// An answer: the version that scored every row, and the outputs.
#[derive(Debug, Clone)]
pub struct InferResponse {
    pub model: String,
    pub version: String,
    pub id: Option<String>,
    pub outputs: Vec<Tensor>,
}

/// A tensor's name, datatype and shape (`-1`: any length), for metadata.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TensorMetadata {
    pub name: String,
    pub datatype: &'static str,
    pub shape: Vec<i64>,
}

/// What a model takes and returns, and its versions loaded.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelMetadata {
    pub name: String,
    pub versions: Vec<String>,
    pub platform: &'static str,
    pub inputs: Vec<TensorMetadata>,
    pub outputs: Vec<TensorMetadata>,
}

/// One model as the API serves it.
struct Served {
    spec: Arc<ModelSpec>,
    model: Arc<Model>,
    encoder: FeatureEncoder,
    /// The schema of the pipeline that declares the model: what a named input may be.
    schema: Arc<EventSchema>,
    limits: Limits,
    /// Its Redis inputs, read for each request.
    lookup: Option<Lookup>,
    /// The pipeline's health, for readiness (Redis).
    status: Arc<Status>,
}

/// The inference API's state: every model of the process, by name.
pub struct Api {
    models: BTreeMap<String, Served>,
}

impl Api {
    /// The API over the models of `pipelines`, as the inference service holds them (loaded
    /// here if no pipeline has yet); `statuses` are the pipelines' health, in order. A model
    /// declared by several pipelines takes the first's schema and Redis.
    pub async fn open(
        pipelines: &[Pipeline],
        statuses: &[Arc<Status>],
        service: &Service,
    ) -> anyhow::Result<Self> {
        let mut models = BTreeMap::new();
        for (p, status) in pipelines.iter().zip(statuses) {
            for spec in &p.models {
                if models.contains_key(&spec.name) {
                    continue;
                }
                let model = service.model(spec).await?;
                let enrich: Vec<String> = spec
                    .inputs
                    .iter()
                    .filter(|i| i.redis)
                    .map(|i| i.column.clone())
                    .collect();
                let lookup = match (&p.redis, enrich.is_empty()) {
                    (Some(r), false) => Lookup::open(r, &enrich).await?,
                    _ => None,
                };
                models.insert(
                    spec.name.clone(),
                    Served {
                        spec: Arc::new(spec.clone()),
                        model,
                        encoder: FeatureEncoder::new(&spec.inputs),
                        schema: p.schema.clone(),
                        limits: Limits::from(&p.errors),
                        lookup,
                        status: status.clone(),
                    },
                );
            }
        }
        info!(models = ?models.keys().collect::<Vec<_>>(), "Inference API ready to serve.");
        Ok(Self { models })
    }

    /// Ready: every model can serve, and the Redis its inputs come from is reachable.
    pub fn ready(&self) -> bool {
        self.models.values().all(|s| s.ready())
    }

    fn served(&self, model: &str) -> Result<&Served, ApiError> {
        self.models
            .get(model)
            .ok_or_else(|| ApiError::ModelNotFound(model.to_owned()))
    }

    /// Whether `model` (and `version`, if given) can serve now.
    pub fn model_ready(&self, model: &str, version: Option<&str>) -> Result<bool, ApiError> {
        let served = self.served(model)?;
        if let Some(v) = version {
            served.version(v)?;
        }
        Ok(served.ready())
    }

    /// What `model` takes and returns (`version`: it must be loaded).
    pub fn metadata(&self, model: &str, version: Option<&str>) -> Result<ModelMetadata, ApiError> {
        let served = self.served(model)?;
        if let Some(v) = version {
            served.version(v)?;
        }
        Ok(served.metadata())
    }

    /// Scores a request; `protocol` labels its metrics.
    pub async fn infer(
        &self,
        request: InferRequest,
        protocol: &'static str,
    ) -> Result<InferResponse, ApiError> {
        let started = Instant::now();
        let model = request.model.clone();
        let result = match self.served(&model) {
            Ok(served) => served.infer(request).await,
            Err(e) => Err(e),
        };
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.kind(),
        };
        // Unknown model names are not labels: one series for them all.
        let label = if self.models.contains_key(&model) {
            model
        } else {
            "<unknown>".to_owned()
        };
        metrics::counter!("sluice_inference_requests_total", "model" => label.clone(),
            "protocol" => protocol, "result" => outcome)
        .increment(1);
        if result.is_ok() {
            metrics::histogram!("sluice_inference_request_seconds", "model" => label,
                "protocol" => protocol)
            .record(started.elapsed().as_secs_f64());
        }
        result
    }
}

impl Served {
    fn ready(&self) -> bool {
        self.model.runtime.versions.broken().is_none()
            && (self.lookup.is_none() || self.status.redis_healthy.load(Ordering::Acquire))
    }

    /// A loaded version by name.
    fn version(&self, version: &str) -> Result<Arc<LoadedModel>, ApiError> {
        let served = self.model.runtime.versions.served();
        let found = served.all().find(|m| &*m.version == version).cloned();
        found.ok_or_else(|| ApiError::VersionNotFound {
            model: self.spec.name.clone(),
            version: version.to_owned(),
            loaded: served
                .all()
                .map(|m| m.version.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    fn metadata(&self) -> ModelMetadata {
        let served = self.model.runtime.versions.served();
        let mut inputs = vec![TensorMetadata {
            name: FEATURES.into(),
            datatype: "FP32",
            shape: vec![-1, self.encoder.width() as i64],
        }];
        // The event's fields the model reads (the others the schema requires must be given
        // too, as in any event).
        for input in self.spec.inputs.iter().filter(|i| !i.redis) {
            if let Some(field) = self.schema.field(&input.column) {
                if inputs.iter().all(|t| t.name != field.name) {
                    inputs.push(TensorMetadata {
                        name: field.name.clone(),
                        datatype: datatype_of(&field.kind),
                        shape: vec![-1],
                    });
                }
            }
        }
        inputs.push(TensorMetadata {
            name: EVENT.into(),
            datatype: "BYTES",
            shape: vec![-1],
        });
        ModelMetadata {
            name: self.spec.name.clone(),
            versions: served.all().map(|m| m.version.to_string()).collect(),
            platform: "pytorch_libtorch",
            inputs,
            outputs: outputs_metadata(&self.spec.output),
        }
    }

    async fn infer(&self, request: InferRequest) -> Result<InferResponse, ApiError> {
        for t in &request.inputs {
            t.check()?;
        }
        let deadline = Instant::now()
            + request.timeout.map_or(self.spec.serving.timeout, |t| {
                t.min(self.spec.serving.timeout)
            });
        let (values, rows, key) = self.features(&request).await?;
        let version = match &request.version {
            Some(v) => self.version(v)?,
            None => self.route(key.as_deref()),
        };
        let runtime = &self.model.runtime;
        let (permit, replies) = runtime
            .request(Arc::new(values), version, deadline)
            .map_err(|refused| match refused {
                Refused::Full => {
                    metrics::counter!("sluice_inference_rejections_total",
                        "model" => self.spec.name.clone(), "reason" => "overloaded")
                    .increment(1);
                    ApiError::Overloaded {
                        model: self.spec.name.clone(),
                        retry_after: self.retry_hint(),
                    }
                }
                Refused::TooLarge { rows, limit } => ApiError::BadRequest(format!(
                    "{rows} rows are more than model {:?} admits at once \
                     (serving.queue_rows = {limit})",
                    self.spec.name
                )),
            })?;
        let width = self.spec.output.width();
        let mut outputs = Vec::with_capacity(rows * width);
        let mut version = String::new();
        for reply in replies {
            let answer = tokio::time::timeout_at(deadline.into(), reply)
                .await
                .map_err(|_| ApiError::DeadlineExceeded)?
                .map_err(|_| ApiError::Unavailable {
                    model: self.spec.name.clone(),
                    reason: "its threads stopped".into(),
                })?;
            if answer.expired {
                return Err(ApiError::DeadlineExceeded);
            }
            if let Some(reason) = answer.broken {
                return Err(ApiError::Unavailable {
                    model: self.spec.name.clone(),
                    reason: reason.to_string(),
                });
            }
            if let Some((row, error)) = answer.failed.first() {
                return Err(ApiError::Failed {
                    model: self.spec.name.clone(),
                    reason: format!("row {}: {error}", outputs.len() / width.max(1) + row),
                });
            }
            version = answer.version.to_string();
            outputs.extend(answer.outputs);
        }
        drop(permit);
        Ok(InferResponse {
            model: self.spec.name.clone(),
            version,
            id: request.id,
            outputs: self.outputs(&outputs, rows, &request.outputs)?,
        })
    }

    /// The request's feature matrix, its rows, and the first row's key (named inputs).
    async fn features(
        &self,
        request: &InferRequest,
    ) -> Result<(Vec<f32>, usize, Option<String>), ApiError> {
        let width = self.encoder.width();
        if let [t] = request.inputs.as_slice() {
            if t.name == FEATURES {
                let [n, w] = t.shape[..] else {
                    return Err(ApiError::BadRequest(format!(
                        "input {FEATURES:?} has shape {:?}; expected [n, {width}]",
                        t.shape
                    )));
                };
                if w as usize != width {
                    return Err(ApiError::BadRequest(format!(
                        "input {FEATURES:?} has {w} features a row; model {:?} takes {width}",
                        self.spec.name
                    )));
                }
                let values = t.data.to_f32().ok_or_else(|| {
                    ApiError::BadRequest(format!("input {FEATURES:?} must be FP32"))
                })?;
                if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
                    return Err(ApiError::BadRequest(format!(
                        "input {FEATURES:?} holds {bad}, not a finite number"
                    )));
                }
                return Ok((values, n as usize, None));
            }
        }
        let batch = self.decode(&request.inputs)?;
        let rows = batch.num_rows();
        let enriched = match &self.lookup {
            Some(lookup) => {
                let columns = lookup
                    .enrich(&batch)
                    .await
                    .map_err(|e| ApiError::Unavailable {
                        model: self.spec.name.clone(),
                        reason: format!("reading its features in Redis: {e}"),
                    })?;
                with_columns(&batch, columns)
                    .map_err(|e| ApiError::BadRequest(format!("adding its Redis inputs: {e}")))?
            }
            None => batch,
        };
        let encoded = self.encoder.encode(&enriched);
        if let Some((row, error)) = encoded.rejected.first() {
            return Err(ApiError::BadRequest(format!("row {row}: {error}")));
        }
        let key = (rows > 0).then(|| render_key(&self.spec.key, &enriched, 0));
        Ok((encoded.values, rows, key))
    }

    /// Named inputs → one event per row → the pipeline's decoder (schema validation).
    fn decode(&self, inputs: &[Tensor]) -> Result<RecordBatch, ApiError> {
        let bad = ApiError::BadRequest;
        if inputs.is_empty() {
            return Err(bad(format!(
                "no inputs: give {FEATURES:?} ([n, {}] FP32), the event's fields, or {EVENT:?} \
                 (JSON events)",
                self.encoder.width()
            )));
        }
        let events: Vec<Vec<u8>> = if let [t] = inputs {
            if t.name == EVENT {
                match &t.data {
                    Data::Bytes(events) => events.clone(),
                    _ => return Err(bad(format!("input {EVENT:?} must be BYTES (JSON events)"))),
                }
            } else {
                self.events_of_fields(inputs)?
            }
        } else {
            self.events_of_fields(inputs)?
        };
        let mut decoder = Decoder::new(self.schema.clone(), self.limits);
        let now = chrono::Utc::now().timestamp_millis();
        for (row, payload) in events.iter().enumerate() {
            let origin = Origin {
                topic: "",
                partition: 0,
                offset: row as i64,
                timestamp: Some(now),
            };
            decoder
                .push(origin, Some(payload))
                .map_err(|e| bad(format!("row {row}: {e}")))?;
        }
        Ok(decoder.finish())
    }

    /// One JSON event per row from per-field tensors of equal length.
    fn events_of_fields(&self, inputs: &[Tensor]) -> Result<Vec<Vec<u8>>, ApiError> {
        let bad = ApiError::BadRequest;
        let n = inputs[0].data.len();
        for t in inputs {
            if self.schema.field(&t.name).is_none() {
                return Err(bad(format!(
                    "input {:?} is not a field of the events (nor {FEATURES:?} or {EVENT:?})",
                    t.name
                )));
            }
            if t.data.len() != n {
                return Err(bad(format!(
                    "input {:?} has {} values, {:?} has {n}: every field needs one per row",
                    t.name,
                    t.data.len(),
                    inputs[0].name
                )));
            }
        }
        (0..n)
            .map(|row| {
                let mut event = serde_json::Map::new();
                for t in inputs {
                    let value = t
                        .data
                        .json(row)
                        .map_err(|e| bad(format!("input {:?}, row {row}: {e}", t.name)))?;
                    event.insert(t.name.clone(), value);
                }
                Ok(serde_json::to_vec(&event).expect("a JSON object"))
            })
            .collect()
    }

    /// The version a request without one is scored by: the stable version, or the canary
    /// for an entity in its share (by the first row's key, as on the stream).
    fn route(&self, key: Option<&str>) -> Arc<LoadedModel> {
        let served = self.model.runtime.versions.served();
        match (&served.canary, key) {
            (Some((canary, weight)), Some(key)) if rollout::in_share(key.as_bytes(), *weight) => {
                canary.clone()
            }
            _ => served.stable.clone(),
        }
    }

    /// How long a refused caller should wait: about the time the requests admitted now take.
    fn retry_hint(&self) -> Duration {
        let rows = self.model.runtime.requests_in_flight().max(1);
        let passes = rows.div_ceil(self.spec.max_batch) as u32;
        (self.spec.max_delay * passes.max(1)).max(Duration::from_millis(5))
    }

    /// The output tensors of `rows` rows of model outputs (`names`: those asked for).
    fn outputs(
        &self,
        values: &[f32],
        rows: usize,
        names: &[String],
    ) -> Result<Vec<Tensor>, ApiError> {
        let n = rows as i64;
        let all = match &self.spec.output {
            OutputSpec::Score { name } => vec![Tensor {
                name: name.clone(),
                shape: vec![n],
                data: Data::Fp32(values.to_vec()),
            }],
            OutputSpec::Probabilities { classes } => vec![Tensor {
                name: "probabilities".into(),
                shape: vec![n, classes.len() as i64],
                data: Data::Fp32(values.to_vec()),
            }],
            OutputSpec::Label { classes } => {
                let (labels, confidence): (Vec<Vec<u8>>, Vec<f32>) =
                    values
                        .chunks(classes.len().max(1))
                        .map(|row| {
                            let (best, v) = row.iter().enumerate().fold(
                                (0, f32::NEG_INFINITY),
                                |acc, (i, v)| if *v > acc.1 { (i, *v) } else { acc },
                            );
                            (classes[best].as_bytes().to_vec(), v)
                        })
                        .unzip();
                vec![
                    Tensor {
                        name: "label".into(),
                        shape: vec![n],
                        data: Data::Bytes(labels),
                    },
                    Tensor {
                        name: "confidence".into(),
                        shape: vec![n],
                        data: Data::Fp32(confidence),
                    },
                ]
            }
        };
        if names.is_empty() {
            return Ok(all);
        }
        names
            .iter()
            .map(|name| {
                all.iter()
                    .find(|t| t.name == *name)
                    .cloned()
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!(
                            "output {name:?} is not one of model {:?}'s ({})",
                            self.spec.name,
                            all.iter()
                                .map(|t| t.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ))
                    })
            })
            .collect()
    }
}

/// The outputs a model's output declaration makes.
fn outputs_metadata(output: &OutputSpec) -> Vec<TensorMetadata> {
    match output {
        OutputSpec::Score { name } => vec![TensorMetadata {
            name: name.clone(),
            datatype: "FP32",
            shape: vec![-1],
        }],
        OutputSpec::Probabilities { classes } => vec![TensorMetadata {
            name: "probabilities".into(),
            datatype: "FP32",
            shape: vec![-1, classes.len() as i64],
        }],
        OutputSpec::Label { .. } => vec![
            TensorMetadata {
                name: "label".into(),
                datatype: "BYTES",
                shape: vec![-1],
            },
            TensorMetadata {
                name: "confidence".into(),
                datatype: "FP32",
                shape: vec![-1],
            },
        ],
    }
}

/// The protocol's datatype of a schema field.
fn datatype_of(kind: &Kind) -> &'static str {
    match kind {
        Kind::Integer { .. } => "INT64",
        Kind::Number { .. } => "FP64",
        Kind::Boolean => "BOOL",
        _ => "BYTES",
    }
}
