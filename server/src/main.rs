//! The `prompt-salience` binary: the allocator set-up, then the command line (`cli`).

// Salience allocates and frees large activation buffers every layer: large blocks come from
// one glibc arena that reuses them, small ones from mimalloc (see `allocator`).
#[global_allocator]
static GLOBAL: prompt_salience::allocator::Allocator = prompt_salience::allocator::Allocator;

fn main() -> std::process::ExitCode {
    use prompt_salience::template_sandbox;
    // The template renderer's child: nothing else of the program starts in it.
    if std::env::args().nth(1).as_deref() == Some(template_sandbox::SUBCOMMAND) {
        return template_sandbox::child_main();
    }
    prompt_salience::allocator::configure();
    prompt_salience::memory_pages::small_pages_only();
    prompt_salience::allocator::release_when_idle();
    salience_engine::chat_template::isolate_with(template_sandbox::render);
    prompt_salience::cli::main()
}
