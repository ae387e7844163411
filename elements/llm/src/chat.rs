//! Conversation memory and the outcome of a turn (no GStreamer types).

pub use vox_common::breaker::Breaker;

use std::collections::VecDeque;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// What was said in one exchange.
#[derive(Debug, Clone)]
struct Turn {
    user: String,
    assistant: String,
}

/// The conversation of one element instance (one session): the last `max_turns` exchanges.
#[derive(Debug, Clone)]
pub struct History {
    turns: VecDeque<Turn>,
    max_turns: usize,
    /// The last reply was recorded whole (its text was all out) and no turn has begun since:
    /// downstream may still be speaking it.
    last_may_play: bool,
}

/// Appended to a reply that was cut off (barge-in, flush), so the model knows it was not heard
/// in full.
pub const CUT_OFF_MARK: &str = " [interrupted]";

impl History {
    pub fn new(max_turns: usize) -> Self {
        Self {
            turns: VecDeque::new(),
            max_turns,
            last_may_play: false,
        }
    }

    /// A new turn begins: the reply before it is no longer the one being spoken.
    pub fn begin_turn(&mut self) {
        self.last_may_play = false;
    }

    /// Downstream dropped what it had not spoken yet (a flush: the user barged in). A reply
    /// recorded whole because its text was all out, with no turn since, was cut off in its
    /// speech: it is marked as such (once). A reply still being generated is recorded cut off by
    /// its own turn.
    pub fn interrupted(&mut self) {
        if std::mem::take(&mut self.last_may_play)
            && let Some(last) = self.turns.back_mut()
        {
            last.assistant.push_str(CUT_OFF_MARK);
        }
    }

    pub fn set_max_turns(&mut self, max_turns: usize) {
        self.max_turns = max_turns;
        self.trim();
    }

    /// The messages for a new user turn: system prompt, kept history, the new text.
    pub fn messages(&self, system: &str, user: &str) -> Vec<Message> {
        let mut out = Vec::with_capacity(2 * self.turns.len() + 2);
        if !system.trim().is_empty() {
            out.push(Message::new(Role::System, system));
        }
        for t in &self.turns {
            out.push(Message::new(Role::User, t.user.clone()));
            out.push(Message::new(Role::Assistant, t.assistant.clone()));
        }
        out.push(Message::new(Role::User, user));
        out
    }

    /// Records an exchange. A reply that was cut off is kept with [`CUT_OFF_MARK`]; a turn that
    /// produced nothing (a failed backend) is not kept, so the next turn retries cleanly.
    pub fn record(&mut self, user: &str, reply: &str, cut_off: bool) {
        let reply = reply.trim();
        if reply.is_empty() && !cut_off {
            return;
        }
        let assistant = if cut_off {
            format!("{reply}{CUT_OFF_MARK}")
        } else {
            reply.to_string()
        };
        self.turns.push_back(Turn {
            user: user.to_string(),
            assistant,
        });
        self.last_may_play = !cut_off;
        self.trim();
    }

    fn trim(&mut self) {
        while self.turns.len() > self.max_turns {
            self.turns.pop_front();
        }
    }
}

/// Numbers of one generation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    pub tokens_in: u64,
    /// Of `tokens_in`, those whose evaluation was kept from an earlier turn (prompt cache).
    pub tokens_cached: u64,
    pub tokens_out: u64,
    pub first_token: Option<Duration>,
    pub total: Duration,
}

impl Usage {
    /// Generation speed after the first token.
    pub fn tokens_per_second(&self) -> f64 {
        let generating = self
            .total
            .saturating_sub(self.first_token.unwrap_or_default())
            .as_secs_f64();
        if self.tokens_out > 1 && generating > 0.0 {
            (self.tokens_out - 1) as f64 / generating
        } else {
            0.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keeps_the_last_turns_and_marks_cut_offs() {
        let mut h = History::new(2);
        h.record("one", "1", false);
        h.record("two", "2", false);
        h.record("three", "thr", true);
        h.record("four", "", false); // a failed turn is not kept
        let m = h.messages("Be brief.", "five");
        let text: Vec<(Role, &str)> = m.iter().map(|m| (m.role, m.content.as_str())).collect();
        assert_eq!(
            text,
            [
                (Role::System, "Be brief."),
                (Role::User, "two"),
                (Role::Assistant, "2"),
                (Role::User, "three"),
                (Role::Assistant, "thr [interrupted]"),
                (Role::User, "five"),
            ]
        );
        h.set_max_turns(0);
        assert_eq!(h.messages("", "x").len(), 1);
    }

    fn last_reply(h: &History) -> String {
        h.messages("", "next")
            .iter()
            .rev()
            .find(|m| m.role == Role::Assistant)
            .map(|m| m.content.clone())
            .unwrap_or_default()
    }

    #[test]
    fn a_whole_reply_interrupted_while_spoken_is_marked_cut_off_once() {
        let mut h = History::new(4);
        h.begin_turn();
        h.record("one", "The first reply.", false);
        h.interrupted();
        h.interrupted();
        assert_eq!(last_reply(&h), "The first reply. [interrupted]");
        // A reply cut off in its generation is marked by its turn, not again.
        h.begin_turn();
        h.record("two", "The sec", true);
        h.interrupted();
        assert_eq!(last_reply(&h), "The sec [interrupted]");
        // Once the next turn has begun, the reply before it was heard: a flush then is the
        // new turn's (nothing recorded yet), and leaves the earlier one as it is.
        h.record("three", "The third reply.", false);
        h.begin_turn();
        h.interrupted();
        assert_eq!(last_reply(&h), "The third reply.");
    }
}
