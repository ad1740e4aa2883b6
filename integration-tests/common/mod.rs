//! Test harness: a real Kafka-protocol broker process (tansu, or any broker named by
//! `KAFKA_BOOTSTRAP`), the real `sluice` binary, and an independent oracle that reads the
//! Parquet files, the dead-letter topic and the committed offsets back.
#![allow(dead_code)]

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use arrow::{
    array::AsArray,
    datatypes::{Int32Type, Int64Type},
};
use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    config::ClientConfig,
    consumer::{BaseConsumer, Consumer},
    message::Message,
    producer::{BaseProducer, BaseRecord, Producer},
    Offset, TopicPartitionList,
};

/// A message's headers as text (lossy), read through librdkafka itself: rust-rdkafka's
/// iterator panics on a header name that is not UTF-8, which some tests produce.
pub fn raw_headers(h: &rdkafka::message::BorrowedHeaders) -> Vec<(String, String)> {
    use rdkafka::bindings as rd;
    // `BorrowedHeaders` is librdkafka's headers pointer itself (rust-rdkafka casts it the same
    // way); names are NUL-terminated, values (pointer, size) live as long as the message.
    let hdrs = h as *const rdkafka::message::BorrowedHeaders as *const rd::rd_kafka_headers_t;
    let mut out = Vec::new();
    unsafe {
        for i in 0..rd::rd_kafka_header_cnt(hdrs) {
            let mut name: *const std::ffi::c_char = std::ptr::null();
            let mut value: *const std::ffi::c_void = std::ptr::null();
            let mut size = 0usize;
            rd::rd_kafka_header_get_all(hdrs, i, &mut name, &mut value, &mut size);
            let value = if value.is_null() {
                String::new()
            } else {
                String::from_utf8_lossy(std::slice::from_raw_parts(value.cast::<u8>(), size))
                    .into_owned()
            };
            let name = String::from_utf8_lossy(std::ffi::CStr::from_ptr(name).to_bytes());
            out.push((name.into_owned(), value));
        }
    }
    out
}

/// Produces one record with a header whose name is the raw bytes `name` (not UTF-8, say),
/// which rust-rdkafka's safe API cannot express.
pub fn produce_with_raw_header(
    broker: &Broker,
    topic: &str,
    key: &str,
    payload: &[u8],
    name: &[u8],
) {
    use rdkafka::bindings as rd;
    let headers = rdkafka::message::OwnedHeaders::new();
    let value = b"v";
    // SAFETY: as in `raw_headers`; the headers are writable (owned) and copied by the call.
    unsafe {
        let hdrs = headers.as_borrowed() as *const rdkafka::message::BorrowedHeaders
            as *mut rd::rd_kafka_headers_t;
        rd::rd_kafka_header_add(
            hdrs,
            name.as_ptr().cast(),
            name.len() as isize,
            value.as_ptr().cast(),
            value.len() as isize,
        );
    }
    let producer = broker.producer();
    producer
        .send(
            BaseRecord::to(topic)
                .key(key)
                .payload(payload)
                .headers(headers),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    producer.flush(Duration::from_secs(30)).unwrap();
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `n` distinct free ports (held open together while they are chosen).
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        Instant::now().elapsed().subsec_nanos() % 1000
    )
}

