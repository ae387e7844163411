//! `vox serve` over real HTTP (curl as the client): OpenAI's transcription and speech API on
//! the real models, every bad request answered with the right status and an OpenAI-shaped
//! error while the server stays up, the API key, and the bounded queue (429 + Retry-After).

mod common;

use common::netns::{free_port, metric_in};
use common::*;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `vox serve`, stopped (SIGTERM) when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(args: &[&str]) -> Self {
        let port = free_port();
        let mut cmd = vox();
        cmd.arg("serve")
            .args(args)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("vox runs");
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[serve] {line}");
                if line.contains("vox serve: ready") {
                    let _ = tx.send(());
                }
            }
        });
        assert!(
            rx.recv_timeout(Duration::from_secs(120)).is_ok(),
            "vox serve did not get ready (models: run scripts/setup)"
        );
        Self { child, port }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// curl with `args` against `path`: (status, headers, body).
    fn curl(&self, path: &str, args: &[&str]) -> (u16, String, Vec<u8>) {
        let headers = tempfile::NamedTempFile::new().unwrap();
        let out = Command::new("curl")
            .args(["-s", "-o", "-", "-D"])
            .arg(headers.path())
            .args(["-w", ""])
            .args(args)
            .arg(self.url(path))
            .output()
            .expect("curl is installed by scripts/setup");
        let head = std::fs::read_to_string(headers.path()).unwrap_or_default();
        // The final status line (after any "100 Continue").
        let status = head
            .lines()
            .rfind(|l| l.starts_with("HTTP/"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, head, out.stdout)
    }

    fn transcribe(&self, file: &Path, extra: &[&str]) -> (u16, String) {
        let file = format!("file=@{}", file.display());
        let mut args = vec!["-F", &file, "-F", "model=whisper-1"];
        for e in extra {
            args.extend(["-F", e]);
        }
        let (status, _, body) = self.curl("/v1/audio/transcriptions", &args);
        (status, String::from_utf8_lossy(&body).to_string())
    }

    /// `n` transcriptions of `file` (text format) sent at once: (status, headers, body) each.
    fn transcribe_at_once(&self, n: usize, file: &Path) -> Vec<(u16, String, Vec<u8>)> {
        self.transcribe_at_once_with(n, file, &[])
    }

    /// The same, with more arguments to curl.
    fn transcribe_at_once_with(
        &self,
        n: usize,
        file: &Path,
        curl: &[&str],
    ) -> Vec<(u16, String, Vec<u8>)> {
        let f = format!("file=@{}", file.display());
        let mut args = vec![
            "-F",
            &f,
            "-F",
            "model=whisper-1",
            "-F",
            "response_format=text",
        ];
        args.extend(curl);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|_| s.spawn(|| self.curl("/v1/audio/transcriptions", &args)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn speech(&self, json: &str) -> (u16, String, Vec<u8>) {
        self.curl(
            "/v1/audio/speech",
            &["-H", "Content-Type: application/json", "-d", json],
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `error` object of an OpenAI-shaped error body.
fn error_of(body: &[u8]) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)));
    let err = v["error"].clone();
    for field in ["message", "type", "param", "code"] {
        assert!(err.get(field).is_some(), "no {field} in {v}");
    }
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    err
}

#[test]
fn transcribes_and_speaks_through_the_openai_api() {
    let server = Server::start(&["all"]);
    let jfk = fixture("jfk.wav");

    let (status, body) = server.transcribe(&jfk, &[]);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(wer(JFK_TEXT, v["text"].as_str().unwrap()) < 0.2, "{body}");

    let (status, text) = server.transcribe(&jfk, &["response_format=text"]);
    assert_eq!(status, 200);
    assert!(
        normalize(&text).contains("ask not what your country"),
        "{text}"
    );
    let (_, srt) = server.transcribe(&jfk, &["response_format=srt"]);
    assert!(
        srt.starts_with("1\n00:00:0") && srt.contains(" --> "),
        "{srt}"
    );
    let (_, vtt) = server.transcribe(&jfk, &["response_format=vtt"]);
    assert!(vtt.starts_with("WEBVTT\n\n00:00:0"), "{vtt}");
    let (status, verbose) = server.transcribe(
        &jfk,
        &[
            "response_format=verbose_json",
            "timestamp_granularities[]=word",
        ],
    );
    assert_eq!(status, 200, "{verbose}");
    let v: serde_json::Value = serde_json::from_str(&verbose).unwrap();
    assert_eq!(v["task"], "transcribe");
    assert!((v["duration"].as_f64().unwrap() - 11.0).abs() < 0.1, "{v}");
    assert!(v["segments"].as_array().unwrap().len() >= 2, "{v}");
    let words = v["words"].as_array().unwrap();
    assert!(words.len() >= 18, "{v}");
    assert!(
        words
            .windows(2)
            .all(|w| w[0]["start"].as_f64() <= w[1]["start"].as_f64())
    );

    // Speech in every format; the WAV, transcribed back by the same server, says the text.
    for format in ["mp3", "opus", "aac", "flac", "pcm"] {
        let (status, head, audio) = server.speech(&format!(
            r#"{{"model":"tts-1","input":"Hello there.","voice":"jf_alpha","response_format":"{format}"}}"#
        ));
        assert_eq!(status, 200, "{format}: {}", String::from_utf8_lossy(&audio));
        assert!(audio.len() > 2000, "{format}: {} bytes", audio.len());
        assert!(
            head.to_lowercase().contains("content-type: audio/"),
            "{head}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let (status, head, wav) = server.speech(
        r#"{"model":"kokoro","input":"The weather is sunny today. Tomorrow it will rain.","voice":"jf_alpha","response_format":"wav"}"#,
    );
    assert_eq!(status, 200);
    // Streamed: chunked, no length known up front.
    assert!(
        head.to_lowercase().contains("transfer-encoding: chunked"),
        "{head}"
    );
    assert_eq!(&wav[..4], b"RIFF");
    let spoken = dir.path().join("spoken.wav");
    std::fs::write(&spoken, &wav).unwrap();
    let (status, heard) = server.transcribe(&spoken, &["response_format=text"]);
    assert_eq!(status, 200, "{heard}");
    let heard = normalize(&heard);
    assert!(
        heard.contains("weather") && heard.contains("rain"),
        "{heard}"
    );
    // And it streams: the first bytes of five sentences come when the first is spoken, long
    // before the last one is (curl's own clock).
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{time_starttransfer} %{time_total}"])
        .args(["-H", "Content-Type: application/json", "-d"])
        .arg(
            r#"{"model":"tts-1","voice":"jf_alpha","response_format":"pcm","input":"The weather is sunny today. Tomorrow it will rain in the north. The wind will come from the west. It will be cold at night. Take a coat with you."}"#,
        )
        .arg(server.url("/v1/audio/speech"))
        .output()
        .unwrap();
    let times = String::from_utf8_lossy(&out.stdout).to_string();
    let t: Vec<f64> = times
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    assert_eq!(t.len(), 2, "{times}");
    assert!(t[0] < 0.5 * t[1], "first byte at {} s of {} s", t[0], t[1]);

    let (status, _, models) = server.curl("/v1/models", &[]);
    assert_eq!(status, 200);
    let models = String::from_utf8_lossy(&models);
    assert!(
        models.contains("whisper-1") && models.contains("tts-1"),
        "{models}"
    );
    let (_, _, metrics) = server.curl("/metrics", &[]);
    let metrics = String::from_utf8_lossy(&metrics);
    let ok = metric_in(
        &metrics,
        "vox_serve_requests_total{endpoint=\"transcriptions\",status=\"200\"}",
    );
    assert_eq!(ok, Some(6.0), "{metrics}");
    assert!(
        metric_in(
            &metrics,
            "vox_serve_audio_seconds_total{endpoint=\"transcriptions\"}"
        )
        .is_some_and(|s| s > 55.0),
        "{metrics}"
    );
    assert!(
        metrics.contains("vox_serve_first_byte_seconds_count 7"),
        "{metrics}"
    );
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "sesame\n").unwrap();
    let key_arg = key.display().to_string();
    let server = Server::start(&[
        "all",
        "--max-upload-mb",
        "1",
        "--max-audio-s",
        "15",
        "--api-key-file",
        &key_arg,
    ]);
    let auth = "Authorization: Bearer sesame";
    let jfk = fixture("jfk.wav");
    // 20 s of audio in 640 KB: under the upload limit, over the duration limit.
    let long_audio = dir.path().join("long.wav");
    silence(20.0, &long_audio);

    let empty = dir.path().join("empty.wav");
    std::fs::write(&empty, b"").unwrap();
    let text = dir.path().join("notes.wav");
    std::fs::write(
        &text,
        "these are not the samples you are looking for\n".repeat(50),
    )
    .unwrap();
    let big = dir.path().join("big.wav");
    std::fs::write(&big, vec![0u8; 2 * 1024 * 1024]).unwrap();
    let file = |p: &Path| format!("file=@{}", p.display());

    let cases: Vec<(&str, Vec<String>, u16, &str)> = vec![
        (
            "no key",
            vec![
                "-F".into(),
                file(&jfk),
                "-F".into(),
                "model=whisper-1".into(),
            ],
            401,
            "invalid_api_key",
        ),
        (
            "wrong key",
            vec![
                "-H".into(),
                "Authorization: Bearer open-sesame".into(),
                "-F".into(),
                file(&jfk),
                "-F".into(),
                "model=whisper-1".into(),
            ],
            401,
            "invalid_api_key",
        ),
        (
            "too long",
            vec![
                "-H".into(),
                auth.into(),
                "-F".into(),
                file(&long_audio),
                "-F".into(),
                "model=whisper-1".into(),
            ],
            400,
            "audio_too_long",
        ),
        (
            "missing file",
            vec![
                "-H".into(),
                auth.into(),
                "-F".into(),
                "model=whisper-1".into(),
            ],
            400,
            "missing_file",
        ),
        (
            "empty file",
            vec![
                "-H".into(),
                auth.into(),
                "-F".into(),
                file(&empty),
                "-F".into(),
                "model=whisper-1".into(),
            ],
            400,
            "empty_file",
        ),
        (
            "not audio",
            vec![
                "-H".into(),
                auth.into(),
                "-F".into(),
                file(&text),
                "-F".into(),
                "model=whisper-1".into(),
            ],
            400,
            "invalid_audio",
        ),
        (
            "too big",
            vec![
                "-H".into(),
                auth.into(),
                "-F".into(),
                file(&big),
                "-F".into(),
                "model=whisper-1".into(),
            ],
            413,
            "file_too_large",
        ),
        (
            "unknown model",
            vec![
                "-H".into(),
                auth.into(),
                "-F".into(),
                file(&jfk),
                "-F".into(),
                "model=whisper-9".into(),
            ],
            404,
            "model_not_found",
        ),
        (
            "bad format",
            vec![
                "-H".into(),
                auth.into(),
                "-F".into(),
                file(&jfk),
                "-F".into(),
                "model=whisper-1".into(),
                "-F".into(),
                "response_format=xml".into(),
            ],
            400,
            "invalid_value",
        ),
        (
            "not multipart",
            vec![
                "-H".into(),
                auth.into(),
                "-H".into(),
                "Content-Type: application/json".into(),
                "-d".into(),
                "{}".into(),
            ],
            415,
            "invalid_content_type",
        ),
    ];
    for (what, args, status, code) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (got, _, body) = server.curl("/v1/audio/transcriptions", &args);
        assert_eq!(got, status, "{what}: {}", String::from_utf8_lossy(&body));
        assert_eq!(error_of(&body)["code"], code, "{what}");
    }

    let long = "word ".repeat(2000);
    let speech_cases: Vec<(&str, String, &str, u16, &str)> = vec![
        (
            "unknown voice",
            r#"{"model":"tts-1","input":"Hi.","voice":"alloy"}"#.into(),
            "application/json",
            400,
            "invalid_voice",
        ),
        (
            "unknown model",
            r#"{"model":"tts-9","input":"Hi.","voice":"jf_alpha"}"#.into(),
            "application/json",
            404,
            "model_not_found",
        ),
        (
            "empty input",
            r#"{"model":"tts-1","input":"  ","voice":"jf_alpha"}"#.into(),
            "application/json",
            400,
            "empty_input",
        ),
        (
            "10,000 characters",
            format!(r#"{{"model":"tts-1","input":"{long}","voice":"jf_alpha"}}"#),
            "application/json",
            400,
            "string_above_max_length",
        ),
        (
            "wrong content type",
            r#"{"model":"tts-1","input":"Hi.","voice":"jf_alpha"}"#.into(),
            "text/plain",
            415,
            "invalid_content_type",
        ),
        (
            "not JSON",
            "input=Hi".into(),
            "application/json",
            400,
            "invalid_json",
        ),
        (
            "bad format",
            r#"{"model":"tts-1","input":"Hi.","voice":"jf_alpha","response_format":"wma"}"#.into(),
            "application/json",
            400,
            "invalid_value",
        ),
        (
            "bad speed",
            r#"{"model":"tts-1","input":"Hi.","voice":"jf_alpha","speed":9}"#.into(),
            "application/json",
            400,
            "invalid_value",
        ),
    ];
    for (what, json, content_type, status, code) in speech_cases {
        let ct = format!("Content-Type: {content_type}");
        let (got, _, body) = server.curl("/v1/audio/speech", &["-H", auth, "-H", &ct, "-d", &json]);
        assert_eq!(got, status, "{what}: {}", String::from_utf8_lossy(&body));
        assert_eq!(error_of(&body)["code"], code, "{what}");
    }

    // tiny.en is English-only: translation is refused, naming the model.
    let f = file(&jfk);
    let (got, _, body) = server.curl(
        "/v1/audio/translations",
        &["-H", auth, "-F", &f, "-F", "model=whisper-1"],
    );
    assert_eq!(got, 400, "{}", String::from_utf8_lossy(&body));
    let err = error_of(&body);
    assert_eq!(err["code"], "unsupported_task");
    assert!(
        err["message"].as_str().unwrap().contains("tiny.en"),
        "{err}"
    );

    // Still up, and right with the key.
    let f = file(&jfk);
    let (status, _, body) = server.curl(
        "/v1/audio/transcriptions",
        &[
            "-H",
            auth,
            "-F",
            &f,
            "-F",
            "model=whisper-1",
            "-F",
            "response_format=text",
        ],
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(normalize(&String::from_utf8_lossy(&body)).contains("ask not"));
    // Probes and metrics need no key.
    assert_eq!(server.curl("/readyz", &[]).0, 200);
    assert_eq!(server.curl("/healthz", &[]).0, 200);
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    // No waiting room: one transcription runs, the others are turned away at once.
    let server = Server::start(&["stt", "--queue", "0"]);
    let jfk = fixture("jfk.wav");
    let results = server.transcribe_at_once(4, &jfk);
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let full: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert!(
        ok >= 1 && !full.is_empty() && ok + full.len() == 4,
        "{:?}",
        results.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    for (_, head, body) in full {
        assert!(head.to_lowercase().contains("retry-after: 1"), "{head}");
        assert_eq!(error_of(body)["type"], "rate_limit_error");
    }
    // Served again once the model is free.
    let (status, _) = server.transcribe(&jfk, &[]);
    assert_eq!(status, 200);
}

/// What `work` returns, and the peak resident memory of process `pid` (KiB, sampled every
/// 50 ms) while it ran.
fn peak_rss_during<T: Send>(pid: u32, work: impl FnOnce() -> T + Send) -> (T, u64) {
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                peak = peak.max(common::netns::rss_kib(pid));
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        });
        let result = work();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        (result, sampler.join().unwrap())
    })
}

