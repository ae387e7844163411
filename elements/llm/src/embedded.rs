//! llama.cpp in-process (llama-cpp-2, which bundles llama.cpp), no GStreamer types. A model is
//! loaded once per process and shared; each generation gets its own context, so sessions do not
//! see each other's conversations.

use crate::chat::{Message, Role, Usage};
use crate::openai::{LlmError, Params};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

/// Context length of a generation: history, prompt and reply must fit.
const CONTEXT: u32 = 4096;

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

    /// Generates a reply to `messages`, calling `on_delta` with each piece of text. Stops at
    /// the end of the reply, at `max_tokens`, after `timeout`, or soon after `cancelled()`.
    pub fn generate(
        &self,
        messages: &[Message],
        params: &Params,
        cancelled: &dyn Fn() -> bool,
        on_delta: &mut dyn FnMut(&str),
    ) -> Result<Usage, LlmError> {
        let started = Instant::now();
        let err = |e: &dyn std::fmt::Display| LlmError::Backend(format!("llama.cpp: {e}"));
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
            .map_err(|e| err(&e))?;
        let prompt = self
            .model
            .apply_chat_template(&self.template, &chat, true)
            .map_err(|e| err(&e))?;
        let vocab = self.model.vocab();
        let tokens = vocab.tokenize(prompt.as_bytes(), false, true);
        let budget = params.max_tokens as usize;
        if tokens.len() + budget + 1 > CONTEXT as usize {
            return Err(LlmError::Backend(format!(
                "the conversation ({} tokens) and the reply ({budget}) do not fit the context of {CONTEXT}",
                tokens.len()
            )));
        }
        let ctx_params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(CONTEXT))
            .with_n_batch(512)
            .with_n_threads(self.threads)
            .with_n_threads_batch(self.threads);
        let mut ctx = {
            let _guard = self.new_context.lock().unwrap_or_else(|p| p.into_inner());
            self.model
                .new_context(backend()?, ctx_params)
                .map_err(|e| err(&e))?
        };
        // The prompt, in batches of 512.
        let mut batch = LlamaBatch::new(512, 1);
        let mut pos = 0i32;
        for chunk in tokens.chunks(512) {
            if cancelled() {
                return Err(LlmError::Cancelled);
            }
            batch.clear();
            for (i, t) in chunk.iter().enumerate() {
                let last = pos as usize + i + 1 == tokens.len();
                batch
                    .add(*t, pos + i as i32, &[0], last)
                    .map_err(|e| err(&e))?;
            }
            ctx.decode(&mut batch).map_err(|e| err(&e))?;
            pos += chunk.len() as i32;
        }
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
            ..Usage::default()
        };
        // Pieces can split a UTF-8 character: keep the bytes until they decode.
        let mut pending: Vec<u8> = Vec::new();
        for _ in 0..budget {
            if cancelled() {
                return Err(LlmError::Cancelled);
            }
            if started.elapsed() > params.timeout {
                return Err(LlmError::Timeout(params.timeout));
            }
            let token = sampler.sample(&ctx, batch.n_tokens() - 1);
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
            batch.add(token, pos, &[0], true).map_err(|e| err(&e))?;
            pos += 1;
            ctx.decode(&mut batch).map_err(|e| err(&e))?;
        }
        if usage.first_token.is_none() {
            return Err(LlmError::Empty);
        }
        usage.total = started.elapsed();
        Ok(usage)
    }
}
