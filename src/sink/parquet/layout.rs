//! Names: Hive partition folders, finished files, temporary files and manifests.
//!
//! ```text
//! <root>/dt=2026-11-21/hour=18/<pipeline>+<topic>+<partition>+<first>-<last>.parquet   finished
//! <root>/_sluice/manifests/<pipeline>/<topic>/<partition>/<last>.json        one per segment
//! <root>/_sluice/tmp/<pipeline>/<topic>+<partition>+<first>-<n>.parquet.tmp  being written (local)
//! ```
//! Offsets are zero-padded to 20 digits so names sort by offset. Folders starting with `_` are
//! skipped by Hive, Spark, pyarrow and DuckDB.

use arrow::{
    array::{Array, AsArray},
    datatypes::{DataType, Date32Type, Int64Type, TimestampMicrosecondType},
    record_batch::RecordBatch,
};
use chrono::{DateTime, Datelike, Timelike};

use crate::config::PartitionKey;

/// The Hive value for nulls.
pub const NULL_PARTITION: &str = "__HIVE_DEFAULT_PARTITION__";

/// Finished file name of a segment, inside its Hive folder. The pipeline is part of it, so
/// that pipelines sharing a root never write one file (review finding A16); `+` is in neither
/// pipeline nor topic names, so no two (pipeline, topic, partition) share a name.
pub fn file_name(pipeline: &str, topic: &str, partition: i32, first: i64, last: i64) -> String {
    format!("{pipeline}+{topic}+{partition}+{first:020}-{last:020}.parquet")
}

/// Manifest folder of a partition, relative to the root.
pub fn manifest_dir(pipeline: &str, topic: &str, partition: i32) -> String {
    format!("_sluice/manifests/{pipeline}/{topic}/{partition}")
}

/// Manifest of the segment ending at `last`.
pub fn manifest_name(pipeline: &str, topic: &str, partition: i32, last: i64) -> String {
    format!(
        "{}/{last:020}.json",
        manifest_dir(pipeline, topic, partition)
    )
}

/// Prefix of a partition's temporary files: only the partition's owner touches them. `+` is
/// not allowed in Kafka topic names, so no other partition's prefix starts with this one
/// (with `-`, `orders`/1's prefix `orders-1-` was also that of topic `orders-1`: review
/// finding A10).
pub fn tmp_prefix(topic: &str, partition: i32) -> String {
    format!("{topic}+{partition}+")
}

#[cfg(test)]
#[test]
fn temporary_prefixes_of_different_partitions_never_overlap() {
    let names = [
        ("orders", 1),
        ("orders-1", 2),
        ("orders", 12),
        ("orders.1", 2),
    ];
    for a in names {
        for b in names {
            if a != b {
                let (pa, pb) = (tmp_prefix(a.0, a.1), tmp_prefix(b.0, b.1));
                assert!(!pb.starts_with(&pa), "{pa} is a prefix of {pb}");
            }
        }
    }
}

/// Hive-escapes a partition value (as Hive's `FileUtils.escapePathName` does).
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if c < ' ' || "\"#%'*/:=?\\\x7f{[]^".contains(c) {
            out.push_str(&format!("%{:02X}", c as u32));
        } else {
            out.push(c);
        }
    }
    if out.is_empty() {
        NULL_PARTITION.to_owned()
    } else {
        out
    }
}

/// Computes each row's Hive folder (`dt=.../hour=.../country=...`); empty without partitioning.
pub struct Partitioner {
    keys: Vec<PartitionKey>,
    /// Index of the time column in the batches.
    time_column: Option<usize>,
    /// Index of each `Field` key's column.
    field_columns: Vec<Option<usize>>,
}

impl Partitioner {
    pub fn new(
        keys: Vec<PartitionKey>,
        time_column: Option<usize>,
        schema: &arrow::datatypes::Schema,
    ) -> Self {
        let field_columns = keys
            .iter()
            .map(|k| match k {
                PartitionKey::Field(name) => schema.index_of(name).ok(),
                _ => None,
            })
            .collect();
        Self {
            keys,
            time_column,
            field_columns,
        }
    }

    pub fn is_partitioned(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The folder of row `row`.
    pub fn folder(&self, batch: &RecordBatch, row: usize) -> String {
        let mut out = String::new();
        for (key, column) in self.keys.iter().zip(&self.field_columns) {
            if !out.is_empty() {
                out.push('/');
            }
            match key {
                PartitionKey::Date | PartitionKey::Hour => {
                    let col = batch.column(self.time_column.expect("validated: time field set"));
                    let (date, hour) = match col.data_type() {
                        DataType::Timestamp(..) => {
                            let micros = col.as_primitive::<TimestampMicrosecondType>().value(row);
                            let t = DateTime::from_timestamp_micros(micros).unwrap_or_default();
                            (t.date_naive(), t.hour())
                        }
                        _ => {
                            let days = col.as_primitive::<Date32Type>().value(row);
                            (date_from_days(days), 0)
                        }
                    };
                    if *key == PartitionKey::Date {
                        out.push_str(&format!(
                            "dt={:04}-{:02}-{:02}",
                            date.year(),
                            date.month(),
                            date.day()
                        ));
                    } else {
                        out.push_str(&format!("hour={hour:02}"));
                    }
                }
                PartitionKey::Field(name) => {
                    let col = batch.column(column.expect("validated: field exists"));
                    let value = if col.is_null(row) {
                        NULL_PARTITION.to_owned()
                    } else {
                        match col.data_type() {
                            DataType::Utf8 => escape(col.as_string::<i32>().value(row)),
                            DataType::Int64 => {
                                col.as_primitive::<Int64Type>().value(row).to_string()
                            }
                            DataType::Boolean => col.as_boolean().value(row).to_string(),
                            DataType::Date32 => {
                                date_from_days(col.as_primitive::<Date32Type>().value(row))
                                    .to_string()
                            }
                            other => unreachable!("validated partition column type {other}"),
                        }
                    };
                    out.push_str(name);
                    out.push('=');
                    out.push_str(&value);
                }
            }
        }
        out
    }
}

fn date_from_days(days: i32) -> chrono::NaiveDate {
    chrono::NaiveDate::from_num_days_from_ce_opt(days + 719_163).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_by_offset() {
        assert_eq!(
            file_name("etl", "orders", 3, 10, 99),
            "etl+orders+3+00000000000000000010-00000000000000000099.parquet"
        );
        // `-` and `.` are in pipeline and topic names; `+` in neither.
        assert_ne!(
            file_name("a-b", "c", 1, 0, 0),
            file_name("a", "b-c", 1, 0, 0)
        );
        assert!(manifest_name("p", "t", 0, 9) < manifest_name("p", "t", 0, 10));
    }

    #[test]
    fn escapes_like_hive() {
        assert_eq!(escape("São Paulo"), "São Paulo");
        assert_eq!(escape("a/b=c"), "a%2Fb%3Dc");
        assert_eq!(escape("100%"), "100%25");
        assert_eq!(escape(""), NULL_PARTITION);
    }
}
