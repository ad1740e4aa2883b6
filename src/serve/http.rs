//! The Open Inference Protocol over REST (KServe v2), with Triton's binary tensor extension,
//! so that `tritonclient.http` and the `kserve` REST client work unchanged.
//!
//! | route | answer |
//! |---|---|
//! | `GET /v2` | server metadata |
//! | `GET /v2/health/live`, `/v2/health/ready` | 200, or 503 when not ready |
//! | `GET /v2/models/{m}[/versions/{v}]` | the model's metadata (404 when unknown) |
//! | `GET /v2/models/{m}[/versions/{v}]/ready` | 200, or 503 when it cannot serve |
//! | `POST /v2/models/{m}[/versions/{v}]/infer` | the outputs |
//!
//! A request body is JSON, or (header `Inference-Header-Content-Length: N`) N bytes of JSON
//! followed by the binary data of the inputs whose `parameters.binary_data_size` says so, in
//! order. Outputs are written in binary when the request asks (`parameters.binary_data_output`,
//! or an output's `parameters.binary_data`), else as JSON arrays. `parameters.timeout`
//! (microseconds) shortens the deadline. Errors are `{"error": "..."}` with 400, 404, 429
//! (with `Retry-After` and `Retry-After-Ms`), 500, 503 or 504.

use std::{sync::Arc, time::Duration};

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Router,
};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{
    tensor::{Data, Datatype, Tensor},
    Api, ApiError, InferRequest, InferResponse,
};

/// The header that says how long the JSON part of a binary body is.
const HEADER_LENGTH: &str = "inference-header-content-length";

/// The routes of the protocol, over `api`.
pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(server_ready))
        .route("/v2/models/{model}", get(metadata))
        .route("/v2/models/{model}/versions/{version}", get(metadata_of))
        .route("/v2/models/{model}/ready", get(ready))
        .route("/v2/models/{model}/versions/{version}/ready", get(ready_of))
        .route("/v2/models/{model}/infer", post(infer))
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            post(infer_of),
        )
        .with_state(api)
}

/// Serves the protocol on `listener` until `shutdown`.
pub async fn serve(listener: tokio::net::TcpListener, api: Arc<Api>, shutdown: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "Serving the inference API (Open Inference Protocol, REST).");
    }
    let _ = axum::serve(listener, router(api))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
}

async fn server_metadata() -> Response {
    json_response(
        StatusCode::OK,
        &json!({
            "name": "sluice",
            "version": env!("CARGO_PKG_VERSION"),
            "extensions": ["binary_tensor_data"],
        }),
    )
}

