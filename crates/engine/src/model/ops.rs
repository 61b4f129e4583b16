//! The MLP's activation, and the plain compositions of candle ops that the fused kernels
//! (`kernels.rs`, `attention.rs`, `head.rs`) are tested against.

#[cfg(test)]
use candle_core::{Device, Result, Tensor, D};

/// dx for y = rms_norm(x, w) given dy: the plain composition.
#[cfg(test)]
pub fn rms_norm_backward(x: &Tensor, w: &Tensor, eps: f32, dy: &Tensor) -> Result<Tensor> {
    let n = x.dim(D::Minus1)? as f64;
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps as f64)?
        .sqrt()?
        .recip()?;
    let g = dy.broadcast_mul(w)?;
    let gx = (g.mul(x)?.sum_keepdim(D::Minus1)? / n)?;
    let r3 = r.powf(3.0)?;
    let a = g.broadcast_mul(&r)?;
    let b = x.broadcast_mul(&r3.mul(&gx)?)?;
    a - b
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    GeluTanh,
}

/// The plain activation and its derivative (the gated kernels compute both fused).
#[cfg(test)]
impl Activation {
    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Silu => x.silu(),
            Activation::GeluTanh => x.gelu(),
        }
    }

    pub fn derivative(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Silu => {
                // s (1 + x (1 - s))
                let s = (x.neg()?.exp()? + 1.0)?.recip()?;
                let one_minus = s.affine(-1.0, 1.0)?;
                s.mul(&(x.mul(&one_minus)? + 1.0)?)
            }
            Activation::GeluTanh => {
                // 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 k x^2), t = tanh(c (x + k x^3))
                let c = (2.0f64 / std::f64::consts::PI).sqrt();
                let k = 0.044715f64;
                let x2 = x.sqr()?;
                let inner = (x.mul(&(x2.affine(k, 1.0))?)? * c)?;
                let t = inner.tanh()?;
                let left = (t.affine(0.5, 0.5))?;
                let sech2 = t.sqr()?.affine(-1.0, 1.0)?;
                let right = x
                    .mul(&sech2)?
                    .mul(&x2.affine(3.0 * k * c * 0.5, c * 0.5)?)?;
                left + right
            }
        }
    }
}

/// Additive attention mask for grouped queries (the plain computation that tests compare the
/// blocked attention with) laid out as `(group * tq, tk)`: row `r` is the
/// query at position `offset + r % tq`; keys after it (or farther than `window`) are masked.
#[cfg(test)]
pub fn attention_mask(
    group: usize,
    tq: usize,
    tk: usize,
    offset: usize,
    window: Option<usize>,
) -> Result<Tensor> {
    let mut data = vec![0f32; group * tq * tk];
    for g in 0..group {
        for i in 0..tq {
            let qpos = offset + i;
            let row = &mut data[(g * tq + i) * tk..(g * tq + i + 1) * tk];
            for (j, v) in row.iter_mut().enumerate() {
                let visible = j <= qpos && window.is_none_or(|w| qpos - j < w);
                if !visible {
                    *v = f32::NEG_INFINITY;
                }
            }
        }
    }
    Tensor::from_vec(data, (group * tq, tk), &Device::Cpu)
}

/// log softmax over the last dimension, computed in f32 with max subtraction (the plain
/// computation that tests compare the fused kernel with).
#[cfg(test)]
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::rms_norm;
    use candle_core::DType;

    fn numeric_grad(f: impl Fn(&Tensor) -> f64, x: &Tensor, dy: &Tensor) -> Vec<f32> {
        // d/dx_i of sum(f(x) * dy) by central differences in f64 on an f32 model.
        let base: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let _ = dy;
        let h = 1e-2f32;
        (0..base.len())
            .map(|i| {
                let mut p = base.clone();
                p[i] += h;
                let mut m = base.clone();
                m[i] -= h;
                let tp = Tensor::from_vec(p, x.shape(), &Device::Cpu).unwrap();
                let tm = Tensor::from_vec(m, x.shape(), &Device::Cpu).unwrap();
                ((f(&tp) - f(&tm)) / (2.0 * h as f64)) as f32
            })
            .collect()
    }

    fn dot(a: &Tensor, b: &Tensor) -> f64 {
        a.mul(b)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    }

    fn assert_close(a: &[f32], b: &[f32], tol: f32) {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "index {i}: {x} vs {y}"
            );
        }
    }

    #[test]
    fn rms_norm_backward_matches_finite_differences() {
        let x = Tensor::randn(0f32, 1.0, (3, 8), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1.0, 8, &Device::Cpu).unwrap();
        let dy = Tensor::randn(0f32, 1.0, (3, 8), &Device::Cpu).unwrap();
        let analytic: Vec<f32> = rms_norm_backward(&x, &w, 1e-5, &dy)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let numeric = numeric_grad(|x| dot(&rms_norm(x, &w, 1e-5).unwrap(), &dy), &x, &dy);
        assert_close(&analytic, &numeric, 2e-2);
    }

    #[test]
    fn activation_derivatives_match_finite_differences() {
        for act in [Activation::Silu, Activation::GeluTanh] {
            let x = Tensor::randn(0f32, 2.0, 16, &Device::Cpu).unwrap();
            let ones = Tensor::ones(16, DType::F32, &Device::Cpu).unwrap();
            let analytic: Vec<f32> = act.derivative(&x).unwrap().to_vec1().unwrap();
            let numeric = numeric_grad(
                |x| {
                    // Each output depends only on its own input: probe one element at a time.
                    act.forward(x)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap() as f64
                },
                &x,
                &ones,
            );
            assert_close(&analytic, &numeric, 2e-2);
        }
    }

    #[test]
    fn mask_hides_future_and_far_keys() {
        let m: Vec<Vec<f32>> = attention_mask(1, 3, 3, 0, Some(2))
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(m[0][0], 0.0);
        assert!(m[0][1].is_infinite());
        assert_eq!(m[2][1], 0.0);
        assert!(m[2][0].is_infinite(), "outside the window of 2");
    }
}