/// A broker for one test: a tansu process on a free port with its in-memory storage engine
/// (`TANSU_STORAGE` names another, such as `sqlite://tansu.db` for a tansu built with it), or
/// the external broker in `KAFKA_BOOTSTRAP`.
pub struct Broker {
    pub bootstrap: String,
    process: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Broker {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        if let Ok(bootstrap) = std::env::var("KAFKA_BOOTSTRAP") {
            return Self {
                bootstrap,
                process: None,
                _dir: dir,
            };
        }
        let bin = std::env::var("TANSU_BIN").unwrap_or_else(|_| "tansu".into());
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let log = fs::File::create(dir.path().join("tansu.log")).unwrap();
        let process = Command::new(&bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args([
                "--storage-engine",
                &std::env::var("TANSU_STORAGE").unwrap_or_else(|_| "memory://tansu/".into()),
            ])
            .current_dir(dir.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start the broker {bin:?} ({e}); set TANSU_BIN or KAFKA_BOOTSTRAP")
            });
        let bootstrap = format!("127.0.0.1:{port}");
        let started = Instant::now();
        while std::net::TcpStream::connect(&bootstrap).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "broker did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            bootstrap,
            process: Some(process),
            _dir: dir,
        }
    }

    /// A handle on a broker that someone else runs.
    pub fn external(bootstrap: &str) -> Self {
        Self {
            bootstrap: bootstrap.to_owned(),
            process: None,
            _dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn create_topic(&self, topic: &str, partitions: i32) {
        let admin: AdminClient<_> = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let results = rt
            .block_on(admin.create_topics(
                &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
            ))
            .unwrap();
        for r in results {
            r.unwrap();
        }
    }

    pub fn producer(&self) -> BaseProducer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("linger.ms", "5")
            // Room for the oversized events of `oversized`.
            .set("message.max.bytes", "10000000")
            .create()
            .unwrap()
    }

    fn consumer(&self, group: &str) -> BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .unwrap()
    }

    /// Every message of a topic, as (partition, offset, key, payload, headers).
    pub fn read_all(&self, topic: &str) -> Vec<Record> {
        let consumer = self.consumer(&unique("reader"));
        let ends = self.end_offsets(topic);
        let total: i64 = ends.values().sum();
        let mut tpl = TopicPartitionList::new();
        for p in ends.keys() {
            tpl.add_partition_offset(topic, *p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let mut out = Vec::new();
        while (out.len() as i64) < total {
            match consumer.poll(Duration::from_secs(30)) {
                Some(Ok(m)) => out.push(Record {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                    headers: m.headers().map(raw_headers).unwrap_or_default(),
                }),
                Some(Err(e)) => panic!("reading {topic}: {e}"),
                None => panic!("reading {topic}: stalled after {} of {total}", out.len()),
            }
        }
        out
    }

    /// Log end offset of every partition: one past the last message the broker holds.
    ///
    /// The high watermark the broker reports is only where the search starts: tansu's memory
    /// engine reports the first offset of a partition's last batch. A consumer reads on from
    /// there until every partition reports its end (EOF), which on a broker whose watermark is
    /// right happens at once.
    pub fn end_offsets(&self, topic: &str) -> BTreeMap<i32, i64> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", unique("meta"))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("fetch.wait.max.ms", "20")
            .create()
            .unwrap();
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(30))
            .unwrap();
        let mut ends: BTreeMap<i32, i64> = md.topics()[0]
            .partitions()
            .iter()
            .map(|p| {
                let (_, high) = consumer
                    .fetch_watermarks(topic, p.id(), Duration::from_secs(30))
                    .unwrap();
                (p.id(), high)
            })
            .collect();
        let mut tpl = TopicPartitionList::new();
        for (p, high) in &ends {
            tpl.add_partition_offset(topic, *p, Offset::Offset(*high))
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let mut open: BTreeSet<i32> = ends.keys().copied().collect();
        let started = Instant::now();
        while !open.is_empty() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{topic}: no end of partitions {open:?} after 30 s"
            );
            match consumer.poll(Duration::from_millis(500)) {
                Some(Ok(m)) => {
                    let end = ends.get_mut(&m.partition()).unwrap();
                    *end = (*end).max(m.offset() + 1);
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                    open.remove(&p);
                }
                Some(Err(e)) => panic!("reading the end of {topic}: {e}"),
                None => {}
            }
        }
        ends
    }

    /// The group's committed offset of every partition.
    pub fn committed(&self, topic: &str, group: &str) -> BTreeMap<i32, Option<i64>> {
        let consumer = self.consumer(group);
        let mut tpl = TopicPartitionList::new();
        for p in self.end_offsets(topic).keys() {
            tpl.add_partition(topic, *p);
        }
        let c = consumer
            .committed_offsets(tpl, Duration::from_secs(30))
            .unwrap();
        c.elements()
            .iter()
            .map(|e| {
                (
                    e.partition(),
                    match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    },
                )
            })
            .collect()
    }

    /// Waits until the group has committed the end of every partition.
    pub fn wait_committed(
        &self,
        topic: &str,
        group: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let started = Instant::now();
        loop {
            let ends = self.end_offsets(topic);
            let committed = self.committed(topic, group);
            if ends
                .iter()
                .all(|(p, end)| committed.get(p).copied().flatten() == Some(*end))
            {
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(format!(
                    "not committed after {timeout:?}: ends {ends:?}, committed {committed:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(p) = &mut self.process {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Record {
    pub fn header(&self, key: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

pub const SCHEMA: &str = r#"{
  "type": "object",
  "required": ["id", "customer", "amount", "at"],
  "properties": {
    "id": {"type": "string"},
    "customer": {"type": "string"},
    "amount": {"type": "number", "minimum": 0},
    "currency": {"type": "string", "enum": ["EUR", "USD"]},
    "at": {"type": "string", "format": "date-time"},
    "tags": {"type": "array", "items": {"type": "string"}}
  }
}"#;

/// A test event: its key, bytes, and the reason sluice must give if it is invalid.
pub struct TestEvent {
    pub key: String,
    pub payload: Vec<u8>,
    pub invalid: Option<&'static str>,
}

/// Event `n`: mostly valid, every 7th broken in one of several ways.
pub fn event(n: u64) -> TestEvent {
    let key = format!("k-{n}");
    let at = format!("2026-11-21T{:02}:{:02}:00Z", (n / 60) % 24, n % 60);
    let valid = format!(
        r#"{{"id":"e-{n}","customer":"c-{}","amount":{}.5,"currency":"EUR","at":"{at}","tags":["x"]}}"#,
        n % 97,
        n % 1000
    );
    let (payload, invalid) = if n % 7 != 3 {
        (valid.into_bytes(), None)
    } else {
        match (n / 7) % 9 {
            0 => (b"{not json".to_vec(), Some("invalid_json")),
            1 => (valid.as_bytes()[..20].to_vec(), Some("truncated_json")),
            2 => (vec![0xc3, 0x28, b'{', b'}'], Some("not_utf8")),
            3 => (Vec::new(), Some("empty")),
            4 => (
                format!(r#"{{"id":"e-{n}","amount":1,"at":"{at}"}}"#).into_bytes(),
                Some("missing_field"),
            ),
            5 => (
                format!(r#"{{"id":"e-{n}","customer":"c","amount":-1,"at":"{at}"}}"#).into_bytes(),
                Some("out_of_range"),
            ),
            6 => (
                format!(r#"{{"id":"e-{n}","customer":"c","amount":1,"at":"noon"}}"#).into_bytes(),
                Some("bad_timestamp"),
            ),
            7 => (
                format!("{}1{}", "[".repeat(40), "]".repeat(40)).into_bytes(),
                Some("too_deep"),
            ),
            _ => (
                format!(
                    r#"{{"id":"e-{n}","customer":"{}","amount":1,"at":"{at}"}}"#,
                    "x".repeat(5000)
                )
                .into_bytes(),
                Some("too_large"),
            ),
        }
    };
    TestEvent {
        key,
        payload,
        invalid,
    }
}

/// An oversized invalid event (key `big-<n>`): even `n` is about 1,010,000 bytes, under the
/// default `max_event_size` of 1 MiB but over librdkafka's default `message.max.bytes` of
/// 1,000,000 once it carries its dead-letter headers, with a field of the wrong type; odd `n`
/// is 3 MiB, over `max_event_size`.
pub fn oversized(n: u64) -> TestEvent {
    let (size, invalid) = if n.is_multiple_of(2) {
        (1_010_000, "wrong_type")
    } else {
        (3 << 20, "too_large")
    };
    let head = format!(
        r#"{{"id":"big-{n}","customer":"c-1","amount":"lots","currency":"EUR","at":"2026-11-21T10:00:00Z","pad":""#
    );
    let mut payload = head.into_bytes();
    payload.resize(size - 2, b'x');
    payload.extend_from_slice(b"\"}");
    TestEvent {
        key: format!("big-{n}"),
        payload,
        invalid: Some(invalid),
    }
}

/// The test event a record's key names: `k-<n>` ([`event`]), `big-<n>` ([`oversized`]), or
/// `hdr-<n>`: event `n` (a valid one) sent with a header name that is not UTF-8.
pub fn event_of_key(key: &str) -> (String, TestEvent) {
    if let Some(n) = key.strip_prefix("hdr-") {
        let e = event(n.parse().unwrap());
        assert!(e.invalid.is_none(), "hdr-<n> takes a valid event");
        let invalid = Some("bad_header");
        return (
            key.to_owned(),
            TestEvent {
                invalid,
                key: key.to_owned(),
                ..e
            },
        );
    }
    match key.strip_prefix("big-") {
        Some(n) => (key.to_owned(), oversized(n.parse().unwrap())),
        None => {
            let n: u64 = key.trim_start_matches("k-").parse().unwrap();
            (format!("e-{n}"), event(n))
        }
    }
}

/// Produces events `range` and waits for every delivery.
pub fn produce(broker: &Broker, topic: &str, range: std::ops::Range<u64>) {
    produce_records(
        broker,
        topic,
        range.map(|n| {
            let e = event(n);
            (e.key, e.payload)
        }),
    );
}

/// Produces (key, payload) records in order and waits for every delivery.
pub fn produce_records(
    broker: &Broker,
    topic: &str,
    records: impl Iterator<Item = (String, Vec<u8>)>,
) {
    let producer = broker.producer();
    for (key, payload) in records {
        let mut record = BaseRecord::to(topic).key(&key).payload(&payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(60)).unwrap();
}

/// A pipeline for a test: its file, topics, group and output folder.
pub struct TestPipeline {
    pub dir: tempfile::TempDir,
    pub file: PathBuf,
    pub topic: String,
    pub dlq: String,
    pub group: String,
    pub output: PathBuf,
}

impl TestPipeline {
    /// Creates the topics and writes a pipeline file; `parquet_extra` adds sink keys.
    pub fn new(broker: &Broker, partitions: i32, parquet_extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let topic = unique("events");
        let dlq = format!("{topic}.dlq");
        let group = unique("group");
        broker.create_topic(&topic, partitions);
        broker.create_topic(&dlq, 1);
        let output = dir.path().join("out");
        fs::write(dir.path().join("schema.json"), SCHEMA).unwrap();
        let file = dir.path().join("pipeline.toml");
        fs::write(
            &file,
            format!(
                r#"
name = "test"
schema = "schema.json"
[source]
bootstrap_servers = "{bootstrap}"
topics = ["{topic}"]
group_id = "{group}"
[source.properties]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
"topic.metadata.refresh.interval.ms" = "1000"
[batch]
max_rows = 500
max_delay = "100ms"
[errors]
dead_letter_topic = "{dlq}"
max_event_size = "4KiB"
max_depth = 16
[sink.parquet]
path = "out"
partition_by = ["dt", "hour"]
time_field = "at"
{parquet_extra}
"#,
                bootstrap = broker.bootstrap
            ),
        )
        .unwrap();
        Self {
            dir,
            file,
            topic,
            dlq,
            group,
            output,
        }
    }

    /// Replaces `from` (which must be there) with `to` in the pipeline file.
    pub fn edit(&self, from: &str, to: &str) {
        let text = fs::read_to_string(&self.file).unwrap();
        assert!(text.contains(from), "{from:?} is not in the pipeline file");
        fs::write(&self.file, text.replace(from, to)).unwrap();
    }

    /// Starts `sluice run` on this pipeline; its log goes to `log`.
    pub fn spawn(&self, log: &str) -> KillOnDrop {
        self.spawn_listening(log, "off")
    }

    /// Starts `sluice run` with its HTTP listener on `listen`, and waits until it listens.
    pub fn spawn_listening(&self, log: &str, listen: &str) -> KillOnDrop {
        self.spawn_with(log, listen, &[])
    }

    /// [`Self::spawn_listening`] with more environment variables.
    pub fn spawn_with(&self, log: &str, listen: &str, env: &[(&str, &str)]) -> KillOnDrop {
        let name = log;
        let log = fs::File::create(self.dir.path().join(log)).unwrap();
        let child = KillOnDrop(
            Command::new(env!("CARGO_BIN_EXE_sluice"))
                .args([
                    "run",
                    self.file.to_str().unwrap(),
                    "--listen",
                    listen,
                    "--grace-period",
                    "20s",
                ])
                .env("RUST_LOG", "info,sluice=debug")
                .envs(env.iter().copied())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        if let Some(addr) = listen.strip_prefix("127.0.0.1:") {
            // The binary maps libtorch at start, which takes a moment on a busy machine.
            let port: u16 = addr.parse().unwrap();
            let started = Instant::now();
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "sluice never listened on {port}:\n{}",
                    self.log(name)
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        child
    }

    /// SIGTERM, then a clean exit within 30 s, or fails with the log `log`.
    pub fn stop(&self, sluice: &mut KillOnDrop, log: &str) {
        sigterm(&sluice.0);
        let status = wait_exit(&mut sluice.0, Duration::from_secs(30));
        assert!(status.success(), "exit {status:?}\n{}", self.log(log));
    }

    /// Waits until the pipeline has committed everything; on timeout, fails with its logs.
    pub fn wait_drained(&self, broker: &Broker, timeout: Duration) {
        if let Err(e) = broker.wait_committed(&self.topic, &self.group, timeout) {
            let mut logs = String::new();
            for entry in fs::read_dir(self.dir.path()).unwrap().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.ends_with(".log") {
                    let text = self.log(&name);
                    let tail: Vec<&str> = text.lines().rev().take(40).collect();
                    logs += &format!("\n==== {name} (last lines) ====\n");
                    for line in tail.into_iter().rev() {
                        logs += line;
                        logs.push('\n');
                    }
                }
            }
            panic!("{e}{logs}");
        }
    }

    pub fn log(&self, name: &str) -> String {
        fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }
}

/// Runs a helper program (`what` names it in messages); fails the test with its output unless
/// it succeeds. Returns its standard output.
pub fn run_ok(command: &mut Command, what: &str) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{what} could not start: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A plain HTTP/1.0 GET on loopback: (status code, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A helper process that is killed when the test ends, however it ends.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn sigterm(child: &Child) {
    unsafe_kill(child.id(), "TERM");
}

pub fn sigkill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn unsafe_kill(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits for a child to exit, at most `timeout`.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            panic!("process did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A Parquet row's provenance and id.
#[derive(Debug)]
pub struct Row {
    pub partition: i32,
    pub offset: i64,
    pub id: String,
    pub file: PathBuf,
}

/// Every finished Parquet file under a folder (skipping `_`-prefixed folders).
pub fn parquet_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if p.is_dir() && !name.starts_with('_') {
                stack.push(p);
            } else if name.ends_with(".parquet") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Reads every row of every file, and checks each file's metadata against its rows.
pub fn read_rows(root: &Path) -> Vec<Row> {
    let mut rows = Vec::new();
    for file in parquet_files(root) {
        let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            fs::File::open(&file).unwrap(),
        )
        .unwrap();
        let kv: HashMap<String, String> = builder
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .unwrap()
            .iter()
            .map(|kv| (kv.key.clone(), kv.value.clone().unwrap_or_default()))
            .collect();
        let (first, last): (i64, i64) = (
            kv["sluice.first_offset"].parse().unwrap(),
            kv["sluice.last_offset"].parse().unwrap(),
        );
        assert_eq!(kv["sluice.pipeline"], "test");
        assert!(kv.contains_key("sluice.schema_fingerprint"));
        for batch in builder.build().unwrap() {
            let batch = batch.unwrap();
            let p = batch
                .column_by_name("_partition")
                .unwrap()
                .as_primitive::<Int32Type>();
            let o = batch
                .column_by_name("_offset")
                .unwrap()
                .as_primitive::<Int64Type>();
            let id = batch.column_by_name("id").unwrap().as_string::<i32>();
            for i in 0..batch.num_rows() {
                assert!(
                    (first..=last).contains(&o.value(i)),
                    "{} outside its file's range",
                    o.value(i)
                );
                assert_eq!(kv["sluice.partition"], p.value(i).to_string());
                rows.push(Row {
                    partition: p.value(i),
                    offset: o.value(i),
                    id: id.value(i).to_owned(),
                    file: file.clone(),
                });
            }
        }
    }
    rows
}

/// The oracle of ../shared/RELIABILITY.md: O1–O5 and O8, after the topic is drained.
pub fn check_oracle(broker: &Broker, p: &TestPipeline) -> (usize, usize) {
    let source = broker.read_all(&p.topic);
    let expected: HashMap<(i32, i64), (String, TestEvent)> = source
        .iter()
        .map(|r| {
            let key = String::from_utf8(r.key.clone().unwrap()).unwrap();
            let (id, e) = event_of_key(&key);
            assert!(
                e.payload == r.payload,
                "the broker returned other bytes for {key}"
            );
            ((r.partition, r.offset), (id, e))
        })
        .collect();
    // O1: no two rows share a (partition, offset); rows hold the event produced at that offset.
    let rows = read_rows(&p.output);
    let mut seen = BTreeSet::new();
    for row in &rows {
        assert!(
            seen.insert((row.partition, row.offset)),
            "O1: duplicate row {}/{} (again in {})",
            row.partition,
            row.offset,
            row.file.display()
        );
        let (id, e) = &expected[&(row.partition, row.offset)];
        assert!(e.invalid.is_none(), "an invalid event is in Parquet");
        assert_eq!(
            &row.id, id,
            "row {}/{} holds another event",
            row.partition, row.offset
        );
    }
    // O2: valid offsets == Parquet offsets.
    let valid: BTreeSet<(i32, i64)> = expected
        .iter()
        .filter(|(_, (_, e))| e.invalid.is_none())
        .map(|(k, _)| *k)
        .collect();
    let missing: Vec<_> = valid.difference(&seen).take(10).collect();
    assert!(
        missing.is_empty(),
        "O2: {} valid events missing from Parquet, e.g. {missing:?}",
        valid.difference(&seen).count()
    );
    // O2/O8: invalid offsets == dead letters' original offsets; headers and bytes intact.
    // Valid events that one output could not take are dead letters too (stage `inference`:
    // no prediction; `redis`: no features), and in Parquet; the scoring and Redis tests check
    // those.
    let dead = broker.read_all(&p.dlq);
    let mut dead_offsets = BTreeSet::new();
    for d in dead
        .iter()
        .filter(|d| !matches!(d.header("sluice.stage"), Some("inference" | "redis")))
    {
        let partition: i32 = d
            .header("sluice.partition")
            .expect("O8: sluice.partition")
            .parse()
            .unwrap();
        let offset: i64 = d
            .header("sluice.offset")
            .expect("O8: sluice.offset")
            .parse()
            .unwrap();
        let (_, e) = &expected[&(partition, offset)];
        let reason = e
            .invalid
            .unwrap_or_else(|| panic!("a valid event {partition}/{offset} is in the DLQ"));
        assert_eq!(
            d.header("sluice.topic"),
            Some(p.topic.as_str()),
            "O8: topic header"
        );
        assert_eq!(
            d.header("sluice.pipeline"),
            Some("test"),
            "O8: pipeline header"
        );
        assert_eq!(d.header("sluice.stage"), Some("decode"), "O8: stage header");
        assert_eq!(
            d.header("sluice.reason"),
            Some(reason),
            "O8: reason of {partition}/{offset}"
        );
        assert!(
            !d.header("sluice.error").unwrap_or_default().is_empty(),
            "O8: error header"
        );
        assert!(
            d.header("sluice.timestamp")
                .is_some_and(|t| t.parse::<i64>().is_ok()),
            "O8: timestamp header"
        );
        // A dead letter too large for the topic carries a prefix of the bytes and says so.
        if d.header("sluice.truncated") == Some("true") {
            assert_eq!(
                d.header("sluice.original_size"),
                Some(e.payload.len().to_string().as_str()),
                "O8: original size of truncated {partition}/{offset}"
            );
            assert!(
                d.payload.len() < e.payload.len() && e.payload.starts_with(&d.payload),
                "O8: truncated bytes of {partition}/{offset} are not a prefix of the original"
            );
        } else {
            assert!(
                d.payload == e.payload,
                "O8: original bytes of {partition}/{offset} ({} bytes, {} expected)",
                d.payload.len(),
                e.payload.len()
            );
        }
        assert_eq!(d.key.as_deref(), Some(e.key.as_bytes()), "O8: original key");
        dead_offsets.insert((partition, offset));
    }
    let invalid: BTreeSet<(i32, i64)> = expected
        .iter()
        .filter(|(_, (_, e))| e.invalid.is_some())
        .map(|(k, _)| *k)
        .collect();
    assert_eq!(
        invalid, dead_offsets,
        "O2: dead letters differ from the invalid events"
    );
    // O3: rows + dead letters cover every offset.
    assert_eq!(seen.len() + dead_offsets.len(), source.len(), "O3");
    // O4: committed == log end.
    let ends = broker.end_offsets(&p.topic);
    let committed = broker.committed(&p.topic, &p.group);
    for (partition, end) in &ends {
        assert_eq!(
            committed[partition],
            Some(*end),
            "O4: partition {partition}"
        );
    }
    // O5: no temporary files, ranges of a partition's segments do not overlap, and independent
    // readers (pyarrow, DuckDB) read every file.
    let tmp = p.output.join("_sluice/tmp/test");
    let leftovers: Vec<_> = fs::read_dir(&tmp)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        leftovers.is_empty(),
        "O5: temporary files remain: {leftovers:?}"
    );
    let mut ranges: BTreeMap<i32, BTreeSet<(i64, i64)>> = BTreeMap::new();
    for f in parquet_files(&p.output) {
        let name = f.file_stem().unwrap().to_string_lossy().into_owned();
        let parts: Vec<&str> = name.rsplitn(3, '-').collect();
        let (last, first): (i64, i64) = (parts[0].parse().unwrap(), parts[1].parse().unwrap());
        let partition: i32 = parts[2].rsplit('-').next().unwrap().parse().unwrap();
        ranges.entry(partition).or_default().insert((first, last));
    }
    for (partition, rs) in &ranges {
        let rs: Vec<_> = rs.iter().collect();
        for w in rs.windows(2) {
            assert!(
                w[0].1 < w[1].0,
                "O5: overlapping segments in partition {partition}: {:?} and {:?}",
                w[0],
                w[1]
            );
        }
    }
    let counts = run_ok(
        Command::new("python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("integration-tests/read_parquet.py"))
            .arg(&p.output),
        "O5: independent readers (python3 with pyarrow and DuckDB)",
    );
    assert_eq!(
        counts.trim(),
        format!("{} {}", rows.len(), rows.len()),
        "O5: pyarrow and DuckDB row counts"
    );
    (rows.len(), dead_offsets.len())
}

/// A real `redis-server` on a free loopback port, with an append-only file so that a restart
/// keeps the data (`REDIS_SERVER` names the binary, default `redis-server`).
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
    process: Option<Child>,
}

impl RedisServer {
    pub fn start(extra: &[&str]) -> Self {
        Self::start_on(free_port(), extra)
    }

    pub fn start_on(port: u16, extra: &[&str]) -> Self {
        let mut server = Self {
            port,
            dir: tempfile::tempdir().unwrap(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            process: None,
        };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again, on the same port and data).
    pub fn restart(&mut self) {
        let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let process = Command::new(&bin)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {bin} ({e}); the test command installs redis-server")
            });
        self.process = Some(process);
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server (SIGKILL: no goodbye to clients).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }

    /// Runs one command with a plain client; its reply as text.
    pub fn command(&self, args: &[&str]) -> String {
        let client = redis::Client::open(self.url()).unwrap();
        let mut con = client.get_connection().unwrap();
        redis::cmd(args[0]).arg(&args[1..]).query(&mut con).unwrap()
    }

    /// Every hash whose key starts with `prefix`, read with a plain client (keys of other
    /// types are left out).
    pub fn hashes(&self, prefix: &str) -> BTreeMap<String, BTreeMap<String, String>> {
        let client = redis::Client::open(self.url()).unwrap();
        let mut con = client.get_connection().unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query(&mut con)
            .unwrap();
        let mut out = BTreeMap::new();
        for k in keys {
            let kind: String = redis::cmd("TYPE").arg(&k).query(&mut con).unwrap();
            if kind == "hash" {
                let h: BTreeMap<String, String> =
                    redis::cmd("HGETALL").arg(&k).query(&mut con).unwrap();
                out.insert(k, h);
            }
        }
        out
    }

    /// `CLUSTER INFO` of this node.
    pub fn cluster_info(&self) -> String {
        let client = redis::Client::open(self.url()).unwrap();
        let mut con = client.get_connection().unwrap();
        redis::cmd("CLUSTER").arg("INFO").query(&mut con).unwrap()
    }

    pub fn ttl(&self, key: &str) -> i64 {
        let client = redis::Client::open(self.url()).unwrap();
        let mut con = client.get_connection().unwrap();
        redis::cmd("TTL").arg(key).query(&mut con).unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
