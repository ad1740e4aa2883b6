use std::{fs, path::Path};

use super::*;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, text).unwrap();
    path
}

const SCHEMA: &str = r#"{"type":"object","required":["id","at"],"properties":{
    "id":{"type":"string"},"at":{"type":"string","format":"date-time"},
    "country":{"type":"string"},"amount":{"type":"number"}}}"#;

#[test]
fn every_shipped_pipeline_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let mut count = 0;
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let p = load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(p.parquet.is_some() || p.join.is_some() || p.train.is_some());
            count += 1;
        }
    }
    assert!(count > 0, "no pipelines shipped");
}

#[test]
fn a_good_file_builds_a_typed_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "s.json", SCHEMA);
    std::env::set_var("SLUICE_TEST_TOPIC", "events");
    let file = write(
        dir.path(),
        "p.toml",
        r#"
name = "p1"
schema = "s.json"
[source]
bootstrap_servers = "localhost:1"
topics = ["${SLUICE_TEST_TOPIC}"]
group_id = "${SLUICE_TEST_GROUP:-g}"
[source.properties]
"session.timeout.ms" = 6000
"check.crcs" = true
[errors]
dead_letter_topic = "dlq"
[sink.parquet]
path = "out"
partition_by = ["dt", "hour", "country"]
time_field = "at"
compression = "zstd:5"
max_file_size = "1MiB"
idle_flush = "250ms"
"#,
    );
    let p = load(&file).unwrap();
    assert_eq!(p.source.topics, ["events"]);
    assert_eq!(p.source.group_id, "g");
    assert_eq!(p.source.properties["session.timeout.ms"], "6000");
    assert_eq!(p.source.properties["check.crcs"], "true");
    let pq = p.parquet.unwrap();
    assert_eq!(pq.location, Location::Local(dir.path().join("out")));
    assert_eq!(
        pq.partition_by,
        [
            PartitionKey::Date,
            PartitionKey::Hour,
            PartitionKey::Field("country".into())
        ]
    );
    assert_eq!(pq.max_file_size, 1 << 20);
    assert_eq!(pq.idle_flush, Duration::from_millis(250));
    assert_eq!(
        pq.compression,
        Compression::ZSTD(ZstdLevel::try_new(5).unwrap())
    );
    assert!(matches!(p.errors.policy, ErrorPolicy::DeadLetter { ref topic, .. } if topic == "dlq"));
    assert_eq!(p.batch.max_rows, 10_000);
}

#[test]
fn every_problem_is_listed_with_its_key_path() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "s.json", SCHEMA);
    let file = write(
        dir.path(),
        "bad.toml",
        r#"
name = "bad name"
schema = "s.json"
colour = "blue"
[source]
bootstrap_servers = "localhost:1"
topics = ["t"]
group_id = "${SLUICE_SURELY_UNSET_VAR}"
start_from = "yesterday"
[source.properties]
"enable.auto.commit" = "true"
[batch]
max_rows = 0
max_delay = "soon"
[errors]
policy = "dead_letter"
[sink.parquet]
path = "ftp://host/x"
max_file_size = "big"
partition_by = ["dt", "colour"]
time_field = "amount"
compression = "brotli"
extra = 1
"#,
    );
    let err = load(&file).unwrap_err();
    let all = err.problems.join("\n");
    for expected in [
        "colour: unknown key",
        "sink.parquet.extra: unknown key",
        "name: \"bad name\" may only use",
        "source.group_id: environment variable SLUICE_SURELY_UNSET_VAR is not set",
        "source.start_from: expected \"earliest\" or \"latest\", got \"yesterday\"",
        "source.properties.enable.auto.commit: is set by sluice",
        "batch.max_rows: must be greater than 0",
        "batch.max_delay: expected a duration like \"500ms\"",
        "errors.dead_letter_topic: is required",
        "sink.parquet.path: unsupported scheme \"ftp\"",
        "sink.parquet.max_file_size: expected a size like \"128MiB\", got \"big\"",
        "sink.parquet.partition_by: `colour` is not a field of the schema",
        "sink.parquet.time_field: `amount` must be required and not nullable",
        "sink.parquet.compression: expected zstd",
    ] {
        assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
    }
    assert_eq!(err.problems.len(), 15, "{all}");
}

