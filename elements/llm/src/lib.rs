//! LLM chat for GStreamer: the `llmchat` element.
//!
//! The core lives in plain modules with no GStreamer types: [`chat`] (conversation memory,
//! circuit breaker), [`openai`] (the streaming OpenAI-compatible client) and [`embedded`]
//! (llama.cpp in-process). This plugin is its own `.so`: llama.cpp's bundled ggml must not meet
//! whisper.cpp's in one link.
#![allow(clippy::non_send_fields_in_send_ty)]

pub mod chat;
pub mod embedded;
mod llmchat;
pub mod openai;

pub use llmchat::LlmBackend;

fn plugin_init(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    llmchat::register(plugin)
}

gst::plugin_define!(
    voxllm,
    env!("CARGO_PKG_DESCRIPTION"),
    plugin_init,
    concat!(env!("CARGO_PKG_VERSION"), "-", env!("COMMIT_ID")),
    "MIT/X11",
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_NAME"),
    "https://example.invalid/local-voice-ai",
    env!("BUILD_REL_DATE")
);
