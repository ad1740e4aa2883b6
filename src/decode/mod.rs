//! Decode and validate: Kafka payloads → one Arrow [`RecordBatch`] per micro-batch.
//!
//! Every event is checked completely (size, UTF-8, nesting, JSON syntax, schema) before any of
//! its values reach the column builders, so one bad event never fails its batch: it becomes a
//! [`crate::source::Rejected`] carrying the original bytes and the reason, and the batch goes on.

mod columns;
mod json;
pub mod stage;
mod time;

use std::{borrow::Cow, sync::Arc};

use self::{
    columns::{as_integer, Column},
    json::{member, Json},
    time::{parse_date, parse_date_time},
};
pub use crate::event::DecodeError;
use arrow::{
    array::{ArrayRef, Int32Builder, Int64Builder, StringBuilder, TimestampMillisecondBuilder},
    record_batch::RecordBatch,
};

/// An object's members, as parsed.
type Members<'a> = Vec<(Cow<'a, str>, Json<'a>)>;
use crate::schema::{EventSchema, FieldDef, Kind, ObjectType};

/// Limits that protect the decoder from hostile payloads.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Larger payloads are rejected before parsing.
    pub max_event_size: usize,
    /// Deeper nesting of objects and arrays is rejected before parsing.
    pub max_depth: usize,
}

impl From<&crate::config::ErrorSpec> for Limits {
    /// The limits a pipeline's `[errors]` section sets.
    fn from(errors: &crate::config::ErrorSpec) -> Self {
        Self {
            max_event_size: errors.max_event_size,
            max_depth: errors.max_depth,
        }
    }
}

/// Where an event came from, as the source saw it.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    /// Kafka message timestamp, milliseconds since the epoch.
    pub timestamp: Option<i64>,
}

/// Turns events into Arrow rows; owns the builders of the micro-batch being assembled.
pub struct Decoder {
    schema: Arc<EventSchema>,
    limits: Limits,
    columns: Vec<Column>,
    topic: StringBuilder,
    partition: Int32Builder,
    offset: Int64Builder,
    timestamp: TimestampMillisecondBuilder,
    rows: usize,
}

impl Decoder {
    pub fn new(schema: Arc<EventSchema>, limits: Limits) -> Self {
        let columns = schema
            .root
            .fields
            .iter()
            .map(|f| Column::new(f, 1024))
            .collect();
        Self {
            schema,
            limits,
            columns,
            topic: StringBuilder::new(),
            partition: Int32Builder::new(),
            offset: Int64Builder::new(),
            timestamp: TimestampMillisecondBuilder::new().with_timezone("UTC"),
            rows: 0,
        }
    }

    /// Rows appended since the last [`Decoder::finish`].
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Validates one event and appends it as a row, or says why it was rejected.
    pub fn push(&mut self, origin: Origin<'_>, payload: Option<&[u8]>) -> Result<(), DecodeError> {
        let object = self.parse(payload)?;
        validate_object(&self.schema.root, &object, "")?;
        for (column, def) in self.columns.iter_mut().zip(&self.schema.root.fields) {
            column.append(def, member(&object, &def.name));
        }
        self.topic.append_value(origin.topic);
        self.partition.append_value(origin.partition);
        self.offset.append_value(origin.offset);
        self.timestamp.append_option(origin.timestamp);
        self.rows += 1;
        Ok(())
    }

    /// Checks a payload's bytes and parses it into a JSON object.
    fn parse<'p>(&self, payload: Option<&'p [u8]>) -> Result<Members<'p>, DecodeError> {
        let bytes = payload.unwrap_or_default();
        if bytes.is_empty() {
            return Err(DecodeError::Empty);
        }
        if bytes.len() > self.limits.max_event_size {
            return Err(DecodeError::TooLarge {
                size: bytes.len(),
                limit: self.limits.max_event_size,
            });
        }
        let text = std::str::from_utf8(bytes).map_err(|e| DecodeError::NotUtf8 {
            at: e.valid_up_to(),
        })?;
        if nesting_exceeds(bytes, self.limits.max_depth) {
            return Err(DecodeError::TooDeep {
                limit: self.limits.max_depth,
            });
        }
        match Json::parse(text) {
            Ok(Json::Object(members)) => Ok(members),
            Ok(other) => Err(DecodeError::NotObject {
                found: json_type(&other),
            }),
            Err(e) if e.is_eof() => Err(DecodeError::Truncated {
                detail: e.to_string(),
            }),
            Err(e) => Err(DecodeError::InvalidJson {
                detail: e.to_string(),
            }),
        }
    }

    /// Finishes the batch (event columns, then source columns) and resets the builders.
    pub fn finish(&mut self) -> RecordBatch {
        let mut arrays: Vec<ArrayRef> = self
            .columns
            .iter_mut()
            .zip(&self.schema.root.fields)
            .map(|(c, f)| c.finish(f))
            .collect();
        arrays.push(Arc::new(self.topic.finish()));
        arrays.push(Arc::new(self.partition.finish()));
        arrays.push(Arc::new(self.offset.finish()));
        arrays.push(Arc::new(self.timestamp.finish()));
        self.rows = 0;
        RecordBatch::try_new(self.schema.arrow.clone(), arrays)
            .expect("builders follow the Arrow schema they were made from")
    }
}