#[test]
fn schema_problems_and_missing_sections_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "s.json",
        r#"{"type":"object","properties":{"a":{"type":"string","pattern":"x"}}}"#,
    );
    let file = write(dir.path(), "p.toml", "name = \"p\"\nschema = \"s.json\"\n");
    let all = load(&file).unwrap_err().problems.join("\n");
    assert!(
        all.contains("schema: $.properties.a.pattern: unsupported keyword"),
        "{all}"
    );
    assert!(all.contains("source: is required"), "{all}");
    assert!(
        all.contains("errors.dead_letter_topic: is required"),
        "{all}"
    );
    assert!(all.contains("sink: at least one sink is required"), "{all}");
}

#[test]
fn syntax_errors_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "p.toml", "name = \n");
    let err = load(&file).unwrap_err();
    assert_eq!(err.problems.len(), 1);
}

#[test]
fn locations() {
    let base = Path::new("/etc/sluice");
    assert_eq!(
        location("data", base).unwrap(),
        Location::Local(base.join("data"))
    );
    assert_eq!(
        location("file:///x/y", base).unwrap(),
        Location::Local("/x/y".into())
    );
    assert!(matches!(
        location("s3://bucket/pre", base).unwrap(),
        Location::ObjectStore(_)
    ));
    assert!(location("s3:///nobucket", base).is_err());
}

#[test]
fn redis_sink_problems_are_listed_with_their_paths() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "s.json", SCHEMA);
    std::env::set_var("SLUICE_TEST_REDIS_PASSWORD", "hunter2");
    let file = write(
        dir.path(),
        "p.toml",
        r#"
name = "p"
schema = "s.json"
[source]
bootstrap_servers = "localhost:1"
topics = ["t"]
group_id = "g"
[errors]
policy = "skip"
[sink.redis]
url = "rediss://app:${SLUICE_TEST_REDIS_PASSWORD}@cache:6380#insecure"
time_field = "country"
[[sink.redis.views]]
name = "customer"
key = "cust:{nope}"
columns = ["amount", "_secret"]
field_names = { amount = "_amount", ghost = "g" }
field_ttl = { unknown = "1h" }
surprise = true
[[sink.redis.views]]
name = "customer_country"
key = "cust:{id}"
columns = ["country"]
[[sink.redis.views]]
name = "customer_amount"
key = "cust:{id}"
columns = ["amount"]
"#,
    );
    let err = load(&file).unwrap_err();
    let all = err.problems.join("\n");
    for expected in [
        "sink.redis.url: `#insecure` turns off TLS certificate checks and is refused",
        "sink.redis.time_field: `country` must be required and not nullable",
        "sink.redis.views[0].key: `nope` is not a field of the schema",
        "sink.redis.views[0].columns: `_secret` is not a field of the schema",
        "sink.redis.views[0].columns: hash field `_amount`: names starting with `_` are reserved",
        "sink.redis.views[0].field_names.ghost: is not in `columns`",
        "sink.redis.views[0].field_ttl.unknown: is not a hash field of this view",
        "sink.redis.views.0.surprise: unknown key",
        // Review finding A8.2: two views on one hash would starve each other's fields.
        "sink.redis.views[2].key: is the key template of views[1] (\"customer_country\") too",
    ] {
        assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
    }
    assert!(
        !all.contains("hunter2"),
        "a secret leaked into the problems:\n{all}"
    );
}

