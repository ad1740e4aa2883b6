//! Black-box tests of the failure model (`src/failure.rs`): every external failure is
//! transient (retried, readiness 503), per-record (a dead letter, the rest goes on) or fatal
//! (a non-zero exit within a bound, with one clear line). Each test is a finding of
//! ../shared/REVIEW.md or a scenario of ../shared/RELIABILITY.md that once wedged the pipeline
//! with green health.

mod common;

use std::{
    fs,
    time::{Duration, Instant},
};

use common::*;

const DRAIN: Duration = Duration::from_secs(180);

/// Scenario 13 and review finding A2: with the default `max_event_size` (1 MiB), an invalid
/// event of about 1,010,000 bytes (whose dead letter, with its headers, is over librdkafka's
/// default `message.max.bytes`) and one of 3 MiB (over `max_event_size`) among valid events.
/// Both reach the dead-letter topic (the second cut to fit, saying so), and every offset is
/// committed. Before, the first was retried forever and nothing was committed.
#[test]
fn oversized_invalid_events_are_dead_lettered_and_the_rest_drains() {
    let broker = Broker::start();
    let p = TestPipeline::new(&broker, 2, "idle_flush = \"300ms\"");
    p.edit("max_event_size = \"4KiB\"", "max_event_size = \"1MiB\"");
    // The mix's own `too_large` events are 5 KB: not too large under the default limit.
    let mix = |range: std::ops::Range<u64>| {
        range
            .map(event)
            .filter(|e| e.invalid != Some("too_large"))
            .map(|e| (e.key, e.payload))
    };
    produce_records(&broker, &p.topic, mix(0..1_000));
    produce_records(
        &broker,
        &p.topic,
        (0..2).map(oversized).map(|e| (e.key, e.payload)),
    );
    produce_records(&broker, &p.topic, mix(1_000..2_000));
    p.run_until_drained(&broker, DRAIN, "run.log");
    check_oracle(&broker, &p);
    let dead = broker.read_all(&p.dlq);
    let big = |key: &str| {
        dead.iter()
            .find(|d| d.key.as_deref() == Some(key.as_bytes()))
            .unwrap_or_else(|| panic!("no dead letter for {key}"))
    };
    let three_mib = big("big-1");
    assert_eq!(three_mib.header("sluice.reason"), Some("too_large"));
    assert_eq!(three_mib.header("sluice.truncated"), Some("true"));
    assert_eq!(
        three_mib.header("sluice.original_size"),
        Some((3 << 20).to_string().as_str())
    );
    assert!(three_mib.payload.len() < 1_200_000);
    assert_eq!(big("big-0").header("sluice.reason"), Some("wrong_type"));
}

/// Review finding A2 (fatal part) and A7: a dead-letter topic that does not exist is found at
/// start: exit 1 within a bound, with one `ERROR` line that names the topic and the remedy.
#[test]
fn a_missing_dead_letter_topic_fails_fast_with_one_clear_line() {
    let broker = Broker::start();
    let p = TestPipeline::new(&broker, 1, "");
    let missing = format!("{}-missing", p.dlq);
    p.edit(
        &format!("dead_letter_topic = \"{}\"", p.dlq),
        &format!("dead_letter_topic = \"{missing}\""),
    );
    produce(&broker, &p.topic, 0..50);
    let mut sluice = p.spawn("run.log");
    let started = Instant::now();
    let status = wait_exit(&mut sluice.0, Duration::from_secs(60));
    let log = p.log("run.log");
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(started.elapsed() < Duration::from_secs(60));
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "one ERROR line:\n{log}");
    assert!(
        errors[0].contains(&missing) && errors[0].contains("does not exist"),
        "the line names the topic and says what is wrong: {}",
        errors[0]
    );
    assert_eq!(
        broker
            .committed(&p.topic, &p.group)
            .values()
            .flatten()
            .count(),
        0,
        "nothing is committed"
    );
}

