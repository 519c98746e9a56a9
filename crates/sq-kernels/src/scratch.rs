//! Per-thread reusable buffers, so hot paths do not allocate on every call.

use std::cell::RefCell;
use std::thread::LocalKey;

/// Runs `f` on a thread-local buffer resized to `len` (contents unspecified but initialized).
///
/// When the buffer is already borrowed on this thread (a rayon worker that stole a nested job
/// while waiting inside `f`), a fresh buffer is used instead of panicking.
pub(crate) fn with_buffer<T: Copy + Default, R>(
    key: &'static LocalKey<RefCell<Vec<T>>>,
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, T::default());
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![T::default(); len]),
    })
}

/// A raw const pointer that may cross to rayon workers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SendConstPtr<T>(pub *const T);
// SAFETY: read-only access to data that outlives the parallel section.
unsafe impl<T> Send for SendConstPtr<T> {}
unsafe impl<T> Sync for SendConstPtr<T> {}