#[test]
fn a_redis_only_pipeline_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "s.json", SCHEMA);
    let file = write(
        dir.path(),
        "p.toml",
        r#"
name = "p"
schema = "s.json"
[source]
bootstrap_servers = "localhost:1"
topics = ["t"]
group_id = "g"
[errors]
policy = "skip"
[sink.redis]
url = "redis://localhost:6379"
time_field = "at"
[[sink.redis.views]]
name = "customer"
key = "cust:{id}"
prefix_keys = true
columns = ["amount", "country"]
ttl = "1d"
"#,
    );
    let p = load(&file).unwrap();
    assert!(p.parquet.is_none());
    let redis = p.redis.unwrap();
    assert_eq!(redis.views[0].key[0], KeyPart::Text("customer:".into()));
    assert_eq!(redis.views[0].ttl, Some(Duration::from_secs(86_400)));
    assert_eq!(redis.max_event_time_skew, Duration::from_secs(3_600));
    assert_eq!(redis.aggregate_cache, 64 << 20, "the default");
}

/// Review finding A8.4: with `field_ttl` and no `ttl`, the guard fields (`_ts`, …) would never
/// expire; the hash expires with its longest-lived field instead.
#[test]
fn field_ttls_without_a_ttl_expire_the_hash_with_its_last_field() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "s.json", SCHEMA);
    let file = write(
        dir.path(),
        "p.toml",
        r#"
name = "p"
schema = "s.json"
[source]
bootstrap_servers = "localhost:1"
topics = ["t"]
group_id = "g"
[errors]
policy = "skip"
[sink.redis]
url = "redis://localhost:6379"
time_field = "at"
max_event_time_skew = "5m"
aggregate_cache = "0"
[[sink.redis.views]]
name = "customer"
key = "cust:{id}"
columns = ["amount", "country"]
field_ttl = { amount = "10m", country = "2h" }
"#,
    );
    let redis = load(&file).unwrap().redis.unwrap();
    assert_eq!(redis.views[0].ttl, Some(Duration::from_secs(7_200)));
    assert_eq!(redis.max_event_time_skew, Duration::from_secs(300));
    assert_eq!(redis.aggregate_cache, 0);
}

#[test]
fn model_breaker_settings_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "s.json", SCHEMA);
    let model = |rate: &str, rows: &str| {
        format!(
            r#"
name = "p"
schema = "s.json"
[source]
bootstrap_servers = "localhost:1"
topics = ["t"]
group_id = "g"
[errors]
dead_letter_topic = "t.dlq"
[[model]]
name = "m"
path = "m.pt"
inputs = [{{ column = "amount" }}]
output = {{ kind = "score" }}
output_topic = "t.scores"
key = "{{id}}"
{rate}
{rows}
"#
        )
    };
    // Only the path is checked here; loading the model is `validate`'s job.
    write(dir.path(), "m.pt", "");
    let file = write(
        dir.path(),
        "bad.toml",
        &model("breaker_failure_rate = 1.5", "breaker_min_rows = 0"),
    );
    let err = load(&file).unwrap_err();
    let all = err.problems.join("\n");
    assert!(
        all.contains("model[0].breaker_failure_rate: must be above 0 and at most 1, got 1.5"),
        "{all}"
    );
    assert!(
        all.contains("model[0].breaker_min_rows: must be greater than 0"),
        "{all}"
    );
    let file = write(dir.path(), "good.toml", &model("", ""));
    let p = load(&file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        p.models[0].breaker,
        BreakerSpec {
            failure_rate: 0.5,
            min_rows: 100
        }
    );
}

/// Review finding A11: a file larger than 10,000 parts of an upload would fail only when it is
/// finished; on an object store, `max_file_size` is bounded at validation.
#[test]
fn max_file_size_is_bounded_on_object_stores() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "s.json", SCHEMA);
    let pipeline = |path: &str, size: &str| {
        write(
            dir.path(),
            "p.toml",
            &format!(
                r#"
name = "p"
schema = "s.json"
[source]
bootstrap_servers = "localhost:1"
topics = ["t"]
group_id = "g"
[errors]
policy = "skip"
[sink.parquet]
path = "{path}"
max_file_size = "{size}"
"#
            ),
        )
    };
    let err = load(&pipeline("s3://bucket/x", "200GiB")).unwrap_err();
    assert_eq!(
        err.problems,
        ["sink.parquet.max_file_size: at most 156 GiB on an object store (10000 parts of 16 MiB)"]
    );
    load(&pipeline("s3://bucket/x", "1GiB")).unwrap();
    load(&pipeline("out", "200GiB")).unwrap();
}

