//! A prompt file through the engine: the prompt tokens with their places in the file, the
//! target, and the token scores that every segment level is aggregated from.

use std::ops::Range;

use crate::engine::generate::GenerateOptions;
use crate::engine::prompt::TemplateMode;
use crate::engine::salience::{self, IgOptions, IgReport, Method, SalienceRequest};
use crate::engine::{CancelToken, Engine, EngineError, ProgressFn};
use crate::prompt_file::{self, PromptFile};
use crate::segments::{aggregate, Level, LevelResult, TokenScore};

#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// The whole response (generated first if the file has none).
    Response,
    /// A byte range of the file: inside the response, or inside the prompt.
    Bytes(Range<usize>),
}

#[derive(Debug, Clone)]
pub struct AnalysisOptions {
    pub method: Method,
    pub template: TemplateMode,
    pub system: Option<String>,
    pub ig: IgOptions,
    pub generation: GenerateOptions,
}

#[derive(Debug, Clone)]
pub struct AnalysedToken {
    pub id: u32,
    pub text: String,
    /// Byte range in `Analysis::text`; None for template tokens.
    pub range: Option<Range<usize>>,
    pub score: f32,
}

#[derive(Debug, Clone)]
pub struct Analysis {
    pub model: String,
    pub method: Method,
    pub template: TemplateMode,
    /// The file's text, with the generated response in place if one was generated.
    pub text: String,
    pub prompt: Range<usize>,
    pub response: Range<usize>,
    /// Whether the response was generated for this analysis (the file on disk lacks it).
    pub generated_response: bool,
    pub target: Range<usize>,
    /// Where scored text lies (segments are made in these).
    pub regions: Vec<Range<usize>>,
    pub tokens: Vec<AnalysedToken>,
    pub target_log_probs: Vec<f32>,
    pub objective: f32,
    pub ig: Option<IgReport>,
    pub seconds: f64,
    /// Other methods' scores for the same tokens, computed in the same pass.
    pub also: Vec<(Method, Vec<f32>)>,
}

impl Analysis {
    /// The same analysis under another method whose scores came with this one.
    pub fn switched_to(&self, method: Method) -> Option<Analysis> {
        if method == self.method {
            return Some(self.clone());
        }
        let (_, scores) = self.also.iter().find(|(m, _)| *m == method)?;
        let mut a = self.clone();
        let previous: Vec<f32> = a.tokens.iter().map(|t| t.score).collect();
        for (t, s) in a.tokens.iter_mut().zip(scores) {
            t.score = *s;
        }
        a.also = self
            .also
            .iter()
            .filter(|(m, _)| *m != method)
            .cloned()
            .chain(std::iter::once((self.method, previous)))
            .collect();
        a.method = method;
        Some(a)
    }

    pub fn level(&self, level: &Level, gain: f32) -> LevelResult {
        let scores: Vec<TokenScore> = self
            .tokens
            .iter()
            .map(|t| TokenScore {
                range: t.range.clone(),
                score: t.score,
            })
            .collect();
        aggregate(&self.text, &self.regions, &scores, level, gain)
    }

    pub fn target_text(&self) -> &str {
        &self.text[self.target.clone()]
    }
}

fn overlaps(a: &Range<usize>, b: &Range<usize>) -> bool {
    a.start < b.end && b.start < a.end
}