async fn server_ready(State(api): State<Arc<Api>>) -> StatusCode {
    if api.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn metadata(State(api): State<Arc<Api>>, Path(model): Path<String>) -> Response {
    metadata_response(&api, &model, None)
}

async fn metadata_of(
    State(api): State<Arc<Api>>,
    Path((model, version)): Path<(String, String)>,
) -> Response {
    metadata_response(&api, &model, Some(&version))
}

fn metadata_response(api: &Api, model: &str, version: Option<&str>) -> Response {
    match api.metadata(model, version) {
        Ok(m) => json_response(StatusCode::OK, &m),
        Err(e) => error_response(&e),
    }
}

async fn ready(State(api): State<Arc<Api>>, Path(model): Path<String>) -> Response {
    ready_response(&api, &model, None)
}

async fn ready_of(
    State(api): State<Arc<Api>>,
    Path((model, version)): Path<(String, String)>,
) -> Response {
    ready_response(&api, &model, Some(&version))
}

fn ready_response(api: &Api, model: &str, version: Option<&str>) -> Response {
    match api.model_ready(model, version) {
        Ok(true) => StatusCode::OK.into_response(),
        Ok(false) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        Err(e) => error_response(&e),
    }
}

async fn infer(
    State(api): State<Arc<Api>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    infer_response(&api, model, None, &headers, &body).await
}

async fn infer_of(
    State(api): State<Arc<Api>>,
    Path((model, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    infer_response(&api, model, Some(version), &headers, &body).await
}

async fn infer_response(
    api: &Api,
    model: String,
    version: Option<String>,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let parsed = match parse_request(model, version, headers, body) {
        Ok(parsed) => parsed,
        Err(e) => return error_response(&e),
    };
    match api.infer(parsed.request, "http").await {
        Ok(response) => write_response(&response, &parsed.binary),
        Err(e) => error_response(&e),
    }
}

/// A request as read, and how its outputs are to be written.
struct Parsed {
    request: InferRequest,
    binary: Binary,
}

/// Which outputs go out as binary data.
struct Binary {
    all: bool,
    named: Vec<(String, bool)>,
}

impl Binary {
    fn of(&self, name: &str) -> bool {
        self.named
            .iter()
            .find(|(n, _)| n == name)
            .map_or(self.all, |(_, b)| *b)
    }
}

/// Reads a JSON (or JSON + binary) request body.
fn parse_request(
    model: String,
    version: Option<String>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Parsed, ApiError> {
    let bad = ApiError::BadRequest;
    let (json_part, mut binary) = match headers.get(HEADER_LENGTH) {
        Some(h) => {
            let n: usize = h
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| bad(format!("{HEADER_LENGTH} is not a number")))?;
            if n > body.len() {
                return Err(bad(format!(
                    "{HEADER_LENGTH} says {n} bytes, the body has {}",
                    body.len()
                )));
            }
            body.split_at(n)
        }
        None => (body, &[][..]),
    };
    let doc: Value =
        serde_json::from_slice(json_part).map_err(|e| bad(format!("the body is not JSON: {e}")))?;
    let obj = doc
        .as_object()
        .ok_or_else(|| bad("the body must be a JSON object".into()))?;
    let params = obj.get("parameters").and_then(Value::as_object);
    let timeout = params
        .and_then(|p| p.get("timeout"))
        .and_then(Value::as_u64)
        .map(Duration::from_micros);
    let binary_all = params
        .and_then(|p| p.get("binary_data_output"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut inputs = Vec::new();
    for (i, input) in obj
        .get("inputs")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("\"inputs\" must be an array".into()))?
        .iter()
        .enumerate()
    {
        let field = |k: &str| input.get(k);
        let name = field("name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("inputs[{i}].name is required")))?
            .to_owned();
        let datatype = Datatype::parse(
            field("datatype")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("inputs[{i}].datatype is required")))?,
        )?;
        let shape = field("shape")
            .and_then(Value::as_array)
            .and_then(|s| s.iter().map(Value::as_i64).collect::<Option<Vec<i64>>>())
            .ok_or_else(|| bad(format!("inputs[{i}].shape must be an array of integers")))?;
        let size = field("parameters")
            .and_then(|p| p.get("binary_data_size"))
            .and_then(Value::as_u64);
        let data = match size {
            Some(size) => {
                let size = size as usize;
                if size > binary.len() {
                    return Err(bad(format!(
                        "input {name:?}: binary_data_size {size} is more than the {} bytes left",
                        binary.len()
                    )));
                }
                let (mine, rest) = binary.split_at(size);
                binary = rest;
                datatype.from_raw(mine)?
            }
            None => json_data(
                datatype,
                field("data").ok_or_else(|| bad(format!("input {name:?}: no data")))?,
            )
            .map_err(|e| bad(format!("input {name:?}: {e}")))?,
        };
        inputs.push(Tensor { name, shape, data });
    }
    let mut named = Vec::new();
    for output in obj
        .get("outputs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = output
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("an output needs a name".into()))?;
        let wants = output
            .get("parameters")
            .and_then(|p| p.get("binary_data"))
            .and_then(Value::as_bool)
            .unwrap_or(binary_all);
        named.push((name.to_owned(), wants));
    }
    Ok(Parsed {
        request: InferRequest {
            model,
            version,
            id: obj.get("id").and_then(Value::as_str).map(str::to_owned),
            outputs: named.iter().map(|(n, _)| n.clone()).collect(),
            inputs,
            timeout,
        },
        binary: Binary {
            all: binary_all,
            named,
        },
    })
}

/// A JSON `data` array (nested or flat, row-major) as typed values.
fn json_data(datatype: Datatype, data: &Value) -> Result<Data, String> {
    let mut flat = Vec::new();
    flatten(data, &mut flat);
    let wrong = |v: &Value| format!("{v} is not a {}", datatype.as_str());
    Ok(match datatype {
        Datatype::Bool => Data::Bool(
            flat.iter()
                .map(|v| v.as_bool().ok_or_else(|| wrong(v)))
                .collect::<Result<_, _>>()?,
        ),
        Datatype::Int32 => Data::Int32(
            flat.iter()
                .map(|v| {
                    v.as_i64()
                        .and_then(|x| i32::try_from(x).ok())
                        .ok_or_else(|| wrong(v))
                })
                .collect::<Result<_, _>>()?,
        ),
        Datatype::Int64 => Data::Int64(
            flat.iter()
                .map(|v| v.as_i64().ok_or_else(|| wrong(v)))
                .collect::<Result<_, _>>()?,
        ),
        Datatype::Fp32 => Data::Fp32(
            flat.iter()
                .map(|v| v.as_f64().map(|x| x as f32).ok_or_else(|| wrong(v)))
                .collect::<Result<_, _>>()?,
        ),
        Datatype::Fp64 => Data::Fp64(
            flat.iter()
                .map(|v| v.as_f64().ok_or_else(|| wrong(v)))
                .collect::<Result<_, _>>()?,
        ),
        Datatype::Bytes => Data::Bytes(
            flat.iter()
                .map(|v| {
                    v.as_str()
                        .map(|s| s.as_bytes().to_vec())
                        .ok_or_else(|| wrong(v))
                })
                .collect::<Result<_, _>>()?,
        ),
    })
}

fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        other => out.push(other),
    }
}

