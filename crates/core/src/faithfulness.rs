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
    /// Fractions of the segments to delete: the deletion curve. Fractions that round to the
    /// same number of segments make one point.
    pub fractions: Vec<f32>,
    /// Random deletions per size, when there are more possible deletions than `exact_up_to`.
    pub random_draws: usize,
    /// Up to this many possible deletions of a size, every one is tried (an exact baseline).
    pub exact_up_to: usize,
    pub seed: u64,
}

impl Default for FaithfulnessOptions {
    fn default() -> Self {
        Self {
            fractions: vec![0.1, 0.2, 0.3],
            random_draws: 32,
            exact_up_to: 40,
            seed: 0,
        }
    }
}

/// The answer a person wants from the deletion test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Verdict {
    /// Deleting what the map ranks first changes F more than almost any random deletion of as
    /// many segments, in the direction the map's signs say.
    #[serde(rename = "faithful")]
    Faithful,
    /// Random deletions do at least as well as the map's choice half of the time or more, or
    /// the map's choice moves F the wrong way.
    #[serde(rename = "not faithful")]
    NotFaithful,
    /// In between, or too few segments to tell.
    #[serde(rename = "inconclusive")]
    Inconclusive,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Faithful => "faithful",
            Verdict::NotFaithful => "not faithful",
            Verdict::Inconclusive => "inconclusive",
        }
    }
}

/// A map's choice is judged beyond chance when at most this share of random deletions does
/// as well (or it is the best of every possible deletion).
const BEYOND_CHANCE: f32 = 0.1;
/// And no better than chance when more than this share does as well.
const NO_BETTER_THAN_CHANCE: f32 = 0.5;

/// Deletions of `deleted` random segments: the yardstick for the map's choice.
#[derive(Debug, Clone, Serialize)]
pub struct RandomDeletions {
    /// F(full) − F(without them), one per deletion.
    pub drops: Vec<f32>,
    /// Every possible deletion of this size was tried (no sampling error).
    pub exact: bool,
    pub mean: f32,
    /// Sample standard deviation of the drops.
    pub sd: f32,
    /// Standard error of `mean` (0 when exact).
    pub standard_error: f32,
}

/// Deleting the map's first choices, against random deletions of as many segments.
#[derive(Debug, Clone, Serialize)]
pub struct DeletionTest {
    /// Segments deleted.
    pub deleted: usize,
    /// F(full) − F(without them): positive means deleting them lowers F.
    pub drop: f32,
    /// Share of random deletions of as many segments that move F at least as far the same way.
    pub as_good: f32,
    pub judgement: Verdict,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeletionPoint {
    /// The first fraction that deletes this many segments.
    pub fraction: f32,
    /// Segments deleted, out of `Faithfulness::segments`.
    pub deleted: usize,
    /// F(full) − F(without the top segments).
    pub top_drop: f32,
    /// The segments ranked highest (they should lower F when deleted).
    pub top: DeletionTest,
    /// Signed maps with negative segments: the most negative ones (they should raise F).
    pub bottom: Option<DeletionTest>,
    pub random: RandomDeletions,
    pub random_mean: f32,
    pub random_sd: f32,
}

/// Leave-one-out on the same segments, to set the map against (cheap: one forward pass per
/// segment on a cached prefix).
#[derive(Debug, Clone, Serialize)]
pub struct Agreement {
    /// F(full) − F(without segment i), in the order of the map's segments that hold a token.
    pub leave_one_out: Vec<f32>,
    /// Spearman rank correlation between the map's scores and leave-one-out's (its magnitude,
    /// for maps without sign).
    pub spearman: f32,
    /// Deleting leave-one-out's own top segments, judged like the map's.
    pub leave_one_out_test: DeletionTest,
}

/// Leave-one-out runs for agreement up to this many segments.
pub const AGREEMENT_MAX_SEGMENTS: usize = 40;

#[derive(Debug, Clone, Serialize)]
pub struct Faithfulness {
    pub level: String,
    pub method: String,
    pub segments: usize,
    pub objective: f32,
    pub points: Vec<DeletionPoint>,
    /// `faithful`, `not faithful` or `inconclusive`, judged at the middle fraction.
    pub verdict: Verdict,
    /// Why, in one line, with one sign convention ("lowers F by x" / "raises F by x").
    pub reason: String,
    /// Agreement with leave-one-out on the same segments; None for leave-one-out maps and
    /// above `AGREEMENT_MAX_SEGMENTS` segments.
    pub agreement: Option<Agreement>,
    /// `verdict: reason`, then the agreement with leave-one-out: the one line every front end
    /// shows (see `summary_line`).
    pub summary: String,
    pub seed: u64,
    pub seconds: f64,
}

impl Faithfulness {
    /// The line every front end shows (the `summary` field).
    pub fn summary(&self) -> String {
        self.summary.clone()
    }
}

/// The verdict and its reason, as one line for a person; then how the map agrees with
/// leave-one-out, and leave-one-out's own result when the map does not pass. `f_name`: "F" with
/// a contrast, else "log p(target)".
fn summary_line(
    verdict: Verdict,
    reason: &str,
    agreement: Option<&Agreement>,
    f_name: &str,
) -> String {
    let mut out = format!("{}: {}", verdict.name(), reason);
    if let Some(a) = agreement {
        out.push_str(&format!(
            ". Rank agreement with leave-one-out: ρ = {:.2}",
            a.spearman
        ));
        let t = &a.leave_one_out_test;
        if verdict != Verdict::Faithful && t.judgement == Verdict::Faithful {
            out.push_str(&format!(
                "; leave-one-out's top {} {} and passes this test: try method leave_one_out",
                t.deleted,
                effect(t.drop, f_name)
            ));
        }
    }
    out
}

/// Ranks (1-based, ties averaged).
fn ranks(xs: &[f32]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..xs.len()).collect();
    order.sort_by(|&a, &b| xs[a].total_cmp(&xs[b]));
    let mut out = vec![0f64; xs.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && xs[order[j + 1]] == xs[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            out[k] = rank;
        }
        i = j + 1;
    }
    out
}