/// Review finding A4: after a committed segment whose files span several hour folders loses
/// one file (as to a retention job), a restart keeps the others (their rows are committed and
/// will not be consumed again) and goes on. Before, recovery deleted them.
#[test]
fn a_restart_never_deletes_the_files_of_a_committed_segment() {
    let broker = Broker::start();
    let p = TestPipeline::new(&broker, 1, "idle_flush = \"300ms\"");
    produce(&broker, &p.topic, 0..600);
    p.run_until_drained(&broker, DRAIN, "first.log");
    // The newest segment (whose manifest recovery reads), with files in several hour folders
    // (they share the offset range in the name, zero-padded, so the last name is the newest).
    let mut segments: std::collections::BTreeMap<String, Vec<std::path::PathBuf>> =
        Default::default();
    for f in parquet_files(&p.output) {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        segments.entry(name).or_default().push(f);
    }
    let (_, files) = segments.into_iter().next_back().expect("a segment");
    assert!(files.len() >= 2, "{files:?}");
    let (gone, kept) = files.split_first().unwrap();
    std::fs::remove_file(gone).unwrap();
    produce(&broker, &p.topic, 600..700);
    p.run_until_drained(&broker, DRAIN, "second.log");
    for f in kept {
        assert!(f.exists(), "a committed file was deleted: {}", f.display());
    }
    let log = p.log("second.log");
    assert!(
        log.contains("Files of a committed segment are missing"),
        "the restart says what it found:\n{log}"
    );
    // Every other row is there once, and the new events too.
    let rows = read_rows(&p.output);
    let mut seen = std::collections::BTreeSet::new();
    for r in &rows {
        assert!(seen.insert(r.offset), "duplicate row {}", r.offset);
    }
    assert!(
        seen.iter().any(|o| *o >= 600),
        "the new events were written"
    );
}

/// Review finding A19 (RELIABILITY scenario 18): an operator resets the group to the earliest
/// offset while sluice is stopped. The files already hold those rows, so the restart resumes
/// where they end (exactly once wins over the reset), says so with both positions, and writes
/// no row twice; the events produced since are written.
#[test]
fn a_reset_to_the_earliest_is_logged_and_writes_no_row_twice() {
    let broker = Broker::start();
    let p = TestPipeline::new(&broker, 2, "idle_flush = \"300ms\"");
    produce(&broker, &p.topic, 0..1_000);
    p.run_until_drained(&broker, DRAIN, "first.log");
    broker.reset_committed(&p.topic, &p.group, 0);
    assert!(
        broker
            .committed(&p.topic, &p.group)
            .values()
            .all(|c| *c == Some(0)),
        "the reset took"
    );
    produce(&broker, &p.topic, 1_000..1_200);
    p.run_until_drained(&broker, DRAIN, "second.log");
    let log = p.log("second.log");
    assert!(
        log.contains("Resuming after the committed offset, where the finished files end"),
        "the restart says why it does not reprocess:\n{log}"
    );
    let (rows, dead) = check_oracle(&broker, &p);
    assert_eq!(rows + dead, 1_200);
}

/// Review finding A3: a header name that is not UTF-8 once panicked the source thread, and
/// intake stopped for good with green health. Now that event is a dead letter (`bad_header`,
/// original bytes) and the partition drains.
#[test]
fn a_header_name_that_is_not_utf8_is_a_dead_letter_and_the_rest_drains() {
    let broker = Broker::start();
    let p = TestPipeline::new(&broker, 1, "idle_flush = \"300ms\"");
    produce(&broker, &p.topic, 0..200);
    let valid = event(200);
    produce_with_raw_header(&broker, &p.topic, "hdr-200", &valid.payload, b"\xffname");
    produce(&broker, &p.topic, 201..400);
    p.run_until_drained(&broker, DRAIN, "run.log");
    let (rows, dead) = check_oracle(&broker, &p);
    assert_eq!(rows + dead, 400);
    let bad = broker
        .read_all(&p.dlq)
        .into_iter()
        .find(|d| d.key.as_deref() == Some(&b"hdr-200"[..]))
        .expect("a dead letter for the event with the bad header");
    assert_eq!(bad.header("sluice.reason"), Some("bad_header"));
}

