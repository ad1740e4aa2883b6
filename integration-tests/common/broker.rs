//! The broker: a tansu process (or the one in `KAFKA_BOOTSTRAP`), its admin and readers,
//! and producing test events.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    process::{Child, Command},
    time::{Duration, Instant},
};

use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    config::ClientConfig,
    consumer::{BaseConsumer, Consumer},
    message::Message,
    producer::{BaseProducer, BaseRecord, Producer},
    Offset, TopicPartitionList,
};

use super::*;

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

    /// Freezes the broker process (SIGSTOP): connections stay open and nothing answers, as
    /// with a broker behind a network partition. Only for a broker this test started.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Lets a paused broker go on (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, signal: &str) {
        let process = self
            .process
            .as_ref()
            .expect("only a broker the test started pauses");
        send_signal(process.id(), signal);
    }

    /// A broker this test runs itself (one it may pause), or `None` (with a line saying the
    /// test is skipped) when `KAFKA_BOOTSTRAP` names someone else's.
    pub fn start_own() -> Option<Self> {
        let broker = Self::start();
        if broker.process.is_none() {
            eprintln!("skipped: KAFKA_BOOTSTRAP names a broker this test cannot pause");
            return None;
        }
        Some(broker)
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

    /// Commits `offset` for every partition of `topic` in `group`, as an operator's
    /// `kafka-consumer-groups --reset-offsets --to-offset` does (the group has no members).
    pub fn reset_committed(&self, topic: &str, group: &str, offset: i64) {
        let mut tpl = TopicPartitionList::new();
        for p in self.end_offsets(topic).keys() {
            tpl.add_partition_offset(topic, *p, Offset::Offset(offset))
                .unwrap();
        }
        self.consumer(group)
            .commit(&tpl, rdkafka::consumer::CommitMode::Sync)
            .unwrap();
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
