//! `whisperstt` in a gst_check harness, on the real tiny.en model: caps, one text buffer per
//! utterance with PTS/duration, structured transcript events, EOS drain, flush, latency,
//! continuous mode without a VAD, interim results, word timestamps, and the shared model.

use gst::prelude::*;
use gst_check::Harness;
use vox_common::events::{SpeechBoundary, SpeechPause, Transcript, TurnMark, TurnState};
use vox_common::testing::{audio_caps, f32_buffer, fixture_samples, min_latency, start_error};

fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        gst::init().unwrap();
        gstvoxwhisper::plugin_register_static().expect("register plugin");
    });
}

fn normalize(t: &str) -> String {
    t.to_lowercase()
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn harness(props: &str) -> Harness {
    init();
    let mut h = Harness::new_parse(&format!("whisperstt {props}"));
    h.set_src_caps(audio_caps(16000));
    h
}

fn boundary(start: bool, ms: u64, utterance: u64) -> gst::Event {
    let t = gst::ClockTime::from_mseconds(ms);
    SpeechBoundary {
        start,
        pts: t,
        running_time: t,
        probability: 0.9,
        utterance,
    }
    .to_event()
}

fn pause(resume: bool, ms: u64, utterance: u64) -> gst::Event {
    let t = gst::ClockTime::from_mseconds(ms);
    SpeechPause {
        resume,
        pts: t,
        running_time: t,
        utterance,
    }
    .to_event()
}

fn push_range(h: &mut Harness, audio: &[f32], from_ms: usize, to_ms: usize) {
    let (a, b) = (from_ms * 16, (to_ms * 16).min(audio.len()));
    let mut i = a;
    while i < b {
        let end = (i + 320).min(b);
        h.push(f32_buffer(&audio[i..end], i, 16000)).unwrap();
        i = end;
    }
}

/// Pulls text buffers (with their transcript events) until EOS.
fn collect(h: &mut Harness) -> Vec<(gst::Buffer, Transcript)> {
    let mut out = Vec::new();
    let mut pending = None;
    loop {
        let ev = h.pull_event().expect("event");
        if ev.type_() == gst::EventType::Eos {
            break;
        }
        if let Some(t) = ev.structure().and_then(Transcript::from_structure) {
            pending = Some(t);
            let buf = h.pull().expect("text buffer after transcript event");
            out.push((buf, pending.take().unwrap()));
        }
    }
    assert!(pending.is_none());
    out
}

#[test]
fn one_buffer_per_utterance_with_pts_and_duration() {
    let mut h = harness("");
    let audio = fixture_samples("jfk.wav");
    // Utterances as silerovad marks them in jfk.wav (two of its four).
    h.push_event(boundary(true, 322, 0));
    push_range(&mut h, &audio, 0, 2800);
    h.push_event(boundary(false, 2270, 0));
    h.push_event(boundary(true, 8162, 1));
    push_range(&mut h, &audio, 2800, 11000);
    h.push_event(boundary(false, 10800, 1));
    h.push_event(gst::event::Eos::new());
    let out = collect(&mut h);
    assert_eq!(out.len(), 2, "{out:?}");
    let (buf, t) = &out[1];
    let text = std::str::from_utf8(&buf.map_readable().unwrap())
        .unwrap()
        .to_string();
    assert_eq!(text, t.text);
    assert_eq!(normalize(&text), "ask what you can do for your country");
    // PTS = utterance start (VAD start less half the 200 ms context padding).
    assert_eq!(buf.pts(), Some(gst::ClockTime::from_mseconds(8062)));
    assert_eq!(buf.pts(), Some(t.pts));
    assert_eq!(buf.duration(), Some(t.duration));
    assert!(!t.partial);
    assert_eq!(t.utterance, 1);
    assert!(!t.segments.is_empty() && t.segments[0].start >= t.pts);
    assert!(
        normalize(&out[0].1.text).starts_with("and so my fellow americ"),
        "{}",
        out[0].1.text
    );
    let caps = h.sinkpad().unwrap().current_caps().unwrap();
    assert_eq!(caps.structure(0).unwrap().name(), "text/x-raw");
}

/// Pushes jfk.wav's 7-11 s, timestamped `lag_ms(sample)` behind its samples, between the VAD's
/// boundaries of "ask what you can do for your country" (8162 ms, and `end_ms` in the lagging
/// stream time), and returns the one transcript.
fn transcribe_lagging(lag_ms: impl Fn(usize) -> usize, end_ms: u64) -> Transcript {
    let mut h = harness("");
    let audio = fixture_samples("jfk.wav");
    h.push_event(boundary(true, 8162, 0));
    let (mut i, end) = (7000 * 16, 11000 * 16);
    while i < end {
        let n = 160.min(end - i);
        let mut buf = f32_buffer(&audio[i..i + n], i, 16000);
        let pts = gst::ClockTime::from_mseconds((i / 16 - lag_ms(i)) as u64);
        buf.get_mut().unwrap().set_pts(pts);
        h.push(buf).unwrap();
        i += n;
    }
    h.push_event(boundary(false, end_ms, 0));
    h.push_event(gst::event::Eos::new());
    let out = collect(&mut h);
    assert_eq!(out.len(), 1, "{out:?}");
    let t = out[0].1.clone();
    assert_eq!(
        normalize(&t.text),
        "ask what you can do for your country",
        "{}",
        t.text
    );
    t
}

/// A live source's clock stepping back (WebRTC's does at speech onsets) while the samples run
/// on: every sample is transcribed, and boundaries in stream time are mapped as silerovad maps
/// them. Dropping the "overlapping" samples cut 10 ms pieces out of words, and tiny.en heard
/// "France" as "friends".
#[test]
fn samples_are_kept_when_the_stream_time_steps_back() {
    // From 8600, 9200 and 9800 ms of audio on, the timestamps lag 30, 60 and 90 ms behind.
    let t = transcribe_lagging(
        |sample| match sample / 16 {
            ..8600 => 0,
            8600..9200 => 30,
            9200..9800 => 60,
            _ => 90,
        },
        10800 - 90,
    );
    // From 100 ms before the start to 200 ms after the end (the context padding): every sample
    // between, the 90 ms past the timestamps included; its time is the stream's as it is now,
    // as silerovad maps it, so that it ends where the VAD's end (and the padding) is.
    assert_eq!(
        t.duration,
        gst::ClockTime::from_mseconds(10800 + 200 - 8062)
    );
    assert_eq!(t.pts, gst::ClockTime::from_mseconds(8062 - 90));
    assert_eq!(
        t.pts + t.duration,
        gst::ClockTime::from_mseconds(10800 - 90 + 200)
    );
}

/// A clock that steps back and later catches up: the step forward takes the offset back, no
/// silence goes in, and the end lands where the VAD put it.
#[test]
fn a_clock_that_catches_up_again_adds_no_silence() {
    let t = transcribe_lagging(
        |sample| match sample / 16 {
            8600..9800 => 60,
            _ => 0,
        },
        10800,
    );
    assert_eq!(t.pts, gst::ClockTime::from_mseconds(8062));
    assert_eq!(
        t.duration,
        gst::ClockTime::from_mseconds(10800 + 200 - 8062)
    );
}

#[test]
fn a_paused_utterance_is_transcribed_ahead_and_dropped_when_speech_resumes() {
    let audio = fixture_samples("jfk.wav");
    let mut h = harness("");
    // Paused where it ends: transcribed ahead, the same transcript as without the pause.
    h.push_event(boundary(true, 322, 0));
    push_range(&mut h, &audio, 0, 2300);
    h.push_event(pause(false, 2270, 0));
    push_range(&mut h, &audio, 2300, 2800);
    h.push_event(boundary(false, 2270, 0));
    // Paused in mid-sentence, then resumed: what was transcribed ahead is not used.
    h.push_event(boundary(true, 8162, 1));
    push_range(&mut h, &audio, 2800, 9300);
    h.push_event(pause(false, 9000, 1));
    push_range(&mut h, &audio, 9300, 9500);
    h.push_event(pause(true, 9450, 1));
    push_range(&mut h, &audio, 9500, 11000);
    h.push_event(boundary(false, 10800, 1));
    // Paused, then the stream ends (elsewhere than at the pause): transcribed again. The
    // fixture's opening 3 s again, placed from 11 s on.
    h.push_event(boundary(true, 11100, 2));
    for i in (0..48000).step_by(320) {
        h.push(f32_buffer(&audio[i..i + 320], 176_000 + i, 16000))
            .unwrap();
    }
    h.push_event(pause(false, 13000, 2));
    h.push_event(gst::event::Eos::new());
    let out = collect(&mut h);
    assert_eq!(out.len(), 3, "{out:?}");
    assert!(
        out[0].1.ahead && !out[1].1.ahead && !out[2].1.ahead,
        "{out:?}"
    );
    assert!(
        normalize(&out[0].1.text).starts_with("and so my fellow americ"),
        "{}",
        out[0].1.text
    );
    assert_eq!(
        normalize(&out[1].1.text),
        "ask what you can do for your country"
    );
    assert_eq!(out[2].0.pts(), Some(gst::ClockTime::from_mseconds(11000)));
    assert_eq!(out[2].0.duration(), Some(gst::ClockTime::from_seconds(3)));

    // The same first utterance without a pause: the very same transcript, not ahead.
    let mut h = harness("");
    h.push_event(boundary(true, 322, 0));
    push_range(&mut h, &audio, 0, 2800);
    h.push_event(boundary(false, 2270, 0));
    h.push_event(gst::event::Eos::new());
    let plain = collect(&mut h);
    assert_eq!(plain[0].1.text, out[0].1.text);
    assert_eq!(plain[0].0.duration(), out[0].0.duration());
    assert!(!plain[0].1.ahead);
}

/// Pulls events until a `vox-turn` one; returns it and the transcripts (with their text) that
/// came before it.
fn until_mark(h: &mut Harness) -> (TurnMark, Vec<(Transcript, String)>) {
    let mut transcripts = Vec::new();
    loop {
        let ev = h.pull_event().expect("a vox-turn event");
        if let Some(mark) = TurnMark::from_event(&ev) {
            return (mark, transcripts);
        }
        if let Some(t) = ev.structure().and_then(Transcript::from_structure) {
            let buf = h.pull().expect("text buffer after transcript event");
            let text = String::from_utf8(buf.map_readable().unwrap().to_vec()).unwrap();
            transcripts.push((t, text));
        }
    }
}

#[test]
fn send_ahead_sends_the_paused_transcript_at_once_then_confirms_or_withdraws_it() {
    let audio = fixture_samples("jfk.wav");
    let mut h = harness("send-ahead=true");
    // Paused where it ends: the transcript comes before the end, after a tentative mark...
    h.push_event(boundary(true, 322, 0));
    push_range(&mut h, &audio, 0, 2300);
    h.push_event(pause(false, 2270, 0));
    // (Transcribed once the audio to the end's padding is in.)
    push_range(&mut h, &audio, 2300, 2500);
    let (mark, before) = until_mark(&mut h);
    assert_eq!((mark.state, mark.id), (TurnState::Tentative, 1));
    assert!(before.is_empty(), "{before:?}");
    let (next, ahead) = {
        let ev = h.pull_event().expect("the transcript");
        let t = ev
            .structure()
            .and_then(Transcript::from_structure)
            .expect("a transcript");
        let buf = h.pull().expect("its text");
        (
            t,
            String::from_utf8(buf.map_readable().unwrap().to_vec()).unwrap(),
        )
    };
    assert!(next.ahead && !next.partial, "{next:?}");
    assert!(
        normalize(&ahead).starts_with("and so my fellow americ"),
        "{ahead}"
    );
    // ...and the end confirms it, with nothing sent again.
    push_range(&mut h, &audio, 2500, 2800);
    h.push_event(boundary(false, 2270, 0));
    let (mark, again) = until_mark(&mut h);
    assert_eq!((mark.state, mark.id), (TurnState::Confirmed, 1));
    assert!(again.is_empty(), "{again:?}");
    // Paused in mid-sentence, then resumed: withdrawn, and the whole utterance follows as an
    // ordinary transcript at its end.
    h.push_event(boundary(true, 8162, 1));
    push_range(&mut h, &audio, 2800, 9300);
    h.push_event(pause(false, 9000, 1));
    let (mark, _) = until_mark(&mut h);
    assert_eq!((mark.state, mark.id), (TurnState::Tentative, 2));
    push_range(&mut h, &audio, 9300, 9500);
    h.push_event(pause(true, 9450, 1));
    let (mark, _) = until_mark(&mut h);
    assert_eq!((mark.state, mark.id), (TurnState::Withdrawn, 2));
    push_range(&mut h, &audio, 9500, 11000);
    h.push_event(boundary(false, 10800, 1));
    h.push_event(gst::event::Eos::new());
    let out = collect(&mut h);
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(!out[0].1.ahead);
    assert_eq!(
        normalize(&out[0].1.text),
        "ask what you can do for your country"
    );
}

#[test]
fn without_vad_transcribes_on_eos_and_at_max_utterance() {
    let mut h = harness("max-utterance-ms=6000");
    let audio = fixture_samples("jfk.wav");
    push_range(&mut h, &audio, 0, 11000);
    h.push_event(gst::event::Eos::new());
    let out = collect(&mut h);
    assert_eq!(out.len(), 2, "11 s cut at 6 s: {out:?}");
    assert_eq!(out[0].0.pts(), Some(gst::ClockTime::ZERO));
    assert_eq!(out[1].0.pts(), Some(gst::ClockTime::from_seconds(6)));
    assert_eq!(out[1].0.duration(), Some(gst::ClockTime::from_seconds(5)));
    // A cut in mid-sentence may cost a word at the seam; the rest must be there.
    let all = normalize(&format!("{} {}", out[0].1.text, out[1].1.text));
    assert!(
        all.starts_with("and so my fellow americans ask not"),
        "{all}"
    );
    assert!(
        all.ends_with("ask what you can do for your country"),
        "{all}"
    );
}

#[test]
fn word_timestamps_are_ordered_and_inside_the_utterance() {
    let mut h = harness("word-timestamps=true");
    let audio = fixture_samples("jfk.wav");
    h.push_event(boundary(true, 8162, 0));
    push_range(&mut h, &audio, 7900, 11000);
    h.push_event(gst::event::Eos::new());
    let out = collect(&mut h);
    let t = &out[0].1;
    let words: Vec<_> = t.segments.iter().flat_map(|s| s.words.iter()).collect();
    assert!(words.len() >= 6, "{words:?}");
    let mut last = gst::ClockTime::ZERO;
    for w in &words {
        assert!(w.start >= last && w.end >= w.start, "{words:?}");
        assert!(w.end <= t.pts + t.duration + gst::ClockTime::from_mseconds(10));
        last = w.start;
    }
    assert_eq!(
        normalize(
            &words
                .iter()
                .map(|w| w.text.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        ),
        normalize(&t.text)
    );
}

#[test]
fn interim_results_are_marked_partial() {
    let mut h = harness("interim-interval-ms=1000");
    let audio = fixture_samples("jfk.wav");
    h.push_event(boundary(true, 5378, 0));
    // Live-like pacing so the worker has time for interim results.
    for i in (5200..7900).step_by(20) {
        push_range(&mut h, &audio, i, i + 20);
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    h.push_event(boundary(false, 7678, 0));
    h.push_event(gst::event::Eos::new());
    let out = collect(&mut h);
    let partial = out.iter().filter(|(_, t)| t.partial).count();
    assert!(partial >= 1, "{out:?}");
    let last = out.last().unwrap();
    assert!(!last.1.partial);
    assert_eq!(normalize(&last.1.text), "what your country can do for you");
}

#[test]
fn flush_drops_work_in_flight() {
    let mut h = harness("");
    let audio = fixture_samples("jfk.wav");
    h.push_event(boundary(true, 322, 0));
    push_range(&mut h, &audio, 0, 2800);
    h.push_event(boundary(false, 2270, 0));
    assert!(h.push_event(gst::event::FlushStart::new()));
    assert!(h.push_event(gst::event::FlushStop::new(true)));
    h.push_event(gst::event::Segment::new(&gst::FormattedSegment::<
        gst::ClockTime,
    >::new()));
    h.push_event(boundary(true, 5378, 1));
    push_range(&mut h, &audio, 5000, 8000);
    h.push_event(boundary(false, 7678, 1));
    h.push_event(gst::event::Eos::new());
    let out = collect(&mut h);
    assert_eq!(out.len(), 1, "only the utterance after the flush: {out:?}");
    assert_eq!(
        normalize(&out[0].1.text),
        "what your country can do for you"
    );
}

#[test]
fn latency_query_adds_configured_latency() {
    let mut h = harness("latency-ms=1500");
    h.set_upstream_latency(gst::ClockTime::from_mseconds(20));
    assert_eq!(
        min_latency(&h.element().unwrap()),
        gst::ClockTime::from_mseconds(1520)
    );
}

#[test]
fn model_is_loaded_once_per_process() {
    init();
    let a = gstvoxwhisper::engine::load_model(vox_common::models::DEFAULT_WHISPER)
        .expect("run scripts/setup");
    let b = gstvoxwhisper::engine::load_model(vox_common::models::DEFAULT_WHISPER).unwrap();
    assert!(std::sync::Arc::ptr_eq(&a, &b));
}

#[test]
fn missing_model_fails_at_start_with_fetch_command() {
    init();
    let err = start_error("whisperstt model=huge");
    assert!(err.contains("unknown model \"huge\""), "{err}");
}

#[test]
fn batch_mode_gives_each_utterance_its_own_words() {
    let mut h = harness("batch-ms=25000");
    let audio = fixture_samples("jfk.wav");
    // jfk.wav's four utterances as silerovad marks them (ms).
    let spans = [(322, 2270), (3266, 4446), (5378, 7678), (8162, 10800)];
    let mut pushed = 0;
    for (i, (start, end)) in spans.iter().enumerate() {
        push_range(&mut h, &audio, pushed, start + 300);
        h.push_event(boundary(true, *start as u64, i as u64));
        push_range(&mut h, &audio, start + 300, end + 500);
        h.push_event(boundary(false, *end as u64, i as u64));
        pushed = end + 500;
    }
    push_range(&mut h, &audio, pushed, 11000);
    // Nothing comes out before the batch is complete (EOS here), however long we wait.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(h.try_pull().is_none());
    h.push_event(gst::event::Eos::new());
    let out = collect(&mut h);
    let texts: Vec<String> = out.iter().map(|(_, t)| normalize(&t.text)).collect();
    assert_eq!(
        texts,
        [
            "and so my fellow americans",
            "ask not",
            "what your country can do for you",
            "ask what you can do for your country"
        ],
        "{out:?}"
    );
    for ((buf, t), (start, _)) in out.iter().zip(spans) {
        assert_eq!(
            buf.pts(),
            Some(gst::ClockTime::from_mseconds(start as u64 - 100))
        );
        assert_eq!(buf.pts(), Some(t.pts));
        assert!(!t.partial);
    }
}

#[test]
fn backend_remote_needs_a_url_and_backend_local_keeps_the_model_in_process() {
    init();
    let err = start_error("whisperstt backend=remote");
    assert!(err.contains("url="), "{err}");

    // With backend=local, a url (of nothing) is not used: the words come from the model.
    let mut h = harness("backend=local url=http://127.0.0.1:1 retries=0");
    let audio = fixture_samples("jfk.wav");
    push_range(&mut h, &audio, 0, 11000);
    h.push_event(gst::event::Eos::new());
    let out = collect(&mut h);
    let all = normalize(
        &out.iter()
            .map(|(_, t)| t.text.as_str())
            .collect::<Vec<_>>()
            .join(" "),
    );
    assert!(all.contains("ask not what your country"), "{all}");
}
