//! Starting GStreamer with our plugins, building pipelines from descriptions, and running them
//! to the end: errors become one line naming the element and the problem, and every `filesink`
//! writes to a temporary file that is renamed into place only when the run succeeds.

use gst::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Our plugin libraries and the elements each provides.
pub const PLUGINS: &[(&str, &[&str])] = &[
    ("libgstvoxvad.so", &["silerovad"]),
    ("libgstvoxwhisper.so", &["whisperstt"]),
    ("libgstvoxkokoro.so", &["kokorotts"]),
    ("libgstvoxllm.so", &["llmchat"]),
];

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("GStreamer failed to start: {0}")]
    Init(String),
    #[error("unknown element {element:?}: {hint}")]
    UnknownElement { element: String, hint: String },
    #[error("bad pipeline description: {0}")]
    Parse(String),
    #[error("{0}")]
    Pipeline(String),
    #[error("cannot write output {path}: {why}")]
    Output { path: PathBuf, why: String },
    #[error("interrupted")]
    Interrupted,
}

/// Ctrl-C presses seen by the process; the CLI's handler counts them here.
static INTERRUPTS: AtomicUsize = AtomicUsize::new(0);

/// Called from a Ctrl-C handler: the first press ends the running pipeline gracefully (EOS,
/// outputs completed), a second one abandons it (outputs discarded).
pub fn interrupt() {
    INTERRUPTS.fetch_add(1, Ordering::SeqCst);
}

/// Whether an interrupt (Ctrl-C, SIGTERM) was seen; `interrupts()` counts them.
pub fn interrupted() -> bool {
    interrupts() > 0
}

pub fn interrupts() -> usize {
    INTERRUPTS.load(Ordering::SeqCst)
}

type Result<T> = std::result::Result<T, RunError>;

/// Directories searched for our plugin files, besides GStreamer's own plugin path (where
/// `scripts/setup` installs them): `$VOX_PLUGIN_DIR`, the executable's directory (a cargo
/// build), and `<prefix>/lib/vox/plugins`.
pub fn plugin_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("VOX_PLUGIN_DIR").filter(|v| !v.is_empty()) {
        dirs.push(PathBuf::from(d));
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(bin) = exe.parent()
    {
        dirs.push(bin.to_path_buf());
        // Test binaries live in target/<profile>/deps.
        if bin.ends_with("deps")
            && let Some(parent) = bin.parent()
        {
            dirs.push(parent.to_path_buf());
        }
        dirs.push(bin.join("../lib/vox/plugins"));
    }
    dirs
}

/// Initialises GStreamer and makes sure our elements are registered: plugin files found beside
/// the executable (or in `$VOX_PLUGIN_DIR`) are loaded explicitly, so no `GST_PLUGIN_PATH` is
/// needed; otherwise GStreamer's registry (the user plugin directory) provides them.
pub fn init() -> Result<()> {
    gst::init().map_err(|e| RunError::Init(e.to_string()))?;
    // GStreamer's own GLib warnings (e.g. wavenc's "data flow before segment" on an empty
    // stream) and criticals (gst-plugin-webrtc 0.15 drops the internal elements of a finished
    // WebRTC session without setting them to NULL first, which GStreamer reports on dispose)
    // are for developers: they go to the log (VOX_LOG=debug), not to the user's terminal,
    // where errors are one line each.
    gst::glib::log_set_handler(
        Some("GStreamer"),
        gst::glib::LogLevels::LEVEL_WARNING | gst::glib::LogLevels::LEVEL_CRITICAL,
        false,
        false,
        |domain, _level, message| {
            tracing::debug!("{}: {message}", domain.unwrap_or("GLib"));
        },
    );
    crate::webrtc::register().map_err(|e| RunError::Init(e.to_string()))?;
    for (file, _) in PLUGINS {
        let found = plugin_dirs()
            .into_iter()
            .map(|d| d.join(file))
            .find(|p| p.is_file());
        if let Some(path) = found {
            gst::Plugin::load_file(&path).map_err(|e| {
                RunError::Init(format!("cannot load plugin {}: {e}", path.display()))
            })?;
        }
    }
    Ok(())
}

