//! The process's ONNX Runtime environment, shared by every element (of one plugin) that runs an
//! ONNX model: the library is loaded once, from the verified copy in the models directory (or
//! `$ORT_DYLIB_PATH`). A failure is remembered and reported the same way on every later call.

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
