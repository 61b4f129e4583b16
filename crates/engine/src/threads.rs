//! Thread pools. candle runs matmuls on rayon and element-wise ops on a spinning pool of its
//! own; on a small machine the two fight for the same cores (measured: 6.4 s instead of 1.3 s
//! for one fwd+bwd on 2 cores). Matmuls get all cores, the spinning pool one thread, unless
//! the user set the variables.

use std::sync::Once;

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
/// small parallel loops in a row (a decoding step has about 200) then splits them from inside
/// the pool, where idle workers steal at once, instead of injecting each one from outside.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let mut out = None;
    rayon::scope(|_| out = Some(f()));
    out.expect("the scope ran its body")
}
