//! The salience engine: model files, tokenization, generation and gradient salience.
//!
//! It knows nothing about LSP or JSON-RPC: plain types and byte offsets into the caller's text.

#![deny(clippy::print_stdout)]

pub mod chat_template;
pub mod generate;
pub mod gguf;
pub mod machine;
pub mod model;
pub mod perturbation;
pub mod prompt;
pub mod registry;
pub mod salience;
pub mod surrogate;
pub mod synthetic;
pub mod threads;
pub mod tokenizer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chat_template::ChatTemplate;
use gguf::GgufFile;
use model::Model;
use tokenizer::PromptTokenizer;

/// Everything the engine can refuse or fail at. Callers match on the variant, never on the text.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model file {path}: {reason}")]
    ModelFile { path: PathBuf, reason: String },
    #[error("unsupported model architecture `{found}` (supported: {})", supported.join(", "))]
    UnsupportedArchitecture {
        found: String,
        supported: &'static [&'static str],
    },
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    /// The token sequence does not fit the model's context window.
    #[error("{tokens} tokens exceed the model's context of {limit}")]
    ContextOverflow { tokens: usize, limit: usize },
    #[error("{0}")]
    InvalidInput(String),
    #[error("model fetch: {0}")]
    Fetch(String),
    #[error("cancelled")]
    Cancelled,
    #[error("computation: {0}")]
    Compute(String),
}

impl EngineError {
    /// A candle error met while `cancel` was live: the work was cancelled when the token
    /// says so (the kernels stop by failing the pass), otherwise it is a real failure.
    pub fn candle_or_cancel(e: candle_core::Error, cancel: &CancelToken) -> Self {
        if cancel.is_cancelled() {
            EngineError::Cancelled
        } else {
            EngineError::Compute(e.to_string())
        }
    }

    /// A candle error where no cancellation can be in play (loading, shape checks).
    pub fn candle(e: candle_core::Error) -> Self {
        EngineError::Compute(e.to_string())
    }
}

/// A cancellation flag shared between whoever starts work and the work itself.
#[derive(Clone, Default, Debug)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// Whether both handles share one flag.
    pub fn same(&self, other: &CancelToken) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    /// Fails a pass that is under way: the message is only for logs, callers decide
    /// cancellation from the token ([`EngineError::candle_or_cancel`]).
    pub(crate) fn check(&self) -> candle_core::Result<()> {
        if self.is_cancelled() {
            Err(candle_core::Error::Msg("cancelled".into()))
        } else {
            Ok(())
        }
    }
}

/// What long work reports as it goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    Generating {
        done: usize,
        max: usize,
    },
    Salience {
        pass: usize,
        passes: usize,
    },
    IntegratedGradients {
        step: usize,
        steps: usize,
    },
    /// Forward passes on perturbed prompts (leave-one-out, ablation masks, deletion checks).
    Perturbation {
        done: usize,
        total: usize,
    },
}

pub type ProgressFn<'a> = &'a (dyn Fn(Progress) + Sync);

pub fn no_progress(_: Progress) {}

/// A loaded model with its tokenizer and chat template.
pub struct Engine {
    pub name: String,
    /// The `.gguf` file or model directory it was loaded from.
    pub path: std::path::PathBuf,
    pub model: Model,
    pub tokenizer: PromptTokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub generation_cache: std::sync::Mutex<generate::PrefixCache>,
}

impl Engine {
    /// The template mode asked for, else the chat template when the model has one (a base
    /// model without one gets the text raw).
    pub fn template_or_default(
        &self,
        chosen: Option<prompt::TemplateMode>,
    ) -> prompt::TemplateMode {
        chosen.unwrap_or(if self.chat_template.is_some() {
            prompt::TemplateMode::Chat
        } else {
            prompt::TemplateMode::Raw
        })
    }

    /// Loads a model by registered name, `.gguf` path or hub id, fetching it when missing.
    pub fn load_named(name: &str, fetch: &registry::FetchOptions) -> Result<Self, EngineError> {
        let spec = registry::ModelSpec::parse(name)?;
        let path = registry::resolve(&spec, fetch)?;
        Self::load(&path, &spec.display_name())
    }

    /// Loads a `.gguf` file or a Hugging Face model directory.
    pub fn load(path: &std::path::Path, name: &str) -> Result<Self, EngineError> {
        threads::configure();
        if model::HfDirectory::is_model_dir(path) {
            return Self::load_hf(path, name);
        }
        let mut gguf = GgufFile::open(path)?;
        let model = Model::from_gguf(&mut gguf)?;
        let tokenizer = PromptTokenizer::from_gguf(&gguf)?;
        let chat_template = gguf.opt_string("tokenizer.chat_template");
        Self::assemble(name, path, model, tokenizer, chat_template)
    }

    fn load_hf(dir: &std::path::Path, name: &str) -> Result<Self, EngineError> {
        let files = model::HfDirectory::open(dir)?;
        let model = Model::from_hf(&files)?;
        let tokenizer = PromptTokenizer::from_hf(
            &files.tokenizer_json,
            &files.tokenizer_config,
            &files.generation_eos,
        )?;
        Self::assemble(name, dir, model, tokenizer, files.chat_template)
    }

    fn assemble(
        name: &str,
        path: &std::path::Path,
        model: Model,
        tokenizer: PromptTokenizer,
        chat_template: Option<String>,
    ) -> Result<Self, EngineError> {
        if model.cfg.vocab < tokenizer.vocab_size() {
            return Err(EngineError::ModelFile {
                path: path.to_owned(),
                reason: format!(
                    "tokenizer has {} tokens but the embedding table only {}",
                    tokenizer.vocab_size(),
                    model.cfg.vocab
                ),
            });
        }
        let chat_template = chat_template.map(|src| {
            let tok = |id: Option<u32>| id.map(|i| tokenizer.token_text(i)).unwrap_or_default();
            ChatTemplate::new(
                src,
                tok(tokenizer.bos_id),
                tok(tokenizer.eos_ids.first().copied()),
            )
        });
        Ok(Self {
            name: name.to_string(),
            path: path.to_owned(),
            model,
            tokenizer,
            chat_template,
            generation_cache: Default::default(),
        })
    }
}
