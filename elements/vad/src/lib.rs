//! Silero voice activity detection for GStreamer: the `silerovad` element.
//!
//! The algorithmic core lives in plain modules with no GStreamer types: [`silero`] runs the
//! model, [`detector`] turns probabilities into speech boundaries.
#![allow(clippy::non_send_fields_in_send_ty)]

pub mod detector;
pub mod silero;
mod silerovad;

pub use silerovad::{VadEngine, VadMode};

fn plugin_init(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    silerovad::register(plugin)
}

gst::plugin_define!(
    voxvad,
    env!("CARGO_PKG_DESCRIPTION"),
    plugin_init,
    concat!(env!("CARGO_PKG_VERSION"), "-", env!("COMMIT_ID")),
    "MIT/X11",
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_NAME"),
    "https://example.invalid/local-voice-ai",
    env!("BUILD_REL_DATE")
);
