//! `piecework piece new <name>` (`--typescript`: an Activepieces-framework piece instead,
//! see [`create_typescript`]): a new private piece as its own cargo package — a library
//! (the piece) and a binary (`serve`s it) — that builds, passes its generated test, runs with
//! `piece test` and packs into a bundle with `piece build`, without touching piecework.
//!
//! The package is its own workspace (an empty `[workspace]`), so it can live in a team's
//! repository or anywhere in a piecework checkout alike. It depends on `piecework-sdk` by
//! path (the checkout the binary was built from, or `--sdk`) and starts from piecework's
//! `Cargo.lock`, so it builds with the same dependency versions, offline once they are fetched.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// What was written, for the command's output.
#[derive(Debug)]
pub struct Scaffolded {
    pub dir: PathBuf,
    pub crate_name: String,
}

/// The piecework checkout at or above `start`: the directory with `crates/sdk`.
fn checkout_around(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .find(|dir| is_checkout(dir))
        .map(Path::to_owned)
}

fn is_checkout(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("crates/sdk/Cargo.toml"))
        .is_ok_and(|m| m.contains("name = \"piecework-sdk\""))
}

/// The piecework checkout this process runs in or was built from, if it is on disk.
pub fn checkout() -> Option<PathBuf> {
    let cwd = std::env::current_dir().ok()?;
    checkout_around(&cwd).or_else(|| {
        let built_from = Path::new(env!("CARGO_MANIFEST_DIR"));
        is_checkout(built_from).then(|| built_from.to_owned())
    })
}

/// Where the SDK is: `--sdk` (a checkout, or its `crates/sdk`), the checkout around the
/// current directory, or the one this binary was built from.
fn find_checkout(sdk: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(given) = sdk {
        let given = given
            .canonicalize()
            .with_context(|| format!("--sdk {}", given.display()))?;
        return [given.clone(), given.join("../..")]
            .into_iter()
            .find(|dir| is_checkout(dir))
            .map(|dir| dir.canonicalize().unwrap_or(dir))
            .with_context(|| {
                format!(
                    "--sdk {}: not a piecework checkout (no crates/sdk there)",
                    given.display()
                )
            });
    }
    checkout()
        .context("cannot find the piecework SDK: pass --sdk with the path of a piecework checkout")
}

pub fn create(name: &str, dir: Option<&Path>, sdk: Option<&Path>) -> anyhow::Result<Scaffolded> {
    let dir = new_piece_dir(name, dir)?;
    let checkout = find_checkout(sdk)?;
    let crate_name = format!("piecework-piece-{name}");
    let module = crate_name.replace('-', "_");
    let title = title_of(name);
    let sdk_path = checkout.join("crates/sdk");
    for (path, text) in files(name, &crate_name, &module, &title, &sdk_path) {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().expect("files are in the piece's folder"))?;
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    // The same dependency versions as piecework itself; cargo drops what the piece does not use.
    if let Ok(lock) = std::fs::read(checkout.join("Cargo.lock")) {
        std::fs::write(dir.join("Cargo.lock"), lock)?;
    }
    Ok(Scaffolded { dir, crate_name })
}

