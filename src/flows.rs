//! Flow files: the examples shipped inside the binary and flows read from a directory.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use piecework_core::flow::{FlowDefinition, Format};

/// Example flows, compiled in so `piecework dev` works from any directory.
pub const EXAMPLES: &[(&str, &str)] = &[
    (
        "examples/flows/heartbeat.yaml",
        include_str!("../examples/flows/heartbeat.yaml"),
    ),
    (
        "examples/flows/echo.yaml",
        include_str!("../examples/flows/echo.yaml"),
    ),
    (
        "examples/flows/incident-batch.yaml",
        include_str!("../examples/flows/incident-batch.yaml"),
    ),
    (
        "examples/flows/auto-assign.yaml",
        include_str!("../examples/flows/auto-assign.yaml"),
    ),
    (
        "examples/flows/api-health.yaml",
        include_str!("../examples/flows/api-health.yaml"),
    ),
];

pub fn format_of(path: &Path) -> Format {
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => Format::Json,
        _ => Format::Yaml,
    }
}

/// Parses one flow file; the error names the file.
pub fn parse_file(path: &Path) -> anyhow::Result<FlowDefinition> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    FlowDefinition::parse(&text, format_of(path)).with_context(|| format!("{}", path.display()))
}

/// The flow files in a directory (`*.yaml`, `*.yml`, `*.json`), sorted by name.
pub fn files_in(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            )
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The shipped examples, parsed.
pub fn examples() -> anyhow::Result<Vec<FlowDefinition>> {
    EXAMPLES
        .iter()
        .map(|(name, text)| {
            FlowDefinition::parse(text, Format::Yaml).with_context(|| name.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn shipped_examples_are_valid() {
        let mut registry = crate::registry::pieces().unwrap();
        registry
            .register_built(piecework_piece_my_company_api::piece())
            .unwrap();
        for flow in super::examples().unwrap() {
            let name = flow.name.clone();
            piecework_core::flow::validate(flow, &registry)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    /// The documented `data.merge` form: a template among fixed objects keeps its JSON type at
    /// run time, so it is not checked as a string when the flow is applied.
    #[tokio::test]
    async fn templates_inside_list_items_are_left_to_run_time() {
        let registry = crate::registry::pieces().unwrap();
        let flow = |objects: &str| {
            let text = format!(
                "apiVersion: piecework/v1\nkind: Flow\nname: merged\ntrigger: {{ piece: webhook, trigger: catch, auth: none }}\nsteps:\n  - {{ name: label, piece: data, action: set, input: {{ value: {{ body: 1 }} }} }}\n  - {{ name: merge, piece: data, action: merge, input: {{ objects: {objects} }} }}\n"
            );
            piecework_core::flow::FlowDefinition::parse(&text, piecework_core::flow::Format::Yaml)
                .unwrap()
        };
        let good = flow("[\"{{ steps.label.output }}\", { b: 2 }]");
        piecework_core::flow::validate(good, &registry)
            .await
            .unwrap();
        let bad = flow("[\"{{ steps.label.output }}\", \"plain\"]");
        let err = piecework_core::flow::validate(bad, &registry)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("steps[1] (merge).input.objects: item 1: expected object, got a string"),
            "{err}"
        );
    }
}
