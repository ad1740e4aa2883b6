//! Logs, metrics and health endpoints.
//!
//! - logs: `tracing`, human-readable by default, JSON with `--log-format json`; the filter
//!   comes from `RUST_LOG` (default `info`).
//! - `/metrics`: Prometheus text, names `sluice_<subject>_<unit>[_total]`, labels `pipeline`
//!   and a few fixed others (`reason`, `topic`, `partition`).
//! - `/healthz`: 200 while no pipeline has failed or is stuck (the progress watchdog: events
//!   wait and nothing moved for `--stall-timeout`); `/readyz`: 200 once every pipeline's
//!   consumer has joined its group, its Redis writes (if any) succeed, and none has failed.

use std::{net::SocketAddr, sync::Arc};

use axum::{extract::State, http::StatusCode, routing::get, Router};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::{fmt, prelude::*, EnvFilter};

pub mod health;

use self::health::Status;

/// Installs the global tracing subscriber.
pub fn init_logs(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .init();
    } else {
        registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .init();
    }
}

/// Why metrics could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("installing the metrics recorder")]
    Recorder(#[from] metrics_exporter_prometheus::BuildError),
    #[error("starting the metrics upkeep thread")]
    Thread(#[from] std::io::Error),
}

/// Installs the global metrics recorder.
pub fn init_metrics() -> Result<PrometheusHandle, MetricsError> {
    // Fine in the milliseconds, where the latency of scoring on the stream and of the
    // inference API lies.
    let seconds = [
        0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03,
        0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0,
        30.0,
    ];
    let rows = [1.0, 10.0, 100.0, 1000.0, 5000.0, 10000.0, 50000.0, 100000.0];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)?
        .set_buckets_for_metric(Matcher::Suffix("_rows".into()), &rows)?
        .install_recorder()?;
    // Histogram samples wait in the recorder until a scrape or an upkeep folds them into the
    // buckets; without this, a process nobody scrapes would keep every sample.
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_secs(5));
            upkeep.run_upkeep();
        })?;
    Ok(handle)
}

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    pipelines: Arc<Vec<Arc<Status>>>,
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: PrometheusHandle,
    pipelines: Vec<Arc<Status>>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let state = AppState {
        metrics,
        pipelines: Arc::new(pipelines),
    };
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(s): State<AppState>| async move { s.metrics.render() }),
        )
        .route(
            "/healthz",
            get(|State(s): State<AppState>| async move {
                match s.pipelines.iter().find_map(|p| p.unhealthy()) {
                    Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                    None => (StatusCode::OK, "ok\n".to_owned()),
                }
            }),
        )
        .route(
            "/readyz",
            get(|State(s): State<AppState>| async move {
                if s.pipelines.iter().all(|p| p.ready()) {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }),
        )
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Records the wall time of one pipeline stage since `started` in
/// `sluice_stage_seconds{pipeline, stage}`. Stages: `decode`, `features` (model inputs),
/// `records` (prediction and feedback records), `redis`, `parquet_write`, `parquet_finish`,
/// `commit`; the model's forward passes are in `sluice_model_inference_seconds`. The sums over a
/// run are the per-stage profile that `scripts/bench.sh` prints.
pub fn stage(pipeline: &str, stage: &'static str, started: std::time::Instant) {
    metrics::histogram!("sluice_stage_seconds", "pipeline" => pipeline.to_owned(), "stage" => stage)
        .record(started.elapsed().as_secs_f64());
}

/// Parses a listen address such as `127.0.0.1:9898` or `:9898`.
pub fn parse_listen(addr: &str) -> Result<SocketAddr, String> {
    let full = if addr.starts_with(':') {
        format!("0.0.0.0{addr}")
    } else {
        addr.to_owned()
    };
    full.parse()
        .map_err(|e| format!("{addr:?} is not an address like 127.0.0.1:9898: {e}"))
}
