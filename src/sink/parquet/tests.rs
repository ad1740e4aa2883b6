//! Crash points of the finishing protocol, simulated deterministically.

use std::sync::Arc;

use arrow::{
    array::{
        ArrayRef, Int32Array, Int64Array, StringArray, TimestampMicrosecondArray,
        TimestampMillisecondArray,
    },
    record_batch::RecordBatch,
};
use parquet::basic::Compression;
use serde_json::json;

use super::*;
use crate::config::{Location, PartitionKey};

fn schema() -> Arc<EventSchema> {
    Arc::new(
        EventSchema::compile(&json!({
            "type": "object", "required": ["id", "at"],
            "properties": {"id": {"type": "string"}, "at": {"type": "string", "format": "date-time"}}
        }))
        .unwrap(),
    )
}

fn spec(root: &std::path::Path) -> ParquetSpec {
    ParquetSpec {
        location: Location::Local(root.to_owned()),
        partition_by: vec![PartitionKey::Date, PartitionKey::Hour],
        time_field: Some("at".into()),
        compression: Compression::SNAPPY,
        row_group_rows: 1000,
        max_file_size: 1 << 30,
        max_file_age: std::time::Duration::from_secs(3600),
        idle_flush: std::time::Duration::from_secs(3600),
        max_open_files: 32,
        spool_dir: root.join("spool"),
        storage_options: Default::default(),
    }
}

/// Rows for partition 0 at `offsets`; even offsets at 10:xx, odd ones at 11:xx.
fn batch(schema: &EventSchema, offsets: &[i64]) -> RecordBatch {
    let hour = 3_600_000_000i64;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            offsets.iter().map(|o| format!("e-{o}")),
        )),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(
                offsets.iter().map(|o| 10 * hour + (o % 2) * hour),
            )
            .with_timezone("UTC"),
        ),
        Arc::new(StringArray::from_iter_values(offsets.iter().map(|_| "t"))),
        Arc::new(Int32Array::from_iter_values(offsets.iter().map(|_| 0))),
        Arc::new(Int64Array::from_iter_values(offsets.iter().copied())),
        Arc::new(
            TimestampMillisecondArray::from_iter(offsets.iter().map(|_| None)).with_timezone("UTC"),
        ),
    ];
    RecordBatch::try_new(schema.arrow.clone(), columns).unwrap()
}

fn tp() -> TopicPartition {
    (Arc::from("t"), 0)
}

fn finished_files(root: &std::path::Path) -> Vec<String> {
    let mut files = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                files.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn finishing_publishes_one_file_per_folder_with_deterministic_names() {
    let dir = tempfile::tempdir().unwrap();
    let schema = schema();
    let mut sink = ParquetSink::open("p", &spec(dir.path()), schema.clone()).unwrap();
    assert_eq!(sink.recover(&tp(), None).await.unwrap(), None);
    sink.write(&batch(&schema, &[5, 6, 7])).unwrap();
    sink.write(&batch(&schema, &[9])).unwrap();
    assert_eq!(sink.open_first(&tp()), Some(5));
    let done = sink.finish(&tp(), Roll::Size).await.unwrap().unwrap();
    assert_eq!(
        (
            done.manifest.first_offset,
            done.manifest.last_offset,
            done.manifest.rows
        ),
        (5, 9, 4)
    );
    assert_eq!(
        finished_files(dir.path()),
        [
            "dt=1970-01-01/hour=10/p+t+0+00000000000000000005-00000000000000000009.parquet",
            "dt=1970-01-01/hour=11/p+t+0+00000000000000000005-00000000000000000009.parquet",
        ]
    );
    assert_eq!(sink.open_first(&tp()), None);
    assert!(
        std::fs::read_dir(sink.storage().tmp_dir())
            .unwrap()
            .next()
            .is_none(),
        "no temporary file left"
    );
    // Restart: the files say where to resume.
    let mut again = ParquetSink::open("p", &spec(dir.path()), schema).unwrap();
    assert_eq!(again.recover(&tp(), None).await.unwrap(), Some(10));
}

/// Review finding A16: two pipelines (two groups) reading one topic into one root keep
/// their own files; before, the second overwrote the first's, and one's rollback could delete
/// the other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn pipelines_sharing_a_root_never_share_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let schema = schema();
    for pipeline in ["a", "b"] {
        let mut sink = ParquetSink::open(pipeline, &spec(dir.path()), schema.clone()).unwrap();
        assert_eq!(sink.recover(&tp(), None).await.unwrap(), None);
        sink.write(&batch(&schema, &[5, 6, 7, 8, 9])).unwrap();
        sink.finish(&tp(), Roll::Size).await.unwrap().unwrap();
    }
    let files = finished_files(dir.path());
    assert_eq!(files.len(), 4, "{files:?}");
    for pipeline in ["a", "b"] {
        let mut again = ParquetSink::open(pipeline, &spec(dir.path()), schema.clone()).unwrap();
        assert_eq!(again.recover(&tp(), None).await.unwrap(), Some(10));
    }
    assert_eq!(
        finished_files(dir.path()),
        files,
        "recovery deleted nothing"
    );
}

