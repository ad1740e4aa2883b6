//! The Parquet sink: exactly-once files, partitioned Hive-style.
//!
//! Rows of each Kafka partition accumulate in a **segment**: one open file per Hive folder, all
//! written to local temporary files as row groups fill. A segment is finished when it is big
//! enough, old enough, idle, or its partition is revoked. Finishing, in this order:
//! 1. close every file (footer with `sluice.*` metadata) and fsync it;
//! 2. write the segment's **manifest** (`_sluice/manifests/...`), listing its files and offset
//!    range: the intent;
//! 3. make each file visible atomically under its deterministic name
//!    `<folder>/<pipeline>+<topic>+<partition>+<first>-<last>.parquet`;
//! 4. the pipeline may now commit `last + 1`.
//!
//! Recovery, when a partition is assigned ([`ParquetSink::recover`]): leftover temporary files
//! are removed; if the newest manifest's files all exist, the partition resumes at
//! `last + 1` (even if the crash came before the commit: no duplicate); if some are missing,
//! the crash came during step 3, so the files that were published are removed and the segment
//! is written again from Kafka. Only the newest complete manifest is kept.

mod layout;
pub mod storage;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs::File,
    path::PathBuf,
    sync::Arc,
    time::Instant,
};

use arrow::{
    array::UInt32Array, compute::take_record_batch, error::ArrowError, record_batch::RecordBatch,
};
use parquet::{
    arrow::ArrowWriter,
    errors::ParquetError,
    file::{metadata::KeyValue, properties::WriterProperties},
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{debug, info, warn};

pub use self::layout::{file_name, manifest_dir};
use self::{
    layout::{manifest_name, tmp_prefix, Partitioner},
    storage::{Storage, StorageError},
};
pub use crate::sink::Roll;
use crate::{
    config::ParquetSpec,
    event::TopicPartition,
    schema::EventSchema,
    sink::{Refusal, Sink, SinkError},
};

/// Why the Parquet sink failed. All of these stop the pipeline: nothing past the failure is
/// committed, and recovery on restart resumes from the manifests and committed offsets.
#[derive(Debug, Error)]
pub enum ParquetSinkError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: ParquetError,
    },
    #[error("splitting a batch: {0}")]
    Arrow(#[from] ArrowError),
    #[error("manifest {path} is unreadable: {source}")]
    Manifest {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

/// A finished segment's record: written before its files are published.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub pipeline: String,
    pub topic: String,
    pub partition: i32,
    pub first_offset: i64,
    pub last_offset: i64,
    pub rows: u64,
    pub schema_fingerprint: String,
    /// Paths relative to the root.
    pub files: Vec<String>,
}

/// What finishing a segment produced.
#[derive(Debug)]
pub struct Finished {
    pub manifest: Manifest,
    pub bytes: u64,
}

struct OpenFile {
    tmp: PathBuf,
    writer: ArrowWriter<File>,
}

/// A partition's open files.
struct Segment {
    first: i64,
    last: i64,
    rows: u64,
    opened: Instant,
    touched: Instant,
    /// By Hive folder ("" without partitioning).
    files: BTreeMap<String, OpenFile>,
}

impl Segment {
    fn size(&self) -> u64 {
        self.files
            .values()
            .map(|f| (f.writer.bytes_written() + f.writer.in_progress_size()) as u64)
            .sum()
    }
}

/// Writes batches to Parquet files, one segment per Kafka partition.
pub struct ParquetSink {
    pipeline: String,
    spec: ParquetSpec,
    schema: Arc<EventSchema>,
    storage: Storage,
    partitioner: Partitioner,
    properties: WriterProperties,
    segments: HashMap<TopicPartition, Segment>,
    /// Rows of a partition that would have opened more than `max_open_files` files in its
    /// segment: they wait, in offset order, for the segment to be finished (`Roll::OpenFiles`),
    /// and go into the next one.
    deferred: HashMap<TopicPartition, RecordBatch>,
    /// Makes temporary names unique within this process.
    counter: u64,
}

impl ParquetSink {
    pub fn open(
        pipeline: &str,
        spec: &ParquetSpec,
        schema: Arc<EventSchema>,
    ) -> Result<Self, ParquetSinkError> {
        let storage = Storage::open(
            &spec.location,
            &spec.storage_options,
            &spec.spool_dir,
            pipeline,
        )?;
        let time_column = spec
            .time_field
            .as_deref()
            .and_then(|f| schema.arrow.index_of(f).ok());
        let partitioner = Partitioner::new(spec.partition_by.clone(), time_column, &schema.arrow);
        let properties = WriterProperties::builder()
            .set_compression(spec.compression)
            .set_max_row_group_size(spec.row_group_rows)
            .set_created_by(format!("sluice {}", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Self {
            pipeline: pipeline.to_owned(),
            spec: spec.clone(),
            schema,
            storage,
            partitioner,
            properties,
            segments: HashMap::new(),
            deferred: HashMap::new(),
            counter: 0,
        })
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Recovers a newly assigned partition whose committed offset is `committed`; returns
    /// where it resumes according to the files (`None` if this pipeline never finished a file
    /// for it).
    ///
    /// A newest manifest with missing files is rolled back (its surviving files deleted, the
    /// segment written again from Kafka) only if its offsets were never committed: then the
    /// crash came while it was being published. If they were committed, its files were all
    /// published, and a missing one was removed since (a retention job, a compaction, a
    /// person): the others hold rows that Kafka will not deliver again, so they are kept.
    pub async fn recover(
        &mut self,
        tp: &TopicPartition,
        committed: Option<i64>,
    ) -> Result<Option<i64>, ParquetSinkError> {
        let (topic, partition) = (&*tp.0, tp.1);
        // A segment left open by an earlier owner in this process is not ours any more.
        self.segments.remove(tp);
        let removed = self.storage.clean_tmp(&tmp_prefix(topic, partition))?;
        if removed > 0 {
            info!(
                topic,
                partition, removed, "Removed leftover temporary files."
            );
        }
        let dir = manifest_dir(&self.pipeline, topic, partition);
        let names = self.storage.list(&dir).await?;
        let mut resume = None;
        let mut complete: Option<String> = None;
        for name in names.iter().rev().filter(|n| n.ends_with(".json")) {
            let path = format!("{dir}/{name}");
            let Some(data) = self.storage.get(&path).await? else {
                continue;
            };
            let manifest: Manifest =
                serde_json::from_slice(&data).map_err(|source| ParquetSinkError::Manifest {
                    path: path.clone(),
                    source,
                })?;
            let mut missing = 0;
            for f in &manifest.files {
                if !self.storage.exists(f).await? {
                    missing += 1;
                }
            }
            if missing == 0 {
                resume = Some(manifest.last_offset + 1);
                complete = Some(name.clone());
                break;
            }
            if committed.is_some_and(|c| c > manifest.last_offset) {
                warn!(topic, partition, manifest = %path, missing, ?committed,
                      "Files of a committed segment are missing (removed outside sluice?); \
                       keeping the others.");
                resume = Some(manifest.last_offset + 1);
                complete = Some(name.clone());
                break;
            }
            // The crash came while its files were being published: take back the ones that
            // made it, the segment will be written again from Kafka.
            warn!(topic, partition, manifest = %path, missing, "Rolling back an unfinished segment.");
            for f in &manifest.files {
                self.storage.delete(f).await?;
            }
            self.storage.delete(&path).await?;
        }
        if let Some(keep) = complete {
            for old in names.iter().filter(|n| n.ends_with(".json") && **n < keep) {
                self.storage.delete(&format!("{dir}/{old}")).await?;
            }
        }
        debug!(topic, partition, ?resume, "Partition recovered.");
        Ok(resume)
    }

    /// Buffers a batch's rows in their partitions' segments. CPU-heavy: call off the async
    /// workers (the pipeline uses `block_in_place`).
    pub fn write(&mut self, batch: &RecordBatch) -> Result<(), ParquetSinkError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let (topics, partitions, offsets) = crate::schema::provenance(batch);
        // Group rows by (topic, partition, folder), keeping their order. A partition's rows
        // from the first one that would open a file past `max_open_files` on are deferred,
        // all of them, so that each segment still covers a contiguous range of offsets.
        type Group<'a> = (&'a str, i32, String);
        let mut groups: Vec<(Group, Vec<u32>)> = Vec::new();
        let mut index: HashMap<Group, usize> = HashMap::new();
        /// A partition of the batch: its folders (the open segment's and the batch's so far),
        /// or, from the first row that would need one too many, its deferred rows.
        enum Admit {
            Open(BTreeSet<String>),
            Deferred(Vec<u32>),
        }
        let mut admit: HashMap<(&str, i32), Admit> = HashMap::new();
        for row in 0..batch.num_rows() {
            let folder = if self.partitioner.is_partitioned() {
                self.partitioner.folder(batch, row)
            } else {
                String::new()
            };
            let tp = (topics.value(row), partitions.value(row));
            let state = admit.entry(tp).or_insert_with(|| {
                let owned: TopicPartition = (Arc::from(tp.0), tp.1);
                if self.deferred.contains_key(&owned) {
                    // Rows already wait: these go behind them.
                    return Admit::Deferred(Vec::new());
                }
                Admit::Open(
                    self.segments
                        .get(&owned)
                        .map(|s| s.files.keys().cloned().collect())
                        .unwrap_or_default(),
                )
            });
            match state {
                Admit::Deferred(rows) => {
                    rows.push(row as u32);
                    continue;
                }
                Admit::Open(open) if !open.contains(&folder) => {
                    if open.len() >= self.spec.max_open_files {
                        *state = Admit::Deferred(vec![row as u32]);
                        continue;
                    }
                    open.insert(folder.clone());
                }
                Admit::Open(_) => {}
            }
            let key = (tp.0, tp.1, folder);
            // Only a new group's key is copied; most rows join an existing group.
            let at = match index.get(&key) {
                Some(at) => *at,
                None => {
                    groups.push((key.clone(), Vec::new()));
                    index.insert(key, groups.len() - 1);
                    groups.len() - 1
                }
            };
            groups[at].1.push(row as u32);
        }
        let now = Instant::now();
        for ((topic, partition, folder), rows) in groups {
            let first = offsets.value(rows[0] as usize);
            let last = offsets.value(*rows.last().expect("groups are not empty") as usize);
            let count = rows.len();
            let sub = if count == batch.num_rows() {
                batch.clone()
            } else {
                take_record_batch(batch, &UInt32Array::from(rows))?
            };
            let tp: TopicPartition = (Arc::from(topic), partition);
            let segment = self.segments.entry(tp.clone()).or_insert_with(|| Segment {
                first,
                last,
                rows: 0,
                opened: now,
                touched: now,
                files: BTreeMap::new(),
            });
            if !segment.files.contains_key(&folder) {
                self.counter += 1;
                let tmp = self.storage.tmp_dir().join(format!(
                    "{}{first:020}-{}-{}.parquet.tmp",
                    tmp_prefix(topic, partition),
                    std::process::id(),
                    self.counter
                ));
                let file = File::create(&tmp).map_err(|source| StorageError::Io {
                    path: tmp.display().to_string(),
                    source,
                })?;
                let writer = ArrowWriter::try_new(
                    file,
                    self.schema.arrow.clone(),
                    Some(self.properties.clone()),
                )
                .map_err(|source| ParquetSinkError::Write {
                    path: tmp.display().to_string(),
                    source,
                })?;
                segment
                    .files
                    .insert(folder.clone(), OpenFile { tmp, writer });
            }
            let open = segment.files.get_mut(&folder).expect("just inserted");
            open.writer
                .write(&sub)
                .map_err(|source| ParquetSinkError::Write {
                    path: open.tmp.display().to_string(),
                    source,
                })?;
            segment.first = segment.first.min(first);
            segment.last = segment.last.max(last);
            segment.rows += count as u64;
            segment.touched = now;
        }
        for ((topic, partition), state) in admit {
            let Admit::Deferred(rows) = state else {
                continue;
            };
            let tp: TopicPartition = (Arc::from(topic), partition);
            let rows = take_record_batch(batch, &UInt32Array::from(rows))?;
            let rows = match self.deferred.remove(&tp) {
                Some(earlier) => {
                    arrow::compute::concat_batches(&batch.schema(), [&earlier, &rows])?
                }
                None => rows,
            };
            self.deferred.insert(tp, rows);
        }
        Ok(())
    }

    /// The first offset of a partition's open segment or deferred rows: nothing from there on
    /// is durable yet.
    pub fn open_first(&self, tp: &TopicPartition) -> Option<i64> {
        let deferred = self
            .deferred
            .get(tp)
            .map(|b| crate::schema::provenance(b).2.value(0));
        self.segments
            .get(tp)
            .map(|s| s.first)
            .into_iter()
            .chain(deferred)
            .min()
    }

    /// Partitions whose segment should be finished now, and why.
    pub fn due(&self) -> Vec<(TopicPartition, Roll)> {
        let now = Instant::now();
        self.segments
            .iter()
            .filter_map(|(tp, s)| {
                let why = if self.deferred.contains_key(tp) {
                    Roll::OpenFiles
                } else if s.size() >= self.spec.max_file_size {
                    Roll::Size
                } else if now.duration_since(s.opened) >= self.spec.max_file_age {
                    Roll::Age
                } else if now.duration_since(s.touched) >= self.spec.idle_flush {
                    Roll::Idle
                } else {
                    return None;
                };
                Some((tp.clone(), why))
            })
            .chain(
                self.deferred
                    .keys()
                    .filter(|tp| !self.segments.contains_key(*tp))
                    .map(|tp| (tp.clone(), Roll::OpenFiles)),
            )
            .collect()
    }

    /// Drops a partition's open segment without publishing anything: its temporary files are
    /// removed. For a partition this member no longer owns (a revocation past its deadline, a
    /// lost assignment): another member writes those offsets from the committed position.
    pub fn discard(&mut self, tp: &TopicPartition) -> Result<(), ParquetSinkError> {
        self.deferred.remove(tp);
        if let Some(segment) = self.segments.remove(tp) {
            drop(segment);
            let removed = self.storage.clean_tmp(&tmp_prefix(&tp.0, tp.1))?;
            warn!(topic = %tp.0, partition = tp.1, removed,
                  "Discarded an open segment of a partition that is no longer ours.");
        }
        Ok(())
    }

    /// Partitions with an open segment (or rows deferred to the next one).
    pub fn open_partitions(&self) -> Vec<TopicPartition> {
        let mut open: Vec<TopicPartition> = self.segments.keys().cloned().collect();
        open.extend(
            self.deferred
                .keys()
                .filter(|tp| !self.segments.contains_key(*tp))
                .cloned(),
        );
        open
    }

    /// Finishes a partition's segment (see the module docs for the order of steps).
    pub async fn finish(
        &mut self,
        tp: &TopicPartition,
        why: Roll,
    ) -> Result<Option<Finished>, ParquetSinkError> {
        let Some(segment) = self.segments.remove(tp) else {
            return Ok(None);
        };
        let (topic, partition) = (&*tp.0, tp.1);
        let started = Instant::now();
        let name = file_name(
            &self.pipeline,
            topic,
            partition,
            segment.first,
            segment.last,
        );
        let metadata = [
            ("sluice.pipeline", self.pipeline.clone()),
            ("sluice.schema_fingerprint", self.schema.fingerprint.clone()),
            ("sluice.topic", topic.to_owned()),
            ("sluice.partition", partition.to_string()),
            ("sluice.first_offset", segment.first.to_string()),
            ("sluice.last_offset", segment.last.to_string()),
        ];
        let mut files = Vec::with_capacity(segment.files.len());
        tokio::task::block_in_place(|| -> Result<(), ParquetSinkError> {
            for (folder, mut open) in segment.files {
                for (k, v) in &metadata {
                    open.writer
                        .append_key_value_metadata(KeyValue::new(k.to_string(), v.clone()));
                }
                let path = open.tmp.display().to_string();
                open.writer
                    .close()
                    .map_err(|source| ParquetSinkError::Write { path, source })?;
                let rel = if folder.is_empty() {
                    name.clone()
                } else {
                    format!("{folder}/{name}")
                };
                files.push((open.tmp, rel));
            }
            Ok(())
        })?;
        let manifest = Manifest {
            pipeline: self.pipeline.clone(),
            topic: topic.to_owned(),
            partition,
            first_offset: segment.first,
            last_offset: segment.last,
            rows: segment.rows,
            schema_fingerprint: self.schema.fingerprint.clone(),
            files: files.iter().map(|(_, rel)| rel.clone()).collect(),
        };
        let manifest_path = manifest_name(&self.pipeline, topic, partition, segment.last);
        let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
        let staging = format!("{}manifest", tmp_prefix(topic, partition));
        self.storage
            .put_new(&manifest_path, json.into(), &staging)
            .await?;
        let mut bytes = 0;
        for (tmp, rel) in &files {
            bytes += self.storage.publish(tmp, rel).await?;
        }
        // Only the newest manifest is needed for recovery.
        let dir = manifest_dir(&self.pipeline, topic, partition);
        let newest = format!("{:020}.json", segment.last);
        for old in self.storage.list(&dir).await? {
            if old < newest {
                self.storage.delete(&format!("{dir}/{old}")).await?;
            }
        }
        let labels = [
            ("pipeline", self.pipeline.clone()),
            ("reason", why.as_str().to_owned()),
        ];
        metrics::counter!("sluice_parquet_files_total", &labels).increment(files.len() as u64);
        metrics::counter!("sluice_parquet_rows_total", "pipeline" => self.pipeline.clone())
            .increment(segment.rows);
        metrics::counter!("sluice_parquet_bytes_total", "pipeline" => self.pipeline.clone())
            .increment(bytes);
        crate::telemetry::stage(&self.pipeline, "parquet_finish", started);
        debug!(
            topic,
            partition,
            first = segment.first,
            last = segment.last,
            rows = segment.rows,
            files = files.len(),
            reason = why.as_str(),
            "Segment finished."
        );
        Ok(Some(Finished { manifest, bytes }))
    }
}

#[cfg(test)]
mod tests;

#[async_trait::async_trait]
impl Sink for ParquetSink {
    fn name(&self) -> &'static str {
        "parquet"
    }

    async fn write(
        &mut self,
        rows: &RecordBatch,
        _originals: Option<&crate::event::Originals>,
        _cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<Vec<Refusal>, SinkError> {
        let started = Instant::now();
        tokio::task::block_in_place(|| ParquetSink::write(self, rows))
            .map_err(SinkError::failed)?;
        crate::telemetry::stage(&self.pipeline, "parquet_write", started);
        Ok(Vec::new())
    }

    fn not_durable_from(&self, tp: &TopicPartition) -> Option<i64> {
        self.open_first(tp)
    }

    fn due(&self) -> Vec<(TopicPartition, Roll)> {
        ParquetSink::due(self)
    }

    fn holding(&self) -> Vec<TopicPartition> {
        self.open_partitions()
    }

    /// Finishes the partition's segment; rows deferred for want of open files then go into the
    /// next one (which may defer again: the partition is then still `due`).
    async fn make_durable(&mut self, tp: &TopicPartition, why: Roll) -> Result<(), SinkError> {
        self.finish(tp, why).await.map(drop).map_err(|e| {
            SinkError::failed(ContextError(
                format!("finishing the Parquet segment of {}/{}", tp.0, tp.1),
                e,
            ))
        })?;
        if let Some(rows) = self.deferred.remove(tp) {
            tokio::task::block_in_place(|| ParquetSink::write(self, &rows))
                .map_err(SinkError::failed)?;
        }
        Ok(())
    }

    async fn recover(
        &mut self,
        tp: &TopicPartition,
        committed: Option<i64>,
    ) -> Result<Option<i64>, SinkError> {
        ParquetSink::recover(self, tp, committed)
            .await
            .map_err(|e| {
                SinkError::failed(ContextError(format!("recovering {}/{}", tp.0, tp.1), e))
            })
    }

    fn discard(&mut self, tp: &TopicPartition) -> Result<(), SinkError> {
        ParquetSink::discard(self, tp).map_err(SinkError::failed)
    }
}

/// A sink error with what was being done.
#[derive(Debug, Error)]
#[error("{0}: {1}")]
struct ContextError(String, #[source] ParquetSinkError);
