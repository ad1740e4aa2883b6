//! # sluice
//!
//! Business events on Kafka → schema-validated Arrow batches → exactly-once Parquet,
//! replay-safe online features in Redis and libtorch predictions, with a dead-letter topic for
//! everything that cannot be used.
//!
//! The modules follow the data flow:
//!
//! ```text
//!  config ──▶ pipeline (wiring, the commit protocol, the watchdog)
//!                │
//!  source ──▶ decode ──▶ batches ──▶ sink::redis        (latest values, never rolled back;
//!  (Kafka)   (schema)      │    │                        windowed aggregates, exactly once)
//!                          │    ├──▶ score ──▶ sink::predictions (models, at least once;
//!                          │    │     ▲                   inputs may be Redis aggregates)
//!                          │    │     └── aggregates at each event's time, when models use them
//!                          │    ├──▶ sink::parquet      (files, exactly once)
//!                          │    ├──▶ sink::join         (feedback + labels → examples)
//!                          │    └──▶ sink::dead_letter  (rejected events, at least once)
//!                          └─ offsets committed only when every sink has made them durable
//!
//!  examples ──▶ train (sluice train: rounds, gates) ──▶ the model repository ──▶ score
//!
//!  requests (REST, gRPC) ──▶ serve ──▶ decode, sink::redis (read only) ──▶ score ──▶ replies
//! ```
//!
//! Every stage speaks the types of [`event`] (a leaf: it imports no other module), so no
//! stage reaches into another; a test below keeps the module graph free of cycles.
//!
//! - [`event`]: the types that flow between stages: batches, spans, rejected events and why.
//! - [`config`]: pipeline TOML files → validated [`config::Pipeline`] specs.
//! - [`schema`]: the JSON Schema subset → validator + Arrow schema.
//! - [`source`]: the Kafka consumer thread: polling, micro-batching, rebalances, backpressure.
//! - [`decode`]: JSON payloads → Arrow columns, per-record rejection with a reason.
//! - [`score`]: TorchScript models on their own threads: batching, versions (stable, canary,
//!   shadow: the repository's rollout), the breaker.
//! - [`serve`]: the inference API (Open Inference Protocol over REST and gRPC): requests
//!   scored by the same models, encoding and Redis features as the stream.
//! - [`sink`]: where batches go: [`sink::redis`], [`sink::parquet`], [`sink::dead_letter`],
//!   [`sink::predictions`] and [`sink::join`] (the label join of the learning loop).
//! - [`pipeline`]: owns the tasks, the per-partition offset tracking and the commit protocol;
//!   [`pipeline::PipelineError`] is why a pipeline stopped, with the exit code it means.
//! - [`failure`]: the failure model: transient, per-record or fatal, and the one retry loop.
//! - [`train`]: the trainer (`sluice train`): rounds of fine-tuning, holdout metrics, gates,
//!   publication of the next version, and the watch that promotes or rolls it back.
//! - [`telemetry`]: logs, Prometheus metrics, `/healthz`, `/readyz` ([`telemetry::health`]).
//! - [`util`]: the text form of scalar values and key templates, and the stable routing hash,
//!   shared by sinks and models.

pub mod config;
pub mod decode;
pub mod event;
pub mod failure;
pub mod pipeline;
pub mod schema;
pub mod score;
pub mod serve;
pub mod sink;
pub mod source;
pub mod telemetry;
pub mod train;
pub mod util;

/// The layout is part of the design: these tests keep the module map above current and the
/// modules free of import cycles.
#[cfg(test)]
mod layout {
    use std::{
        collections::{BTreeMap, BTreeSet},
        fs,
        path::Path,
    };

    /// Top-level module → the top-level modules its code names through `crate::`.
    fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut graph = BTreeMap::new();
        let mut stack = vec![src.clone()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let rel = path
                    .strip_prefix(&src)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                if path.is_dir() {
                    if rel != "bin" {
                        stack.push(path);
                    }
                    continue;
                }
                if rel == "lib.rs" || rel == "main.rs" || !rel.ends_with(".rs") {
                    continue;
                }
                let module = rel.split('/').next().unwrap().trim_end_matches(".rs");
                let deps: &mut BTreeSet<String> = graph.entry(module.to_owned()).or_default();
                let code: String = fs::read_to_string(&path)
                    .unwrap()
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("//"))
                    .collect::<Vec<_>>()
                    .join("\n");
                for (at, _) in code.match_indices("crate::") {
                    deps.extend(first_segments(&code[at + "crate::".len()..]));
                }
                deps.remove(module);
            }
        }
        graph
    }

    /// `config::X` → `config`; `{config::X, event::{A, B}}` → `config`, `event`.
    fn first_segments(path: &str) -> Vec<String> {
        let word = |s: &str| {
            s.trim_start()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect::<String>()
        };
        let Some(group) = path.strip_prefix('{') else {
            return vec![word(path)];
        };
        let (mut depth, mut item, mut out) = (0, String::new(), Vec::new());
        for c in group.chars() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    out.push(word(&item));
                    item.clear();
                    continue;
                }
                _ => {}
            }
            item.push(c);
        }
        out.push(word(&item));
        out.retain(|w| !w.is_empty());
        out
    }

    #[test]
    fn modules_have_no_import_cycles() {
        let graph = dependencies();
        assert!(graph.contains_key("event") && graph.contains_key("pipeline"));
        // Depth-first search; a module met again on the current path closes a cycle.
        fn visit<'a>(
            m: &'a str,
            graph: &'a BTreeMap<String, BTreeSet<String>>,
            path: &mut Vec<&'a str>,
            done: &mut BTreeSet<&'a str>,
        ) {
            if let Some(at) = path.iter().position(|p| *p == m) {
                panic!("import cycle: {} -> {m}", path[at..].join(" -> "));
            }
            if !done.insert(m) {
                return;
            }
            path.push(m);
            for d in graph.get(m).into_iter().flatten() {
                visit(d, graph, path, done);
            }
            path.pop();
        }
        let mut done = BTreeSet::new();
        for m in graph.keys() {
            visit(m, &graph, &mut Vec::new(), &mut done);
        }
        // The leaf holds types only.
        assert_eq!(graph["event"], BTreeSet::new(), "event is a leaf");
    }

    #[test]
    fn the_module_map_names_every_module() {
        let doc = include_str!("lib.rs");
        for m in dependencies().keys() {
            assert!(
                doc.contains(&format!("pub mod {m};")) && doc.contains(&format!("[`{m}`]")),
                "src/lib.rs: module {m} is missing from the module map"
            );
        }
    }

    #[test]
    fn segments_of_a_use_group() {
        assert_eq!(first_segments("config::X;"), ["config"]);
        assert_eq!(
            first_segments("{\n    config::{A, B},\n    event::Rejected,\n    util,\n};"),
            ["config", "event", "util"]
        );
    }
}
