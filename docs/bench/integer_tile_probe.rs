//! Would an integer register tile make a prefill faster than the f32 one? A probe for the
//! nineteenth round (`docs/performance-log.md`). Not part of the build:
//!
//!     rustc -O -C target-cpu=native docs/bench/integer_tile_probe.rs -o /tmp/integer_tile_probe
//!     /tmp/integer_tile_probe
//!
//! Generation may round its activations (decoding already does, to 15 bits per block of 32),
//! so a prefill could multiply 16-bit activations by the weights' integers with `vpmaddwd`
//! (16 multiply-adds per instruction against 8 for an f32 FMA) and scale each block of 32 in
//! f32. This loops one thread over the packed operands of one strip of a 100-token prefill
//! (17 panels of 6 rows, 16 panels of 16 columns, depth 320), three ways:
//! - the engine's f32 tile (6 × 16, 12 FMAs per step of depth);
//! - an integer tile of the same shape, depth in pairs (`vpmaddwd` + `vpaddd` into 32-bit
//!   sums), each block of 32 converted and scaled (weight scale per column, activation scale
//!   per row) into f32 sums held in registers (more than the 16 there are: the compiler spills);
//! - the same, with the f32 sums kept in the output tile in memory instead.
//!
//! Prints GFLOP/s (multiply-add = 2) for each of five rounds. Needs AVX2 and FMA.

use std::arch::x86_64::*;
use std::time::Instant;

const MR: usize = 6;
const NR: usize = 16;
const DEPTH: usize = 320;
const COLUMN_PANELS: usize = 16;
const ROW_PANELS: usize = 17;

/// # Safety
/// AVX2 + FMA; `a` holds DEPTH × MR values, `b` DEPTH × NR, `c` MR rows of NR from `ldc`.
#[target_feature(enable = "avx2,fma")]
unsafe fn f32_tile(a: *const f32, b: *const f32, c: *mut f32, ldc: usize) {
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    for p in 0..DEPTH {
        let b0 = _mm256_loadu_ps(b.add(p * NR));
        let b1 = _mm256_loadu_ps(b.add(p * NR + 8));
        for (r, row) in acc.iter_mut().enumerate() {
            let av = _mm256_broadcast_ss(&*a.add(p * MR + r));
            row[0] = _mm256_fmadd_ps(av, b0, row[0]);
            row[1] = _mm256_fmadd_ps(av, b1, row[1]);
        }
    }
    for (r, row) in acc.iter().enumerate() {
        let dst = c.add(r * ldc);
        _mm256_storeu_ps(dst, _mm256_add_ps(row[0], _mm256_loadu_ps(dst)));
        _mm256_storeu_ps(dst.add(8), _mm256_add_ps(row[1], _mm256_loadu_ps(dst.add(8))));
    }
}

/// The integer operands of one tile: activation pairs (DEPTH / 2 × MR of two i16 each),
/// weight pairs (DEPTH / 2 × NR × 2 i16), weight scales per block and column, activation
/// scales per block and row.
struct IntegerPanels {
    a: *const i32,
    b: *const i16,
    column_scales: *const f32,
    row_scales: *const f32,
}

/// The 32-bit sums of one block of 32 depth steps.
///
/// # Safety
/// AVX2; the panels hold block `block`.
#[target_feature(enable = "avx2")]
unsafe fn block_sums(panels: &IntegerPanels, block: usize) -> [[__m256i; 2]; MR] {
    let mut acc = [[_mm256_setzero_si256(); 2]; MR];
    for pair in block * 16..block * 16 + 16 {
        let b0 = _mm256_loadu_si256(panels.b.add(pair * 2 * NR) as *const __m256i);
        let b1 = _mm256_loadu_si256(panels.b.add(pair * 2 * NR + NR) as *const __m256i);
        for (r, row) in acc.iter_mut().enumerate() {
            let av = _mm256_set1_epi32(*panels.a.add(pair * MR + r));
            row[0] = _mm256_add_epi32(row[0], _mm256_madd_epi16(av, b0));
            row[1] = _mm256_add_epi32(row[1], _mm256_madd_epi16(av, b1));
        }
    }
    acc
}

