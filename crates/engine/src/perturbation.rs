//! Perturbation salience: delete groups of prompt tokens ("units", usually the tokens of one
//! segment) and re-score the fixed target with forward passes only.
//!
//! Deleting tokens (rather than re-tokenizing the shortened text) keeps every other token
//! exactly as it was, so a change in F is the unit's doing alone. Every variant reuses the
//! keys and values of the unchanged prefix before its first deleted token.

use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::model::{KvCache, Model};
use super::surrogate::{self, SurrogateFit};
use super::{CancelToken, EngineError, Progress, ProgressFn};

/// One part of the objective: `sign` times the summed log-probs of `ids` after the context.
#[derive(Debug, Clone)]
pub struct TargetTerm {
    pub ids: Vec<u32>,
    pub sign: f32,
}

impl TargetTerm {
    /// The usual objective, ln p(target | context); with `contrast`, minus ln p(contrast | context).
    pub fn objective(target: &[u32], contrast: Option<&[u32]>) -> Vec<TargetTerm> {
        let mut terms = vec![TargetTerm {
            ids: target.to_vec(),
            sign: 1.0,
        }];
        if let Some(b) = contrast {
            terms.push(TargetTerm {
                ids: b.to_vec(),
                sign: -1.0,
            });
        }
        terms
    }
}

/// F of the context with some tokens deleted. Any position may go, the first included (with
/// a raw prompt and no BOS token it is the first word); a deletion that would leave no token
/// at all is refused: a causal model needs one to predict the target from.
pub struct DeletionScorer<'a> {
    model: &'a Model,
    context: Vec<u32>,
    terms: Vec<TargetTerm>,
    cache: KvCache,
    /// F with nothing deleted.
    pub full: f32,
    /// With nothing deleted, ln p of each term's tokens (the target's, then the contrast's).
    pub full_log_probs: Vec<Vec<f32>>,
    /// Forward passes run so far (one per term per variant).
    pub passes: usize,
    /// Perturbed prompts per batched forward pass (at most; a token budget also applies).
    pub batch: usize,
}

impl<'a> DeletionScorer<'a> {
    pub fn new(
        model: &'a Model,
        context: &[u32],
        terms: Vec<TargetTerm>,
        cancel: &CancelToken,
    ) -> Result<Self, EngineError> {
        let bad = |m: String| Err(EngineError::InvalidInput(m));
        if context.is_empty() {
            return bad("nothing before the target to delete from".into());
        }
        if terms.is_empty() || terms.iter().any(|t| t.ids.is_empty()) {
            return bad("the target covers no token".into());
        }
        let longest = terms.iter().map(|t| t.ids.len()).max().unwrap_or(0);
        if context.len() + longest > model.cfg.context_length {
            return Err(EngineError::ContextOverflow {
                tokens: context.len() + longest,
                limit: model.cfg.context_length,
            });
        }
        if let Some(bad_id) = context
            .iter()
            .chain(terms.iter().flat_map(|t| &t.ids))
            .find(|&&id| id as usize >= model.cfg.vocab)
        {
            return bad(format!("token id {bad_id} out of vocabulary"));
        }
        let mut cache = KvCache::default();
        for chunk in context.chunks(256) {
            cancel
                .check()
                .map_err(|e| EngineError::candle_or_cancel(e, cancel))?;
            model
                .forward_cached_hidden(chunk, &mut cache)
                .map_err(|e| EngineError::candle_or_cancel(e, cancel))?;
        }
        let mut scorer = Self {
            model,
            context: context.to_vec(),
            terms,
            cache,
            full: 0.0,
            full_log_probs: Vec::new(),
            passes: 0,
            batch: DEFAULT_BATCH,
        };
        let plan = scorer.plan(&[]).expect("the context is not empty");
        scorer.full_log_probs = scorer
            .term_log_probs(&[plan])
            .map_err(|e| EngineError::candle_or_cancel(e, cancel))?
            .remove(0);
        scorer.full = scorer.objective(&scorer.full_log_probs);
        scorer.passes = scorer.terms.len();
        Ok(scorer)
    }

    pub fn context_len(&self) -> usize {
        self.context.len()
    }

    /// F with the context positions in `deleted` removed (any order, duplicates allowed).
    pub fn without(&mut self, deleted: &[usize], cancel: &CancelToken) -> Result<f32, EngineError> {
        Ok(self.without_many(std::slice::from_ref(&deleted.to_vec()), cancel)?[0])
    }

    /// Whether a deletion keeps at least one context token (else no position predicts the
    /// target and F is undefined).
    pub fn keeps_a_token(&self, deleted: &[usize]) -> bool {
        self.plan(deleted).is_some()
    }

