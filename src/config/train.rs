//! `[train]`: the trainer of one model (`sluice train`), which reads the examples of the label
//! join, fine-tunes the serving version in rounds and publishes a candidate only if it passes
//! the gates ([`crate::train`]).
//!
//! A trainer file has `[source]` (bootstrap servers and a group; the topic is
//! `train.examples_topic`) and `[train]`, nothing else: no schema, errors or sinks.

use std::time::Duration;

use serde::Deserialize;

use super::{raw::Setting, units::HumanDuration, valid_name, Problems, RepositoryLocation};

/// The records a trainer reads: [`crate::event::Example`]s, as the label join writes them.
pub const SCHEMA: &str = r#"{
  "type": "object",
  "required": ["event_id", "model_version", "features", "label", "scored_at"],
  "properties": {
    "event_id": {"type": "string"},
    "model_version": {"type": "string"},
    "features": {"type": "array", "items": {"type": "number"}},
    "outputs": {"type": "array", "items": {"type": "number"}},
    "label": {"type": "number"},
    "labelled": {"type": "boolean"},
    "scored_at": {"type": "integer"}
  }
}"#;

#[derive(Debug, Default, Deserialize)]
pub struct RawTrain {
    /// The model's name (for metrics, logs and the decisions).
    pub model: Option<Setting<String>>,
    /// The model repository the scoring pipelines serve from (`<path>/<version>/model.pt`),
    /// relative to this file: the serving version is read from it, candidates published to it.
    pub repository: Option<Setting<String>>,
    /// `object_store` options for a repository on an object store (`s3://…`).
    pub storage_options: Option<Setting<super::raw::Properties>>,
    /// Where an object store's versions and the candidates go (default: the temporary folder).
    pub cache_dir: Option<Setting<String>>,
    /// The label join's examples topic; it must have one partition, so that one trainer in
    /// the group sees every example (others stand by).
    pub examples_topic: Option<Setting<String>>,
    /// `adam` (default) or `sgd`.
    pub optimizer: Option<Setting<String>>,
    /// Learning rate (default 0.001).
    pub learning_rate: Option<Setting<f64>>,
    /// SGD momentum (default 0).
    pub momentum: Option<Setting<f64>>,
    /// L2 weight decay (default 0).
    pub weight_decay: Option<Setting<f64>>,
    /// Examples per optimizer step (default 64).
    pub batch_size: Option<Setting<usize>>,
    /// Passes over a round's training examples (default 1).
    pub epochs: Option<Setting<usize>>,
    /// A round starts once this many new examples have arrived (default 10000)...
    pub round_examples: Option<Setting<usize>>,
    /// ...or this long after the previous round, with at least `min_examples` (default "10m").
    pub round_interval: Option<Setting<HumanDuration>>,
    /// The newest share of a round's examples (by the time they were scored) held out for the
    /// gates, never trained on (default 0.2).
    pub holdout: Option<Setting<f64>>,
    /// Holdout examples a decision needs at least (default 200).
    pub min_examples: Option<Setting<usize>>,
    /// How much higher the candidate's holdout log loss may be than the serving version's
    /// (default 0).
    pub max_log_loss_increase: Option<Setting<f64>>,
    /// How much lower its holdout AUC may be (default 0).
    pub max_auc_decrease: Option<Setting<f64>>,
    /// Candidates (with their decisions) kept in `<repository>/candidates` (default 20).
    pub keep_candidates: Option<Setting<usize>>,
    /// What a published version does: `promote` (default: it becomes stable at once),
    /// `canary` (it serves `canary_weight` of the entities) or `shadow` (it is scored beside
    /// the stable version); then it is watched on the labels of events scored from then on.
    pub rollout: Option<Setting<String>>,
    /// The canary's share of entities (default 0.1).
    pub canary_weight: Option<Setting<f64>>,
    /// Labelled examples of events scored after a publication that decide it: a canary or
    /// shadow that passes the gates on them is promoted; a version that fails them is rolled
    /// back (default: `min_examples`).
    pub watch_examples: Option<Setting<usize>>,
    /// Labelled examples per version kept for the online metrics (default 10000).
    pub online_window: Option<Setting<usize>>,
    /// libtorch's threads for training (default 1). libtorch's threads spin while they wait
    /// for work, so a trainer with more threads than its share of cores slows down scoring on
    /// the same machine far more than its share (see the benchmark).
    pub threads: Option<Setting<usize>>,
}

