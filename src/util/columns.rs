//! A record batch with columns added: the features a stage computes for the models (Redis
//! inputs), beside the event's own columns.

use std::sync::Arc;

use arrow::{
    array::ArrayRef,
    datatypes::{Field, FieldRef, Schema},
    error::ArrowError,
    record_batch::RecordBatch,
};

/// `batch` with `columns` added (nullable, named as given).
pub fn with_columns(
    batch: &RecordBatch,
    columns: Vec<(String, ArrayRef)>,
) -> Result<RecordBatch, ArrowError> {
    if columns.is_empty() {
        return Ok(batch.clone());
    }
    let mut fields: Vec<FieldRef> = batch.schema().fields().iter().cloned().collect();
    let mut arrays = batch.columns().to_vec();
    for (name, array) in columns {
        fields.push(Arc::new(Field::new(name, array.data_type().clone(), true)));
        arrays.push(array);
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
}
