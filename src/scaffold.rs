//! `piecework piece new <name>`: a new private piece under `pieces/custom/<name>/` that builds,
//! passes its generated test and is registered in the binary, with no hand edits.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// What was written, for the command's output.
#[derive(Debug)]
pub struct Scaffolded {
    pub dir: PathBuf,
    pub crate_name: String,
}

/// Finds the piecework workspace root at or above `start`.
pub fn find_root(start: &Path) -> anyhow::Result<PathBuf> {
    let mut dir = Some(start);
    while let Some(candidate) = dir {
        let manifest = candidate.join("Cargo.toml");
        if candidate.join("src/registry.rs").is_file()
            && std::fs::read_to_string(&manifest).is_ok_and(|m| m.contains("[workspace]"))
        {
            return Ok(candidate.to_path_buf());
        }
        dir = candidate.parent();
    }
    bail!(
        "{} is not inside the piecework workspace (run this from your checkout, or pass --root)",
        start.display()
    )
}

pub fn create(root: &Path, name: &str) -> anyhow::Result<Scaffolded> {
    if !piecework_sdk::piece::is_piece_name(name) {
        bail!(
            "{name:?} is not a valid piece name: use lowercase letters, digits and '-', starting with a letter (e.g. acme-crm)"
        );
    }
    let dir = root.join("pieces/custom").join(name);
    if dir.exists() {
        bail!("{} already exists", dir.display());
    }
    if crate::registry::pieces().is_ok_and(|r| r.contains(name)) {
        bail!("a piece named `{name}` is already registered");
    }
    let crate_name = format!("piecework-piece-{name}");
    let module = crate_name.replace('-', "_");
    let title = name
        .split('-')
        .map(capitalize)
        .collect::<Vec<_>>()
        .join(" ");

    let manifest_path = root.join("Cargo.toml");
    let registry_path = root.join("src/registry.rs");
    let manifest = std::fs::read_to_string(&manifest_path)?;
    let registry = std::fs::read_to_string(&registry_path)?;
    let manifest = add_dependency(&manifest, &crate_name, name)?;
    let registry = register(&registry, &module)?;

    for (path, text) in files(name, &crate_name, &module, &title) {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().expect("files are in the piece's folder"))?;
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    std::fs::write(&manifest_path, manifest)?;
    std::fs::write(&registry_path, registry)?;
    Ok(Scaffolded { dir, crate_name })
}

fn capitalize(word: &str) -> String {
    let mut chars = word.chars();
    chars
        .next()
        .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
        .unwrap_or_default()
}

/// Adds the crate to `[workspace.dependencies]` and to the binary's `[dependencies]`.
fn add_dependency(manifest: &str, crate_name: &str, name: &str) -> anyhow::Result<String> {
    const WORKSPACE_DEPS: &str = "[workspace.dependencies]\n";
    const BINARY_DEPS: &str = "[dependencies]\n";
    let Some(workspace_at) = manifest.find(WORKSPACE_DEPS) else {
        bail!("Cargo.toml has no [workspace.dependencies]");
    };
    let Some(binary_at) = manifest.find(BINARY_DEPS) else {
        bail!("Cargo.toml has no [dependencies]");
    };
    let mut out = manifest.to_owned();
    // The later insertion first, so the earlier offset stays valid.
    let entries = [
        (
            workspace_at + WORKSPACE_DEPS.len(),
            format!("{crate_name} = {{ path = \"pieces/custom/{name}\" }}\n"),
        ),
        (
            binary_at + BINARY_DEPS.len(),
            format!("{crate_name}.workspace = true\n"),
        ),
    ];
    let mut entries = entries.to_vec();
    entries.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
    for (at, line) in entries {
        out.insert_str(at, &line);
    }
    Ok(out)
}

/// Adds the registration line before the registry's `Ok(registry)`.
fn register(registry: &str, module: &str) -> anyhow::Result<String> {
    const END: &str = "    Ok(registry)\n";
    let Some(at) = registry.find(END) else {
        bail!("src/registry.rs does not end its pieces() with `Ok(registry)`");
    };
    let mut out = registry.to_owned();
    out.insert_str(
        at,
        &format!("    registry.register_built({module}::piece())?;\n"),
    );
    Ok(out)
}

