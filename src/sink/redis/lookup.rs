//! Redis features for requests of the inference API: the same model inputs the stream gets
//! (aggregates, latest values), read without writing anything.
//!
//! A request is an event that has not happened in the stream: it is scored as if it were its
//! entity's next event. Its aggregates are the windows ending at its own event time over the
//! hash as it is, with the request's own values added (as the stream counts an event in its
//! own windows); an event more than the lateness behind the entity's watermark gets nulls,
//! as on the stream. A latest value is the entity's stored one if its event time is not
//! after the request's. So the same event sent as a request, then produced to Kafka, gets the
//! same features both times (unless other events of its entity come between).

use std::{collections::HashMap, sync::Arc};

use arrow::{
    array::{ArrayRef, Float64Array},
    record_batch::RecordBatch,
};
use futures::StreamExt;
use redis::RedisError;

use super::{aggregate, connect, event_times, number, Connection, RedisSinkError};
use crate::{
    config::{KeyPart, RedisSpec},
    util::text::render_key,
};

/// A latest-value view's fields that models read.
struct Latest {
    name: String,
    key: Vec<KeyPart>,
    /// (hash field, column it is written from).
    fields: Vec<(String, String)>,
}

/// Reads the features a model takes from one pipeline's Redis, for requests.
pub struct Lookup {
    conn: Connection,
    cluster: bool,
    time_field: String,
    aggregates: Vec<aggregate::View>,
    latest: Vec<Latest>,
}

impl Lookup {
    /// A lookup of `enrich` (`<view>.<field or feature>`, what a model takes from Redis) in the
    /// Redis of `spec`; `None` when the model takes nothing from it.
    pub async fn open(spec: &RedisSpec, enrich: &[String]) -> Result<Option<Self>, RedisSinkError> {
        let read = |view: &str| enrich.iter().any(|e| e.split('.').next() == Some(view));
        let aggregates: Vec<aggregate::View> = spec
            .aggregates
            .iter()
            .filter(|a| read(&a.name))
            .map(|a| aggregate::View::new(a, true, 0))
            .collect();
        let latest: Vec<Latest> = spec
            .views
            .iter()
            .filter_map(|v| {
                let fields: Vec<(String, String)> = v
                    .fields
                    .iter()
                    .filter(|(_, f)| enrich.contains(&format!("{}.{f}", v.name)))
                    .map(|(c, f)| (f.clone(), c.clone()))
                    .collect();
                (!fields.is_empty()).then(|| Latest {
                    name: v.name.clone(),
                    key: v.key.clone(),
                    fields,
                })
            })
            .collect();
        if aggregates.is_empty() && latest.is_empty() {
            return Ok(None);
        }
        Ok(Some(Self {
            conn: connect(&spec.connection).await?,
            cluster: spec.connection.cluster,
            time_field: spec.time_field.clone(),
            aggregates,
            latest,
        }))
    }

    /// The Redis input columns of the request rows `batch` (decoded events), by name.
    pub async fn enrich(&self, batch: &RecordBatch) -> Result<Vec<(String, ArrayRef)>, RedisError> {
        let times = event_times(batch, &self.time_field);
        let mut out = Vec::new();
        for view in &self.aggregates {
            let keys: Vec<String> = (0..batch.num_rows())
                .map(|row| render_key(&view.spec.key, batch, row))
                .collect();
            let hashes: HashMap<String, Vec<(String, String)>> = self
                .each(unique(&keys), |k| {
                    let mut c = redis::cmd("HGETALL");
                    c.arg(k);
                    c
                })
                .await?;
            out.extend(aggregate::as_next_events(
                view, batch, &times, &keys, &hashes,
            ));
        }
        for view in &self.latest {
            let keys: Vec<String> = (0..batch.num_rows())
                .map(|row| render_key(&view.key, batch, row))
                .collect();
            let stored: HashMap<String, Vec<Option<String>>> = self
                .each(unique(&keys), |k| {
                    let mut c = redis::cmd("HMGET");
                    c.arg(k).arg("_ts");
                    for (field, _) in &view.fields {
                        c.arg(field);
                    }
                    c
                })
                .await?;
            for (f, (field, _)) in view.fields.iter().enumerate() {
                let values: Vec<Option<f64>> = keys
                    .iter()
                    .enumerate()
                    .map(|(row, key)| {
                        let got = stored.get(key)?;
                        let ts: i64 = got.first()?.as_deref()?.parse().ok()?;
                        (ts <= times[row]).then_some(())?;
                        number(got.get(1 + f)?.as_deref())
                    })
                    .collect();
                out.push((
                    format!("{}.{field}", view.name),
                    Arc::new(Float64Array::from(values)) as ArrayRef,
                ));
            }
        }
        Ok(out)
    }

    /// Runs the command `make` builds for each key (one pipeline on a server; one command per
    /// key, side by side, on a cluster); each key's reply.
    async fn each<T: redis::FromRedisValue + Send>(
        &self,
        keys: Vec<String>,
        make: impl Fn(&str) -> redis::Cmd,
    ) -> Result<HashMap<String, T>, RedisError> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        if !self.cluster {
            let mut pipe = redis::pipe();
            for k in &keys {
                pipe.add_command(make(k));
            }
            let replies: Vec<T> = self.conn.clone().query(&pipe).await?;
            return Ok(keys.into_iter().zip(replies).collect());
        }
        let replies: Vec<Result<(String, T), RedisError>> = futures::stream::iter(keys)
            .map(|k| {
                let mut conn = self.conn.clone();
                let mut pipe = redis::pipe();
                pipe.add_command(make(&k));
                async move {
                    let (reply,): (T,) = conn.query(&pipe).await?;
                    Ok((k, reply))
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        replies.into_iter().collect()
    }
}

/// The keys, each once.
fn unique(keys: &[String]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    keys.iter().filter(|k| seen.insert(*k)).cloned().collect()
}