/// Writes a response: JSON, with the outputs asked for in binary after it.
fn write_response(response: &InferResponse, binary: &Binary) -> Response {
    let mut tail: Vec<u8> = Vec::new();
    let outputs: Vec<Value> = response
        .outputs
        .iter()
        .map(|t| {
            let mut out = json!({
                "name": t.name,
                "datatype": t.data.datatype().as_str(),
                "shape": t.shape,
            });
            if binary.of(&t.name) {
                let raw = t.data.to_raw();
                out["parameters"] = json!({ "binary_data_size": raw.len() });
                tail.extend(raw);
            } else {
                out["data"] = json_values(&t.data);
            }
            out
        })
        .collect();
    let mut doc = json!({
        "model_name": response.model,
        "model_version": response.version,
        "outputs": outputs,
    });
    if let Some(id) = &response.id {
        doc["id"] = json!(id);
    }
    let head = serde_json::to_vec(&doc).expect("JSON");
    if tail.is_empty() {
        return json_bytes(StatusCode::OK, head);
    }
    let length = head.len();
    let mut body = head;
    body.extend(tail);
    let mut r = (StatusCode::OK, body).into_response();
    let h = r.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(HEADER_LENGTH, HeaderValue::from(length));
    r
}

fn json_values(data: &Data) -> Value {
    match data {
        Data::Bool(v) => json!(v),
        Data::Int32(v) => json!(v),
        Data::Int64(v) => json!(v),
        Data::Fp32(v) => json!(v),
        Data::Fp64(v) => json!(v),
        Data::Bytes(v) => json!(v
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect::<Vec<_>>()),
    }
}

fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Response {
    json_bytes(status, serde_json::to_vec(value).expect("JSON"))
}

fn json_bytes(status: StatusCode, body: Vec<u8>) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    r
}

fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.http_status()).expect("a status code");
    let mut r = json_response(status, &json!({ "error": e.to_string() }));
    if let ApiError::Overloaded { retry_after, .. } = e {
        let h = r.headers_mut();
        h.insert(
            "retry-after",
            HeaderValue::from(retry_after.as_secs_f64().ceil().max(1.0) as u64),
        );
        h.insert(
            "retry-after-ms",
            HeaderValue::from(retry_after.as_millis().max(1) as u64),
        );
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_request_and_a_binary_one_read_the_same() {
        let json_body = br#"{"id":"r1","inputs":[{"name":"features","datatype":"FP32",
            "shape":[2,2],"data":[[1.0,2.0],[3.0,4.5]]}],"parameters":{"timeout":250000}}"#;
        let a = parse_request("m".into(), None, &HeaderMap::new(), json_body).unwrap();
        assert_eq!(a.request.id.as_deref(), Some("r1"));
        assert_eq!(a.request.timeout, Some(Duration::from_millis(250)));
        assert_eq!(
            a.request.inputs[0].data,
            Data::Fp32(vec![1.0, 2.0, 3.0, 4.5])
        );

        let head = br#"{"inputs":[{"name":"features","datatype":"FP32","shape":[2,2],
            "parameters":{"binary_data_size":16}}],"parameters":{"binary_data_output":true}}"#;
        let mut body = head.to_vec();
        body.extend(Data::Fp32(vec![1.0, 2.0, 3.0, 4.5]).to_raw());
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_LENGTH, HeaderValue::from(head.len()));
        let b = parse_request("m".into(), Some("2".into()), &headers, &body).unwrap();
        assert_eq!(b.request.inputs, a.request.inputs);
        assert_eq!(b.request.version.as_deref(), Some("2"));
        assert!(b.binary.of("anything"));
    }

    #[test]
    fn malformed_bodies_are_bad_requests_with_a_reason() {
        let cases: [(&[u8], &str); 4] = [
            (b"{", "not JSON"),
            (br#"{"inputs":{}}"#, "must be an array"),
            (
                br#"{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":["a"]}]}"#,
                "is not a FP32",
            ),
            (
                br#"{"inputs":[{"name":"x","datatype":"FP16","shape":[1],"data":[1]}]}"#,
                "FP16",
            ),
        ];
        for (body, reason) in cases {
            match parse_request("m".into(), None, &HeaderMap::new(), body) {
                Err(ApiError::BadRequest(why)) => assert!(why.contains(reason), "{why}"),
                other => panic!("{:?}: {:?}", String::from_utf8_lossy(body), other.is_ok()),
            }
        }
    }
}
