//! `[sink.redis]`: the online feature store.

use std::{collections::BTreeMap, time::Duration};

use super::{
    aggregate::{build_aggregate, AggregateSpec},
    raw::{RawRedis, RawRedisConnection, RawView},
    valid_name, Problems,
};
use crate::schema::{EventSchema, Kind};

/// Where a Redis server or cluster is, and how to trust it.
#[derive(Clone)]
pub struct RedisConnection {
    /// Connection URLs: one, or the cluster's seed nodes. Hold secrets: never log them.
    pub urls: Vec<String>,
    pub cluster: bool,
    /// CA certificate (PEM) for `rediss://`, instead of the system's roots.
    pub tls_ca_file: Option<std::path::PathBuf>,
}

impl RedisConnection {
    /// The first URL with its password hidden, for messages.
    pub fn shown(&self) -> String {
        redact(&self.urls[0])
    }
}

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConnection")
            .field(
                "urls",
                &self.urls.iter().map(|u| redact(u)).collect::<Vec<_>>(),
            )
            .field("cluster", &self.cluster)
            .finish()
    }
}

/// A validated Redis sink.
#[derive(Clone)]
pub struct RedisSpec {
    pub connection: RedisConnection,
    pub time_field: String,
    pub max_in_flight: usize,
    pub pipeline_size: usize,
    /// Event times later than now plus this are refused (dead letters).
    pub max_event_time_skew: Duration,
    /// Bytes for the writer's snapshots of the aggregate hashes (0: none).
    pub aggregate_cache: u64,
    pub views: Vec<ViewSpec>,
    pub aggregates: Vec<AggregateSpec>,
}

impl std::fmt::Debug for RedisSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSpec")
            .field("connection", &self.connection)
            .field("time_field", &self.time_field)
            .field("views", &self.views)
            .field("aggregates", &self.aggregates)
            .finish()
    }
}

/// One feature view.
#[derive(Debug, Clone)]
pub struct ViewSpec {
    pub name: String,
    pub key: Vec<KeyPart>,
    /// (column, hash field) pairs.
    pub fields: Vec<(String, String)>,
    pub ttl: Option<Duration>,
    /// (hash field, TTL) pairs.
    pub field_ttl: Vec<(String, Duration)>,
}

/// A piece of a key template.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyPart {
    Text(String),
    Column(String),
}

/// A URL with its password replaced by `***`, for messages.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "<unparsable URL>".into(),
    }
}

fn check_url(url: &str, path: &str, p: &mut Problems) {
    if url.ends_with("#insecure") {
        p.push(
            path,
            "`#insecure` turns off TLS certificate checks and is refused",
        );
        return;
    }
    match url::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "redis" | "rediss") && u.host_str().is_some() => {}
        Ok(u) if matches!(u.scheme(), "redis" | "rediss") => {
            p.push(path, format!("{} names no host", redact(url)))
        }
        Ok(u) => p.push(
            path,
            format!(
                "unsupported scheme {:?} (use redis:// or rediss://)",
                u.scheme()
            ),
        ),
        Err(e) => p.push(path, format!("not a URL: {e}")),
    }
}

/// Parses `cust:{customer_id}` into parts.
pub fn parse_key(template: &str) -> Result<Vec<KeyPart>, String> {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            parts.push(KeyPart::Text(rest[..open].to_owned()));
        }
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| format!("unclosed `{{` in {template:?}"))?
            + open;
        let name = &rest[open + 1..close];
        if name.is_empty() {
            return Err(format!("empty `{{}}` in {template:?}"));
        }
        parts.push(KeyPart::Column(name.to_owned()));
        rest = &rest[close + 1..];
    }
    if !rest.is_empty() {
        parts.push(KeyPart::Text(rest.to_owned()));
    }
    if !parts.iter().any(|p| matches!(p, KeyPart::Column(_))) {
        return Err(format!(
            "{template:?} has no `{{column}}`: every entity would share one key"
        ));
    }
    Ok(parts)
}

