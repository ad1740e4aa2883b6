//! The documented text form of scalar Arrow values (Redis fields, key templates, prediction
//! keys), one definition for every stage that writes them.

use arrow::{
    array::{Array, ArrayRef, AsArray},
    datatypes::{DataType, Date32Type, Float64Type, Int64Type, TimestampMicrosecondType},
    record_batch::RecordBatch,
};

use crate::config::KeyPart;

/// A key template filled with the row's values.
pub fn render_key(parts: &[KeyPart], batch: &RecordBatch, row: usize) -> String {
    let mut key = String::new();
    for part in parts {
        match part {
            KeyPart::Text(t) => key.push_str(t),
            KeyPart::Column(c) => key.push_str(
                &encode(batch.column_by_name(c).expect("validated key column"), row)
                    .unwrap_or_default(),
            ),
        }
    }
    key
}

/// The documented text form of a scalar value; `None` for null.
pub fn encode(column: &ArrayRef, row: usize) -> Option<String> {
    if column.is_null(row) {
        return None;
    }
    Some(match column.data_type() {
        DataType::Utf8 => column.as_string::<i32>().value(row).to_owned(),
        DataType::Int64 => column.as_primitive::<Int64Type>().value(row).to_string(),
        DataType::Float64 => column.as_primitive::<Float64Type>().value(row).to_string(),
        DataType::Boolean => column.as_boolean().value(row).to_string(),
        DataType::Timestamp(..) => {
            let micros = column.as_primitive::<TimestampMicrosecondType>().value(row);
            chrono::DateTime::from_timestamp_micros(micros)
                .unwrap_or_default()
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        }
        DataType::Date32 => {
            let days = column.as_primitive::<Date32Type>().value(row);
            chrono::NaiveDate::from_num_days_from_ce_opt(days + 719_163)
                .unwrap_or_default()
                .to_string()
        }
        other => unreachable!("validated scalar column, got {other}"),
    })
}