const JOIN: &str = r#"
name = "fraud_join"
[source]
bootstrap_servers = "localhost:1"
group_id = "g"
[errors]
dead_letter_topic = "labels.dlq"
[join]
model = "fraud"
feedback_topic = "fraud.feedback"
labels_topic = "fraud.labels"
examples_topic = "fraud.examples"
maturity = "10m"
[join.redis]
url = "redis://127.0.0.1:6379"
"#;

#[test]
fn a_join_pipeline_consumes_feedback_and_labels_with_the_built_in_schema() {
    let dir = tempfile::tempdir().unwrap();
    let p = load(&write(dir.path(), "j.toml", JOIN)).unwrap();
    assert_eq!(p.source.topics, ["fraud.feedback", "fraud.labels"]);
    let j = p.join.unwrap();
    assert_eq!(j.maturity, Duration::from_secs(600));
    assert_eq!(j.unlabelled, Unlabelled::Default(0.0));
    assert_eq!((j.grace, j.shards), (Duration::from_secs(60), 16));
    for field in [
        "event_id",
        "features",
        "outputs",
        "model_version",
        "label",
        "labelled_at",
    ] {
        assert!(p.schema.field(field).is_some(), "{field}");
    }
}

#[test]
fn a_broken_join_pipeline_names_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "s.json", SCHEMA);
    let text = JOIN
        .replace("name = \"fraud_join\"", "name = \"j\"\nschema = \"s.json\"")
        .replace("group_id = \"g\"", "group_id = \"g\"\ntopics = [\"x\"]")
        .replace(
            "maturity = \"10m\"",
            "unlabelled = \"drop\"\ndefault_label = 1.0\ngrace = \"0s\"",
        )
        .replace(
            "examples_topic = \"fraud.examples\"",
            "examples_topic = \"fraud.labels\"",
        )
        .replace("url = \"redis://127.0.0.1:6379\"", "url = \"http://h\"")
        + "[sink.parquet]\npath = \"out\"\n";
    let e = load(&write(dir.path(), "j.toml", &text)).unwrap_err();
    let all = e.problems.join("\n");
    for expected in [
        "schema: a join file reads feedback records and labels",
        "source.topics: a join pipeline consumes join.feedback_topic and join.labels_topic",
        "join.maturity: is required",
        "join.default_label: is only used with unlabelled = \"default\"",
        "join.grace: must be greater than 0",
        "join.examples_topic: must differ from the feedback and labels topics",
        "join.redis.url: unsupported scheme \"http\"",
        "join: a join pipeline produces examples only",
    ] {
        assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
    }
    let skip = JOIN.replace("dead_letter_topic = \"labels.dlq\"", "policy = \"skip\"");
    let e = load(&write(dir.path(), "k.toml", &skip)).unwrap_err();
    assert!(e
        .problems
        .join("\n")
        .contains("errors.policy: a join pipeline needs \"dead_letter\""));
}

#[test]
fn a_trainer_file_consumes_its_examples_and_names_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("models/fraud/1")).unwrap();
    let good = r#"
