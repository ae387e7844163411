//! Whisper speech to text for GStreamer: the `whisperstt` element.
//!
//! The cores have no GStreamer types: [`engine`] runs whisper.cpp, [`utterance`] collects the
//! audio of each utterance.

pub mod engine;
pub mod gemm;
pub mod ops;
pub mod remote;
mod threads;
pub mod utterance;
mod whisperstt;

use std::sync::LazyLock;

/// whisper.cpp and ggml log lines go to this debug category instead of stderr.
static CPP_CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "whisper-cpp",
        gst::DebugColorFlags::empty(),
        Some("whisper.cpp and ggml library log"),
    )
});

struct GstLogger;

impl log::Log for GstLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        let level = match record.level() {
            log::Level::Error => gst::DebugLevel::Error,
            log::Level::Warn => gst::DebugLevel::Warning,
            log::Level::Info => gst::DebugLevel::Info,
            log::Level::Debug => gst::DebugLevel::Debug,
            log::Level::Trace => gst::DebugLevel::Trace,
        };
        let text = record.args().to_string();
        gst::log_with_level!(CPP_CAT, level, "{}", text.trim_end());
    }

    fn flush(&self) {}
}

/// Routes whisper.cpp's own logging into the `whisper-cpp` debug category (once per process).
pub fn route_library_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if log::set_logger(&GstLogger).is_ok() {
            log::set_max_level(log::LevelFilter::Trace);
        }
        whisper_rs::install_logging_hooks();
    });
}

/// The tests' pseudo-random numbers (xorshift64; a zero state stays zero).
#[cfg(test)]
pub(crate) fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn plugin_init(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    route_library_logs();
    whisperstt::register(plugin)
}

gst::plugin_define!(
    voxwhisper,
    env!("CARGO_PKG_DESCRIPTION"),
    plugin_init,
    concat!(env!("CARGO_PKG_VERSION"), "-", env!("COMMIT_ID")),
    "MIT/X11",
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_NAME"),
    "https://example.invalid/local-voice-ai",
    env!("BUILD_REL_DATE")
);