/// Every column of a key template must be a required, non-nullable scalar field.
pub(super) fn check_key(parts: &[KeyPart], at: &str, schema: &EventSchema, p: &mut Problems) {
    for part in parts {
        if let KeyPart::Column(c) = part {
            match schema.field(c) {
                None => p.push(at, format!("`{c}` is not a field of the schema")),
                Some(f) if !f.required || f.nullable || !scalar(&f.kind) => p.push(
                    at,
                    format!("`{c}` must be a required, non-nullable scalar field"),
                ),
                Some(_) => {}
            }
        }
    }
}

pub(super) fn scalar(kind: &Kind) -> bool {
    !matches!(kind, Kind::Object(_) | Kind::Array(_))
}

pub(super) fn build_redis(
    raw: &RawRedis,
    base: &std::path::Path,
    schema: Option<&EventSchema>,
    p: &mut Problems,
) -> Option<RedisSpec> {
    const AT: &str = "sink.redis";
    let connection = build_connection(
        AT,
        &RawRedisConnection {
            url: raw.url.clone(),
            cluster_nodes: raw.cluster_nodes.clone(),
            tls_ca_file: raw.tls_ca_file.clone(),
        },
        base,
        p,
    );
    let time_field = p.required(&format!("{AT}.time_field"), &raw.time_field);
    if let (Some(t), Some(schema)) = (&time_field, schema) {
        match schema.field(t) {
            None => p.push(
                &format!("{AT}.time_field"),
                format!("`{t}` is not a field of the schema"),
            ),
            Some(f) if !f.required || f.nullable => p.push(
                &format!("{AT}.time_field"),
                format!("`{t}` must be required and not nullable"),
            ),
            Some(f) if !matches!(f.kind, Kind::DateTime | Kind::Date) => p.push(
                &format!("{AT}.time_field"),
                format!("`{t}` must have format date-time or date"),
            ),
            Some(_) => {}
        }
    }
    let max_in_flight = p.get(&format!("{AT}.max_in_flight"), &raw.max_in_flight, 4);
    let max_in_flight = p.positive(&format!("{AT}.max_in_flight"), max_in_flight);
    let pipeline_size = p.get(&format!("{AT}.pipeline_size"), &raw.pipeline_size, 500);
    let pipeline_size = p.positive(&format!("{AT}.pipeline_size"), pipeline_size);
    let skew = p
        .get(
            &format!("{AT}.max_event_time_skew"),
            &raw.max_event_time_skew,
            super::units::HumanDuration(Duration::from_secs(3_600)),
        )
        .map(|d| d.0);
    let aggregate_cache = p
        .get(
            &format!("{AT}.aggregate_cache"),
            &raw.aggregate_cache,
            super::units::HumanSize(64 << 20),
        )
        .map(|s| s.0);
    let raw_views = raw.views.as_deref().unwrap_or_default();
    let raw_aggregates = raw.aggregates.as_deref().unwrap_or_default();
    if raw_views.is_empty() && raw_aggregates.is_empty() {
        p.push(
            &format!("{AT}.views"),
            "at least one view (or aggregate view) is required",
        );
    }
    let mut views = Vec::new();
    let mut names = Vec::new();
    for (i, v) in raw_views.iter().enumerate() {
        if let Some(view) = build_view(v, &format!("{AT}.views[{i}]"), schema, p) {
            if names.contains(&view.name) {
                p.push(
                    &format!("{AT}.views[{i}].name"),
                    format!("{:?} is used twice", view.name),
                );
            }
            names.push(view.name.clone());
            // One hash holds one guard (`_ts`, `_topic`, `_partition`, `_offset`): two views
            // writing the same hash would each take the other's newest write as their own, and
            // one view's fields would never be written.
            if let Some(other) = views.iter().position(|o: &ViewSpec| o.key == view.key) {
                p.push(
                    &format!("{AT}.views[{i}].key"),
                    format!(
                        "is the key template of views[{other}] ({:?}) too; two views cannot \
                         share a hash: give one another key or `prefix_keys = true`",
                        views[other].name
                    ),
                );
            }
            views.push(view);
        }
    }
    let mut aggregates: Vec<AggregateSpec> = Vec::new();
    for (i, a) in raw_aggregates.iter().enumerate() {
        let at = format!("{AT}.aggregates[{i}]");
        if let Some(agg) = build_aggregate(a, &at, schema, p) {
            if names.contains(&agg.name) {
                p.push(
                    &format!("{at}.name"),
                    format!("{:?} is used twice", agg.name),
                );
            }
            names.push(agg.name.clone());
            if views.iter().any(|v| v.key == agg.key) || aggregates.iter().any(|o| o.key == agg.key)
            {
                p.push(
                    &format!("{at}.key"),
                    "is the key template of another view: each view needs a hash of its own",
                );
            }
            aggregates.push(agg);
        }
    }
    Some(RedisSpec {
        connection: connection?,
        time_field: time_field?,
        max_in_flight: max_in_flight?,
        pipeline_size: pipeline_size?,
        max_event_time_skew: skew?,
        aggregate_cache: aggregate_cache?,
        views,
        aggregates,
    })
}

