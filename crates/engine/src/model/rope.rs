//! Rotary position embeddings: plain, partial (Phi), and the scalings of real checkpoints
//! (linear, Llama 3, longrope, and GGUF's per-frequency factors).

use candle_core::{Device, Result, Tensor};

use super::kernels::{par_filled, with_slice};

#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    /// Rotated dimensions at the start of each head; the rest pass through (Phi's partial
    /// rotary factor).
    pub dims: usize,
    /// One inverse frequency per pair of rotated dimensions.
    pub inv_freq: Vec<f64>,
    /// cos and sin are multiplied by this (longrope's attention factor).
    pub magnitude: f64,
    /// Longrope: sequences longer than `.0` positions use these frequencies instead.
    pub long: Option<(usize, Vec<f64>)>,
}

/// How a checkpoint rescales its rotary frequencies.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_context: f64,
    },
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_context: usize,
        attention_factor: f64,
    },
    /// GGUF's `rope_freqs` tensor: each frequency is divided by its factor.
    FreqFactors(Vec<f64>),
}

impl Rope {
    pub fn plain(dims: usize, base: f64) -> Self {
        let inv_freq = (0..dims / 2)
            .map(|i| 1.0 / base.powf(2.0 * i as f64 / dims as f64))
            .collect();
        Self {
            dims,
            inv_freq,
            magnitude: 1.0,
            long: None,
        }
    }

    pub fn scaled(mut self, scaling: &RopeScaling) -> std::result::Result<Self, String> {
        let pairs = self.inv_freq.len();
        let divide = |inv: &[f64], factors: &[f64], what: &str| {
            if factors.len() != pairs {
                return Err(format!(
                    "{what} has {} factors for {pairs} rotary frequencies",
                    factors.len()
                ));
            }
            Ok(inv
                .iter()
                .zip(factors)
                .map(|(f, s)| f / s)
                .collect::<Vec<_>>())
        };
        match scaling {
            RopeScaling::Linear { factor } => {
                self.inv_freq.iter_mut().for_each(|f| *f /= factor);
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_context,
            } => {
                let low_wavelen = original_context / low_freq_factor;
                let high_wavelen = original_context / high_freq_factor;
                for f in self.inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (original_context / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_context,
                attention_factor,
            } => {
                let long = divide(&self.inv_freq, long_factor, "long_factor")?;
                self.inv_freq = divide(&self.inv_freq, short_factor, "short_factor")?;
                self.long = Some((*original_context, long));
                self.magnitude = *attention_factor;
            }
            RopeScaling::FreqFactors(factors) => {
                self.inv_freq = divide(&self.inv_freq, factors, "rope_freqs")?;
            }
        }
        Ok(self)
    }

    /// cos and sin tables (len, dims / 2) for positions offset..offset + len.
    pub fn tables(&self, offset: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let inv_freq = match &self.long {
            Some((limit, long)) if offset + len > *limit => long,
            _ => &self.inv_freq,
        };
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in offset..offset + len {
            for f in inv_freq {
                let angle = p as f64 * f;
                cos.push((angle.cos() * self.magnitude) as f32);
                sin.push((angle.sin() * self.magnitude) as f32);
            }
        }
        Ok((
            Tensor::from_vec(cos, (len, half), &Device::Cpu)?,
            Tensor::from_vec(sin, (len, half), &Device::Cpu)?,
        ))
    }

    /// Rotates the first `dims` of each head of x (b, heads, t, head_dim), rotate-half layout,
    /// by the angles of `cos` and `sin` (t, dims / 2).
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        self.rotate(x, cos, sin, false)
    }

    /// The transpose of `apply` (its input gradient): the rotation by the opposite angle,
    /// scaled by the same magnitude, from the same tables.
    pub fn apply_transposed(&self, dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        self.rotate(dy, cos, sin, true)
    }

    /// One pass over x, rows split among the pool's threads. It replaced candle's `rope`,
    /// which zeroed its output on one thread, split the work by head (9 tasks for 2 threads)
    /// and needed a negated copy of `sin` and, for partial rotation, two more copies: 3 % of a
    /// salience pass at 300 tokens. Same arithmetic, so the same bits.
    fn rotate(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, transposed: bool) -> Result<Tensor> {
        let (b, h, t, hd) = x.dims4()?;
        let half = self.dims / 2;
        if self.dims > hd || cos.dims2()? != (t, half) || sin.dims2()? != (t, half) {
            candle_core::bail!(
                "rope: {:?} against tables {:?} {:?} for {} rotated dimensions",
                x.shape(),
                cos.shape(),
                sin.shape(),
                self.dims
            )
        }
        let x = x.contiguous()?;
        // Rows per task: a few dozen tasks at the sizes of a salience pass.
        const ROWS: usize = 16;
        let out = with_slice(&x, |x| {
            with_slice(cos, |cos| {
                with_slice(sin, |sin| {
                    Ok(par_filled(b * h * t * hd, ROWS * hd, |chunk, out| {
                        let first = chunk * ROWS;
                        for (r, y) in out.chunks_exact_mut(hd).enumerate() {
                            let row = first + r;
                            let x = &x[row * hd..(row + 1) * hd];
                            let p = row % t;
                            let (c, s) = (&cos[p * half..][..half], &sin[p * half..][..half]);
                            rotate_row(x, y, c, s, half, transposed);
                        }
                    }))
                })
            })
        })?;
        Tensor::from_vec(out, (b, h, t, hd), &Device::Cpu)
    }
}