/// `piecework piece new NAME --typescript`: a piece written with the Activepieces framework
/// (`package.json`, `tsconfig.json`, `src/index.ts` with a `hello` action), which
/// `piece test`, `piece build` and `piece conformance` take as they take a Rust piece; its
/// dependencies are installed by the first `piece build` (or `npm install`).
pub fn create_typescript(name: &str, dir: Option<&Path>) -> anyhow::Result<Scaffolded> {
    let dir = new_piece_dir(name, dir)?;
    let package = format!("@private/piece-{name}");
    let title = title_of(name);
    let export = name
        .split('-')
        .enumerate()
        .map(|(i, w)| if i == 0 { w.to_owned() } else { capitalize(w) })
        .collect::<String>();
    let files = [
        (
            "package.json",
            format!(
                r#"{{
  "name": "{package}",
  "version": "0.1.0",
  "description": "{title}: a private piece",
  "private": true,
  "main": "src/index.ts",
  "dependencies": {{
    "@activepieces/pieces-framework": "0.32.0"
  }},
  "devDependencies": {{
    "typescript": "5.9.3"
  }},
  "piecework": {{
    "env": [],
    "limits": {{}}
  }}
}}
"#
            ),
        ),
        (
            "tsconfig.json",
            r#"{
  "compilerOptions": {
    "target": "ES2022",
    "module": "commonjs",
    "moduleResolution": "node",
    "strict": true,
    "esModuleInterop": true,
    "skipLibCheck": true,
    "noEmit": true
  },
  "include": ["src"]
}
"#
            .to_owned(),
        ),
        (
            "src/index.ts",
            format!(
                r#"import {{ createAction, createPiece, PieceAuth, Property }} from '@activepieces/pieces-framework';

// An action: its props are its inputs (shown as snake_case in piecework: `name`), `run` its work.
export const hello = createAction({{
  name: 'hello',
  displayName: 'Say hello',
  description: 'Greets someone by name',
  props: {{
    name: Property.ShortText({{ displayName: 'Name', description: 'Who to greet', required: true }}),
  }},
  async run(context) {{
    return {{ greeting: `hello, ${{context.propsValue.name}}` }};
  }},
}});

export const {export} = createPiece({{
  displayName: '{title}',
  description: '{title}: a private piece',
  auth: PieceAuth.None(),
  minimumSupportedRelease: '0.30.0',
  logoUrl: 'https://cdn.example.com/{name}.png',
  authors: ['your-team'],
  actions: [hello],
  triggers: [],
}});
"#
            ),
        ),
        (
            "README.md",
            format!(
                "# {title}\n\nA private piece for piecework, written with the Activepieces framework.\n\n```sh\npiecework piece test . hello --input '{{\"name\": \"ada\"}}'   # run the action as a worker would\nnpx tsc                                                   # type-check (after a first build or npm install)\npiecework piece build .                                   # → dist/{name}-0.1.0.piece.tgz\n```\n\nSee docs/private-pieces.md in piecework for the context a piece gets, deploying and versioning.\n"
            ),
        ),
        ("_gitignore", "node_modules/\ndist/\n".to_owned()),
    ];
    for (path, text) in files {
        let path = dir.join(path.replace("_gitignore", ".gitignore"));
        std::fs::create_dir_all(path.parent().expect("files are in the piece's folder"))?;
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(Scaffolded {
        dir,
        crate_name: package,
    })
}

/// Checks a new piece's name and returns the directory to create it in (`./NAME` unless
/// given), which must not exist yet.
fn new_piece_dir(name: &str, dir: Option<&Path>) -> anyhow::Result<PathBuf> {
    if !piecework_sdk::piece::is_piece_name(name) {
        bail!(
            "{name:?} is not a valid piece name: use lowercase letters, digits and '-', starting with a letter (e.g. acme-crm)"
        );
    }
    if crate::registry::pieces().is_ok_and(|r| r.contains(name)) {
        bail!("`{name}` is a built-in piece; choose another name");
    }
    let dir = dir.map_or_else(|| PathBuf::from(name), Path::to_owned);
    if dir.exists() {
        bail!("{} already exists", dir.display());
    }
    Ok(dir)
}

/// `acme-crm` → `Acme Crm`.
fn title_of(name: &str) -> String {
    name.split('-')
        .map(capitalize)
        .collect::<Vec<_>>()
        .join(" ")
}

fn capitalize(word: &str) -> String {
    let mut chars = word.chars();
    chars
        .next()
        .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
        .unwrap_or_default()
}