/// # Safety
/// AVX2 + FMA; as `block_sums`, and `c` as in `f32_tile`.
#[target_feature(enable = "avx2,fma")]
unsafe fn integer_tile_in_registers(panels: &IntegerPanels, c: *mut f32, ldc: usize) {
    let mut out = [[_mm256_setzero_ps(); 2]; MR];
    for block in 0..DEPTH / 32 {
        let acc = block_sums(panels, block);
        let d0 = _mm256_loadu_ps(panels.column_scales.add(block * NR));
        let d1 = _mm256_loadu_ps(panels.column_scales.add(block * NR + 8));
        for r in 0..MR {
            let s = _mm256_broadcast_ss(&*panels.row_scales.add(block * MR + r));
            let v0 = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][0]), d0);
            let v1 = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][1]), d1);
            out[r][0] = _mm256_fmadd_ps(v0, s, out[r][0]);
            out[r][1] = _mm256_fmadd_ps(v1, s, out[r][1]);
        }
    }
    for (r, row) in out.iter().enumerate() {
        let dst = c.add(r * ldc);
        _mm256_storeu_ps(dst, _mm256_add_ps(row[0], _mm256_loadu_ps(dst)));
        _mm256_storeu_ps(dst.add(8), _mm256_add_ps(row[1], _mm256_loadu_ps(dst.add(8))));
    }
}

/// # Safety
/// As `integer_tile_in_registers`.
#[target_feature(enable = "avx2,fma")]
unsafe fn integer_tile_in_memory(panels: &IntegerPanels, c: *mut f32, ldc: usize) {
    for block in 0..DEPTH / 32 {
        let acc = block_sums(panels, block);
        let d0 = _mm256_loadu_ps(panels.column_scales.add(block * NR));
        let d1 = _mm256_loadu_ps(panels.column_scales.add(block * NR + 8));
        for (r, row) in acc.iter().enumerate() {
            let s = _mm256_broadcast_ss(&*panels.row_scales.add(block * MR + r));
            let dst = c.add(r * ldc);
            let v0 = _mm256_mul_ps(_mm256_cvtepi32_ps(row[0]), d0);
            let v1 = _mm256_mul_ps(_mm256_cvtepi32_ps(row[1]), d1);
            _mm256_storeu_ps(dst, _mm256_fmadd_ps(v0, s, _mm256_loadu_ps(dst)));
            let hi = _mm256_loadu_ps(dst.add(8));
            _mm256_storeu_ps(dst.add(8), _mm256_fmadd_ps(v1, s, hi));
        }
    }
}

fn main() {
    let af: Vec<f32> = (0..ROW_PANELS * DEPTH * MR).map(|i| (i % 97) as f32 * 0.01).collect();
    let bf: Vec<f32> = (0..COLUMN_PANELS * DEPTH * NR).map(|i| (i % 89) as f32 * 0.01).collect();
    let ai: Vec<i32> = (0..ROW_PANELS * DEPTH / 2 * MR).map(|i| (i % 9973) as i32).collect();
    let bi: Vec<i16> = (0..COLUMN_PANELS * DEPTH * NR).map(|i| (i % 255) as i16 - 127).collect();
    let column_scales: Vec<f32> =
        (0..COLUMN_PANELS * DEPTH / 32 * NR).map(|i| i as f32 * 1e-3).collect();
    let row_scales: Vec<f32> = (0..ROW_PANELS * DEPTH / 32 * MR).map(|i| i as f32 * 1e-3).collect();
    let ldc = COLUMN_PANELS * NR;
    let mut c = vec![0f32; ROW_PANELS * MR * ldc];
    let reps = 400;
    let flops = 2.0 * (reps * COLUMN_PANELS * ROW_PANELS * DEPTH * MR * NR) as f64;
    let panels = |ip: usize, jp: usize| IntegerPanels {
        a: ai[ip * DEPTH / 2 * MR..].as_ptr(),
        b: bi[jp * DEPTH * NR..].as_ptr(),
        column_scales: column_scales[jp * DEPTH / 32 * NR..].as_ptr(),
        row_scales: row_scales[ip * DEPTH / 32 * MR..].as_ptr(),
    };
    for round in 0..5 {
        let mut line = format!("round {round}:");
        for way in 0..3 {
            let t = Instant::now();
            for _ in 0..reps {
                for jp in 0..COLUMN_PANELS {
                    for ip in 0..ROW_PANELS {
                        let dst = c[ip * MR * ldc + jp * NR..].as_mut_ptr();
                        // SAFETY: the operands hold the panels indexed (sizes above); the
                        // tile lies inside `c`.
                        unsafe {
                            match way {
                                0 => f32_tile(
                                    af[ip * DEPTH * MR..].as_ptr(),
                                    bf[jp * DEPTH * NR..].as_ptr(),
                                    dst,
                                    ldc,
                                ),
                                1 => integer_tile_in_registers(&panels(ip, jp), dst, ldc),
                                _ => integer_tile_in_memory(&panels(ip, jp), dst, ldc),
                            }
                        }
                    }
                }
            }
            let name = ["f32 tile", "integer, sums in registers", "integer, sums in C"][way];
            line += &format!("  {name} {:.1} GFLOP/s", flops / t.elapsed().as_secs_f64() / 1e9);
        }
        println!("{line} (checksum {})", c[5]);
    }
}
