//! The process's allocator: mimalloc for small blocks, one glibc arena for large ones.
//!
//! A salience pass keeps hundreds of MiB of activations for its backward pass (the tape) and
//! allocates and frees blocks of 0.1–10 MiB in every layer. Freed memory is kept for reuse
//! (handing it back and faulting it in again made a 600-token pass 40 % slower), so what counts
//! is whether the allocator reuses it. Under mimalloc, whose threads each place blocks from
//! their own heap, repeated passes did not: a 600-token SmolLM2 pass with every layer kept
//! peaked at 511 MiB where freed memory went straight back to the kernel, but repeated passes
//! crept to 620–640 MiB. glibc's single arena (best fit, freed neighbours merged) reuses its
//! blocks: 543 MiB over repeated passes, at mimalloc's speed once blocks are aligned to 64
//! bytes (with glibc's 16 the kernels ran 7 % slower). That is what lets the tape keep every
//! layer of a 600-token pass within the 600 MiB goal (`TAPE_BUDGET_BYTES`).
//!
//! Large blocks go back to the kernel once none has been freed for 10 s (a thread started by
//! `release_when_idle` checks each second), as mimalloc does with the small ones (`configure`).
//! Elsewhere than Linux with glibc every block goes to mimalloc.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Blocks of at least this many bytes come from glibc. Below 64 KiB the mimalloc part still
/// crept (a threshold of 1 MiB peaked at 617–637 MiB: keys, values and per-head blocks are
/// 0.1–0.5 MiB); 16 KiB peaked the same as 64.
pub const LARGE_BYTES: usize = 64 << 10;

/// Large blocks start on a cache line: the vector kernels read them in 64-byte lines.
const LARGE_ALIGN: usize = 64;

/// Free large memory goes back to the kernel after this long without a large block freed.
pub const IDLE_BEFORE_RELEASE: Duration = Duration::from_secs(10);

/// Large blocks freed so far: the releasing thread watches it for quiet.
static LARGE_FREES: AtomicUsize = AtomicUsize::new(0);

/// The global allocator (see the module's documentation).
pub struct Allocator;

#[inline]
fn is_large(size: usize) -> bool {
    glibc::AVAILABLE && size >= LARGE_BYTES
}

// SAFETY: every block is freed by the allocator that made it: the layout passed to `dealloc`
// and `realloc` is the one it was allocated with (GlobalAlloc's contract), and `is_large` of
// its size picks the same side both times.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if is_large(layout.size()) {
            glibc::alloc(layout.size(), layout.align().max(LARGE_ALIGN))
        } else {
            mimalloc::MiMalloc.alloc(layout)
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if is_large(layout.size()) {
            let p = glibc::alloc(layout.size(), layout.align().max(LARGE_ALIGN));
            if !p.is_null() {
                std::ptr::write_bytes(p, 0, layout.size());
            }
            p
        } else {
            mimalloc::MiMalloc.alloc_zeroed(layout)
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if is_large(layout.size()) {
            LARGE_FREES.fetch_add(1, Ordering::Relaxed);
            glibc::free(ptr)
        } else {
            mimalloc::MiMalloc.dealloc(ptr, layout)
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !is_large(layout.size()) && !is_large(new_size) {
            return mimalloc::MiMalloc.realloc(ptr, layout, new_size);
        }
        // glibc's realloc would not keep the alignment; a copy is what a move costs anyway.
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        let new = self.alloc(new_layout);
        if !new.is_null() {
            std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
            self.dealloc(ptr, layout);
        }
        new
    }
}

/// mimalloc's `mi_option_purge_delay` (the same index in its v2 and v3 headers).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Sets both allocators up. Call it first thing in `main`, before any thread starts.
///
/// glibc, for the large blocks: one arena for every thread (per-thread arenas hold their own
/// free blocks, which is the creep this module avoids), blocks up to 32 MiB (glibc's largest
/// threshold) from that arena rather than from fresh mappings, and no trimming but
/// `release_free_memory`'s.
///
/// mimalloc hands freed memory back to the kernel after 1 s by default. A salience pass frees
/// and reallocates its buffers for several seconds, so pages were faulted back in and zeroed
/// by the kernel over and over (16 % of an integrated-gradients run in `perf`, when its
/// activations were mimalloc's too). It keeps them for `IDLE_BEFORE_RELEASE` instead, as the
/// large blocks are kept (`MIMALLOC_PURGE_DELAY` set by the user wins).
pub fn configure() {
    glibc::configure();
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        let ms = IDLE_BEFORE_RELEASE.as_millis() as std::ffi::c_long;
        // SAFETY: sets a plain integer option; mimalloc reads it when it next purges.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, ms) };
    }
}

