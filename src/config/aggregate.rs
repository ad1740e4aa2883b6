//! `[[sink.redis.aggregates]]`: windowed per-entity aggregates in Redis.
//!
//! A view keeps one hash per entity with mergeable partial aggregates per event-time bucket
//! (see [`crate::sink::redis`] for the layout and the exactly-once guard); its features are
//! `<feature>_<window>` (`orders_1h`), finished from the buckets when read. A model input takes
//! one as `{ aggregate = "<view>.<feature>_<window>" }`.

use std::time::Duration;

use serde_json::Value;

use super::{
    raw::{RawAggregate, RawAggregateFeature},
    redis::{name_and_key, KeyPart},
    units::parse_duration,
    Problems,
};
use crate::schema::{EventSchema, Kind};

/// At most this many buckets in a window: each event's point-in-time read walks them.
const MAX_BUCKETS: u128 = 20_000;

/// A validated aggregate view.
#[derive(Debug, Clone)]
pub struct AggregateSpec {
    pub name: String,
    pub key: Vec<KeyPart>,
    pub bucket: Duration,
    /// How far behind the entity's newest event time an event may be and still count.
    pub lateness: Duration,
    /// (label as written, e.g. `1h`; length), shortest first.
    pub windows: Vec<(String, Duration)>,
    /// EXPIRE of an entity's hash, refreshed on every write: at least the longest window plus
    /// the lateness and one bucket, so that no guard expires while its buckets still count.
    pub ttl: Duration,
    pub features: Vec<AggregateFeature>,
}

/// One aggregate, computed over every window of its view.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregateFeature {
    pub name: String,
    pub function: Function,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Function {
    /// Events in the window.
    Count,
    /// Events in the window whose `column`'s text form equals `equals`.
    CountIf {
        column: String,
        equals: String,
    },
    /// Of the column's non-null values in the window; `avg`, `min` and `max` are null when
    /// there are none, `sum` is 0.
    Sum(String),
    Avg(String),
    Min(String),
    Max(String),
}

/// A partial aggregate kept per bucket: what the functions are finished from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    /// `n`: events.
    Count,
    /// `c:<feature>`: events matching the feature's condition.
    Matching(String),
    /// `s:<column>`: sum of non-null values.
    Sum(String),
    /// `k:<column>`: non-null values.
    NonNull(String),
    /// `lo:<column>`, `hi:<column>`.
    Min(String),
    Max(String),
}

impl Part {
    /// The script's name for how the part merges (`n`, `c`, `s`, `k`, `lo`, `hi`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Count => "n",
            Self::Matching(_) => "c",
            Self::Sum(_) => "s",
            Self::NonNull(_) => "k",
            Self::Min(_) => "lo",
            Self::Max(_) => "hi",
        }
    }

    /// The part's name in the hash's `_parts` field.
    pub fn label(&self) -> String {
        match self {
            Self::Count => "n".into(),
            Self::Matching(f) => format!("c:{f}"),
            Self::Sum(c) | Self::NonNull(c) | Self::Min(c) | Self::Max(c) => {
                format!("{}:{c}", self.kind())
            }
        }
    }
}

impl AggregateSpec {
    /// The partials kept per bucket, in the order they are stored.
    pub fn parts(&self) -> Vec<Part> {
        let mut parts = vec![Part::Count];
        for f in &self.features {
            let needed = match &f.function {
                Function::Count => vec![],
                Function::CountIf { .. } => vec![Part::Matching(f.name.clone())],
                Function::Sum(c) => vec![Part::Sum(c.clone())],
                Function::Avg(c) => vec![Part::Sum(c.clone()), Part::NonNull(c.clone())],
                Function::Min(c) => vec![Part::Min(c.clone())],
                Function::Max(c) => vec![Part::Max(c.clone())],
            };
            for p in needed {
                if !parts.contains(&p) {
                    parts.push(p);
                }
            }
        }
        parts
    }

    /// The `_parts` field: the bucket length and the partials, e.g. `60000;n,s:amount`. A hash
    /// written under another description starts again (see the README).
    pub fn description(&self) -> String {
        let parts: Vec<String> = self.parts().iter().map(Part::label).collect();
        format!("{};{}", self.bucket.as_millis(), parts.join(","))
    }

