//! `kokorotts` in a gst_check harness, on the real model and voices: caps, sentence-by-sentence
//! audio with contiguous PTS, messages, text with nothing to say, long text, flush, and start-up
//! errors.

use gst::prelude::*;
use gst_check::Harness;

fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        gst::init().unwrap();
        gstvoxkokoro::plugin_register_static().expect("register plugin");
    });
}

/// The harness and a bus on the element, for its messages.
fn harness(props: &str) -> (Harness, gst::Bus) {
    init();
    let mut h = Harness::new_parse(&format!("kokorotts {props}"));
    let bus = gst::Bus::new();
    h.element().unwrap().set_bus(Some(&bus));
    h.set_src_caps_str(vox_common::TEXT_CAPS);
    (h, bus)
}

fn text(s: &str, pts_ms: u64) -> gst::Buffer {
    let mut b = gst::Buffer::from_slice(s.as_bytes().to_vec());
    b.get_mut()
        .unwrap()
        .set_pts(gst::ClockTime::from_mseconds(pts_ms));
    b
}

/// Pulls buffers until EOS; returns them.
fn drain(h: &mut Harness) -> Vec<gst::Buffer> {
    h.push_event(gst::event::Eos::new());
    let mut out = Vec::new();
    while let Ok(b) = h.pull_until_eos() {
        match b {
            Some(b) => out.push(b),
            None => break,
        }
    }
    out
}

fn messages(bus: &gst::Bus, name: &str) -> Vec<gst::Structure> {
    let mut out = Vec::new();
    while let Some(m) = bus.pop() {
        if let Some(s) = m.structure()
            && s.name() == name
        {
            out.push(s.to_owned());
        }
    }
    out
}

#[test]
fn speaks_sentence_by_sentence_with_contiguous_timestamps() {
    let (mut h, bus) = harness("");
    h.push(text("Hello there. How are you today? I am fine.", 2000))
        .unwrap();
    let buffers = drain(&mut h);
    // One buffer per sentence, each pushed as soon as it was synthesised.
    assert_eq!(buffers.len(), 3, "{buffers:?}");
    let caps = h.sinkpad().unwrap().current_caps().unwrap();
    let info = gst_audio::AudioInfo::from_caps(&caps).unwrap();
    assert_eq!(
        (info.rate(), info.channels(), info.format()),
        (24000, 1, gst_audio::AudioFormat::F32le)
    );
    let mut expected = gst::ClockTime::from_mseconds(2000);
    for b in &buffers {
        assert_eq!(b.pts(), Some(expected));
        let samples = b.size() / 4;
        assert!(samples > 24000 / 4, "a sentence of {samples} samples");
        expected += b.duration().unwrap();
    }
    let first = messages(&bus, "vox-tts-first-audio");
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].get::<u64>("pts").unwrap(), 2_000_000_000);
    assert!(first[0].get::<u64>("time-to-first-audio").unwrap() > 0);
}

