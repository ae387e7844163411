//! `silerovad` in a gst_check harness, on the real model: caps, pass-through, speech events
//! with PTS, EOS drain, flush reset, latency, drop-silence mode, and the model's reference value.

use gst::prelude::*;
use gst_check::Harness;
use vox_common::events::{SpeechBoundary, SpeechPause};
use vox_common::testing::{audio_caps, f32_buffer, fixture_samples, min_latency, start_error};

fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        gst::init().unwrap();
        gstvoxvad::plugin_register_static().expect("register plugin");
    });
}

fn harness(props: &str) -> Harness {
    init();
    let mut h = Harness::new_parse(&format!("silerovad {props}"));
    h.set_src_caps(audio_caps(16000));
    h
}

/// Pushes audio in 20 ms buffers; returns the speech boundaries seen downstream.
fn push_all(h: &mut Harness, samples: &[f32]) -> Vec<SpeechBoundary> {
    for (i, chunk) in samples.chunks(320).enumerate() {
        assert_eq!(
            h.push(f32_buffer(chunk, i * 320, 16000)),
            Ok(gst::FlowSuccess::Ok)
        );
    }
    drain_events(h)
}

fn drain_events(h: &mut Harness) -> Vec<SpeechBoundary> {
    let mut out = Vec::new();
    while let Some(ev) = h.try_pull_event() {
        if let Some(b) = SpeechBoundary::from_event(&ev) {
            out.push(b);
        }
    }
    out
}

#[test]
fn reference_probability_of_silence() {
    init();
    let mut vad = gstvoxvad::silero::SileroVad::load("silero-vad", 16000)
        .expect("Silero model and ONNX Runtime: run scripts/setup");
    let p = vad.process(&[0.0; 512]).unwrap();
    // models.md: 576 zeros with zero state give 0.0016698.
    assert!((p - 0.0016698).abs() < 1e-5, "{p}");
    assert!(vad.process(&[0.0; 100]).is_err());
}

#[test]
fn passes_audio_through_unchanged_and_marks_speech() {
    let mut h = harness("");
    let audio = fixture_samples("jfk.wav");
    for (i, chunk) in audio.chunks(320).enumerate() {
        let input = f32_buffer(chunk, i * 320, 16000);
        h.push(input.clone()).unwrap();
        let out = h.pull().unwrap();
        assert_eq!(out.pts(), input.pts());
        assert_eq!(out.duration(), input.duration());
        assert_eq!(
            out.map_readable().unwrap().as_slice(),
            input.map_readable().unwrap().as_slice()
        );
    }
    let events = drain_events(&mut h);
    h.push_event(gst::event::Eos::new());
    let mut events = events;
    events.extend(drain_events(&mut h));
    assert!(
        events.len() >= 2 && events.len().is_multiple_of(2),
        "{events:?}"
    );
    for pair in events.chunks(2) {
        assert!(pair[0].start && !pair[1].start, "{events:?}");
        assert!(pair[0].pts < pair[1].pts);
        assert_eq!(pair[0].utterance, pair[1].utterance);
        assert_eq!(pair[0].running_time, pair[0].pts);
    }
    // JFK starts at about 0.33 s (padding 30 ms).
    let first = events[0].pts.mseconds();
    assert!((250..=400).contains(&first), "first start at {first} ms");
}

#[test]
fn element_messages_mirror_events() {
    let mut h = harness("");
    let bus = gst::Bus::new();
    h.element().unwrap().set_bus(Some(&bus));
    let events = push_all(&mut h, &fixture_samples("jfk.wav")[..16000 * 3]);
    assert!(!events.is_empty());
    let names: Vec<String> = bus
        .iter()
        .filter(|m| matches!(m.view(), gst::MessageView::Element(_)))
        .map(|m| m.structure().unwrap().to_owned())
        .map(|s| {
            if let Some(b) = SpeechBoundary::from_structure(&s) {
                // Each boundary message mirrors its event.
                assert!(events.contains(&b), "{b:?} not among {events:?}");
            }
            s.name().to_string()
        })
        .collect();
    // The onset comes first (before speech is confirmed), then the start it led to.
    assert_eq!(
        names[..2],
        ["vox-speech-onset", "vox-speech-start"],
        "{names:?}"
    );
}

#[test]
fn speculate_ms_marks_pauses_where_the_end_will_be() {
    let mut h = harness("speculate-ms=200");
    for (i, chunk) in fixture_samples("jfk.wav").chunks(320).enumerate() {
        h.push(f32_buffer(chunk, i * 320, 16000)).unwrap();
    }
    h.push_event(gst::event::Eos::new());
    let mut events = Vec::new();
    while let Some(ev) = h.try_pull_event() {
        if let Some(b) = SpeechBoundary::from_event(&ev) {
            events.push(format!(
                "{}{}",
                if b.start { "start" } else { "end" },
                b.pts
            ));
        } else if let Some(p) = SpeechPause::from_event(&ev) {
            events.push(format!(
                "{}{}",
                if p.resume { "resume" } else { "pause" },
                p.pts
            ));
        }
    }
    // Every end that silence (not the end of the stream) brought is preceded by a pause at the
    // same place; a pause is followed by its end or by a resume.
    let mut ends = 0;
    for (i, e) in events.iter().enumerate() {
        if let Some(at) = e.strip_prefix("pause") {
            let next = &events[i + 1];
            assert!(
                next == &format!("end{at}") || next.starts_with("resume"),
                "{events:?}"
            );
            ends += usize::from(next.starts_with("end"));
        }
    }
    assert!(ends >= 2, "{events:?}");
    assert!(events.iter().any(|e| e.starts_with("resume")), "{events:?}");
}

