//! SIGINT / SIGTERM / SIGHUP: remove the outputs still being written, then exit.
//!
//! The signals are blocked in every thread (the mask is set before any thread starts and is
//! inherited) and taken by one thread with `sigwait`, which can do ordinary work: it calls
//! [`sq_tensor::atomic::abort_in_progress`] (which waits for a commit already renaming) and
//! exits with 128 + the signal number, as a shell reports a death by signal. A previous output
//! at the target is never touched.

/// Install the handler. Call first thing in `main`, before any thread is started.
#[cfg(unix)]
pub fn install() {
    // SAFETY: plain libc calls on a zeroed, then initialised, local sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut sig: libc::c_int = 0;
                if libc::sigwait(&set, &mut sig) != 0 {
                    return;
                }
                let removed = sq_tensor::atomic::abort_in_progress();
                let name = match sig {
                    libc::SIGINT => "SIGINT",
                    libc::SIGTERM => "SIGTERM",
                    _ => "SIGHUP",
                };
                let what = if removed == 0 {
                    String::new()
                } else {
                    format!(
                        "; removed {removed} unfinished output(s), earlier outputs are unchanged"
                    )
                };
                eprintln!("\ninterrupted by {name}{what}");
                std::process::exit(128 + sig);
            });
        if spawned.is_err() {
            // Without the waiting thread the signals must keep their default action.
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
    }
}

/// Other systems keep the default signal behaviour (temporaries from an interrupted run are
/// removed by the next run that writes the same output).
#[cfg(not(unix))]
pub fn install() {}