#[test]
fn twenty_concurrent_transcriptions_get_answers_or_429s_and_memory_stays_bounded() {
    let server = Server::start(&["stt", "--queue", "8"]);
    let jfk = fixture("jfk.wav");
    let pid = server.child.id();
    let idle = common::netns::rss_kib(pid);
    let (results, peak) = peak_rss_during(pid, || server.transcribe_at_once(20, &jfk));
    let statuses: Vec<u16> = results.iter().map(|r| r.0).collect();
    let ok = statuses.iter().filter(|&&c| c == 200).count();
    // Two run (one per core) and eight wait: at least those ten are answered, the rest only
    // turned away.
    assert!(ok >= 10, "{statuses:?}");
    assert!(
        statuses.iter().all(|&c| c == 200 || c == 429),
        "{statuses:?}"
    );
    for (_, _, body) in results.iter().filter(|r| r.0 == 200) {
        assert!(normalize(&String::from_utf8_lossy(body)).contains("ask not"));
    }
    eprintln!(
        "20 concurrent: {ok} answered, {} turned away; RSS idle {} MiB, peak {} MiB",
        20 - ok,
        idle / 1024,
        peak / 1024
    );
    // Uploads are 350 KB each; what grows is one Whisper state and decoding pipeline per core
    // (two here), bounded by the cores, not by the queue or the clients.
    assert!(peak < idle + 160 * 1024, "idle {idle} KiB, peak {peak} KiB");
}

