//! `[join]`: a pipeline that joins a model's feedback records with the labels that arrive
//! later, and produces training examples ([`crate::sink::join`]).
//!
//! A join pipeline consumes exactly two topics, the model's feedback topic and a labels
//! topic, so `source.topics` and `schema` are left out: the events have sluice's own feedback
//! format or the label format below, and [`SCHEMA`] covers both.

use std::{collections::BTreeMap, time::Duration};

use serde::Deserialize;

use super::{
    properties,
    raw::{Properties, RawRedisConnection, Setting},
    redis::{build_connection, RedisConnection},
    units::HumanDuration,
    valid_name, Problems,
};

/// The events of a join pipeline: feedback records (`model_version`, `features`, `outputs`) and
/// labels (`label`, `labelled_at`), both with an `event_id`. Other fields are ignored.
pub const SCHEMA: &str = r#"{
  "type": "object",
  "required": ["event_id"],
  "properties": {
    "event_id": {"type": "string", "minLength": 1},
    "model_version": {"type": "string"},
    "features": {"type": "array", "items": {"type": "number"}},
    "outputs": {"type": "array", "items": {"type": "number"}},
    "label": {"type": "number"},
    "labelled_at": {"type": "string", "format": "date-time"}
  }
}"#;

#[derive(Debug, Default, Deserialize)]
pub struct RawJoin {
    /// The model whose feedback is joined (its name; it prefixes the join's Redis keys).
    pub model: Option<Setting<String>>,
    /// The model's `feedback_topic`.
    pub feedback_topic: Option<Setting<String>>,
    /// Topic of the labels: `{"event_id": "...", "label": 1, "labelled_at": "..."}`.
    pub labels_topic: Option<Setting<String>>,
    /// Topic the joined examples are produced to (keyed by event id).
    pub examples_topic: Option<Setting<String>>,
    /// How long after an event was scored its label may still arrive (required).
    pub maturity: Option<Setting<HumanDuration>>,
    /// What an event without a label becomes at the end of its maturity window: `default`
    /// (an example with `default_label`; the default) or `drop`.
    pub unlabelled: Option<Setting<String>>,
    /// The label of an event that got none (default 0).
    pub default_label: Option<Setting<f64>>,
    /// How long a record waits for its partner after it arrives, at least (default "1m"): a
    /// label for an event whose feedback has not arrived by then is a dead letter
    /// (`unknown_event`); feedback consumed late (catching up) keeps its window open this long.
    pub grace: Option<Setting<HumanDuration>>,
    /// How long a decision is remembered after the window (default "1d"), to recognise
    /// duplicate and late labels and replays of feedback; older feedback is skipped.
    pub remember: Option<Setting<HumanDuration>>,
    /// Redis hash slots the join state is spread over (default 16): each holds its own
    /// deadlines, so a Redis Cluster shares the work.
    pub shards: Option<Setting<u32>>,
    /// How often matured events are looked for (default "1s").
    pub sweep_interval: Option<Setting<HumanDuration>>,
    /// Raw librdkafka properties of the examples producer.
    pub producer_properties: Option<Setting<Properties>>,
    /// Where the join state is kept: `url` or `cluster_nodes`, `tls_ca_file`.
    pub redis: Option<RawRedisConnection>,
}

/// What an event without a label becomes when its window ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Unlabelled {
    /// An example with this label.
    Default(f64),
    /// Nothing.
    Drop,
}

/// A validated `[join]`.
#[derive(Debug, Clone)]
pub struct JoinSpec {
    pub model: String,
    pub feedback_topic: String,
    pub labels_topic: String,
    pub examples_topic: String,
    pub maturity: Duration,
    pub unlabelled: Unlabelled,
    pub grace: Duration,
    pub remember: Duration,
    pub shards: u32,
    pub sweep_interval: Duration,
    pub producer_properties: BTreeMap<String, String>,
    pub redis: RedisConnection,
}