name = "fraud_trainer"
[source]
bootstrap_servers = "localhost:1"
group_id = "t"
[train]
model = "fraud"
repository = "models/fraud"
examples_topic = "fraud.examples"
optimizer = "sgd"
momentum = 0.9
"#;
    let p = load(&write(dir.path(), "t.toml", good)).unwrap();
    assert_eq!(p.source.topics, ["fraud.examples"]);
    assert!(matches!(p.errors.policy, ErrorPolicy::Skip));
    let t = p.train.unwrap();
    assert_eq!(t.optimizer, OptimizerSpec::Sgd { momentum: 0.9 });
    assert_eq!((t.batch_size, t.epochs, t.holdout), (64, 1, 0.2));
    assert_eq!(t.gates.min_examples, 200);
    // Numbers may come from the environment.
    std::env::set_var("SLUICE_TEST_EPOCHS", "3");
    let from_env = good.replace("momentum = 0.9", "momentum = 0.9\nepochs = \"${SLUICE_TEST_EPOCHS}\"\nbatch_size = \"${SLUICE_TEST_UNSET_BATCH:-16}\"");
    let t = load(&write(dir.path(), "e.toml", &from_env))
        .unwrap()
        .train
        .unwrap();
    assert_eq!((t.epochs, t.batch_size), (3, 16));
    let literal = good.replace("momentum = 0.9", "momentum = 0.9\nepochs = \"3\"");
    let e = load(&write(dir.path(), "l.toml", &literal)).unwrap_err();
    assert!(
        e.problems[0].contains("train.epochs: invalid type: string \"3\""),
        "{e}"
    );

    let bad = good.replace("models/fraud\"", "models/none\"").replace(
        "optimizer = \"sgd\"",
        "optimizer = \"adam\"\nholdout = 1.5\nlearning_rate = 0.0",
    ) + "[errors]\ndead_letter_topic = \"x\"\n";
    let e = load(&write(dir.path(), "u.toml", &bad)).unwrap_err();
    let all = e.problems.join("\n");
    for expected in [
        "train.repository: ",
        "train.momentum: is only used with optimizer = \"sgd\"",
        "train.holdout: must be between 0 and 1",
        "train.learning_rate: must be greater than 0",
        "errors: a trainer produces no dead letters",
    ] {
        assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
    }

    // Rollout: the default promotes; a canary takes its weight; the rest is named.
    assert_eq!(t.rollout, RolloutSpec::Promote);
    assert_eq!((t.watch_examples, t.threads), (200, 1));
    let canary = good.replace(
        "momentum = 0.9",
        "momentum = 0.9\nrollout = \"canary\"\ncanary_weight = 0.25\nwatch_examples = 50",
    );
    let t = load(&write(dir.path(), "c.toml", &canary))
        .unwrap()
        .train
        .unwrap();
    assert_eq!(t.rollout, RolloutSpec::Canary { weight: 0.25 });
    assert_eq!(t.watch_examples, 50);
    let on_s3 = good.replace(
        "repository = \"models/fraud\"",
        "repository = \"s3://models/fraud\"\nstorage_options = { aws_region = \"eu-west-1\" }",
    );
    let t = load(&write(dir.path(), "s.toml", &on_s3))
        .unwrap()
        .train
        .unwrap();
    match &t.repository {
        RepositoryLocation::Store { url, options, .. } => {
            assert_eq!(url.as_str(), "s3://models/fraud");
            assert_eq!(options["aws_region"], "eu-west-1");
        }
        other => panic!("{other:?}"),
    }
    let bad = good.replace(
        "momentum = 0.9",
        "momentum = 0.9\nrollout = \"blue-green\"\ncanary_weight = 2.0\nthreads = 0",
    );
    let e = load(&write(dir.path(), "r.toml", &bad)).unwrap_err();
    let all = e.problems.join("\n");
    for expected in [
        "train.rollout: expected \"promote\", \"canary\" or \"shadow\", got \"blue-green\"",
        "train.canary_weight: must be in (0, 1], got 2",
        "train.threads: ",
    ] {
        assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
    }
}

const REDIS_HEAD: &str = r#"
name = "p"
schema = "s.json"
[source]
bootstrap_servers = "localhost:1"
topics = ["t"]
group_id = "g"
[errors]
policy = "skip"
[sink.redis]
url = "redis://localhost:6379"
time_field = "at"
"#;

/// A folder with the schema and a model repository `m` (validation does not load the model).
fn with_model_repository() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "s.json", SCHEMA);
    fs::create_dir_all(dir.path().join("m/1")).unwrap();
    fs::write(dir.path().join("m/1/model.pt"), b"not loaded by validation").unwrap();
    dir
}

