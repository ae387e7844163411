//! `vox call`: a terminal peer for the live agent. It publishes a microphone made of audio
//! files played in real time (silence in between, as a real microphone sends), finds the
//! agent's voice for this call (on the signalling server, or in the LiveKit room), and records
//! both into a stereo WAV on one clock — left: what it played, right: what the agent said —
//! from which it reads each turn's timing.

use crate::graph::quote;
use crate::livekit::{self, Credentials, LivekitError};
use crate::runner::{self, RunError};
use crate::webrtc::{self, ProducerEvent, Producers, WebrtcError};
use gst::glib;
use gst::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The recording's rate.
pub const RATE: u32 = 48_000;

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Webrtc(#[from] WebrtcError),
    #[error(transparent)]
    Livekit(#[from] LivekitError),
    #[error("cannot read {path}: {why}")]
    Input { path: PathBuf, why: String },
    #[error("no agent answered within {0:?} (is `vox agent` running at that signalling URL?)")]
    NoAgent(Duration),
    #[error("the call failed: {0}")]
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct CallOptions {
    /// Signalling server URL (`ws://HOST:PORT`), or the LiveKit server's with `livekit_token`.
    pub url: String,
    /// Join a LiveKit room with this token (its room and identity) instead of plain WebRTC.
    /// Hearing the agent takes a second, hidden participant, whose token is made from
    /// `LIVEKIT_API_KEY` / `LIVEKIT_API_SECRET`.
    pub livekit_token: Option<String>,
    /// Files to play and when (seconds from the start of the call).
    pub plays: Vec<(Duration, PathBuf)>,
    /// Files to play once the agent has been speaking this long (barge-in).
    pub interrupts: Vec<(Duration, PathBuf)>,
    pub record: PathBuf,
    /// After the last file and the agent's last audio, how long to wait for more.
    pub linger: Duration,
    /// The longest the call may last.
    pub timeout: Duration,
    /// Send the microphone as a stereo track (both channels the same), as some clients do.
    pub stereo: bool,
}

/// One exchange as heard by the caller, in seconds from the start of the recording.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    /// The caller's speech ended (last loud frame on the left before the agent's answer).
    pub speech_end: f64,
    /// The agent's answer began and ended (right channel).
    pub answer_start: f64,
    pub answer_end: f64,
    /// The longest silence inside the answer (seconds; 0 when it was said in one go). An
    /// answer's parts are the agent's runs of audio until the caller speaks again; a pause
    /// shorter than a sentence's (0.7 s) is not counted.
    pub longest_pause: f64,
}

impl Turn {
    pub fn voice_to_voice(&self) -> Duration {
        Duration::from_secs_f64((self.answer_start - self.speech_end).max(0.0))
    }
}

#[derive(Debug, Clone)]
pub struct CallReport {
    pub turns: Vec<Turn>,
    /// The agent's audio stopped while the caller was speaking (barge-in), in seconds: the
    /// caller's speech onset and the end of the agent's audio.
    pub interruptions: Vec<(f64, f64)>,
    pub duration: Duration,
}

/// Places a call; returns the timings read from the recording (written whole or not at all).
pub fn call(options: &CallOptions) -> Result<CallReport, CallError> {
    runner::init()?;
    for (_, path) in options.plays.iter().chain(&options.interrupts) {
        if let Err(e) = std::fs::File::open(path) {
            return Err(CallError::Input {
                path: path.clone(),
                why: e.to_string(),
            });
        }
    }
    runner::check_writable(&options.record)?;
    let call_id = call_id();
    // LiveKit: the microphone is the token's participant; the ears a hidden one beside it.
    let livekit = match &options.livekit_token {
        Some(token) => {
            let (identity, room) = livekit::token_subject(token)?;
            let ears = Credentials::from_env()?.room_token(
                &room,
                &format!("{identity}-ears"),
                "vox call (listening)",
                livekit::Role::Listener,
                Duration::from_secs(3600),
            )?;
            Some((token.clone(), identity, ears))
        }
        None => None,
    };
    let raw = format!("audio/x-raw,format=F32LE,rate={RATE},channels=1,layout=interleaved");
    let out = match &livekit {
        None => format!(
            "webrtcsink name=out congestion-control=disabled signaller::uri={url} meta={meta}",
            url = quote(&options.url),
            meta = quote(&format!("meta,vox-role=caller,call={call_id}")),
        ),
        Some(_) => format!(
            "livekitwebrtcsink name=out congestion-control=disabled signaller::ws-url={}",
            quote(&options.url)
        ),
    };
    let description = format!(
        "audiotestsrc wave=silence is-live=true samplesperbuffer=960 ! {raw} ! audiomixer name=mic latency=10000000 ! {raw} ! tee name=t \
         t. ! queue ! audioconvert ! audio/x-raw,channels={channels} ! {out} \
         t. ! queue ! audioconvert mix-matrix=\"<<(float)1.0>, <(float)0.0>>\" ! {stereo} ! rec. \
         audiotestsrc wave=silence is-live=true samplesperbuffer=960 ! {stereo} ! audiomixer name=rec latency=10000000 ! {stereo} ! audioconvert ! audio/x-raw,format=S16LE,channels=2 ! wavenc ! filesink location={record}",
        stereo = format!("audio/x-raw,format=F32LE,rate={RATE},channels=2,layout=interleaved"),
        channels = if options.stereo { 2 } else { 1 },
        record = quote(&options.record.display().to_string()),
    );
    let pipeline = runner::launch(&description)?;
    if let Some((token, _, _)) = &livekit {
        pipeline
            .by_name("out")
            .expect("named in the description")
            .property::<glib::Object>("signaller")
            .set_property("auth-token", token);
    }
    let outputs = runner::AtomicOutputs::redirect(&pipeline)?;
    webrtc::no_public_stun(pipeline.upcast_ref());
    webrtc::low_latency(pipeline.upcast_ref());
    let mic = pipeline.by_name("mic").expect("named in the description");
    let length = |plays: &[(Duration, PathBuf)]| -> Result<Duration, CallError> {
        let mut longest = Duration::ZERO;
        for (at, path) in plays {
            longest = longest.max(*at + media_duration(path)?);
        }
        Ok(longest)
    };
    let plays_length = length(&options.plays)?;
    let interrupts_length = length(&options.interrupts)?;
    // The files play once the microphone's connection is up (what a person would hear as "the
    // call has started"), so that nothing said is lost to the connection set-up.
    let connected = Arc::new(AtomicBool::new(false));
    {
        let connected = connected.clone();
        pipeline
            .by_name("out")
            .expect("named in the description")
            .connect("consumer-added", false, move |args| {
                let webrtcbin = args[2].get::<gst::Element>().ok()?;
                let connected = connected.clone();
                webrtcbin.connect_notify(Some("connection-state"), move |bin, _| {
                    let state = bin.property_value("connection-state");
                    if glib::EnumValue::from_value(&state)
                        .is_some_and(|(_, v)| v.nick() == "connected")
                    {
                        connected.store(true, Ordering::SeqCst);
                    }
                });
                None
            });
    }
    // The agent's voice: first and last time it was loud (running time, ns), for the
    // interruptions and for knowing when the call is over.
    let heard = Heard::default();
    // One mixer records both sides: the caller panned left, the agent's voice right (added when
    // it comes). A mixer takes new inputs mid-stream in its stride (audiointerleave did not,
    // now and then failing as not negotiated when the voice joined).
    let agent_mix = pipeline.by_name("rec").expect("named in the description");
    let joined = Arc::new(AtomicBool::new(false));
    let failure = Arc::new(Mutex::new(None::<String>));
    let url = options.url.clone();
    let watch = if let Some((_, identity, ears)) = &livekit {
        // The agent is whoever else publishes in the room (its own ears are hidden).
        let src = gst::ElementFactory::make("livekitwebrtcsrc")
            .build()
            .map_err(|e| CallError::Failed(format!("livekitwebrtcsrc: {e}")))?;
        let signaller = src.property::<glib::Object>("signaller");
        signaller.set_property("ws-url", &options.url);
        signaller.set_property("auth-token", ears);
        signaller.set_property(
            "excluded-producer-peer-ids",
            gst::Array::new([identity.as_str()]),
        );
        listen_to_agent(&pipeline, &agent_mix, src, &heard, &joined).map_err(CallError::Failed)?;
        None
    } else {
        let pipeline = pipeline.downgrade();
        let joined = joined.clone();
        let heard = heard.clone();
        let failure = failure.clone();
        let call_id = call_id.clone();
        Some(Producers::watch(&options.url, move |event| match event {
            ProducerEvent::Added(p)
                if p.meta_str("vox-role").as_deref() == Some("agent")
                    && p.meta_str("call").as_deref() == Some(call_id.as_str()) =>
            {
                if joined.swap(true, Ordering::SeqCst) {
                    return;
                }
                let Some(pipeline) = pipeline.upgrade() else {
                    return;
                };
                let listened = gst::ElementFactory::make("webrtcsrc")
                    .build()
                    .map_err(|e| format!("webrtcsrc: {e}"))
                    .and_then(|src| {
                        src.set_property("stun-server", None::<String>);
                        let signaller = src.property::<glib::Object>("signaller");
                        signaller.set_property("uri", &url);
                        signaller.set_property("producer-peer-id", &p.id);
                        listen_to_agent(&pipeline, &agent_mix, src, &heard, &joined)
                    });
                if let Err(e) = listened {
                    *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                }
            }
            ProducerEvent::Error(e) => {
                *failure.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(format!("signalling: {e}"));
            }
            _ => {}
        })?)
    };
    let started = Instant::now();
    let bus = pipeline.bus().expect("a pipeline has a bus");
    let result = (|| {
        pipeline
            .set_state(gst::State::Playing)
            .map_err(|_| CallError::Failed("the call pipeline failed to start".into()))?;
        let agent_wait = Duration::from_secs(20).min(options.timeout);
        // When the files started (running time), once connected, and when the last one ends.
        let mut playing: Option<Duration> = None;
        let mut plays_end = None;
        let mut interrupting = options.interrupts.is_empty();
        loop {
            if let Some(e) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return Err(CallError::Failed(e));
            }
            let elapsed = started.elapsed();
            if playing.is_none() && connected.load(Ordering::SeqCst) {
                let now = pipeline.current_running_time().unwrap_or_default();
                let start = Duration::from_nanos(now.nseconds()) + Duration::from_millis(300);
                play_files(&pipeline, &mic, &options.plays, start)?;
                playing = Some(start);
                plays_end = Some(start + plays_length);
            }
            let first = heard.first.load(Ordering::SeqCst);
            if !interrupting && first > 0 {
                let start = Duration::from_nanos(first);
                play_files(&pipeline, &mic, &options.interrupts, start)?;
                interrupting = true;
                plays_end = plays_end.max(Some(start + interrupts_length));
            }
            if (playing.is_none() || !joined.load(Ordering::SeqCst)) && elapsed > agent_wait {
                return Err(CallError::NoAgent(agent_wait));
            }
            // Done when the files are over and the agent answered after them and has been
            // quiet for `linger`.
            let voice = Duration::from_nanos(heard.last.load(Ordering::SeqCst));
            let done = plays_end.is_some_and(|end| {
                let now = Duration::from_nanos(
                    pipeline
                        .current_running_time()
                        .unwrap_or_default()
                        .nseconds(),
                );
                interrupting
                    && voice > end
                    && now > end + options.linger
                    && now > voice + options.linger
            });
            if done || elapsed > options.timeout || runner::interrupted() {
                break;
            }
            if let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(50))
                && let gst::MessageView::Error(e) = msg.view()
            {
                return Err(CallError::Failed(runner::describe_error(e)));
            }
        }
        // Finish the recording: EOS into the recorder only.
        let rec = pipeline.by_name("rec").expect("named in the description");
        for pad in rec.sink_pads() {
            pad.send_event(gst::event::Eos::new());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) {
                match msg.view() {
                    gst::MessageView::Eos(_) => return Ok(()),
                    gst::MessageView::Error(e) => {
                        return Err(CallError::Failed(runner::describe_error(e)));
                    }
                    _ => {}
                }
            }
        }
        Err(CallError::Failed("the recording did not finish".into()))
    })();
    drop(watch);
    if !webrtc::stop_within(&pipeline, Duration::from_secs(10)) {
        tracing::warn!(
            "the call's WebRTC elements did not stop within 10 s (gst-plugin-webrtc's \
             signaller can hang when both sides end the session at once); going on without them"
        );
    }
    result?;
    outputs.commit()?;
    let report = analyse(&options.record)?;
    Ok(CallReport {
        duration: started.elapsed(),
        ..report
    })
}

