//! Models for the tests: TorchScript files written by PyTorch (`integration-tests/models.py`),
//! model repositories, and a scoring pipeline on the test schema.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use super::*;

pub fn models_py() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("integration-tests/models.py")
}

/// Runs `models.py` with `args`.
pub fn python(args: &[&str]) -> String {
    run_ok(
        Command::new("python3").arg(models_py()).args(args),
        &format!("models.py {args:?} (python3 with torch)"),
    )
}

/// Writes a model version into a repository, as a trainer would (write, then rename).
pub fn publish(repo: &Path, version: u32, kind: &str, seed: u32) -> PathBuf {
    let dir = repo.join(version.to_string());
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.pt");
    python(&[kind, path.to_str().unwrap(), "--seed", &seed.to_string()]);
    path
}

/// A scoring pipeline on the test schema: Parquet, dead letters, and one model.
pub struct Scoring {
    pub p: TestPipeline,
    pub repo: PathBuf,
    pub predictions: String,
    pub feedback: String,
}

pub fn scoring(broker: &Broker, kind: &str) -> Scoring {
    let predictions = unique("predictions");
    let feedback = format!("{predictions}.feedback");
    broker.create_topic(&predictions, 2);
    broker.create_topic(&feedback, 1);
    let p = TestPipeline::new(
        broker,
        3,
        &format!(
            r#"idle_flush = "300ms"
[[model]]
name = "risk"
path = "models/risk"
device = "auto"
max_batch = 64
max_delay = "1ms"
# One micro-batch (max_rows = 500): admitting the next batch must not wait on this task.
queue_rows = 500
reload_interval = "200ms"
output_topic = "{predictions}"
feedback_topic = "{feedback}"
key = "{{customer}}"
id_column = "id"
pass_through = ["customer", "amount"]
inputs = [
  {{ column = "amount" }},
  {{ column = "currency", one_hot = ["EUR", "USD"] }},
  {{ column = "at", extract = "hour" }},
]
output = {{ kind = "score" }}
"#
        ),
    );
    let repo = p.dir.path().join("models/risk");
    publish(&repo, 1, kind, 1);
    Scoring {
        p,
        repo,
        predictions,
        feedback,
    }
}

/// `sluice model ARGS…` (the operator's command), which must exit 0; what it printed.
pub fn sluice_model(args: &[&str]) -> String {
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("model")
            .args(args),
        &format!("sluice model {args:?}"),
    )
}

/// 32-bit FNV-1a, from its published definition: the test's own account of which entities a
/// canary of `weight` serves (the first `weight` of 10,000 buckets).
pub fn in_canary(key: &str, weight: f64) -> bool {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    f64::from(h % 10_000) < weight * 10_000.0
}