/// Review finding A9: a replay of scattered event times, 3,000 events of one partition each in
/// an hour folder of its own. The files open at once stay capped (`max_open_files`, 32 per
/// partition): the process never holds more than a bounded number of descriptors, and every
/// event is still in Parquet exactly once. Before, one batch opened a file per folder (500 at
/// once, and more across batches), on the way to `EMFILE` and a crash loop.
#[test]
fn scattered_event_times_never_open_more_than_max_open_files() {
    let broker = Broker::start();
    let p = TestPipeline::new(&broker, 1, "idle_flush = \"300ms\"");
    produce_records(
        &broker,
        &p.topic,
        (0..3_000).map(|n| {
            let e = hourly(n);
            (e.key, e.payload)
        }),
    );
    let mut sluice = p.spawn("run.log");
    let fds = |pid: u32| {
        fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let pid = sluice.0.id();
    let started = Instant::now();
    let mut most = 0;
    while broker
        .committed(&p.topic, &p.group)
        .values()
        .flatten()
        .sum::<i64>()
        < 3_000
    {
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "not drained:\n{}",
            p.log("run.log")
        );
        most = most.max(fds(pid));
        std::thread::sleep(Duration::from_millis(20));
    }
    p.stop(&mut sluice, "run.log");
    eprintln!("at most {most} open descriptors");
    assert!(most < 32 + 120, "{most} open descriptors");
    let (rows, _) = check_oracle(&broker, &p);
    assert_eq!(rows, 3_000);
    assert!(parquet_files(&p.output).len() >= 3_000);
}

/// Events for the broker tests below: enough that sluice is still consuming (from what it
/// fetched before) while the broker is away, so dead letters and commits meet the outage.
const BACKLOG: u64 = 30_000;

