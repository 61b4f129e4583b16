//! Does a salience map deserve trust? The deletion test: remove the segments the map ranks
//! highest and, separately, as many random segments, and compare how much F drops. A map that
//! points at what the model uses loses far more F to its top segments than to random ones.

use std::collections::HashMap;
use std::time::Instant;

use rand::SeedableRng;
use serde::Serialize;

use crate::analysis::Analysis;
use crate::segments::Segmentation;
use salience_engine::perturbation::DeletionScorer;
use salience_engine::{CancelToken, Engine, EngineError, Progress, ProgressFn};

#[derive(Debug, Clone, PartialEq)]
pub struct FaithfulnessOptions {
    /// Fractions of the segments to delete: the deletion curve.
    pub fractions: Vec<f32>,
    /// Random deletions per fraction.
    pub random_draws: usize,
    pub seed: u64,
}

impl Default for FaithfulnessOptions {
    fn default() -> Self {
        Self {
            fractions: vec![0.1, 0.2, 0.3],
            random_draws: 5,
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DeletionPoint {
    pub fraction: f32,
    /// Segments deleted, out of `Faithfulness::segments`.
    pub deleted: usize,
    /// F(full) - F(without the top segments).
    pub top_drop: f32,
    pub random_drops: Vec<f32>,
    pub random_mean: f32,
    /// Sample standard deviation of the random drops.
    pub random_sd: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Faithfulness {
    pub level: String,
    pub method: String,
    pub segments: usize,
    pub objective: f32,
    pub points: Vec<DeletionPoint>,
    /// One line for a person: the middle point of the curve against random deletion.
    pub verdict: String,
    pub seed: u64,
    pub seconds: f64,
}

fn plural(level: &str) -> String {
    match level {
        "sentence" | "word" | "token" | "line" | "paragraph" | "block" => format!("{level}s"),
        other => format!("{other} segments"),
    }
}

fn mean_sd(xs: &[f32]) -> (f32, f32) {
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let n = xs.len() as f32;
    let mean = xs.iter().sum::<f32>() / n;
    let var = if xs.len() > 1 {
        xs.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// Runs the deletion test for the map of `analysis` at `level`.
pub fn check(
    engine: &Engine,
    analysis: &Analysis,
    level: &Segmentation,
    opts: &FaithfulnessOptions,
    progress: ProgressFn,
    cancel: &CancelToken,
) -> Result<Faithfulness, EngineError> {
    let started = Instant::now();
    let result = analysis.level(level, 1.0);
    let (_, units) = analysis.segment_units(level);
    // Segments that hold a token can be deleted; their scores rank them.
    let candidates: Vec<(f32, &Vec<usize>)> = result
        .segments
        .iter()
        .zip(&units)
        .filter(|(_, u)| !u.is_empty())
        .map(|(s, u)| (s.score, u))
        .collect();
    let n = candidates.len();
    if n < 2 {
        return Err(EngineError::InvalidInput(format!(
            "the deletion test needs at least two {} before the target",
            plural(&result.name)
        )));
    }
    let mut by_score: Vec<usize> = (0..n).collect();
    by_score.sort_by(|&a, &b| candidates[b].0.total_cmp(&candidates[a].0));
    let mut scorer = DeletionScorer::new(
        &engine.model,
        &analysis.context_ids(),
        analysis.terms(),
        cancel,
    )?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let total = opts.fractions.len() * (1 + opts.random_draws);
    let mut done = 0;
    let mut memo: HashMap<Vec<usize>, f32> = HashMap::new();
    let mut drop_without =
        |mut chosen: Vec<usize>, scorer: &mut DeletionScorer| -> Result<f32, EngineError> {
            chosen.sort_unstable();
            progress(Progress::Perturbation { done, total });
            done += 1;
            if let Some(d) = memo.get(&chosen) {
                return Ok(*d);
            }
            let deleted: Vec<usize> = chosen
                .iter()
                .flat_map(|&i| candidates[i].1.iter().copied())
                .collect();
            let d = scorer.full - scorer.without(&deleted, cancel)?;
            memo.insert(chosen, d);
            Ok(d)
        };
    let mut points = Vec::new();
    for &fraction in &opts.fractions {
        let k = ((fraction * n as f32).round() as usize).clamp(1, n);
        let top_drop = drop_without(by_score[..k].to_vec(), &mut scorer)?;
        let mut random_drops = Vec::with_capacity(opts.random_draws);
        for _ in 0..opts.random_draws {
            let pick = rand::seq::index::sample(&mut rng, n, k).into_vec();
            random_drops.push(drop_without(pick, &mut scorer)?);
        }
        let (random_mean, random_sd) = mean_sd(&random_drops);
        points.push(DeletionPoint {
            fraction,
            deleted: k,
            top_drop,
            random_drops,
            random_mean,
            random_sd,
        });
    }
    progress(Progress::Perturbation { done: total, total });
    let f_name = if analysis.contrast.is_some() {
        "F"
    } else {
        "log p(target)"
    };
    let verdict = points
        .get(points.len() / 2)
        .map(|p| {
            let verb = if p.top_drop >= 0.0 { "lowers" } else { "raises" };
            format!(
                "removing the top {:.0} % of {} ({} of {n}) {verb} {f_name} by {:.2}; random {:.0} %: {:.2} ± {:.2}",
                p.fraction * 100.0,
                plural(&result.name),
                p.deleted,
                p.top_drop.abs(),
                p.fraction * 100.0,
                p.random_mean,
                p.random_sd
            )
        })
        .unwrap_or_default();
    Ok(Faithfulness {
        level: result.name.clone(),
        method: analysis.method.name().to_string(),
        segments: n,
        objective: scorer.full,
        points,
        verdict,
        seed: opts.seed,
        seconds: started.elapsed().as_secs_f64(),
    })
}
