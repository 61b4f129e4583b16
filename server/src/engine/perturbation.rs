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

/// F of the context with some tokens deleted. Position 0 is never deleted: a causal model
/// needs a token to predict the target from.
pub struct DeletionScorer<'a> {
    model: &'a Model,
    context: Vec<u32>,
    terms: Vec<TargetTerm>,
    cache: KvCache,
    /// F with nothing deleted.
    pub full: f32,
    /// Forward passes run so far (one per term per variant).
    pub passes: usize,
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
            return bad(format!(
                "{} tokens exceed the model's context of {}",
                context.len() + longest,
                model.cfg.context_length
            ));
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
            cancel.check().map_err(EngineError::candle)?;
            model
                .forward_cached_hidden(chunk, &mut cache)
                .map_err(EngineError::candle)?;
        }
        let mut scorer = Self {
            model,
            context: context.to_vec(),
            terms,
            cache,
            full: 0.0,
            passes: 0,
        };
        scorer.full = scorer.without(&[], cancel)?;
        Ok(scorer)
    }

    pub fn context_len(&self) -> usize {
        self.context.len()
    }

    /// F with the context positions in `deleted` removed (any order, duplicates allowed).
    pub fn without(&mut self, deleted: &[usize], cancel: &CancelToken) -> Result<f32, EngineError> {
        let n = self.context.len();
        let mut gone = vec![false; n];
        for &p in deleted {
            if p > 0 && p < n {
                gone[p] = true;
            }
        }
        // Re-run from the last kept token before the first deletion: its hidden state predicts
        // the first target token when everything after it is deleted.
        let first = gone.iter().position(|&g| g).unwrap_or(n);
        let from = first - 1;
        let kept: Vec<u32> = (from..n)
            .filter(|&p| !gone[p])
            .map(|p| self.context[p])
            .collect();
        let mut f = 0f32;
        for term in &self.terms {
            cancel.check().map_err(EngineError::candle)?;
            let run = || -> candle_core::Result<f32> {
                let mut cache = self.cache.clone();
                cache.truncate(from)?;
                if from == 0 {
                    cache = KvCache::default();
                }
                let ids: Vec<u32> = kept.iter().chain(&term.ids).copied().collect();
                let hidden = self.model.forward_cached_hidden(&ids, &mut cache)?;
                let rows: Vec<u32> = (0..term.ids.len())
                    .map(|j| (kept.len() - 1 + j) as u32)
                    .collect();
                let rows = hidden.index_select(&Tensor::new(rows.as_slice(), &Device::Cpu)?, 0)?;
                let (log_probs, _) = self.model.target_log_probs(&rows, &term.ids)?;
                Ok(log_probs.iter().sum())
            };
            f += term.sign * run().map_err(EngineError::candle)?;
            self.passes += 1;
        }
        Ok(f)
    }
}

/// Leave-one-out: Delta F = F(full) - F(without unit) for each unit (positive: the unit raises F).
pub fn leave_one_out(
    scorer: &mut DeletionScorer,
    units: &[Vec<usize>],
    progress: ProgressFn,
    cancel: &CancelToken,
) -> Result<Vec<f32>, EngineError> {
    let mut out = Vec::with_capacity(units.len());
    for (i, unit) in units.iter().enumerate() {
        progress(Progress::Perturbation {
            done: i,
            total: units.len(),
        });
        out.push(scorer.full - scorer.without(unit, cancel)?);
    }
    progress(Progress::Perturbation {
        done: units.len(),
        total: units.len(),
    });
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
    let samples = opts.samples.max(4);
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let masks: Vec<Vec<bool>> = (0..samples)
        .map(|_| {
            (0..units.len())
                .map(|_| rng.random_bool(opts.keep.clamp(0.0, 1.0)))
                .collect()
        })
        .collect();
    let mut ys = Vec::with_capacity(samples);
    for (i, mask) in masks.iter().enumerate() {
        progress(Progress::Perturbation {
            done: i,
            total: samples,
        });
        let deleted: Vec<usize> = units
            .iter()
            .zip(mask)
            .filter(|(_, keep)| !**keep)
            .flat_map(|(u, _)| u.iter().copied())
            .collect();
        ys.push(scorer.without(&deleted, cancel)?);
    }
    progress(Progress::Perturbation {
        done: samples,
        total: samples,
    });
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
