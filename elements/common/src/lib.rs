//! The shared vocabulary of the vox elements: names and structures of our custom events and
//! messages, the caps we use for text, and the model / ONNX Runtime lookup. No model code lives
//! here, and no plugin depends on another plugin: they all depend on this.

pub mod breaker;
pub mod cpu;
pub mod events;
pub mod models;
pub mod onnx;
pub mod remote;
pub mod testing;
pub mod text;
pub mod worker;

/// Caps of the text buffers our elements produce and consume.
pub const TEXT_CAPS: &str = "text/x-raw,format=utf8";
