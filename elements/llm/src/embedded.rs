//! llama.cpp in-process (llama-cpp-2, which bundles llama.cpp), no GStreamer types. A model is
//! loaded once per process and shared, with one key/value cache for all its conversations
//! (sessions, element instances): each conversation is a sequence in it, kept between turns so
//! that only what is new is evaluated, and sessions do not see each other's conversations. The
//! cache's memory is allocated once, so a session costs no more than its tokens: when the cache
//! is full, or more conversations are open than it has sequences, the least recently used idle
//! conversation gives up its place and is evaluated again at its next turn. Decoding is
//! serialised on the model (token by token, so concurrent replies interleave), which is also
//! what the CPU wants: two decodes at once on the same cores only slow each other down.

use crate::chat::{Message, Role, Usage};
use crate::openai::{LlmError, Params};
use llama_cpp_2::DecodeError;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};
use vox_common::text::SentenceSplitter;

/// The longest conversation: system prompt, kept history, the new message and the reply must
/// fit (the oldest exchanges are left out when they do not). Also the shared cache's size.
const CONTEXT: u32 = 4096;
/// Conversations the shared cache holds at once.
const SEQUENCES: usize = 16;
/// Tokens evaluated per decode call.
const BATCH: usize = 512;
/// About how long a token of an answer takes to say: after the answer's first piece, the
/// deadline of each next token moves on by this much, so another caller's turn goes before the
/// rest of a long answer.
const TOKEN_SPEECH: Duration = Duration::from_millis(200);
/// A system prompt evaluated ahead of the first turn is needed this soon.
const PREFILL_SLACK: Duration = Duration::from_secs(1);

/// llama.cpp's backend, initialised once per process (a second init is an error).
fn backend() -> Result<&'static LlamaBackend, LlmError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            let mut b = LlamaBackend::init().map_err(|e| e.to_string())?;
            // llama.cpp logs every load to stderr; our own messages say what matters.
            b.void_logs();
            Ok(b)
        })
        .as_ref()
        .map_err(|e| LlmError::Backend(format!("cannot start llama.cpp: {e}")))
}

pub struct Embedded {
    /// Loaded once and kept for the life of the process (the shared cache refers to it).
    model: &'static LlamaModel,
    template: LlamaChatTemplate,
    threads: i32,
    cache: Mutex<Cache>,
    next_id: AtomicU64,
}

/// The shared key/value cache and what each of its sequences holds.
struct Cache {
    ctx: Option<LlamaContext<'static>>,
    seqs: Vec<Seq>,
}

#[derive(Default)]
struct Seq {
    /// The session whose conversation this is (none: free).
    owner: Option<u64>,
    /// A reply is being generated: not to be given to another session.
    busy: bool,
    used: Option<Instant>,
    /// The tokens in the cache for this sequence, from position 0.
    tokens: Vec<LlamaToken>,
}