/// True when `{`/`[` nest deeper than `limit` outside strings. A linear scan that runs before
/// the parser, so a hostile payload cannot make the parser recurse.
fn nesting_exceeds(bytes: &[u8], limit: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

fn json_type(v: &Json<'_>) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Float(_) => "a number",
        Json::Int(_) | Json::UInt(_) => "an integer",
        Json::Str(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

fn field_path(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}.{name}")
    }
}

fn validate_object(
    obj: &ObjectType,
    members: &[(Cow<'_, str>, Json<'_>)],
    prefix: &str,
) -> Result<(), DecodeError> {
    for def in &obj.fields {
        let path = || field_path(prefix, &def.name);
        match member(members, &def.name) {
            // JSON Schema's `required` means present: a required field that allows null must
            // be there, as null or a value (review finding A17).
            None if def.required => return Err(DecodeError::Missing { field: path() }),
            Some(Json::Null) if def.required && !def.nullable => {
                return Err(DecodeError::Missing { field: path() })
            }
            None => {}
            Some(Json::Null) if def.nullable || !def.required => {}
            Some(v) => validate_value(def, v, &path())?,
        }
    }
    if obj.deny_unknown {
        if let Some(name) = members
            .iter()
            .map(|(k, _)| k)
            .find(|k| obj.fields.iter().all(|f| f.name != **k))
        {
            return Err(DecodeError::UnexpectedField {
                field: field_path(prefix, name),
            });
        }
    }
    Ok(())
}

fn validate_value(def: &FieldDef, v: &Json<'_>, path: &str) -> Result<(), DecodeError> {
    let wrong = |expected| DecodeError::WrongType {
        field: path.to_owned(),
        expected,
        found: json_type(v),
    };
    let range = |detail| DecodeError::OutOfRange {
        field: path.to_owned(),
        detail,
    };
    match &def.kind {
        Kind::String {
            min_length,
            max_length,
            allowed,
        } => {
            let s = v.as_str().ok_or_else(|| wrong("a string"))?;
            if min_length.is_some() || max_length.is_some() {
                let len = s.chars().count() as u64;
                if let Some(max) = max_length.filter(|m| len > *m) {
                    return Err(range(format!("length {len} is over maxLength {max}")));
                }
                if let Some(min) = min_length.filter(|m| len < *m) {
                    return Err(range(format!("length {len} is under minLength {min}")));
                }
            }
            if let Some(allowed) = allowed {
                if !allowed.iter().any(|a| a == s) {
                    return Err(DecodeError::NotInEnum {
                        field: path.to_owned(),
                        value: format!("{s:?}"),
                    });
                }
            }
        }
        Kind::Integer { bounds, allowed } => {
            let n = as_integer(v).ok_or_else(|| wrong("an integer"))?;
            if let Some(detail) = bounds.check(n as f64) {
                return Err(range(detail));
            }
            if let Some(allowed) = allowed {
                if !allowed.contains(&n) {
                    return Err(DecodeError::NotInEnum {
                        field: path.to_owned(),
                        value: n.to_string(),
                    });
                }
            }
        }
        Kind::Number { bounds } => {
            let n = v.as_f64().ok_or_else(|| wrong("a number"))?;
            if let Some(detail) = bounds.check(n) {
                return Err(range(detail));
            }
        }
        Kind::Boolean => {
            v.as_bool().ok_or_else(|| wrong("a boolean"))?;
        }
        Kind::DateTime | Kind::Date => {
            let s = v.as_str().ok_or_else(|| wrong("a string"))?;
            let (ok, expected) = if matches!(def.kind, Kind::DateTime) {
                (parse_date_time(s).is_ok(), "RFC 3339 date-time")
            } else {
                (parse_date(s).is_ok(), "date (YYYY-MM-DD)")
            };
            if !ok {
                return Err(DecodeError::BadTimestamp {
                    field: path.to_owned(),
                    value: s.chars().take(64).collect(),
                    expected,
                });
            }
        }
        Kind::Object(obj) => {
            let map = v.as_object().ok_or_else(|| wrong("an object"))?;
            validate_object(obj, map, path)?;
        }
        Kind::Array(item) => {
            let items = v.as_array().ok_or_else(|| wrong("an array"))?;
            for (i, x) in items.iter().enumerate() {
                let p = format!("{path}[{i}]");
                if x.is_null() {
                    if !item.nullable {
                        return Err(DecodeError::Missing { field: p });
                    }
                } else {
                    validate_value(item, x, &p)?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
