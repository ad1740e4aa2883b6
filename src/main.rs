//! The `sluice` command: parses arguments, sets up logs and signals, calls the library.
//!
//! Exit codes: 0 success (including a clean shutdown on SIGINT/SIGTERM); 1 a pipeline failed
//! at run time, or shutdown outlasted the grace period; 2 invalid pipeline files or arguments.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use sluice::{config, pipeline, telemetry};
use tokio_util::sync::CancellationToken;

/// mimalloc instead of glibc's malloc: decoding, Arrow building and record production allocate
/// many short-lived small blocks, where glibc spent a quarter of the decode time consolidating
/// free chunks (perf, `sluice-bench decode`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tracing::{error, info};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Kafka JSON events to schema-validated, exactly-once Parquet."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check pipeline files and their schemas; print every problem, or each pipeline's Arrow
    /// schema and sinks. Exits 2 if any file has a problem.
    Validate {
        /// Pipeline TOML files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Run one or more pipelines in this process until SIGINT/SIGTERM.
    Run {
        /// Pipeline TOML files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Address of the HTTP listener for /metrics, /healthz and /readyz ("off" to disable).
        #[arg(long, default_value = "127.0.0.1:9898", env = "SLUICE_LISTEN")]
        listen: String,
        /// How long shutdown may take to finish files and commit before the process gives up
        /// (exit 1). The default leaves room within Kubernetes' default
        /// terminationGracePeriodSeconds (30) for the hard deadline, 2 s after it.
        #[arg(long, default_value = "20s", value_parser = config::units::parse_duration)]
        grace_period: Duration,
        /// When events wait and a pipeline has taken, acknowledged and committed nothing for
        /// this long, it is stuck: /healthz answers 503 (so a supervisor restarts the process).
        #[arg(long, default_value = "5m", env = "SLUICE_STALL_TIMEOUT",
              value_parser = config::units::parse_duration)]
        stall_timeout: Duration,
        /// Log format.
        #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "SLUICE_LOG_FORMAT")]
        log_format: LogFormat,
        /// Address of the inference API over REST (the Open Inference Protocol; Triton's
        /// port is 8000), e.g. 0.0.0.0:8000; "off" (the default) serves none.
        #[arg(long, default_value = "off", env = "SLUICE_INFERENCE_HTTP")]
        inference_http: String,
        /// Address of the inference API over gRPC (`inference.GRPCInferenceService`;
        /// Triton's port is 8001); "off" (the default) serves none.
        #[arg(long, default_value = "off", env = "SLUICE_INFERENCE_GRPC")]
        inference_grpc: String,
    },
    /// Train a model on the examples of its label join, in rounds; publish each round's
    /// candidate as the next version only if it passes the gates (a trainer file: [train]).
    Train {
        /// The trainer file.
        file: PathBuf,
        /// Stop after this many rounds (default: run until SIGINT/SIGTERM).
        #[arg(long)]
        rounds: Option<usize>,
        /// Address of the HTTP listener for /metrics ("off" to disable).
        #[arg(long, default_value = "off", env = "SLUICE_TRAIN_LISTEN")]
        listen: String,
        /// Log format.
        #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "SLUICE_LOG_FORMAT")]
        log_format: LogFormat,
    },
    /// Look at the online features a pipeline keeps in Redis.
    Features {
        #[command(subcommand)]
        command: FeaturesCommand,
    },
    /// Show or change which versions of a model repository serve (its rollout.json): every
    /// scoring instance's reloader follows within its reload_interval.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
}

#[derive(clap::Args)]
struct RepositoryArg {
    /// The model repository: a folder, or an object store URL (`s3://bucket/models/fraud`).
    repository: String,
    /// An `object_store` option for a repository on an object store, e.g.
    /// `--option aws_endpoint=http://127.0.0.1:9000` (repeatable).
    #[arg(long = "option", value_name = "KEY=VALUE")]
    options: Vec<String>,
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Print the versions, their gate decisions and the rollout.
    Status {
        #[command(flatten)]
        at: RepositoryArg,
    },
    /// Make a version stable (default: the canary, else the shadow, else the newest).
    Promote {
        #[command(flatten)]
        at: RepositoryArg,
        version: Option<String>,
    },
    /// Withdraw the canary and the shadow, or with neither, go back to the previous stable
    /// version; the version rolled back is refused.
    Rollback {
        #[command(flatten)]
        at: RepositoryArg,
    },
    /// Serve a version to a share of entities (by a hash of the prediction key).
    Canary {
        #[command(flatten)]
        at: RepositoryArg,
        version: String,
        /// The share of entities, in (0, 1].
        #[arg(long, default_value_t = 0.1)]
        weight: f64,
    },
    /// Score every event with a version too, its predictions to the model's shadow_topic.
    Shadow {
        #[command(flatten)]
        at: RepositoryArg,
        version: String,
    },
}

