#![allow(dead_code)] // each test file uses its own part of these helpers
//! `llmchat` in a gst_check harness, shared by the test files: push a user turn, wait for the
//! turn's message (and the warnings before it), pull the sentences.

use gst::prelude::*;
use gst_check::Harness;

pub fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        gst::init().unwrap();
        gstvoxllm::plugin_register_static().expect("register plugin");
    });
}

pub struct Chat {
    pub h: Harness,
    bus: gst::Bus,
}

/// One finished turn: its `vox-llm-turn` message, the warnings posted before it, the sentences.
pub struct Turn {
    pub message: gst::Structure,
    pub warnings: Vec<String>,
    pub sentences: Vec<String>,
}

impl Turn {
    pub fn outcome(&self) -> &str {
        self.message.get::<&str>("outcome").unwrap()
    }
}

impl Chat {
    /// `llmchat PROPS` with a bus for its messages.
    pub fn new(props: &str) -> Self {
        init();
        let mut h = Harness::new_parse(&format!("llmchat {props}"));
        let bus = gst::Bus::new();
        h.element().unwrap().set_bus(Some(&bus));
        h.set_src_caps_str(vox_common::TEXT_CAPS);
        Self { h, bus }
    }

    pub fn say(&mut self, text: &str) {
        self.h
            .push(gst::Buffer::from_slice(text.as_bytes().to_vec()))
            .unwrap();
    }

    /// Waits (up to 60 s) for the next turn to finish.
    pub fn turn(&mut self) -> Turn {
        let mut warnings = Vec::new();
        let message = loop {
            let msg = self
                .bus
                .timed_pop(gst::ClockTime::from_seconds(60))
                .expect("a vox-llm-turn message within 60 s");
            match msg.view() {
                gst::MessageView::Warning(w) => warnings.push(w.error().to_string()),
                gst::MessageView::Element(_) => {
                    let s = msg.structure().unwrap();
                    if s.name() == "vox-llm-turn" {
                        break s.to_owned();
                    }
                }
                _ => {}
            }
        };
        let mut sentences = Vec::new();
        while let Some(b) = self.h.try_pull() {
            sentences.push(String::from_utf8(b.map_readable().unwrap().to_vec()).unwrap());
        }
        Turn {
            message,
            warnings,
            sentences,
        }
    }

    /// Flushes (barge-in) and starts a new segment.
    pub fn flush(&mut self) {
        self.h.push_event(gst::event::FlushStart::new());
        self.h.push_event(gst::event::FlushStop::new(true));
        self.h
            .push_event(gst::event::Segment::new(&gst::FormattedSegment::<
                gst::ClockTime,
            >::new()));
    }
}

/// `llmchat` refuses to start with `props`; returns its error message.
pub fn start_error(props: &str) -> String {
    init();
    vox_common::testing::start_error(&format!("llmchat {props}"))
}