/// `temperature` reaches the decoder: 0 gives the same transcript every time; 1 samples the
/// words, so five tries do not all give the greedy one.
#[test]
fn temperature_samples_the_words() {
    let server = Server::start(&["stt"]);
    let jfk = fixture("jfk.wav");
    let at = |t: &str| {
        let (status, text) =
            server.transcribe(&jfk, &["response_format=text", &format!("temperature={t}")]);
        assert_eq!(status, 200, "{text}");
        text
    };
    let greedy = at("0");
    assert!(
        normalize(&greedy).contains("ask not what your country"),
        "{greedy}"
    );
    assert_eq!(at("0"), greedy);
    let sampled: Vec<String> = (0..5).map(|_| at("1")).collect();
    assert!(
        sampled.iter().any(|t| *t != greedy),
        "temperature 1 gave the greedy transcript five times: {greedy}"
    );
}

/// Twenty 20 MB uploads at once, sent slowly (2 s each), to a server with room for two: the
/// eighteen beyond its queue are answered 429 without their uploads being kept, and the two it
/// takes go to disk as they arrive, so its memory does not grow with the uploads (it grew by
/// ~400 MB when each upload was read into memory before the queue was asked; ~20–45 MB now).
#[test]
fn uploads_beyond_the_queue_are_turned_away_and_uploads_are_not_held_in_memory() {
    let server = Server::start(&["stt", "--queue", "0"]);
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.wav");
    // Not audio: the two taken are refused as undecodable once stored.
    let bytes: Vec<u8> = (0..20u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    std::fs::write(&big, bytes).unwrap();
    let pid = server.child.id();
    let idle = common::netns::rss_kib(pid);
    let (results, peak) = peak_rss_during(pid, || {
        server.transcribe_at_once_with(20, &big, &["--limit-rate", "10M"])
    });
    let statuses: Vec<u16> = results.iter().map(|r| r.0).collect();
    let full = statuses.iter().filter(|&&c| c == 429).count();
    assert!(
        full >= 15 && statuses.iter().all(|&c| c == 429 || c == 400),
        "{statuses:?}"
    );
    eprintln!(
        "20 uploads of 20 MB: {full} turned away; RSS idle {} MiB, peak {} MiB",
        idle / 1024,
        peak / 1024
    );
    assert!(peak < idle + 100 * 1024, "idle {idle} KiB, peak {peak} KiB");
    assert_eq!(server.curl("/healthz", &[]).0, 200);
}

/// The official `openai` Python client (PyPI, pinned; scripts/test installs it in a cached venv)
/// transcribes and synthesises against `vox serve` with only its base URL changed.
#[test]
fn the_official_openai_client_works_unchanged() {
    let python = dirs_home().join(".cache/vox/openai-venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: scripts/test installs the openai client (pip install openai==3.57.0)",
        python.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "sesame").unwrap();
    let server = Server::start(&["all", "--api-key-file", &key.display().to_string()]);
    let script = common::repo().join("tests/openai_client.py");
    let out = check(
        Command::new(&python)
            .arg(script)
            .arg(server.url("/v1"))
            .arg(fixture("jfk.wav"))
            .arg(dir.path()),
    );
    eprintln!("{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("ok ")).count(),
        8,
        "{out}"
    );
    // The WAV it streamed to a file says what it was asked to.
    let f = format!("file=@{}", dir.path().join("speech.wav").display());
    let (status, _, heard) = server.curl(
        "/v1/audio/transcriptions",
        &[
            "-H",
            "Authorization: Bearer sesame",
            "-F",
            &f,
            "-F",
            "model=whisper-1",
            "-F",
            "response_format=text",
        ],
    );
    let heard = normalize(&String::from_utf8_lossy(&heard));
    assert_eq!(status, 200, "{heard}");
    assert!(
        heard.contains("hello") && heard.contains("service"),
        "{heard}"
    );
}

fn dirs_home() -> std::path::PathBuf {
    std::path::PathBuf::from(std::env::var("HOME").expect("HOME is set"))
}

#[test]
fn startup_errors_name_the_problem() {
    let out = run(vox().args(["serve", "everything"]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expected stt, tts or all"), "{err}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run(vox().args(["serve", "stt", "--listen", &addr]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot listen on") && err.contains(&addr),
        "{err}"
    );

    let out = run(vox().args(["serve", "all", "--api-key-file", "/nonexistent/key"]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot read the API key file"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one error line: {err}");

    // A model whose header reads well but which whisper.cpp cannot load (cut short): the
    // server stops with the model's error instead of serving, never ready.
    let models = check(vox().args(["models", "dir"]));
    let whole = std::fs::read(Path::new(models.trim()).join("ggml-tiny.en-q8_0.bin")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut-short.bin");
    std::fs::write(&cut, &whole[..2_000_000]).unwrap();
    let port = free_port().to_string();
    let out = run(vox()
        .args([
            "serve",
            "stt",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--stt-model",
        ])
        .arg(&cut));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("vox serve: ready"), "{err}");
    assert_one_line_error(&out, "cannot load Whisper model");
    assert!(err.contains("cut-short.bin"), "{err}");
}

/// `vox reply` with transcription and speech on `vox serve` (whisperstt and kokorotts with
/// `url=`) hears and says the same as with the models in-process.
#[test]
fn reply_with_remote_stt_and_tts_matches_local() {
    let server = Server::start(&["all"]);
    let base = server.url("");
    let dir = tempfile::tempdir().unwrap();
    let question = spoken(dir.path(), "What is the capital of France?", "question.wav");
    let line = |out: &str, tag: &str| {
        out.lines()
            .find(|l| l.starts_with(tag))
            .unwrap_or_default()
            .to_string()
    };
    let local = check(
        vox()
            .arg("reply")
            .arg(&question)
            .arg("-o")
            .arg(dir.path().join("local.wav")),
    );
    let answer = dir.path().join("remote.wav");
    let remote = check(
        vox()
            .arg("reply")
            .arg(&question)
            .arg("-o")
            .arg(&answer)
            .args(["--stt", &base, "--tts", &base]),
    );
    assert_eq!(
        line(&remote, "you:"),
        line(&local, "you:"),
        "{local}\n{remote}"
    );
    assert_eq!(
        line(&remote, "reply:"),
        line(&local, "reply:"),
        "{local}\n{remote}"
    );
    assert!(line(&remote, "reply:").contains("Paris"), "{remote}");
    let heard = normalize(&check(vox().arg("transcribe").arg(&answer)));
    assert!(
        heard.contains("paris"),
        "the remote answer audio says: {heard}"
    );
    // Both stages really went to the service.
    let (_, _, metrics) = server.curl("/metrics", &[]);
    let metrics = String::from_utf8_lossy(&metrics);
    for endpoint in ["transcriptions", "speech"] {
        let ok = format!("vox_serve_requests_total{{endpoint=\"{endpoint}\",status=\"200\"}}");
        assert!(
            metric_in(&metrics, &ok).is_some_and(|n| n >= 1.0),
            "{metrics}"
        );
    }
}

/// A speech service that is down costs the elements a warning, not the pipeline: `vox reply`
/// with an unreachable transcription service finds no words, and with an unreachable speech
/// service makes no audio; each says so after a warning naming the service and its attempts,
/// and does not hang. (Retries, back-off, refusals, time-outs and the circuit breaker of the
/// service client are unit-tested in `elements/common/src/remote.rs`.)
#[test]
fn an_unreachable_speech_service_is_a_warning_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let question = spoken(dir.path(), "What is the capital of France?", "question.wav");
    let port = free_port();
    let service = format!("http://127.0.0.1:{port}");
    // Transcription down: the element warns (after its retries) and the utterance has no
    // transcript; the pipeline ends normally and `vox reply` says there was nothing to answer.
    // Speech down: the same for the answer's audio.
    for (flag, element, outcome) in [
        ("--stt", "whisperstt0: utterance 0", "no speech was found"),
        (
            "--tts",
            "kokorotts0: speech service failed",
            "no answer audio was produced",
        ),
    ] {
        let started = Instant::now();
        let out = run(vox()
            .arg("reply")
            .arg(&question)
            .arg("-o")
            .arg(dir.path().join("a.wav"))
            .args([flag, &service]));
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        let warning = err
            .lines()
            .find(|l| l.contains("WARN") && l.contains(element))
            .unwrap_or_else(|| panic!("no warning from {element}: {err}"));
        assert!(
            warning.contains(&format!("127.0.0.1:{port}"))
                && warning.contains("after 3 attempt(s)"),
            "{warning}"
        );
        assert!(err.contains(outcome), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "took {:?}",
            started.elapsed()
        );
        assert!(!dir.path().join("a.wav").exists());
    }
}