/// Adds the files to the microphone mix, each starting `at` after `start` (running time).
fn play_files(
    pipeline: &gst::Pipeline,
    mic: &gst::Element,
    plays: &[(Duration, PathBuf)],
    start: Duration,
) -> Result<(), CallError> {
    let raw = format!("audio/x-raw,format=F32LE,rate={RATE},channels=1,layout=interleaved");
    for (at, path) in plays {
        let bin = gst::parse::bin_from_description(
            &format!(
                "filesrc location={} ! decodebin ! audioconvert ! audioresample ! {raw} ! queue name=out",
                quote(&path.display().to_string())
            ),
            false,
        )
        .map_err(|e| CallError::Failed(e.to_string()))?;
        // Ghosted by hand: asked to ghost unlinked pads, the parser would also take
        // audioconvert's sink, which waits for decodebin's pad.
        let out = bin.by_name("out").expect("named above");
        let ghost = gst::GhostPad::with_target(&out.static_pad("src").expect("queue src"))
            .map_err(|e| CallError::Failed(e.to_string()))?;
        bin.add_pad(&ghost)
            .map_err(|e| CallError::Failed(e.to_string()))?;
        pipeline
            .add(&bin)
            .map_err(|e| CallError::Failed(e.to_string()))?;
        let sink = mic
            .request_pad_simple("sink_%u")
            .ok_or_else(|| CallError::Failed("no microphone mixer pad".into()))?;
        sink.set_offset((start + *at).as_nanos() as i64);
        bin.static_pad("src")
            .expect("ghosted src pad")
            .link(&sink)
            .map_err(|e| CallError::Failed(format!("{e:?}")))?;
        bin.sync_state_with_parent()
            .map_err(|e| CallError::Failed(e.to_string()))?;
    }
    Ok(())
}

