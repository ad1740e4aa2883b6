//! `[[model]]`: TorchScript models that score every valid event.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use super::{
    properties,
    raw::{RawInput, RawModel, RawOutput},
    redis::{check_key, parse_key, scalar},
    valid_name, KeyPart, Problems,
};
use crate::schema::{EventSchema, Kind};

/// A validated model section.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub name: String,
    pub source: ModelSource,
    pub device: DeviceChoice,
    pub threads: usize,
    pub intra_op_threads: usize,
    pub max_batch: usize,
    pub max_delay: Duration,
    pub queue_rows: usize,
    /// `None`: never reload.
    pub reload_interval: Option<Duration>,
    pub breaker: BreakerSpec,
    pub inputs: Vec<InputSpec>,
    pub output: OutputSpec,
    pub output_topic: String,
    pub feedback_topic: Option<String>,
    /// Where a shadow version's predictions go (marked `"shadow": true`); without it, a
    /// rollout's shadow version is not scored.
    pub shadow_topic: Option<String>,
    pub key: Vec<KeyPart>,
    pub id_column: Option<String>,
    pub pass_through: Vec<String>,
    pub producer_properties: BTreeMap<String, String>,
    /// How the inference API (`sluice run --inference-http/--inference-grpc`) shares it.
    pub serving: ServingSpec,
}

/// How requests of the inference API share a model with the stream (`[model.serving]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ServingSpec {
    /// Rows of requests admitted at once; a request beyond it is refused (429 /
    /// `RESOURCE_EXHAUSTED`) rather than queued.
    pub queue_rows: usize,
    /// Share of each forward pass (of `max_batch` rows) reserved for requests while the
    /// stream's rows also wait; the stream keeps the rest.
    pub share: f64,
    /// A request's deadline, unless it asks for a shorter one.
    pub timeout: Duration,
}

/// When a model's circuit breaker trips (see `score::versions`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerSpec {
    /// Share of failed rows in a window (0 < rate ≤ 1) that trips it.
    pub failure_rate: f64,
    /// Rows per window.
    pub min_rows: usize,
}

impl ModelSpec {
    /// Width of the feature vector.
    pub fn features(&self) -> usize {
        self.inputs.iter().map(InputSpec::width).sum()
    }
}

/// Where versions of a model come from.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// `<repository>/<version>/model.pt`, served as its rollout says.
    Repository(RepositoryLocation),
    /// One TorchScript file; its version is a digest of its bytes.
    File(PathBuf),
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Repository(r) => r.fmt(f),
            Self::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Where a model repository is: a local folder, or a prefix of an object store (`s3://`,
/// `gs://`, `az://`, … as `object_store` parses it) whose versions are downloaded into
/// `cache` before they load.
#[derive(Debug, Clone, PartialEq)]
pub enum RepositoryLocation {
    Local(PathBuf),
    Store {
        url: url::Url,
        options: BTreeMap<String, String>,
        cache: PathBuf,
    },
}

impl fmt::Display for RepositoryLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local(p) => write!(f, "{}", p.display()),
            Self::Store { url, .. } => write!(f, "{url}"),
        }
    }
}

/// The repository at `path`: an object store URL, or a folder relative to `base`; an error
/// says why it is neither. `cache` is where an object store's versions go.
pub fn repository_location(
    path: &str,
    base: &Path,
    options: BTreeMap<String, String>,
    cache: PathBuf,
) -> Result<RepositoryLocation, String> {
    if path.contains("://") {
        let url = url::Url::parse(path).map_err(|e| format!("{path:?} is not a URL: {e}"))?;
        return Ok(RepositoryLocation::Store {
            url,
            options,
            cache,
        });
    }
    let dir = base.join(path);
    if dir.is_dir() {
        Ok(RepositoryLocation::Local(dir))
    } else {
        Err(format!(
            "{} is not a folder (a model repository: <version>/model.pt)",
            dir.display()
        ))
    }
}

/// The default cache of an object store's versions: `<temp>/sluice-models/<owner>`.
pub fn default_cache(owner: &str) -> PathBuf {
    std::env::temp_dir().join("sluice-models").join(owner)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    /// A CUDA device by index.
    Cuda(usize),
    /// CUDA device 0 when available, else the CPU.
    Auto,
}

/// One input of the feature vector.
#[derive(Debug, Clone, PartialEq)]
pub struct InputSpec {
    /// A column of the event, or for an input from Redis, `<view>.<feature>_<window>`.
    pub column: String,
    /// The value comes from Redis for the event's entity (an aggregate view's feature at the
    /// event's point in time), not from the event.
    pub redis: bool,
    pub encoding: Encoding,
    /// Fill value for a null number; `None`: the event is a dead letter.
    pub null: Option<f32>,
}

