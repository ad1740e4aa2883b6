//! Event schemas: a documented subset of JSON Schema, compiled to a validator and an Arrow schema.
//!
//! Supported (anything else is rejected with its path, never silently ignored):
//! - the root is `{"type": "object", "properties": {...}}`;
//! - `type`: `string`, `integer`, `number`, `boolean`, `object` (with `properties`), `array`
//!   (with `items`), optionally with `"null"` as in `["string", "null"]`;
//! - `required` (present and not null, unless the type allows null);
//! - `enum` (strings or integers), `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`,
//!   `minLength`, `maxLength`, `format: date-time | date` on strings;
//! - `additionalProperties: false` rejects events with fields not in `properties`; by default
//!   fields not in the schema are ignored (not stored);
//! - annotations that change nothing: `$schema`, `$id`, `$comment`, `title`, `description`,
//!   `default`, `examples`.
//!
//! Mapping to Arrow, deterministic and in `properties` order: string → Utf8, integer → Int64,
//! number → Float64, boolean → Boolean, `date-time` → Timestamp(µs, UTC), `date` → Date32,
//! object → Struct, array → List. A field is non-nullable in Arrow only if it is required and
//! its type does not allow null. Every batch also carries the source columns `_topic`,
//! `_partition`, `_offset` and `_timestamp` (see [`source_fields`]).

use std::{path::Path, sync::Arc};

use arrow::datatypes::{DataType, Field, Fields, Schema as ArrowSchema, SchemaRef, TimeUnit};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// A compiled event schema.
#[derive(Debug)]
pub struct EventSchema {
    /// The root object's fields, in `properties` order.
    pub root: ObjectType,
    /// Arrow schema of the decoded batches: the event fields, then the source columns.
    pub arrow: SchemaRef,
    /// First 16 hex digits of the SHA-256 of the canonical schema document; stored in every file.
    pub fingerprint: String,
}

/// An object's fields and whether unknown fields are allowed.
#[derive(Debug, Clone)]
pub struct ObjectType {
    pub fields: Vec<FieldDef>,
    /// `additionalProperties: false` turns unknown fields into errors.
    pub deny_unknown: bool,
}

/// One schema field.
#[derive(Debug, Clone)]
pub struct FieldDef {
    pub name: String,
    pub kind: Kind,
    /// Must be present, and non-null unless `nullable`.
    pub required: bool,
    /// The type lists `"null"`.
    pub nullable: bool,
}

/// A field's type with its constraints.
#[derive(Debug, Clone)]
pub enum Kind {
    String {
        min_length: Option<u64>,
        max_length: Option<u64>,
        allowed: Option<Vec<String>>,
    },
    Integer {
        bounds: Bounds,
        allowed: Option<Vec<i64>>,
    },
    Number {
        bounds: Bounds,
    },
    Boolean,
    /// `format: date-time`, RFC 3339 with an offset; stored as UTC microseconds.
    DateTime,
    /// `format: date`, `YYYY-MM-DD`; stored as days since the epoch.
    Date,
    Object(ObjectType),
    Array(Box<FieldDef>),
}

/// Numeric range constraints.
#[derive(Debug, Clone, Default)]
pub struct Bounds {
    pub minimum: Option<f64>,
    pub maximum: Option<f64>,
    pub exclusive_minimum: Option<f64>,
    pub exclusive_maximum: Option<f64>,
}

impl Bounds {
    /// Returns a description of the violated bound, if any.
    pub fn check(&self, v: f64) -> Option<String> {
        if let Some(m) = self.minimum.filter(|m| v < *m) {
            return Some(format!("{v} is below the minimum {m}"));
        }
        if let Some(m) = self.maximum.filter(|m| v > *m) {
            return Some(format!("{v} is above the maximum {m}"));
        }
        if let Some(m) = self.exclusive_minimum.filter(|m| v <= *m) {
            return Some(format!("{v} is not above the exclusive minimum {m}"));
        }
        if let Some(m) = self.exclusive_maximum.filter(|m| v >= *m) {
            return Some(format!("{v} is not below the exclusive maximum {m}"));
        }
        None
    }
}

/// Names of the columns sluice adds to every batch, after the event's own fields.
pub const SOURCE_COLUMNS: [&str; 4] = ["_topic", "_partition", "_offset", "_timestamp"];