/// Which plugin an element most likely comes from, for error messages.
pub fn element_hint(element: &str) -> String {
    for (file, elements) in PLUGINS {
        if elements.contains(&element) {
            return format!(
                "it is in our plugin {file}, which was not found: run scripts/setup (it installs \
                 the plugins into ~/.local/share/gstreamer-1.0/plugins)"
            );
        }
    }
    let package = match element {
        "opusenc" | "opusdec" | "vorbisenc" | "vorbisdec" | "oggmux" | "oggdemux"
        | "audioresample" | "audioconvert" | "decodebin" | "uridecodebin" => {
            "gstreamer1.0-plugins-base"
        }
        "wavenc" | "wavparse" | "flacenc" | "flacdec" | "flacparse" | "webrtcdsp"
        | "webrtcechoprobe" | "autoaudiosink" | "pulsesrc" => "gstreamer1.0-plugins-good",
        "webrtcbin" | "dtlssrtpenc" => "gstreamer1.0-plugins-bad",
        "mpg123audiodec" | "lamemp3enc" => "gstreamer1.0-plugins-ugly or -good",
        _ => "no known package; check the name with gst-inspect-1.0",
    };
    format!("no such element is installed ({package})")
}

/// Builds a pipeline from a gst-launch description.
pub fn launch(description: &str) -> Result<gst::Pipeline> {
    let mut context = gst::ParseContext::new();
    let element = gst::parse::launch_full(
        description,
        Some(&mut context),
        gst::ParseFlags::FATAL_ERRORS,
    );
    let missing = context.missing_elements();
    if let Some(element) = missing.first() {
        return Err(RunError::UnknownElement {
            element: element.to_string(),
            hint: element_hint(element),
        });
    }
    let element = element.map_err(|e| RunError::Parse(e.to_string()))?;
    match element.downcast::<gst::Pipeline>() {
        Ok(p) => Ok(p),
        Err(element) => {
            let pipeline = gst::Pipeline::new();
            pipeline
                .add(&element)
                .map_err(|e| RunError::Parse(e.to_string()))?;
            Ok(pipeline)
        }
    }
}

/// Redirects every `filesink` to a temporary file beside its target; `commit` renames them
/// into place, dropping without commit removes them.
pub struct AtomicOutputs {
    files: Vec<(PathBuf, tempfile::TempPath)>,
}

impl AtomicOutputs {
    pub fn redirect(pipeline: &gst::Pipeline) -> Result<Self> {
        let mut files = Vec::new();
        for element in pipeline.iterate_recurse().into_iter().flatten() {
            let is_filesink = element.factory().is_some_and(|f| f.name() == "filesink");
            if !is_filesink {
                continue;
            }
            let Some(location) = element.property::<Option<String>>("location") else {
                continue;
            };
            if element.property::<bool>("append") {
                continue;
            }
            let target = PathBuf::from(&location);
            if target.starts_with("/dev/") {
                continue;
            }
            let dir = match target.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let tmp = tempfile::Builder::new()
                .prefix(&format!(
                    ".{}.",
                    target.file_name().unwrap_or_default().to_string_lossy()
                ))
                .suffix(".vox-tmp")
                .tempfile_in(&dir)
                .map_err(|e| RunError::Output {
                    path: target.clone(),
                    why: e.to_string(),
                })?
                .into_temp_path();
            element.set_property("location", tmp.to_string_lossy().to_string());
            files.push((target, tmp));
        }
        Ok(Self { files })
    }

    pub fn commit(self) -> Result<()> {
        for (target, tmp) in self.files {
            set_output_permissions(&tmp, &target);
            tmp.persist(&target).map_err(|e| RunError::Output {
                path: target.clone(),
                why: e.to_string(),
            })?;
        }
        Ok(())
    }
}

