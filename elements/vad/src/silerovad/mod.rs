use gst::glib;
use gst::prelude::*;

mod imp;

/// What `silerovad` does with audio outside speech.
#[derive(Debug, Eq, PartialEq, Ord, PartialOrd, Hash, Clone, Copy, Default, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstSileroVadMode")]
pub enum VadMode {
    /// Pass all audio through unchanged, marking speech with events.
    #[default]
    #[enum_value(name = "Pass all audio through", nick = "pass-through")]
    PassThrough = 0,
    /// Pass only speech (with padding); silence is replaced by gap events.
    #[enum_value(name = "Drop silence, pass speech only", nick = "drop-silence")]
    DropSilence = 1,
}

/// Which engine runs the Silero model.
#[derive(Debug, Eq, PartialEq, Ord, PartialOrd, Hash, Clone, Copy, Default, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstSileroVadEngine")]
pub enum VadEngine {
    /// Native when the model file has the Silero v5/v6 layout, ONNX Runtime otherwise.
    #[default]
    #[enum_value(
        name = "Native if the model layout is known, else ONNX Runtime",
        nick = "auto"
    )]
    Auto = 0,
    /// The forward pass in plain Rust, weights read from the ONNX file.
    #[enum_value(name = "Native Rust forward pass", nick = "native")]
    Native = 1,
    /// ONNX Runtime (the reference).
    #[enum_value(name = "ONNX Runtime", nick = "onnxruntime")]
    OnnxRuntime = 2,
}

impl From<VadEngine> for crate::silero::EngineKind {
    fn from(e: VadEngine) -> Self {
        match e {
            VadEngine::Auto => Self::Auto,
            VadEngine::Native => Self::Native,
            VadEngine::OnnxRuntime => Self::OnnxRuntime,
        }
    }
}

glib::wrapper! {
    pub struct SileroVadElement(ObjectSubclass<imp::SileroVad>) @extends gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    VadMode::static_type().mark_as_plugin_api(gst::PluginAPIFlags::empty());
    VadEngine::static_type().mark_as_plugin_api(gst::PluginAPIFlags::empty());
    gst::Element::register(
        Some(plugin),
        "silerovad",
        gst::Rank::NONE,
        SileroVadElement::static_type(),
    )
}
