//! Dequantization of the GGUF block types that candle dequantizes with scalar code that
//! allocates per call: Q5_0 and Q5_1, and the K types Q2_K–Q6_K (those of Q4_K_M and Q5_K_M
//! files, Gemma 3's among them). Decoding Gemma 3 270M once spent most of each token there (10
//! tokens/s against llama.cpp's 41).
//!
//! The loops here compute every value with the same operations in the same order as candle's,
//! so the values are bit-identical (a test compares them); they serve CPUs without AVX2. With
//! AVX2 (`decode_dot::dequantize_blocks` picks) the K types take the integer dots' unpacking (`decode_dot::integer`: one run of 16
//! values per AVX-512BW register, two per AVX2 pair, the same bits) and Q5_0/Q5_1 the register
//! kernels of `decode_dot`. One thread, ns per super-block written in runs, against these loops
//! compiled for AVX2 (which the compiler vectorized): 43–71 → 36–38 with AVX2, 40–43 with
//! AVX-512BW; prefill of 100 tokens on Llama 1B shapes 7–12 % faster with AVX-512BW (Q3_K,
//! Q4_K, Q5_K, Q6_K, alternating binaries).

use candle_core::quantized::GgmlDType;
use half::f16;

/// Values per block of Q5_0 and per super-block of the K types.
const SMALL: usize = 32;
const SUPER: usize = 256;

/// The types this module dequantizes.
pub fn has_fast_dequantization(dtype: GgmlDType) -> bool {
    matches!(
        dtype,
        GgmlDType::Q5_0
            | GgmlDType::Q5_1
            | GgmlDType::Q2K
            | GgmlDType::Q3K
            | GgmlDType::Q4K
            | GgmlDType::Q5K
            | GgmlDType::Q6K
    )
}

/// Checks that `n` blocks of `dtype`, written in runs of 16 values `stride` apart, fit a
/// destination of `len` values without overlapping.
pub(super) fn assert_runs_fit(n: usize, dtype: GgmlDType, len: usize, stride: usize) {
    let runs = n * dtype.block_size() / 16;
    assert!(stride >= 16, "runs of 16 values would overlap");
    assert!(
        runs == 0 || len >= (runs - 1) * stride + 16,
        "destination too short for {n} blocks"
    );
}

/// Writes the values of the whole blocks in `blocks` (of `dtype`) into `dst` in runs of 16:
/// value `i` goes to `dst[(i / 16) * stride + i % 16]`. False, writing nothing, for a type
/// this module does not cover.
pub fn dequantize_blocks(blocks: &[u8], dtype: GgmlDType, dst: &mut [f32], stride: usize) -> bool {
    if !has_fast_dequantization(dtype) {
        return false;
    }
    let n = blocks.len() / dtype.type_size();
    assert_runs_fit(n, dtype, dst.len(), stride);
    // Each block's values, then written out in runs of 16. The block functions are called
    // directly, not through a function value, so that they are compiled inside this loop.
    macro_rules! each_block {
        ($n:expr, $size:expr, $block:ident) => {{
            let mut values = [0f32; $n];
            for (b, bytes) in blocks.chunks_exact($size).enumerate() {
                $block(bytes, &mut values);
                for (k, run) in values.chunks_exact(16).enumerate() {
                    let at = (b * $n / 16 + k) * stride;
                    dst[at..at + 16].copy_from_slice(run);
                }
            }
        }};
    }
    match dtype {
        GgmlDType::Q5_0 => each_block!(SMALL, 22, q5_0),
        GgmlDType::Q5_1 => each_block!(SMALL, 24, q5_1),
        GgmlDType::Q2K => each_block!(SUPER, 84, q2k),
        GgmlDType::Q3K => each_block!(SUPER, 110, q3k),
        GgmlDType::Q4K => each_block!(SUPER, 144, q4k),
        GgmlDType::Q5K => each_block!(SUPER, 176, q5k),
        GgmlDType::Q6K => each_block!(SUPER, 210, q6k),
        _ => unreachable!("checked above"),
    }
    true
}

#[inline(always)]
fn half_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// ggml's `block_q5_0`: d (f16), the 32 high bits, 16 bytes of low nibbles; x = (q - 16)·d.
#[inline(always)]
fn q5_0(b: &[u8], out: &mut [f32; SMALL]) {
    let d = half_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs: &[u8; 16] = b[6..22].try_into().expect("a whole block");
    for j in 0..16 {
        let high_0 = (((qh >> j) << 4) & 0x10) as u8;
        let high_1 = ((qh >> (j + 12)) & 0x10) as u8;
        let x0 = ((qs[j] & 0x0F) | high_0) as i32 - 16;
        let x1 = ((qs[j] >> 4) | high_1) as i32 - 16;
        out[j] = x0 as f32 * d;
        out[j + 16] = x1 as f32 * d;
    }
}

