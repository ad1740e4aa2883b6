//! The oracle of ../shared/RELIABILITY.md, as functions: each checks one property and
//! returns the [`Violation`] it finds, so a test can also expect one.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use arrow::{
    array::AsArray,
    datatypes::{Int32Type, Int64Type},
};

use super::*;

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

/// A property of the delivery promise that does not hold: which one, and the evidence.
#[derive(Debug)]
pub struct Violation {
    /// `O1`, `O2`, …, as in ../shared/RELIABILITY.md.
    pub rule: &'static str,
    pub detail: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.rule, self.detail)
    }
}

/// Returns a [`Violation`] of `rule` unless `ok`.
fn check(ok: bool, rule: &'static str, detail: impl FnOnce() -> String) -> Result<(), Violation> {
    if ok {
        Ok(())
    } else {
        Err(Violation {
            rule,
            detail: detail(),
        })
    }
}

/// Everything the oracle reads back after a run, read once.
pub struct Observed {
    /// Source topic: (partition, offset) → the test event's id and the event produced there.
    pub expected: HashMap<(i32, i64), (String, TestEvent)>,
    pub source_len: usize,
    pub rows: Vec<Row>,
    /// Dead letters of the decode stage (valid events that one output could not take are dead
    /// letters too, with stage `inference` or `redis`; the scoring and Redis tests check those).
    pub dead: Vec<Record>,
    pub ends: BTreeMap<i32, i64>,
    pub committed: BTreeMap<i32, Option<i64>>,
    pub output: PathBuf,
    pub topic: String,
}

/// Reads the source topic, the Parquet files, the dead-letter topic and the committed offsets
/// of a drained pipeline.
pub fn observe(broker: &Broker, p: &TestPipeline) -> Observed {
    let source = broker.read_all(&p.topic);
    let expected = source
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
    Observed {
        expected,
        source_len: source.len(),
        rows: read_rows(&p.output),
        dead: broker
            .read_all(&p.dlq)
            .into_iter()
            .filter(|d| !matches!(d.header("sluice.stage"), Some("inference" | "redis")))
            .collect(),
        ends: broker.end_offsets(&p.topic),
        committed: broker.committed(&p.topic, &p.group),
        output: p.output.clone(),
        topic: p.topic.clone(),
    }
}

impl Observed {
    fn parquet_offsets(&self) -> BTreeSet<(i32, i64)> {
        self.rows.iter().map(|r| (r.partition, r.offset)).collect()
    }

    /// The offsets of the dead letters (a dead letter may be sent more than once).
    fn dead_offsets(&self) -> BTreeSet<(i32, i64)> {
        self.dead
            .iter()
            .map(|d| {
                let number = |h| d.header(h).and_then(|v| v.parse().ok()).unwrap_or(-1);
                (number("sluice.partition") as i32, number("sluice.offset"))
            })
            .collect()
    }

    fn offsets(&self, valid: bool) -> BTreeSet<(i32, i64)> {
        self.expected
            .iter()
            .filter(|(_, (_, e))| e.invalid.is_none() == valid)
            .map(|(k, _)| *k)
            .collect()
    }
}

/// O1: no two rows share a (partition, offset); each row holds the valid event produced there.
pub fn o1_no_duplicates(o: &Observed) -> Result<(), Violation> {
    let mut seen = BTreeSet::new();
    for row in &o.rows {
        let at = format!("{}/{}", row.partition, row.offset);
        check(seen.insert((row.partition, row.offset)), "O1", || {
            format!("duplicate row {at} (again in {})", row.file.display())
        })?;
        let (id, e) = o
            .expected
            .get(&(row.partition, row.offset))
            .ok_or_else(|| Violation {
                rule: "O1",
                detail: format!("row {at} is at no offset of the topic"),
            })?;
        check(e.invalid.is_none(), "O1", || {
            format!("invalid event {at} is in Parquet")
        })?;
        check(&row.id == id, "O1", || {
            format!("row {at} holds another event")
        })?;
    }
    Ok(())
}