    /// Where a variant's forward pass starts, and the tokens it runs from there: the last
    /// kept token before the first deletion (its hidden state predicts the first target token
    /// when everything after it is deleted), then every kept token after it. When the first
    /// position is deleted the pass starts from scratch. None when nothing is kept.
    fn plan(&self, deleted: &[usize]) -> Option<(usize, Vec<u32>)> {
        let n = self.context.len();
        let mut gone = vec![false; n];
        for &p in deleted {
            if p < n {
                gone[p] = true;
            }
        }
        let from = gone.iter().position(|&g| g).unwrap_or(n).saturating_sub(1);
        let kept: Vec<u32> = (from..n)
            .filter(|&p| !gone[p])
            .map(|p| self.context[p])
            .collect();
        (!kept.is_empty()).then_some((from, kept))
    }

    /// F for each set of deleted positions, in batches of up to `batch` variants, each on its
    /// cached prefix.
    pub fn without_many(
        &mut self,
        variants: &[Vec<usize>],
        cancel: &CancelToken,
    ) -> Result<Vec<f32>, EngineError> {
        self.scored(variants, cancel, &mut |_| {})
    }

    /// `without_many`, telling `after_batch` how many variants are done after each batch.
    fn scored(
        &mut self,
        variants: &[Vec<usize>],
        cancel: &CancelToken,
        after_batch: &mut dyn FnMut(usize),
    ) -> Result<Vec<f32>, EngineError> {
        let plans = variants
            .iter()
            .map(|d| {
                self.plan(d).ok_or_else(|| {
                    EngineError::InvalidInput(
                        "this deletion removes every token before the target, leaving none to predict it from: split the prompt into more segments"
                            .into(),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let longest_term = self.terms.iter().map(|t| t.ids.len()).max().unwrap_or(0);
        let mut out = Vec::with_capacity(plans.len());
        let mut at = 0;
        while at < plans.len() {
            cancel
                .check()
                .map_err(|e| EngineError::candle_or_cancel(e, cancel))?;
            // Variants run together whatever their prefix: each reads its own from the cache,
            // and the products unpack each weight once for the whole batch.
            let mut end = at + 1;
            let mut tokens = plans[at].1.len() + longest_term;
            while end < plans.len() && end - at < self.batch {
                tokens += plans[end].1.len() + longest_term;
                if tokens > BATCH_TOKENS {
                    break;
                }
                end += 1;
            }
            let fs = self
                .score_plans(&plans[at..end])
                .map_err(|e| EngineError::candle_or_cancel(e, cancel))?;
            out.extend(fs);
            self.passes += (end - at) * self.terms.len();
            at = end;
            after_batch(at);
        }
        Ok(out)
    }

    /// F of each variant: its kept tokens after its cached prefix (`plan`).
    fn score_plans(&self, plans: &[(usize, Vec<u32>)]) -> candle_core::Result<Vec<f32>> {
        Ok(self
            .term_log_probs(plans)?
            .iter()
            .map(|terms| self.objective(terms))
            .collect())
    }

    /// F from each term's token log-probs.
    fn objective(&self, log_probs: &[Vec<f32>]) -> f32 {
        log_probs
            .iter()
            .zip(&self.terms)
            .map(|(lp, term)| term.sign * lp.iter().sum::<f32>())
            .sum()
    }

    /// ln p of every term's tokens after each variant (`plan`): [variant][term][token].
    fn term_log_probs(
        &self,
        plans: &[(usize, Vec<u32>)],
    ) -> candle_core::Result<Vec<Vec<Vec<f32>>>> {
        let mut out = vec![Vec::with_capacity(self.terms.len()); plans.len()];
        for term in &self.terms {
            let n = term.ids.len();
            let mut sequences = Vec::with_capacity(plans.len());
            let mut picks = Vec::with_capacity(plans.len() * n);
            let mut row = 0;
            for (from, kept) in plans {
                let ids: Vec<u32> = kept.iter().chain(&term.ids).copied().collect();
                // The last kept token's row predicts the term's first token.
                picks.extend((0..n).map(|j| (row + kept.len() - 1 + j) as u32));
                row += ids.len();
                sequences.push((*from, ids));
            }
            let hidden = self.model.forward_continuations(&sequences, &self.cache)?;
            let hidden = hidden.index_select(&Tensor::new(picks.as_slice(), &Device::Cpu)?, 0)?;
            let targets = term.ids.repeat(plans.len());
            let (log_probs, _) = self.model.target_log_probs(&hidden, &targets, false)?;
            for (variant, chunk) in out.iter_mut().zip(log_probs.chunks(n)) {
                variant.push(chunk.to_vec());
            }
        }
        Ok(out)
    }
}

/// Tokens per batched forward pass of perturbed prompts.
const BATCH_TOKENS: usize = 2048;

/// Perturbed prompts per forward pass unless set otherwise (`DeletionScorer::batch`). Variants
/// batch whatever their first deletion (`Model::forward_continuations`): on 2 cores, batches of
/// 8 took 0.81-0.95 of the time of one at a time for leave-one-out at 100 tokens and 0.8-0.9
/// for 32 ablation masks (`prompt-salience bench`).
pub const DEFAULT_BATCH: usize = 8;

/// Leave-one-out: Delta F = F(full) - F(without unit) for each unit (positive: the unit raises F).
pub fn leave_one_out(
    scorer: &mut DeletionScorer,
    units: &[Vec<usize>],
    progress: ProgressFn,
    cancel: &CancelToken,
) -> Result<Vec<f32>, EngineError> {
    let fs = scored_with_progress(scorer, units, progress, cancel)?;
    Ok(fs.iter().map(|f| scorer.full - f).collect())
}

/// F for each deletion, reporting progress after every batch.
fn scored_with_progress(
    scorer: &mut DeletionScorer,
    deletions: &[Vec<usize>],
    progress: ProgressFn,
    cancel: &CancelToken,
) -> Result<Vec<f32>, EngineError> {
    let total = deletions.len();
    progress(Progress::Perturbation { done: 0, total });
    scorer.scored(deletions, cancel, &mut |done| {
        progress(Progress::Perturbation { done, total })
    })
}

#[derive(Debug, Clone, PartialEq)]
pub struct SurrogateOptions {
    /// Random ablation masks to score.
    pub samples: usize,
    /// Probability that a unit is kept in a mask.
    pub keep: f64,
    pub seed: u64,
}

impl Default for SurrogateOptions {
    fn default() -> Self {
        Self {
            samples: 64,
            keep: 0.5,
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SurrogateReport {
    pub samples: usize,
    pub held_out: usize,
    /// R^2 of the surrogate on masks it was not fitted on.
    pub held_out_r2: f32,
    pub lambda: f32,
    pub intercept: f32,
    pub seconds: f64,
}

/// ContextCite's surrogate: F on random ablation masks, then a sparse linear model of F from
/// the masks. A unit's score is its weight: the change in F from keeping the unit.
pub fn ablation_surrogate(
    scorer: &mut DeletionScorer,
    units: &[Vec<usize>],
    opts: &SurrogateOptions,
    progress: ProgressFn,
    cancel: &CancelToken,
) -> Result<(Vec<f32>, SurrogateReport), EngineError> {
    let started = Instant::now();
    if units.is_empty() {
        return Err(EngineError::InvalidInput(
            "no segments to ablate before the target".into(),
        ));
    }
    // A unit whose deletion alone leaves no token is kept by every mask below: its weight
    // could not be measured.
    if units.iter().any(|u| !scorer.keeps_a_token(u)) {
        return Err(EngineError::InvalidInput(
            "the only segment covers every token before the target, so no mask can delete it: split the prompt into more segments".into(),
        ));
    }
    let samples = opts.samples.max(4);
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let deleted_by = |mask: &[bool]| -> Vec<usize> {
        units
            .iter()
            .zip(mask)
            .filter(|(_, keep)| !**keep)
            .flat_map(|(u, _)| u.iter().copied())
            .collect()
    };
    // A mask that would delete every token (a raw prompt without BOS, its segments covering
    // it all) has no F: draw it again, so masks are uniform among those that keep a token.
    let mut masks: Vec<Vec<bool>> = Vec::with_capacity(samples);
    let mut deletions: Vec<Vec<usize>> = Vec::with_capacity(samples);
    let mut draws = 0;
    while masks.len() < samples {
        draws += 1;
        if draws > 100 * samples {
            return Err(EngineError::InvalidInput(
                "every ablation mask drawn deletes the whole prompt: raise the keep probability"
                    .into(),
            ));
        }
        let mask: Vec<bool> = (0..units.len())
            .map(|_| rng.random_bool(opts.keep.clamp(0.0, 1.0)))
            .collect();
        let deleted = deleted_by(&mask);
        if scorer.keeps_a_token(&deleted) {
            masks.push(mask);
            deletions.push(deleted);
        }
    }
    let ys = scored_with_progress(scorer, &deletions, progress, cancel)?;
    let SurrogateFit {
        weights,
        intercept,
        held_out_r2,
        held_out,
        lambda,
    } = surrogate::fit(&masks, &ys, opts.seed);
    Ok((
        weights,
        SurrogateReport {
            samples,
            held_out,
            held_out_r2,
            lambda,
            intercept,
            seconds: started.elapsed().as_secs_f64(),
        },
    ))
}