#[derive(Subcommand)]
enum FeaturesCommand {
    /// Print an entity's stored features: `sluice features get pipelines/orders.toml cust:c-000042`.
    Get {
        /// The pipeline file whose Redis sink to read.
        pipeline: PathBuf,
        /// The entity's full key, as the view's key template renders it.
        key: String,
        /// For an aggregate view's key: the time the windows end at (RFC 3339; default now).
        #[arg(long)]
        at: Option<String>,
    },
    /// Print the read-only Lua script that finishes an aggregate view's windows in Redis, for
    /// other services: `EVAL <script> 1 <key> <T ms> <window ms>...` (see the README).
    ReadScript,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { files } => validate(&files),
        Command::Features {
            command: FeaturesCommand::Get { pipeline, key, at },
        } => features_get(&pipeline, &key, at.as_deref()),
        Command::Features {
            command: FeaturesCommand::ReadScript,
        } => {
            print!("{}", sluice::sink::redis::aggregate::READ.trim_start());
            ExitCode::SUCCESS
        }
        Command::Model { command } => model(command),
        Command::Train {
            file,
            rounds,
            listen,
            log_format,
        } => {
            telemetry::init_logs(matches!(log_format, LogFormat::Json));
            train(&file, rounds, &listen)
        }
        Command::Run {
            files,
            listen,
            grace_period,
            stall_timeout,
            log_format,
            inference_http,
            inference_grpc,
        } => {
            telemetry::init_logs(matches!(log_format, LogFormat::Json));
            let pipelines = match load_all(&files) {
                Ok(p) => p,
                Err(code) => return code,
            };
            if let Some(t) = pipelines.iter().find(|p| p.train.is_some()) {
                eprintln!(
                    "{}: {:?} is a trainer file: run it with `sluice train`",
                    t.file.display(),
                    t.name
                );
                return ExitCode::from(2);
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("sluice-worker")
                .build()
                .expect("building the tokio runtime");
            let listeners = Listeners {
                metrics: listen,
                inference_http,
                inference_grpc,
            };
            match runtime.block_on(run(pipelines, &listeners, grace_period, stall_timeout)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(Failed { code, error }) => {
                    error!("{error:#}");
                    ExitCode::from(code)
                }
            }
        }
    }
}

