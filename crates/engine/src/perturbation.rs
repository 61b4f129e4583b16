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
            // Batches of perturbed prompts did not pay on the 2-core CI machine
            // (`prompt-salience bench`: 0.9-1.0x for masks, 0.96x for leave-one-out).
            batch: 1,
        };
        let (from, kept) = scorer.plan(&[]).expect("the context is not empty");
        scorer.full_log_probs = scorer
            .term_log_probs(from, &[kept])
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

    /// F for each set of deleted positions. Variants whose first deletion is at the same place
    /// run in batches on the cached prefix before it.
    pub fn without_many(
        &mut self,
        variants: &[Vec<usize>],
        cancel: &CancelToken,
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
        let mut order: Vec<usize> = (0..plans.len()).collect();
        order.sort_by_key(|&i| plans[i].0);
        let longest_term = self.terms.iter().map(|t| t.ids.len()).max().unwrap_or(0);
        let mut out = vec![0f32; plans.len()];
        let mut at = 0;
        while at < order.len() {
            cancel
                .check()
                .map_err(|e| EngineError::candle_or_cancel(e, cancel))?;
            let common = plans[order[at]].0;
            // Grow the batch with variants that start at the same position (so no row recomputes
            // a prefix it could have taken from the cache: measured, that costs more than
            // batching saves on 2 cores), within the batch size and the token budget.
            let mut end = at + 1;
            while end < order.len() && end - at < self.batch && plans[order[end]].0 == common {
                let i = order[end];
                let row = plans[i].0 - common + plans[i].1.len() + longest_term;
                if (end - at + 1) * row > BATCH_TOKENS {
                    break;
                }
                end += 1;
            }
            let batch = &order[at..end];
            let rows: Vec<Vec<u32>> = batch
                .iter()
                .map(|&i| {
                    let (from, kept) = &plans[i];
                    self.context[common..*from]
                        .iter()
                        .chain(kept)
                        .copied()
                        .collect()
                })
                .collect();
            let fs = self
                .score_rows(common, &rows)
                .map_err(|e| EngineError::candle_or_cancel(e, cancel))?;
            for (&i, f) in batch.iter().zip(fs) {
                out[i] = f;
            }
            self.passes += batch.len() * self.terms.len();
            at = end;
        }
        Ok(out)
    }

    /// F of each row of context tokens that follows the first `common` cached positions.
    fn score_rows(&self, common: usize, rows: &[Vec<u32>]) -> candle_core::Result<Vec<f32>> {
        Ok(self
            .term_log_probs(common, rows)?
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

    /// ln p of every term's tokens after each row: [row][term][token].
    fn term_log_probs(
        &self,
        common: usize,
        rows: &[Vec<u32>],
    ) -> candle_core::Result<Vec<Vec<Vec<f32>>>> {
        let mut prefix = self.cache.clone();
        prefix.truncate(common);
        let b = rows.len();
        let mut out = vec![Vec::with_capacity(self.terms.len()); b];
        for term in &self.terms {
            let n = term.ids.len();
            let t = rows.iter().map(|r| r.len()).max().unwrap_or(0) + n;
            let mut ids = Vec::with_capacity(b * t);
            let mut picks = Vec::with_capacity(b * n);
            for (r, row) in rows.iter().enumerate() {
                let start = ids.len();
                ids.extend(row.iter().chain(&term.ids));
                ids.resize(start + t, 0);
                picks.extend((0..n).map(|j| (r * t + row.len() - 1 + j) as u32));
            }
            let hidden = self.model.forward_after_prefix(&ids, b, t, &prefix)?;
            let hidden = hidden.index_select(&Tensor::new(picks.as_slice(), &Device::Cpu)?, 0)?;
            let targets: Vec<u32> = (0..b).flat_map(|_| term.ids.iter().copied()).collect();
            let (log_probs, _) = self.model.target_log_probs(&hidden, &targets, false)?;
            for (row, chunk) in out.iter_mut().zip(log_probs.chunks(n)) {
                row.push(chunk.to_vec());
            }
        }
        Ok(out)
    }
}

/// Tokens per batched forward pass of perturbed prompts.
const BATCH_TOKENS: usize = 2048;

/// Leave-one-out: Delta F = F(full) - F(without unit) for each unit (positive: the unit raises F).
pub fn leave_one_out(
    scorer: &mut DeletionScorer,
    units: &[Vec<usize>],
    progress: ProgressFn,
    cancel: &CancelToken,
) -> Result<Vec<f32>, EngineError> {
    let fs = scored_in_chunks(scorer, units, progress, cancel)?;
    Ok(fs.iter().map(|f| scorer.full - f).collect())
}

/// F for each deletion, a few batches at a time so progress keeps moving.
fn scored_in_chunks(
    scorer: &mut DeletionScorer,
    deletions: &[Vec<usize>],
    progress: ProgressFn,
    cancel: &CancelToken,
) -> Result<Vec<f32>, EngineError> {
    let total = deletions.len();
    let mut out = Vec::with_capacity(total);
    for chunk in deletions.chunks(scorer.batch.max(1) * 2) {
        progress(Progress::Perturbation {
            done: out.len(),
            total,
        });
        out.extend(scorer.without_many(chunk, cancel)?);
    }
    progress(Progress::Perturbation { done: total, total });
    Ok(out)
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
    let ys = scored_in_chunks(scorer, &deletions, progress, cancel)?;
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
