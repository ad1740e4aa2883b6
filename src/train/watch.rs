//! After a publication: online metrics per version, and the watch that promotes or rolls
//! back the version the trainer published.
//!
//! **Online metrics.** Every example carries the version that scored the event and what it
//! answered, so the trainer, which sees every example of its model, keeps the last
//! `online_window` of each version and exports their log loss, AUC, positives rate and
//! prediction rate (share of scores ≥ 0.5) as `sluice_online_*{model, version}`.
//!
//! **The watch.** A published version is watched (recorded in the rollout, so a restarted
//! trainer goes on watching) against its baseline, the version stable when it was published,
//! on the examples of events scored from then on: once `watch_examples` of them have arrived,
//! both versions score their features, as fed, and the gates decide on the same events. A
//! canary or shadow that passes becomes stable; a promoted version that passes stays; one that
//! fails is rolled back (the canary or shadow withdrawn, or the stable version back to the
//! baseline) for every instance. Comparing on the same events, rather than the canary's
//! served scores on its own share of entities, keeps the decision free of the difference
//! between the two shares. Rounds wait while a watch is open. A rollout changed by the
//! operator meanwhile ends the watch without touching it.

use std::collections::{HashMap, VecDeque};

use tracing::{info, warn};

use super::{
    gate,
    metrics::{evaluate, Metrics},
    repository, round,
};
use crate::{
    config::{GateSpec, RolloutSpec, TrainSpec},
    event::Example,
    score::rollout::{self, Change, Watch},
};

/// The last examples of each version, for the online metrics.
#[derive(Default)]
pub struct Online {
    by_version: HashMap<String, VecDeque<(f64, bool)>>,
    changed: bool,
}

impl Online {
    pub fn add(&mut self, window: usize, e: &Example) {
        let Some(score) = e.outputs.first() else {
            return;
        };
        let kept = self.by_version.entry(e.model_version.clone()).or_default();
        kept.push_back((*score, e.label >= 0.5));
        if kept.len() > window {
            kept.pop_front();
        }
        self.changed = true;
    }

    /// Sets the gauges, if anything arrived since the last time.
    pub fn export(&mut self, model: &str) {
        if !std::mem::take(&mut self.changed) {
            return;
        }
        for (version, kept) in &self.by_version {
            let (scores, labels): (Vec<f64>, Vec<bool>) = kept.iter().copied().unzip();
            let Some(m) = evaluate(&scores, &labels) else {
                continue;
            };
            let flagged = scores.iter().filter(|s| **s >= 0.5).count();
            let labels = [("model", model.to_owned()), ("version", version.clone())];
            let n = m.examples as f64;
            metrics::gauge!("sluice_online_examples", &labels).set(n);
            metrics::gauge!("sluice_online_log_loss", &labels).set(m.log_loss);
            metrics::gauge!("sluice_online_auc", &labels).set(m.auc.unwrap_or(f64::NAN));
            metrics::gauge!("sluice_online_positives_rate", &labels).set(m.positives as f64 / n);
            metrics::gauge!("sluice_online_prediction_rate", &labels).set(flagged as f64 / n);
        }
    }
}

/// A version under watch and the examples collected for it.
pub struct Watching {
    pub watch: Watch,
    examples: Vec<Example>,
}

/// How a watch ended.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WatchDecision {
    pub model: String,
    pub version: String,
    pub baseline: String,
    pub since: i64,
    /// `promoted`, `kept`, `rolled_back` or `overtaken` (the rollout changed meanwhile).
    pub result: &'static str,
    pub reasons: Vec<String>,
    pub examples: usize,
    pub baseline_metrics: Option<Metrics>,
    pub version_metrics: Option<Metrics>,
    pub decided_at: String,
}

impl Watching {
    /// The watch recorded in the repository's rollout, if any (a restarted trainer resumes).
    pub fn resume(spec: &TrainSpec) -> Option<Self> {
        match repository::open(&spec.repository).and_then(|r| rollout::read(&r)) {
            Ok(r) => r.and_then(|r| r.watch).map(|watch| {
                info!(version = %watch.version, baseline = %watch.baseline,
                      "Resuming the watch of a published version.");
                Self {
                    watch,
                    examples: Vec::new(),
                }
            }),
            Err(e) => {
                warn!(error = %e, "Cannot read the rollout; no watch resumed.");
                None
            }
        }
    }