/// Hands free memory back to the kernel: glibc's free large blocks, and the calling thread's
/// free mimalloc pages.
pub fn release_free_memory() {
    glibc::trim();
    // SAFETY: asks mimalloc to free its empty pages; no pointer is involved.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// Starts the thread that releases free large memory once `IDLE_BEFORE_RELEASE` passes
/// without a large block freed (after work, not during it).
pub fn release_when_idle() {
    const POLL: Duration = Duration::from_secs(1);
    let spawned = std::thread::Builder::new()
        .name("release-memory".into())
        .spawn(|| {
            // Frees before the thread started count as new: their memory is released too.
            let mut seen = 0;
            let mut quiet = Duration::ZERO;
            let mut released = true;
            loop {
                std::thread::sleep(POLL);
                let frees = LARGE_FREES.load(Ordering::Relaxed);
                if frees != seen {
                    (seen, quiet, released) = (frees, Duration::ZERO, false);
                    continue;
                }
                quiet += POLL;
                if !released && quiet >= IDLE_BEFORE_RELEASE {
                    glibc::trim();
                    released = true;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("free memory will not be handed back while idle: {e}");
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    pub const AVAILABLE: bool = true;

    pub unsafe fn alloc(size: usize, align: usize) -> *mut u8 {
        let mut p: *mut libc::c_void = std::ptr::null_mut();
        if libc::posix_memalign(&mut p, align, size) != 0 {
            return std::ptr::null_mut();
        }
        p.cast()
    }

    pub unsafe fn free(ptr: *mut u8) {
        libc::free(ptr.cast())
    }

    pub fn configure() {
        // SAFETY: plain integer options, set before other threads allocate.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
        }
    }

    pub fn trim() {
        // SAFETY: takes the arena's lock and returns whole free pages; no pointer is involved.
        unsafe { libc::malloc_trim(0) };
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod glibc {
    pub const AVAILABLE: bool = false;

    pub unsafe fn alloc(_: usize, _: usize) -> *mut u8 {
        unreachable!("large blocks go to mimalloc without glibc")
    }

    pub unsafe fn free(_: *mut u8) {
        unreachable!("large blocks go to mimalloc without glibc")
    }

    pub fn configure() {}

    pub fn trim() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize) -> Layout {
        Layout::from_size_align(size, 4).unwrap()
    }

    #[test]
    fn large_blocks_start_on_a_cache_line_and_hold_their_bytes() {
        let a = Allocator;
        for size in [LARGE_BYTES, LARGE_BYTES + 4, 3 << 20] {
            // SAFETY: a non-zero layout; the block is written within its size and freed once.
            unsafe {
                let p = a.alloc(layout(size));
                assert!(!p.is_null());
                if glibc::AVAILABLE {
                    assert_eq!(p as usize % LARGE_ALIGN, 0, "{size} bytes");
                }
                std::ptr::write_bytes(p, 0xab, size);
                assert_eq!(*p.add(size - 1), 0xab);
                a.dealloc(p, layout(size));
            }
        }
    }

    #[test]
    fn zeroed_blocks_are_zero_even_where_freed_memory_is_reused() {
        let a = Allocator;
        for size in [100, LARGE_BYTES, 1 << 20] {
            // SAFETY: as above; every block is read within its size.
            unsafe {
                for _ in 0..3 {
                    let dirty = a.alloc(layout(size));
                    std::ptr::write_bytes(dirty, 0xff, size);
                    a.dealloc(dirty, layout(size));
                    let p = a.alloc_zeroed(layout(size));
                    let bytes = std::slice::from_raw_parts(p, size);
                    assert!(bytes.iter().all(|&b| b == 0), "{size} bytes");
                    a.dealloc(p, layout(size));
                }
            }
        }
    }

    #[test]
    fn realloc_keeps_the_contents_across_the_threshold_both_ways() {
        let a = Allocator;
        let sizes = [
            1000,
            LARGE_BYTES - 1,
            LARGE_BYTES,
            5 * LARGE_BYTES,
            LARGE_BYTES + 8,
            512,
        ];
        // SAFETY: each realloc gets the layout the block has now; reads stay within the
        // smaller of the two sizes.
        unsafe {
            let mut p = a.alloc(layout(sizes[0]));
            for (i, b) in std::slice::from_raw_parts_mut(p, sizes[0])
                .iter_mut()
                .enumerate()
            {
                *b = (i % 251) as u8;
            }
            let mut size = sizes[0];
            for &next in &sizes[1..] {
                p = a.realloc(p, layout(size), next);
                assert!(!p.is_null());
                let kept = size.min(next).min(sizes[0]);
                let bytes = std::slice::from_raw_parts(p, kept);
                assert!(
                    bytes.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8),
                    "{size} -> {next} bytes"
                );
                if glibc::AVAILABLE && is_large(next) {
                    assert_eq!(p as usize % LARGE_ALIGN, 0);
                }
                size = next;
            }
            a.dealloc(p, layout(size));
        }
    }

    #[test]
    fn freeing_large_blocks_is_counted_for_the_idle_release() {
        if !glibc::AVAILABLE {
            return;
        }
        let a = Allocator;
        let before = LARGE_FREES.load(Ordering::Relaxed);
        // SAFETY: allocated and freed with the same layouts.
        unsafe {
            let small = a.alloc(layout(64));
            a.dealloc(small, layout(64));
            let large = a.alloc(layout(LARGE_BYTES));
            a.dealloc(large, layout(LARGE_BYTES));
        }
        // Other tests free large blocks too: at least this one was counted.
        assert!(LARGE_FREES.load(Ordering::Relaxed) > before);
        release_free_memory();
    }
}
