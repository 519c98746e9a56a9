//! Backend selection: the best one this CPU runs, or the one `SQ_KERNEL` names.

use crate::error::{KernelError, Result};
use crate::int8::{Avx512Vnni, AvxVnni, Int8Gemm, Portable, Reference};
use std::sync::Arc;

/// Environment variable that forces a backend: `reference`, `avx512vnni`, `avxvnni` or
/// `portable`.
pub const BACKEND_ENV: &str = "SQ_KERNEL";

/// Every backend name, fastest first.
pub const BACKEND_NAMES: [&str; 4] = [
    Avx512Vnni::NAME,
    AvxVnni::NAME,
    Portable::NAME,
    Reference::NAME,
];

/// Names of the backends this CPU can run, fastest first.
pub fn available_backends() -> Vec<&'static str> {
    BACKEND_NAMES
        .into_iter()
        .filter(|name| backend_by_name(name).is_ok())
        .collect()
}

/// The backend called `name` (case-insensitive), or an error if it is unknown or this CPU
/// lacks its instructions.
pub fn backend_by_name(name: &str) -> Result<Arc<dyn Int8Gemm>> {
    let unavailable = |name: &'static str, needs: &str| KernelError::BackendUnavailable {
        name,
        reason: format!("the CPU does not report {needs}"),
    };
    match name.trim().to_ascii_lowercase().as_str() {
        "reference" => Ok(Arc::new(Reference)),
        "portable" => Ok(Arc::new(Portable)),
        "avx512vnni" => Avx512Vnni::new()
            .map(|b| Arc::new(b) as Arc<dyn Int8Gemm>)
            .ok_or_else(|| unavailable(Avx512Vnni::NAME, "AVX-512 F, BW and VNNI")),
        "avxvnni" => AvxVnni::new()
            .map(|b| Arc::new(b) as Arc<dyn Int8Gemm>)
            .ok_or_else(|| unavailable(AvxVnni::NAME, "AVX2 and AVX-VNNI")),
        _ => Err(KernelError::UnknownBackend {
            name: name.to_string(),
        }),
    }
}

/// The backend named by `forced` if given, else the fastest available (never `reference`).
pub fn select_backend_with(forced: Option<&str>) -> Result<Arc<dyn Int8Gemm>> {
    match forced.map(str::trim).filter(|s| !s.is_empty()) {
        Some(name) => backend_by_name(name),
        None => [Avx512Vnni::NAME, AvxVnni::NAME, Portable::NAME]
            .into_iter()
            .find_map(|name| backend_by_name(name).ok())
            .ok_or_else(|| KernelError::BackendUnavailable {
                name: Portable::NAME,
                reason: "no backend could be constructed".into(),
            }),
    }
}

/// The backend `SQ_KERNEL` names, or the fastest available when it is unset or empty.
/// A forced backend this CPU cannot run is an error, not a silent fallback.
pub fn select_backend() -> Result<Arc<dyn Int8Gemm>> {
    let forced = std::env::var(BACKEND_ENV).ok();
    select_backend_with(forced.as_deref())
}
