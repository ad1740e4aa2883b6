//! Tensors as the Open Inference Protocol carries them, whatever the wire: a name, a shape and
//! typed data. Both protocols read their own forms (JSON arrays, typed protobuf fields, raw
//! little-endian bytes) into these and write them back from these.

use super::ApiError;

/// One tensor of a request or a response.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<i64>,
    pub data: Data,
}

/// A tensor's values, row-major, by datatype.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    Bool(Vec<bool>),
    Int32(Vec<i32>),
    Int64(Vec<i64>),
    Fp32(Vec<f32>),
    Fp64(Vec<f64>),
    Bytes(Vec<Vec<u8>>),
}

/// The protocol's datatypes sluice reads (`UINT*`, `INT8`/`16` and `FP16`/`BF16` are refused
/// with a reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datatype {
    Bool,
    Int32,
    Int64,
    Fp32,
    Fp64,
    Bytes,
}

impl Datatype {
    pub fn parse(text: &str) -> Result<Self, ApiError> {
        Ok(match text {
            "BOOL" => Self::Bool,
            "INT32" => Self::Int32,
            "INT64" => Self::Int64,
            "FP32" => Self::Fp32,
            "FP64" => Self::Fp64,
            "BYTES" => Self::Bytes,
            other => {
                return Err(ApiError::BadRequest(format!(
                    "datatype {other:?} is not one sluice reads (BOOL, INT32, INT64, FP32, FP64, \
                     BYTES)"
                )))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bool => "BOOL",
            Self::Int32 => "INT32",
            Self::Int64 => "INT64",
            Self::Fp32 => "FP32",
            Self::Fp64 => "FP64",
            Self::Bytes => "BYTES",
        }
    }

    /// Bytes per element in raw form (`None`: BYTES, whose elements carry their length).
    fn width(self) -> Option<usize> {
        match self {
            Self::Bool => Some(1),
            Self::Int32 | Self::Fp32 => Some(4),
            Self::Int64 | Self::Fp64 => Some(8),
            Self::Bytes => None,
        }
    }

    /// Values of this type from raw little-endian bytes (BYTES: each element a 4-byte
    /// little-endian length and its bytes), as Triton's binary data and gRPC's
    /// `raw_input_contents` carry them.
    pub fn from_raw(self, raw: &[u8]) -> Result<Data, ApiError> {
        let bad = |what: &str| ApiError::BadRequest(format!("raw {} data: {what}", self.as_str()));
        if let Some(w) = self.width() {
            if !raw.len().is_multiple_of(w) {
                return Err(bad(&format!(
                    "{} bytes is not a whole number of elements",
                    raw.len()
                )));
            }
        }
        let chunks = |w: usize| raw.chunks_exact(w);
        Ok(match self {
            Self::Bool => Data::Bool(raw.iter().map(|b| *b != 0).collect()),
            Self::Int32 => Data::Int32(
                chunks(4)
                    .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")))
                    .collect(),
            ),
            Self::Int64 => Data::Int64(
                chunks(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            ),
            Self::Fp32 => Data::Fp32(
                chunks(4)
                    .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                    .collect(),
            ),
            Self::Fp64 => Data::Fp64(
                chunks(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            ),
            Self::Bytes => {
                let mut out = Vec::new();
                let mut rest = raw;
                while !rest.is_empty() {
                    let Some((len, tail)) = rest.split_first_chunk::<4>() else {
                        return Err(bad("an element's length is cut short"));
                    };
                    let len = u32::from_le_bytes(*len) as usize;
                    if tail.len() < len {
                        return Err(bad("an element is shorter than its length says"));
                    }
                    out.push(tail[..len].to_vec());
                    rest = &tail[len..];
                }
                Data::Bytes(out)
            }
        })
    }
}

impl Data {
    pub fn datatype(&self) -> Datatype {
        match self {
            Self::Bool(_) => Datatype::Bool,
            Self::Int32(_) => Datatype::Int32,
            Self::Int64(_) => Datatype::Int64,
            Self::Fp32(_) => Datatype::Fp32,
            Self::Fp64(_) => Datatype::Fp64,
            Self::Bytes(_) => Datatype::Bytes,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Self::Bool(v) => v.len(),
            Self::Int32(v) => v.len(),
            Self::Int64(v) => v.len(),
            Self::Fp32(v) => v.len(),
            Self::Fp64(v) => v.len(),
            Self::Bytes(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values in raw little-endian form (see [`Datatype::from_raw`]).
    pub fn to_raw(&self) -> Vec<u8> {
        match self {
            Self::Bool(v) => v.iter().map(|b| u8::from(*b)).collect(),
            Self::Int32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Self::Int64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Self::Fp32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Self::Fp64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Self::Bytes(v) => v
                .iter()
                .flat_map(|b| (b.len() as u32).to_le_bytes().into_iter().chain(b.clone()))
                .collect(),
        }
    }

    /// The values as `f32` (numbers and booleans; not BYTES).
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        Some(match self {
            Self::Bool(v) => v.iter().map(|b| f32::from(u8::from(*b))).collect(),
            Self::Int32(v) => v.iter().map(|x| *x as f32).collect(),
            Self::Int64(v) => v.iter().map(|x| *x as f32).collect(),
            Self::Fp32(v) => v.clone(),
            Self::Fp64(v) => v.iter().map(|x| *x as f32).collect(),
            Self::Bytes(_) => return None,
        })
    }

    /// Element `i` as a JSON value (BYTES as text, which must be UTF-8).
    pub fn json(&self, i: usize) -> Result<serde_json::Value, String> {
        use serde_json::Value;
        Ok(match self {
            Self::Bool(v) => Value::Bool(v[i]),
            Self::Int32(v) => Value::from(v[i]),
            Self::Int64(v) => Value::from(v[i]),
            Self::Fp32(v) => serde_json::Number::from_f64(f64::from(v[i]))
                .map(Value::Number)
                .ok_or_else(|| format!("{} is not a number JSON can hold", v[i]))?,
            Self::Fp64(v) => serde_json::Number::from_f64(v[i])
                .map(Value::Number)
                .ok_or_else(|| format!("{} is not a number JSON can hold", v[i]))?,
            Self::Bytes(v) => Value::String(
                String::from_utf8(v[i].clone()).map_err(|_| "its text is not UTF-8".to_owned())?,
            ),
        })
    }
}

impl Tensor {
    /// Checks that the shape holds exactly the values there are.
    pub fn check(&self) -> Result<(), ApiError> {
        if self.shape.iter().any(|d| *d < 0) {
            return Err(ApiError::BadRequest(format!(
                "input {:?}: shape {:?} has a negative dimension",
                self.name, self.shape
            )));
        }
        let elements: i64 = self.shape.iter().product();
        if elements as usize != self.data.len() {
            return Err(ApiError::BadRequest(format!(
                "input {:?}: shape {:?} holds {elements} values, the data has {}",
                self.name,
                self.shape,
                self.data.len()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_data_reads_back_as_it_was_written() {
        for data in [
            Data::Bool(vec![true, false, true]),
            Data::Int32(vec![-1, 7]),
            Data::Int64(vec![i64::MIN, 42]),
            Data::Fp32(vec![0.5, -3.25]),
            Data::Fp64(vec![1e300, 0.1]),
            Data::Bytes(vec![b"EUR".to_vec(), vec![], "ünïcode".as_bytes().to_vec()]),
        ] {
            let raw = data.to_raw();
            assert_eq!(data.datatype().from_raw(&raw).unwrap(), data);
        }
    }

    #[test]
    fn broken_raw_data_is_a_bad_request_with_its_reason() {
        let err = Datatype::Fp32.from_raw(&[0, 0, 0]).unwrap_err();
        assert!(err.to_string().contains("whole number"), "{err}");
        let err = Datatype::Bytes.from_raw(&[9, 0, 0, 0, b'a']).unwrap_err();
        assert!(err.to_string().contains("shorter"), "{err}");
        assert!(Datatype::parse("FP16").is_err());
    }

    #[test]
    fn a_shape_must_hold_the_data() {
        let t = Tensor {
            name: "x".into(),
            shape: vec![2, 3],
            data: Data::Fp32(vec![0.0; 5]),
        };
        assert!(t
            .check()
            .unwrap_err()
            .to_string()
            .contains("holds 6 values"));
    }
}