impl Embedded {
    /// The shared model at `path`, loaded on first use.
    pub fn shared(path: &Path, threads: u32) -> Result<Arc<Self>, LlmError> {
        static MODELS: Mutex<Vec<(PathBuf, u32, Arc<Embedded>)>> = Mutex::new(Vec::new());
        let mut models = MODELS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, _, m)) = models.iter().find(|(p, t, _)| p == path && *t == threads) {
            return Ok(m.clone());
        }
        let m = Arc::new(Self::load(path, threads)?);
        models.push((path.to_path_buf(), threads, m.clone()));
        Ok(m)
    }

    pub fn load(path: &Path, threads: u32) -> Result<Self, LlmError> {
        let fail = |why: String| {
            LlmError::Backend(format!(
                "cannot load language model {}: {why}",
                path.display()
            ))
        };
        let backend = backend()?;
        let model = LlamaModel::load_from_file(backend, path, &LlamaModelParams::default())
            .map_err(|e| fail(e.to_string()))?;
        let template = model
            .chat_template(None)
            .map_err(|e| fail(format!("no chat template ({e})")))?;
        Ok(Self {
            model: Box::leak(Box::new(model)),
            template,
            threads: threads.max(1) as i32,
            cache: Mutex::new(Cache {
                ctx: None,
                seqs: (0..SEQUENCES).map(|_| Seq::default()).collect(),
            }),
            next_id: AtomicU64::new(1),
        })
    }

    /// A conversation on this model, kept in the shared cache between turns.
    pub fn session(&self) -> Session<'_> {
        Session {
            model: self,
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            seq: None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The process's cores for one evaluation, needed by `deadline` (none to wait for when
    /// llama.cpp runs on the GPU), or `Cancelled` when `cancelled()` ends the wait. Taken before
    /// the cache, never the other way round: a session waiting for its turn does not hold the
    /// cache, which would keep another session's earlier deadline out of the line.
    fn cores(
        &self,
        deadline: Instant,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Option<vox_common::cpu::Turn<'static>>, LlmError> {
        if cfg!(feature = "cuda") {
            return Ok(None);
        }
        vox_common::cpu::Cores::global()
            .take_unless(self.threads as usize, deadline, cancelled)
            .map(Some)
            .ok_or(LlmError::Cancelled)
    }

    fn prompt(
        &self,
        messages: &[Message],
        add_assistant: bool,
    ) -> Result<Vec<LlamaToken>, LlmError> {
        let chat: Vec<LlamaChatMessage> = messages
            .iter()
            .map(|m| {
                let role = match m.role {
                    Role::System => "system",
                    Role::User => "user",
                    Role::Assistant => "assistant",
                };
                LlamaChatMessage::new(role.into(), m.content.replace('\0', " "))
            })
            .collect::<Result<_, _>>()
            .map_err(|e| backend_error(&e))?;
        let prompt = self
            .model
            .apply_chat_template(&self.template, &chat, add_assistant)
            .map_err(|e| backend_error(&e))?;
        Ok(self.model.vocab().tokenize(prompt.as_bytes(), false, true))
    }
}

fn backend_error(e: &dyn std::fmt::Display) -> LlmError {
    LlmError::Backend(format!("llama.cpp: {e}"))
}