/// Waits until the group has committed something: the pipeline is under way.
fn wait_started(broker: &Broker, p: &TestPipeline) {
    let started = Instant::now();
    while broker
        .committed(&p.topic, &p.group)
        .values()
        .all(|c| c.is_none())
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "nothing committed:\n{}",
            p.log("a.log")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Scenario 5: the broker is unreachable (frozen with SIGSTOP) for longer than the producer's
/// message timeout while dead letters are on their way. Their delivery fails with a timeout,
/// a transient failure: retried with backoff, never dropped, never committed past; once the
/// broker is back, everything drains and the oracle holds.
#[test]
fn a_broker_away_longer_than_the_message_timeout_loses_nothing() {
    let Some(broker) = Broker::start_own() else {
        return;
    };
    let p = TestPipeline::new(&broker, 3, "idle_flush = \"300ms\"");
    p.edit(
        "max_depth = 16",
        "max_depth = 16\n[errors.producer_properties]\n\"message.timeout.ms\" = \"2000\"",
    );
    // Enough that sluice still works through what it fetched before the pause (librdkafka
    // prefetches up to 32 MB) while the broker is away: several seconds of dead letters.
    let backlog = 200_000;
    produce(&broker, &p.topic, 0..backlog);
    let mut a = p.spawn("a.log");
    wait_started(&broker, &p);
    broker.pause();
    std::thread::sleep(Duration::from_secs(5));
    broker.resume();
    p.wait_drained(&broker, DRAIN);
    p.stop(&mut a, "a.log");
    let log = p.log("a.log");
    assert!(
        log.contains("Dead letter delivery failed; retrying"),
        "no dead letter met the outage; the test did not test anything:\n{log}"
    );
    let (rows, dead) = check_oracle(&broker, &p);
    assert_eq!(rows + dead, backlog as usize);
}

/// `/readyz`'s status code, or `None` while nothing listens (the process exited).
fn readyz(port: u16) -> Option<u16> {
    std::net::TcpStream::connect(("127.0.0.1", port))
        .ok()
        .map(|_| http_get(port, "/readyz").0)
}

/// Scenario 6: the broker frozen (SIGSTOP) for longer than the session timeout, with two
/// instances in the group. Each member's session expires: its assignment is lost, so its open
/// files are discarded, never published over what the partitions' next owner writes; both
/// rejoin, and the oracle holds. Review finding A15: meanwhile `/readyz` says the member is
/// out of its group (503), and ready again once it has rejoined.
#[test]
fn a_broker_paused_longer_than_the_session_timeout_keeps_exactly_once() {
    let Some(broker) = Broker::start_own() else {
        return;
    };
    let p = TestPipeline::new(
        &broker,
        4,
        "max_file_size = \"32KiB\"\nidle_flush = \"300ms\"",
    );
    produce(&broker, &p.topic, 0..BACKLOG);
    let mut group = Members::start(&p, &["a"]);
    wait_started(&broker, &p);
    group.add("b");
    std::thread::sleep(Duration::from_secs(1));
    let port = group.port(0);
    assert_eq!(readyz(port), Some(200), "a is ready before the pause");
    broker.pause();
    // Twice the session timeout (6 s).
    let unready = seen_within(Duration::from_secs(12), || readyz(port) == Some(503));
    broker.resume();
    assert!(
        unready,
        "/readyz stayed 200 while a's session expired:\n{}",
        p.log("a.log")
    );
    // A member that exits non-zero is restarted, as a supervisor would.
    group.settle(&broker, 4);
    p.wait_drained(&broker, DRAIN);
    // The first a, if it is still running, has rejoined its group.
    wait_until(
        Duration::from_secs(30),
        || format!("/readyz stayed 503 after a rejoined:\n{}", p.log("a.log")),
        || readyz(port) != Some(503),
    );
    group.stop_all();
    let (rows, dead) = check_oracle(&broker, &p);
    assert_eq!(rows + dead, BACKLOG as usize);
}

/// A small tmpfs mounted at `at`, unmounted when dropped; `None` where this process may not
/// mount (not root, or no CAP_SYS_ADMIN).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: &str) -> Option<Self> {
        fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(at.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Scenario 17: the disk under the Parquet directory fills up. A file that cannot be written
/// is fatal for the process (its rows are in the half-written file only): sluice exits
/// non-zero within a bound with one `ERROR` line naming the cause, commits nothing past it, and
/// a restart after space is freed resumes with nothing lost or duplicated and no temporary
/// file left behind.
#[test]
fn a_full_disk_stops_with_one_clear_line_and_a_restart_loses_nothing() {
    let broker = Broker::start();
    let p = TestPipeline::new(&broker, 2, "idle_flush = \"300ms\"");
    let Some(_disk) = Tmpfs::mount(&p.output, "8m") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    // Leave about 300 KB free: a few files' worth.
    let filler = p.output.join("filler");
    fs::write(&filler, vec![0u8; 7_900_000]).unwrap();
    let total = 40_000;
    produce(&broker, &p.topic, 0..total);
    let mut a = p.spawn("a.log");
    let status = wait_exit(&mut a.0, Duration::from_secs(120));
    let log = p.log("a.log");
    assert!(!status.success(), "{status:?}\n{log}");
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "one ERROR line:\n{log}");
    assert!(
        errors[0].contains("No space left on device"),
        "the ERROR line names the cause:\n{log}"
    );
    fs::remove_file(&filler).unwrap();
    p.run_until_drained(&broker, DRAIN, "again.log");
    let (rows, dead) = check_oracle(&broker, &p);
    assert_eq!(rows + dead, total as usize);
}