/// What the trainer does with a version it published.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RolloutSpec {
    Promote,
    Canary { weight: f64 },
    Shadow,
}

/// The optimizer of a round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimizerSpec {
    Adam,
    Sgd { momentum: f64 },
}

/// What a candidate must do to be published.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GateSpec {
    pub min_examples: usize,
    pub max_log_loss_increase: f64,
    pub max_auc_decrease: f64,
}

/// A validated `[train]`.
#[derive(Debug, Clone)]
pub struct TrainSpec {
    pub model: String,
    pub repository: RepositoryLocation,
    pub examples_topic: String,
    pub optimizer: OptimizerSpec,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub batch_size: usize,
    pub epochs: usize,
    pub round_examples: usize,
    pub round_interval: Duration,
    pub holdout: f64,
    pub gates: GateSpec,
    pub keep_candidates: usize,
    pub rollout: RolloutSpec,
    pub watch_examples: usize,
    pub online_window: usize,
    pub threads: usize,
}

fn non_negative(p: &mut Problems, at: &str, v: Option<f64>) -> Option<f64> {
    match v {
        Some(x) if !x.is_finite() || x < 0.0 => {
            p.push(at, "must be a finite number, 0 or more");
            None
        }
        other => other,
    }
}

pub(super) fn build_train(
    raw: &RawTrain,
    base: &std::path::Path,
    p: &mut Problems,
) -> Option<TrainSpec> {
    let model = p.required("train.model", &raw.model);
    if let Some(m) = model.as_deref().filter(|m| !valid_name(m)) {
        p.push("train.model", format!("{m:?} is not a valid name"));
    }
    let options = super::properties(p, "train.storage_options", &raw.storage_options);
    let cache = p
        .read("train.cache_dir", &raw.cache_dir)
        .ok()
        .flatten()
        .map_or_else(
            || {
                super::model::default_cache(&format!(
                    "{}-trainer",
                    model.as_deref().unwrap_or("model")
                ))
            },
            |c| base.join(c),
        );
    let repository = p
        .required("train.repository", &raw.repository)
        .and_then(
            |r| match super::model::repository_location(&r, base, options, cache) {
                Ok(r) => Some(r),
                Err(e) => {
                    p.push("train.repository", e);
                    None
                }
            },
        );
    let examples_topic = p.required("train.examples_topic", &raw.examples_topic);
    if let Some(t) = examples_topic.as_deref().filter(|t| !valid_name(t)) {
        p.push(
            "train.examples_topic",
            format!("{t:?} is not a valid topic name"),
        );
    }
    let momentum = p.get("train.momentum", &raw.momentum, 0.0);
    let momentum = non_negative(p, "train.momentum", momentum);
    let optimizer = match p
        .get("train.optimizer", &raw.optimizer, "adam".into())
        .as_deref()
    {
        Some("adam") => {
            if raw.momentum.is_some() {
                p.push("train.momentum", "is only used with optimizer = \"sgd\"");
            }
            Some(OptimizerSpec::Adam)
        }
        Some("sgd") => momentum.map(|momentum| OptimizerSpec::Sgd { momentum }),
        Some(other) => {
            p.push(
                "train.optimizer",
                format!("expected \"adam\" or \"sgd\", got {other:?}"),
            );
            None
        }
        None => None,
    };
    let learning_rate = p.get("train.learning_rate", &raw.learning_rate, 0.001);
    let learning_rate = match non_negative(p, "train.learning_rate", learning_rate) {
        Some(0.0) => {
            p.push("train.learning_rate", "must be greater than 0");
            None
        }
        other => other,
    };
    let weight_decay = p.get("train.weight_decay", &raw.weight_decay, 0.0);
    let weight_decay = non_negative(p, "train.weight_decay", weight_decay);
    let batch_size = p.get("train.batch_size", &raw.batch_size, 64);
    let batch_size = p.positive("train.batch_size", batch_size);
    let epochs = p.get("train.epochs", &raw.epochs, 1);
    let epochs = p.positive("train.epochs", epochs);
    let round_examples = p.get("train.round_examples", &raw.round_examples, 10_000);
    let round_examples = p.positive("train.round_examples", round_examples);
    let round_interval = p
        .get(
            "train.round_interval",
            &raw.round_interval,
            HumanDuration(Duration::from_secs(600)),
        )
        .map(|d| d.0);
    let round_interval = p.positive("train.round_interval", round_interval);
    let holdout = match p.get("train.holdout", &raw.holdout, 0.2) {
        Some(h) if h > 0.0 && h < 1.0 => Some(h),
        Some(h) => {
            p.push(
                "train.holdout",
                format!("must be between 0 and 1 (a share), got {h}"),
            );
            None
        }
        None => None,
    };
    let min_examples = p.get("train.min_examples", &raw.min_examples, 200);
    let min_examples = p.positive("train.min_examples", min_examples);
    let max_log_loss_increase = p.get(
        "train.max_log_loss_increase",
        &raw.max_log_loss_increase,
        0.0,
    );
    let max_log_loss_increase =
        non_negative(p, "train.max_log_loss_increase", max_log_loss_increase);
    let max_auc_decrease = p.get("train.max_auc_decrease", &raw.max_auc_decrease, 0.0);
    let max_auc_decrease = non_negative(p, "train.max_auc_decrease", max_auc_decrease);
    let keep_candidates = p.get("train.keep_candidates", &raw.keep_candidates, 20);
    let keep_candidates = p.positive("train.keep_candidates", keep_candidates);
    let weight = p.get("train.canary_weight", &raw.canary_weight, 0.1);
    let weight = match weight {
        Some(w) if !(w > 0.0 && w <= 1.0) => {
            p.push("train.canary_weight", format!("must be in (0, 1], got {w}"));
            None
        }
        other => other,
    };
    let rollout = match p
        .get("train.rollout", &raw.rollout, "promote".into())
        .as_deref()
    {
        Some("promote") => Some(RolloutSpec::Promote),
        Some("canary") => weight.map(|weight| RolloutSpec::Canary { weight }),
        Some("shadow") => Some(RolloutSpec::Shadow),
        Some(other) => {
            p.push(
                "train.rollout",
                format!("expected \"promote\", \"canary\" or \"shadow\", got {other:?}"),
            );
            None
        }
        None => None,
    };
    if raw.canary_weight.is_some() && !matches!(rollout, Some(RolloutSpec::Canary { .. })) {
        p.push(
            "train.canary_weight",
            "is only used with rollout = \"canary\"",
        );
    }
    let watch_examples = p.get(
        "train.watch_examples",
        &raw.watch_examples,
        min_examples.unwrap_or(200),
    );
    let watch_examples = p.positive("train.watch_examples", watch_examples);
    let online_window = p.get("train.online_window", &raw.online_window, 10_000);
    let online_window = p.positive("train.online_window", online_window);
    let threads = p.get("train.threads", &raw.threads, 1);
    let threads = p.positive("train.threads", threads);
    Some(TrainSpec {
        model: model?,
        repository: repository?,
        examples_topic: examples_topic?,
        optimizer: optimizer?,
        learning_rate: learning_rate?,
        weight_decay: weight_decay?,
        batch_size: batch_size?,
        epochs: epochs?,
        round_examples: round_examples?,
        round_interval: round_interval?,
        holdout: holdout?,
        gates: GateSpec {
            min_examples: min_examples?,
            max_log_loss_increase: max_log_loss_increase?,
            max_auc_decrease: max_auc_decrease?,
        },
        keep_candidates: keep_candidates?,
        rollout: rollout?,
        watch_examples: watch_examples?,
        online_window: online_window?,
        threads: threads?,
    })
}