    /// Starts watching `version` (just published) as `spec.rollout` says: puts it in service
    /// as stable, canary or shadow, and records the watch.
    pub fn start(spec: &TrainSpec, version: &str, baseline: &str) -> Result<Self, String> {
        let repo = &repository::open(&spec.repository)?;
        let reason = format!("version {version} published by the trainer");
        let change = match spec.rollout {
            RolloutSpec::Promote => Change::Promote(Some(version.to_owned())),
            RolloutSpec::Canary { weight } => Change::Canary {
                version: version.to_owned(),
                weight,
            },
            RolloutSpec::Shadow => Change::Shadow(version.to_owned()),
        };
        rollout::change(repo, change, &reason)?;
        let watch = Watch {
            version: version.to_owned(),
            baseline: baseline.to_owned(),
            since: chrono::Utc::now().timestamp_millis(),
        };
        rollout::change(repo, Change::Watch(Some(watch.clone())), &reason)?;
        Ok(Self {
            watch,
            examples: Vec::new(),
        })
    }

    /// Keeps `e` if its event was scored since the watch began.
    pub fn add(&mut self, e: &Example) {
        if e.scored_at >= self.watch.since {
            self.examples.push(e.clone());
        }
    }

    pub fn due(&self, spec: &TrainSpec) -> bool {
        self.examples.len() >= spec.watch_examples
    }

    /// Decides: scores the examples with both versions, applies the gates, and changes the
    /// rollout; the decision is logged, counted and written as `watch.json` in the version.
    pub fn decide(self, spec: &TrainSpec) -> Result<WatchDecision, String> {
        let repo = &repository::open(&spec.repository)?;
        let w = &self.watch;
        let examples: Vec<&Example> = self.examples.iter().collect();
        let labels: Vec<bool> = examples.iter().map(|e| e.label >= 0.5).collect();
        let score = |version: &str| -> Result<Option<Metrics>, String> {
            let p = round::predict(
                &repository::version_file(repo, version)?,
                version,
                &examples,
            )?;
            Ok(evaluate(&p, &labels))
        };
        let baseline = score(&w.baseline)?;
        let watched = score(&w.version);
        let mut reasons = Vec::new();
        let watched = watched.unwrap_or_else(|e| {
            reasons.push(format!("the version does not serve: {e}"));
            None
        });
        let gates = GateSpec {
            min_examples: spec.watch_examples,
            ..spec.gates
        };
        if let (Some(b), Some(v)) = (&baseline, &watched) {
            reasons.extend(gate::failures(&gates, b, v));
        }
        let current = rollout::current(repo)?;
        let still = current.watch.as_ref() == Some(w);
        let result = match (still, reasons.is_empty(), spec.rollout) {
            (false, _, _) => "overtaken",
            (true, true, RolloutSpec::Promote) => "kept",
            (true, true, _) => "promoted",
            (true, false, _) => "rolled_back",
        };
        let decision = WatchDecision {
            model: spec.model.clone(),
            version: w.version.clone(),
            baseline: w.baseline.clone(),
            since: w.since,
            result,
            reasons,
            examples: examples.len(),
            baseline_metrics: baseline,
            version_metrics: watched,
            decided_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        };
        // The decision is written before it takes effect, so that whoever sees the rollout
        // change finds its reasons beside the version.
        let json = serde_json::to_vec_pretty(&decision).expect("serializable");
        if let Err(e) = repo.write(&format!("{}/watch.json", w.version), &json) {
            warn!(error = %e, "Cannot write the watch decision.");
        }
        let why = |what: &str| format!("version {} {what} by the trainer's watch", w.version);
        match result {
            "kept" => rollout::change(repo, Change::Watch(None), &why("kept")),
            "promoted" => rollout::change(
                repo,
                Change::Promote(Some(w.version.clone())),
                &why("promoted"),
            ),
            "rolled_back" => rollout::change(repo, Change::Rollback, &why("rolled back")),
            _ => Ok(current),
        }?;
        metrics::counter!("sluice_train_watches_total", "model" => spec.model.clone(),
            "result" => result)
        .increment(1);
        let show = |m: &Option<Metrics>| Metrics::summary(m.as_ref());
        let what = format!(
            "version {} against {} on {} examples scored since the publication: {} vs {}",
            w.version,
            w.baseline,
            decision.examples,
            show(&decision.version_metrics),
            show(&decision.baseline_metrics)
        );
        match result {
            "rolled_back" => {
                warn!(model = %spec.model, reasons = ?decision.reasons, "Watch: rolled back {what}")
            }
            _ => info!(model = %spec.model, result, "Watch: {what}"),
        }
        Ok(decision)
    }
}