/// y = x rotated in pairs (i, i + half) by the angles of `c` and `s` (their opposite when
/// `transposed`); values past `2 * half` pass through.
fn rotate_row(x: &[f32], y: &mut [f32], c: &[f32], s: &[f32], half: usize, transposed: bool) {
    let (x1, rest) = x.split_at(half);
    let (x2, tail) = rest.split_at(half);
    let (y1, rest) = y.split_at_mut(half);
    let (y2, y_tail) = rest.split_at_mut(half);
    if transposed {
        for i in 0..half {
            // As with a table of -sin: x1 c - x2 (-s) and x2 c + x1 (-s), the same bits.
            y1[i] = x1[i] * c[i] + x2[i] * s[i];
            y2[i] = x2[i] * c[i] - x1[i] * s[i];
        }
    } else {
        for i in 0..half {
            y1[i] = x1[i] * c[i] - x2[i] * s[i];
            y2[i] = x1[i] * s[i] + x2[i] * c[i];
        }
    }
    y_tail.copy_from_slice(tail);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::tests::same_bits;

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let plain = Rope::plain(64, 500_000.0);
        let scaled = plain
            .clone()
            .scaled(&RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_context: 8192.0,
            })
            .unwrap();
        assert_eq!(scaled.inv_freq[0], plain.inv_freq[0]);
        let last = plain.inv_freq.len() - 1;
        assert!((scaled.inv_freq[last] - plain.inv_freq[last] / 8.0).abs() < 1e-15);
        // In between, a smooth mix: never above the plain frequency, never below an eighth.
        for (s, p) in scaled.inv_freq.iter().zip(&plain.inv_freq) {
            assert!(*s <= *p && *s >= p / 8.0 - 1e-18);
        }
    }

    #[test]
    fn longrope_switches_factors_past_the_original_context_and_scales() {
        let rope = Rope::plain(4, 10_000.0)
            .scaled(&RopeScaling::LongRope {
                short_factor: vec![1.0, 2.0],
                long_factor: vec![4.0, 8.0],
                original_context: 16,
                attention_factor: 1.5,
            })
            .unwrap();
        let plain = Rope::plain(4, 10_000.0);
        assert_eq!(
            rope.inv_freq,
            vec![plain.inv_freq[0], plain.inv_freq[1] / 2.0]
        );
        let angle = |table: &Tensor, row: usize, col: usize| -> f32 {
            table.to_vec2::<f32>().unwrap()[row][col]
        };
        // Short: position 3 of a 16-position sequence; long: the same position of 17.
        let (cos_s, _) = rope.tables(0, 16).unwrap();
        let (cos_l, _) = rope.tables(0, 17).unwrap();
        let want_s = (3.0 * plain.inv_freq[1] / 2.0).cos() * 1.5;
        let want_l = (3.0 * plain.inv_freq[1] / 8.0).cos() * 1.5;
        assert!((angle(&cos_s, 3, 1) as f64 - want_s).abs() < 1e-6);
        assert!((angle(&cos_l, 3, 1) as f64 - want_l).abs() < 1e-6);
        assert!(Rope::plain(4, 1e4)
            .scaled(&RopeScaling::FreqFactors(vec![1.0]))
            .is_err());
    }

    #[test]
    fn partial_rotary_leaves_the_tail_alone_and_inverts() {
        let rope = Rope::plain(4, 10_000.0);
        let x = Tensor::randn(0f32, 1.0, (1, 2, 5, 8), &Device::Cpu).unwrap();
        let (cos, sin) = rope.tables(3, 5).unwrap();
        let y = rope.apply(&x, &cos, &sin).unwrap();
        let tail = (y.narrow(3, 4, 4).unwrap() - x.narrow(3, 4, 4).unwrap()).unwrap();
        assert_eq!(
            tail.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        let back = rope.apply_transposed(&y, &cos, &sin).unwrap();
        let err = crate::model::kernels::tests::max_diff(&back, &x);
        assert!(err < 1e-5, "{err}");
    }

    /// The kernel against candle's `rope` (the plain reference it replaced) and against
    /// candle's rotation by the negated table for the transpose: the same bits.
    #[test]
    fn rotation_matches_candles_rope_bit_for_bit() {
        for (dims, hd, t, heads) in [(8, 8, 5, 3), (64, 64, 37, 9), (4, 8, 17, 2)] {
            let rope = Rope::plain(dims, 10_000.0);
            let x = Tensor::randn(0f32, 1.0, (2, heads, t, hd), &Device::Cpu).unwrap();
            let (cos, sin) = rope.tables(11, t).unwrap();
            let plain = |sin: &Tensor| {
                let rotated = candle_nn::rotary_emb::rope(
                    &x.narrow(3, 0, dims).unwrap().contiguous().unwrap(),
                    &cos,
                    sin,
                )
                .unwrap();
                Tensor::cat(&[&rotated, &x.narrow(3, dims, hd - dims).unwrap()], 3).unwrap()
            };
            let forward = rope.apply(&x, &cos, &sin).unwrap();
            assert!(same_bits(&forward, &plain(&sin)), "dims {dims} of {hd}");
            let back = rope.apply_transposed(&x, &cos, &sin).unwrap();
            assert!(
                same_bits(&back, &plain(&sin.neg().unwrap())),
                "dims {dims} of {hd}"
            );
        }
    }
}