impl Cache {
    /// The shared context, made on first use.
    fn context(&mut self, model: &Embedded) -> Result<&mut LlamaContext<'static>, LlmError> {
        if self.ctx.is_none() {
            let params = LlamaContextParams::default()
                .with_n_ctx(NonZeroU32::new(CONTEXT))
                .with_n_batch(BATCH as u32)
                .with_n_seq_max(SEQUENCES as u32)
                .with_kv_unified(true)
                .with_n_threads(model.threads)
                .with_n_threads_batch(model.threads);
            let ctx = model
                .model
                .new_context(backend()?, params)
                .map_err(|e| backend_error(&e))?;
            self.ctx = Some(ctx);
        }
        Ok(self.ctx.as_mut().expect("context made above"))
    }

    /// Empties sequence `seq` (its cells and its tokens).
    fn clear(&mut self, seq: usize) {
        if let Some(ctx) = self.ctx.as_mut() {
            let _ = ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
        }
        self.seqs[seq].tokens.clear();
    }

    /// The least recently used idle conversation other than `keep` (holding cells, when
    /// `cells`).
    fn victim(&self, keep: Option<usize>, cells: bool) -> Option<usize> {
        self.seqs
            .iter()
            .enumerate()
            .filter(|(i, s)| Some(*i) != keep && !s.busy && (!cells || !s.tokens.is_empty()))
            .min_by_key(|(_, s)| s.used)
            .map(|(i, _)| i)
    }

    /// Session `id`'s sequence: the one it had if it still has it, else a free one, else the
    /// least recently used idle conversation's.
    fn claim(&mut self, id: u64, had: Option<usize>) -> Result<usize, LlmError> {
        if let Some(seq) = had.filter(|&s| self.seqs[s].owner == Some(id)) {
            return Ok(seq);
        }
        let seq = match self.seqs.iter().position(|s| s.owner.is_none()) {
            Some(free) => free,
            None => self.victim(None, false).ok_or_else(|| {
                LlmError::Backend(format!("all {SEQUENCES} conversations are being answered"))
            })?,
        };
        self.clear(seq);
        self.seqs[seq].owner = Some(id);
        Ok(seq)
    }

    /// Decodes `batch` (holding `tokens` for `seq`) and records them as cached. When the cache
    /// is full, idle conversations give up their places; on failure `seq` is emptied, so that
    /// its next turn starts clean.
    fn decode(
        &mut self,
        model: &Embedded,
        seq: usize,
        batch: &mut LlamaBatch,
        tokens: &[LlamaToken],
    ) -> Result<(), LlmError> {
        loop {
            match self.context(model)?.decode(batch) {
                Ok(()) => {
                    self.seqs[seq].tokens.extend_from_slice(tokens);
                    self.seqs[seq].used = Some(Instant::now());
                    return Ok(());
                }
                // The victim's session finds its place gone and starts afresh next turn.
                Err(DecodeError::NoKvCacheSlot) => match self.victim(Some(seq), true) {
                    Some(v) => {
                        self.clear(v);
                        self.seqs[v].owner = None;
                    }
                    None => {
                        self.clear(seq);
                        return Err(LlmError::Backend(
                            "llama.cpp: the conversation cache is full".into(),
                        ));
                    }
                },
                Err(e) => {
                    self.clear(seq);
                    return Err(backend_error(&e));
                }
            }
        }
    }

    /// Brings `seq` to `tokens`: keeps the longest prefix already there, evaluates the rest (at
    /// least the last token, whose logits the next sample needs). Returns the index of the last
    /// token in the last batch, where its logits are, and how many tokens were already cached.
    fn evaluate(
        &mut self,
        model: &Embedded,
        seq: usize,
        tokens: &[LlamaToken],
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(i32, usize), LlmError> {
        let keep = self.seqs[seq]
            .tokens
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count()
            .min(tokens.len().saturating_sub(1));
        let kept = self
            .context(model)?
            .clear_kv_cache_seq(Some(seq as u32), Some(keep as u32), None)
            .unwrap_or(false);
        if kept {
            self.seqs[seq].tokens.truncate(keep);
        } else {
            self.clear(seq);
        }
        let mut batch = LlamaBatch::new(BATCH, 1);
        let start = self.seqs[seq].tokens.len();
        for chunk in tokens[start..].chunks(BATCH) {
            if cancelled() {
                return Err(LlmError::Cancelled);
            }
            batch.clear();
            let pos = self.seqs[seq].tokens.len();
            for (i, t) in chunk.iter().enumerate() {
                let last = pos + i + 1 == tokens.len();
                batch
                    .add(*t, (pos + i) as i32, &[seq as i32], last)
                    .map_err(|e| backend_error(&e))?;
            }
            self.decode(model, seq, &mut batch, chunk)?;
        }
        Ok((((tokens.len() - 1 - start) % BATCH) as i32, start))
    }
}

/// One conversation (one element instance): a sequence in the model's shared cache, kept
/// between turns together with the tokens it holds, so a turn evaluates only what is new since
/// the last one — the system prompt and the history are not evaluated again.
pub struct Session<'m> {
    model: &'m Embedded,
    id: u64,
    /// The sequence it had last (another session may have taken it since).
    seq: Option<usize>,
}

