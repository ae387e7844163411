//! The process's ONNX Runtime environment, shared by every element (of one plugin) that runs an
//! ONNX model: the library is loaded once, from the verified copy in the models directory (or
//! `$ORT_DYLIB_PATH`). A failure is remembered and reported the same way on every later call.
//! And ONNX's `TensorProto`, for the code that reads weights out of a model file.

use std::sync::OnceLock;

pub fn environment() -> Result<&'static ort::environment::Environment, String> {
    static ENV: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let path = crate::models::onnxruntime_library().map_err(|e| e.to_string())?;
        let fail = |why: String| {
            format!(
                "cannot load the ONNX Runtime library {}: {why}",
                path.display()
            )
        };
        ort::init_from(&path)
            .map_err(|e| fail(e.to_string()))?
            .with_name("vox")
            .build()
            .map_err(|e| fail(e.to_string()))
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// ONNX `TensorProto.DataType` values.
pub const FLOAT: i32 = 1;
pub const UINT8: i32 = 2;
pub const INT8: i32 = 3;
pub const INT64: i32 = 7;

/// The fields of ONNX's `TensorProto` that hold a dense tensor's name, shape and values (prost
/// skips the rest when decoding).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    pub dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    pub data_type: i32,
    #[prost(float, repeated, tag = "4")]
    pub float_data: Vec<f32>,
    #[prost(int32, repeated, tag = "5")]
    pub int32_data: Vec<i32>,
    #[prost(int64, repeated, tag = "7")]
    pub int64_data: Vec<i64>,
    #[prost(string, tag = "8")]
    pub name: String,
    #[prost(bytes = "vec", tag = "9")]
    pub raw_data: Vec<u8>,
    /// 1: the values are in an external file.
    #[prost(int32, tag = "14")]
    pub data_location: i32,
}

impl TensorProto {
    /// How many values the shape holds.
    pub fn len(&self) -> usize {
        self.dims.iter().map(|&d| d.max(0) as usize).product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A float tensor's values (from `raw_data` or `float_data`); `None` for another type or
    /// external data.
    pub fn floats(&self) -> Option<Vec<f32>> {
        if self.data_type != FLOAT || self.data_location != 0 {
            return None;
        }
        Some(if self.raw_data.is_empty() {
            self.float_data.clone()
        } else {
            self.raw_data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        })
    }

    /// The value of a one-value int64 tensor.
    pub fn int64(&self) -> Option<i64> {
        if self.data_type != INT64 || self.len() != 1 || self.data_location != 0 {
            return None;
        }
        match self.raw_data.as_slice().try_into() {
            Ok(bytes) => Some(i64::from_le_bytes(bytes)),
            Err(_) => self.int64_data.first().copied(),
        }
    }
}
