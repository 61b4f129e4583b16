//! The `prompt-salience` binary: the allocator set-up, then the command line (`cli`).

// Salience allocates and frees large activation buffers every layer: large blocks come from
// one glibc arena that reuses them, small ones from mimalloc (see `allocator`).
#[global_allocator]
static GLOBAL: prompt_salience::allocator::Allocator = prompt_salience::allocator::Allocator;

/// mimalloc's `mi_option_purge_delay` (the same index in its v2 and v3 headers).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// mimalloc hands freed memory back to the kernel after 1 s by default. A salience pass frees
/// and reallocates its buffers for several seconds, so pages were faulted back in and zeroed
/// by the kernel over and over (16 % of an integrated-gradients run in `perf`, when its
/// activations were mimalloc's too). Keeping them for 10 s covers a computation; an idle
/// server still returns them, as it does the large blocks (`allocator::release_when_idle`).
fn keep_freed_memory_for_a_while() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a plain integer option; mimalloc reads it when it next purges.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 10_000) };
    }
}

fn main() -> std::process::ExitCode {
    use prompt_salience::template_sandbox;
    // The template renderer's child: nothing else of the program starts in it.
    if std::env::args().nth(1).as_deref() == Some(template_sandbox::SUBCOMMAND) {
        return template_sandbox::child_main();
    }
    prompt_salience::allocator::configure();
    prompt_salience::memory_pages::small_pages_only();
    keep_freed_memory_for_a_while();
    prompt_salience::allocator::release_when_idle();
    salience_engine::chat_template::isolate_with(template_sandbox::render);
    prompt_salience::cli::main()
}
