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
    let mut sluice = p.spawn("run.log");
    p.wait_drained(&broker, DRAIN);
    p.stop(&mut sluice, "run.log");
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
    let mut sluice = p.spawn("first.log");
    p.wait_drained(&broker, DRAIN);
    p.stop(&mut sluice, "first.log");
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
    let mut sluice = p.spawn("second.log");
    p.wait_drained(&broker, DRAIN);
    p.stop(&mut sluice, "second.log");
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
    let mut sluice = p.spawn("run.log");
    p.wait_drained(&broker, DRAIN);
    p.stop(&mut sluice, "run.log");
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