    /// The feature names, `<feature>_<window>`, feature-major.
    pub fn feature_names(&self) -> Vec<String> {
        self.features
            .iter()
            .flat_map(|f| {
                self.windows
                    .iter()
                    .map(move |(w, _)| format!("{}_{w}", f.name))
            })
            .collect()
    }

    /// The longest window.
    pub fn longest(&self) -> Duration {
        self.windows
            .iter()
            .map(|(_, d)| *d)
            .max()
            .unwrap_or_default()
    }
}

pub(super) fn build_aggregate(
    raw: &RawAggregate,
    at: &str,
    schema: Option<&EventSchema>,
    p: &mut Problems,
) -> Option<AggregateSpec> {
    let (name, key) = name_and_key(&raw.name, &raw.key, at, schema, p);
    let bucket = p
        .required(&format!("{at}.bucket"), &raw.bucket)
        .map(|d| d.0);
    if bucket.is_some_and(|b| b < Duration::from_secs(1) || b.subsec_millis() != 0) {
        p.push(
            &format!("{at}.bucket"),
            "must be a whole number of seconds, at least 1s",
        );
    }
    let lateness = p
        .get(
            &format!("{at}.lateness"),
            &raw.lateness,
            super::units::HumanDuration(Duration::ZERO),
        )
        .map(|d| d.0);
    let written = p
        .required(&format!("{at}.windows"), &raw.windows)
        .unwrap_or_default();
    if written.is_empty() {
        p.push(&format!("{at}.windows"), "name at least one window");
    }
    let mut windows: Vec<(String, Duration)> = Vec::new();
    for (i, w) in written.iter().enumerate() {
        let path = format!("{at}.windows[{i}]");
        let label: String = w.chars().filter(|c| !c.is_whitespace()).collect();
        match parse_duration(w) {
            Err(e) => p.push(&path, e),
            Ok(d) => {
                if !label.chars().all(|c| c.is_ascii_alphanumeric()) {
                    p.push(&path, format!("{w:?}: write windows like \"1h\" or \"7d\""));
                } else if windows.iter().any(|(l, _)| *l == label) {
                    p.push(&path, format!("{w:?} is listed twice"));
                }
                if let Some(b) = bucket.filter(|b| !b.is_zero()) {
                    if d < b || d.as_millis() % b.as_millis() != 0 {
                        p.push(
                            &path,
                            format!(
                                "{w:?} is not a whole number of buckets ({})",
                                humantime::format_duration(b)
                            ),
                        );
                    } else if d.as_millis() / b.as_millis() > MAX_BUCKETS {
                        p.push(
                            &path,
                            format!(
                                "{w:?} spans more than {MAX_BUCKETS} buckets: use a larger bucket"
                            ),
                        );
                    }
                }
                windows.push((label, d));
            }
        }
    }
    windows.sort_by_key(|(_, d)| *d);
    let features = build_features(
        raw.features.as_deref().unwrap_or_default(),
        &format!("{at}.features"),
        schema,
        p,
    );
    let longest = windows.iter().map(|(_, d)| *d).max().unwrap_or_default();
    let least = longest + lateness.unwrap_or_default() + bucket.unwrap_or_default();
    let ttl = p.read(&format!("{at}.ttl"), &raw.ttl).ok()?.map(|d| d.0);
    if let Some(t) = ttl.filter(|t| *t < least) {
        p.push(
            &format!("{at}.ttl"),
            format!(
                "{} is shorter than the longest window, the lateness and one bucket ({}): the \
                 exactly-once guard would expire while its buckets still count",
                humantime::format_duration(t),
                humantime::format_duration(least)
            ),
        );
    }
    Some(AggregateSpec {
        name: name?,
        key: key?,
        bucket: bucket?,
        lateness: lateness?,
        windows,
        // Whole seconds, rounded up (EXPIRE).
        ttl: ttl.unwrap_or(Duration::from_secs(
            least.as_secs() + u64::from(least.subsec_nanos() > 0),
        )),
        features: features?,
    })
}