#[test]
fn eos_closes_open_speech() {
    let mut h = harness("");
    // Two seconds of JFK: speech is open when the stream ends.
    let events = push_all(&mut h, &fixture_samples("jfk.wav")[..32000]);
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(h.push_event(gst::event::Eos::new()));
    let mut end = None;
    while let Some(ev) = h.try_pull_event() {
        if let Some(b) = SpeechBoundary::from_event(&ev) {
            end = Some(b);
        } else if ev.type_() == gst::EventType::Eos {
            assert!(end.is_some(), "EOS before speech-end");
        }
    }
    let end = end.expect("speech-end at EOS");
    assert!(!end.start);
    assert!(end.pts <= gst::ClockTime::from_seconds(2));
}

#[test]
fn flush_resets_state() {
    let mut h = harness("");
    let events = push_all(&mut h, &fixture_samples("jfk.wav")[..32000]);
    assert_eq!(events.len(), 1);
    assert!(h.push_event(gst::event::FlushStart::new()));
    assert!(h.push_event(gst::event::FlushStop::new(true)));
    h.push_event(gst::event::Segment::new(&gst::FormattedSegment::<
        gst::ClockTime,
    >::new()));
    // Silence after the flush: the interrupted utterance does not produce a speech-end.
    let silence = vec![0.0f32; 16000 * 2];
    let events = push_all(&mut h, &silence);
    assert!(events.is_empty(), "{events:?}");
    // And new speech starts a new utterance from a clean state.
    let events = push_all(&mut h, &fixture_samples("jfk.wav")[..32000]);
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0].start);
}

#[test]
fn latency_query_reports_what_it_adds() {
    let mut h = harness("");
    h.set_upstream_latency(gst::ClockTime::from_mseconds(10));
    h.play();
    assert_eq!(
        min_latency(&h.element().unwrap()),
        gst::ClockTime::from_mseconds(10)
    );

    let mut h = harness("mode=drop-silence min-speech-ms=200 speech-pad-ms=30");
    h.set_upstream_latency(gst::ClockTime::from_mseconds(10));
    assert_eq!(
        min_latency(&h.element().unwrap()),
        gst::ClockTime::from_mseconds(10 + 200 + 30 + 32)
    );
}

#[test]
fn drop_silence_passes_only_speech() {
    let mut h = harness("mode=drop-silence");
    let silence = vec![0.0f32; 16000 * 2];
    for (i, chunk) in silence.chunks(320).enumerate() {
        h.push(f32_buffer(chunk, i * 320, 16000)).unwrap();
    }
    assert!(h.try_pull().is_none(), "silence must not pass");
    let mut gaps = 0;
    while let Some(ev) = h.try_pull_event() {
        if ev.type_() == gst::EventType::Gap {
            gaps += 1;
        }
    }
    assert!(gaps > 0, "dropped audio is announced with gap events");
    // Speech passes, starting no later than the speech start (look-back included).
    let speech = &fixture_samples("jfk.wav")[..16000 * 2];
    for (i, chunk) in speech.chunks(320).enumerate() {
        h.push(f32_buffer(chunk, 32000 + i * 320, 16000)).unwrap();
    }
    let first = h.pull().unwrap();
    assert!(first.flags().contains(gst::BufferFlags::DISCONT));
    let start = drain_events(&mut h);
    assert_eq!(start.len(), 1);
    assert!(
        first.pts().unwrap() <= start[0].pts,
        "{:?} > {:?}",
        first.pts(),
        start[0].pts
    );
}

#[test]
fn accepts_8khz() {
    let mut h = harness("");
    h.set_src_caps(audio_caps(8000));
    // Decimate JFK to 8 kHz (every other sample; fine for a detector).
    let audio: Vec<f32> = fixture_samples("jfk.wav")
        .iter()
        .step_by(2)
        .copied()
        .collect();
    for (i, chunk) in audio.chunks(160).enumerate() {
        h.push(f32_buffer(chunk, i * 160, 8000)).unwrap();
        h.pull().unwrap();
    }
    let events = drain_events(&mut h);
    assert!(!events.is_empty() && events[0].start);
    let first = events[0].pts.mseconds();
    assert!((250..=450).contains(&first), "{first}");
}

#[test]
fn missing_model_fails_at_start_naming_the_file() {
    init();
    let err = start_error("silerovad model=/nonexistent/silero_vad.onnx");
    assert!(err.contains("/nonexistent/silero_vad.onnx"), "{err}");
}
