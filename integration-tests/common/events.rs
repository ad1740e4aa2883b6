//! The test events: valid ones and each kind of broken one, named by their keys.

pub const SCHEMA: &str = r#"{
  "type": "object",
  "required": ["id", "customer", "amount", "at"],
  "properties": {
    "id": {"type": "string"},
    "customer": {"type": "string"},
    "amount": {"type": "number", "minimum": 0},
    "currency": {"type": "string", "enum": ["EUR", "USD"]},
    "at": {"type": "string", "format": "date-time"},
    "tags": {"type": "array", "items": {"type": "string"}}
  }
}"#;

/// A test event: its key, bytes, and the reason sluice must give if it is invalid.
pub struct TestEvent {
    pub key: String,
    pub payload: Vec<u8>,
    pub invalid: Option<&'static str>,
}

/// Event `n`: mostly valid, every 7th broken in one of several ways.
pub fn event(n: u64) -> TestEvent {
    let key = format!("k-{n}");
    let at = format!("2026-11-21T{:02}:{:02}:00Z", (n / 60) % 24, n % 60);
    let valid = format!(
        r#"{{"id":"e-{n}","customer":"c-{}","amount":{}.5,"currency":"EUR","at":"{at}","tags":["x"]}}"#,
        n % 97,
        n % 1000
    );
    let (payload, invalid) = if n % 7 != 3 {
        (valid.into_bytes(), None)
    } else {
        match (n / 7) % 9 {
            0 => (b"{not json".to_vec(), Some("invalid_json")),
            1 => (valid.as_bytes()[..20].to_vec(), Some("truncated_json")),
            2 => (vec![0xc3, 0x28, b'{', b'}'], Some("not_utf8")),
            3 => (Vec::new(), Some("empty")),
            4 => (
                format!(r#"{{"id":"e-{n}","amount":1,"at":"{at}"}}"#).into_bytes(),
                Some("missing_field"),
            ),
            5 => (
                format!(r#"{{"id":"e-{n}","customer":"c","amount":-1,"at":"{at}"}}"#).into_bytes(),
                Some("out_of_range"),
            ),
            6 => (
                format!(r#"{{"id":"e-{n}","customer":"c","amount":1,"at":"noon"}}"#).into_bytes(),
                Some("bad_timestamp"),
            ),
            7 => (
                format!("{}1{}", "[".repeat(40), "]".repeat(40)).into_bytes(),
                Some("too_deep"),
            ),
            _ => (
                format!(
                    r#"{{"id":"e-{n}","customer":"{}","amount":1,"at":"{at}"}}"#,
                    "x".repeat(5000)
                )
                .into_bytes(),
                Some("too_large"),
            ),
        }
    };
    TestEvent {
        key,
        payload,
        invalid,
    }
}

/// An oversized invalid event (key `big-<n>`): even `n` is about 1,010,000 bytes, under the
/// default `max_event_size` of 1 MiB but over librdkafka's default `message.max.bytes` of
/// 1,000,000 once it carries its dead-letter headers, with a field of the wrong type; odd `n`
/// is 3 MiB, over `max_event_size`.
pub fn oversized(n: u64) -> TestEvent {
    let (size, invalid) = if n.is_multiple_of(2) {
        (1_010_000, "wrong_type")
    } else {
        (3 << 20, "too_large")
    };
    let head = format!(
        r#"{{"id":"big-{n}","customer":"c-1","amount":"lots","currency":"EUR","at":"2026-11-21T10:00:00Z","pad":""#
    );
    let mut payload = head.into_bytes();
    payload.resize(size - 2, b'x');
    payload.extend_from_slice(b"\"}");
    TestEvent {
        key: format!("big-{n}"),
        payload,
        invalid: Some(invalid),
    }
}

/// A valid event (key `hr-<n>`, id `h-<n>`) `n` hours after 2026-01-01: consecutive ones fall
/// into different `dt`/`hour` folders.
pub fn hourly(n: u64) -> TestEvent {
    let at = chrono::DateTime::from_timestamp(1_767_225_600 + n as i64 * 3_600, 0)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    TestEvent {
        key: format!("hr-{n}"),
        payload: format!(
            r#"{{"id":"h-{n}","customer":"c-{}","amount":1.5,"at":"{at}"}}"#,
            n % 97
        )
        .into_bytes(),
        invalid: None,
    }
}

/// The test event a record's key names: `k-<n>` ([`event`]), `big-<n>` ([`oversized`]),
/// `hr-<n>` ([`hourly`]), or `hdr-<n>`: event `n` (a valid one) sent with a header name that
/// is not UTF-8.
pub fn event_of_key(key: &str) -> (String, TestEvent) {
    if let Some(n) = key.strip_prefix("hr-") {
        return (format!("h-{n}"), hourly(n.parse().unwrap()));
    }
    if let Some(n) = key.strip_prefix("hdr-") {
        let e = event(n.parse().unwrap());
        assert!(e.invalid.is_none(), "hdr-<n> takes a valid event");
        let invalid = Some("bad_header");
        return (
            key.to_owned(),
            TestEvent {
                invalid,
                key: key.to_owned(),
                ..e
            },
        );
    }
    match key.strip_prefix("big-") {
        Some(n) => (key.to_owned(), oversized(n.parse().unwrap())),
        None => {
            let n: u64 = key.trim_start_matches("k-").parse().unwrap();
            (format!("e-{n}"), event(n))
        }
    }
}
