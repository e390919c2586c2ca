//! `piecework piece new` end to end: scaffold into a copy of this checkout, build it, run the
//! generated test and the new piece's action — with no hand edits. It compiles a whole copy
//! of the workspace, so it is ignored in the main run; `scripts/test` runs it on its own.

use std::path::Path;
use std::process::Command;

fn run(dir: &Path, program: &str, args: &[&str], target: &Path) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", target)
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{program} {args:?} failed:\n{text}");
    text
}

#[test]
#[ignore = "builds a copy of the workspace; scripts/test runs it separately"]
fn a_new_piece_builds_passes_its_test_and_runs_with_no_hand_edits() {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"));
    let copy = tempfile::tempdir().unwrap();
    let files = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(source)
        .output()
        .unwrap();
    assert!(files.status.success(), "this test needs a git checkout");
    for file in files.stdout.split(|b| *b == 0).filter(|f| !f.is_empty()) {
        let file = std::str::from_utf8(file).unwrap();
        let to = copy.path().join(file);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(source.join(file), to).unwrap();
    }
    // Its own target dir: sharing this one would wait on the running `cargo test`'s lock.
    let target = source.join("target/scaffold-test");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());

    let out = run(
        copy.path(),
        env!("CARGO_BIN_EXE_piecework"),
        &["piece", "new", "acme-crm"],
        &target,
    );
    assert!(
        out.contains("created") && out.contains("piecework-piece-acme-crm"),
        "{out}"
    );
    run(
        copy.path(),
        &cargo,
        &["build", "--offline", "--bin", "piecework"],
        &target,
    );
    let tested = run(
        copy.path(),
        &cargo,
        &["test", "--offline", "-p", "piecework-piece-acme-crm"],
        &target,
    );
    assert!(
        tested.contains("hello_greets_and_requires_a_name ... ok"),
        "{tested}"
    );

    let binary = target.join("debug/piecework");
    let binary = binary.to_str().unwrap();
    let greeting = run(
        copy.path(),
        binary,
        &[
            "piece",
            "test",
            "acme-crm",
            "hello",
            "--input",
            r#"{"name": "ada"}"#,
        ],
        &target,
    );
    assert!(
        greeting.contains("\"greeting\": \"hello, ada\""),
        "{greeting}"
    );
    let listed = run(copy.path(), binary, &["piece", "list"], &target);
    assert!(listed.contains("acme-crm 0.1.0"), "{listed}");
    let docs = run(copy.path(), binary, &["piece", "docs", "acme-crm"], &target);
    assert!(docs.contains("### Say hello"), "{docs}");
}
