//! Speech from a speech service instead of the model in-process: each sentence is sent to
//! OpenAI's `/v1/audio/speech` (as `vox serve tts` and other compatible servers offer it) for
//! raw 24 kHz PCM, which is read as it streams in. No GStreamer types.

use std::io::Read;
use vox_common::remote::{Remote, RemoteError};

/// Audio handed on at a time while the answer streams in: 100 ms.
const CHUNK_SAMPLES: usize = 2400;

/// Speaks `text` with `voice` on the service, calling `on_audio` with each piece of audio
/// (24 kHz mono f32) as it arrives; stops when `on_audio` returns false or `cancelled()`.
pub fn speak(
    remote: &Remote,
    text: &str,
    voice: &str,
    speed: f32,
    cancelled: impl Fn() -> bool,
    mut on_audio: impl FnMut(&[f32]) -> bool,
) -> Result<(), RemoteError> {
    let url = remote.endpoint("audio/speech");
    let body = serde_json::json!({
        "model": "kokoro",
        "input": text,
        "voice": voice,
        "speed": speed,
        "response_format": "pcm",
    });
    let mut response = remote.send(|client| client.post(&url).json(&body), &cancelled)?;
    let mut bytes = vec![0u8; CHUNK_SAMPLES * 2];
    let mut filled = 0;
    loop {
        if cancelled() {
            return Err(RemoteError::Cancelled);
        }
        let n = response
            .read(&mut bytes[filled..])
            .map_err(|e| RemoteError::Failed(format!("the audio stream from {url} broke: {e}")))?;
        filled += n;
        let done = n == 0;
        if filled == bytes.len() || (done && filled >= 2) {
            let whole = filled - filled % 2;
            let samples: Vec<f32> = bytes[..whole]
                .chunks_exact(2)
                .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0)
                .collect();
            bytes.copy_within(whole..filled, 0);
            filled -= whole;
            if !on_audio(&samples) {
                return Ok(());
            }
        }
        if done {
            return Ok(());
        }
    }
}
