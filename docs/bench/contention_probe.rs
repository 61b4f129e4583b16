//! How busy is the host right now? A probe for telling a fast hour from a slow one on a shared
//! machine before trusting a speed figure. Not part of the build:
//!
//!     rustc -O -C target-cpu=native docs/bench/contention_probe.rs -o /tmp/contention_probe && /tmp/contention_probe
//!
//! It times, on one thread and on two, loops that each lean on one resource the host's other
//! tenants may share with us: multiply-adds alone, 256-bit (AVX2 + FMA) and, where the CPU has
//! it, 512-bit (AVX-512F) — the multiply-add units, which the salience passes' register tile
//! keeps full —, integer multiplies (the scalar units), and a sum over 256 MiB (memory
//! bandwidth). Compare its figures between hours: the sixteenth round of
//! `docs/performance-log.md` found a slow hour slowing gradient passes 2.1× while the
//! multiply-add loop slowed 1.4–1.6×. The 256-bit loop's figure is also the ceiling of the
//! AVX2 register tile: 32 flops per cycle per core on CPUs with two 256-bit FMA units.

use std::time::Instant;

/// Twelve independent chains: enough to keep two multiply-add ports busy through their latency.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn multiply_adds(n: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_set1_ps(0.0); 12];
    let (a, b) = (_mm512_set1_ps(1.000_000_1), _mm512_set1_ps(0.999_999_9));
    for _ in 0..n {
        for v in acc.iter_mut() {
            *v = _mm512_fmadd_ps(*v, a, b);
        }
    }
    acc.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
}

/// The same twelve chains in 256-bit registers (the AVX2 kernels' width).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn multiply_adds_256(n: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_set1_ps(0.0); 12];
    let (a, b) = (_mm256_set1_ps(1.000_000_1), _mm256_set1_ps(0.999_999_9));
    for _ in 0..n {
        for v in acc.iter_mut() {
            *v = _mm256_fmadd_ps(*v, a, b);
        }
    }
    let mut lanes = [0f32; 8];
    let sum = acc
        .iter()
        .fold(_mm256_setzero_ps(), |s, &v| _mm256_add_ps(s, v));
    _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
    lanes.iter().sum()
}

fn integer_multiplies(n: usize) -> u64 {
    let mut x = [1u64, 2, 3, 4, 5, 6, 7, 8];
    for i in 0..n as u64 {
        for (k, v) in x.iter_mut().enumerate() {
            *v = v
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(i ^ k as u64);
        }
    }
    x.iter().fold(0, |a, b| a ^ b)
}

/// Integer sums vectorize, so the loop is bound by memory, not by an add's latency.
fn memory_sum(data: &[u32], passes: usize) -> u64 {
    let mut total = 0u64;
    for _ in 0..passes {
        total = total.wrapping_add(data.iter().map(|&x| u64::from(x)).sum::<u64>());
    }
    total
}

/// Seconds for `threads` threads each running `work` once.
fn timed<T: Send + 'static>(threads: usize, work: fn() -> T) -> f64 {
    let started = Instant::now();
    let handles: Vec<_> = (0..threads).map(|_| std::thread::spawn(work)).collect();
    for h in handles {
        std::hint::black_box(h.join().unwrap());
    }
    started.elapsed().as_secs_f64()
}

const FMA_STEPS: usize = 100_000_000;
const INT_STEPS: usize = 50_000_000;
const MEMORY_WORDS: usize = 64 << 20;
const MEMORY_PASSES: usize = 4;

/// The multiply-add loops this CPU runs, as (lanes, loop): 256-bit, then 512-bit.
#[cfg(target_arch = "x86_64")]
fn multiply_add_loops() -> [Option<(usize, fn() -> f32)>; 2] {
    let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
    let avx512 = std::is_x86_feature_detected!("avx512f");
    // SAFETY (both loops): each is offered only where the CPU has its features.
    let avx2_loop: fn() -> f32 = || unsafe { multiply_adds_256(FMA_STEPS) };
    let avx512_loop: fn() -> f32 = || unsafe { multiply_adds(FMA_STEPS) };
    [
        avx2.then_some((8, avx2_loop)),
        avx512.then_some((16, avx512_loop)),
    ]
}

#[cfg(not(target_arch = "x86_64"))]
fn multiply_add_loops() -> [Option<(usize, fn() -> f32)>; 2] {
    [None, None]
}

fn main() {
    println!("| threads | AVX2 multiply-adds, GFLOP/s | AVX-512 multiply-adds, GFLOP/s | integer loop, s | memory sum, GB/s |");
    println!("|---|---|---|---|---|");
    let loops = multiply_add_loops();
    for threads in [1, 2] {
        // GFLOP/s of `threads` threads each running FMA_STEPS steps of twelve multiply-adds
        // `lanes` wide.
        let [fma256, fma] = loops.map(|found| match found {
            Some((lanes, work)) => {
                let s = timed(threads, work);
                format!(
                    "{:.0}",
                    (threads * FMA_STEPS * 12 * lanes * 2) as f64 / s / 1e9
                )
            }
            None => "not on this CPU".to_string(),
        });
        let int = timed(threads, || integer_multiplies(INT_STEPS));
        // Each thread times its own passes over its own 256 MiB, after faulting them in.
        let slowest = {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    std::thread::spawn(|| {
                        let data = vec![1u32; MEMORY_WORDS];
                        memory_sum(&data, 1);
                        let started = Instant::now();
                        std::hint::black_box(memory_sum(&data, MEMORY_PASSES));
                        started.elapsed().as_secs_f64()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .fold(0.0f64, f64::max)
        };
        let gbs = (threads * MEMORY_WORDS * 4 * MEMORY_PASSES) as f64 / slowest / 1e9;
        println!("| {threads} | {fma256} | {fma} | {int:.2} | {gbs:.1} |");
    }
}
