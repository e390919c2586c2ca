//! Programs of this workspace that tests start as real processes, built on demand: piece
//! programs (the `probe` test double, `my-company-api`) that a test packs into bundles.
//!
//! `cargo test` does not build another package's binaries for a test, so the first test that
//! needs one runs `cargo build` for it (in the same target directory: cheap once the workspace
//! is built) and every later test of the process reuses the path.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The workspace root (where the top-level `Cargo.toml` is).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/testkit is two levels below the root")
        .to_owned()
}

/// The path of binary `bin` of workspace package `package`, built (debug) if needed.
///
/// Panics with cargo's output when the build fails: a test cannot go on without it.
pub fn binary(package: &str, bin: &str) -> PathBuf {
    static BUILT: Mutex<Option<HashMap<(String, String), PathBuf>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let key = (package.to_owned(), bin.to_owned());
    if let Some(path) = built.get_or_insert_with(HashMap::new).get(&key) {
        return path.clone();
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .args([
            "build",
            "--quiet",
            "-p",
            package,
            "--bin",
            bin,
            "--message-format=json",
        ])
        .current_dir(workspace_root());
    // What `cargo test` sets for the test (its package's CARGO_PKG_*, CARGO_MANIFEST_DIR…)
    // would make this cargo see a changed environment and rebuild half the workspace.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if set_by_cargo_for_a_program(&name) {
            command.env_remove(name.as_ref());
        }
    }
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo build -p {package}: {e}"));
    assert!(
        out.status.success(),
        "cargo build -p {package} --bin {bin} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| line.contains("\"compiler-artifact\""))
        .find_map(|line| executable_in(line, bin))
        .unwrap_or_else(|| panic!("cargo built no executable named {bin}"));
    built
        .get_or_insert_with(HashMap::new)
        .insert(key, path.clone());
    path
}

/// Variables cargo sets for a program it runs (not the user's cargo settings).
fn set_by_cargo_for_a_program(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || name.starts_with("CARGO_BIN_")
        || matches!(
            name,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_CRATE_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
                | "OUT_DIR"
        )
}

/// The `"executable":"…"` of a compiler-artifact message for `bin` (a small scan: the
/// testkit stays free of a JSON dependency).
fn executable_in(line: &str, bin: &str) -> Option<PathBuf> {
    let start = line.find("\"executable\":\"")? + "\"executable\":\"".len();
    let rest = &line[start..];
    let path = PathBuf::from(rest[..rest.find('"')?].replace("\\\\", "\\"));
    (path.file_name()? == bin).then_some(path)
}

#[cfg(test)]
mod tests {
    #[test]
    fn executables_are_found_in_cargo_messages() {
        let line =
            r#"{"reason":"compiler-artifact","executable":"/w/target/debug/probe","fresh":true}"#;
        assert_eq!(
            super::executable_in(line, "probe").unwrap().to_str(),
            Some("/w/target/debug/probe")
        );
        assert!(super::executable_in(line, "other").is_none());
    }
}
