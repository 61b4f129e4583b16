//! The program's allocator keeps freed large blocks for the next pass, then hands them back
//! to the kernel once no large block has been freed for a while (`allocator.rs`). Its own
//! test binary, without the test harness: glibc's arena must be set up before any thread
//! allocates, as the program's `main` does.

#[global_allocator]
static ALLOCATOR: prompt_salience::allocator::Allocator = prompt_salience::allocator::Allocator;

/// This process's resident memory in MiB.
fn resident_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<f64>()
        .unwrap()
        / 1024.0
}

fn main() {
    use prompt_salience::allocator;
    // Before any thread allocates, as the program's `main` does.
    allocator::configure();
    let before = resident_mib();
    // 256 MiB in blocks the size of a 600-token pass's activations, written so they count.
    let blocks: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8 | 1; 4 << 20]).collect();
    let written = resident_mib();
    assert!(written - before > 200.0, "{before} -> {written} MiB");
    drop(blocks);
    // Kept while work may go on: a pass that follows reuses them without faulting them in.
    let kept = resident_mib();
    assert!(
        kept - before > 200.0,
        "freed at once: {before} -> {kept} MiB"
    );
    allocator::release_when_idle();
    let start = std::time::Instant::now();
    let limit = allocator::IDLE_BEFORE_RELEASE + std::time::Duration::from_secs(10);
    while resident_mib() - before > 32.0 {
        assert!(
            start.elapsed() < limit,
            "not handed back: {} MiB after {:?}",
            resident_mib(),
            start.elapsed()
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    // Not before the idle time: work that pauses briefly keeps its memory.
    assert!(
        start.elapsed() + std::time::Duration::from_secs(1) >= allocator::IDLE_BEFORE_RELEASE,
        "handed back after {:?}",
        start.elapsed()
    );
    println!(
        "kept {:.0} MiB after freeing, {:.0} after {:.1?} idle: ok",
        kept - before,
        resident_mib() - before,
        start.elapsed()
    );
}