fn train(file: &std::path::Path, rounds: Option<usize>, listen: &str) -> ExitCode {
    let pipeline = match load_all(&[file.to_owned()]) {
        Ok(mut p) => p.remove(0),
        Err(code) => return code,
    };
    if pipeline.train.is_none() {
        eprintln!(
            "{}: {:?} is not a trainer file (it has no [train])",
            file.display(),
            pipeline.name
        );
        return ExitCode::from(2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        serve_http(listen, vec![], &shutdown).await?;
        tokio::spawn(signals(shutdown.clone()));
        {
            let (stop, shutdown) = (stop.clone(), shutdown.clone());
            tokio::spawn(async move {
                shutdown.cancelled().await;
                stop.store(true, std::sync::atomic::Ordering::Release);
            });
        }
        let trainer = {
            let stop = stop.clone();
            tokio::task::spawn_blocking(move || {
                sluice::train::trainer::run(&pipeline, rounds, &stop)
            })
        };
        let result = trainer.await.context("the trainer panicked")?;
        shutdown.cancel();
        anyhow::Ok(result)
    });
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            error!("{e}");
            ExitCode::from(e.exit_code())
        }
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn features_get(file: &std::path::Path, key: &str, at: Option<&str>) -> ExitCode {
    let pipeline = match load_all(&[file.to_owned()]) {
        Ok(mut p) => p.remove(0),
        Err(code) => return code,
    };
    let Some(redis) = &pipeline.redis else {
        eprintln!(
            "{}: pipeline {:?} has no [sink.redis]",
            file.display(),
            pipeline.name
        );
        return ExitCode::from(2);
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    if let Some(view) = redis
        .aggregates
        .iter()
        .find(|a| sluice::sink::redis::aggregate::key_matches(&a.key, key))
    {
        let at = match at.map(chrono::DateTime::parse_from_rfc3339) {
            None => chrono::Utc::now().timestamp_millis(),
            Some(Ok(t)) => t.timestamp_millis(),
            Some(Err(e)) => {
                eprintln!("--at: {e} (write e.g. 2026-12-03T10:00:00Z)");
                return ExitCode::from(2);
            }
        };
        let reading = sluice::sink::redis::read_aggregate(&redis.connection, view, key, at);
        return match runtime.block_on(reading) {
            Ok(None) => {
                eprintln!("{key}: no such entity");
                ExitCode::from(1)
            }
            Ok(Some(r)) => {
                let time = |ms: i64| {
                    chrono::DateTime::from_timestamp_millis(ms).map_or_else(
                        || ms.to_string(),
                        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    )
                };
                println!("{key} (aggregate view {:?}, as of {})", view.name, time(at));
                if let Some(wm) = r.watermark {
                    println!("  newest event time: {}", time(wm));
                }
                for w in r.windows {
                    println!(
                        "  window {} [{} .. {}):",
                        w.window,
                        time(w.from_ms),
                        time(w.to_ms)
                    );
                    for (name, value) in w.features {
                        match value {
                            Some(v) => println!("    {name} = {v}"),
                            None => println!("    {name} = null"),
                        }
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(1)
            }
        };
    }
    match runtime.block_on(sluice::sink::redis::read_entity(redis, key)) {
        Ok(fields) if fields.is_empty() => {
            eprintln!("{key}: no such entity");
            ExitCode::from(1)
        }
        Ok(fields) => {
            println!("{key}");
            for (field, value) in fields {
                println!("  {field} = {value}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

fn load_all(files: &[PathBuf]) -> Result<Vec<config::Pipeline>, ExitCode> {
    let mut pipelines = Vec::new();
    let mut failed = false;
    for file in files {
        match config::load(file) {
            Ok(p) => pipelines.push(p),
            Err(e) => {
                eprint!("{e}");
                failed = true;
            }
        }
    }
    let mut names: Vec<&str> = pipelines.iter().map(|p| p.name.as_str()).collect();
    names.sort();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        eprintln!("pipeline name {:?} is used by more than one file", w[0]);
        failed = true;
    }
    if failed {
        Err(ExitCode::from(2))
    } else {
        Ok(pipelines)
    }
}

fn validate(files: &[PathBuf]) -> ExitCode {
    let pipelines = match load_all(files) {
        Ok(p) => p,
        Err(code) => return code,
    };
    // Models are loaded and warmed up as `run` would, so a bad file fails here too.
    let mut refused = false;
    for p in &pipelines {
        for (i, m) in p.models.iter().enumerate() {
            if let Err(reason) = sluice::score::load_newest(m) {
                eprintln!("{}: model[{i}] ({:?}): {reason}", p.file.display(), m.name);
                refused = true;
            }
        }
    }
    if refused {
        return ExitCode::from(2);
    }
    for p in &pipelines {
        println!("{}: pipeline {:?} is valid", p.file.display(), p.name);
        println!(
            "  source: topics {:?}, group {:?}, servers {}",
            p.source.topics, p.source.group_id, p.source.bootstrap_servers
        );
        println!(
            "  schema: {} (fingerprint {})",
            p.schema_path.display(),
            p.schema.fingerprint
        );
        for field in p.schema.arrow.fields() {
            println!(
                "    {}: {}{}",
                field.name(),
                field.data_type(),
                if field.is_nullable() { "" } else { " not null" }
            );
        }
        match &p.errors.policy {
            config::ErrorPolicy::DeadLetter { topic, .. } => {
                println!("  errors: dead letters to {topic:?}")
            }
            config::ErrorPolicy::Skip => println!("  errors: skipped"),
            config::ErrorPolicy::Fail => println!("  errors: stop the pipeline"),
        }
        if let Some(r) = &p.redis {
            let urls: Vec<String> = r
                .connection
                .urls
                .iter()
                .map(|u| config::redact(u))
                .collect();
            println!(
                "  sink redis: {} {:?}, event time {:?} (at most {:?} ahead)",
                if r.connection.cluster {
                    "cluster"
                } else {
                    "server"
                },
                urls,
                r.time_field,
                r.max_event_time_skew
            );
            let template = |parts: &[config::KeyPart]| -> String {
                parts
                    .iter()
                    .map(|part| match part {
                        config::KeyPart::Text(t) => t.clone(),
                        config::KeyPart::Column(c) => format!("{{{c}}}"),
                    })
                    .collect()
            };
            for v in &r.views {
                println!(
                    "    view {:?}: key {:?}, fields {:?}, ttl {:?}",
                    v.name,
                    template(&v.key),
                    v.fields,
                    v.ttl
                );
            }
            if !r.aggregates.is_empty() {
                println!(
                    "    snapshots of the aggregate hashes: up to {} bytes",
                    r.aggregate_cache
                );
            }
            for a in &r.aggregates {
                println!(
                    "    aggregate view {:?}: key {:?}, buckets of {:?}, lateness {:?}, ttl {:?}, \
                     features {}",
                    a.name,
                    template(&a.key),
                    a.bucket,
                    a.lateness,
                    a.ttl,
                    a.feature_names().join(", ")
                );
            }
        }
        for m in &p.models {
            let version = sluice::score::model::targets(&m.source, &[])
                .map(|t| t.stable.version)
                .unwrap_or_default();
            println!(
                "  model {:?}: {} version {version}, {:?}, {} features, output {:?} to {:?}{}",
                m.name,
                m.source,
                m.device,
                m.features(),
                m.output,
                m.output_topic,
                m.feedback_topic
                    .as_ref()
                    .map(|t| format!(", feedback to {t:?}"))
                    .unwrap_or_default()
            );
            println!(
                "    circuit breaker: a version failing on {}% of {} rows is rolled back",
                m.breaker.failure_rate * 100.0,
                m.breaker.min_rows
            );
        }
        if let Some(t) = &p.train {
            let serving = sluice::train::repository::open(&t.repository)
                .and_then(|r| sluice::score::rollout::current(&r))
                .map_or_else(|e| format!("none ({e})"), |r| r.stable);
            println!(
                "  trainer of model {:?}: examples {:?}, repository {} (serving version {serving}), \
                 {:?} lr {} wd {}, batches of {}, {} epoch(s), a round every {} examples or {:?}, \
                 holdout {}%, gates {:?}",
                t.model,
                t.examples_topic,
                t.repository,
                t.optimizer,
                t.learning_rate,
                t.weight_decay,
                t.batch_size,
                t.epochs,
                t.round_examples,
                t.round_interval,
                t.holdout * 100.0,
                t.gates
            );
        }
        if let Some(j) = &p.join {
            println!(
                "  join of model {:?}: feedback {:?} + labels {:?} -> examples {:?}, maturity {:?}, \
                 unlabelled {:?}, grace {:?}, remembered {:?}, {} shards in Redis {}",
                j.model,
                j.feedback_topic,
                j.labels_topic,
                j.examples_topic,
                j.maturity,
                j.unlabelled,
                j.grace,
                j.remember,
                j.shards,
                j.redis.shown()
            );
        }
        if let Some(pq) = &p.parquet {
            println!(
                "  sink parquet: {} partitioned by {:?}, {:?}, files up to {} bytes / {:?} / idle {:?}, \
                 at most {} open per partition",
                pq.location, pq.partition_by, pq.compression, pq.max_file_size, pq.max_file_age,
                pq.idle_flush, pq.max_open_files
            );
        }
    }
    ExitCode::SUCCESS
}

/// Why `sluice run` failed: the error to print, and the exit code its kind means.
struct Failed {
    code: u8,
    error: anyhow::Error,
}

impl From<anyhow::Error> for Failed {
    fn from(error: anyhow::Error) -> Self {
        Self { code: 1, error }
    }
}

impl From<std::io::Error> for Failed {
    fn from(error: std::io::Error) -> Self {
        anyhow::Error::from(error).into()
    }
}

/// The addresses `sluice run` listens on ("off": none).
struct Listeners {
    metrics: String,
    inference_http: String,
    inference_grpc: String,
}

async fn run(
    pipelines: Vec<config::Pipeline>,
    listeners: &Listeners,
    grace: Duration,
    stall_timeout: Duration,
) -> Result<(), Failed> {
    let shutdown = CancellationToken::new();
    let statuses: Vec<Arc<telemetry::health::Status>> = pipelines
        .iter()
        .map(|_| Arc::new(telemetry::health::Status::new()))
        .collect();
    serve_http(&listeners.metrics, statuses.clone(), &shutdown).await?;
    tokio::spawn(signals(shutdown.clone()));
    // The grace period is a hard deadline: once shutdown starts (a signal, or a pipeline that
    // failed), an OS thread, which no blocked task can hold up, ends the process after it.
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            std::thread::spawn(move || {
                std::thread::sleep(grace + Duration::from_secs(2));
                error!(
                    ?grace,
                    "Shutdown did not finish within the grace period; exiting without \
                     committing more (uncommitted data will be consumed again)."
                );
                std::process::exit(1);
            });
        });
    }
    // One inference service for the process: pipelines naming the same model share it, and
    // so does the inference API.
    let api = listeners.inference_http != "off" || listeners.inference_grpc != "off";
    let inference = Arc::new(sluice::score::service::Service::new(&pipelines, api));
    if api {
        serve_inference(listeners, &pipelines, &statuses, &inference, &shutdown).await?;
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (spec, status) in pipelines.into_iter().zip(statuses) {
        let name = spec.name.clone();
        let token = shutdown.child_token();
        let inference = inference.clone();
        tasks.spawn(async move {
            let result = pipeline::run(spec, token, grace, stall_timeout, status, inference).await;
            (name, result)
        });
    }
    let mut first_error = None;
    while let Some(done) = tasks.join_next().await {
        let (name, result) = done.context("a pipeline task panicked")?;
        if let Err(e) = result {
            // The first failure is the cause, logged once by `main`; later ones follow from it.
            if first_error.is_some() {
                let e = anyhow::Error::from(e);
                tracing::warn!(pipeline = %name, "Pipeline stopped: {e:#}");
            } else {
                first_error = Some(Failed {
                    code: e.exit_code(),
                    error: anyhow::Error::from(e).context(format!("pipeline {name}")),
                });
            }
            // One failed pipeline stops the process, so a supervisor restarts all of it.
            shutdown.cancel();
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Installs the metrics recorder and, unless `listen` is "off", serves `/metrics`, `/healthz`
/// and `/readyz` (of `statuses`) until `shutdown`.
async fn serve_http(
    listen: &str,
    statuses: Vec<Arc<telemetry::health::Status>>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let metrics = telemetry::init_metrics().map_err(anyhow::Error::from)?;
    if listen != "off" {
        let addr = telemetry::parse_listen(listen).map_err(anyhow::Error::msg)?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the HTTP listener on {addr}"))?;
        info!(addr = %listener.local_addr()?, "Serving /metrics, /healthz and /readyz.");
        tokio::spawn(telemetry::serve(
            listener,
            metrics,
            statuses,
            shutdown.clone(),
        ));
    }
    Ok(())
}

/// Loads the models of `pipelines` into the inference service and serves the inference API
/// on the listeners that are not "off", until `shutdown`.
async fn serve_inference(
    listeners: &Listeners,
    pipelines: &[config::Pipeline],
    statuses: &[Arc<telemetry::health::Status>],
    inference: &sluice::score::service::Service,
    shutdown: &CancellationToken,
) -> Result<(), Failed> {
    let api = sluice::serve::Api::open(pipelines, statuses, inference)
        .await
        .map_err(|error| {
            let code = match error.downcast_ref::<sluice::score::service::ServiceError>() {
                Some(e) if e.is_config() => 2,
                _ => 1,
            };
            Failed { code, error }
        })?;
    let api = Arc::new(api);
    let bind = |addr: &str| {
        let addr = addr.to_owned();
        async move {
            let at = telemetry::parse_listen(&addr).map_err(anyhow::Error::msg)?;
            tokio::net::TcpListener::bind(at)
                .await
                .with_context(|| format!("binding the inference API on {at}"))
        }
    };
    if listeners.inference_http != "off" {
        let listener = bind(&listeners.inference_http).await?;
        tokio::spawn(sluice::serve::http::serve(
            listener,
            api.clone(),
            shutdown.clone(),
        ));
    }
    if listeners.inference_grpc != "off" {
        let listener = bind(&listeners.inference_grpc).await?;
        tokio::spawn(sluice::serve::grpc::serve(
            listener,
            api.clone(),
            shutdown.clone(),
        ));
    }
    Ok(())
}

async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT received: shutting down."),
        _ = term.recv() => info!("SIGTERM received: shutting down."),
    }
    shutdown.cancel();
}

/// `sluice model …`: prints the rollout after the change, or the error (exit 1).
fn model(command: ModelCommand) -> ExitCode {
    use sluice::score::rollout::{self, Change};
    let (at, change) = match command {
        ModelCommand::Status { at } => (at, None),
        ModelCommand::Promote { at, version } => (at, Some(Change::Promote(version))),
        ModelCommand::Rollback { at } => (at, Some(Change::Rollback)),
        ModelCommand::Canary {
            at,
            version,
            weight,
        } => (at, Some(Change::Canary { version, weight })),
        ModelCommand::Shadow { at, version } => (at, Some(Change::Shadow(version))),
    };
    let mut options = std::collections::BTreeMap::new();
    for o in &at.options {
        let Some((k, v)) = o.split_once('=') else {
            eprintln!("--option {o:?}: expected KEY=VALUE");
            return ExitCode::from(2);
        };
        options.insert(k.to_owned(), v.to_owned());
    }
    let cache = config::default_cache("cli");
    let location = match config::repository_location(&at.repository, Path::new("."), options, cache)
    {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{e}");
            // A URL that does not parse is a bad argument; a missing folder, like an
            // unreadable store, fails the command.
            return ExitCode::from(if at.repository.contains("://") { 2 } else { 1 });
        }
    };
    let repository = match sluice::score::store::Repository::open(&location) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    let result = match change {
        Some(c) => rollout::change(&repository, c, "changed by the operator (sluice model)"),
        None => rollout::current(&repository),
    };
    let r = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{repository}: {e}");
            return ExitCode::from(1);
        }
    };
    let versions = repository.versions().unwrap_or_default();
    for v in versions.iter().rev() {
        let v = v.to_string();
        let mut roles = Vec::new();
        if r.stable == v {
            roles.push("stable".to_owned());
        }
        if let Some(c) = r.canary.as_ref().filter(|c| c.version == v) {
            roles.push(format!("canary {:.0}%", c.weight * 100.0));
        }
        if r.shadow.as_deref() == Some(v.as_str()) {
            roles.push("shadow".to_owned());
        }
        if r.refused.contains(&v) {
            roles.push("rolled back".to_owned());
        }
        let decision: Option<serde_json::Value> = repository
            .read(&format!("{v}/decision.json"))
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let holdout = decision.map_or_else(
            || "no decision (published by hand)".to_owned(),
            |d| {
                format!(
                    "holdout of {}: log loss {:.4}, AUC {:.4} (v{} had {:.4}, {:.4})",
                    d["holdout_examples"],
                    d["candidate"]["log_loss"].as_f64().unwrap_or(f64::NAN),
                    d["candidate"]["auc"].as_f64().unwrap_or(f64::NAN),
                    d["serving_version"].as_str().unwrap_or("?"),
                    d["serving"]["log_loss"].as_f64().unwrap_or(f64::NAN),
                    d["serving"]["auc"].as_f64().unwrap_or(f64::NAN),
                )
            },
        );
        println!("version {v:>4}  {:<18} {holdout}", roles.join(", "));
    }
    if let Some(w) = &r.watch {
        println!(
            "watching version {} against {} on labels for events scored since {}",
            w.version, w.baseline, w.since
        );
    }
    println!("rollout: {} ({})", r.reason, r.updated_at);
    ExitCode::SUCCESS
}