#[test]
fn an_aggregate_view_and_a_model_input_from_it() {
    let dir = with_model_repository();
    let file = write(
        dir.path(),
        "p.toml",
        &format!(
            r#"{REDIS_HEAD}
[[sink.redis.aggregates]]
name = "velocity"
key = "vel:{{id}}"
bucket = "1m"
windows = ["24h", "1h"]
lateness = "5m"
features = [
  {{ name = "orders", function = "count" }},
  {{ name = "fr", function = "count", column = "country", equals = "FR" }},
  {{ name = "amount_avg", function = "avg", column = "amount" }},
  {{ name = "amount_max", function = "max", column = "amount" }},
]
[[model]]
name = "m"
path = "m"
output_topic = "out"
key = "{{id}}"
output = {{ kind = "score" }}
inputs = [{{ column = "amount", null = 0.0 }}, {{ aggregate = "velocity.orders_1h", null = 0.0 }}]
"#
        ),
    );
    let p = load(&file).unwrap_or_else(|e| panic!("{e}"));
    let a = &p.redis.as_ref().unwrap().aggregates[0];
    assert_eq!(
        a.windows,
        [
            ("1h".to_owned(), Duration::from_secs(3_600)),
            ("24h".to_owned(), Duration::from_secs(86_400))
        ],
        "shortest first"
    );
    assert_eq!(
        a.description(),
        "60000;n,c:fr,s:amount,k:amount,hi:amount",
        "the partials, each once"
    );
    // The longest window, the lateness and a bucket, rounded up to whole seconds.
    assert_eq!(a.ttl.as_secs(), 86_400 + 300 + 60);
    assert_eq!(a.feature_names()[..2], ["orders_1h", "orders_24h"]);
    let input = &p.models[0].inputs[1];
    assert!(input.redis && input.column == "velocity.orders_1h");
}

#[test]
fn aggregate_problems_are_listed_with_their_paths() {
    let dir = with_model_repository();
    let file = write(
        dir.path(),
        "p.toml",
        &format!(
            r#"{REDIS_HEAD}
[[sink.redis.aggregates]]
name = "velocity"
key = "vel:{{id}}"
bucket = "7m"
windows = ["1h", "1h", "soon"]
ttl = "10m"
features = [
  {{ name = "orders", function = "count", column = "country" }},
  {{ name = "total", function = "sum", column = "country" }},
  {{ name = "x", function = "median", column = "amount" }},
  {{ name = "y", function = "avg" }},
]
[[model]]
name = "m"
path = "m"
output_topic = "out"
inputs = [{{ aggregate = "velocity.orders_2h" }}, {{ latest = "customer.country" }}]
[[sink.redis.views]]
name = "customer"
key = "cust:{{id}}"
columns = ["country", "amount"]
"#
        ),
    );
    let all = load(&file).unwrap_err().problems.join("\n");
    for expected in [
        "sink.redis.aggregates[0].windows[0]: \"1h\" is not a whole number of buckets (7m)",
        "sink.redis.aggregates[0].windows[1]: \"1h\" is listed twice",
        "sink.redis.aggregates[0].windows[2]: expected a duration",
        "sink.redis.aggregates[0].ttl: 10m is shorter than the longest window",
        "sink.redis.aggregates[0].features[0]: `count` takes no column, or a `column` and the value it `equals`",
        "sink.redis.aggregates[0].features[1].column: `country` is not an integer or number field",
        "sink.redis.aggregates[0].features[2].function: expected \"count\", \"sum\", \"avg\", \"min\" or \"max\", got \"median\"",
        "sink.redis.aggregates[0].features[3].column: is required for this function",
        "model[0].inputs[0].aggregate: \"velocity.orders_2h\" is not a feature of an aggregate view",
        "model[0].inputs[1].latest: \"customer.country\" is not a number or boolean field of a view (write \"<view>.<hash field>\") in [sink.redis] (there are: customer.amount)",
    ] {
        assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
    }
}