/// Spearman's rank correlation (0 when either side is constant).
fn spearman(a: &[f32], b: &[f32]) -> f32 {
    let (ra, rb) = (ranks(a), ranks(b));
    let n = ra.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in ra.iter().zip(&rb) {
        sab += (x - ma) * (y - mb);
        saa += (x - ma).powi(2);
        sbb += (y - mb).powi(2);
    }
    if saa == 0.0 || sbb == 0.0 {
        0.0
    } else {
        (sab / (saa * sbb).sqrt()) as f32
    }
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

/// n choose k, saturating.
fn choose(n: usize, k: usize) -> usize {
    (0..k).fold(1usize, |acc, i| acc.saturating_mul(n - i) / (i + 1))
}

/// Every k-subset of 0..n, in lexicographic order.
fn subsets(n: usize, k: usize) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    let mut pick: Vec<usize> = (0..k).collect();
    loop {
        out.push(pick.clone());
        let Some(i) = (0..k).rev().find(|&i| pick[i] < n - k + i) else {
            return out;
        };
        pick[i] += 1;
        for j in i + 1..k {
            pick[j] = pick[j - 1] + 1;
        }
    }
}

/// How a deletion compares with random ones: `sign` 1 when it should lower F, -1 when it
/// should raise it.
fn judge(drop: f32, sign: f32, random: &RandomDeletions) -> DeletionTest {
    // Ties within float noise count as "as good".
    let tol = 1e-4 * (1.0 + drop.abs());
    let as_good_count = random
        .drops
        .iter()
        .filter(|&&d| sign * d >= sign * drop - tol)
        .count();
    let as_good = if random.exact {
        as_good_count as f32 / random.drops.len().max(1) as f32
    } else {
        // The map's own deletion is not among the draws: count it once.
        (as_good_count + 1) as f32 / (random.drops.len() + 1) as f32
    };
    let best_of_all = random.exact && as_good_count <= 1;
    let judgement = if sign * drop <= 0.0 || as_good > NO_BETTER_THAN_CHANCE {
        Verdict::NotFaithful
    } else if as_good <= BEYOND_CHANCE || best_of_all {
        Verdict::Faithful
    } else {
        Verdict::Inconclusive
    };
    DeletionTest {
        deleted: 0,
        drop,
        as_good,
        judgement,
    }
}