fn files(
    name: &str,
    crate_name: &str,
    module: &str,
    title: &str,
    sdk: &Path,
) -> Vec<(&'static str, String)> {
    let sdk = sdk.display().to_string().replace('\\', "/");
    vec![
        (
            "Cargo.toml",
            format!(
                r#"[package]
name = "{crate_name}"
description = "{title}: a private piecework piece"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
path = "src/lib.rs"

# The program a worker runs: it serves the piece over piece protocol v1.
[[bin]]
name = "{name}"
path = "src/main.rs"

[dependencies]
piecework-sdk = {{ path = "{sdk}" }}
serde = {{ version = "1", features = ["derive"] }}
serde_json = "1"

[dev-dependencies]
tokio = {{ version = "1", features = ["macros", "rt-multi-thread"] }}

# What `piecework piece build` puts in the bundle besides the program.
[package.metadata.piecework]
# Environment variables the piece may read (set them on the workers, or under
# [pieces.env.{name}] in their config). Nothing else of the worker's environment reaches it.
env = []
# limits = {{ memory_mb = 256 }}

# Its own workspace: it builds on its own, wherever it lives.
[workspace]
"#
            ),
        ),
        (
            ".gitignore",
            "/target\n".to_owned(),
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
        .version(env!("CARGO_PKG_VERSION")) // the bundle's version: bump it in Cargo.toml
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
            "src/main.rs",
            format!(
                r#"//! The piece as a program: a piecework worker starts it and talks to it over stdin/stdout.
//! Log with `tracing` (or to stderr), never to stdout: stdout is the protocol's.

fn main() -> std::process::ExitCode {{
    piecework_sdk::serve({module}::piece())
}}
"#
            ),
        ),
        (
            "src/auth.rs",
            r#"//! The connection this piece needs. `PieceAuth::None` if it needs none; see
//! `pieces/custom/my-company-api/src/auth.rs` in piecework for an API key plus an environment.

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
            "// Triggers of this piece, one module each (see pieces/custom/my-company-api/src/triggers/ in piecework).\n".to_owned(),
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
                "# {title}\n\nA private piecework piece.\n\n\
                 - `cargo test` runs its tests;\n\
                 - `piecework piece test . hello --input '{{\"name\": \"ada\"}}'` runs the example action as a worker would;\n\
                 - `piecework piece build .` packs it as `{name}-0.1.0.piece.tgz` to deploy (a pieces directory, an image, or `piecework piece publish`);\n\
                 - `piecework piece docs .` generates its documentation.\n"
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_or_taken_names_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let err = create("Acme CRM", Some(&root.path().join("x")), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a valid piece name"), "{err}");
        let err = create("http", Some(&root.path().join("y")), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("built-in piece"), "{err}");
        std::fs::create_dir(root.path().join("taken")).unwrap();
        let err = create("acme", Some(&root.path().join("taken")), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("already exists"), "{err}");
    }

    #[test]
    fn the_scaffold_is_a_standalone_package_on_this_sdk() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("acme-crm");
        let checkout = Path::new(env!("CARGO_MANIFEST_DIR"));
        let made = create("acme-crm", Some(&dir), Some(checkout)).unwrap();
        assert_eq!(made.crate_name, "piecework-piece-acme-crm");
        let manifest: toml::Table =
            toml::from_str(&std::fs::read_to_string(dir.join("Cargo.toml")).unwrap()).unwrap();
        assert!(manifest.contains_key("workspace"));
        let sdk = manifest["dependencies"]["piecework-sdk"]["path"]
            .as_str()
            .unwrap();
        assert!(Path::new(sdk).join("Cargo.toml").is_file(), "{sdk}");
        assert_eq!(manifest["bin"][0]["name"].as_str(), Some("acme-crm"));
        assert!(dir.join("Cargo.lock").is_file());
        assert!(
            std::fs::read_to_string(dir.join("src/main.rs"))
                .unwrap()
                .contains("piecework_sdk::serve(piecework_piece_acme_crm::piece())")
        );
    }
}
