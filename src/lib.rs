//! # sluice
//!
//! Business events on Kafka → schema-validated Arrow batches → exactly-once Parquet and
//! replay-safe online features in Redis, with a dead-letter topic for everything that does not
//! validate.
//!
//! The modules follow the data flow:
//!
//! ```text
//!  config ──▶ pipeline (wiring, commit protocol)
//!                │
//!  source ──▶ decode ──▶ batches ──▶ sink::redis        (features, never rolled back)
//!  (Kafka)   (schema)      │    ├──▶ sink::parquet      (files, exactly once)
//!                          │    └──▶ sink::dead_letter  (rejected events, at least once)
//!                          └─ offsets committed only when every sink has made them durable
//! ```
//!
//! - [`config`]: pipeline TOML files → validated [`config::Pipeline`] specs.
//! - [`schema`]: the JSON Schema subset → validator + Arrow schema.
//! - [`source`]: the Kafka consumer thread: polling, micro-batching, rebalances, backpressure.
//! - [`decode`]: JSON payloads → Arrow columns, per-record rejection with a reason.
//! - [`sink`]: where batches go: [`sink::redis`], [`sink::parquet`] and [`sink::dead_letter`].
//! - [`pipeline`]: owns the tasks, the per-partition offset tracking and the commit protocol.
//! - [`telemetry`]: logs, Prometheus metrics, `/healthz`, `/readyz`.

pub mod config;
pub mod decode;
pub mod failure;
pub mod pipeline;
pub mod schema;
pub mod score;
pub mod sink;
pub mod source;
pub mod telemetry;
