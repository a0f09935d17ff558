//! The compute threads: CPU kernels split their work over rayon's global pool.
//!
//! A parallel kernel called from a thread outside the pool (a program's main thread) hands
//! its pieces to the pool and sleeps until they finish: two futex round trips per op, and
//! three threads on two cores. A tiny model runs thousands of small ops per step, so that
//! hand-off dominated `megamoe train`'s profile. Called from a pool thread, the kernel runs
//! its first piece itself and the other threads steal the rest. Results are the same bits
//! either way (every kernel's pieces depend only on the shapes).

/// Runs `f` on one of the compute pool's threads and returns its result (in place when the
/// caller already is one). Wrap a whole training run or benchmark loop in it.
pub fn on_compute_threads<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_on_a_pool_thread_and_returns_the_result() {
        assert!(rayon::current_thread_index().is_none());
        let (inside, value) = on_compute_threads(|| (rayon::current_thread_index(), 41 + 1));
        assert!(inside.is_some());
        assert_eq!(value, 42);
        // nested: runs in place
        let nested = on_compute_threads(|| {
            let outer = rayon::current_thread_index();
            (outer, on_compute_threads(rayon::current_thread_index))
        });
        assert_eq!(nested.0, nested.1);
    }
}
