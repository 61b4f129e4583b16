//! How fast can one core stream Q8_0 weights through a decoding dot? A probe for the choice in
//! `crates/engine/src/model/decode_dot/integer.rs`. Not part of the build:
//!
//!     rustc -O docs/bench/q8_0_stream.rs -o /tmp/q8_0_stream && /tmp/q8_0_stream
//!
//! It reads a matrix the size of Gemma 3 270M's embedding table (262144 rows of 640 values,
//! 178 MB of Q8_0 blocks, far past any cache), on one thread and on two, three ways: a plain
//! sum of its bytes (the memory's pace), dots with f32 activations (each weight widened,
//! converted and multiplied: the engine's f32 kernel), and dots with activations rounded to
//! two bytes (|q| against bytes that carry q's signs, by `maddubs`: the engine's integer
//! kernel). Each weight block is prefetched 2 KiB ahead, as in the engine. Prints the best of
//! six rounds in GB/s of weights. Needs AVX2, FMA and F16C.

use std::arch::x86_64::*;
use std::time::Instant;

const COLS: usize = 640;
const ROWS: usize = 262_144;
/// Bytes per block of 32: an f16 scale and 32 signed bytes.
const BLOCK_BYTES: usize = 34;
const ROW_BYTES: usize = COLS / 32 * BLOCK_BYTES;
const PREFETCH_AHEAD: usize = 2048;

#[target_feature(enable = "avx2")]
unsafe fn plain_sum(bytes: &[u8], _: &Activations, _: &mut [f32]) {
    let mut acc = [_mm256_setzero_si256(); 4];
    for chunk in bytes.chunks_exact(128) {
        for (k, acc) in acc.iter_mut().enumerate() {
            let v = _mm256_loadu_si256(chunk.as_ptr().add(32 * k) as *const __m256i);
            *acc = _mm256_add_epi64(*acc, v);
        }
    }
    std::hint::black_box(acc);
}

#[inline(always)]
unsafe fn scale(block: *const u8) -> f32 {
    let bits = std::ptr::read_unaligned(block as *const u16) as i32;
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
}

#[inline(always)]
unsafe fn lane_sum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_hadd_ps(s, s);
    _mm_cvtss_f32(_mm_hadd_ps(s, s))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f32_dots(bytes: &[u8], x: &Activations, out: &mut [f32]) {
    for (row, out) in bytes.chunks_exact(ROW_BYTES).zip(out) {
        let mut acc = _mm256_setzero_ps();
        for (b, block) in row.chunks_exact(BLOCK_BYTES).enumerate() {
            let at = block.as_ptr();
            _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(PREFETCH_AHEAD) as *const i8);
            let xb = x.f32.as_ptr().add(32 * b);
            let q = [2, 10, 18, 26].map(|o| {
                let eight = _mm_loadl_epi64(at.add(o) as *const __m128i);
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight))
            });
            let lo = _mm256_fmadd_ps(
                q[1],
                _mm256_loadu_ps(xb.add(8)),
                _mm256_mul_ps(q[0], _mm256_loadu_ps(xb)),
            );
            let hi = _mm256_fmadd_ps(
                q[3],
                _mm256_loadu_ps(xb.add(24)),
                _mm256_mul_ps(q[2], _mm256_loadu_ps(xb.add(16))),
            );
            acc = _mm256_fmadd_ps(_mm256_add_ps(lo, hi), _mm256_set1_ps(scale(at)), acc);
        }
        *out = lane_sum(acc);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn integer_dots(bytes: &[u8], x: &Activations, out: &mut [f32]) {
    let (ones, high_weight) = (_mm256_set1_epi16(1), _mm256_set1_epi16(128));
    for (row, out) in bytes.chunks_exact(ROW_BYTES).zip(out) {
        let mut acc = _mm256_setzero_ps();
        for (b, block) in row.chunks_exact(BLOCK_BYTES).enumerate() {
            let at = block.as_ptr();
            _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(PREFETCH_AHEAD) as *const i8);
            let q = _mm256_loadu_si256(at.add(2) as *const __m256i);
            let magnitudes = _mm256_sign_epi8(q, q);
            let hi = _mm256_loadu_si256(x.hi.as_ptr().add(32 * b) as *const __m256i);
            let lo = _mm256_loadu_si256(x.lo.as_ptr().add(32 * b) as *const __m256i);
            let pairs_hi = _mm256_maddubs_epi16(magnitudes, _mm256_sign_epi8(hi, q));
            let pairs_lo = _mm256_maddubs_epi16(magnitudes, _mm256_sign_epi8(lo, q));
            let v = _mm256_add_epi32(
                _mm256_madd_epi16(pairs_hi, high_weight),
                _mm256_madd_epi16(pairs_lo, ones),
            );
            let factor = _mm256_set1_ps(scale(at) * x.scales[b]);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), factor, acc);
        }
        *out = lane_sum(acc);
    }
}

/// One activation row as f32 and as the integer kernel takes it.
struct Activations {
    f32: Vec<f32>,
    hi: Vec<i8>,
    lo: Vec<i8>,
    scales: Vec<f32>,
}

fn main() {
    assert!(
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c"),
        "this probe needs AVX2, FMA and F16C"
    );
    // Random bytes, with each block's scale 2⁻¹⁶·(1 + …): small and finite.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let bytes: Vec<u8> = (0..ROWS * ROW_BYTES)
        .map(|i| {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            match i % BLOCK_BYTES {
                1 => 0x04,
                _ => (state >> 33) as u8,
            }
        })
        .collect();
    let f32: Vec<f32> = (0..COLS).map(|i| (i as f32 * 0.37).sin()).collect();
    let v: Vec<i32> = f32.iter().map(|x| (x * 16256.0).round() as i32).collect();
    let x = Activations {
        hi: v.iter().map(|v| (v / 128) as i8).collect(),
        lo: v.iter().map(|v| (v % 128) as i8).collect(),
        scales: vec![1.0 / 16256.0; COLS / 32],
        f32,
    };
    type Loop = unsafe fn(&[u8], &Activations, &mut [f32]);
    let loops: [(&str, Loop); 3] = [
        ("plain sum", plain_sum),
        ("f32 dots", f32_dots),
        ("integer dots", integer_dots),
    ];
    let mut out = vec![0f32; ROWS];
    for threads in [1, 2] {
        let mut best = [f64::MAX; 3];
        for _ in 0..6 {
            for (k, (_, run)) in loops.iter().enumerate() {
                let start = Instant::now();
                std::thread::scope(|scope| {
                    let rows = ROWS / threads;
                    for (part, out) in bytes.chunks(rows * ROW_BYTES).zip(out.chunks_mut(rows)) {
                        let x = &x;
                        // SAFETY: the CPU has AVX2, FMA and F16C (checked above).
                        scope.spawn(move || unsafe { run(part, x, out) });
                    }
                });
                best[k] = best[k].min(start.elapsed().as_secs_f64());
            }
        }
        for ((name, _), seconds) in loops.iter().zip(best) {
            let rate = bytes.len() as f64 / seconds / 1e9;
            println!("{threads} thread(s)  {name:13} {rate:5.1} GB/s");
        }
    }
    std::hint::black_box(&out);
}
