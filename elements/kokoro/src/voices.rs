//! Kokoro voices (no GStreamer types): an `.npz` file with one [510, 1, 256] f32 style table per
//! voice (`voices_ja.npz`, or kokoro-onnx's English voices file). Row n is the style for a chunk
//! of n token ids.

use ndarray::Array3;
use ndarray_npy::NpzReader;
use std::path::Path;

pub const STYLE_LEN: usize = 256;
pub const STYLE_ROWS: usize = 510;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the voices file {path}: {why}")]
    File { path: String, why: String },
    #[error("unknown voice {voice:?}: the voices file has {known}")]
    Unknown { voice: String, known: String },
}

/// One voice's style table.
#[derive(Debug, Clone)]
pub struct Voice {
    styles: Vec<f32>,
}

impl Voice {
    /// The style vector for a chunk of `n` ids.
    pub fn style(&self, n: usize) -> &[f32] {
        let row = n.min(STYLE_ROWS - 1);
        &self.styles[row * STYLE_LEN..(row + 1) * STYLE_LEN]
    }
}

/// The voice names in `path`.
pub fn names(path: &Path) -> Result<Vec<String>, Error> {
    vox_common::models::voice_names(path).map_err(|why| file_err(path, why))
}

/// Loads `voice` from `path`, checking its shape.
pub fn load(path: &Path, voice: &str) -> Result<Voice, Error> {
    let known = names(path)?;
    let mut npz = open(path)?;
    if !known.iter().any(|n| n == voice) {
        return Err(Error::Unknown {
            voice: voice.to_string(),
            known: known.join(", "),
        });
    }
    let table: Array3<f32> = npz
        .by_name(voice)
        .or_else(|_| npz.by_name(&format!("{voice}.npy")))
        .map_err(|e| file_err(path, format!("voice {voice}: {e}")))?;
    if table.shape() != [STYLE_ROWS, 1, STYLE_LEN] {
        return Err(file_err(
            path,
            format!(
                "voice {voice} has shape {:?}, expected [{STYLE_ROWS}, 1, {STYLE_LEN}]",
                table.shape()
            ),
        ));
    }
    let styles: Vec<f32> = table.iter().copied().collect();
    if styles.iter().any(|v| !v.is_finite()) {
        return Err(file_err(
            path,
            format!("voice {voice} holds non-finite values"),
        ));
    }
    Ok(Voice { styles })
}

fn open(path: &Path) -> Result<NpzReader<std::fs::File>, Error> {
    let file = std::fs::File::open(path).map_err(|e| file_err(path, e))?;
    NpzReader::new(file).map_err(|e| file_err(path, e))
}

fn file_err(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::File {
        path: path.display().to_string(),
        why: why.to_string(),
    }
}