pub fn analyse(
    engine: &Engine,
    file: &PromptFile,
    target: &Target,
    opts: &AnalysisOptions,
    progress: ProgressFn,
    cancel: &CancelToken,
) -> Result<Analysis, EngineError> {
    if file.prompt.is_empty() {
        return Err(EngineError::InvalidInput("the prompt is empty".into()));
    }
    let prepared = engine.prepare(file.prompt_text(), opts.system.as_deref(), opts.template)?;
    let prompt_ids = prepared.ids();
    // The document, with a response generated in memory when there is none and it is the target.
    let mut generated_response = false;
    let doc = if matches!(target, Target::Response) && !file.has_response() {
        let gen = engine.generate(&prompt_ids, &opts.generation, progress, cancel)?;
        if gen.text.trim().is_empty() {
            return Err(EngineError::InvalidInput(
                "the model's response is empty: nothing to explain".into(),
            ));
        }
        generated_response = true;
        prompt_file::parse(&prompt_file::write::with_response(file, &gen.text))
    } else {
        file.clone()
    };
    let prompt_tokens: Vec<AnalysedToken> = prepared
        .tokens
        .iter()
        .map(|t| AnalysedToken {
            id: t.id,
            text: engine.tokenizer.token_text(t.id),
            range: t
                .source
                .as_ref()
                .map(|r| doc.prompt.start + r.start..doc.prompt.start + r.end),
            score: 0.0,
        })
        .collect();
    let target_bytes = match target {
        Target::Response => doc.response.clone(),
        Target::Bytes(r) => r.clone(),
    };
    let in_response = doc.has_response()
        && target_bytes.start >= doc.response.start
        && target_bytes.end <= doc.response.end;
    let in_prompt = target_bytes.start >= doc.prompt.start && target_bytes.end <= doc.prompt.end;
    let (all_tokens, target_positions) = if in_response {
        let mut all = prompt_tokens;
        let first = all.len();
        for (id, r) in engine.tokenize_target(doc.response_text())? {
            all.push(AnalysedToken {
                id,
                text: engine.tokenizer.token_text(id),
                range: Some(doc.response.start + r.start..doc.response.start + r.end),
                score: 0.0,
            });
        }
        let positions: Vec<usize> = (first..all.len())
            .filter(|&i| {
                all[i]
                    .range
                    .as_ref()
                    .is_some_and(|r| overlaps(r, &target_bytes))
            })
            .collect();
        (all, positions)
    } else if in_prompt {
        let positions: Vec<usize> = (0..prompt_tokens.len())
            .filter(|&i| {
                prompt_tokens[i]
                    .range
                    .as_ref()
                    .is_some_and(|r| overlaps(r, &target_bytes))
            })
            .collect();
        (prompt_tokens, positions)
    } else {
        return Err(EngineError::InvalidInput(format!(
            "the target (bytes {}..{}) must lie inside the prompt or inside the response",
            target_bytes.start, target_bytes.end
        )));
    };
    let (Some(&first), Some(&last)) = (target_positions.first(), target_positions.last()) else {
        return Err(EngineError::InvalidInput(
            "the target covers no token".into(),
        ));
    };
    if first == 0 {
        return Err(EngineError::InvalidInput(
            "the target starts at the very first token: there is nothing before it to explain it"
                .into(),
        ));
    }
    let ids: Vec<u32> = all_tokens.iter().map(|t| t.id).collect();
    let req = SalienceRequest {
        ids,
        target: first..last + 1,
        method: opts.method,
        ig: opts.ig.clone(),
        pad_id: engine.tokenizer.eos_ids.first().copied(),
    };
    let result = salience::compute(&engine.model, &req, progress, cancel)?;
    let target_range = {
        let rs: Vec<&Range<usize>> = all_tokens[first..=last]
            .iter()
            .filter_map(|t| t.range.as_ref())
            .collect();
        let start = rs.first().map_or(target_bytes.start, |r| r.start);
        let end = rs.last().map_or(target_bytes.end, |r| r.end);
        prompt_file::trim_range(&doc.text, start..end)
    };
    let mut tokens: Vec<AnalysedToken> = all_tokens.into_iter().take(first).collect();
    for (t, s) in tokens.iter_mut().zip(&result.scores) {
        t.score = *s;
    }
    let mut regions = Vec::new();
    if in_response {
        regions.push(doc.prompt.clone());
        if target_range.start > doc.response.start {
            regions.push(doc.response.start..target_range.start);
        }
    } else {
        regions.push(doc.prompt.start..target_range.start);
    }
    Ok(Analysis {
        model: engine.name.clone(),
        method: opts.method,
        template: opts.template,
        text: doc.text.clone(),
        prompt: doc.prompt.clone(),
        response: doc.response.clone(),
        generated_response,
        target: target_range,
        regions,
        tokens,
        target_log_probs: result.target_log_probs,
        objective: result.objective,
        ig: result.ig,
        seconds: result.seconds,
        also: result.also,
    })
}
