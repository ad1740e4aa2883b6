//! Black-box tests of the inference API: the real `sluice` binary serving the Open Inference
//! Protocol over REST and gRPC beside its pipeline, a real broker and `redis-server`, and real
//! clients from PyPI (`tritonclient`'s HTTP and gRPC clients, PyTorch for the reference
//! outputs), driven by `integration-tests/inference.py`.

mod common;

use std::{path::Path, process::Command, time::Duration};

use common::*;

const DRAIN: Duration = Duration::from_secs(120);

fn inference_py() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("integration-tests/inference.py")
}

/// Runs `inference.py ARGS…` (tritonclient, PyTorch), which must exit 0; its JSON answer.
fn client(args: &[&str]) -> serde_json::Value {
    let out = run_ok(
        Command::new("python3").arg(inference_py()).args(args),
        &format!("inference.py {args:?}"),
    );
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// A running `sluice` with the inference API on two free ports.
struct Serving {
    sluice: KillOnDrop,
    http: String,
    grpc: String,
    metrics: u16,
}

/// Starts `sluice run` on `p` with the inference API, and waits until it is ready.
fn serve(p: &TestPipeline, log: &str) -> Serving {
    let (http, grpc, metrics) = (free_port(), free_port(), free_port());
    let (h, g) = (format!("127.0.0.1:{http}"), format!("127.0.0.1:{grpc}"));
    let sluice = p.spawn_with(
        log,
        &format!("127.0.0.1:{metrics}"),
        &[("SLUICE_INFERENCE_HTTP", &h), ("SLUICE_INFERENCE_GRPC", &g)],
    );
    let started = std::time::Instant::now();
    // Until it listens, and then until it is ready.
    while std::net::TcpStream::connect(("127.0.0.1", http)).is_err()
        || http_get(http, "/v2/health/ready").0 != 200
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the inference API never became ready:\n{}",
            p.log(log)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Serving {
        sluice,
        http: h,
        grpc: g,
        metrics,
    }
}

/// Valid test events, one per line, as JSON.
fn events_file(dir: &Path, range: std::ops::Range<u64>) -> String {
    let path = dir.join(format!("events-{}-{}.jsonl", range.start, range.end));
    let lines: Vec<String> = range
        .map(event)
        .filter(|e| e.invalid.is_none())
        .map(|e| String::from_utf8(e.payload).unwrap())
        .collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    path.to_str().unwrap().to_owned()
}

/// tritonclient over HTTP (binary and JSON tensors) and gRPC (raw contents) gets what PyTorch
/// computes on the same inputs: the model's tensor as given, and events' fields (or whole JSON
/// events) through the pipeline's own feature encoding. Malformed requests get 400 /
/// `INVALID_ARGUMENT` with a reason, unknown models and versions 404 / `NOT_FOUND`; the
/// requests are counted per protocol in `/metrics`.
#[test]
fn tritonclient_over_http_and_grpc_gets_pytorch_s_outputs() {
    let broker = Broker::start();
    let s = scoring(&broker, "linear");
    let api = serve(&s.p, "run.log");
    let events = events_file(s.p.dir.path(), 0..40);
    let model = s.repo.join("1/model.pt");
    let got = client(&[
        "outputs",
        &api.http,
        &api.grpc,
        model.to_str().unwrap(),
        &events,
    ]);
    for key in [
        "http_tensor_max_diff",
        "grpc_tensor_max_diff",
        "http_fields_max_diff",
        "grpc_fields_max_diff",
        "http_event_max_diff",
        "grpc_event_max_diff",
        "http_json_max_diff",
    ] {
        let diff = got[key].as_f64().unwrap_or_else(|| panic!("{key}: {got}"));
        assert!(diff <= 1e-6, "{key} = {diff}: {got}");
    }
    assert_eq!(got["http_version"], "1");
    assert_eq!(got["grpc_version"], "1");

    let errors = client(&["errors", &api.http, &api.grpc]);
    let status = |k: &str| {
        (
            errors[k][0].as_u64().unwrap(),
            errors[k][1].as_str().unwrap().to_owned(),
        )
    };
    for (case, code, reason) in [
        ("not_json", 400, "not JSON"),
        ("wrong_width", 400, "takes 4"),
        ("shape_mismatch", 400, "holds 8 values"),
        ("unknown_field", 400, "not a field"),
        ("invalid_event", 400, "row 0"),
        ("binary_too_short", 400, "binary_data_size"),
        ("unknown_model", 404, "not served"),
        ("unknown_version", 404, "no version \"99\""),
    ] {
        let (got, why) = status(case);
        assert_eq!(got, code, "{case}: {why}");
        assert!(
            why.contains(reason),
            "{case}: {why:?} should say {reason:?}"
        );
    }
    for (case, code) in [
        ("grpc_wrong_width", "INVALID_ARGUMENT"),
        ("grpc_unknown_model", "NOT_FOUND"),
        ("grpc_unknown_version", "NOT_FOUND"),
        ("grpc_metadata_unknown", "NOT_FOUND"),
    ] {
        assert_eq!(errors[case], code, "{case}: {errors}");
    }
    let metrics = http_get(api.metrics, "/metrics").1;
    for needle in [
        r#"sluice_inference_requests_total{model="risk",protocol="http",result="ok"}"#,
        r#"sluice_inference_requests_total{model="risk",protocol="grpc",result="ok"}"#,
        r#"sluice_inference_requests_total{model="risk",protocol="http",result="bad_request"}"#,
        r#"sluice_inference_request_seconds_bucket{model="risk",protocol="grpc""#,
    ] {
        assert!(metrics.contains(needle), "{needle} in:\n{metrics}");
    }
    let mut sluice = api.sluice;
    s.p.stop(&mut sluice, "run.log");
}

/// A request is scored as its entity's next event: with aggregates and a latest value from
/// Redis among its inputs, an event sent by its fields gets the same score as the same event
/// produced to Kafka right after (each customer's history is on the stream first).
#[test]
fn a_request_scores_as_the_same_event_on_the_stream() {
    let broker = Broker::start();
    let redis = RedisServer::start(&[]);
    let s = scoring(&broker, "weighted");
    let mut text = std::fs::read_to_string(&s.p.file).unwrap();
    // The model's inputs: the event's, three aggregates and the previous amount.
    text = text.replace(
        r#"  { column = "at", extract = "hour" },
]"#,
        r#"  { column = "at", extract = "hour" },
  { aggregate = "velocity.orders_6h", null = -1.0 },
  { aggregate = "velocity.amount_sum_6h", null = -1.0 },
  { aggregate = "velocity.amount_max_1h", null = -1.0 },
  { latest = "customer.amount", null = -1.0 },
]"#,
    );
    let model_at = text.find("[[model]]").unwrap();
    text.insert_str(
        model_at,
        &format!(
            r#"[sink.redis]
url = "{}"
time_field = "at"
[[sink.redis.views]]
name = "customer"
key = "cust:{{customer}}"
columns = ["amount"]
[[sink.redis.aggregates]]
name = "velocity"
key = "vel:{{customer}}"
bucket = "1m"
windows = ["1h", "6h"]
lateness = "10m"
features = [
  {{ name = "orders", function = "count" }},
  {{ name = "amount_sum", function = "sum", column = "amount" }},
  {{ name = "amount_max", function = "max", column = "amount" }},
]
"#,
            redis.url()
        ),
    );
    std::fs::write(&s.p.file, text).unwrap();
    let api = serve(&s.p, "run.log");
    // History: events 0..400 (97 customers, a minute apart).
    produce(&broker, &s.p.topic, 0..400);
    s.p.wait_drained(&broker, DRAIN);
    // Then one new event per customer: first as a request, then on the stream.
    let fresh: Vec<u64> = (400..497).collect();
    let file = s.p.dir.path().join("fresh.jsonl");
    let lines: Vec<String> = fresh
        .iter()
        .map(|n| event(*n))
        .filter(|e| e.invalid.is_none())
        .map(|e| String::from_utf8(e.payload).unwrap())
        .collect();
    std::fs::write(&file, lines.join("\n")).unwrap();
    let requested = client(&["score", &api.http, &api.grpc, file.to_str().unwrap()]);
    let requested = requested.as_object().unwrap();
    assert!(requested.len() > 50, "{requested:?}");
    produce(&broker, &s.p.topic, 400..497);
    s.p.wait_drained(&broker, DRAIN);
    let mut sluice = api.sluice;
    s.p.stop(&mut sluice, "run.log");
    let mut compared = 0;
    for r in broker.read_all(&s.predictions) {
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        let id = v["event_id"].as_str().unwrap();
        if let Some(want) = requested.get(id) {
            let got = v["outputs"]["score"].as_f64().unwrap();
            assert!(
                (got - want.as_f64().unwrap()).abs() <= 1e-6,
                "{id}: the stream scored {got}, the request {want}"
            );
            compared += 1;
        }
    }
    assert_eq!(
        compared,
        requested.len(),
        "every requested event scored on the stream"
    );
    // The history mattered: the requests' features held aggregates (not the null -1).
    let feedback = broker.read_all(&s.feedback);
    let with_history = feedback
        .iter()
        .filter_map(|r| serde_json::from_slice::<serde_json::Value>(&r.payload).ok())
        .filter(|v| requested.contains_key(v["event_id"].as_str().unwrap_or_default()))
        .filter(|v| v["features"][4].as_f64().unwrap_or(0.0) > 1.0)
        .count();
    assert!(with_history > 50, "events with history: {with_history}");
}

