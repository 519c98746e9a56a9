//! Tidy checks: the repository's own rules, as tests.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: impl AsRef<Path>) -> String {
    let path = root().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Same rule as `cargo xtask test-command`: the first README line starting with `cargo test`.
fn readme_test_command() -> String {
    read("README.md")
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("cargo test") || l.starts_with("cargo nextest run"))
        .expect("README.md names a test command")
        .to_string()
}

#[test]
fn ci_runs_the_readme_test_command() {
    let cmd = readme_test_command();
    let ci = read(".ci/run");
    assert!(
        ci.lines().any(|l| l.trim() == cmd),
        ".ci/run must run the README test command `{cmd}` verbatim on a line of its own"
    );
    assert!(
        ci.contains("cargo xtask ci --no-test"),
        ".ci/run must run fmt and clippy"
    );
}

/// The layer order: a crate may depend only on crates to its left.
const LAYERS: [&str; 6] = [
    "sq-tensor",
    "sq-kernels",
    "sq-model",
    "sq-calib",
    "sq-smooth",
    "sq-cli",
];

fn dependency_section_crates(manifest: &str) -> Vec<String> {
    let mut deps = Vec::new();
    let mut in_deps = false;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_deps = line == "[dependencies]"
                || line.starts_with("[target.") && line.ends_with(".dependencies]");
            continue;
        }
        if in_deps {
            if let Some(name) = line.split(['=', '.', ' ']).next() {
                if name.starts_with("sq-") {
                    deps.push(name.to_string());
                }
            }
        }
    }
    deps
}

#[test]
fn crates_depend_only_downward() {
    for (level, krate) in LAYERS.iter().enumerate() {
        let manifest = read(format!("crates/{krate}/Cargo.toml"));
        for dep in dependency_section_crates(&manifest) {
            let dep_level = LAYERS
                .iter()
                .position(|l| *l == dep)
                .unwrap_or_else(|| panic!("{krate} depends on unknown crate {dep}"));
            assert!(
                dep_level < level,
                "{krate} depends on {dep}, which is not below it (order: {LAYERS:?})"
            );
        }
    }
}

#[test]
fn every_crate_has_a_readme_and_a_doc_example() {
    for krate in LAYERS {
        let dir = root().join("crates").join(krate);
        let readme = dir.join("README.md");
        assert!(readme.is_file(), "{} is missing", readme.display());
        if krate == "sq-cli" {
            continue;
        }
        let lib = read(dir.join("src/lib.rs"));
        assert!(
            lib.lines().any(|l| l.trim_start().starts_with("//! ```")),
            "crates/{krate}/src/lib.rs needs a crate-level example (a doctest)"
        );
    }
}

#[test]
fn architecture_doc_names_every_crate() {
    let doc = read("docs/architecture.md");
    for krate in LAYERS {
        assert!(
            doc.contains(krate),
            "docs/architecture.md does not mention {krate}"
        );
    }
}

#[test]
fn library_crates_do_not_use_anyhow() {
    for krate in &LAYERS[..5] {
        let manifest = read(format!("crates/{krate}/Cargo.toml"));
        assert!(
            !manifest.contains("anyhow"),
            "{krate} must use its thiserror enum, not anyhow"
        );
    }
}