/// Writes `contents` to `path` through a temporary file and a rename.
pub fn write_atomically(path: &Path, contents: &[u8]) -> Result<()> {
    use std::io::Write;
    let out = |why: String| RunError::Output {
        path: path.to_path_buf(),
        why,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".vox-")
        .suffix(".vox-tmp")
        .tempfile_in(&dir)
        .map_err(|e| out(e.to_string()))?;
    tmp.write_all(contents).map_err(|e| out(e.to_string()))?;
    set_output_permissions(tmp.path(), path);
    tmp.persist(path).map_err(|e| out(e.error.to_string()))?;
    Ok(())
}

/// Temporary files are created owner-only; an output gets the permissions of the file it
/// replaces, or the usual 0644.
fn set_output_permissions(tmp: &Path, target: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let perms = std::fs::metadata(target)
        .map(|m| m.permissions())
        .unwrap_or_else(|_| std::fs::Permissions::from_mode(0o644));
    let _ = std::fs::set_permissions(tmp, perms);
}

/// Checks up front that a file can be created at `path` (so a long run does not fail at the end).
pub fn check_writable(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if path.is_dir() {
        return Err(RunError::Output {
            path: path.to_path_buf(),
            why: "is a directory".into(),
        });
    }
    tempfile::Builder::new()
        .prefix(".vox-check-")
        .tempfile_in(&dir)
        .map(drop)
        .map_err(|e| RunError::Output {
            path: path.to_path_buf(),
            why: e.to_string(),
        })
}

/// One line for a bus error: the element, the message, and GStreamer's detail when it adds one.
pub fn describe_error(err: &gst::message::Error) -> String {
    // The element's path below the pipeline ("decodebin0/typefind"), which says where in the
    // graph it failed.
    let src = err
        .src()
        .map(|s| {
            let mut names = vec![s.name().to_string()];
            let mut parent = s.parent();
            while let Some(p) = parent {
                if p.parent().is_none() {
                    break; // the pipeline itself
                }
                names.push(p.name().to_string());
                parent = p.parent();
            }
            names.reverse();
            names.join("/")
        })
        .unwrap_or_else(|| "pipeline".into());
    let mut line = format!("{src}: {}", err.error());
    if let Some(debug) = err.debug() {
        // "file.c(123): function (): /GstPipeline:pipeline0/...:\ndetail" → "detail".
        // A debug string that is only the location (Rust elements: "file.rs(123): fn (): /path")
        // says nothing to a user.
        let detail = match debug.split_once(":\n") {
            Some((_, d)) => d,
            None if debug.contains("(): /") => "",
            None => &debug,
        };
        // Some elements (gst-plugin-webrtc's signallers) put an anyhow error's backtrace in
        // their message when RUST_BACKTRACE is set: the message is what a user needs.
        let detail = detail
            .lines()
            .map(str::trim)
            .take_while(|l| !l.starts_with("Stack backtrace:"))
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>();
        let detail = detail.join("; ");
        if !detail.is_empty() && !line.contains(&detail) {
            line.push_str(&format!(" ({detail})"));
        }
    }
    line
}

/// Progress of a run: position and duration, when known.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    pub position: Option<gst::ClockTime>,
    pub duration: Option<gst::ClockTime>,
}