/// The `_topic`, `_partition` and `_offset` columns of a decoded batch.
pub fn provenance(
    batch: &arrow::record_batch::RecordBatch,
) -> (
    &arrow::array::StringArray,
    &arrow::array::Int32Array,
    &arrow::array::Int64Array,
) {
    use arrow::array::AsArray;
    use arrow::datatypes::{Int32Type, Int64Type};
    let column = |name| {
        batch
            .column_by_name(name)
            .expect("every decoded batch has the source columns")
    };
    (
        column("_topic").as_string::<i32>(),
        column("_partition").as_primitive::<Int32Type>(),
        column("_offset").as_primitive::<Int64Type>(),
    )
}

/// The source columns: topic, partition, offset and the Kafka message timestamp.
pub fn source_fields() -> Vec<Field> {
    vec![
        Field::new("_topic", DataType::Utf8, false),
        Field::new("_partition", DataType::Int32, false),
        Field::new("_offset", DataType::Int64, false),
        Field::new(
            "_timestamp",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            true,
        ),
    ]
}

const ANNOTATIONS: [&str; 7] = [
    "$schema",
    "$id",
    "$comment",
    "title",
    "description",
    "default",
    "examples",
];

impl EventSchema {
    /// Reads and compiles a schema file; every problem is listed with its JSON path.
    pub fn load(path: &Path) -> Result<Self, Vec<String>> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| vec![format!("cannot read {}: {e}", path.display())])?;
        let doc: Value = serde_json::from_str(&text)
            .map_err(|e| vec![format!("{} is not valid JSON: {e}", path.display())])?;
        Self::compile(&doc)
    }

    /// Compiles a parsed schema document.
    pub fn compile(doc: &Value) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let root = match compile_field("$", "", doc, true, &mut problems) {
            Some(FieldDef {
                kind: Kind::Object(obj),
                nullable: false,
                ..
            }) => Some(obj),
            Some(_) => {
                problems.push("$: the root must be {\"type\": \"object\", ...}".into());
                None
            }
            None => None,
        };
        match root {
            Some(root) if problems.is_empty() => {
                let mut fields: Vec<Field> = root.fields.iter().map(arrow_field).collect();
                for f in &root.fields {
                    if SOURCE_COLUMNS.contains(&f.name.as_str()) {
                        problems.push(format!(
                            "$.properties.{}: the name is reserved for a source column",
                            f.name
                        ));
                    }
                }
                if !problems.is_empty() {
                    return Err(problems);
                }
                fields.extend(source_fields());
                let canonical = serde_json::to_string(doc).expect("a Value always serializes");
                let digest = Sha256::digest(canonical.as_bytes());
                let fingerprint = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
                Ok(Self {
                    root,
                    arrow: Arc::new(ArrowSchema::new(fields)),
                    fingerprint,
                })
            }
            _ => Err(problems),
        }
    }

    /// Finds a top-level field by name.
    pub fn field(&self, name: &str) -> Option<&FieldDef> {
        self.root.fields.iter().find(|f| f.name == name)
    }
}

/// The Arrow field for a schema field.
pub fn arrow_field(def: &FieldDef) -> Field {
    Field::new(
        &def.name,
        arrow_type(&def.kind),
        def.nullable || !def.required,
    )
}

fn arrow_type(kind: &Kind) -> DataType {
    match kind {
        Kind::String { .. } => DataType::Utf8,
        Kind::Integer { .. } => DataType::Int64,
        Kind::Number { .. } => DataType::Float64,
        Kind::Boolean => DataType::Boolean,
        Kind::DateTime => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        Kind::Date => DataType::Date32,
        Kind::Object(obj) => DataType::Struct(Fields::from(
            obj.fields.iter().map(arrow_field).collect::<Vec<_>>(),
        )),
        Kind::Array(item) => DataType::List(Arc::new(arrow_field(item))),
    }
}

