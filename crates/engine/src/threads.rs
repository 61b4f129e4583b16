//! Thread pools. candle runs matmuls on rayon and element-wise ops on a spinning pool of its
//! own; on a small machine the two fight for the same cores (measured: 6.4 s instead of 1.3 s
//! for one fwd+bwd on 2 cores). Matmuls get all cores, the spinning pool one thread, unless
//! the user set the variables.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};

use rayon::prelude::*;

static CONFIGURE: Once = Once::new();

/// Must run before the first candle call.
pub fn configure() {
    CONFIGURE.call_once(|| {
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            std::env::set_var("CANDLE_NUM_THREADS", "1");
        }
    });
}

/// Runs `f` on a thread of rayon's pool (the calling thread waits). Work that issues many
/// small parallel loops in a row (a decoding step has about 200, a salience pass thousands)
/// then splits them from inside the pool, where idle workers steal at once, instead of
/// injecting each one from outside.
///
/// While `f` runs, the pool's other workers stay awake looking for its work (`keep_stealing`)
/// instead of going to sleep after a few dozen idle rounds, as rayon's do: between two
/// parallel loops there is often a stretch of single-threaded work longer than that, and
/// waking a sleeping worker for the next loop cost more than the loop's first chunks
/// (context switches were 5 % of a 100-token pass). Measured on 2 cores, alternating runs:
/// gradient salience at 100 tokens 0.262–0.271 → 0.241–0.254 s, decoding 125 → 133–135
/// tokens/s, a 100-token prefill 0.102–0.109 → 0.094–0.102 s (300 tokens: within noise).
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let mut out = None;
    rayon::scope(|_| {
        let done = Arc::new(AtomicBool::new(false));
        // Set however `f` ends, a panic included: the other workers must not spin on.
        let _finish = Finish(done.clone());
        let home = rayon::current_thread_index();
        rayon::spawn_broadcast(move |worker| {
            // `f`'s own thread runs this inside one of `f`'s waits, or after `f`: it must
            // return at once there (it would otherwise wait on the work it interrupts).
            if Some(worker.index()) != home {
                keep_stealing(&done);
            }
        });
        out = Some(f());
    });
    out.expect("the scope ran its body")
}

/// Runs the pool's pending jobs as they come until `done`, yielding the core between looks
/// (other processes, and the language server's own threads, still get it).
fn keep_stealing(done: &AtomicBool) {
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() != Some(rayon::Yield::Executed) {
            std::thread::yield_now();
        }
    }
}

/// `work` on each of `jobs`, the results in the jobs' order. One task per thread takes the
/// jobs one at a time, costliest first, so that the threads finish together even when the
/// jobs' costs differ (attention's blocks of queries cost more the more keys they see) or a
/// thread runs slower: rayon's even split of the list up front left one thread waiting for
/// the other at the end (600 tokens, SmolLM2: attention's backward 9.3–9.4 → 8.2–8.3 ms per
/// layer).
pub fn costliest_first<J: Send, R: Send>(
    jobs: Vec<J>,
    cost: impl Fn(&J) -> usize,
    work: impl Fn(J) -> R + Sync,
) -> Vec<R> {
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_cached_key(|&i| std::cmp::Reverse(cost(&jobs[i])));
    let jobs: Vec<Mutex<Option<J>>> = jobs.into_iter().map(|j| Mutex::new(Some(j))).collect();
    let next = AtomicUsize::new(0);
    let tasks = rayon::current_num_threads().min(jobs.len());
    let mut done: Vec<(usize, R)> = (0..tasks)
        .into_par_iter()
        .flat_map_iter(|_| {
            let mut mine = Vec::new();
            while let Some(&i) = order.get(next.fetch_add(1, Ordering::Relaxed)) {
                let job = jobs[i].lock().map(|mut j| j.take());
                let job = job.unwrap_or_else(|e| e.into_inner().take());
                mine.push((i, work(job.expect("each job is handed out once"))));
            }
            mine
        })
        .collect();
    done.sort_by_key(|&(i, _)| i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// Marks the work done when dropped.
struct Finish(Arc<AtomicBool>);

impl Drop for Finish {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Callers on several threads at once (each one's helpers may end up running inside
    /// another's waits) all finish with their own results, and a panic in one reaches its
    /// caller and leaves the pool working.
    #[test]
    fn work_on_the_pool_finishes_when_callers_overlap_or_panic() {
        let callers: Vec<_> = (0..4u64)
            .map(|i| {
                std::thread::spawn(move || {
                    on_pool(|| {
                        (0..200u64)
                            .map(|round| {
                                (0..10_000u64).into_par_iter().map(|x| x * i + round).sum()
                            })
                            .collect::<Vec<u64>>()
                    })
                })
            })
            .collect();
        for (i, caller) in callers.into_iter().enumerate() {
            let sums = caller.join().expect("the caller finished");
            for (round, sum) in sums.into_iter().enumerate() {
                assert_eq!(sum, 49_995_000 * i as u64 + 10_000 * round as u64);
            }
        }
        let failed = std::panic::catch_unwind(|| on_pool(|| -> u32 { panic!("inside the pool") }));
        assert!(failed.is_err());
        assert_eq!(on_pool(|| (0..100u32).into_par_iter().sum::<u32>()), 4950);
    }

    #[test]
    fn costliest_first_runs_each_job_once_and_keeps_their_order() {
        let jobs: Vec<usize> = (0..50).map(|i| (i * 37) % 50).collect();
        let ran = AtomicUsize::new(0);
        let out = costliest_first(
            jobs.clone(),
            |&j| j,
            |j| {
                ran.fetch_add(1, Ordering::Relaxed);
                j * 2
            },
        );
        assert_eq!(ran.load(Ordering::Relaxed), 50);
        assert_eq!(out, jobs.iter().map(|j| j * 2).collect::<Vec<_>>());
        assert!(costliest_first(Vec::<usize>::new(), |_| 0, |j| j).is_empty());
    }
}