/// Runs a pipeline to EOS. `on_message` sees every element message; `on_progress` is called
/// about ten times a second.
pub fn run(
    pipeline: &gst::Pipeline,
    mut on_message: impl FnMut(&gst::Message),
    mut on_progress: impl FnMut(Progress),
) -> Result<()> {
    let bus = pipeline.bus().expect("a pipeline has a bus");
    let result = (|| {
        if pipeline.set_state(gst::State::Playing).is_err() {
            // The reason is on the bus.
            while let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) {
                if let gst::MessageView::Error(err) = msg.view() {
                    return Err(RunError::Pipeline(describe_error(err)));
                }
            }
            return Err(RunError::Pipeline("the pipeline failed to start".into()));
        }
        let mut last_progress = Instant::now();
        let mut eos_sent = false;
        loop {
            match INTERRUPTS.load(Ordering::SeqCst) {
                0 => {}
                1 if !eos_sent => {
                    // Only a running pipeline can finish its outputs; one still starting is
                    // abandoned.
                    if pipeline.current_state() != gst::State::Playing {
                        return Err(RunError::Interrupted);
                    }
                    eos_sent = true;
                    pipeline.send_event(gst::event::Eos::new());
                }
                1 => {}
                _ => return Err(RunError::Interrupted),
            }
            if last_progress.elapsed() >= Duration::from_millis(100) {
                last_progress = Instant::now();
                on_progress(Progress {
                    position: pipeline.query_position::<gst::ClockTime>(),
                    duration: pipeline.query_duration::<gst::ClockTime>(),
                });
            }
            let msg = bus.timed_pop(gst::ClockTime::from_mseconds(100));
            if let Some(msg) = msg {
                match msg.view() {
                    gst::MessageView::Eos(_) => return Ok(()),
                    gst::MessageView::Error(err) => {
                        return Err(RunError::Pipeline(describe_error(err)));
                    }
                    gst::MessageView::Element(_) => on_message(&msg),
                    gst::MessageView::Warning(w) => {
                        tracing::warn!(
                            "{}: {}",
                            w.src().map(|s| s.name().to_string()).unwrap_or_default(),
                            w.error()
                        );
                        on_message(&msg);
                    }
                    _ => {}
                }
            }
        }
    })();
    let _ = pipeline.set_state(gst::State::Null);
    result
}

/// Sets `pipeline` to NULL, waiting at most `limit`; `false` when it did not get there in
/// time, and it is then left behind (its threads stuck) so that the caller can go on.
/// gst-plugin-webrtc's signaller (0.15.4) can hang in its `stop` when the peer ends the
/// session at the same moment: it holds its state lock while waiting for its receive task,
/// which takes that lock to end the session. `vox call` hung so at the end of a call,
/// recording already written.
pub fn stop_within(pipeline: &gst::Pipeline, limit: Duration) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    let stopping = pipeline.clone();
    let spawned = std::thread::Builder::new()
        .name("pipeline-stop".into())
        .spawn(move || {
            let _ = stopping.set_state(gst::State::Null);
            let _ = tx.send(());
        });
    if spawned.is_err() {
        let _ = pipeline.set_state(gst::State::Null);
        return true;
    }
    rx.recv_timeout(limit).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn a_pipeline_that_cannot_stop_is_left_behind_in_time() {
        gst::init().unwrap();
        let pipeline = launch("audiotestsrc is-live=true ! fakesink name=sink").unwrap();
        pipeline.set_state(gst::State::Playing).unwrap();
        assert!(stop_within(&pipeline, Duration::from_secs(10)));
        assert_eq!(pipeline.current_state(), gst::State::Null);

        // A streaming thread that never comes back (a test double for the signaller's
        // deadlock, which is a race that cannot be made to happen on demand): stopping waits
        // for it forever.
        let pipeline = launch("audiotestsrc is-live=true ! fakesink name=sink").unwrap();
        let stuck = Arc::new(AtomicBool::new(false));
        let flag = stuck.clone();
        let sink = pipeline
            .by_name("sink")
            .unwrap()
            .static_pad("sink")
            .unwrap();
        sink.add_probe(gst::PadProbeType::BUFFER, move |_, _| {
            flag.store(true, Ordering::SeqCst);
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        });
        pipeline.set_state(gst::State::Playing).unwrap();
        while !stuck.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let t = Instant::now();
        assert!(!stop_within(&pipeline, Duration::from_millis(500)));
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