fn compile_field(
    path: &str,
    name: &str,
    node: &Value,
    required: bool,
    problems: &mut Vec<String>,
) -> Option<FieldDef> {
    let Some(obj) = node.as_object() else {
        problems.push(format!("{path}: expected a schema object, got {node}"));
        return None;
    };
    let (ty, nullable) = match obj.get("type") {
        Some(Value::String(t)) => (t.as_str(), false),
        Some(Value::Array(types)) => {
            let names: Vec<&str> = types.iter().filter_map(Value::as_str).collect();
            let non_null: Vec<&str> = names.iter().copied().filter(|t| *t != "null").collect();
            if names.len() != types.len() || non_null.len() != 1 || names.len() > 2 {
                problems.push(format!(
                    "{path}.type: only one type, optionally with \"null\", is supported"
                ));
                return None;
            }
            (non_null[0], names.len() == 2)
        }
        Some(other) => {
            problems.push(format!("{path}.type: expected a string, got {other}"));
            return None;
        }
        None => {
            problems.push(format!("{path}: `type` is required"));
            return None;
        }
    };
    let format = obj.get("format").and_then(Value::as_str);
    let mut allowed_keys: Vec<&str> = vec!["type"];
    let kind = match ty {
        "string" => {
            allowed_keys.extend(["format", "enum", "minLength", "maxLength"]);
            match format {
                Some("date-time") | Some("date") if obj.contains_key("enum") => {
                    problems.push(format!("{path}: `enum` with `format` is not supported"));
                    return None;
                }
                Some("date-time") => Kind::DateTime,
                Some("date") => Kind::Date,
                Some(other) => {
                    problems.push(format!(
                        "{path}.format: unsupported format {other:?} (supported: date-time, date)"
                    ));
                    return None;
                }
                None => Kind::String {
                    min_length: uint(obj, "minLength", path, problems),
                    max_length: uint(obj, "maxLength", path, problems),
                    allowed: enum_values(obj, path, problems, |v| v.as_str().map(str::to_owned)),
                },
            }
        }
        "integer" => {
            allowed_keys.extend(BOUND_KEYS);
            allowed_keys.push("enum");
            Kind::Integer {
                bounds: bounds(obj, path, problems),
                allowed: enum_values(obj, path, problems, Value::as_i64),
            }
        }
        "number" => {
            allowed_keys.extend(BOUND_KEYS);
            Kind::Number {
                bounds: bounds(obj, path, problems),
            }
        }
        "boolean" => Kind::Boolean,
        "object" => {
            allowed_keys.extend(["properties", "required", "additionalProperties"]);
            Kind::Object(compile_object(path, obj, problems)?)
        }
        "array" => {
            allowed_keys.push("items");
            let Some(items) = obj.get("items") else {
                problems.push(format!("{path}: an array needs `items`"));
                return None;
            };
            let item = compile_field(&format!("{path}.items"), "item", items, false, problems)?;
            Kind::Array(Box::new(item))
        }
        other => {
            problems.push(format!(
                "{path}.type: unsupported type {other:?} (supported: string, integer, number, \
                 boolean, object, array)"
            ));
            return None;
        }
    };
    for key in obj.keys() {
        if !allowed_keys.contains(&key.as_str()) && !ANNOTATIONS.contains(&key.as_str()) {
            problems.push(format!(
                "{path}.{key}: unsupported keyword for type {ty} (see the schema docs for the \
                 supported subset)"
            ));
        }
    }
    Some(FieldDef {
        name: name.to_owned(),
        kind,
        required,
        nullable,
    })
}

const BOUND_KEYS: [&str; 4] = ["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"];

fn compile_object(
    path: &str,
    obj: &Map<String, Value>,
    problems: &mut Vec<String>,
) -> Option<ObjectType> {
    let Some(props) = obj.get("properties").and_then(Value::as_object) else {
        problems.push(format!("{path}: an object needs `properties` (an object)"));
        return None;
    };
    let required: Vec<&str> = match obj.get("required") {
        None => vec![],
        Some(Value::Array(names)) => names.iter().filter_map(Value::as_str).collect(),
        Some(other) => {
            problems.push(format!(
                "{path}.required: expected an array of names, got {other}"
            ));
            vec![]
        }
    };
    for name in &required {
        if !props.contains_key(*name) {
            problems.push(format!("{path}.required: {name:?} is not in `properties`"));
        }
    }
    let deny_unknown = match obj.get("additionalProperties") {
        None | Some(Value::Bool(true)) => false,
        Some(Value::Bool(false)) => true,
        Some(_) => {
            problems.push(format!(
                "{path}.additionalProperties: only true or false is supported"
            ));
            false
        }
    };
    let mut fields = Vec::with_capacity(props.len());
    for (name, node) in props {
        let child = format!("{path}.properties.{name}");
        if let Some(f) = compile_field(
            &child,
            name,
            node,
            required.contains(&name.as_str()),
            problems,
        ) {
            fields.push(f);
        }
    }
    Some(ObjectType {
        fields,
        deny_unknown,
    })
}

fn uint(
    obj: &Map<String, Value>,
    key: &str,
    path: &str,
    problems: &mut Vec<String>,
) -> Option<u64> {
    let v = obj.get(key)?;
    let n = v.as_u64();
    if n.is_none() {
        problems.push(format!(
            "{path}.{key}: expected a non-negative integer, got {v}"
        ));
    }
    n
}