/// `url` or `cluster_nodes`, and `tls_ca_file`, under the key path `at`.
pub(super) fn build_connection(
    at: &str,
    raw: &RawRedisConnection,
    base: &std::path::Path,
    p: &mut Problems,
) -> Option<RedisConnection> {
    let url = p.read(&format!("{at}.url"), &raw.url).ok().flatten();
    let nodes = p
        .read(&format!("{at}.cluster_nodes"), &raw.cluster_nodes)
        .ok()
        .flatten()
        .unwrap_or_default();
    let (urls, cluster) = match (url, nodes.is_empty()) {
        (Some(url), true) => {
            check_url(&url, &format!("{at}.url"), p);
            (vec![url], false)
        }
        (None, false) => {
            for (i, n) in nodes.iter().enumerate() {
                check_url(n, &format!("{at}.cluster_nodes[{i}]"), p);
            }
            (nodes, true)
        }
        (Some(_), false) => {
            p.push(at, "set either `url` or `cluster_nodes`, not both");
            return None;
        }
        (None, true) => {
            p.push(&format!("{at}.url"), "is required (or `cluster_nodes`)");
            return None;
        }
    };
    let tls_ca_file = p
        .read(&format!("{at}.tls_ca_file"), &raw.tls_ca_file)
        .ok()?
        .map(|f| base.join(f));
    if let Some(f) = &tls_ca_file {
        if !f.is_file() {
            p.push(
                &format!("{at}.tls_ca_file"),
                format!("{} is not a readable file", f.display()),
            );
        }
        if !urls.iter().all(|u| u.starts_with("rediss://")) {
            p.push(
                &format!("{at}.tls_ca_file"),
                "is only used with rediss:// URLs",
            );
        }
    }
    Some(RedisConnection {
        urls,
        cluster,
        tls_ca_file,
    })
}

/// A view's `name` and `key` template (of any kind of view), checked against the schema.
pub(super) fn name_and_key(
    name: &Option<super::raw::Setting<String>>,
    key: &Option<super::raw::Setting<String>>,
    at: &str,
    schema: Option<&EventSchema>,
    p: &mut Problems,
) -> (Option<String>, Option<Vec<KeyPart>>) {
    let name = p.required(&format!("{at}.name"), name);
    if let Some(n) = name
        .as_deref()
        .filter(|n| !valid_name(n) || n.contains('.'))
    {
        p.push(
            &format!("{at}.name"),
            format!("{n:?} may only use letters, digits, `_` and `-`"),
        );
    }
    let key = p
        .required(&format!("{at}.key"), key)
        .and_then(|k| match parse_key(&k) {
            Ok(parts) => Some(parts),
            Err(e) => {
                p.push(&format!("{at}.key"), e);
                None
            }
        });
    if let (Some(parts), Some(schema)) = (&key, schema) {
        check_key(parts, &format!("{at}.key"), schema, p);
    }
    (name, key)
}

