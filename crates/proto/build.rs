//! Compiles `proto/piecework/v1/*.proto` with protox (pure Rust), so building needs no system
//! `protoc`. The generated code goes to `OUT_DIR` and is never edited by hand.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = ["piecework/v1/jobs.proto", "piecework/v1/events.proto"];
    for file in &files {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }
    let descriptors = protox::compile(files, [&root])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
