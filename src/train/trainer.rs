//! `sluice train`: the trainer of one model, a process of its own.
//!
//! It consumes the label join's examples topic in its consumer group. That topic has one
//! partition, so one trainer in the group sees every example and any other stands by, taking
//! over on a rebalance (when the active one dies): one trainer per model, however many
//! scoring instances there are. Examples are kept in memory, one per event id (the join
//! produces them at least once), until a round is due: `round_examples` of them, or
//! `round_interval` since the last round with enough for the holdout. A round:
//!
//! 1. sorts the examples by the time they were scored; the newest `holdout` share is the
//!    holdout, never trained on; the rest is the training set;
//! 2. fine-tunes the serving version on it ([`super::round`]) into
//!    `candidates/<round>/model.pt`;
//! 3. scores the holdout with the serving version and the candidate, each loaded and warmed
//!    up as a scoring pipeline would, and compares them ([`super::metrics`], [`super::gate`]);
//! 4. publishes the candidate as the next version if it passes ([`super::repository`]), so
//!    every scoring instance's reloader picks it up; writes the decision beside the candidate
//!    (and the version), logs it and counts it;
//! 5. commits the examples' offsets.
//!
//! A crash before 5 consumes the round's examples again; a round that published already is
//! then redone on top of the version it published. A revoked partition drops the examples
//! held (the next owner reads them again).

use std::{
    collections::HashSet,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use rdkafka::{
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance},
    error::KafkaError,
    ClientContext, Message, Offset, TopicPartitionList,
};
use thiserror::Error;
use tracing::{info, warn};

use super::{
    gate::{self, Decision},
    metrics::{evaluate, Metrics},
    repository, round,
    watch::{Online, Watching},
};

/// How often the online metrics are computed.
const EXPORT_EVERY: Duration = Duration::from_secs(2);
use crate::{
    config::{Pipeline, StartFrom, TrainSpec},
    event::Example,
};

/// Why the trainer stopped.
#[derive(Debug, Error)]
pub enum TrainError {
    #[error("the examples consumer: {0}")]
    Kafka(#[from] KafkaError),
    #[error(
        "the examples topic {topic:?} has {partitions} partitions; a trainer needs it to have \
         one, so that one trainer in the group sees every example"
    )]
    Partitions { topic: String, partitions: usize },
    /// The serving version cannot be trained (a configuration problem: exit code 2).
    #[error("model {model}: {reason}")]
    Untrainable { model: String, reason: String },
    #[error("model {model}: round {round} failed: {reason}")]
    Round {
        model: String,
        round: String,
        reason: String,
    },
}

impl TrainError {
    /// 2 for what only a new configuration or base model mends, 1 for the rest.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Partitions { .. } | Self::Untrainable { .. } => 2,
            _ => 1,
        }
    }
}

/// Notes revocations, so that the examples held for a partition given away are dropped.
struct Context {
    revoked: Arc<AtomicBool>,
}

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if matches!(rebalance, Rebalance::Revoke(_)) {
            self.revoked.store(true, Ordering::Release);
        }
    }
}