fn number(
    obj: &Map<String, Value>,
    key: &str,
    path: &str,
    problems: &mut Vec<String>,
) -> Option<f64> {
    let v = obj.get(key)?;
    let n = v.as_f64();
    if n.is_none() {
        problems.push(format!("{path}.{key}: expected a number, got {v}"));
    }
    n
}

fn bounds(obj: &Map<String, Value>, path: &str, problems: &mut Vec<String>) -> Bounds {
    Bounds {
        minimum: number(obj, "minimum", path, problems),
        maximum: number(obj, "maximum", path, problems),
        exclusive_minimum: number(obj, "exclusiveMinimum", path, problems),
        exclusive_maximum: number(obj, "exclusiveMaximum", path, problems),
    }
}

fn enum_values<T>(
    obj: &Map<String, Value>,
    path: &str,
    problems: &mut Vec<String>,
    convert: impl Fn(&Value) -> Option<T>,
) -> Option<Vec<T>> {
    let values = obj.get("enum")?;
    let Some(items) = values.as_array().filter(|a| !a.is_empty()) else {
        problems.push(format!("{path}.enum: expected a non-empty array"));
        return None;
    };
    let converted: Option<Vec<T>> = items.iter().map(&convert).collect();
    if converted.is_none() {
        problems.push(format!(
            "{path}.enum: every value must have the field's type"
        ));
    }
    converted
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn maps_types_deterministically() {
        let s = EventSchema::compile(&json!({
            "type": "object",
            "required": ["id", "at"],
            "properties": {
                "id": {"type": "string", "maxLength": 10},
                "n": {"type": "integer", "minimum": 0},
                "x": {"type": ["number", "null"]},
                "ok": {"type": "boolean"},
                "at": {"type": "string", "format": "date-time"},
                "day": {"type": "string", "format": "date"},
                "addr": {"type": "object", "properties": {"city": {"type": "string"}}},
                "tags": {"type": "array", "items": {"type": "string"}}
            }
        }))
        .unwrap();
        let names: Vec<String> = s.arrow.fields().iter().map(|f| f.name().clone()).collect();
        assert_eq!(
            names,
            [
                "id",
                "n",
                "x",
                "ok",
                "at",
                "day",
                "addr",
                "tags",
                "_topic",
                "_partition",
                "_offset",
                "_timestamp"
            ]
        );
        let f = |n: &str| s.arrow.field_with_name(n).unwrap().clone();
        assert_eq!(f("id").data_type(), &DataType::Utf8);
        assert!(!f("id").is_nullable());
        assert_eq!(f("n").data_type(), &DataType::Int64);
        assert_eq!(f("x").data_type(), &DataType::Float64);
        assert_eq!(
            f("at").data_type(),
            &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
        );
        assert_eq!(f("day").data_type(), &DataType::Date32);
        assert!(matches!(f("addr").data_type(), DataType::Struct(_)));
        assert!(matches!(f("tags").data_type(), DataType::List(_)));
        assert_eq!(s.fingerprint.len(), 16);
    }

    #[test]
    fn lists_every_unsupported_construct() {
        let errs = EventSchema::compile(&json!({
            "type": "object",
            "required": ["ghost"],
            "properties": {
                "a": {"type": "string", "pattern": "^x"},
                "b": {"type": "string", "format": "email"},
                "c": {"type": "null"},
                "d": {"anyOf": []}
            }
        }))
        .unwrap_err();
        let all = errs.join("\n");
        assert!(
            all.contains("$.properties.a.pattern: unsupported keyword"),
            "{all}"
        );
        assert!(
            all.contains("$.properties.b.format: unsupported format \"email\""),
            "{all}"
        );
        assert!(
            all.contains("$.properties.c.type: unsupported type \"null\""),
            "{all}"
        );
        assert!(all.contains("$.properties.d: `type` is required"), "{all}");
        assert!(
            all.contains("$.required: \"ghost\" is not in `properties`"),
            "{all}"
        );
        assert_eq!(errs.len(), 5, "{all}");
    }

    #[test]
    fn reserved_names_are_rejected() {
        let errs = EventSchema::compile(&json!({
            "type": "object", "properties": {"_offset": {"type": "integer"}}
        }))
        .unwrap_err();
        assert!(errs[0].contains("reserved"), "{errs:?}");
    }

    #[test]
    fn root_must_be_an_object() {
        assert!(EventSchema::compile(&json!({"type": "string"})).is_err());
    }
}