impl JoinSpec {
    /// The topics the pipeline consumes.
    pub fn topics(&self) -> Vec<String> {
        vec![self.feedback_topic.clone(), self.labels_topic.clone()]
    }
}

fn topic(p: &mut Problems, at: &str, s: &Option<Setting<String>>) -> Option<String> {
    let t = p.required(at, s)?;
    if !valid_name(&t) || t.len() > 249 {
        p.push(at, format!("{t:?} is not a valid topic name"));
        return None;
    }
    Some(t)
}

fn duration(
    p: &mut Problems,
    at: &str,
    s: &Option<Setting<HumanDuration>>,
    default: Option<Duration>,
) -> Option<Duration> {
    let d = match default {
        Some(d) => p.get(at, s, HumanDuration(d)),
        None => p.required(at, s),
    };
    p.positive(at, d.map(|d| d.0))
}

pub(super) fn build_join(
    raw: &RawJoin,
    base: &std::path::Path,
    p: &mut Problems,
) -> Option<JoinSpec> {
    let model = p.required("join.model", &raw.model);
    if let Some(m) = model
        .as_deref()
        .filter(|m| !valid_name(m) || m.contains('.'))
    {
        p.push(
            "join.model",
            format!("{m:?} may only use letters, digits, `_` and `-`"),
        );
    }
    let feedback_topic = topic(p, "join.feedback_topic", &raw.feedback_topic);
    let labels_topic = topic(p, "join.labels_topic", &raw.labels_topic);
    let examples_topic = topic(p, "join.examples_topic", &raw.examples_topic);
    if let (Some(f), Some(l)) = (&feedback_topic, &labels_topic) {
        if f == l {
            p.push("join.labels_topic", "must differ from join.feedback_topic");
        }
    }
    if let Some(e) = &examples_topic {
        if Some(e) == feedback_topic.as_ref() || Some(e) == labels_topic.as_ref() {
            p.push(
                "join.examples_topic",
                "must differ from the feedback and labels topics",
            );
        }
    }
    let maturity = duration(p, "join.maturity", &raw.maturity, None);
    let default_label = p.get("join.default_label", &raw.default_label, 0.0);
    if default_label.is_some_and(|l| !l.is_finite()) {
        p.push("join.default_label", "must be a finite number");
    }
    let unlabelled = match p
        .get("join.unlabelled", &raw.unlabelled, "default".into())
        .as_deref()
    {
        Some("default") => default_label.map(Unlabelled::Default),
        Some("drop") => {
            if raw.default_label.is_some() {
                p.push(
                    "join.default_label",
                    "is only used with unlabelled = \"default\"",
                );
            }
            Some(Unlabelled::Drop)
        }
        Some(other) => {
            p.push(
                "join.unlabelled",
                format!("expected \"default\" or \"drop\", got {other:?}"),
            );
            None
        }
        None => None,
    };
    let grace = duration(p, "join.grace", &raw.grace, Some(Duration::from_secs(60)));
    let remember = duration(
        p,
        "join.remember",
        &raw.remember,
        Some(Duration::from_secs(86_400)),
    );
    let shards = p.get("join.shards", &raw.shards, 16);
    let shards = p.positive("join.shards", shards);
    let sweep_interval = duration(
        p,
        "join.sweep_interval",
        &raw.sweep_interval,
        Some(Duration::from_secs(1)),
    );
    let producer_properties = properties(p, "join.producer_properties", &raw.producer_properties);
    let redis = match &raw.redis {
        Some(r) => build_connection("join.redis", r, base, p),
        None => {
            p.push("join.redis", "is required (url or cluster_nodes)");
            None
        }
    };
    Some(JoinSpec {
        model: model?,
        feedback_topic: feedback_topic?,
        labels_topic: labels_topic?,
        examples_topic: examples_topic?,
        maturity: maturity?,
        unlabelled: unlabelled?,
        grace: grace?,
        remember: remember?,
        shards: shards?,
        sweep_interval: sweep_interval?,
        producer_properties,
        redis: redis?,
    })
}
