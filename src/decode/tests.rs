use arrow::{
    array::{Array, AsArray},
    datatypes::{Int64Type, TimestampMicrosecondType},
};
use serde_json::json;

use super::*;

fn schema() -> Arc<EventSchema> {
    Arc::new(
        EventSchema::compile(&json!({
            "type": "object",
            "required": ["id", "amount", "at", "currency"],
            "properties": {
                "id": {"type": "string", "maxLength": 8},
                "amount": {"type": "number", "minimum": 0},
                "qty": {"type": "integer", "maximum": 100},
                "currency": {"type": "string", "enum": ["EUR", "USD"]},
                "at": {"type": "string", "format": "date-time"},
                "addr": {"type": "object", "required": ["city"],
                         "properties": {"city": {"type": "string"}}},
                "tags": {"type": "array", "items": {"type": "string"}},
                "note": {"type": ["string", "null"]}
            }
        }))
        .unwrap(),
    )
}

fn decoder() -> Decoder {
    Decoder::new(
        schema(),
        Limits {
            max_event_size: 512,
            max_depth: 8,
        },
    )
}

fn origin(offset: i64) -> Origin<'static> {
    Origin {
        topic: "orders",
        partition: 3,
        offset,
        timestamp: Some(1_000),
    }
}

const GOOD: &str = r#"{"id":"o-1","amount":12.5,"qty":2,"currency":"EUR","at":"2026-11-21T18:00:00Z","addr":{"city":"Lyon"},"tags":["a","b"],"extra":1}"#;

