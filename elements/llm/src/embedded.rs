//! llama.cpp in-process (llama-cpp-2, which bundles llama.cpp), no GStreamer types. A model is
//! loaded once per process and shared; each session (element instance) has a context of its own,
//! kept between turns so that only what is new in the conversation is evaluated, and sessions do
//! not see each other's conversations.

use crate::chat::{Message, Role, Usage};
use crate::openai::{LlmError, Params};
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
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

/// Context length of a session: system prompt, kept history, the new message and the reply must
/// fit (the oldest exchanges are left out when they do not).
const CONTEXT: u32 = 4096;
/// Tokens evaluated per decode call.
const BATCH: usize = 512;

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
    model: LlamaModel,
    template: LlamaChatTemplate,
    threads: i32,
    /// Creating contexts from one model concurrently is unsound in llama.cpp (it writes to the
    /// model); this serialises that step only.
    new_context: Mutex<()>,
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
            model,
            template,
            threads: threads.max(1) as i32,
            new_context: Mutex::new(()),
        })
    }

    /// A conversation on this model: a context of its own that keeps what it has evaluated.
    pub fn session(&self) -> Session<'_> {
        Session {
            model: self,
            ctx: None,
            cached: Vec::new(),
        }
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

/// One conversation (one element instance): a context that is kept between turns together with
/// the tokens whose keys and values it holds, so a turn evaluates only what is new since the
/// last one — the system prompt and the history are not evaluated again.
pub struct Session<'m> {
    model: &'m Embedded,
    ctx: Option<LlamaContext<'m>>,
    /// The tokens in the context's cache, in order from position 0.
    cached: Vec<LlamaToken>,
}

impl<'m> Session<'m> {
    /// Evaluates `messages` (the system prompt) ahead of the first turn.
    pub fn prefill(&mut self, messages: &[Message]) -> Result<(), LlmError> {
        let tokens = self.model.prompt(messages, false)?;
        self.evaluate(&tokens, &|| false)?;
        Ok(())
    }

    /// The context, made on first use.
    fn context(&mut self) -> Result<&mut LlamaContext<'m>, LlmError> {
        if self.ctx.is_none() {
            let m = self.model;
            let params = LlamaContextParams::default()
                .with_n_ctx(NonZeroU32::new(CONTEXT))
                .with_n_batch(BATCH as u32)
                .with_n_threads(m.threads)
                .with_n_threads_batch(m.threads);
            let _guard = m.new_context.lock().unwrap_or_else(|p| p.into_inner());
            let ctx = m
                .model
                .new_context(backend()?, params)
                .map_err(|e| backend_error(&e))?;
            self.ctx = Some(ctx);
        }
        Ok(self.ctx.as_mut().expect("context made above"))
    }

    /// Brings the cache to `tokens`: keeps the longest prefix already there, evaluates the rest
    /// (at least the last token, whose logits the next sample needs). Returns the index of the
    /// last token in the last batch, where its logits are.
    fn evaluate(
        &mut self,
        tokens: &[LlamaToken],
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(i32, usize), LlmError> {
        let keep = self
            .cached
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count()
            .min(tokens.len().saturating_sub(1));
        let ctx = self.context()?;
        let kept = ctx
            .clear_kv_cache_seq(Some(0), Some(keep as u32), None)
            .unwrap_or(false);
        if kept {
            self.cached.truncate(keep);
        } else {
            self.reset()?;
        }
        let mut batch = LlamaBatch::new(BATCH, 1);
        let start = self.cached.len();
        for chunk in tokens[start..].chunks(BATCH) {
            if cancelled() {
                return Err(LlmError::Cancelled);
            }
            batch.clear();
            let pos = self.cached.len();
            for (i, t) in chunk.iter().enumerate() {
                let last = pos + i + 1 == tokens.len();
                batch
                    .add(*t, (pos + i) as i32, &[0], last)
                    .map_err(|e| backend_error(&e))?;
            }
            self.decode(&mut batch, chunk)?;
        }
        Ok((((tokens.len() - 1 - start) % BATCH) as i32, start))
    }

    /// Decodes `batch` (holding `tokens`) and records them as cached; on failure the cache is
    /// emptied, so the next turn starts clean.
    fn decode(&mut self, batch: &mut LlamaBatch, tokens: &[LlamaToken]) -> Result<(), LlmError> {
        let ctx = self.context()?;
        match ctx.decode(batch) {
            Ok(()) => {
                self.cached.extend_from_slice(tokens);
                Ok(())
            }
            Err(e) => {
                self.reset()?;
                Err(backend_error(&e))
            }
        }
    }

    fn reset(&mut self) -> Result<(), LlmError> {
        self.context()?.clear_kv_cache();
        self.cached.clear();
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
        let (mut logits_at, cached) = self.evaluate(&tokens, cancelled)?;
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
        let mut usage = Usage {
            tokens_in: tokens.len() as u64,
            tokens_cached: cached as u64,
            ..Usage::default()
        };
        let model = self.model;
        let vocab = model.model.vocab();
        let mut batch = LlamaBatch::new(1, 1);
        // Pieces can split a UTF-8 character: keep the bytes until they decode.
        let mut pending: Vec<u8> = Vec::new();
        for _ in 0..budget {
            if cancelled() {
                return Err(LlmError::Cancelled);
            }
            if started.elapsed() > params.timeout {
                return Err(LlmError::Timeout(params.timeout));
            }
            let token = sampler.sample(self.context()?, logits_at);
            sampler.accept(token);
            if vocab.is_eog(token) {
                break;
            }
            usage.tokens_out += 1;
            usage.first_token.get_or_insert_with(|| started.elapsed());
            pending.extend(vocab.token_to_piece(token, false, None));
            match std::str::from_utf8(&pending) {
                Ok(text) => {
                    if !text.is_empty() {
                        on_delta(text);
                    }
                    pending.clear();
                }
                Err(e) if e.error_len().is_some() => {
                    on_delta(&String::from_utf8_lossy(&pending));
                    pending.clear();
                }
                Err(_) => {} // an incomplete character: wait for the next piece
            }
            batch.clear();
            batch
                .add(token, self.cached.len() as i32, &[0], true)
                .map_err(|e| backend_error(&e))?;
            self.decode(&mut batch, &[token])?;
            logits_at = 0;
        }
        if usage.first_token.is_none() {
            return Err(LlmError::Empty);
        }
        usage.total = started.elapsed();
        Ok(usage)
    }
}