/// Review finding A11: a stale member that goes on writing a partition its successor also
/// writes cannot replace the successor's manifest (nor publish its files over the
/// successor's): creating a manifest fails when one is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_second_writer_of_a_segment_cannot_replace_its_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let schema = schema();
    let mut owner = ParquetSink::open("p", &spec(dir.path()), schema.clone()).unwrap();
    let mut stale = ParquetSink::open("p", &spec(dir.path()), schema.clone()).unwrap();
    owner.write(&batch(&schema, &[5, 6, 7, 8, 9])).unwrap();
    stale.write(&batch(&schema, &[6, 7, 9])).unwrap();
    owner.finish(&tp(), Roll::Size).await.unwrap().unwrap();
    let files = finished_files(dir.path());
    let err = stale.finish(&tp(), Roll::Size).await.unwrap_err();
    assert!(
        matches!(err, ParquetSinkError::Storage(StorageError::Exists { .. })),
        "{err}"
    );
    assert_eq!(finished_files(dir.path()), files);
    let manifest = std::fs::read_to_string(dir.path().join(manifest_name("p", "t", 0, 9))).unwrap();
    assert!(manifest.contains("\"rows\": 5"), "{manifest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_crash_after_finishing_but_before_the_commit_resumes_after_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let schema = schema();
    let mut sink = ParquetSink::open("p", &spec(dir.path()), schema.clone()).unwrap();
    sink.recover(&tp(), None).await.unwrap();
    sink.write(&batch(&schema, &[0, 1, 2])).unwrap();
    sink.finish(&tp(), Roll::Size).await.unwrap();
    sink.write(&batch(&schema, &[3, 4])).unwrap();
    sink.finish(&tp(), Roll::Size).await.unwrap();
    // Crash: the process dies with a half-written segment in its temporary folder.
    sink.write(&batch(&schema, &[5, 6])).unwrap();
    std::mem::forget(sink);
    let mut restarted = ParquetSink::open("p", &spec(dir.path()), schema).unwrap();
    assert_eq!(restarted.recover(&tp(), None).await.unwrap(), Some(5));
    assert!(
        std::fs::read_dir(restarted.storage().tmp_dir())
            .unwrap()
            .next()
            .is_none(),
        "leftovers removed"
    );
    let manifests = restarted
        .storage()
        .list(&manifest_dir("p", "t", 0))
        .await
        .unwrap();
    assert_eq!(
        manifests,
        [format!("{:020}.json", 4)],
        "only the newest manifest is kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_crash_while_publishing_rolls_the_segment_back() {
    let dir = tempfile::tempdir().unwrap();
    let schema = schema();
    let mut sink = ParquetSink::open("p", &spec(dir.path()), schema.clone()).unwrap();
    sink.recover(&tp(), None).await.unwrap();
    sink.write(&batch(&schema, &[0, 1])).unwrap();
    sink.finish(&tp(), Roll::Size).await.unwrap();
    let first_manifest = dir.path().join(manifest_name("p", "t", 0, 1));
    let kept = std::fs::read(&first_manifest).unwrap();
    sink.write(&batch(&schema, &[2, 3])).unwrap();
    sink.finish(&tp(), Roll::Size).await.unwrap();
    // Simulate a crash between publishing the two files of the second segment: the first
    // segment's manifest is only removed once the second is complete.
    std::fs::write(&first_manifest, kept).unwrap();
    let second = finished_files(dir.path())
        .into_iter()
        .find(|f| f.contains("hour=11") && f.contains("+00000000000000000002-"))
        .unwrap();
    std::fs::remove_file(dir.path().join(&second)).unwrap();
    let mut restarted = ParquetSink::open("p", &spec(dir.path()), schema).unwrap();
    assert_eq!(
        restarted.recover(&tp(), Some(2)).await.unwrap(),
        Some(2),
        "resume at the rolled-back segment"
    );
    let files = finished_files(dir.path());
    assert_eq!(
        files.len(),
        2,
        "the surviving half of the segment is removed: {files:?}"
    );
    assert!(files
        .iter()
        .all(|f| f.contains("+00000000000000000000-00000000000000000001.")));
}

/// Review finding A4: a committed segment whose files span two folders loses one of them
/// outside sluice (a retention job). Recovery keeps the other, whose rows are committed and
/// will not be delivered again, and resumes after the segment.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_committed_segment_missing_a_file_keeps_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let schema = schema();
    let mut sink = ParquetSink::open("p", &spec(dir.path()), schema.clone()).unwrap();
    sink.recover(&tp(), None).await.unwrap();
    sink.write(&batch(&schema, &[0, 1, 2, 3])).unwrap();
    sink.finish(&tp(), Roll::Size).await.unwrap();
    let files = finished_files(dir.path());
    assert_eq!(files.len(), 2, "one file per hour folder: {files:?}");
    let (gone, kept): (Vec<String>, Vec<String>) =
        files.into_iter().partition(|f| f.contains("hour=10"));
    std::fs::remove_file(dir.path().join(&gone[0])).unwrap();
    let mut restarted = ParquetSink::open("p", &spec(dir.path()), schema).unwrap();
    assert_eq!(
        restarted.recover(&tp(), Some(4)).await.unwrap(),
        Some(4),
        "resume after the committed segment"
    );
    assert_eq!(
        finished_files(dir.path()),
        kept,
        "the committed file that is left is kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn files_carry_their_provenance() {
    let dir = tempfile::tempdir().unwrap();
    let schema = schema();
    let mut sink = ParquetSink::open("p", &spec(dir.path()), schema.clone()).unwrap();
    sink.write(&batch(&schema, &[4])).unwrap();
    sink.finish(&tp(), Roll::Idle).await.unwrap();
    let path = dir.path().join(&finished_files(dir.path())[0]);
    let reader =
        parquet::file::reader::SerializedFileReader::new(File::open(path).unwrap()).unwrap();
    use parquet::file::reader::FileReader;
    let kv: HashMap<String, String> = reader
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .unwrap()
        .iter()
        .map(|kv| (kv.key.clone(), kv.value.clone().unwrap()))
        .collect();
    assert_eq!(kv["sluice.pipeline"], "p");
    assert_eq!(kv["sluice.topic"], "t");
    assert_eq!(kv["sluice.partition"], "0");
    assert_eq!(kv["sluice.first_offset"], "4");
    assert_eq!(kv["sluice.last_offset"], "4");
    assert_eq!(kv["sluice.schema_fingerprint"], schema.fingerprint);
}

/// Review finding A9: a partition's rows never open more than `max_open_files` files. Past
/// it the rest of the partition's rows wait (in offset order) for the segment to be finished,
/// and each segment still covers a contiguous range of offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn open_files_per_partition_are_capped() {
    use crate::sink::Sink;
    let dir = tempfile::tempdir().unwrap();
    let schema = schema();
    let mut spec = spec(dir.path());
    spec.max_open_files = 1;
    let mut sink = ParquetSink::open("p", &spec, schema.clone()).unwrap();
    // 10:xx and 11:xx alternate: every other row needs the second folder.
    ParquetSink::write(&mut sink, &batch(&schema, &[4, 6, 7, 8, 9])).unwrap();
    assert_eq!(sink.segments[&tp()].files.len(), 1);
    assert_eq!(sink.open_first(&tp()), Some(4));
    assert_eq!(ParquetSink::due(&sink), vec![(tp(), Roll::OpenFiles)]);
    // A later batch waits behind the deferred rows.
    ParquetSink::write(&mut sink, &batch(&schema, &[10])).unwrap();
    let mut ranges = Vec::new();
    while let Some((tp, why)) = ParquetSink::due(&sink).into_iter().next() {
        assert_eq!(why, Roll::OpenFiles);
        let segment = &sink.segments[&tp];
        ranges.push((segment.first, segment.last));
        Sink::make_durable(&mut sink, &tp, why).await.unwrap();
        assert!(sink.segments.get(&tp).is_none_or(|s| s.files.len() == 1));
    }
    let last = sink.finish(&tp(), Roll::Size).await.unwrap().unwrap();
    ranges.push((last.manifest.first_offset, last.manifest.last_offset));
    assert_eq!(ranges, vec![(4, 6), (7, 7), (8, 8), (9, 9), (10, 10)]);
    assert_eq!(finished_files(dir.path()).len(), 5);
}