/// When the agent's voice was first and last loud (running time, ns; 0: not yet).
#[derive(Clone, Default)]
struct Heard {
    first: Arc<AtomicU64>,
    last: Arc<AtomicU64>,
}

impl Heard {
    fn mark(&self, ns: u64) {
        let _ = self
            .first
            .compare_exchange(0, ns, Ordering::SeqCst, Ordering::SeqCst);
        self.last.store(ns, Ordering::SeqCst);
    }
}

/// Adds `src` (a WebRTC source of the agent's voice) into the recording's right channel (`mix`
/// is the recorder); `joined` is set once its audio comes.
fn listen_to_agent(
    pipeline: &gst::Pipeline,
    mix: &gst::Element,
    src: gst::Element,
    heard: &Heard,
    joined: &Arc<AtomicBool>,
) -> Result<(), String> {
    let mix = mix.clone();
    let heard = heard.clone();
    let joined = joined.clone();
    let weak = pipeline.downgrade();
    src.connect_pad_added(move |_, pad| {
        let Some(pipeline) = weak.upgrade() else {
            return;
        };
        joined.store(true, Ordering::SeqCst);
        let chain = (|| -> Result<(), glib::BoolError> {
            let convert = gst::ElementFactory::make("audioconvert").build()?;
            let resample = gst::ElementFactory::make("audioresample").build()?;
            let raw = |channels: i32| {
                gst::ElementFactory::make("capsfilter")
                    .property(
                        "caps",
                        gst::Caps::builder("audio/x-raw")
                            .field("format", "F32LE")
                            .field("rate", RATE as i32)
                            .field("channels", channels)
                            .build(),
                    )
                    .build()
            };
            let caps = raw(1)?;
            let pan = gst::ElementFactory::make("audioconvert")
                .property(
                    "mix-matrix",
                    gst::Array::new([gst::Array::new([0f32]), gst::Array::new([1f32])]),
                )
                .build()?;
            let stereo = raw(2)?;
            let queue = gst::ElementFactory::make("queue").build()?;
            let chain = [&convert, &resample, &caps, &pan, &stereo, &queue];
            pipeline.add_many(chain)?;
            gst::Element::link_many(chain)?;
            let sink = mix
                .request_pad_simple("sink_%u")
                .ok_or_else(|| glib::bool_error!("no mixer pad"))?;
            queue
                .static_pad("src")
                .expect("queue has a src pad")
                .link(&sink)
                .map_err(|e| glib::bool_error!("{e:?}"))?;
            let heard = heard.clone();
            let weak = pipeline.downgrade();
            let mono = caps.static_pad("src").expect("capsfilter has a src pad");
            mono.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
                if let Some(buffer) = info.buffer()
                    && let Ok(map) = buffer.map_readable()
                    && loud_f32le(map.as_slice())
                    && let Some(now) = weak.upgrade().and_then(|p| p.current_running_time())
                {
                    heard.mark(now.nseconds());
                }
                gst::PadProbeReturn::Ok
            });
            for e in chain {
                e.sync_state_with_parent()?;
            }
            pad.link(&convert.static_pad("sink").expect("sink pad"))
                .map_err(|e| glib::bool_error!("{e:?}"))?;
            Ok(())
        })();
        if let Err(e) = chain {
            tracing::error!("cannot record the agent's voice: {e}");
        }
    });
    pipeline.add(&src).map_err(|e| e.to_string())?;
    src.sync_state_with_parent().map_err(|e| e.to_string())?;
    Ok(())
}

