//! A sparse linear surrogate of F from ablation masks: Lasso on standardized masks, fitted by
//! coordinate descent, with the penalty chosen by cross-validation. A few dozen masks and
//! units make this a tiny problem, so it is solved directly rather than through a crate.

use rand::seq::SliceRandom;
use rand::SeedableRng;

#[derive(Debug, Clone)]
pub struct SurrogateFit {
    /// Per unit: the change in F from keeping it (mask units, not standardized).
    pub weights: Vec<f32>,
    pub intercept: f32,
    /// R^2 on the held-out masks, of a fit on the others.
    pub held_out_r2: f32,
    pub held_out: usize,
    /// The chosen penalty, relative to the smallest one that zeroes every weight.
    pub lambda: f32,
}

struct Standardized {
    x: Vec<Vec<f64>>,
    mean: Vec<f64>,
    sd: Vec<f64>,
    y_mean: f64,
    y: Vec<f64>,
}

fn standardize(masks: &[&Vec<bool>], ys: &[f64]) -> Standardized {
    let n = masks.len() as f64;
    let d = masks.first().map_or(0, |m| m.len());
    let mut mean = vec![0.0; d];
    let mut sd = vec![0.0; d];
    for j in 0..d {
        mean[j] = masks.iter().filter(|m| m[j]).count() as f64 / n;
        sd[j] = (mean[j] * (1.0 - mean[j])).sqrt();
    }
    let x = masks
        .iter()
        .map(|m| {
            (0..d)
                .map(|j| {
                    if sd[j] > 0.0 {
                        (f64::from(u8::from(m[j])) - mean[j]) / sd[j]
                    } else {
                        0.0
                    }
                })
                .collect()
        })
        .collect();
    let y_mean = ys.iter().sum::<f64>() / n;
    Standardized {
        x,
        mean,
        sd,
        y_mean,
        y: ys.iter().map(|y| y - y_mean).collect(),
    }
}

/// Minimizes 1/(2n) ||y - Xw||^2 + lambda ||w||_1 over standardized columns.
fn lasso(s: &Standardized, lambda: f64) -> Vec<f64> {
    let n = s.x.len() as f64;
    let d = s.mean.len();
    let mut w = vec![0.0; d];
    let mut residual = s.y.clone();
    let col_sq: Vec<f64> = (0..d)
        .map(|j| s.x.iter().map(|r| r[j] * r[j]).sum::<f64>() / n)
        .collect();
    for _ in 0..1000 {
        let mut biggest_step = 0f64;
        for j in 0..d {
            if col_sq[j] == 0.0 {
                continue;
            }
            let rho =
                s.x.iter()
                    .zip(&residual)
                    .map(|(r, e)| r[j] * (e + r[j] * w[j]))
                    .sum::<f64>()
                    / n;
            let new = rho.signum() * (rho.abs() - lambda).max(0.0) / col_sq[j];
            let step = new - w[j];
            if step != 0.0 {
                for (r, e) in s.x.iter().zip(residual.iter_mut()) {
                    *e -= r[j] * step;
                }
                w[j] = new;
                biggest_step = biggest_step.max(step.abs());
            }
        }
        if biggest_step < 1e-9 {
            break;
        }
    }
    w
}

/// Predictions of a fit on `train` for `rows`.
fn predict(train: &Standardized, w: &[f64], rows: &[&Vec<bool>]) -> Vec<f64> {
    rows.iter()
        .map(|m| {
            train.y_mean
                + (0..w.len())
                    .filter(|&j| train.sd[j] > 0.0)
                    .map(|j| w[j] * (f64::from(u8::from(m[j])) - train.mean[j]) / train.sd[j])
                    .sum::<f64>()
        })
        .collect()
}

fn r2(y: &[f64], pred: &[f64]) -> f64 {
    let mean = y.iter().sum::<f64>() / y.len() as f64;
    let total: f64 = y.iter().map(|v| (v - mean).powi(2)).sum();
    let resid: f64 = y.iter().zip(pred).map(|(v, p)| (v - p).powi(2)).sum();
    if total > 0.0 {
        1.0 - resid / total
    } else if resid == 0.0 {
        1.0
    } else {
        0.0
    }
}

fn lambda_max(s: &Standardized) -> f64 {
    let n = s.x.len() as f64;
    (0..s.mean.len())
        .map(|j| (s.x.iter().zip(&s.y).map(|(r, y)| r[j] * y).sum::<f64>() / n).abs())
        .fold(0.0, f64::max)
}

const PENALTIES: [f64; 9] = [0.3, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001, 0.0];