/// Runs the trainer of `pipeline` until `stop` is set, or `rounds` rounds are done.
pub fn run(
    pipeline: &Pipeline,
    rounds: Option<usize>,
    stop: &AtomicBool,
) -> Result<(), TrainError> {
    let spec = pipeline.train.as_ref().expect("a trainer file");
    tch::set_num_threads(spec.threads as i32);
    let source = &pipeline.source;
    // The pipelines' consumer settings; a trainer with no committed offset starts where
    // `start_from` says (librdkafka's reset, since it has no sinks to ask).
    let mut config = crate::source::consumer_config(source);
    if source.start_from == StartFrom::Latest {
        config.set("auto.offset.reset", "latest");
    }
    let revoked = Arc::new(AtomicBool::new(false));
    let consumer: BaseConsumer<Context> = config.create_with_context(Context {
        revoked: revoked.clone(),
    })?;
    let metadata = consumer.fetch_metadata(Some(&spec.examples_topic), Duration::from_secs(30))?;
    let partitions = metadata
        .topics()
        .first()
        .map_or(0, |t| t.partitions().len());
    if partitions != 1 {
        return Err(TrainError::Partitions {
            topic: spec.examples_topic.clone(),
            partitions,
        });
    }
    consumer.subscribe(&[&spec.examples_topic])?;
    info!(model = %spec.model, topic = %spec.examples_topic, group = %source.group_id,
          repository = %spec.repository, "Trainer started.");
    let mut held = Held::default();
    let mut last_round = Instant::now();
    let mut done = 0;
    let mut watching = Watching::resume(spec);
    let mut online = Online::default();
    let mut exported = Instant::now();
    while !stop.load(Ordering::Acquire) {
        if revoked.swap(false, Ordering::AcqRel) && !held.examples.is_empty() {
            info!(
                dropped = held.examples.len(),
                "Examples partition revoked; its examples are dropped."
            );
            held.clear();
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                held.next = Some((m.partition(), m.offset() + 1));
                if let Some(e) = held.take(spec, m.payload().unwrap_or_default()) {
                    online.add(spec.online_window, e);
                    if let Some(w) = &mut watching {
                        w.add(e);
                    }
                }
            }
            Some(Err(e)) => warn!(error = %e, "Reading examples failed; retrying."),
            None => {}
        }
        if exported.elapsed() >= EXPORT_EVERY {
            online.export(&spec.model);
            exported = Instant::now();
        }
        if watching.as_ref().is_some_and(|w| w.due(spec)) {
            let w = watching.take().expect("checked");
            let version = w.watch.version.clone();
            if let Err(e) = w.decide(spec) {
                warn!(%version, error = %e, "The watch could not decide; the rollout stays as it is (decide with `sluice model`).");
            }
        }
        let holdout = holdout_len(held.examples.len(), spec.holdout);
        let due = held.examples.len() >= spec.round_examples
            || (last_round.elapsed() >= spec.round_interval && holdout >= spec.gates.min_examples);
        if !due || watching.is_some() {
            continue;
        }
        let decision = run_round(spec, &mut held.examples)?;
        if let Some(version) = &decision.published_as {
            match Watching::start(spec, version, &decision.serving_version) {
                Ok(w) => watching = Some(w),
                Err(e) => {
                    warn!(%version, error = %e, "Cannot put the published version in the rollout.")
                }
            }
        }
        if let Some((partition, next)) = held.next {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&spec.examples_topic, partition, Offset::Offset(next))
                .expect("a valid offset");
            if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                warn!(error = %e, "Committing the round's examples failed; they will be read again (and skipped by event id).");
            }
        }
        held.next_round();
        last_round = Instant::now();
        done += 1;
        metrics::counter!("sluice_train_rounds_total", "model" => spec.model.clone(),
            "result" => if decision.passed { "published" } else { "refused" })
        .increment(1);
        if rounds.is_some_and(|r| done >= r) {
            break;
        }
    }
    info!(rounds = done, "Trainer stopped.");
    Ok(())
}

/// Examples held for the next round, one per event id.
#[derive(Default)]
struct Held {
    examples: Vec<Example>,
    ids: HashSet<String>,
    /// The previous round's event ids: a copy of one of its examples is not trained on again.
    previous: HashSet<String>,
    /// The offset to commit once the round is decided.
    next: Option<(i32, i64)>,
}

impl Held {
    /// Keeps the example in `payload` if it is a new, valid one of this model.
    fn take(&mut self, spec: &TrainSpec, payload: &[u8]) -> Option<&Example> {
        let skip = |why: &'static str| {
            metrics::counter!("sluice_train_examples_skipped_total", "model" => spec.model.clone(),
                "reason" => why)
            .increment(1);
        };
        let example: Example = match serde_json::from_slice(payload) {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "An example that does not parse is skipped.");
                skip("invalid");
                return None;
            }
        };
        if example.model != spec.model {
            skip("other_model");
            return None;
        }
        if example.features.is_empty()
            || !example.label.is_finite()
            || example.features.iter().any(|v| !v.is_finite())
        {
            skip("invalid");
            return None;
        }
        if self.previous.contains(&example.event_id) || !self.ids.insert(example.event_id.clone()) {
            skip("duplicate");
            return None;
        }
        metrics::counter!("sluice_train_examples_total", "model" => spec.model.clone())
            .increment(1);
        self.examples.push(example);
        self.examples.last()
    }

    fn clear(&mut self) {
        self.examples.clear();
        self.ids.clear();
        self.next = None;
    }

    fn next_round(&mut self) {
        self.previous = std::mem::take(&mut self.ids);
        self.clear();
    }
}

/// The holdout's size for `n` examples.
fn holdout_len(n: usize, share: f64) -> usize {
    ((n as f64) * share).ceil() as usize
}