/// Whether samples (full scale ±1) hold sound above the noise floor: RMS over -40 dBFS.
fn loud(samples: impl Iterator<Item = f64>) -> bool {
    let (sum, n) = samples.fold((0f64, 0usize), |(s, n), x| (s + x * x, n + 1));
    n > 0 && (sum / n as f64).sqrt() > 0.01
}

/// [`loud`] over F32LE bytes.
fn loud_f32le(bytes: &[u8]) -> bool {
    loud(
        bytes
            .chunks_exact(4)
            .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
    )
}

/// How long an audio file plays.
fn media_duration(path: &Path) -> Result<Duration, CallError> {
    let fail = |why: &str| CallError::Input {
        path: path.to_path_buf(),
        why: why.to_string(),
    };
    let pipeline = runner::launch(&format!(
        "filesrc location={} ! decodebin ! fakesink",
        quote(&path.display().to_string())
    ))?;
    let paused = pipeline.set_state(gst::State::Paused).is_ok()
        && pipeline.state(gst::ClockTime::from_seconds(10)).0.is_ok();
    let duration = pipeline.query_duration::<gst::ClockTime>();
    let _ = pipeline.set_state(gst::State::Null);
    if !paused {
        return Err(fail("not audio GStreamer can decode"));
    }
    duration
        .map(|d| Duration::from_nanos(d.nseconds()))
        .ok_or_else(|| fail("its duration is unknown"))
}

