//! Turning a caller's prompt into model tokens that remember where they came from.

use std::ops::Range;

use super::chat_template::Message;
use super::{Engine, EngineError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TemplateMode {
    /// The model's own chat template, the prompt as the user turn.
    #[default]
    Chat,
    /// The text as it is (special-token text still becomes the special token).
    Raw,
}

impl std::str::FromStr for TemplateMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "chat" => Ok(Self::Chat),
            "raw" => Ok(Self::Raw),
            other => Err(format!("unknown template mode `{other}` (chat, raw)")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptToken {
    pub id: u32,
    /// Byte range in the caller's prompt text; None for tokens the template added.
    pub source: Option<Range<usize>>,
}

#[derive(Debug, Clone)]
pub struct PreparedPrompt {
    /// The text the model sees (after the chat template).
    pub text: String,
    pub tokens: Vec<PromptToken>,
}

impl PreparedPrompt {
    pub fn ids(&self) -> Vec<u32> {
        self.tokens.iter().map(|t| t.id).collect()
    }
}

impl Engine {
    pub fn prepare(
        &self,
        prompt: &str,
        system: Option<&str>,
        mode: TemplateMode,
    ) -> Result<PreparedPrompt, EngineError> {
        let (text, content) = match mode {
            TemplateMode::Raw => (prompt.to_string(), 0..prompt.len()),
            TemplateMode::Chat => {
                let template = self.chat_template.as_ref().ok_or_else(|| {
                    EngineError::InvalidInput(format!(
                        "model `{}` has no chat template (a base model): use the raw template mode",
                        self.name
                    ))
                })?;
                let mut messages = Vec::new();
                if let Some(s) = system {
                    messages.push(Message::new("system", s));
                }
                messages.push(Message::new("user", prompt));
                let rendered = template.render(&messages)?;
                let range = rendered
                    .content_ranges
                    .last()
                    .cloned()
                    .flatten()
                    .unwrap_or(0..0);
                (rendered.text, range)
            }
        };
        let mut tokens: Vec<PromptToken> = Vec::new();
        let added = |ids: &[u32]| -> Vec<PromptToken> {
            ids.iter()
                .map(|&id| PromptToken { id, source: None })
                .collect()
        };
        if mode == TemplateMode::Raw {
            tokens.extend(added(&self.tokenizer.raw_prefix));
        }
        for tok in self.tokenizer.encode(&text)? {
            let start = tok.range.start.max(content.start);
            let end = tok.range.end.min(content.end);
            let source = (start < end).then(|| start - content.start..end - content.start);
            tokens.push(PromptToken { id: tok.id, source });
        }
        if mode == TemplateMode::Raw {
            tokens.extend(added(&self.tokenizer.raw_suffix));
        }
        Ok(PreparedPrompt { text, tokens })
    }

    /// The target text tokenized on its own (no special tokens added), with byte ranges in it.
    pub fn tokenize_target(&self, target: &str) -> Result<Vec<(u32, Range<usize>)>, EngineError> {
        Ok(self
            .tokenizer
            .encode(target)?
            .into_iter()
            .map(|t| (t.id, t.range))
            .collect())
    }
}