/// The penalty (relative to lambda_max) with the best 4-fold cross-validated error.
fn choose_penalty(masks: &[&Vec<bool>], ys: &[f64]) -> f64 {
    let folds = 4.min(masks.len());
    if folds < 2 {
        return 0.01;
    }
    let mut best = (f64::INFINITY, 0.01);
    for &rel in &PENALTIES {
        let mut err = 0.0;
        for f in 0..folds {
            let pick = |keep: bool| -> (Vec<&Vec<bool>>, Vec<f64>) {
                masks
                    .iter()
                    .zip(ys)
                    .enumerate()
                    .filter(|(i, _)| (i % folds == f) != keep)
                    .map(|(_, (m, y))| (*m, *y))
                    .unzip()
            };
            let (train_m, train_y) = pick(true);
            let (test_m, test_y) = pick(false);
            let s = standardize(&train_m, &train_y);
            let w = lasso(&s, rel * lambda_max(&s));
            err += predict(&s, &w, &test_m)
                .iter()
                .zip(&test_y)
                .map(|(p, y)| (p - y).powi(2))
                .sum::<f64>();
        }
        if err < best.0 - 1e-12 {
            best = (err, rel);
        }
    }
    best.1
}

/// Fits F ~ intercept + sum_j w_j [unit j kept]. A quarter of the masks (at least one) is held
/// out to report R^2; the weights come from a fit on all masks with the same penalty.
pub fn fit(masks: &[Vec<bool>], ys: &[f32], seed: u64) -> SurrogateFit {
    let ys: Vec<f64> = ys.iter().map(|&y| f64::from(y)).collect();
    let mut order: Vec<usize> = (0..masks.len()).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed));
    let held = (masks.len() / 4).max(1).min(masks.len().saturating_sub(2));
    let (test_idx, train_idx) = order.split_at(held);
    let rows = |idx: &[usize]| -> (Vec<&Vec<bool>>, Vec<f64>) {
        idx.iter().map(|&i| (&masks[i], ys[i])).unzip()
    };
    let (train_m, train_y) = rows(train_idx);
    let (test_m, test_y) = rows(test_idx);
    let rel = choose_penalty(&train_m, &train_y);
    let s_train = standardize(&train_m, &train_y);
    let w_train = lasso(&s_train, rel * lambda_max(&s_train));
    let held_out_r2 = if test_m.is_empty() {
        f64::NAN
    } else {
        r2(&test_y, &predict(&s_train, &w_train, &test_m))
    };
    let (all_m, all_y) = rows(&order);
    let s = standardize(&all_m, &all_y);
    let w = lasso(&s, rel * lambda_max(&s));
    let weights: Vec<f64> = w
        .iter()
        .zip(&s.sd)
        .map(|(w, sd)| if *sd > 0.0 { w / sd } else { 0.0 })
        .collect();
    let intercept = s.y_mean - weights.iter().zip(&s.mean).map(|(w, m)| w * m).sum::<f64>();
    SurrogateFit {
        weights: weights.iter().map(|&w| w as f32).collect(),
        intercept: intercept as f32,
        held_out_r2: held_out_r2 as f32,
        held_out: test_m.len(),
        lambda: rel as f32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn recovers_planted_linear_effects() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let planted = [3.0, 0.0, -1.5, 0.0, 0.0, 0.8, 0.0, 0.0];
        let masks: Vec<Vec<bool>> = (0..64)
            .map(|_| (0..planted.len()).map(|_| rng.random_bool(0.5)).collect())
            .collect();
        let ys: Vec<f32> = masks
            .iter()
            .map(|m| {
                let signal: f64 = m
                    .iter()
                    .zip(&planted)
                    .map(|(k, w)| if *k { *w } else { 0.0 })
                    .sum();
                (-2.0 + signal + rng.random_range(-0.05..0.05)) as f32
            })
            .collect();
        let fit = fit(&masks, &ys, 0);
        for (w, p) in fit.weights.iter().zip(&planted) {
            assert!(
                (f64::from(*w) - p).abs() < 0.1,
                "{:?} vs {planted:?}",
                fit.weights
            );
        }
        assert!(
            (fit.intercept + 2.0).abs() < 0.1,
            "intercept {}",
            fit.intercept
        );
        assert!(fit.held_out_r2 > 0.98, "held-out R^2 {}", fit.held_out_r2);
    }

    #[test]
    fn pure_noise_has_no_held_out_fit() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let masks: Vec<Vec<bool>> = (0..64)
            .map(|_| (0..6).map(|_| rng.random_bool(0.5)).collect())
            .collect();
        let ys: Vec<f32> = (0..64).map(|_| rng.random_range(-1.0..1.0)).collect();
        let fit = fit(&masks, &ys, 0);
        assert!(fit.held_out_r2 < 0.3, "R^2 {}", fit.held_out_r2);
    }
}