/// Reads the turns from a call recording (left: caller, right: agent).
pub fn analyse(path: &Path) -> Result<CallReport, CallError> {
    let fail = |why: String| CallError::Input {
        path: path.to_path_buf(),
        why,
    };
    let mut reader = hound::WavReader::open(path).map_err(|e| fail(e.to_string()))?;
    let spec = reader.spec();
    if spec.channels != 2 {
        return Err(fail("not a two-channel call recording".into()));
    }
    let samples: Vec<i16> = reader
        .samples::<i16>()
        .collect::<Result<_, _>>()
        .map_err(|e| fail(e.to_string()))?;
    let frame = (spec.sample_rate / 100) as usize; // 10 ms
    let activity = |channel: usize| -> Vec<bool> {
        samples
            .chunks(frame * 2)
            .map(|c| {
                loud(
                    c.iter()
                        .skip(channel)
                        .step_by(2)
                        .map(|&x| f64::from(x) / 32768.0),
                )
            })
            .collect()
    };
    let caller = activity(0);
    let agent = activity(1);
    Ok(turns_from_activity(&caller, &agent, 0.01))
}

/// Turns from per-frame activity (`frame` seconds each). The agent's audio comes in runs with
/// gaps under 0.7 s (a sentence's pause); the runs after one stretch of the caller's speech and
/// before the next are one answer, whose turn's speech end is the caller's last active frame
/// before it, and whose longest gap is its longest pause.
pub fn turns_from_activity(caller: &[bool], agent: &[bool], frame: f64) -> CallReport {
    let runs = |active: &[bool], gap: usize| -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = Vec::new();
        for (i, &a) in active.iter().enumerate() {
            if !a {
                continue;
            }
            match out.last_mut() {
                Some((_, end)) if i - *end <= gap => *end = i + 1,
                _ => out.push((i, i + 1)),
            }
        }
        out
    };
    let answers = runs(agent, (0.7 / frame) as usize);
    let speech = runs(caller, (0.3 / frame) as usize);
    let mut turns: Vec<Turn> = Vec::new();
    let mut interruptions = Vec::new();
    for &(start, end) in &answers {
        if let Some(&(_, speech_end)) = speech.iter().rfind(|(_, e)| *e <= start) {
            let (speech_end, from, to) = (
                speech_end as f64 * frame,
                start as f64 * frame,
                end as f64 * frame,
            );
            // The next part of the last answer: it follows the same speech, and the caller
            // did not start speaking in between.
            let last = turns.last_mut().filter(|t| {
                t.speech_end == speech_end
                    && !speech
                        .iter()
                        .any(|(s, _)| *s as f64 * frame >= t.answer_end && *s < start)
            });
            match last {
                Some(t) => {
                    t.longest_pause = t.longest_pause.max(from - t.answer_end);
                    t.answer_end = to;
                }
                None => turns.push(Turn {
                    speech_end,
                    answer_start: from,
                    answer_end: to,
                    longest_pause: 0.0,
                }),
            }
        }
        // The caller started speaking during this run: the answer was interrupted, and
        // stopped at `end`.
        if let Some(&(onset, _)) = speech.iter().find(|(s, _)| *s > start && *s < end) {
            interruptions.push((onset as f64 * frame, end as f64 * frame));
        }
    }
    CallReport {
        turns,
        interruptions,
        duration: Duration::from_secs_f64(caller.len() as f64 * frame),
    }
}