/// ggml's `block_q5_1`: d, m (f16), the 32 high bits, 16 bytes of low nibbles; x = q·d + m.
#[inline(always)]
fn q5_1(b: &[u8], out: &mut [f32; SMALL]) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs: &[u8; 16] = b[8..24].try_into().expect("a whole block");
    for j in 0..16 {
        let high_0 = (((qh >> j) << 4) & 0x10) as u8;
        let high_1 = ((qh >> (j + 12)) & 0x10) as u8;
        let x0 = (qs[j] & 0x0F) | high_0;
        let x1 = (qs[j] >> 4) | high_1;
        out[j] = x0 as f32 * d + m;
        out[j + 16] = x1 as f32 * d + m;
    }
}

/// ggml's `block_q2_K`: 16 bytes of 4-bit scale and min pairs (one per 16 values), 64 bytes
/// of 2-bit values, d, dmin (f16); x = d·sc·q - dmin·m.
#[inline(always)]
fn q2k(b: &[u8], out: &mut [f32; SUPER]) {
    let (d, min) = (half_at(b, 80), half_at(b, 82));
    for half in 0..2 {
        let qs: &[u8; 32] = b[16 + 32 * half..48 + 32 * half]
            .try_into()
            .expect("a whole block");
        for step in 0..4 {
            let shift = 2 * step;
            for part in 0..2 {
                let sc = b[8 * half + 2 * step + part];
                let dl = d * (sc & 0xF) as f32;
                let ml = min * (sc >> 4) as f32;
                let o = &mut out[128 * half + 32 * step + 16 * part..][..16];
                for (y, q) in o.iter_mut().zip(&qs[16 * part..16 * part + 16]) {
                    *y = dl * ((q >> shift) & 3) as f32 - ml;
                }
            }
        }
    }
}

/// ggml's `block_q3_K`: 32 bytes of high bits, 64 bytes of 2-bit low values, 12 bytes of
/// 6-bit scales (one per 16 values), d (f16); x = d·(sc - 32)·(q - 4 where the high bit is
/// clear).
#[inline(always)]
fn q3k(b: &[u8], out: &mut [f32; SUPER]) {
    let hmask: &[u8; 32] = b[..32].try_into().expect("a whole block");
    let d = half_at(b, 108);
    let scales = q3k_scales(b[96..108].try_into().expect("a whole block"));
    for half in 0..2 {
        let qs: &[u8; 32] = b[32 + 32 * half..64 + 32 * half]
            .try_into()
            .expect("a whole block");
        for step in 0..4 {
            let (shift, bit) = (2 * step, 1u8 << (4 * half + step));
            for part in 0..2 {
                let dl = d * (scales[8 * half + 2 * step + part] as f32 - 32.0);
                let o = &mut out[128 * half + 32 * step + 16 * part..][..16];
                for (i, y) in o.iter_mut().enumerate() {
                    let at = 16 * part + i;
                    let low = ((qs[at] >> shift) & 3) as i8;
                    let q = low - if hmask[at] & bit == 0 { 4 } else { 0 };
                    *y = dl * q as f32;
                }
            }
        }
    }
}

/// Q3_K's sixteen 6-bit scales (stored + 32), unpacked from their 12 bytes as ggml does.
#[inline(always)]
pub(super) fn q3k_scales(packed: &[u8; 12]) -> [u8; 16] {
    const LOW: u32 = 0x0f0f0f0f;
    const HIGH: u32 = 0x03030303;
    let word = |i: usize| u32::from_le_bytes(packed[4 * i..4 * i + 4].try_into().expect("4"));
    let (a, b, t) = (word(0), word(1), word(2));
    let words = [
        (a & LOW) | ((t & HIGH) << 4),
        (b & LOW) | (((t >> 2) & HIGH) << 4),
        ((a >> 4) & LOW) | (((t >> 4) & HIGH) << 4),
        ((b >> 4) & LOW) | (((t >> 6) & HIGH) << 4),
    ];
    let mut out = [0u8; 16];
    for (o, w) in out.chunks_exact_mut(4).zip(words) {
        o.copy_from_slice(&w.to_le_bytes());
    }
    out
}

/// Scale and min of sub-block j of a K super-block's 12 packed bytes (6 bits each).
#[inline(always)]
pub(super) fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The K super-block's multipliers d·sc and offsets dmin·m of sub-blocks 2·pair and
/// 2·pair + 1, as candle computes them.
#[inline(always)]
fn pair_scales(pair: usize, (d, min): (f32, f32), scales: &[u8; 12]) -> [(f32, f32); 2] {
    [2 * pair, 2 * pair + 1].map(|j| {
        let (sc, m) = scale_min_k4(j, scales);
        (d * sc as f32, min * m as f32)
    })
}