impl Session<'_> {
    /// Evaluates `messages` (the system prompt) ahead of the first turn.
    pub fn prefill(&mut self, messages: &[Message]) -> Result<(), LlmError> {
        let tokens = self.model.prompt(messages, false)?;
        // Ahead of the first turn: wanted soon, not before anyone's reply.
        let _cores = self
            .model
            .cores(Instant::now() + PREFILL_SLACK, &|| false)?;
        let mut cache = self.model.lock();
        let seq = cache.claim(self.id, self.seq)?;
        self.seq = Some(seq);
        cache.evaluate(self.model, seq, &tokens, &|| false)?;
        Ok(())
    }

    /// Generates a reply to `messages`, calling `on_delta` with each piece of text. Stops at
    /// the end of the reply, at `max_tokens`, after `timeout`, or soon after `cancelled()`.
    /// The oldest exchanges are left out when the conversation would not fit the context.
    pub fn generate(
        &mut self,
        messages: &[Message],
        params: &Params,
        cancelled: &dyn Fn() -> bool,
        on_delta: &mut dyn FnMut(&str),
    ) -> Result<Usage, LlmError> {
        let started = Instant::now();
        let budget = params.max_tokens as usize;
        let mut messages = messages.to_vec();
        let tokens = loop {
            let tokens = self.model.prompt(&messages, true)?;
            if tokens.len() + budget < CONTEXT as usize {
                break tokens;
            }
            // The oldest user message and the reply to it, if there is more than the new turn.
            let first = messages.iter().position(|m| m.role != Role::System);
            match first {
                Some(i) if i + 2 < messages.len() => {
                    messages.drain(i..i + 2);
                }
                _ => {
                    return Err(LlmError::Backend(format!(
                        "the message ({} tokens) and the reply ({budget}) do not fit the context of {CONTEXT}",
                        tokens.len()
                    )));
                }
            }
        };
        let seq = {
            let mut cache = self.model.lock();
            let seq = cache.claim(self.id, self.seq)?;
            cache.seqs[seq].busy = true;
            seq
        };
        self.seq = Some(seq);
        let result = self.reply(seq, &tokens, params, started, cancelled, on_delta);
        self.model.lock().seqs[seq].busy = false;
        result
    }

    fn reply(
        &mut self,
        seq: usize,
        tokens: &[LlamaToken],
        params: &Params,
        started: Instant,
        cancelled: &dyn Fn() -> bool,
        on_delta: &mut dyn FnMut(&str),
    ) -> Result<Usage, LlmError> {
        let model = self.model;
        let mut sampler = if params.temperature <= 0.0 {
            LlamaSampler::greedy()
        } else {
            LlamaSampler::chain_simple([
                LlamaSampler::top_k(40),
                LlamaSampler::top_p(0.95, 1),
                LlamaSampler::temp(params.temperature),
                LlamaSampler::dist(0x5eed),
            ])
        };
        // The cores are kept from token to token while no one waiting is due sooner.
        let mut cores = model.cores(started, cancelled)?;
        // The prompt, and the first token sampled from its logits, under one hold of the cache
        // (another session's decode would replace the logits).
        let (mut token, cached) = {
            let mut cache = model.lock();
            let (logits_at, cached) = cache.evaluate(model, seq, tokens, cancelled)?;
            let token = sampler.sample(cache.context(model)?, logits_at);
            (token, cached)
        };
        let mut usage = Usage {
            tokens_in: tokens.len() as u64,
            tokens_cached: cached as u64,
            ..Usage::default()
        };
        let vocab = model.model.vocab();
        let mut batch = LlamaBatch::new(1, 1);
        // Pieces can split a UTF-8 character: keep the bytes until they decode.
        let mut pending: Vec<u8> = Vec::new();
        let mut due = TokenDeadlines::new(started);
        for _ in 0..params.max_tokens {
            if cancelled() {
                return Err(LlmError::Cancelled);
            }
            if started.elapsed() > params.timeout {
                return Err(LlmError::Timeout(params.timeout));
            }
            sampler.accept(token);
            if vocab.is_eog(token) {
                break;
            }
            usage.tokens_out += 1;
            usage.first_token.get_or_insert_with(|| started.elapsed());
            pending.extend(vocab.token_to_piece(token, false, None));
            let text = match std::str::from_utf8(&pending) {
                Ok(text) => Some(text.to_string()),
                Err(e) if e.error_len().is_some() => {
                    Some(String::from_utf8_lossy(&pending).into_owned())
                }
                Err(_) => None, // an incomplete character: wait for the next piece
            };
            if let Some(text) = text {
                pending.clear();
                if !text.is_empty() {
                    on_delta(&text);
                    due.written(&text, Instant::now());
                }
            }
            cores = match cores {
                Some(turn) => Some(
                    turn.renew(due.next(), cancelled)
                        .ok_or(LlmError::Cancelled)?,
                ),
                None => model.cores(due.next(), cancelled)?,
            };
            let mut cache = model.lock();
            batch.clear();
            batch
                .add(
                    token,
                    cache.seqs[seq].tokens.len() as i32,
                    &[seq as i32],
                    true,
                )
                .map_err(|e| backend_error(&e))?;
            cache.decode(model, seq, &mut batch, &[token])?;
            token = sampler.sample(cache.context(model)?, 0);
        }
        if usage.first_token.is_none() {
            return Err(LlmError::Empty);
        }
        usage.total = started.elapsed();
        Ok(usage)
    }
}