fn build_view(
    raw: &RawView,
    at: &str,
    schema: Option<&EventSchema>,
    p: &mut Problems,
) -> Option<ViewSpec> {
    let (name, key) = name_and_key(&raw.name, &raw.key, at, schema, p);
    let prefix = p.get(&format!("{at}.prefix_keys"), &raw.prefix_keys, false);
    let columns = p.required(&format!("{at}.columns"), &raw.columns);
    let renames = p.get(
        &format!("{at}.field_names"),
        &raw.field_names,
        BTreeMap::new(),
    );
    let mut fields = Vec::new();
    if let (Some(columns), Some(renames)) = (&columns, &renames) {
        if columns.is_empty() {
            p.push(&format!("{at}.columns"), "must name at least one column");
        }
        for c in columns {
            match schema.map(|s| s.field(c)) {
                Some(None) => p.push(
                    &format!("{at}.columns"),
                    format!("`{c}` is not a field of the schema"),
                ),
                Some(Some(f)) if !scalar(&f.kind) => p.push(
                    &format!("{at}.columns"),
                    format!("`{c}` is an object or array; only scalar fields can be stored"),
                ),
                _ => {}
            }
            let field = renames.get(c).cloned().unwrap_or_else(|| c.clone());
            if field.starts_with('_') {
                p.push(
                    &format!("{at}.columns"),
                    format!("hash field `{field}`: names starting with `_` are reserved"),
                );
            }
            fields.push((c.clone(), field));
        }
        for k in renames.keys().filter(|k| !columns.contains(k)) {
            p.push(&format!("{at}.field_names.{k}"), "is not in `columns`");
        }
    }
    let ttl = p.read(&format!("{at}.ttl"), &raw.ttl).ok()?.map(|d| d.0);
    if ttl.is_some_and(|t| t < Duration::from_secs(1)) {
        p.push(&format!("{at}.ttl"), "must be at least 1s");
    }
    let field_ttl: Vec<(String, Duration)> = p
        .get(&format!("{at}.field_ttl"), &raw.field_ttl, BTreeMap::new())?
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    for (f, d) in &field_ttl {
        if !fields.iter().any(|(_, name)| name == f) {
            p.push(
                &format!("{at}.field_ttl.{f}"),
                "is not a hash field of this view",
            );
        }
        if *d < Duration::from_secs(1) {
            p.push(&format!("{at}.field_ttl.{f}"), "must be at least 1s");
        }
    }
    // Fields expire one by one, but the guard fields do not: without a `ttl`, the hash would
    // outlive its data forever. It expires with its longest-lived field instead.
    let ttl = ttl.or_else(|| field_ttl.iter().map(|(_, d)| *d).max());
    let name = name?;
    let mut key = key?;
    if prefix? {
        key.insert(0, KeyPart::Text(format!("{name}:")));
    }
    Some(ViewSpec {
        name,
        key,
        fields,
        ttl,
        field_ttl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_templates() {
        assert_eq!(
            parse_key("cust:{customer_id}").unwrap(),
            [
                KeyPart::Text("cust:".into()),
                KeyPart::Column("customer_id".into())
            ]
        );
        assert!(parse_key("static").is_err());
        assert!(parse_key("a:{b").is_err());
        assert!(parse_key("a:{}").is_err());
    }

    #[test]
    fn secrets_are_redacted() {
        assert_eq!(
            redact("redis://app:s3cret@cache:6379/0"),
            "redis://app:***@cache:6379/0"
        );
        assert!(!format!(
            "{:?}",
            RedisSpec {
                connection: RedisConnection {
                    urls: vec!["rediss://u:hunter2@h:1".into()],
                    cluster: false,
                    tls_ca_file: None,
                },
                time_field: "t".into(),
                max_in_flight: 1,
                pipeline_size: 1,
                max_event_time_skew: Duration::from_secs(1),
                aggregate_cache: 0,
                views: vec![],
                aggregates: vec![],
            }
        )
        .contains("hunter2"));
    }
}
