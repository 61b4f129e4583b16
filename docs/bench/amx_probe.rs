//! Would Intel AMX make the salience passes' products faster at f32 accuracy? A probe, kept
//! so that the answer can be checked again on another CPU. Not part of the build:
//!
//!     rustc -O -C target-cpu=native docs/bench/amx_probe.rs -o /tmp/amx_probe && /tmp/amx_probe
//!
//! AMX multiplies bf16 (8-bit significand) tiles. f32 accuracy needs each f32 split into
//! bf16 parts (x = hi + mid + lo, exact) and the cross products that matter: six per pair of
//! f32 operands ("bf16x6"), or three when one operand is already exact in bf16, as 4-bit
//! quantized weights are (q in 0..15; each 32-value block's scale d and minimum m are then
//! applied to the block's partial sums, "exact-q"). Each is timed on one thread for the shape
//! of an MLP projection at 300 tokens (320 × 576 · 576 × 1536), counting only the f32 product's
//! 2·m·n·k operations, next to the two limits that decide it: the rate of TDPBF16PS alone and
//! of tile loads alone. The f32 register tile of `matmul.rs` runs about 210 GFLOP/s per core on
//! the Xeon (Emerald Rapids) this was written on.
//!
//! Linux only (the process must ask for the AMX state with arch_prctl), x86-64 with AMX-BF16.

#[cfg(target_arch = "x86_64")]
mod probe {
    use std::arch::asm;
    use std::time::Instant;

    /// ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA: without it a tile instruction faults.
    fn request_tiles() -> bool {
        let ret: i64;
        // SAFETY: arch_prctl(0x1023, 18) only changes this process's permitted state.
        unsafe {
            asm!("syscall", inlateout("rax") 158i64 => ret, in("rdi") 0x1023i64, in("rsi") 18i64,
                 lateout("rcx") _, lateout("r11") _, options(nostack));
        }
        ret == 0
    }

