//! Per-thread reusable scratch, so hot paths do not allocate on every call.

use std::cell::RefCell;
use std::thread::LocalKey;

/// Runs `f` on the thread-local scratch `key`. When it is already borrowed on this thread — a
/// rayon worker waiting inside `f` for a parallel GEMM steals another job, such as another
/// forward pass that reaches the same scratch — `f` gets a fresh default value instead of the
/// `RefCell` panicking.
pub(crate) fn with_scratch<T: Default, R>(
    key: &'static LocalKey<RefCell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut value) => f(&mut value),
        Err(_) => f(&mut T::default()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        static BUF: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    }

    /// A nested use on the same thread gets its own buffer; the outer one keeps its contents.
    #[test]
    fn nested_use_gets_a_fresh_value() {
        with_scratch(&BUF, |outer| {
            outer.push(1);
            with_scratch(&BUF, |inner| {
                assert!(inner.is_empty());
                inner.push(2);
            });
            assert_eq!(outer, &[1]);
        });
        with_scratch(&BUF, |again| assert_eq!(again, &[1]));
    }
}