impl InputSpec {
    /// Features this input produces.
    pub fn width(&self) -> usize {
        match &self.encoding {
            Encoding::OneHot(v) => v.len(),
            _ => 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Encoding {
    /// An integer, number or boolean (1.0/0.0) as is.
    Number,
    /// One feature per value; unknown and null values are all zeros.
    OneHot(Vec<String>),
    /// The value's position; unknown and null values are the vocabulary's length.
    Index(Vec<String>),
    /// A part of a date-time or date.
    Extract(TimePart),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimePart {
    /// 0-23, UTC.
    Hour,
    /// 0 = Monday.
    DayOfWeek,
    EpochSeconds,
}

/// What the model returns, per event.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputSpec {
    /// One value, `[batch]` or `[batch, 1]`.
    Score { name: String },
    /// One value per class, `[batch, classes]`.
    Probabilities { classes: Vec<String> },
    /// The class with the highest value, and that value.
    Label { classes: Vec<String> },
}

impl OutputSpec {
    /// Values per event.
    pub fn width(&self) -> usize {
        match self {
            Self::Score { .. } => 1,
            Self::Probabilities { classes } | Self::Label { classes } => classes.len(),
        }
    }
}

/// `[model.serving]`, with its defaults.
fn build_serving(
    raw: Option<&super::raw::RawServing>,
    at: &str,
    p: &mut Problems,
) -> Option<ServingSpec> {
    let default = Default::default();
    let raw = raw.unwrap_or(&default);
    let queue_rows = p.get(&format!("{at}.queue_rows"), &raw.queue_rows, 1024);
    let queue_rows = p.positive(&format!("{at}.queue_rows"), queue_rows);
    let share = p.get(&format!("{at}.share"), &raw.share, 0.25);
    if let Some(s) = share.filter(|s| !(*s > 0.0 && *s < 1.0)) {
        p.push(
            &format!("{at}.share"),
            format!("must be above 0 and below 1, got {s}"),
        );
    }
    let timeout = p
        .get(
            &format!("{at}.timeout"),
            &raw.timeout,
            super::units::HumanDuration(Duration::from_secs(1)),
        )
        .map(|d| d.0);
    let timeout = p.positive(&format!("{at}.timeout"), timeout);
    Some(ServingSpec {
        queue_rows: queue_rows?,
        share: share?,
        timeout: timeout?,
    })
}

fn parse_device(s: &str) -> Result<DeviceChoice, String> {
    match s {
        "cpu" => Ok(DeviceChoice::Cpu),
        "auto" => Ok(DeviceChoice::Auto),
        "cuda" => Ok(DeviceChoice::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(DeviceChoice::Cuda)
            .ok_or_else(|| {
                format!("expected \"cpu\", \"cuda\", \"cuda:N\" or \"auto\", got {s:?}")
            }),
    }
}

/// What model inputs can take from Redis: aggregate features (`<view>.<feature>_<window>`)
/// and latest-value fields that hold numbers or booleans (`<view>.<hash field>`).
#[derive(Debug, Default)]
pub(super) struct RedisInputs {
    pub aggregates: Vec<String>,
    pub latest: Vec<String>,
}

/// Every model section; `topics` are the topics already in use (source, dead letters).
pub(super) fn build_models(
    raw: &[RawModel],
    base: &Path,
    schema: Option<&EventSchema>,
    topics: &[String],
    redis: &RedisInputs,
    p: &mut Problems,
) -> Option<Vec<ModelSpec>> {
    let mut models = Vec::new();
    let mut used: Vec<String> = topics.to_vec();
    let mut ok = true;
    for (i, m) in raw.iter().enumerate() {
        let at = format!("model[{i}]");
        match build_model(m, &at, base, schema, redis, p) {
            Some(spec) => {
                if models.iter().any(|o: &ModelSpec| o.name == spec.name) {
                    p.push(
                        &format!("{at}.name"),
                        format!("{:?} is used twice", spec.name),
                    );
                }
                let outs = [
                    ("output_topic", Some(&spec.output_topic)),
                    ("feedback_topic", spec.feedback_topic.as_ref()),
                    ("shadow_topic", spec.shadow_topic.as_ref()),
                ];
                for (key, topic) in outs {
                    if let Some(t) = topic {
                        if used.contains(t) {
                            p.push(
                                &format!("{at}.{key}"),
                                format!("{t:?} is already used by this pipeline"),
                            );
                        }
                        used.push(t.clone());
                    }
                }
                models.push(spec);
            }
            None => ok = false,
        }
    }
    ok.then_some(models)
}

fn build_model(
    raw: &RawModel,
    at: &str,
    base: &Path,
    schema: Option<&EventSchema>,
    redis: &RedisInputs,
    p: &mut Problems,
) -> Option<ModelSpec> {
    let key_path = |k: &str| format!("{at}.{k}");
    let name = p.required(&key_path("name"), &raw.name);
    if let Some(n) = name
        .as_deref()
        .filter(|n| !valid_name(n) || n.contains('.'))
    {
        p.push(
            &key_path("name"),
            format!("{n:?} may only use letters, digits, `_` and `-`"),
        );
    }
    let options = properties(p, &key_path("storage_options"), &raw.storage_options);
    let cache = p
        .read(&key_path("cache_dir"), &raw.cache_dir)
        .ok()
        .flatten()
        .map(|c| base.join(c));
    let source = p.required(&key_path("path"), &raw.path).and_then(|text| {
        let path = base.join(&text);
        if text.contains("://") {
            let cache = cache
                .clone()
                .unwrap_or_else(|| default_cache(name.as_deref().unwrap_or("model")));
            match repository_location(&text, base, options.clone(), cache) {
                Ok(r) => Some(ModelSource::Repository(r)),
                Err(e) => {
                    p.push(&key_path("path"), e);
                    None
                }
            }
        } else if path.is_dir() {
            Some(ModelSource::Repository(RepositoryLocation::Local(path)))
        } else if path.is_file() {
            Some(ModelSource::File(path))
        } else {
            p.push(
                &key_path("path"),
                format!(
                    "{} is neither a model repository nor a file",
                    path.display()
                ),
            );
            None
        }
    });
    let device = p
        .get(&key_path("device"), &raw.device, "auto".into())
        .and_then(|d| match parse_device(&d) {
            Ok(d) => Some(d),
            Err(e) => {
                p.push(&key_path("device"), e);
                None
            }
        });
    let threads = p.get(&key_path("threads"), &raw.threads, 1);
    let threads = p.positive(&key_path("threads"), threads);
    let intra = p.get(&key_path("intra_op_threads"), &raw.intra_op_threads, 1);
    let intra = p.positive(&key_path("intra_op_threads"), intra);
    let max_batch = p.get(&key_path("max_batch"), &raw.max_batch, 256);
    let max_batch = p.positive(&key_path("max_batch"), max_batch);
    let max_delay = p
        .get(
            &key_path("max_delay"),
            &raw.max_delay,
            super::units::HumanDuration(Duration::ZERO),
        )
        .map(|d| d.0);
    let queue_rows = p.get(&key_path("queue_rows"), &raw.queue_rows, 20_000);
    let queue_rows = p.positive(&key_path("queue_rows"), queue_rows);
    if let (Some(q), Some(b)) = (queue_rows, max_batch) {
        if q < b {
            p.push(
                &key_path("queue_rows"),
                format!("must be at least max_batch ({b})"),
            );
        }
    }
    let reload = p
        .get(
            &key_path("reload_interval"),
            &raw.reload_interval,
            super::units::HumanDuration(Duration::from_secs(5)),
        )
        .map(|d| (!d.0.is_zero()).then_some(d.0));
    let failure_rate = p.get(
        &key_path("breaker_failure_rate"),
        &raw.breaker_failure_rate,
        0.5,
    );
    if let Some(r) = failure_rate.filter(|r| !(*r > 0.0 && *r <= 1.0)) {
        p.push(
            &key_path("breaker_failure_rate"),
            format!("must be above 0 and at most 1, got {r}"),
        );
    }
    let min_rows = p.get(&key_path("breaker_min_rows"), &raw.breaker_min_rows, 100);
    let min_rows = p.positive(&key_path("breaker_min_rows"), min_rows);

    let raw_inputs = raw.inputs.as_deref().unwrap_or_default();
    if raw_inputs.is_empty() {
        p.push(&key_path("inputs"), "at least one input is required");
    }
    let inputs: Vec<Option<InputSpec>> = raw_inputs
        .iter()
        .enumerate()
        .map(|(i, r)| build_input(r, &format!("{at}.inputs[{i}]"), schema, redis, p))
        .collect();
    let output = match &raw.output {
        Some(o) => build_output(o, &key_path("output"), p),
        None => {
            p.push(&key_path("output"), "is required");
            None
        }
    };

    let topic = |p: &mut Problems, key: &str, s| -> Option<Option<String>> {
        let t = p.read(&key_path(key), s).ok()?;
        if let Some(t) = t.as_deref().filter(|t| !valid_name(t) || t.len() > 249) {
            p.push(&key_path(key), format!("{t:?} is not a valid topic name"));
        }
        Some(t)
    };
    let output_topic = topic(p, "output_topic", &raw.output_topic);
    if matches!(output_topic, Some(None)) {
        p.push(&key_path("output_topic"), "is required");
    }
    let feedback_topic = topic(p, "feedback_topic", &raw.feedback_topic);
    let shadow_topic = topic(p, "shadow_topic", &raw.shadow_topic);
    let key = p
        .required(&key_path("key"), &raw.key)
        .and_then(|k| match parse_key(&k) {
            Ok(parts) => Some(parts),
            Err(e) => {
                p.push(&key_path("key"), e);
                None
            }
        });
    if let (Some(parts), Some(schema)) = (&key, schema) {
        check_key(parts, &key_path("key"), schema, p);
    }
    let id_column = p.read(&key_path("id_column"), &raw.id_column).ok()?;
    let pass_through = p.get(&key_path("pass_through"), &raw.pass_through, vec![]);
    if let Some(schema) = schema {
        let columns = id_column
            .iter()
            .map(|c| ("id_column", c))
            .chain(pass_through.iter().flatten().map(|c| ("pass_through", c)));
        for (k, c) in columns {
            match schema.field(c) {
                None => p.push(&key_path(k), format!("`{c}` is not a field of the schema")),
                Some(f) if !scalar(&f.kind) => p.push(
                    &key_path(k),
                    format!("`{c}` is an object or array; only scalar fields can be copied"),
                ),
                Some(_) => {}
            }
        }
    }
    let producer_properties = properties(
        p,
        &key_path("producer_properties"),
        &raw.producer_properties,
    );
    let serving = build_serving(raw.serving.as_ref(), &key_path("serving"), p);

    Some(ModelSpec {
        name: name?,
        source: source?,
        device: device?,
        threads: threads?,
        intra_op_threads: intra?,
        max_batch: max_batch?,
        max_delay: max_delay?,
        queue_rows: queue_rows?,
        reload_interval: reload?,
        breaker: BreakerSpec {
            failure_rate: failure_rate?,
            min_rows: min_rows?,
        },
        inputs: inputs.into_iter().collect::<Option<_>>()?,
        output: output?,
        output_topic: output_topic??,
        feedback_topic: feedback_topic?,
        shadow_topic: shadow_topic?,
        key: key?,
        id_column,
        pass_through: pass_through?,
        producer_properties,
        serving: serving?,
    })
}

fn build_input(
    raw: &RawInput,
    at: &str,
    schema: Option<&EventSchema>,
    redis: &RedisInputs,
    p: &mut Problems,
) -> Option<InputSpec> {
    let aggregate = p
        .read(&format!("{at}.aggregate"), &raw.aggregate)
        .ok()
        .flatten();
    let latest = p.read(&format!("{at}.latest"), &raw.latest).ok().flatten();
    let (kind, name, known, form) = match (aggregate, latest) {
        (None, None) => (None, String::new(), &[][..], ""),
        (Some(a), None) => (
            Some("aggregate"),
            a,
            &redis.aggregates[..],
            "a feature of an aggregate view (write \"<view>.<feature>_<window>\")",
        ),
        (None, Some(l)) => (
            Some("latest"),
            l,
            &redis.latest[..],
            "a number or boolean field of a view (write \"<view>.<hash field>\")",
        ),
        (Some(_), Some(_)) => {
            p.push(at, "set `aggregate` or `latest`, not both");
            return None;
        }
    };
    if let Some(kind) = kind {
        if raw.column.is_some()
            || raw.one_hot.is_some()
            || raw.index.is_some()
            || raw.extract.is_some()
        {
            p.push(
                at,
                format!(
                    "an `{kind}` input is a number: it takes no `column`, `one_hot`, `index` \
                     or `extract`"
                ),
            );
        }
        if !known.contains(&name) {
            p.push(
                &format!("{at}.{kind}"),
                format!(
                    "{name:?} is not {form} in [sink.redis] (there are: {})",
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            );
        }
        let null = p.read(&format!("{at}.null"), &raw.null).ok()?;
        return Some(InputSpec {
            column: name,
            redis: true,
            encoding: Encoding::Number,
            null: null.map(|v| v as f32),
        });
    }
    let column = p.required(&format!("{at}.column"), &raw.column);
    let null = p.read(&format!("{at}.null"), &raw.null).ok()?;
    let one_hot = p.read(&format!("{at}.one_hot"), &raw.one_hot).ok()?;
    let index = p.read(&format!("{at}.index"), &raw.index).ok()?;
    let extract = p.read(&format!("{at}.extract"), &raw.extract).ok()?;
    let encoding = match (one_hot, index, extract) {
        (None, None, None) => Encoding::Number,
        (Some(v), None, None) => Encoding::OneHot(v),
        (None, Some(v), None) => Encoding::Index(v),
        (None, None, Some(e)) => {
            Encoding::Extract(match e.as_str() {
                "hour" => TimePart::Hour,
                "day_of_week" => TimePart::DayOfWeek,
                "epoch_seconds" => TimePart::EpochSeconds,
                other => {
                    p.push(
                    &format!("{at}.extract"),
                    format!("expected \"hour\", \"day_of_week\" or \"epoch_seconds\", got {other:?}"),
                );
                    return None;
                }
            })
        }
        _ => {
            p.push(at, "set at most one of `one_hot`, `index` and `extract`");
            return None;
        }
    };
    if let Encoding::OneHot(v) | Encoding::Index(v) = &encoding {
        if v.is_empty() {
            p.push(at, "the vocabulary must not be empty");
        }
        if null.is_some() {
            p.push(
                &format!("{at}.null"),
                "is not used by categorical inputs (null encodes as an unknown value)",
            );
        }
    }
    if let (Some(c), Some(schema)) = (&column, schema) {
        match schema.field(c).map(|f| &f.kind) {
            None => p.push(
                &format!("{at}.column"),
                format!("`{c}` is not a field of the schema"),
            ),
            Some(kind) => {
                let fits = match (&encoding, kind) {
                    (
                        Encoding::Number,
                        Kind::Integer { .. } | Kind::Number { .. } | Kind::Boolean,
                    ) => true,
                    (Encoding::OneHot(_) | Encoding::Index(_), Kind::String { .. }) => true,
                    (Encoding::Extract(TimePart::Hour), k) => matches!(k, Kind::DateTime),
                    (Encoding::Extract(_), k) => matches!(k, Kind::DateTime | Kind::Date),
                    _ => false,
                };
                if !fits {
                    p.push(
                        &format!("{at}.column"),
                        format!(
                            "`{c}` cannot be encoded this way: numbers and booleans are used as \
                             they are, strings need `one_hot` or `index`, date-times `extract`"
                        ),
                    );
                }
            }
        }
    }
    Some(InputSpec {
        column: column?,
        redis: false,
        encoding,
        null: null.map(|v| v as f32),
    })
}

fn build_output(raw: &RawOutput, at: &str, p: &mut Problems) -> Option<OutputSpec> {
    let kind = p.get(&format!("{at}.kind"), &raw.kind, "score".into())?;
    let name = p.read(&format!("{at}.name"), &raw.name).ok()?;
    let classes = p.read(&format!("{at}.classes"), &raw.classes).ok()?;
    match (kind.as_str(), classes) {
        ("score", None) => Some(OutputSpec::Score {
            name: name.unwrap_or_else(|| "score".into()),
        }),
        ("score", Some(_)) => {
            p.push(
                &format!("{at}.classes"),
                "is only used with kind \"probabilities\" or \"label\"",
            );
            None
        }
        ("probabilities" | "label", None) => {
            p.push(&format!("{at}.classes"), "is required for this kind");
            None
        }
        ("probabilities" | "label", Some(classes)) => {
            if name.is_some() {
                p.push(&format!("{at}.name"), "is only used with kind \"score\"");
            }
            if classes.len() < 2 {
                p.push(&format!("{at}.classes"), "name at least two classes");
            }
            Some(if kind == "label" {
                OutputSpec::Label { classes }
            } else {
                OutputSpec::Probabilities { classes }
            })
        }
        (other, _) => {
            p.push(
                &format!("{at}.kind"),
                format!("expected \"score\", \"probabilities\" or \"label\", got {other:?}"),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices() {
        assert_eq!(parse_device("cpu"), Ok(DeviceChoice::Cpu));
        assert_eq!(parse_device("cuda"), Ok(DeviceChoice::Cuda(0)));
        assert_eq!(parse_device("cuda:3"), Ok(DeviceChoice::Cuda(3)));
        assert_eq!(parse_device("auto"), Ok(DeviceChoice::Auto));
        assert!(parse_device("gpu").is_err());
        assert!(parse_device("cuda:x").is_err());
    }
}