/// A call id no other caller has (time and process based).
fn call_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}{:x}", nanos, std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames of 10 ms: active within each (from, to) second range.
    fn activity(ranges: &[(f64, f64)], seconds: f64) -> Vec<bool> {
        (0..(seconds * 100.0) as usize)
            .map(|i| {
                let t = i as f64 / 100.0;
                ranges.iter().any(|&(a, b)| t >= a && t < b)
            })
            .collect()
    }

    #[test]
    fn an_answer_with_a_long_pause_is_one_turn_with_that_pause() {
        let caller = activity(&[(1.0, 3.0)], 12.0);
        // The opening, 2.5 s of silence, the rest; a sentence's pause (0.5 s) is not counted.
        let agent = activity(&[(5.0, 5.7), (8.2, 9.0), (9.5, 10.0)], 12.0);
        let report = turns_from_activity(&caller, &agent, 0.01);
        assert_eq!(report.turns.len(), 1, "{:?}", report.turns);
        let t = &report.turns[0];
        assert!((t.speech_end - 3.0).abs() < 0.02, "{t:?}");
        assert!((t.answer_start - 5.0).abs() < 0.02, "{t:?}");
        assert!((t.answer_end - 10.0).abs() < 0.02, "{t:?}");
        assert!((t.longest_pause - 2.5).abs() < 0.02, "{t:?}");
        assert!(report.interruptions.is_empty());
    }

    #[test]
    fn speech_between_two_answers_makes_two_turns() {
        let caller = activity(&[(1.0, 2.0), (4.0, 5.0)], 10.0);
        let agent = activity(&[(3.0, 3.5), (6.0, 7.0)], 10.0);
        let report = turns_from_activity(&caller, &agent, 0.01);
        assert_eq!(report.turns.len(), 2, "{:?}", report.turns);
        assert!((report.turns[1].speech_end - 5.0).abs() < 0.02);
        assert_eq!(report.turns[0].longest_pause, 0.0);
        assert_eq!(report.turns[1].longest_pause, 0.0);
    }

    #[test]
    fn an_answer_cut_by_the_caller_is_an_interruption() {
        let caller = activity(&[(1.0, 2.0), (4.0, 5.0)], 10.0);
        let agent = activity(&[(3.0, 4.1), (6.0, 7.0)], 10.0);
        let report = turns_from_activity(&caller, &agent, 0.01);
        assert_eq!(report.turns.len(), 2, "{:?}", report.turns);
        assert_eq!(report.interruptions.len(), 1);
        let (onset, stop) = report.interruptions[0];
        assert!((onset - 4.0).abs() < 0.02 && (stop - 4.1).abs() < 0.02);
    }
}
