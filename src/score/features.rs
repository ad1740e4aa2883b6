//! Arrow columns → the row-major `f32` feature matrix a model takes, as `[[model.inputs]]`
//! declares it. Values are read straight from the Arrow arrays (no JSON, no per-row maps).
//!
//! Policy, also in the README:
//! - integers, numbers: the value as `f32`; booleans 1.0 / 0.0;
//! - `one_hot = [...]`: one feature per value, 1.0 where the value matches; unknown or null
//!   values are all zeros;
//! - `index = [...]`: the value's position; unknown or null values get the vocabulary's length;
//! - `extract = "hour" | "day_of_week" | "epoch_seconds"` of a date-time (UTC) or date;
//! - a null number, boolean or date-time takes the input's `null` value, and without one the
//!   event is not scored: it becomes a dead letter (stage `inference`, reason `null_input`).

use std::collections::HashMap;

use arrow::{
    array::{
        Array, ArrayRef, AsArray, BooleanArray, Date32Array, Float64Array, Int64Array,
        TimestampMicrosecondArray,
    },
    datatypes::DataType,
    record_batch::RecordBatch,
};

use super::InferenceError;
use crate::config::{Encoding, InputSpec, TimePart};

/// Encodes batches for one model.
#[derive(Debug)]
pub struct FeatureEncoder {
    inputs: Vec<Input>,
    width: usize,
}

#[derive(Debug)]
struct Input {
    spec: InputSpec,
    /// Value → position, for categorical inputs.
    vocabulary: HashMap<String, usize>,
}

/// A batch's features: the matrix of the rows that could be encoded, and why the others not.
#[derive(Debug, Default)]
pub struct Encoded {
    /// `rows.len() × width`, row-major.
    pub values: Vec<f32>,
    /// Batch row of each matrix row.
    pub rows: Vec<usize>,
    /// Batch rows that cannot be scored.
    pub rejected: Vec<(usize, InferenceError)>,
}

impl FeatureEncoder {
    pub fn new(inputs: &[InputSpec]) -> Self {
        let inputs: Vec<Input> = inputs
            .iter()
            .map(|i| Input {
                vocabulary: match &i.encoding {
                    Encoding::OneHot(v) | Encoding::Index(v) => {
                        v.iter().enumerate().map(|(n, s)| (s.clone(), n)).collect()
                    }
                    _ => HashMap::new(),
                },
                spec: i.clone(),
            })
            .collect();
        let width = inputs.iter().map(|i| i.spec.width()).sum();
        Self { inputs, width }
    }

    /// Features per row.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Encodes every row of `batch`.
    pub fn encode(&self, batch: &RecordBatch) -> Encoded {
        let n = batch.num_rows();
        let mut matrix = vec![0f32; n * self.width];
        let mut bad: Vec<Option<InferenceError>> = vec![None; n];
        let mut at = 0;
        for input in &self.inputs {
            match batch.column_by_name(&input.spec.column) {
                Some(array) => input.fill(array, &mut matrix, self.width, at, &mut bad),
                // A column the schema has but no row in this batch set (cannot happen with
                // the decoder, which writes every column): every row is null.
                None => {
                    let nulls = arrow::array::new_null_array(&DataType::Float64, n);
                    input.fill(&nulls, &mut matrix, self.width, at, &mut bad)
                }
            }
            at += input.spec.width();
        }
        if bad.iter().all(Option::is_none) {
            return Encoded {
                values: matrix,
                rows: (0..n).collect(),
                rejected: Vec::new(),
            };
        }
        let mut out = Encoded::default();
        for (row, why) in bad.into_iter().enumerate() {
            match why {
                None => {
                    out.values
                        .extend_from_slice(&matrix[row * self.width..(row + 1) * self.width]);
                    out.rows.push(row);
                }
                Some(e) => out.rejected.push((row, e)),
            }
        }
        out
    }
}

impl Input {
    /// Writes this input's features of every row at column `at` of the matrix.
    fn fill(
        &self,
        array: &ArrayRef,
        matrix: &mut [f32],
        width: usize,
        at: usize,
        bad: &mut [Option<InferenceError>],
    ) {
        let cells = matrix
            .chunks_exact_mut(width)
            .map(move |row| &mut row[at..]);
        match &self.spec.encoding {
            Encoding::OneHot(_) | Encoding::Index(_) => {
                let one_hot = matches!(self.spec.encoding, Encoding::OneHot(_));
                let unknown = self.vocabulary.len();
                let strings = array.as_string_opt::<i32>();
                for (row, cell) in cells.enumerate() {
                    let pos = strings
                        .filter(|s| s.is_valid(row))
                        .and_then(|s| self.vocabulary.get(s.value(row)).copied());
                    match (one_hot, pos) {
                        (true, Some(p)) => cell[p] = 1.0,
                        (true, None) => {}
                        (false, p) => cell[0] = p.unwrap_or(unknown) as f32,
                    }
                }
            }
            Encoding::Number | Encoding::Extract(_) => {
                let value = self.numeric(array);
                for (row, cell) in cells.enumerate() {
                    match value(row).or(self.spec.null) {
                        Some(v) => cell[0] = v,
                        None => {
                            bad[row].get_or_insert_with(|| InferenceError::NullInput {
                                column: self.spec.column.clone(),
                            });
                        }
                    }
                }
            }
        }
    }

