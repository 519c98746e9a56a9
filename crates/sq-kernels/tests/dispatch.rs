//! Backend selection. One test per process touches `SQ_KERNEL`, so it lives alone here.

use sq_kernels::{
    available_backends, backend_by_name, select_backend, select_backend_with, KernelError,
    BACKEND_ENV,
};

fn cpu_has_avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[test]
fn dispatcher_picks_the_best_backend_and_honors_sq_kernel() {
    // SAFETY (edition 2021: safe): this is the only test in this binary.
    std::env::remove_var(BACKEND_ENV);
    let best = select_backend().unwrap();
    if cpu_has_avx512_vnni() {
        assert_eq!(best.name(), "avx512vnni");
    } else {
        eprintln!(
            "skipping the avx512vnni check: this CPU lacks AVX-512 VNNI (picked {})",
            best.name()
        );
        assert_ne!(best.name(), "reference");
    }

    let available = available_backends();
    assert!(available.contains(&"reference") && available.contains(&"portable"));
    for name in ["reference", "avx512vnni", "avxvnni", "portable"] {
        std::env::set_var(BACKEND_ENV, name);
        match select_backend() {
            Ok(b) => {
                assert_eq!(b.name(), name);
                assert!(available.contains(&name));
            }
            Err(KernelError::BackendUnavailable { name: n, reason }) => {
                assert_eq!(n, name);
                assert!(!available.contains(&name));
                eprintln!("SQ_KERNEL={name}: unavailable here ({reason})");
            }
            Err(e) => panic!("SQ_KERNEL={name}: unexpected error {e}"),
        }
    }
    std::env::set_var(BACKEND_ENV, "AVX512VNNI ");
    assert_eq!(select_backend().is_ok(), cpu_has_avx512_vnni());
    std::env::set_var(BACKEND_ENV, "fast");
    let err = select_backend().unwrap_err();
    assert!(matches!(err, KernelError::UnknownBackend { .. }), "{err}");
    assert!(err.to_string().contains("fast"));
    std::env::set_var(BACKEND_ENV, "");
    assert_eq!(select_backend().unwrap().name(), best.name());
    std::env::remove_var(BACKEND_ENV);

    assert_eq!(
        select_backend_with(Some("portable")).unwrap().name(),
        "portable"
    );
    assert_eq!(select_backend_with(None).unwrap().name(), best.name());
    assert_eq!(backend_by_name("avx512vnni").is_ok(), cpu_has_avx512_vnni());
}
