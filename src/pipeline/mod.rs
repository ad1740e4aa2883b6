//! A running pipeline: wiring of source → sinks, and the commit protocol.
//!
//! Tasks and threads of one pipeline:
//! - the **source thread** ([`crate::source`]) polls Kafka and copies micro-batches;
//! - the **decode thread** ([`crate::decode::stage`]) receives them in order through a bounded
//!   channel (the backpressure: when it is full, the source pauses its partitions), decodes
//!   them into Arrow and passes them on through a channel of one batch, so it decodes the next
//!   batch while the pipeline task writes this one;
//! - the **pipeline task** ([`runner`], one tokio task) sends rejected events to the
//!   dead-letter topic, writes features to Redis while it encodes the rows into the Parquet
//!   segments (CPU work runs under `block_in_place`), submits the rows to each model
//!   ([`crate::score`]; the model threads and the prediction producer work while the task goes
//!   on), finishes segments, and commits offsets;
//! - the **model threads** of each model, behind a queue with admission in rows; each scored
//!   batch's prediction and feedback records are built and delivered in a task of its own.
//!
//! The order in which things become durable, per partition:
//! 0. a batch's features are acknowledged by Redis before a Parquet segment holding its rows
//!    is finished: every sink takes the batch at once, segments are finished only between
//!    batches, and a write that shutdown cut short is settled first
//!    ([`runner::Runner`]'s `interrupted`: it runs once more, or the partitions are fenced);
//! 1. dead letters and predictions are acknowledged by the broker (all pending ones, before
//!    any segment is finished, because a finished segment's manifest is also a resume
//!    position);
//! 2. the segment's files are finished and published ([`crate::sink::parquet`]);
//! 3. the offset is committed: the contiguous watermark of [`offsets::Offsets`].
//!
//! Shutdown goes through the rebalance protocol: the source stops taking messages and leaves
//! the group, whose revocation of every partition the pipeline answers as in any rebalance
//! (finish the partitions' segments, wait for their dead letters and predictions, commit);
//! batches still queued are dropped, uncommitted. All within the grace period; past it, the
//! process exits non-zero without committing (nothing is lost: uncommitted data is consumed
//! again and files are recovered).

mod error;
pub mod offsets;
mod runner;
#[cfg(test)]
mod tests;
mod watchdog;

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, Instrument};

pub use self::error::PipelineError;
use self::runner::Runner;
use crate::{
    config::{ErrorPolicy, Pipeline},
    decode::{Decoder, Limits},
    score::{service::Service, Scorer},
    sink::{
        dead_letter::DeadLetters, join::JoinSink, parquet::ParquetSink, redis::RedisSink, Sink,
    },
    source::{Batcher, Source},
    telemetry::health::Status,
};

/// Runs a pipeline until `shutdown` is cancelled or it fails.
pub async fn run(
    spec: Pipeline,
    shutdown: CancellationToken,
    grace: Duration,
    stall_timeout: Duration,
    status: Arc<Status>,
    inference: Arc<Service>,
) -> Result<(), PipelineError> {
    let span = tracing::info_span!("pipeline", pipeline = %spec.name);
    let result = run_inner(spec, shutdown, grace, stall_timeout, &status, &inference)
        .instrument(span)
        .await;
    if result.is_err() {
        status.failed.store(true, Ordering::Release);
    }
    result
}

/// The inputs the pipeline's models take from Redis (`<view>.<field or feature>`).
fn enriched(spec: &Pipeline) -> Vec<String> {
    spec.models
        .iter()
        .flat_map(|m| &m.inputs)
        .filter(|i| i.redis)
        .map(|i| i.column.clone())
        .collect()
}