/// "lowers F by 1.20" or "raises F by 1.20".
fn effect(drop: f32, f_name: &str) -> String {
    if drop >= 0.0 {
        format!("lowers {f_name} by {drop:.2}")
    } else {
        format!("raises {f_name} by {:.2}", -drop)
    }
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
    let signed = analysis.method.is_signed();
    let negatives = candidates.iter().filter(|c| c.0 < 0.0).count();
    // One point per number of deleted segments.
    let mut sizes: Vec<(f32, usize)> = Vec::new();
    for &fraction in &opts.fractions {
        let k = ((fraction * n as f32).round() as usize).clamp(1, n - 1);
        if !sizes.iter().any(|&(_, s)| s == k) {
            sizes.push((fraction, k));
        }
    }
    let draws_for = |k: usize| {
        if choose(n, k) <= opts.exact_up_to {
            choose(n, k)
        } else {
            opts.random_draws
        }
    };
    let bottom_sizes = |k: usize| (signed && negatives > 0).then(|| k.min(negatives));
    let mut scorer = DeletionScorer::new(
        &engine.model,
        &analysis.context_ids(),
        analysis.terms(),
        cancel,
    )?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let mut all_sizes: Vec<usize> = sizes.iter().map(|s| s.1).collect();
    all_sizes.extend(sizes.iter().filter_map(|s| bottom_sizes(s.1)));
    all_sizes.sort_unstable();
    all_sizes.dedup();
    let with_agreement = n <= AGREEMENT_MAX_SEGMENTS
        && analysis.method != salience_engine::salience::Method::LeaveOneOut;
    let total: usize = all_sizes.iter().map(|&k| draws_for(k)).sum::<usize>()
        + 2 * sizes.len()
        + if with_agreement { n + 1 } else { 0 };
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
    let mut baselines: HashMap<usize, RandomDeletions> = HashMap::new();
    for &k in &all_sizes {
        let exact = choose(n, k) <= opts.exact_up_to;
        let picks: Vec<Vec<usize>> = if exact {
            subsets(n, k)
        } else {
            (0..opts.random_draws)
                .map(|_| rand::seq::index::sample(&mut rng, n, k).into_vec())
                .collect()
        };
        let mut drops = Vec::with_capacity(picks.len());
        for pick in picks {
            drops.push(drop_without(pick, &mut scorer)?);
        }
        let (mean, sd) = mean_sd(&drops);
        let standard_error = if exact {
            0.0
        } else {
            sd / (drops.len() as f32).sqrt()
        };
        baselines.insert(
            k,
            RandomDeletions {
                drops,
                exact,
                mean,
                sd,
                standard_error,
            },
        );
    }
    let mut points = Vec::new();
    for &(fraction, k) in &sizes {
        let top_drop = drop_without(by_score[..k].to_vec(), &mut scorer)?;
        let random = baselines[&k].clone();
        let top = DeletionTest {
            deleted: k,
            ..judge(top_drop, 1.0, &random)
        };
        let bottom = match bottom_sizes(k) {
            Some(kb) => {
                let drop = drop_without(by_score[n - kb..].to_vec(), &mut scorer)?;
                Some(DeletionTest {
                    deleted: kb,
                    ..judge(drop, -1.0, &baselines[&kb])
                })
            }
            None => None,
        };
        points.push(DeletionPoint {
            fraction,
            deleted: k,
            top_drop,
            top,
            bottom,
            random_mean: random.mean,
            random_sd: random.sd,
            random,
        });
    }
    let f_name = if analysis.contrast.is_some() {
        "F"
    } else {
        "log p(target)"
    };
    // Judged where the middle fraction lands.
    let middle = opts
        .fractions
        .get(opts.fractions.len() / 2)
        .copied()
        .unwrap_or(0.2);
    let k_mid = ((middle * n as f32).round() as usize).clamp(1, n - 1);
    let p = points
        .iter()
        .find(|p| p.deleted == k_mid)
        .expect("a point per size");
    let (verdict, reason) = explain(p, n, &plural(&result.name), f_name);
    let agreement = if with_agreement {
        let loo: Vec<f32> = (0..n)
            .map(|i| drop_without(vec![i], &mut scorer))
            .collect::<Result<_, _>>()?;
        let scores: Vec<f32> = candidates.iter().map(|c| c.0).collect();
        let importance: Vec<f32> = if signed {
            loo.clone()
        } else {
            loo.iter().map(|d| d.abs()).collect()
        };
        let mut by_loo: Vec<usize> = (0..n).collect();
        by_loo.sort_by(|&a, &b| loo[b].total_cmp(&loo[a]));
        let drop = drop_without(by_loo[..k_mid].to_vec(), &mut scorer)?;
        Some(Agreement {
            spearman: spearman(&scores, &importance),
            leave_one_out_test: DeletionTest {
                deleted: k_mid,
                ..judge(drop, 1.0, &baselines[&k_mid])
            },
            leave_one_out: loo,
        })
    } else {
        None
    };
    progress(Progress::Perturbation { done: total, total });
    Ok(Faithfulness {
        summary: summary_line(verdict, &reason, agreement.as_ref(), f_name),
        level: result.name.clone(),
        method: analysis.method.name().to_string(),
        segments: n,
        objective: scorer.full,
        points,
        verdict,
        reason,
        agreement,
        seed: opts.seed,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The verdict at one point and its reason in one line.
fn explain(p: &DeletionPoint, n: usize, segments: &str, f_name: &str) -> (Verdict, String) {
    let tried = |r: &RandomDeletions, k: usize| {
        if r.exact {
            format!("all {} deletions of {k}", r.drops.len())
        } else {
            format!("{} random deletions of {k}", r.drops.len())
        }
    };
    let share = |t: &DeletionTest| format!("{:.0} %", 100.0 * t.as_good);
    let wrong_way = |t: &DeletionTest, sign: f32, should: &str| {
        if sign * t.drop <= 0.0 {
            format!(" (they should {should} it)")
        } else {
            String::new()
        }
    };
    let mut parts = vec![format!(
        "deleting the top {} of {n} {segments} {}{}; {} of {} lower it at least as much (their mean {})",
        p.deleted,
        effect(p.top.drop, f_name),
        wrong_way(&p.top, 1.0, "lower"),
        share(&p.top),
        tried(&p.random, p.deleted),
        effect(p.random.mean, f_name),
    )];
    let mut judgements = vec![p.top.judgement];
    if let Some(b) = &p.bottom {
        parts.push(format!(
            "deleting the {} most negative {}{}; {} of deletions of {} raise it at least as much",
            b.deleted,
            effect(b.drop, "it"),
            wrong_way(b, -1.0, "raise"),
            share(b),
            b.deleted,
        ));
        judgements.push(b.judgement);
    }
    let verdict = if judgements.contains(&Verdict::NotFaithful) {
        Verdict::NotFaithful
    } else if judgements.iter().all(|j| *j == Verdict::Faithful) {
        Verdict::Faithful
    } else {
        Verdict::Inconclusive
    };
    (verdict, parts.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subsets_are_every_choice_once() {
        let all = subsets(5, 2);
        assert_eq!(all.len(), choose(5, 2));
        assert_eq!(all.first().unwrap(), &vec![0, 1]);
        assert_eq!(all.last().unwrap(), &vec![3, 4]);
        let mut sorted = all.clone();
        sorted.dedup();
        assert_eq!(sorted.len(), 10);
        assert_eq!(subsets(4, 4), vec![vec![0, 1, 2, 3]]);
        assert_eq!(choose(30, 3), 4060);
    }

    fn random(drops: Vec<f32>, exact: bool) -> RandomDeletions {
        let (mean, sd) = mean_sd(&drops);
        RandomDeletions {
            drops,
            exact,
            mean,
            sd,
            standard_error: 0.0,
        }
    }

    #[test]
    fn judgements_follow_the_share_of_random_deletions_that_do_as_well() {
        let r = random((0..20).map(|i| i as f32 / 10.0).collect(), false);
        // Beyond every random deletion: faithful.
        assert_eq!(judge(5.0, 1.0, &r).judgement, Verdict::Faithful);
        // In the middle of them: not faithful.
        assert_eq!(judge(0.5, 1.0, &r).judgement, Verdict::NotFaithful);
        // Better than most, not beyond chance: inconclusive.
        assert_eq!(judge(1.6, 1.0, &r).judgement, Verdict::Inconclusive);
        // The wrong direction is never faithful, however far.
        assert_eq!(judge(-5.0, 1.0, &r).judgement, Verdict::NotFaithful);
        // Negative segments should raise F when deleted.
        let r = random(vec![-3.0, -4.0, -5.0, 0.1], true);
        assert_eq!(
            judge(-3.0, -1.0, &r).judgement,
            Verdict::NotFaithful,
            "most deletions raise F as much"
        );
        let r = random(vec![-3.0, 0.0, 0.2, 0.3], true);
        assert_eq!(
            judge(-3.0, -1.0, &r).judgement,
            Verdict::Faithful,
            "exact: the best of every possible deletion"
        );
    }

    #[test]
    fn spearman_ranks_with_ties() {
        assert!((spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]) - 1.0).abs() < 1e-6);
        assert!((spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]) + 1.0).abs() < 1e-6);
        // Monotone but not linear: still 1.
        assert!((spearman(&[1.0, 2.0, 3.0, 4.0], &[1.0, 10.0, 100.0, 1000.0]) - 1.0).abs() < 1e-6);
        assert_eq!(ranks(&[5.0, 1.0, 5.0]), vec![2.5, 1.0, 2.5]);
        assert_eq!(spearman(&[1.0, 1.0], &[1.0, 2.0]), 0.0);
        // A hand-computed case: ranks (1,2,3,4) and (2,1,4,3): 1 - 6·4/(4·15) = 0.6.
        assert!((spearman(&[1.0, 2.0, 3.0, 4.0], &[2.0, 1.0, 4.0, 3.0]) - 0.6).abs() < 1e-6);
    }

    #[test]
    fn one_sign_convention() {
        assert_eq!(effect(1.234, "F"), "lowers F by 1.23");
        assert_eq!(effect(-0.5, "F"), "raises F by 0.50");
    }
}
