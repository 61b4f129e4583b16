//! A prompt file through the engine: the prompt tokens with their places in the file, the
//! target, and the token scores that every segment level is aggregated from.

use std::ops::Range;

use serde::Serialize;

use crate::prompt_file::{self, Granularity, PromptFile};
use crate::segments::{aggregate, segments_and_owners, LevelResult, Segmentation, TokenScore};
use salience_engine::generate::GenerateOptions;
use salience_engine::perturbation::{
    self, DeletionScorer, SurrogateOptions, SurrogateReport, TargetTerm,
};
use salience_engine::prompt::TemplateMode;
use salience_engine::salience::{self, IgOptions, IgReport, Method, SalienceRequest};
use salience_engine::{CancelToken, Engine, EngineError, ProgressFn};

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
    /// None: the model's chat template when it has one, else the text raw.
    pub template: Option<TemplateMode>,
    pub system: Option<String>,
    pub ig: IgOptions,
    pub generation: GenerateOptions,
    /// "Why the target rather than this?": F = ln p(target) - ln p(contrast).
    pub contrast: Option<String>,
    /// The segments perturbation methods delete.
    pub segments: Segmentation,
    pub surrogate: SurrogateOptions,
}

impl AnalysisOptions {
    pub fn new(method: Method, template: Option<TemplateMode>) -> Self {
        Self {
            method,
            template,
            system: None,
            ig: IgOptions::default(),
            generation: GenerateOptions::default(),
            contrast: None,
            segments: Segmentation::Standard(Granularity::Sentence),
            surrogate: SurrogateOptions::default(),
        }
    }
}

/// The alternative B of a contrastive target.
#[derive(Debug, Clone)]
pub struct Contrast {
    pub text: String,
    pub ids: Vec<u32>,
    pub log_probs: Vec<f32>,
}

/// How a perturbation method's scores were made.
#[derive(Debug, Clone, Serialize)]
pub struct PerturbationReport {
    /// The level whose segments were deleted; scores are exact at this level.
    pub level: String,
    pub segments: usize,
    /// Forward passes on perturbed prompts.
    pub forward_passes: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub surrogate: Option<SurrogateReport>,
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
    /// Ids of the target tokens (they follow `tokens`).
    pub target_ids: Vec<u32>,
    pub target_log_probs: Vec<f32>,
    pub contrast: Option<Contrast>,
    /// F: ln p(target), minus ln p(contrast) when there is one.
    pub objective: f32,
    pub perturbation: Option<PerturbationReport>,
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