/// `first-words`: with nothing playing, a sentence's opening is spoken on its own, with a short
/// tail; the sentences after it, while it plays, are whole.
#[test]
fn first_words_speak_the_opening_on_its_own() {
    let say = "The capital of France is Paris. It is on the Seine.";
    let (mut h, _bus) = harness("");
    h.push(text(say, 0)).unwrap();
    let whole = drain(&mut h);
    assert_eq!(whole.len(), 2, "whole sentences: {whole:?}");
    let (mut h, _bus) = harness("first-words=2");
    h.push(text(say, 0)).unwrap();
    let split = drain(&mut h);
    // "The capital", "of France is Paris." (split again only on a very slow machine), and "It
    // is on the Seine." whole, as it comes while the first sentence plays.
    assert!(split.len() >= 3, "opening, rest, next sentence: {split:?}");
    assert_eq!(split.last().unwrap().size(), whole[1].size());
    let samples = |b: &gst::Buffer| -> Vec<f32> {
        let map = b.map_readable().unwrap();
        map.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let opening = samples(&split[0]);
    let sentence = samples(&whole[0]);
    assert!(
        opening.len() * 2 < sentence.len(),
        "the opening ({} samples) is well under the whole sentence ({})",
        opening.len(),
        sentence.len()
    );
    // Its trailing silence is a breath (100 ms), not a sentence's pause (Kokoro's ~400 ms, kept
    // after the whole sentence).
    let tail = |a: &[f32]| a.iter().rev().take_while(|x| x.abs() <= 1e-3).count();
    assert!(
        tail(&opening) <= 2400,
        "{} samples of silence after the opening",
        tail(&opening)
    );
    assert!(
        tail(&sentence) > 4800,
        "{} samples after the sentence",
        tail(&sentence)
    );
    let pts: Vec<_> = split.iter().map(|b| b.pts().unwrap()).collect();
    assert_eq!(pts[1], pts[0] + split[0].duration().unwrap());
}

#[test]
fn later_text_never_overlaps_earlier_audio() {
    let (mut h, _bus) = harness("");
    h.push(text("This first sentence takes a while to say.", 0))
        .unwrap();
    // Arrives "at" 100 ms, while the first is still playing: it follows it.
    h.push(text("Second.", 100)).unwrap();
    let buffers = drain(&mut h);
    assert_eq!(buffers.len(), 2);
    assert_eq!(
        buffers[1].pts(),
        Some(buffers[0].pts().unwrap() + buffers[0].duration().unwrap())
    );
}

#[test]
fn text_with_nothing_to_say_gives_no_audio_and_no_error() {
    let (mut h, bus) = harness("");
    for t in ["", "   ", "?!...", "😀🎉", "\u{FFFD}"] {
        h.push(text(t, 0)).unwrap();
    }
    h.push(gst::Buffer::from_slice(vec![0xff, 0xfe, 0x80]))
        .unwrap();
    assert!(drain(&mut h).is_empty());
    assert!(
        messages(&bus, "vox-tts-first-audio").is_empty(),
        "no first-audio message without audio"
    );
}

/// 5,000 characters in one buffer: spoken in pieces under the token limit, and a flush stops it
/// (the rest of the text is dropped, no audio from it follows the flush).
#[test]
fn long_text_streams_and_flush_stops_it() {
    let (mut h, _bus) = harness("");
    let long = "This sentence is one of many in a very long text, and it goes on. ".repeat(80);
    assert!(long.len() >= 5000);
    h.push(text(&long, 0)).unwrap();
    let first = h.pull().unwrap();
    assert!(first.size() > 0);
    h.push_event(gst::event::FlushStart::new());
    h.push_event(gst::event::FlushStop::new(true));
    // Drain what was already in flight; then a new text is spoken from a clean state.
    while h.try_pull().is_some() {}
    h.push_event(gst::event::Segment::new(&gst::FormattedSegment::<
        gst::ClockTime,
    >::new()));
    h.push(text("After the flush.", 0)).unwrap();
    let after = drain(&mut h);
    let total: usize = after.iter().map(|b| b.size() / 4).sum();
    // Only the short sentence (about a second), not minutes of the old text.
    assert!(total < 24000 * 4, "{total} samples after the flush");
    assert!(!after.is_empty());
}

fn start_error(props: &str) -> String {
    init();
    vox_common::testing::start_error(&format!("kokorotts {props}"))
}

#[test]
fn unknown_voice_fails_at_start_listing_the_voices() {
    let err = start_error("voice=af_nobody");
    assert!(
        err.contains("af_nobody") && err.contains("jf_alpha"),
        "{err}"
    );
}

#[test]
fn corrupt_voices_file_fails_at_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.npz");
    std::fs::write(&path, b"not a zip").unwrap();
    let err = start_error(&format!("voices={}", path.display()));
    assert!(err.contains("broken.npz"), "{err}");
}

#[test]
fn unknown_language_fails_at_start() {
    let err = start_error("language=xx-nowhere");
    assert!(err.contains("xx-nowhere"), "{err}");
}

fn mark(state: vox_common::events::TurnState, id: u64) -> gst::Event {
    vox_common::events::TurnMark { state, id }.to_event()
}