async fn run_inner(
    spec: Pipeline,
    shutdown: CancellationToken,
    grace: Duration,
    stall_timeout: Duration,
    status: &Arc<Status>,
    inference: &Service,
) -> Result<(), PipelineError> {
    // The sinks of rows: Redis first (the enrichers, which a batch is written to before it is
    // scored, lead), then Parquet. A finished Parquet segment is a resume position, so its
    // rows must already be in Redis: the runner finishes segments only between batches.
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    if let Some(r) = &spec.redis {
        sinks.push(Box::new(
            RedisSink::open(
                &spec.name,
                r,
                status.redis_healthy.clone(),
                &enriched(&spec),
            )
            .await?,
        ));
    }
    if let Some(pq) = &spec.parquet {
        sinks.push(Box::new(
            ParquetSink::open(&spec.name, pq, spec.schema.clone()).map_err(|source| {
                PipelineError::Parquet {
                    location: pq.location.to_string(),
                    source: Box::new(source),
                }
            })?,
        ));
    }
    let dead_letters = match &spec.errors.policy {
        ErrorPolicy::DeadLetter {
            topic,
            producer_properties,
        } => Some(
            DeadLetters::new(
                &spec.name,
                &spec.source.bootstrap_servers,
                topic,
                producer_properties,
                spec.errors.max_event_size,
            )
            .map_err(|source| PipelineError::Kafka {
                what: "dead-letter producer",
                source,
            })?,
        ),
        _ => None,
    };
    if let Some(dlq) = &dead_letters {
        dlq.check_topic().await?;
    }
    if let (Some(j), Some(dlq)) = (&spec.join, &dead_letters) {
        sinks.push(Box::new(
            JoinSink::open(
                &spec.name,
                &spec.source.bootstrap_servers,
                j,
                dlq.clone(),
                status.redis_healthy.clone(),
            )
            .await?,
        ));
    }
    let mut scorers = Vec::with_capacity(spec.models.len());
    for m in &spec.models {
        scorers.push(Scorer::open(&spec.name, &spec.source.bootstrap_servers, m, inference).await?);
    }
    let decoder = Decoder::new(spec.schema.clone(), Limits::from(&spec.errors));
    let (tx, raw) = mpsc::channel(spec.batch.max_in_flight);
    let source = Source::start(
        &spec.name,
        &spec.source,
        Batcher::new(spec.batch.clone()),
        tx,
        status.joined.clone(),
    )
    .map_err(|source| PipelineError::Kafka {
        what: "Kafka consumer",
        source,
    })?;
    // The decode thread ends by itself when the source or this task lets go of its channels.
    let (mut rx, _decode) =
        // Originals are kept for the stages that may still reject a valid event: the models,
        // Redis and the join (which also keeps a waiting label's bytes).
        crate::decode::stage::spawn(
            &spec.name,
            decoder,
            !scorers.is_empty() || spec.redis.is_some() || spec.join.is_some(),
            raw,
            1,
        );
    status.progressed();
    watchdog::watch(
        spec.name.clone(),
        status.clone(),
        source.waiting.clone(),
        stall_timeout,
    );
    let tick = spec.parquet.as_ref().map_or(Duration::from_secs(1), |pq| {
        pq.idle_flush.min(Duration::from_secs(1))
    }) / 2;
    let mut runner = Runner::new(
        &spec.name,
        spec.errors.policy.clone(),
        source.consumer.clone(),
        source.fence.clone(),
        status.clone(),
        sinks,
    )
    .with_records(dead_letters, scorers);
    info!(topics = ?spec.source.topics, group = %spec.source.group_id, "Pipeline started.");
    let result = runner.run(&mut rx, &shutdown, &source.exited, tick).await;
    let drained = match &result {
        Ok(()) => {
            info!(grace = ?grace, "Shutting down: finishing files and committing.");
            source.leave(grace / 4);
            let leave = async {
                runner.leave(&mut rx, &source.exited).await?;
                runner.drain().await
            };
            match tokio::time::timeout(grace, leave).await {
                Ok(r) => r,
                Err(_) => Err(PipelineError::Grace(grace)),
            }
        }
        // After a failure nothing more is made durable: restart recovers from the manifests.
        Err(_) => Ok(()),
    };
    source.stop_intake();
    // Before the consumer closes: a revocation it still sends (after a failure, the member
    // holds its partitions) must find the channel closed, not wait for an answer.
    drop(rx);
    drop(runner);
    tokio::task::spawn_blocking(move || source.close())
        .await
        .ok();
    result.and(drained)?;
    info!("Pipeline stopped.");
    Ok(())
}
