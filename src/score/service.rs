//! The inference service: one per process, owning every model's threads, versions and
//! reloader. Pipelines (and, later, a synchronous API or a router between versions) take a
//! handle on a model by name and submit rows to it; two pipelines naming the same model share
//! its threads, its queue and its versions.
//!
//! libtorch's intra-op thread pool is process-wide, so it is set here once, from the largest
//! `intra_op_threads` of all models (review finding A18: before, each pipeline set it, and the
//! last one won).

use std::{collections::HashMap, sync::Arc};

use thiserror::Error;
use tokio::{sync::Mutex, task::JoinHandle};
use tracing::{info, warn};

use super::{
    load_newest, refresh, reload,
    runtime::{Runtime, RuntimeSpec},
    versions, ModelRefused,
};
use super::{rollout, store::Repository};
use crate::config::{ModelSource, ModelSpec, Pipeline, RepositoryLocation};

/// A model in service: its threads and versions, and the reloader that swaps them.
pub struct Model {
    pub runtime: Runtime,
    /// What the threads were started with; another pipeline naming this model must agree.
    spec: Arc<ModelSpec>,
    reloader: Option<JoinHandle<()>>,
}

impl Drop for Model {
    fn drop(&mut self) {
        if let Some(r) = self.reloader.take() {
            r.abort();
        }
    }
}

/// Why a model cannot be put in service.
#[derive(Debug, Error)]
pub enum ServiceError {
    /// No version of it can serve: a configuration error (exit code 2).
    #[error(transparent)]
    Refused(#[from] ModelRefused),
    /// Two pipelines name one model with different settings.
    #[error(
        "model {model:?} is declared twice with different settings ({what}); give one of \
         them another name"
    )]
    Conflict { model: String, what: &'static str },
    #[error("loading model {model:?} stopped: {reason}")]
    Internal { model: String, reason: String },
}

impl ServiceError {
    /// A problem of the configuration (the model files or their declarations): exit code 2.
    pub fn is_config(&self) -> bool {
        matches!(self, Self::Refused(_) | Self::Conflict { .. })
    }
}

/// The models of the process, by name.
#[derive(Default)]
pub struct Service {
    models: Mutex<HashMap<String, Arc<Model>>>,
    /// The process serves the inference API: models keep a share of each pass for requests.
    api: bool,
}

impl Service {
    /// A service for the models of `pipelines`; sets libtorch's process-wide thread pool.
    /// `api`: the process also serves the inference API ([`crate::serve`]).
    pub fn new(pipelines: &[Pipeline], api: bool) -> Self {
        if let Some(n) = pipelines
            .iter()
            .flat_map(|p| &p.models)
            .map(|m| m.intra_op_threads)
            .max()
        {
            tch::set_num_threads(n as i32);
        }
        Self {
            api,
            ..Self::default()
        }
    }

    /// The model `spec` names: loaded and warmed up on first use (blocking a worker thread for
    /// the warm-up), shared afterwards.
    pub async fn model(&self, spec: &ModelSpec) -> Result<Arc<Model>, ServiceError> {
        let mut models = self.models.lock().await;
        if let Some(model) = models.get(&spec.name) {
            return match conflict(&model.spec, spec) {
                Some(what) => Err(ServiceError::Conflict {
                    model: spec.name.clone(),
                    what,
                }),
                None => Ok(model.clone()),
            };
        }
        let spec = Arc::new(spec.clone());
        let s = spec.clone();
        let loaded = tokio::task::spawn_blocking(move || load_newest(&s))
            .await
            .map_err(|e| ServiceError::Internal {
                model: spec.name.clone(),
                reason: e.to_string(),
            })?
            .map_err(|reason| ModelRefused {
                model: spec.name.clone(),
                reason,
            })?;
        if spec.device == crate::config::DeviceChoice::Auto && loaded.device == tch::Device::Cpu {
            info!(model = %spec.name, "No CUDA device available; the model runs on the CPU.");
        }
        info!(model = %spec.name, version = %loaded.version, device = ?loaded.device,
              path = %loaded.candidate.path.display(), "Model loaded.");
        let runtime = Runtime::start(RuntimeSpec::from(&*spec).serving(&spec, self.api), loaded);
        if let ModelSource::Repository(location) = &spec.source {
            runtime
                .versions
                .on_trip(refuse_in_rollout(&spec.name, location));
        }
        versions::set_version_metrics(&spec.name, &runtime.versions.served(), None);
        // The rollout's canary and shadow versions, if any, before the first batch.
        refresh(&spec, &runtime.versions).await;
        let reloader = spec
            .reload_interval
            .map(|every| tokio::spawn(reload(spec.clone(), runtime.versions.clone(), every)));
        let model = Arc::new(Model {
            runtime,
            spec: spec.clone(),
            reloader,
        });
        models.insert(spec.name.clone(), model.clone());
        Ok(model)
    }
}

/// A breaker's trip, reported to the repository's rollout (from a thread of its own: the model
/// thread that tripped goes on at once), so that every instance stops serving the version,
/// not only the one that tripped.
fn refuse_in_rollout(model: &str, location: &RepositoryLocation) -> versions::OnTrip {
    let (model, location) = (model.to_owned(), location.clone());
    versions::OnTrip(Box::new(move |version: &str| {
        let (model, location, version) = (model.clone(), location.clone(), version.to_owned());
        std::thread::spawn(move || {
            let reason = format!("version {version} refused: a circuit breaker tripped on it");
            let change = rollout::Change::Refuse(version.clone());
            match Repository::open(&location).and_then(|r| rollout::change(&r, change, &reason)) {
                Ok(r) => info!(%model, %version, stable = %r.stable,
                               "Circuit breaker trip written to the rollout."),
                Err(e) => warn!(%model, %version, error = %e,
                                "Cannot write the circuit breaker's trip to the rollout."),
            }
        });
    }))
}

/// What differs between two declarations of one model in what its threads run: its source,
/// device, batching, inputs and outputs. (Topics, keys and pass-through columns are each
/// pipeline's own.)
fn conflict(a: &ModelSpec, b: &ModelSpec) -> Option<&'static str> {
    if a.source != b.source {
        Some("path")
    } else if a.device != b.device {
        Some("device")
    } else if RuntimeSpec::from(a) != RuntimeSpec::from(b) || a.serving != b.serving {
        Some("threads, batching, queue, breaker or serving")
    } else if a.reload_interval != b.reload_interval {
        Some("reload_interval")
    } else if a.inputs != b.inputs {
        Some("inputs")
    } else if a.output != b.output {
        Some("output")
    } else {
        None
    }
}
