//! What this machine's cores can do: the multiply-add limit that `bench` reads its speeds
//! against, measured in the same run as the speeds (on a shared host the limit itself moves
//! between minutes, see `docs/bench/contention_probe.rs`).
//!
//! The register tiles of the salience passes run one multiply-add stream per core in the
//! widest registers the CPU has (`Kernel::best`); no product can beat independent chains of
//! those multiply-adds on every thread of the pool at once, so their rate is the ceiling of
//! every GFLOP/s figure `bench` prints.

use std::time::{Duration, Instant};

use crate::model::Kernel;

/// Independent chains: enough to keep two multiply-add ports busy through their latency
/// (4–5 cycles on current x86 cores).
const CHAINS: usize = 12;

/// Steps of every chain between two looks at the clock.
const STEPS: usize = 1 << 14;

/// The chains' update x ← x·A + B from x = 0: 1 - 2⁻ⁿ after n steps, exact in f32 for n up to
/// 24 (the tests check it), then 1 for good: no value turns subnormal or infinite.
const A: f32 = 0.5;
const B: f32 = 0.5;

/// What the pool's threads reached together.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MultiplyAddLimit {
    /// Floating-point operations per second (2 per multiply-add), all threads together.
    pub flops_per_second: f64,
    pub threads: usize,
    pub kernel: Kernel,
}

/// The multiply-add limit of the pool's threads with this CPU's widest kernel, measured for
/// about `time` on every thread at once.
pub fn multiply_add_limit(time: Duration) -> MultiplyAddLimit {
    multiply_add_limit_with(Kernel::best(), time)
}

/// `multiply_add_limit` with the given kernel (the tests run each one the CPU has).
pub fn multiply_add_limit_with(kernel: Kernel, time: Duration) -> MultiplyAddLimit {
    let per_thread: Vec<(f64, Duration)> = rayon::broadcast(|_| {
        let started = Instant::now();
        let mut flops = 0.0;
        let mut sink = 0.0;
        while started.elapsed() < time {
            let (ops, sum) = chains(kernel, STEPS);
            flops += ops;
            sink += sum;
        }
        std::hint::black_box(sink);
        (flops, started.elapsed())
    });
    let threads = per_thread.len();
    let flops: f64 = per_thread.iter().map(|(f, _)| f).sum();
    // The slowest thread's time: the threads ran at once, and the last one bounds them.
    let longest = per_thread
        .iter()
        .map(|(_, t)| t.as_secs_f64())
        .fold(0.0, f64::max);
    MultiplyAddLimit {
        flops_per_second: flops / longest,
        threads,
        kernel,
    }
}

/// Whether this CPU runs 512-bit multiply-adds at about twice the rate of 256-bit ones (Intel
/// Xeons with two 512-bit FMA units), rather than at the same rate (AMD Zen 4 runs each 512-bit
/// instruction through its 256-bit units in two halves). False without AVX-512. Measured once,
/// on the calling thread: the best of a few short runs of each width, alternating, so that a
/// busy moment on a shared host slows one run, not the answer.
pub fn wide_multiply_adds() -> bool {
    static WIDE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WIDE.get_or_init(|| {
        if !Kernel::available().contains(&Kernel::Avx512) {
            return false;
        }
        let rate = |kernel: Kernel| {
            let started = Instant::now();
            let (ops, sum) = chains(kernel, STEPS / 4);
            std::hint::black_box(sum);
            ops / started.elapsed().as_secs_f64()
        };
        let (mut wide, mut narrow) = (0f64, 0f64);
        for _ in 0..5 {
            wide = wide.max(rate(Kernel::Avx512));
            narrow = narrow.max(rate(Kernel::Avx2));
        }
        let answer = twice_the_rate(wide, narrow);
        tracing::debug!(
            "512-bit multiply-adds {:.1} GFLOP/s, 256-bit {:.1}: wide = {answer}",
            wide / 1e9,
            narrow / 1e9
        );
        answer
    })
}

/// The call on two measured rates: the widths differ by 2× where 512 bits run at full rate
/// and not at all where they run in halves, so the middle separates them.
fn twice_the_rate(rate_512: f64, rate_256: f64) -> bool {
    rate_512 > 1.5 * rate_256
}