/// When each next token of a reply is needed. Until the reply's first piece (to a clause mark
/// or a sentence end, as llmchat speaks it by default) is written, the caller hears nothing and waits on
/// every token: each is needed as soon as the reply started. From then on the text runs ahead of
/// its speech, and each next token is needed [`TOKEN_SPEECH`] later than the one before.
struct TokenDeadlines {
    started: Instant,
    first_piece: SentenceSplitter,
    /// When the first piece was complete, and the tokens written since.
    piece_written: Option<(Instant, u32)>,
}

impl TokenDeadlines {
    fn new(started: Instant) -> Self {
        Self {
            started,
            first_piece: SentenceSplitter::first_clause(),
            piece_written: None,
        }
    }

    /// A token's `text` was written `at`.
    fn written(&mut self, text: &str, at: Instant) {
        match &mut self.piece_written {
            Some((_, since)) => *since += 1,
            None if !self.first_piece.push(text).is_empty() => self.piece_written = Some((at, 0)),
            None => {}
        }
    }

    /// The deadline of the next token.
    fn next(&self) -> Instant {
        self.piece_written
            .map_or(self.started, |(at, since)| at + TOKEN_SPEECH * (since + 1))
    }
}

impl Drop for Session<'_> {
    /// The conversation is over: its place in the cache is free.
    fn drop(&mut self) {
        let Some(seq) = self.seq else { return };
        let mut cache = self.model.lock();
        if cache.seqs[seq].owner == Some(self.id) {
            cache.clear(seq);
            cache.seqs[seq].owner = None;
            cache.seqs[seq].used = None;
        }
        // No conversation left: empty the cache whole, which also sends llama.cpp's next
        // allocations back to its first cells; otherwise they would walk through all of them,
        // touching page after page of the cache (the process growing to its full size).
        if cache.seqs.iter().all(|s| s.owner.is_none())
            && let Some(ctx) = cache.ctx.as_mut()
        {
            ctx.clear_kv_cache();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_due_at_once_until_the_first_piece_is_written() {
        let ms = Duration::from_millis;
        let started = Instant::now();
        let mut due = TokenDeadlines::new(started);
        assert_eq!(due.next(), started);
        due.written("Sure", started + ms(10));
        assert_eq!(due.next(), started);
        // "Sure," ends the first piece once white space follows the mark.
        due.written(",", started + ms(20));
        assert_eq!(due.next(), started);
        due.written(" the", started + ms(30));
        assert_eq!(due.next(), started + ms(30) + TOKEN_SPEECH);
        due.written(" capital", started + ms(40));
        assert_eq!(due.next(), started + ms(30) + TOKEN_SPEECH * 2);
    }
}
