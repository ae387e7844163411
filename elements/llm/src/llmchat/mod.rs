use gst::glib;
use gst::prelude::*;

mod imp;

/// Which backend `llmchat` talks to.
#[derive(Debug, Eq, PartialEq, Ord, PartialOrd, Hash, Clone, Copy, Default, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstLlmChatBackend")]
pub enum LlmBackend {
    /// openai when `url` is set, else embedded.
    #[default]
    #[enum_value(name = "openai when url is set, else embedded", nick = "auto")]
    Auto = 0,
    /// An OpenAI-compatible server (Ollama, llama-server, vLLM, hosted APIs).
    #[enum_value(name = "OpenAI-compatible server", nick = "openai")]
    Openai = 1,
    /// llama.cpp in-process on a GGUF file.
    #[enum_value(name = "llama.cpp in-process", nick = "embedded")]
    Embedded = 2,
}

glib::wrapper! {
    pub struct LlmChatElement(ObjectSubclass<imp::LlmChat>) @extends gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    LlmBackend::static_type().mark_as_plugin_api(gst::PluginAPIFlags::empty());
    gst::Element::register(
        Some(plugin),
        "llmchat",
        gst::Rank::NONE,
        LlmChatElement::static_type(),
    )
}