/// Runs `steps` of the chains with `kernel`: (floating-point operations done, the sum of the
/// chains' final values, in f64: the tests know it).
fn chains(kernel: Kernel, steps: usize) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    match kernel {
        // SAFETY: `Kernel::available` lists only kernels whose features the CPU has.
        Kernel::Avx512 => return unsafe { x86::avx512(steps) },
        Kernel::Avx2 => return unsafe { x86::avx2(steps) },
        Kernel::Portable => {}
    }
    let _ = kernel;
    portable(steps)
}

/// Eight lanes per chain in plain arrays, which the compiler turns into the vector
/// instructions of the build's baseline (SSE2 on x86-64): what the portable tile gets.
fn portable(steps: usize) -> (f64, f64) {
    let mut acc = [[0.0f32; 8]; CHAINS];
    for _ in 0..steps {
        for chain in acc.iter_mut() {
            for x in chain.iter_mut() {
                *x = *x * A + B;
            }
        }
    }
    totals(steps, &acc)
}

/// (floating-point operations, the sum of every lane) after `steps` of the chains whose final
/// lanes are `lanes`.
fn totals<const W: usize>(steps: usize, lanes: &[[f32; W]; CHAINS]) -> (f64, f64) {
    let ops = 2.0 * (steps * CHAINS * W) as f64;
    (ops, lanes.iter().flatten().map(|&x| f64::from(x)).sum())
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{totals, A, B, CHAINS};
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512(steps: usize) -> (f64, f64) {
        let mut acc = [_mm512_set1_ps(0.0); CHAINS];
        let (a, b) = (_mm512_set1_ps(A), _mm512_set1_ps(B));
        for _ in 0..steps {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        let mut lanes = [[0f32; 16]; CHAINS];
        for (v, out) in acc.iter().zip(&mut lanes) {
            _mm512_storeu_ps(out.as_mut_ptr(), *v);
        }
        totals(steps, &lanes)
    }

    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2(steps: usize) -> (f64, f64) {
        let mut acc = [_mm256_set1_ps(0.0); CHAINS];
        let (a, b) = (_mm256_set1_ps(A), _mm256_set1_ps(B));
        for _ in 0..steps {
            for v in acc.iter_mut() {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        let mut lanes = [[0f32; 8]; CHAINS];
        for (v, out) in acc.iter().zip(&mut lanes) {
            _mm256_storeu_ps(out.as_mut_ptr(), *v);
        }
        totals(steps, &lanes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_runs_every_step_it_counts() {
        // Every lane holds 1 - 2⁻ⁿ after n steps (exactly, up to 24): a kernel that skipped
        // steps or chains, or counted lanes it does not have, fails this.
        for kernel in Kernel::available() {
            for steps in [1, 3, 10, 20, STEPS] {
                let (ops, sum) = chains(kernel, steps);
                let lanes = ops / (2.0 * (steps * CHAINS) as f64);
                let lane = if steps <= 24 {
                    1.0 - 0.5f64.powi(steps as i32)
                } else {
                    1.0
                };
                let want = lanes * CHAINS as f64 * lane;
                assert_eq!(sum, want, "{kernel:?}, {steps} steps");
                let expected_lanes = match kernel {
                    Kernel::Avx512 => 16.0,
                    _ => 8.0,
                };
                assert_eq!(lanes, expected_lanes, "{kernel:?}");
            }
        }
    }

    #[test]
    fn wide_multiply_adds_are_told_from_halves() {
        assert!(twice_the_rate(2.0e11, 1.0e11));
        assert!(!twice_the_rate(1.05e11, 1.0e11));
        assert!(!twice_the_rate(0.9e11, 1.0e11));
        if !Kernel::available().contains(&Kernel::Avx512) {
            assert!(!wide_multiply_adds());
        }
        // Asked again: the same answer, measured once.
        assert_eq!(wide_multiply_adds(), wide_multiply_adds());
    }

    #[test]
    fn the_limit_is_measured_on_every_thread() {
        for kernel in Kernel::available() {
            let limit = multiply_add_limit_with(kernel, Duration::from_millis(20));
            assert_eq!(limit.threads, rayon::current_num_threads());
            assert_eq!(limit.kernel, kernel);
            // At least one multiply-add stream's worth of a slow core: 0.5 GFLOP/s.
            assert!(
                limit.flops_per_second.is_finite() && limit.flops_per_second > 5e8,
                "{kernel:?}: {limit:?}"
            );
        }
    }
}
