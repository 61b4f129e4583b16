// Salience allocates and frees large activation buffers every layer; mimalloc reuses them
// instead of returning pages to the kernel and faulting them back in (measured in `bench`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    prompt_salience::cli::main()
}