/// ggml's `block_q4_K`: d, dmin (f16), 12 bytes of scales, 128 bytes of nibbles; eight
/// sub-blocks of 32, x = d·sc·q - dmin·m.
#[inline(always)]
fn q4k(b: &[u8], out: &mut [f32; SUPER]) {
    let (d, min) = (half_at(b, 0), half_at(b, 2));
    let scales: &[u8; 12] = b[4..16].try_into().expect("a whole block");
    for pair in 0..4 {
        let q: &[u8; 32] = b[16 + 32 * pair..48 + 32 * pair]
            .try_into()
            .expect("a whole block");
        let [(d1, m1), (d2, m2)] = pair_scales(pair, (d, min), scales);
        let (lo, hi) = out[64 * pair..64 * pair + 64].split_at_mut(32);
        for l in 0..32 {
            lo[l] = d1 * (q[l] & 0xF) as f32 - m1;
            hi[l] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// ggml's `block_q5_K`: as Q4_K with a fifth bit per value in 32 bytes of high bits.
#[inline(always)]
fn q5k(b: &[u8], out: &mut [f32; SUPER]) {
    let (d, min) = (half_at(b, 0), half_at(b, 2));
    let scales: &[u8; 12] = b[4..16].try_into().expect("a whole block");
    let qh: &[u8; 32] = b[16..48].try_into().expect("a whole block");
    for pair in 0..4 {
        let ql: &[u8; 32] = b[48 + 32 * pair..80 + 32 * pair]
            .try_into()
            .expect("a whole block");
        let (u1, u2) = (1u8 << (2 * pair), 2u8 << (2 * pair));
        let [(d1, m1), (d2, m2)] = pair_scales(pair, (d, min), scales);
        let (lo, hi) = out[64 * pair..64 * pair + 64].split_at_mut(32);
        for l in 0..32 {
            let add_lo = if qh[l] & u1 != 0 { 16f32 } else { 0f32 };
            let add_hi = if qh[l] & u2 != 0 { 16f32 } else { 0f32 };
            lo[l] = d1 * ((ql[l] & 0xF) as f32 + add_lo) - m1;
            hi[l] = d2 * ((ql[l] >> 4) as f32 + add_hi) - m2;
        }
    }
}

/// ggml's `block_q6_K`: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 signed scales
/// (one per 16 values), d (f16); x = d·sc·(q - 32).
#[inline(always)]
fn q6k(b: &[u8], out: &mut [f32; SUPER]) {
    let d = half_at(b, 208);
    for half in 0..2 {
        let ql: &[u8; 64] = b[64 * half..64 * half + 64]
            .try_into()
            .expect("a whole block");
        let qh: &[u8; 32] = b[128 + 32 * half..160 + 32 * half]
            .try_into()
            .expect("a whole block");
        let sc = |i: usize| b[192 + 8 * half + i] as i8 as f32;
        let o = &mut out[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            o[l] = d * sc(is) * q1 as f32;
            o[l + 32] = d * sc(is + 2) * q2 as f32;
            o[l + 64] = d * sc(is + 4) * q3 as f32;
            o[l + 96] = d * sc(is + 6) * q4 as f32;
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::decode_dot::{dequantize_blocks_with, Kernel};
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    /// `w` quantized to `dtype`, then written by `dequantize(blocks, dst, stride)` contiguous
    /// (stride 16) and in runs of 16, 40 apart: the same bits as candle's dequantization, and
    /// the gaps between runs untouched.
    pub(in crate::model) fn assert_same_as_candles(
        w: &Tensor,
        dtype: GgmlDType,
        label: &str,
        dequantize: impl Fn(&[u8], &mut [f32], usize) -> bool,
    ) {
        let q = QTensor::quantize(w, dtype).unwrap();
        let want: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let data = q.data().unwrap();
        let mut got = vec![f32::NAN; want.len()];
        assert!(dequantize(&data, &mut got, 16), "{label}: not written");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{label}: value {i}");
        }
        let stride = 40;
        let mut strided = vec![f32::NAN; (want.len() / 16 - 1) * stride + 16];
        assert!(
            dequantize(&data, &mut strided, stride),
            "{label}: not written"
        );
        for (i, w) in want.iter().enumerate() {
            let at = (i / 16) * stride + i % 16;
            assert_eq!(strided[at].to_bits(), w.to_bits(), "{label}, strided: {i}");
        }
        assert!(strided[16..stride].iter().all(|v| v.is_nan()));
    }

    #[test]
    fn dequantization_is_bit_identical_to_candles() {
        // Two rows of four super-blocks; values of mixed scales so that every scale and min
        // bit pattern varies.
        let scale = Tensor::arange(0f32, 1024.0, &Device::Cpu)
            .unwrap()
            .affine(1.0 / 200.0, 0.1)
            .unwrap();
        let w = Tensor::randn(0f32, 1.0, (2, 1024), &Device::Cpu)
            .unwrap()
            .broadcast_mul(&scale)
            .unwrap();
        for dtype in [
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            // Through the dispatch of `decode_dot` on every kernel: these loops on the portable
            // one, the register and integer modules' on the others.
            for kernel in Kernel::available() {
                assert_same_as_candles(&w, dtype, &format!("{dtype:?}, {kernel:?}"), |b, d, s| {
                    dequantize_blocks_with(kernel, b, dtype, d, s)
                });
            }
        }
        let q8 = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let mut out = vec![0f32; 2048];
        assert!(!dequantize_blocks(
            &q8.data().unwrap(),
            GgmlDType::Q8_0,
            &mut out,
            16
        ));
    }
}