    pub fn level(&self, level: &Segmentation, gain: f32) -> LevelResult {
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

    /// The objective's terms, for re-scoring the target on perturbed prompts.
    pub fn terms(&self) -> Vec<TargetTerm> {
        TargetTerm::objective(
            &self.target_ids,
            self.contrast.as_ref().map(|c| c.ids.as_slice()),
        )
    }

    pub fn context_ids(&self) -> Vec<u32> {
        self.tokens.iter().map(|t| t.id).collect()
    }

    /// The segments at `level` in the scored text, and the token positions each one holds.
    pub fn segment_units(&self, level: &Segmentation) -> (Vec<Range<usize>>, Vec<Vec<usize>>) {
        let token_ranges: Vec<Option<Range<usize>>> =
            self.tokens.iter().map(|t| t.range.clone()).collect();
        let (ranges, owners) = segments_and_owners(&self.text, &self.regions, &token_ranges, level);
        let mut units = vec![Vec::new(); ranges.len()];
        for (pos, owner) in owners.iter().enumerate() {
            if let Some(i) = owner {
                units[*i].push(pos);
            }
        }
        (ranges, units)
    }

    /// A one-line description of the objective.
    pub fn objective_text(&self) -> String {
        match &self.contrast {
            Some(c) => format!(
                "F = ln p(target) - ln p({:?}) = {:.3} - {:.3} = {:.3}",
                c.text,
                self.target_log_probs.iter().sum::<f32>(),
                c.log_probs.iter().sum::<f32>(),
                self.objective
            ),
            None => format!("F = ln p(target) = {:.3}", self.objective),
        }
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
    let template = engine.template_or_default(opts.template);
    let prepared = engine.prepare(file.prompt_text(), opts.system.as_deref(), template)?;
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
        // A raw prompt is continued as text: the response's leading spaces are part of it
        // (" positive" after "Sentiment:" is one token; "positive" is another, unlikely one).
        // A chat turn starts fresh, so there they are dropped.
        let start = if template == TemplateMode::Raw {
            let before = &doc.text[..doc.response.start];
            doc.response.start - (before.len() - before.trim_end_matches([' ', '\t']).len())
        } else {
            doc.response.start
        };
        for (id, r) in engine.tokenize_target(&doc.text[start..doc.response.end])? {
            all.push(AnalysedToken {
                id,
                text: engine.tokenizer.token_text(id),
                range: Some(start + r.start..start + r.end),
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
        let (l1, c1) = crate::prompt_file::line_col(&doc.text, target_bytes.start);
        let (l2, c2) = crate::prompt_file::line_col(&doc.text, target_bytes.end);
        return Err(EngineError::InvalidInput(format!(
            "the target (line {l1}, column {c1} to line {l2}, column {c2}) must lie inside the \
             prompt or inside the response, not across them or in the front matter"
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
    let contrast_ids = match &opts.contrast {
        Some(b) if b.trim().is_empty() => {
            return Err(EngineError::InvalidInput(
                "the contrastive alternative is empty".into(),
            ))
        }
        Some(b) => Some(
            engine
                .tokenize_target(b)?
                .into_iter()
                .map(|(id, _)| id)
                .collect::<Vec<u32>>(),
        ),
        None => None,
    };
    let req = SalienceRequest {
        ids,
        target: first..last + 1,
        method: opts.method,
        ig: opts.ig.clone(),
        pad_id: engine.tokenizer.eos_ids.first().copied(),
        contrast: contrast_ids.clone(),
    };
    let target_range = {
        let rs: Vec<&Range<usize>> = all_tokens[first..=last]
            .iter()
            .filter_map(|t| t.range.as_ref())
            .collect();
        let start = rs.first().map_or(target_bytes.start, |r| r.start);
        let end = rs.last().map_or(target_bytes.end, |r| r.end);
        prompt_file::trim_range(&doc.text, start..end)
    };
    let target_ids = req.ids[first..=last].to_vec();
    let mut tokens: Vec<AnalysedToken> = all_tokens.into_iter().take(first).collect();
    let mut regions = Vec::new();
    if in_response {
        regions.push(doc.prompt.clone());
        if target_range.start > doc.response.start {
            regions.push(doc.response.start..target_range.start);
        }
    } else {
        regions.push(doc.prompt.start..target_range.start);
    }
    let mut analysis = Analysis {
        model: engine.name.clone(),
        method: opts.method,
        template,
        text: doc.text.clone(),
        prompt: doc.prompt.clone(),
        response: doc.response.clone(),
        generated_response,
        target: target_range,
        regions,
        tokens: Vec::new(),
        target_ids,
        target_log_probs: Vec::new(),
        contrast: None,
        objective: 0.0,
        perturbation: None,
        ig: None,
        seconds: 0.0,
        also: Vec::new(),
    };
    // Its log-probs come with the scores below; the perturbation methods need its ids first.
    analysis.contrast = opts
        .contrast
        .clone()
        .zip(contrast_ids)
        .map(|(text, ids)| Contrast {
            text,
            ids,
            log_probs: Vec::new(),
        });
    if opts.method.is_perturbation() {
        analysis.tokens = tokens;
        perturb(engine, &mut analysis, opts, progress, cancel)?;
        return Ok(analysis);
    }
    let result = salience::compute(&engine.model, &req, progress, cancel)?;
    for (t, s) in tokens.iter_mut().zip(&result.scores) {
        t.score = *s;
    }
    analysis.tokens = tokens;
    analysis.target_log_probs = result.target_log_probs;
    analysis.objective = result.objective;
    analysis.ig = result.ig;
    analysis.seconds = result.seconds;
    analysis.also = result.also;
    if let Some(c) = &mut analysis.contrast {
        c.log_probs = result.contrast_log_probs;
    }
    Ok(analysis)
}

/// More segments than this make leave-one-out a wait of minutes: it asks for a coarser level.
pub const MAX_LEAVE_ONE_OUT: usize = 256;

/// Scores the segments at `opts.segments` by deleting them; each segment's score is shared
/// evenly by its tokens, so it is exact at that level and summed at coarser ones.
fn perturb(
    engine: &Engine,
    analysis: &mut Analysis,
    opts: &AnalysisOptions,
    progress: ProgressFn,
    cancel: &CancelToken,
) -> Result<(), EngineError> {
    let started = std::time::Instant::now();
    let (_, units) = analysis.segment_units(&opts.segments);
    let units: Vec<Vec<usize>> = units.into_iter().filter(|u| !u.is_empty()).collect();
    if units.is_empty() {
        return Err(EngineError::InvalidInput(
            "there is no segment before the target to delete".into(),
        ));
    }
    if opts.method == Method::LeaveOneOut && units.len() > MAX_LEAVE_ONE_OUT {
        return Err(EngineError::InvalidInput(format!(
            "leave_one_out would delete {} {} segments one at a time ({} forward passes): \
             choose a coarser granularity (sentence, paragraph, block) or ablation_surrogate",
            units.len(),
            opts.segments.name(),
            units.len() + 1
        )));
    }
    let mut scorer = DeletionScorer::new(
        &engine.model,
        &analysis.context_ids(),
        analysis.terms(),
        cancel,
    )?;
    let (scores, surrogate) = match opts.method {
        Method::LeaveOneOut => (
            perturbation::leave_one_out(&mut scorer, &units, progress, cancel)?,
            None,
        ),
        _ => {
            let (w, report) = perturbation::ablation_surrogate(
                &mut scorer,
                &units,
                &opts.surrogate,
                progress,
                cancel,
            )?;
            (w, Some(report))
        }
    };
    for (unit, score) in units.iter().zip(&scores) {
        for &p in unit {
            analysis.tokens[p].score = score / unit.len() as f32;
        }
    }
    analysis.objective = scorer.full;
    // The scorer's terms are the target's, then the contrast's.
    let mut full = scorer.full_log_probs.clone().into_iter();
    analysis.target_log_probs = full.next().unwrap_or_default();
    if let Some(c) = &mut analysis.contrast {
        c.log_probs = full.next().unwrap_or_default();
    }
    analysis.perturbation = Some(PerturbationReport {
        level: opts.segments.name(),
        segments: units.len(),
        forward_passes: scorer.passes,
        surrogate,
    });
    analysis.seconds = started.elapsed().as_secs_f64();
    Ok(())
}