/// A burst of requests beyond the model's capacity for requests (a slow model, three rows of
/// requests admitted at once) is refused at once with 429 and a retry hint over HTTP and
/// `RESOURCE_EXHAUSTED` over gRPC; every request is answered, none hangs. A request whose
/// deadline passes in the queue gets 504.
#[test]
fn a_burst_beyond_capacity_is_refused_at_once_never_queued() {
    let broker = Broker::start();
    let s = scoring(&broker, "slow");
    s.p.edit("max_batch = 64", "max_batch = 2");
    let mut text = std::fs::read_to_string(&s.p.file).unwrap();
    text.push_str("\n[model.serving]\nqueue_rows = 3\ntimeout = \"30s\"\n");
    std::fs::write(&s.p.file, text).unwrap();
    let api = serve(&s.p, "run.log");
    let got = client(&["burst", &api.http, &api.grpc, "24"]);
    let counts = &got["counts"];
    let n = |proto: &str, code: &str| counts[proto][code].as_u64().unwrap_or(0);
    assert_eq!(n("http", "200") + n("http", "429"), 24, "{got}");
    assert_eq!(
        n("grpc", "OK") + n("grpc", "RESOURCE_EXHAUSTED"),
        24,
        "{got}"
    );
    assert!(
        n("http", "429") > 0 && n("grpc", "RESOURCE_EXHAUSTED") > 0,
        "{got}"
    );
    assert!(n("http", "200") + n("grpc", "OK") > 0, "{got}");
    assert!(
        got["retry_after_ms"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h.as_u64().unwrap() >= 1),
        "{got}"
    );
    let metrics = http_get(api.metrics, "/metrics").1;
    assert!(
        metrics.contains(r#"sluice_inference_rejections_total{model="risk",reason="overloaded"}"#),
        "{metrics}"
    );

    // A deadline shorter than the slow model's pass, behind a request that holds it.
    let slow = std::thread::spawn({
        let http = api.http.clone();
        move || {
            post_json(
                &http,
                "/v2/models/risk/infer",
                r#"{"inputs":[{"name":"features","datatype":"FP32","shape":[2,4],"data":[1,0,0,1,2,0,0,3]}]}"#,
            )
        }
    });
    std::thread::sleep(Duration::from_millis(50));
    let (code, body) = post_json(
        &api.http,
        "/v2/models/risk/infer",
        r#"{"inputs":[{"name":"features","datatype":"FP32","shape":[1,4],"data":[1,0,0,1]}],
            "parameters":{"timeout":1000}}"#,
    );
    assert_eq!(code, 504, "{body}");
    assert!(body.contains("deadline"), "{body}");
    assert_eq!(slow.join().unwrap().0, 200);
    let mut sluice = api.sluice;
    s.p.stop(&mut sluice, "run.log");
}