fn build_features(
    raw: &[RawAggregateFeature],
    at: &str,
    schema: Option<&EventSchema>,
    p: &mut Problems,
) -> Option<Vec<AggregateFeature>> {
    if raw.is_empty() {
        p.push(at, "name at least one feature");
    }
    let mut out = Vec::new();
    let mut ok = true;
    for (i, f) in raw.iter().enumerate() {
        let at = format!("{at}[{i}]");
        let name = p.required(&format!("{at}.name"), &f.name);
        if let Some(n) = &name {
            if n.is_empty() || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                p.push(
                    &format!("{at}.name"),
                    format!("{n:?} may only use letters, digits and `_`"),
                );
            }
            if out.iter().any(|o: &AggregateFeature| o.name == *n) {
                p.push(&format!("{at}.name"), format!("{n:?} is used twice"));
            }
        }
        let function = p.required(&format!("{at}.function"), &f.function);
        let column = p.read(&format!("{at}.column"), &f.column).ok().flatten();
        let condition = p.read(&format!("{at}.equals"), &f.equals).ok().flatten();
        let numeric = |c: &str, p: &mut Problems| {
            if let Some(schema) = schema {
                match schema.field(c).map(|f| &f.kind) {
                    None => p.push(
                        &format!("{at}.column"),
                        format!("`{c}` is not a field of the schema"),
                    ),
                    Some(Kind::Integer { .. } | Kind::Number { .. }) => {}
                    Some(_) => p.push(
                        &format!("{at}.column"),
                        format!("`{c}` is not an integer or number field"),
                    ),
                }
            }
        };
        let function = match (function.as_deref(), column, condition) {
            (Some("count"), None, None) => Some(Function::Count),
            (Some("count"), Some(c), Some(v)) => {
                let equals = match v {
                    Value::String(s) => Some(s),
                    Value::Bool(b) => Some(b.to_string()),
                    Value::Number(n) if n.is_i64() => Some(n.to_string()),
                    other => {
                        p.push(
                            &format!("{at}.equals"),
                            format!("expected a string, integer or boolean, got {other}"),
                        );
                        None
                    }
                };
                if let Some(schema) = schema {
                    match schema.field(&c).map(|f| &f.kind) {
                        None => p.push(
                            &format!("{at}.column"),
                            format!("`{c}` is not a field of the schema"),
                        ),
                        Some(Kind::String { .. } | Kind::Integer { .. } | Kind::Boolean) => {}
                        Some(_) => p.push(
                            &format!("{at}.column"),
                            format!("`{c}`: a condition compares a string, integer or boolean"),
                        ),
                    }
                }
                equals.map(|equals| Function::CountIf { column: c, equals })
            }
            (Some("count"), _, _) => {
                p.push(
                    &at,
                    "`count` takes no column, or a `column` and the value it `equals`",
                );
                None
            }
            (Some(f @ ("sum" | "avg" | "min" | "max")), Some(c), None) => {
                numeric(&c, p);
                if c.contains([',', ':', ';']) {
                    p.push(&format!("{at}.column"), "must not contain `,`, `:` or `;`");
                }
                Some(match f {
                    "sum" => Function::Sum(c),
                    "avg" => Function::Avg(c),
                    "min" => Function::Min(c),
                    _ => Function::Max(c),
                })
            }
            (Some("sum" | "avg" | "min" | "max"), None, _) => {
                p.push(&format!("{at}.column"), "is required for this function");
                None
            }
            (Some("sum" | "avg" | "min" | "max"), Some(_), Some(_)) => {
                p.push(&format!("{at}.equals"), "is only used with `count`");
                None
            }
            (Some(other), _, _) => {
                p.push(
                    &format!("{at}.function"),
                    format!(
                        "expected \"count\", \"sum\", \"avg\", \"min\" or \"max\", got {other:?}"
                    ),
                );
                None
            }
            (None, _, _) => None,
        };
        match (name, function) {
            (Some(name), Some(function)) => out.push(AggregateFeature { name, function }),
            _ => ok = false,
        }
    }
    ok.then_some(out)
}
