//! Kokoro-82M text-to-speech for GStreamer: the `kokorotts` element.
//!
//! The algorithmic core lives in plain modules with no GStreamer types: [`phonemes`] turns text
//! into token ids (normalisation, libespeak-ng, chunking), [`voices`] reads the style tables,
//! [`engine`] runs the model, [`rewrite`] makes its graph faster (with the operators in [`snake`]
//! and [`stft`]).
#![allow(clippy::non_send_fields_in_send_ty)]

pub mod engine;
mod kokorotts;
pub mod phonemes;
pub mod qconv;
pub mod remote;
pub mod rewrite;
pub mod snake;
pub mod stft;
pub mod voices;

fn plugin_init(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    kokorotts::register(plugin)
}

gst::plugin_define!(
    voxkokoro,
    env!("CARGO_PKG_DESCRIPTION"),
    plugin_init,
    concat!(env!("CARGO_PKG_VERSION"), "-", env!("COMMIT_ID")),
    "MIT/X11",
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_NAME"),
    "https://example.invalid/local-voice-ai",
    env!("BUILD_REL_DATE")
);
