//! Arrow column builders that mirror a compiled schema. Values reach them only after the whole
//! event has been validated, so appending never fails and never leaves a half-written row.

use std::sync::Arc;

use arrow::{
    array::{
        ArrayRef, BooleanBuilder, Date32Builder, Float64Builder, Int64Builder, ListArray,
        StringBuilder, StructArray, TimestampMicrosecondBuilder,
    },
    buffer::{NullBuffer, OffsetBuffer},
    datatypes::Fields,
};

use super::{
    json::{member, Json},
    time::{parse_date, parse_date_time},
};
use crate::schema::{arrow_field, FieldDef, Kind};

/// One column under construction.
pub enum Column {
    Utf8(StringBuilder),
    Int64(Int64Builder),
    Float64(Float64Builder),
    Boolean(BooleanBuilder),
    DateTime(TimestampMicrosecondBuilder),
    Date(Date32Builder),
    Struct {
        children: Vec<Column>,
        valid: Vec<bool>,
    },
    List {
        child: Box<Column>,
        offsets: Vec<i32>,
        valid: Vec<bool>,
    },
}

impl Column {
    /// An empty builder for a field.
    pub fn new(def: &FieldDef, capacity: usize) -> Self {
        match &def.kind {
            Kind::String { .. } => {
                Self::Utf8(StringBuilder::with_capacity(capacity, capacity * 16))
            }
            Kind::Integer { .. } => Self::Int64(Int64Builder::with_capacity(capacity)),
            Kind::Number { .. } => Self::Float64(Float64Builder::with_capacity(capacity)),
            Kind::Boolean => Self::Boolean(BooleanBuilder::with_capacity(capacity)),
            Kind::DateTime => Self::DateTime(
                TimestampMicrosecondBuilder::with_capacity(capacity).with_timezone("UTC"),
            ),
            Kind::Date => Self::Date(Date32Builder::with_capacity(capacity)),
            Kind::Object(obj) => Self::Struct {
                children: obj
                    .fields
                    .iter()
                    .map(|f| Column::new(f, capacity))
                    .collect(),
                valid: Vec::with_capacity(capacity),
            },
            Kind::Array(item) => Self::List {
                child: Box::new(Column::new(item, capacity)),
                offsets: vec![0],
                valid: Vec::with_capacity(capacity),
            },
        }
    }

    /// Appends a validated value; `None` and JSON null append a null.
    pub fn append(&mut self, def: &FieldDef, value: Option<&Json<'_>>) {
        let value = value.filter(|v| !v.is_null());
        match (self, &def.kind) {
            (Self::Utf8(b), _) => b.append_option(value.and_then(Json::as_str)),
            (Self::Int64(b), _) => b.append_option(value.and_then(as_integer)),
            (Self::Float64(b), _) => b.append_option(value.and_then(Json::as_f64)),
            (Self::Boolean(b), _) => b.append_option(value.and_then(Json::as_bool)),
            (Self::DateTime(b), _) => b.append_option(
                value
                    .and_then(Json::as_str)
                    .and_then(|s| parse_date_time(s).ok()),
            ),
            (Self::Date(b), _) => b.append_option(
                value
                    .and_then(Json::as_str)
                    .and_then(|s| parse_date(s).ok()),
            ),
            (Self::Struct { children, valid }, Kind::Object(obj)) => {
                let map = value.and_then(Json::as_object);
                valid.push(map.is_some());
                for (child, f) in children.iter_mut().zip(&obj.fields) {
                    child.append(f, map.and_then(|m| member(m, &f.name)));
                }
            }
            (
                Self::List {
                    child,
                    offsets,
                    valid,
                },
                Kind::Array(item),
            ) => {
                let items = value.and_then(Json::as_array);
                valid.push(items.is_some());
                let mut end = *offsets.last().expect("offsets start with 0");
                for v in items.into_iter().flatten() {
                    child.append(item, Some(v));
                    end += 1;
                }
                offsets.push(end);
            }
            _ => unreachable!("column builders are created from the same schema"),
        }
    }

    /// Finishes the column and resets the builder for the next batch.
    pub fn finish(&mut self, def: &FieldDef) -> ArrayRef {
        match (self, &def.kind) {
            (Self::Utf8(b), _) => Arc::new(b.finish()),
            (Self::Int64(b), _) => Arc::new(b.finish()),
            (Self::Float64(b), _) => Arc::new(b.finish()),
            (Self::Boolean(b), _) => Arc::new(b.finish()),
            (Self::DateTime(b), _) => Arc::new(b.finish()),
            (Self::Date(b), _) => Arc::new(b.finish()),
            (Self::Struct { children, valid }, Kind::Object(obj)) => {
                let fields: Fields = obj.fields.iter().map(arrow_field).collect();
                let arrays = children
                    .iter_mut()
                    .zip(&obj.fields)
                    .map(|(c, f)| c.finish(f))
                    .collect();
                let nulls = NullBuffer::from(std::mem::take(valid));
                Arc::new(StructArray::new(fields, arrays, Some(nulls)))
            }
            (
                Self::List {
                    child,
                    offsets,
                    valid,
                },
                Kind::Array(item),
            ) => {
                let values = child.finish(item);
                let offsets = OffsetBuffer::new(std::mem::replace(offsets, vec![0]).into());
                let nulls = NullBuffer::from(std::mem::take(valid));
                Arc::new(ListArray::new(
                    Arc::new(arrow_field(item)),
                    offsets,
                    values,
                    Some(nulls),
                ))
            }
            _ => unreachable!("column builders are created from the same schema"),
        }
    }
}

/// An integer as the schema accepts it: a JSON integer, or a float with no fractional part.
pub fn as_integer(v: &Json<'_>) -> Option<i64> {
    v.as_i64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= i64::MIN as f64 && *f < i64::MAX as f64)
            .map(|f| f as i64)
    })
}