/// With a canary, both versions are loaded and a request can name either: each answers what
/// PyTorch computes with its own file. Then, under a steady load on both protocols, a new
/// version is published and swapped in: no request fails, and answers come from both.
#[test]
fn pinned_versions_and_a_hot_reload_under_load() {
    let broker = Broker::start();
    let s = scoring(&broker, "linear");
    let repo = s.repo.to_str().unwrap().to_owned();
    publish(&s.repo, 2, "linear", 2);
    sluice_model(&["promote", &repo, "1"]);
    sluice_model(&["canary", &repo, "2", "--weight", "0.5"]);
    let api = serve(&s.p, "run.log");
    let v = |n: u32| format!("{n}={}", s.repo.join(format!("{n}/model.pt")).display());
    let got = client(&["pinned", &api.http, &api.grpc, &v(1), &v(2)]);
    for key in [
        "http_v1_max_diff",
        "grpc_v1_max_diff",
        "http_v2_max_diff",
        "grpc_v2_max_diff",
    ] {
        let diff = got[key].as_f64().unwrap_or_else(|| panic!("{key}: {got}"));
        assert!(diff <= 1e-6, "{key} = {diff}: {got}");
    }

    // Promote 3 while clients hammer both protocols.
    let stop = s.p.dir.path().join("stop");
    let hammer = std::thread::spawn({
        let (http, grpc, stop) = (api.http.clone(), api.grpc.clone(), stop.clone());
        move || client(&["hammer", &http, &grpc, stop.to_str().unwrap()])
    });
    std::thread::sleep(Duration::from_secs(2));
    publish(&s.repo, 3, "linear", 3);
    sluice_model(&["promote", &repo, "3"]);
    assert!(
        s.p.log_within("run.log", "to=3", Duration::from_secs(30)),
        "version 3 was never loaded:\n{}",
        s.p.log("run.log")
    );
    std::thread::sleep(Duration::from_secs(2));
    std::fs::write(&stop, "").unwrap();
    let load = hammer.join().unwrap();
    assert_eq!(load["failed"], 0, "{load}");
    assert!(load["ok"].as_u64().unwrap() > 50, "{load}");
    assert!(load["versions"]["1"].as_u64().unwrap_or(0) > 0, "{load}");
    assert!(load["versions"]["3"].as_u64().unwrap_or(0) > 0, "{load}");
    let mut sluice = api.sluice;
    s.p.stop(&mut sluice, "run.log");
}

/// POSTs `body` to `addr` + `path`: the status and the body.
fn post_json(addr: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, out)
}