#[test]
fn decodes_valid_rows_into_columns() {
    let mut d = decoder();
    d.push(origin(7), Some(GOOD.as_bytes())).unwrap();
    d.push(
        origin(8),
        Some(br#"{"id":"o-2","amount":1,"currency":"USD","at":"2026-11-21T19:00:00+01:00","note":null}"#),
    )
    .unwrap();
    let batch = d.finish();
    assert_eq!(batch.num_rows(), 2);
    let qty = batch
        .column_by_name("qty")
        .unwrap()
        .as_primitive::<Int64Type>();
    assert_eq!(qty.value(0), 2);
    assert!(qty.is_null(1));
    let at = batch
        .column_by_name("at")
        .unwrap()
        .as_primitive::<TimestampMicrosecondType>();
    assert_eq!(at.value(1) - at.value(0), 0, "both are 18:00 UTC");
    let offsets = batch
        .column_by_name("_offset")
        .unwrap()
        .as_primitive::<Int64Type>();
    assert_eq!(offsets.values(), &[7, 8]);
    let tags = batch.column_by_name("tags").unwrap().as_list::<i32>();
    assert_eq!(tags.value(0).len(), 2);
    assert!(tags.is_null(1));
    let addr = batch.column_by_name("addr").unwrap().as_struct();
    assert!(addr.is_valid(0) && addr.is_null(1));
    assert_eq!(d.rows(), 0, "finish resets the builders");
}

fn reject(payload: &[u8]) -> DecodeError {
    let mut d = decoder();
    let err = d.push(origin(0), Some(payload)).unwrap_err();
    assert_eq!(d.rows(), 0);
    assert_eq!(
        d.finish().num_rows(),
        0,
        "a rejected event leaves no partial row"
    );
    err
}

#[test]
fn rejects_each_kind_of_bad_event_with_a_precise_reason() {
    let cases: Vec<(&[u8], &str, &str)> = vec![
        (b"", "empty", "empty payload"),
        (b"not json", "invalid_json", "invalid JSON"),
        (br#"{"id":"o-1","amount":"#, "truncated_json", "truncated"),
        (b"\xff\xfe{}", "not_utf8", "offset 0"),
        (b"[1,2]", "not_object", "an array"),
        (b"null", "not_object", "null"),
        (
            br#"{"amount":1,"currency":"EUR","at":"2026-11-21T18:00:00Z"}"#,
            "missing_field",
            "`id`",
        ),
        (
            br#"{"id":null,"amount":1,"currency":"EUR","at":"2026-11-21T18:00:00Z"}"#,
            "missing_field",
            "`id`",
        ),
        (
            br#"{"id":"x","amount":"1","currency":"EUR","at":"2026-11-21T18:00:00Z"}"#,
            "wrong_type",
            "`amount`: expected a number, got a string",
        ),
        (
            br#"{"id":"x","amount":-1,"currency":"EUR","at":"2026-11-21T18:00:00Z"}"#,
            "out_of_range",
            "below the minimum",
        ),
        (
            br#"{"id":"x","amount":1,"qty":101,"currency":"EUR","at":"2026-11-21T18:00:00Z"}"#,
            "out_of_range",
            "above the maximum",
        ),
        (
            br#"{"id":"x","amount":1,"qty":1.5,"currency":"EUR","at":"2026-11-21T18:00:00Z"}"#,
            "wrong_type",
            "an integer",
        ),
        (
            br#"{"id":"123456789","amount":1,"currency":"EUR","at":"2026-11-21T18:00:00Z"}"#,
            "out_of_range",
            "maxLength",
        ),
        (
            br#"{"id":"x","amount":1,"currency":"GBP","at":"2026-11-21T18:00:00Z"}"#,
            "not_in_enum",
            "\"GBP\"",
        ),
        (
            br#"{"id":"x","amount":1,"currency":"EUR","at":"yesterday"}"#,
            "bad_timestamp",
            "RFC 3339",
        ),
        (
            br#"{"id":"x","amount":1,"currency":"EUR","at":"2026-11-21T18:00:00Z","addr":{}}"#,
            "missing_field",
            "`addr.city`",
        ),
        (
            br#"{"id":"x","amount":1,"currency":"EUR","at":"2026-11-21T18:00:00Z","tags":[1]}"#,
            "wrong_type",
            "`tags[0]`",
        ),
        (b"[[[[[[[[[[[[1]]]]]]]]]]]]", "too_deep", "8 levels"),
        (&[b' '; 600], "too_large", "600 bytes"),
    ];
    for (payload, reason, text) in cases {
        let err = reject(payload);
        assert_eq!(
            err.reason(),
            reason,
            "{err} for {:?}",
            String::from_utf8_lossy(payload)
        );
        assert!(
            err.to_string().contains(text),
            "{err:?} should mention {text:?}"
        );
    }
    assert_eq!(
        decoder().push(origin(0), None).unwrap_err(),
        DecodeError::Empty
    );
}

#[test]
fn a_bad_event_does_not_disturb_its_neighbours() {
    let mut d = decoder();
    d.push(origin(1), Some(GOOD.as_bytes())).unwrap();
    // Valid up to the nested struct, which is wrong: nothing of it may be appended.
    let half = br#"{"id":"x","amount":1,"currency":"EUR","at":"2026-11-21T18:00:00Z","tags":["a"],"addr":{"city":5}}"#;
    assert!(d.push(origin(2), Some(half)).is_err());
    d.push(origin(3), Some(GOOD.as_bytes())).unwrap();
    let batch = d.finish();
    assert_eq!(batch.num_rows(), 2);
    let tags = batch.column_by_name("tags").unwrap().as_list::<i32>();
    assert_eq!(tags.value(1).len(), 2);
    let offsets = batch
        .column_by_name("_offset")
        .unwrap()
        .as_primitive::<Int64Type>();
    assert_eq!(offsets.values(), &[1, 3]);
}

#[test]
fn strings_with_brackets_do_not_count_as_nesting() {
    assert!(!nesting_exceeds(br#"{"a":"[[[[[[[[[[[[[[[[\"[[[["}"#, 2));
    assert!(nesting_exceeds(b"[[[", 2));
}

#[test]
fn unknown_fields_are_rejected_only_when_the_schema_says_so() {
    let strict = Arc::new(
        EventSchema::compile(&json!({
            "type": "object", "additionalProperties": false,
            "properties": {"a": {"type": "integer"}}
        }))
        .unwrap(),
    );
    let mut d = Decoder::new(
        strict,
        Limits {
            max_event_size: 100,
            max_depth: 4,
        },
    );
    assert_eq!(
        d.push(origin(0), Some(br#"{"a":1,"b":2}"#))
            .unwrap_err()
            .reason(),
        "unexpected_field"
    );
    d.push(origin(1), Some(br#"{"a":1}"#)).unwrap();
}

/// Review finding A17: `required` means present (JSON Schema's meaning), also for a field that
/// allows null: absent is `missing_field`, an explicit null is a null.
#[test]
fn a_required_field_that_allows_null_must_be_present() {
    let schema = Arc::new(
        EventSchema::compile(&json!({
            "type": "object",
            "required": ["id", "order"],
            "properties": {"id": {"type": "string"}, "order": {"type": ["string", "null"]}}
        }))
        .unwrap(),
    );
    let mut d = Decoder::new(
        schema,
        Limits {
            max_event_size: 512,
            max_depth: 8,
        },
    );
    let absent = d.push(origin(1), Some(br#"{"id":"a"}"#)).unwrap_err();
    assert_eq!(absent.reason(), "missing_field");
    assert!(absent.to_string().contains("`order`"), "{absent}");
    d.push(origin(2), Some(br#"{"id":"b","order":null}"#))
        .unwrap();
    d.push(origin(3), Some(br#"{"id":"c","order":"o-1"}"#))
        .unwrap();
    let batch = d.finish();
    assert_eq!(batch.num_rows(), 2);
    assert!(batch.column_by_name("order").unwrap().is_null(0));
}
