//! Support shared by the element test suites: the speech fixture as samples, and audio buffers
//! and caps as our elements take them. Not used by the elements themselves.

use std::path::PathBuf;

/// The directory of the crate under test: cargo's `CARGO_MANIFEST_DIR` when it runs the test or
/// bench, else `built_in` (the caller's `env!("CARGO_MANIFEST_DIR")`). One target directory may
/// serve two checkouts, and cargo does not rebuild a test that only moved, so the path built in
/// can be another checkout's.
pub fn crate_dir(built_in: &str) -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(built_in))
}

/// A file of `../shared/fixtures` beside the checkout.
pub fn fixture(name: &str) -> PathBuf {
    let crate_dir = crate_dir(env!("CARGO_MANIFEST_DIR"));
    crate_dir
        .ancestors()
        .map(|d| d.join("shared/fixtures"))
        .find(|d| d.is_dir())
        .unwrap_or_else(|| crate_dir.join("../../../shared/fixtures"))
        .join(name)
}

/// The samples of a 16-bit mono PCM WAV fixture, as f32 in [-1, 1).
pub fn fixture_samples(name: &str) -> Vec<f32> {
    let path = fixture(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "fixture {} missing ({e}): the tests read ../shared/fixtures",
            path.display()
        )
    });
    let data = bytes
        .windows(4)
        .position(|w| w == b"data")
        .unwrap_or_else(|| panic!("{} has no data chunk", path.display()))
        + 8;
    bytes[data..]
        .chunks_exact(2)
        .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0)
        .collect()
}

/// Mono F32LE caps at `rate`.
pub fn audio_caps(rate: i32) -> gst::Caps {
    gst::Caps::builder("audio/x-raw")
        .field("format", "F32LE")
        .field("layout", "interleaved")
        .field("channels", 1i32)
        .field("rate", rate)
        .build()
}

/// An F32LE buffer of `samples` that start at sample `offset`, with PTS and duration.
pub fn f32_buffer(samples: &[f32], offset: usize, rate: u64) -> gst::Buffer {
    let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
    let mut buf = gst::Buffer::from_mut_slice(bytes);
    {
        let b = buf.get_mut().expect("new buffer");
        b.set_pts(gst::ClockTime::from_nseconds(
            offset as u64 * 1_000_000_000 / rate,
        ));
        b.set_duration(gst::ClockTime::from_nseconds(
            samples.len() as u64 * 1_000_000_000 / rate,
        ));
    }
    buf
}

/// The minimum latency an element's src pad reports.
pub fn min_latency(element: &gst::Element) -> gst::ClockTime {
    use gst::prelude::*;
    let mut q = gst::query::Latency::new();
    let pad = element.static_pad("src").expect("src pad");
    assert!(pad.query(&mut q), "latency query failed");
    q.result().1
}

/// Makes the element `description` gives (gst-launch syntax: `factory prop=value ...`) and
/// brings it to READY, which must fail; returns the error message it posted.
pub fn start_error(description: &str) -> String {
    use gst::prelude::*;
    let element = gst::parse::launch(description).expect("the element is registered");
    let bus = gst::Bus::new();
    element.set_bus(Some(&bus));
    assert!(
        element.set_state(gst::State::Ready).is_err(),
        "{description} started"
    );
    let msg = bus
        .pop_filtered(&[gst::MessageType::Error])
        .expect("an error message");
    let gst::MessageView::Error(e) = msg.view() else {
        unreachable!()
    };
    let text = e.error().to_string();
    let _ = element.set_state(gst::State::Null);
    text
}