fn files(name: &str, crate_name: &str, module: &str, title: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "Cargo.toml",
            format!(
                r#"[package]
name = "{crate_name}"
description = "{title}: a private piecework piece"
version.workspace = true
edition.workspace = true
license.workspace = true
publish = false

[dependencies]
piecework-sdk.workspace = true
serde.workspace = true
serde_json.workspace = true

[dev-dependencies]
tokio.workspace = true

[lints]
workspace = true
"#
            ),
        ),
        (
            "src/lib.rs",
            format!(
                r#"//! `{name}`: a private piece. Start here: describe what it integrates with, then replace the
//! example action.

mod actions;
mod auth;
mod triggers;

use piecework_sdk::{{Piece, PieceDefinitionError, category}};

pub const NAME: &str = "{name}";

pub fn piece() -> Result<Piece, PieceDefinitionError> {{
    Piece::builder(NAME, "{title}")
        .description("TODO: what this piece integrates with")
        .version("0.1.0")
        .auth(auth::definition())
        .categories([category::PRODUCTIVITY])
        .authors(["your-team"])
        .minimum_supported_release("0.1.0")
        .action(actions::hello::Hello)
        .build()
}}
"#
            ),
        ),
        (
            "src/auth.rs",
            r#"//! The connection this piece needs. `PieceAuth::None` if it needs none; see
//! `pieces/custom/my-company-api/src/auth.rs` for an API key plus an environment.

use piecework_sdk::PieceAuth;

pub fn definition() -> PieceAuth {
    PieceAuth::None
}
"#
            .to_owned(),
        ),
        ("src/actions/mod.rs", "pub mod hello;\n".to_owned()),
        (
            "src/actions/hello.rs",
            r#"//! An example action: replace it with a real one.

use piecework_sdk::prelude::*;
use serde::Deserialize;
use serde_json::{Value, json};

pub struct Hello;

#[derive(Deserialize)]
pub struct Input {
    name: String,
}

impl Action for Hello {
    type Input = Input;
    type Output = Value;

    fn spec(&self) -> ActionSpec {
        ActionSpec::new("hello", "Say hello")
            .description("Greets someone")
            .output("`greeting`")
            .prop(Prop::short_text("name", "Name").required())
    }

    async fn run(&self, _ctx: &Context, input: Input) -> Result<Value, PieceError> {
        Ok(json!({ "greeting": format!("hello, {}", input.name) }))
    }
}
"#
            .to_owned(),
        ),
        (
            "src/triggers/mod.rs",
            "// Triggers of this piece, one module each (see pieces/custom/my-company-api/src/triggers/).\n".to_owned(),
        ),
        (
            "tests/hello.rs",
            format!(
                r#"//! The example action, run as the engine runs it.

use piecework_sdk::Context;
use serde_json::json;

#[tokio::test]
async fn hello_greets_and_requires_a_name() {{
    let piece = {module}::piece().expect("the piece definition is valid");
    let hello = piece.action("hello").expect("the action is registered");
    let ctx = Context::for_test("hello");
    let output = hello.run_json(&ctx, json!({{"name": "ada"}})).await.unwrap();
    assert_eq!(output, json!({{"greeting": "hello, ada"}}));
    let err = hello.run_json(&ctx, json!({{}})).await.unwrap_err();
    assert_eq!(err.to_string(), "prop `name`: is required");
}}
"#
            ),
        ),
        (
            "README.md",
            format!(
                "# {title}\n\nA private piece. `cargo test -p {crate_name}` runs its tests; \
                 `piecework piece test {name} hello --input '{{\"name\": \"ada\"}}'` runs the example action; \
                 `piecework piece docs {name}` generates its documentation.\n"
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_and_registration_are_added() {
        let manifest = "[package]\nname = \"piecework\"\n\n[dependencies]\nanyhow.workspace = true\n\n[workspace]\n\n[workspace.dependencies]\nanyhow = \"1\"\n";
        let out = add_dependency(manifest, "piecework-piece-acme-crm", "acme-crm").unwrap();
        assert!(
            out.contains("[dependencies]\npiecework-piece-acme-crm.workspace = true\nanyhow"),
            "{out}"
        );
        assert!(out.contains("[workspace.dependencies]\npiecework-piece-acme-crm = { path = \"pieces/custom/acme-crm\" }\nanyhow"), "{out}");
        let parsed: toml::Table = toml::from_str(&out).unwrap();
        assert!(
            parsed["workspace"]["dependencies"]
                .get("piecework-piece-acme-crm")
                .is_some()
        );

        let registry = "pub fn pieces() -> Result<Registry, RegistryError> {\n    let mut registry = Registry::new();\n    Ok(registry)\n}\n";
        let out = register(registry, "piecework_piece_acme_crm").unwrap();
        assert!(
            out.contains(
                "    registry.register_built(piecework_piece_acme_crm::piece())?;\n    Ok(registry)"
            ),
            "{out}"
        );
    }

    #[test]
    fn bad_or_taken_names_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let err = create(root.path(), "Acme CRM").unwrap_err().to_string();
        assert!(err.contains("is not a valid piece name"), "{err}");
        let err = create(root.path(), "my-company-api")
            .unwrap_err()
            .to_string();
        assert!(err.contains("already registered"), "{err}");
    }
}