    /// Reads row `i` as a number (`None` when null).
    fn numeric<'a>(&self, array: &'a ArrayRef) -> Box<dyn Fn(usize) -> Option<f32> + 'a> {
        fn valid<A: Array>(a: &A, i: usize) -> bool {
            a.is_valid(i)
        }
        let part = match self.spec.encoding {
            Encoding::Extract(p) => Some(p),
            _ => None,
        };
        let any = array.as_any();
        if let Some(a) = any.downcast_ref::<Float64Array>() {
            return Box::new(move |i| valid(a, i).then(|| a.value(i) as f32));
        }
        if let Some(a) = any.downcast_ref::<Int64Array>() {
            return Box::new(move |i| valid(a, i).then(|| a.value(i) as f32));
        }
        if let Some(a) = any.downcast_ref::<BooleanArray>() {
            return Box::new(move |i| valid(a, i).then(|| f32::from(u8::from(a.value(i)))));
        }
        if let Some(a) = any.downcast_ref::<TimestampMicrosecondArray>() {
            let part = part.unwrap_or(TimePart::EpochSeconds);
            return Box::new(move |i| valid(a, i).then(|| time_part(a.value(i), part)));
        }
        if let Some(a) = any.downcast_ref::<Date32Array>() {
            let part = part.unwrap_or(TimePart::EpochSeconds);
            return Box::new(move |i| {
                valid(a, i).then(|| time_part(i64::from(a.value(i)) * 86_400_000_000, part))
            });
        }
        // Validation only lets the types above through; anything else reads as null.
        Box::new(|_| None)
    }
}

/// A part of a UTC time given in microseconds since the epoch.
fn time_part(micros: i64, part: TimePart) -> f32 {
    let secs = micros.div_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    match part {
        TimePart::Hour => (secs.rem_euclid(86_400) / 3_600) as f32,
        // 1970-01-01 was a Thursday (3 with Monday = 0).
        TimePart::DayOfWeek => (days + 3).rem_euclid(7) as f32,
        TimePart::EpochSeconds => secs as f32,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::{
        array::{BooleanArray, Float64Array, StringArray, TimestampMicrosecondArray},
        datatypes::{Field, Schema, TimeUnit},
    };

    use super::*;

    fn input(column: &str, encoding: Encoding, null: Option<f32>) -> InputSpec {
        InputSpec {
            column: column.into(),
            redis: false,
            encoding,
            null,
        }
    }

    #[test]
    fn encodes_every_kind_and_applies_the_null_policy() {
        let schema = Schema::new(vec![
            Field::new("amount", DataType::Float64, true),
            Field::new("currency", DataType::Utf8, true),
            Field::new("new", DataType::Boolean, true),
            Field::new(
                "at",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                false,
            ),
        ]);
        // 2026-11-21T18:30:00Z is a Saturday.
        let at = 1_795_285_800_000_000i64;
        let batch = RecordBatch::try_new(
            Arc::new(schema),
            vec![
                Arc::new(Float64Array::from(vec![Some(12.5), None, None])),
                Arc::new(StringArray::from(vec![Some("USD"), Some("XYZ"), None])),
                Arc::new(BooleanArray::from(vec![Some(true), None, Some(false)])),
                Arc::new(TimestampMicrosecondArray::from(vec![at, at, at]).with_timezone("UTC")),
            ],
        )
        .unwrap();
        let vocab = vec!["EUR".to_string(), "USD".to_string()];
        let enc = FeatureEncoder::new(&[
            input("amount", Encoding::Number, None),
            input("currency", Encoding::OneHot(vocab.clone()), None),
            input("currency", Encoding::Index(vocab), None),
            input("new", Encoding::Number, Some(-1.0)),
            input("at", Encoding::Extract(TimePart::Hour), None),
            input("at", Encoding::Extract(TimePart::DayOfWeek), None),
        ]);
        assert_eq!(enc.width(), 7);
        let out = enc.encode(&batch);
        assert_eq!(out.rows, vec![0]);
        assert_eq!(out.values, vec![12.5, 0.0, 1.0, 1.0, 1.0, 18.0, 5.0]);
        assert_eq!(out.rejected.len(), 2);
        assert_eq!(out.rejected[0].0, 1);
        assert_eq!(out.rejected[0].1.reason(), "null_input");

        // With a fill value, the nulls are scored; unknown and null categories encode as
        // zeros (one-hot) and the vocabulary's length (index).
        let enc = FeatureEncoder::new(&[
            input("amount", Encoding::Number, Some(0.0)),
            input("currency", Encoding::OneHot(vec!["USD".into()]), None),
            input("currency", Encoding::Index(vec!["USD".into()]), None),
            input("new", Encoding::Number, Some(-1.0)),
        ]);
        let out = enc.encode(&batch);
        assert!(out.rejected.is_empty());
        assert_eq!(
            out.values,
            vec![12.5, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0, 1.0, 0.0]
        );
    }
}