    /// Palette 1, all eight tiles 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    fn configure() {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t] = 64;
            c[48 + t] = 16;
        }
        let config = TileConfig(c);
        // SAFETY: a valid palette-1 configuration; the process holds the tile state.
        unsafe { asm!("ldtilecfg [{0}]", in(reg) config.0.as_ptr()) };
    }

    fn round_to_bf16(x: f32) -> f32 {
        let b = x.to_bits();
        f32::from_bits(b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000)
    }

    /// x = hi + mid + lo exactly (for normal x), each with a bf16 significand.
    fn split(x: f32) -> [u16; 3] {
        let hi = round_to_bf16(x);
        let mid = round_to_bf16(x - hi);
        let lo = round_to_bf16(x - hi - mid);
        [hi, mid, lo].map(|v| (v.to_bits() >> 16) as u16)
    }

    /// A (m × k) as three parts, each row-major bf16: the layout of A tiles (16 rows × 32).
    fn parts_of_a(a: &[f32], m: usize, k: usize) -> Vec<u16> {
        let mut out = vec![0u16; 3 * m * k];
        for (i, &v) in a.iter().enumerate() {
            for (p, part) in split(v).into_iter().enumerate() {
                out[p * m * k + i] = part;
            }
        }
        out
    }

    /// B (k × n) as `parts` parts in B-tile order: for each 16 columns and 32 steps of depth,
    /// 16 rows of (step pair, column, two steps).
    fn parts_of_b(b: &[f32], k: usize, n: usize, parts: usize) -> Vec<u16> {
        let steps = k / 32;
        let mut out = vec![0u16; parts * k * n];
        for p in 0..k {
            for j in 0..n {
                let at =
                    (((j / 16) * steps + p / 32) * 16 + (p % 32) / 2) * 32 + (j % 16) * 2 + p % 2;
                for (t, part) in split(b[p * n + j]).into_iter().take(parts).enumerate() {
                    out[t * k * n + at] = part;
                }
            }
        }
        out
    }

    struct Shape {
        m: usize,
        k: usize,
        n: usize,
    }

    /// Tiles 0–3 hold a 32 × 32 block of C, 4–5 two row tiles of A, 6–7 two column tiles of B.
    /// # Safety
    /// Tiles configured; the offsets lie inside the parts.
    unsafe fn load_b(b0: *const u16, b1: *const u16) {
        unsafe {
            asm!("tileloadd tmm6, [{0} + {2}*1]", "tileloadd tmm7, [{1} + {2}*1]", in(reg) b0, in(reg) b1, in(reg) 64isize)
        };
    }

    /// # Safety
    /// As `load_b`.
    unsafe fn load_a_and_multiply(a0: *const u16, a1: *const u16, stride: isize) {
        unsafe {
            asm!("tileloadd tmm4, [{0} + {2}*1]", "tileloadd tmm5, [{1} + {2}*1]",
                 "tdpbf16ps tmm0, tmm4, tmm6", "tdpbf16ps tmm1, tmm4, tmm7",
                 "tdpbf16ps tmm2, tmm5, tmm6", "tdpbf16ps tmm3, tmm5, tmm7",
                 in(reg) a0, in(reg) a1, in(reg) stride)
        };
    }

    /// # Safety
    /// As `load_b`; `c` holds 32 rows of `ldc` floats.
    unsafe fn store_c(c: *mut f32, ldc: usize) {
        unsafe {
            asm!("tilestored [{0} + {4}*1], tmm0", "tilestored [{1} + {4}*1], tmm1",
                 "tilestored [{2} + {4}*1], tmm2", "tilestored [{3} + {4}*1], tmm3",
                 "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
                 in(reg) c, in(reg) c.add(16), in(reg) c.add(16 * ldc), in(reg) c.add(16 * ldc + 16),
                 in(reg) (4 * ldc) as isize)
        };
    }

    /// C = A · B with the six cross products of three-part A and B whose order is at most
    /// 2^-16; B's parts stay in tiles while A's go by.
    fn bf16x6(s: &Shape, a: &[u16], b: &[u16], c: &mut [f32]) {
        let (m, k, n) = (s.m, s.k, s.n);
        let steps = k / 32;
        // SAFETY: every offset below lies inside the parts (m, n multiples of 32).
        unsafe {
            store_c(c.as_mut_ptr(), n);
            for cb in (0..n / 16).step_by(2) {
                for i0 in (0..m).step_by(32) {
                    for st in 0..steps {
                        for pb in 0..3 {
                            let b0 = b.as_ptr().add(pb * k * n + (cb * steps + st) * 512);
                            load_b(b0, b0.add(steps * 512));
                            for pa in 0..3 - pb {
                                let a0 = a.as_ptr().add(pa * m * k + i0 * k + st * 32);
                                load_a_and_multiply(a0, a0.add(16 * k), 2 * k as isize);
                            }
                        }
                    }
                    store_c(c.as_mut_ptr().add(i0 * n + cb * 16), n);
                }
            }
        }
    }

    /// C = A · W with W = d·q + m per 32-step block: three products of A's parts with q, each
    /// block's sums scaled into C.
    fn exact_q(
        s: &Shape,
        a: &[u16],
        q: &[u16],
        d: &[f32],
        mins: &[f32],
        sums: &[f32],
        c: &mut [f32],
    ) {
        let (m, k, n) = (s.m, s.k, s.n);
        let steps = k / 32;
        let mut block = [0f32; 32 * 32];
        for v in c.iter_mut() {
            *v = 0.0;
        }
        // SAFETY: as in `bf16x6`.
        unsafe {
            store_c(block.as_mut_ptr(), 32);
            for cb in (0..n / 16).step_by(2) {
                for i0 in (0..m).step_by(32) {
                    for st in 0..steps {
                        let b0 = q.as_ptr().add((cb * steps + st) * 512);
                        load_b(b0, b0.add(steps * 512));
                        for pa in 0..3 {
                            let a0 = a.as_ptr().add(pa * m * k + i0 * k + st * 32);
                            load_a_and_multiply(a0, a0.add(16 * k), 2 * k as isize);
                        }
                        store_c(block.as_mut_ptr(), 32);
                        let cols = st * n + cb * 16;
                        scale_block(
                            &block,
                            &d[cols..][..32],
                            &mins[cols..][..32],
                            &sums[st * m + i0..][..32],
                            &mut c[i0 * n + cb * 16..],
                            n,
                        );
                    }
                }
            }
        }
    }

    /// c[r][j] += block[r][j] · d[j] + sums[r] · mins[j] for the 32 × 32 block (rows `ldc` apart).
    fn scale_block(
        block: &[f32; 1024],
        d: &[f32],
        mins: &[f32],
        sums: &[f32],
        c: &mut [f32],
        ldc: usize,
    ) {
        use std::arch::x86_64::*;
        // SAFETY: AVX-512F was checked in `main`; every access is inside the slices (32 rows of
        // 32 values in `block` and `c`, 32 in the others).
        unsafe {
            let (d0, d1) = (
                _mm512_loadu_ps(d.as_ptr()),
                _mm512_loadu_ps(d.as_ptr().add(16)),
            );
            let (m0, m1) = (
                _mm512_loadu_ps(mins.as_ptr()),
                _mm512_loadu_ps(mins.as_ptr().add(16)),
            );
            for r in 0..32 {
                let sum = _mm512_set1_ps(sums[r]);
                let (src, dst) = (block.as_ptr().add(32 * r), c[r * ldc..][..32].as_mut_ptr());
                let lo = _mm512_fmadd_ps(
                    _mm512_loadu_ps(src),
                    d0,
                    _mm512_fmadd_ps(sum, m0, _mm512_loadu_ps(dst)),
                );
                let hi = _mm512_fmadd_ps(
                    _mm512_loadu_ps(src.add(16)),
                    d1,
                    _mm512_fmadd_ps(sum, m1, _mm512_loadu_ps(dst.add(16))),
                );
                _mm512_storeu_ps(dst, lo);
                _mm512_storeu_ps(dst.add(16), hi);
            }
        }
    }

    fn seconds(mut f: impl FnMut()) -> f64 {
        (0..5)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// Largest |C - A·W| over Σ|A||W|, against f64, on a sample of entries.
    fn error(s: &Shape, a: &[f32], w: impl Fn(usize, usize) -> f64, c: &[f32]) -> f64 {
        let mut worst = 0f64;
        for i in (0..s.m).step_by(7) {
            for j in (0..s.n).step_by(5) {
                let (mut exact, mut scale) = (0f64, 0f64);
                for p in 0..s.k {
                    let t = a[i * s.k + p] as f64 * w(p, j);
                    exact += t;
                    scale += t.abs();
                }
                worst = worst.max((c[i * s.n + j] as f64 - exact).abs() / scale);
            }
        }
        worst
    }

    pub fn main() {
        if !std::arch::is_x86_feature_detected!("avx512f") || !request_tiles() {
            println!("no AMX tile state here (arch_prctl refused, or not an AMX CPU)");
            return;
        }
        configure();
        let s = Shape {
            m: 320,
            k: 576,
            n: 1536,
        };
        let mut seed = 1u64;
        let mut random = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let a: Vec<f32> = (0..s.m * s.k).map(|_| random()).collect();
        let b: Vec<f32> = (0..s.k * s.n).map(|_| random()).collect();
        let gflops = |t: f64| 2.0 * (s.m * s.n * s.k) as f64 / t / 1e9;
        let a_parts = parts_of_a(&a, s.m, s.k);

        let b_parts = parts_of_b(&b, s.k, s.n, 3);
        let mut c = vec![0f32; s.m * s.n];
        let t = seconds(|| bf16x6(&s, &a_parts, &b_parts, &mut c));
        let e = error(&s, &a, |p, j| b[p * s.n + j] as f64, &c);
        println!(
            "bf16x6:  {:6.1} GFLOP/s of f32 work, error {e:.1e} of sum |a b|",
            gflops(t)
        );

        let steps = s.k / 32;
        let q: Vec<f32> = (0..s.k * s.n)
            .map(|i| ((i * 7919 + 13) % 16) as f32)
            .collect();
        let d: Vec<f32> = (0..steps * s.n)
            .map(|i| 0.01 + 0.001 * ((i * 31) % 17) as f32)
            .collect();
        let mins: Vec<f32> = (0..steps * s.n)
            .map(|i| -0.08 + 0.001 * ((i * 37) % 13) as f32)
            .collect();
        let q_tiles = parts_of_b(&q, s.k, s.n, 1);
        let sums: Vec<f32> = (0..steps * s.m)
            .map(|i| {
                (0..32)
                    .map(|t| a[(i % s.m) * s.k + (i / s.m) * 32 + t])
                    .sum()
            })
            .collect();
        let t = seconds(|| exact_q(&s, &a_parts, &q_tiles, &d, &mins, &sums, &mut c));
        let w = |p: usize, j: usize| {
            let blk = (p / 32) * s.n + j;
            d[blk] as f64 * q[p * s.n + j] as f64 + mins[blk] as f64
        };
        let e = error(&s, &a, w, &c);
        println!(
            "exact-q: {:6.1} GFLOP/s of f32 work, error {e:.1e} of sum |a w|",
            gflops(t)
        );

        // The ceiling of the f32 register tile: independent 512-bit multiply-adds only.
        let rounds = 2_000_000;
        // SAFETY: AVX-512F was checked above; registers only.
        let t = seconds(|| unsafe {
            asm!("vpxord zmm0, zmm0, zmm0", "vpxord zmm1, zmm1, zmm1", "vpxord zmm2, zmm2, zmm2",
                 "vpxord zmm3, zmm3, zmm3", "vpxord zmm4, zmm4, zmm4", "vpxord zmm5, zmm5, zmm5",
                 "vpxord zmm6, zmm6, zmm6", "vpxord zmm7, zmm7, zmm7",
                 "2:",
                 "vfmadd231ps zmm0, zmm30, zmm31", "vfmadd231ps zmm1, zmm30, zmm31",
                 "vfmadd231ps zmm2, zmm30, zmm31", "vfmadd231ps zmm3, zmm30, zmm31",
                 "vfmadd231ps zmm4, zmm30, zmm31", "vfmadd231ps zmm5, zmm30, zmm31",
                 "vfmadd231ps zmm6, zmm30, zmm31", "vfmadd231ps zmm7, zmm30, zmm31",
                 "dec {n}", "jnz 2b",
                 n = inout(reg) rounds as u64 => _,
                 out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _, out("zmm4") _,
                 out("zmm5") _, out("zmm6") _, out("zmm7") _, out("zmm30") _, out("zmm31") _,
                 options(nostack));
        });
        println!(
            "f32 multiply-adds alone (AVX-512): {:6.1} GFLOP/s",
            (rounds * 8 * 32) as f64 / t / 1e9
        );

        let iterations = 200_000;
        // SAFETY: tiles configured; the multiply reads only tiles.
        let t = seconds(|| unsafe {
            for _ in 0..iterations / 4 {
                asm!(
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7"
                );
            }
        });
        println!(
            "TDPBF16PS alone: {:.1} ns each (16 × 16 × 32 multiply-adds)",
            t * 1e9 / iterations as f64
        );
        let source = vec![0u16; 8 * 512];
        // SAFETY: each load reads 16 rows of 64 bytes inside `source`.
        let t = seconds(|| unsafe {
            for _ in 0..iterations / 4 {
                asm!("tileloadd tmm4, [{0} + {1}*1]", "tileloadd tmm5, [{0} + {1}*1 + 1024]",
                     "tileloadd tmm6, [{0} + {1}*1 + 2048]", "tileloadd tmm7, [{0} + {1}*1 + 3072]",
                     in(reg) source.as_ptr(), in(reg) 64isize);
            }
        });
        println!(
            "TILELOADD alone, from L1: {:.1} ns each (1 KB)",
            t * 1e9 / iterations as f64
        );
        // SAFETY: releases this thread's tile state.
        unsafe { asm!("tilerelease") };
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    probe::main();
}