/// One round: train, evaluate, decide, publish or not; the decision is logged and written.
pub fn run_round(spec: &TrainSpec, examples: &mut [Example]) -> Result<Decision, TrainError> {
    let round_id = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ").to_string();
    let failed = |reason: String| TrainError::Round {
        model: spec.model.clone(),
        round: round_id.clone(),
        reason,
    };
    examples.sort_by(|a, b| (a.scored_at, &a.event_id).cmp(&(b.scored_at, &b.event_id)));
    let split = examples.len() - holdout_len(examples.len(), spec.holdout);
    let (training, holdout) = examples.split_at(split);
    let training: Vec<&Example> = training.iter().collect();
    let holdout: Vec<&Example> = holdout.iter().collect();
    let repo = repository::open(&spec.repository).map_err(failed)?;
    let (serving_version, serving_path) = repository::serving(&repo).map_err(failed)?;
    let dir = repository::candidate_dir(&repo, &round_id);
    std::fs::create_dir_all(&dir).map_err(|e| failed(format!("{}: {e}", dir.display())))?;
    let candidate_path = dir.join("model.pt");
    let trained = if training.is_empty() {
        Err("no examples to train on".to_owned())
    } else {
        round::fine_tune(&serving_path, &candidate_path, &training, spec)
    };
    let trained = match trained {
        Ok(t) => t,
        // The base's own problems (no parameters, a shape the loss cannot take) stay until a
        // new version is published: not a round to refuse but a trainer that cannot work.
        Err(reason) => {
            return Err(TrainError::Untrainable {
                model: spec.model.clone(),
                reason: format!("version {serving_version}: {reason}"),
            })
        }
    };
    let labels: Vec<bool> = holdout.iter().map(|e| e.label >= 0.5).collect();
    let score = |path: &Path, version: &str| -> Result<Option<Metrics>, String> {
        let p = round::predict(path, version, &holdout)?;
        Ok(evaluate(&p, &labels))
    };
    let serving = score(&serving_path, &serving_version).map_err(failed)?;
    let candidate = score(&candidate_path, "candidate");
    let mut reasons = Vec::new();
    let candidate = match candidate {
        Ok(c) => c,
        Err(e) => {
            reasons.push(format!("the candidate does not serve: {e}"));
            None
        }
    };
    match (&serving, &candidate) {
        (Some(s), Some(c)) => reasons.extend(gate::failures(&spec.gates, s, c)),
        (None, _) | (_, None) if reasons.is_empty() => reasons.push("the holdout is empty".into()),
        _ => {}
    }
    let mut decision = Decision {
        model: spec.model.clone(),
        round: round_id.clone(),
        serving_version: serving_version.clone(),
        published_as: None,
        passed: reasons.is_empty(),
        reasons,
        gates: spec.gates.into(),
        trained: Some(trained.clone()),
        examples: examples.len(),
        holdout_examples: holdout.len(),
        holdout_from: holdout.first().map(|e| e.scored_at),
        holdout_to: holdout.last().map(|e| e.scored_at),
        serving,
        candidate,
        decided_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    };
    if decision.passed {
        // The rollout decides when the new version serves, not its number.
        if let Err(e) = crate::score::rollout::pin(&repo) {
            decision.passed = false;
            decision
                .reasons
                .push(format!("pinning the stable version failed: {e}"));
        }
    }
    if decision.passed {
        if let Err(e) = repository::publish(&repo, &candidate_path, &mut decision) {
            decision.passed = false;
            decision.published_as = None;
            decision.reasons.push(format!("publishing failed: {e}"));
        }
    }
    repository::write_decision(&repo, &round_id, &decision)
        .map_err(|e| failed(format!("writing the decision: {e}")))?;
    repository::prune_candidates(&repo, spec.keep_candidates);
    record(spec, &decision, &trained);
    Ok(decision)
}

/// The decision's log line and metrics.
fn record(spec: &TrainSpec, d: &Decision, t: &round::Trained) {
    let rate = t.examples as f64 * spec.epochs as f64 / t.seconds.max(1e-9);
    metrics::gauge!("sluice_train_examples_per_second", "model" => spec.model.clone()).set(rate);
    for (who, m) in [("serving", &d.serving), ("candidate", &d.candidate)] {
        if let Some(m) = m {
            let labels = [("model", spec.model.clone()), ("version", who.to_owned())];
            metrics::gauge!("sluice_train_holdout_log_loss", &labels).set(m.log_loss);
            metrics::gauge!("sluice_train_holdout_auc", &labels).set(m.auc.unwrap_or(f64::NAN));
        }
    }
    let show = |m: &Option<Metrics>| Metrics::summary(m.as_ref());
    let what = format!(
        "round {}: trained on {} examples ({:.0}/s), holdout {}: serving v{} {}; candidate {}",
        d.round,
        t.examples,
        rate,
        d.holdout_examples,
        d.serving_version,
        show(&d.serving),
        show(&d.candidate)
    );
    match &d.published_as {
        Some(v) => info!(model = %spec.model, version = %v, "Candidate published: {what}"),
        None => warn!(model = %spec.model, reasons = ?d.reasons, "Candidate refused: {what}"),
    }
}