#[test]
fn a_reply_ahead_is_held_until_confirmed_and_dropped_when_withdrawn() {
    use vox_common::events::TurnState;
    let (mut h, bus) = harness("");
    // Made ahead and held: no audio while the turn is open, however long it takes.
    h.push_event(mark(TurnState::Tentative, 1));
    h.push(text("The capital of France is Paris.", 1000))
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert!(
        h.try_pull().is_none(),
        "audio before the turn was confirmed"
    );
    // Confirmed: the audio made ahead goes out at once; its time to first audio counts from
    // the confirmation, and is shorter than the synthesis it did not wait for.
    h.push_event(mark(TurnState::Confirmed, 1));
    let first = h.pull().expect("audio once confirmed");
    assert_eq!(first.pts(), Some(gst::ClockTime::from_mseconds(1000)));
    // (Posted just after the push.)
    let message = loop {
        let m = bus
            .timed_pop_filtered(
                gst::ClockTime::from_seconds(10),
                &[gst::MessageType::Element],
            )
            .expect("vox-tts-first-audio");
        if let Some(s) = m.structure().filter(|s| s.name() == "vox-tts-first-audio") {
            break s.to_owned();
        }
    };
    let took = message.get::<u64>("time-to-first-audio").unwrap();
    let synthesis = message.get::<u64>("synthesis-time").unwrap();
    assert!(took < synthesis, "{message}");
    // Withdrawn: nothing of it is heard, and the next turn's text is spoken as usual.
    h.push_event(mark(TurnState::Tentative, 2));
    h.push(text("The capital of Japan is Tokyo.", 5000))
        .unwrap();
    h.push_event(mark(TurnState::Withdrawn, 2));
    h.push_event(mark(TurnState::Final, 0));
    h.push(text("Hello there.", 9000)).unwrap();
    let rest = drain(&mut h);
    // The withdrawn reply would start at 5 s (after Paris), the next turn's text at 9 s.
    let at = |b: &gst::Buffer| b.pts().unwrap();
    assert!(
        !rest
            .iter()
            .any(|b| at(b) >= gst::ClockTime::from_mseconds(5000)
                && at(b) < gst::ClockTime::from_mseconds(9000)),
        "audio of the withdrawn reply: {rest:?}"
    );
    assert!(
        rest.iter()
            .any(|b| at(b) >= gst::ClockTime::from_mseconds(9000)),
        "the next turn was not spoken: {rest:?}"
    );
}

#[test]
fn backend_remote_needs_a_url_and_backend_local_keeps_the_model_in_process() {
    let err = start_error("backend=remote");
    assert!(err.contains("url="), "{err}");

    // With backend=local, a url (of nothing) is not used: the audio comes from the model.
    let (mut h, _bus) = harness("backend=local url=http://127.0.0.1:1 retries=0");
    h.push(text("Hello there.", 0)).unwrap();
    let audio: usize = drain(&mut h).iter().map(|b| b.size()).sum();
    assert!(audio > 24_000, "{audio} bytes of audio");
}

/// The first audio of each reply (text after a `vox-turn` event) is flagged MARKER, and no
/// other: the agent tells a reply's start from a gap inside one by it.
#[test]
fn the_first_audio_of_each_reply_is_flagged() {
    use vox_common::events::{TurnMark, TurnState};
    let (mut h, _bus) = harness("first-words=0");
    let flagged = |buffers: &[gst::Buffer]| -> Vec<bool> {
        buffers
            .iter()
            .map(|b| b.flags().contains(gst::BufferFlags::MARKER))
            .collect()
    };
    let mark = || {
        TurnMark {
            state: TurnState::Final,
            id: 0,
        }
        .to_event()
    };
    h.push(text("No mark before this.", 0)).unwrap();
    h.push_event(mark());
    h.push(text("The first reply.", 1000)).unwrap();
    h.push(text("Its second sentence.", 2000)).unwrap();
    h.push_event(mark());
    h.push(text("The next reply.", 9000)).unwrap();
    let out = drain(&mut h);
    let flags = flagged(&out);
    assert_eq!(flags.iter().filter(|f| **f).count(), 2, "{flags:?}");
    assert!(!flags[0], "{flags:?}");
    // The second flagged buffer is the last text's first: what follows it is unflagged.
    let second = flags.iter().rposition(|f| *f).unwrap();
    assert!(second > flags.iter().position(|f| *f).unwrap());
}