/// O2 (Parquet): every valid event is in Parquet.
pub fn o2_every_valid_event_in_parquet(o: &Observed) -> Result<(), Violation> {
    let seen = o.parquet_offsets();
    let valid = o.offsets(true);
    let missing: Vec<_> = valid.difference(&seen).collect();
    check(missing.is_empty(), "O2", || {
        format!(
            "{} valid events missing from Parquet, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        )
    })
}

/// O8: each dead letter carries its event's original bytes (or, when too large for the topic,
/// a prefix and the original size), key, provenance, stage and reason.
pub fn o8_dead_letters_intact(o: &Observed) -> Result<(), Violation> {
    for d in &o.dead {
        let header = |name: &str| {
            d.header(name).ok_or_else(|| Violation {
                rule: "O8",
                detail: format!("a dead letter has no {name}"),
            })
        };
        let partition: i32 = header("sluice.partition")?.parse().unwrap();
        let offset: i64 = header("sluice.offset")?.parse().unwrap();
        let at = format!("{partition}/{offset}");
        let (_, e) = o
            .expected
            .get(&(partition, offset))
            .ok_or_else(|| Violation {
                rule: "O8",
                detail: format!("dead letter {at} names no offset of the topic"),
            })?;
        let reason = e.invalid.ok_or_else(|| Violation {
            rule: "O2",
            detail: format!("valid event {at} is in the dead-letter topic"),
        })?;
        let expect = |name: &str, want: &str| {
            check(d.header(name) == Some(want), "O8", || {
                format!("{name} of {at}: {:?}, expected {want:?}", d.header(name))
            })
        };
        expect("sluice.topic", &o.topic)?;
        expect("sluice.pipeline", "test")?;
        expect("sluice.stage", "decode")?;
        expect("sluice.reason", reason)?;
        check(!header("sluice.error")?.is_empty(), "O8", || {
            format!("empty sluice.error on {at}")
        })?;
        check(
            header("sluice.timestamp")?.parse::<i64>().is_ok(),
            "O8",
            || format!("sluice.timestamp of {at} is not a number"),
        )?;
        if d.header("sluice.truncated") == Some("true") {
            expect("sluice.original_size", &e.payload.len().to_string())?;
            check(
                d.payload.len() < e.payload.len() && e.payload.starts_with(&d.payload),
                "O8",
                || format!("truncated bytes of {at} are not a prefix of the original"),
            )?;
        } else {
            check(d.payload == e.payload, "O8", || {
                format!(
                    "original bytes of {at}: {} bytes, {} expected",
                    d.payload.len(),
                    e.payload.len()
                )
            })?;
        }
        check(d.key.as_deref() == Some(e.key.as_bytes()), "O8", || {
            format!("original key of {at}")
        })?;
    }
    Ok(())
}

/// O2 (dead letters): the dead letters' offsets are exactly the invalid events' (each at least
/// once).
pub fn o2_dead_letters_are_the_invalid_events(o: &Observed) -> Result<(), Violation> {
    let dead = o.dead_offsets();
    let invalid = o.offsets(false);
    check(invalid == dead, "O2", || {
        format!(
            "dead letters differ from the invalid events: missing {:?}, extra {:?}",
            invalid.difference(&dead).take(10).collect::<Vec<_>>(),
            dead.difference(&invalid).take(10).collect::<Vec<_>>()
        )
    })
}

/// O3: rows and dead letters together cover every offset of the topic.
pub fn o3_every_offset_covered(o: &Observed) -> Result<(), Violation> {
    let dead = o.dead_offsets().len();
    check(o.rows.len() + dead == o.source_len, "O3", || {
        format!(
            "{} rows + {dead} dead events for {} events",
            o.rows.len(),
            o.source_len
        )
    })
}

/// O4: the committed offset of every partition is its log end.
pub fn o4_committed_to_the_end(o: &Observed) -> Result<(), Violation> {
    for (partition, end) in &o.ends {
        let committed = o.committed.get(partition).copied().flatten();
        check(committed == Some(*end), "O4", || {
            format!("partition {partition}: committed {committed:?}, log end {end}")
        })?;
    }
    Ok(())
}

/// O5: no temporary files remain, a partition's segments do not overlap, and independent
/// readers (pyarrow, DuckDB) read every row.
pub fn o5_files_finished_and_readable(o: &Observed) -> Result<(), Violation> {
    let tmp = o.output.join("_sluice/tmp/test");
    let leftovers: Vec<_> = fs::read_dir(&tmp)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    check(leftovers.is_empty(), "O5", || {
        format!("temporary files remain: {leftovers:?}")
    })?;
    let mut ranges: BTreeMap<i32, BTreeSet<(i64, i64)>> = BTreeMap::new();
    for f in parquet_files(&o.output) {
        let name = f.file_stem().unwrap().to_string_lossy().into_owned();
        // <pipeline>+<topic>+<partition>+<first>-<last>
        let parts: Vec<&str> = name.split('+').collect();
        assert_eq!(parts.len(), 4, "a finished file's name: {name}");
        let (first, last) = parts[3].split_once('-').expect("<first>-<last>");
        let (first, last): (i64, i64) = (first.parse().unwrap(), last.parse().unwrap());
        let partition: i32 = parts[2].parse().unwrap();
        ranges.entry(partition).or_default().insert((first, last));
    }
    for (partition, rs) in &ranges {
        let rs: Vec<_> = rs.iter().collect();
        for w in rs.windows(2) {
            check(w[0].1 < w[1].0, "O5", || {
                format!(
                    "overlapping segments in partition {partition}: {:?} and {:?}",
                    w[0], w[1]
                )
            })?;
        }
    }
    let counts = run_ok(
        Command::new("python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("integration-tests/read_parquet.py"))
            .arg(&o.output),
        "O5: independent readers (python3 with pyarrow and DuckDB)",
    );
    let n = o.rows.len();
    check(counts.trim() == format!("{n} {n}"), "O5", || {
        format!(
            "pyarrow and DuckDB count {}, sluice's files hold {n}",
            counts.trim()
        )
    })
}

/// Every property of the oracle, in order; the first violation found.
pub fn oracle(o: &Observed) -> Result<(usize, usize), Violation> {
    o1_no_duplicates(o)?;
    o2_every_valid_event_in_parquet(o)?;
    o8_dead_letters_intact(o)?;
    o2_dead_letters_are_the_invalid_events(o)?;
    o3_every_offset_covered(o)?;
    o4_committed_to_the_end(o)?;
    o5_files_finished_and_readable(o)?;
    Ok((o.rows.len(), o.dead_offsets().len()))
}

/// The oracle of ../shared/RELIABILITY.md (O1–O5 and O8) after the topic is drained; fails the
/// test with the violation. Returns the number of rows and of dead letters.
pub fn check_oracle(broker: &Broker, p: &TestPipeline) -> (usize, usize) {
    oracle(&observe(broker, p)).unwrap_or_else(|v| panic!("{v}"))
}
