//! The internal documentation page of a piece (`piecework piece docs`), generated from its
//! metadata so it cannot drift from the code: overview, authentication, each action with its
//! inputs and output, each trigger with its configuration — the guide's layout.

use std::fmt::Write;

use piecework_sdk::prop::Prop;
use piecework_sdk::{PieceAuth, PieceMetadata, PropKind, TriggerKind};

/// Markdown for one piece.
pub fn markdown(piece: &PieceMetadata) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# {}\n", piece.display_name);
    let _ = writeln!(out, "## Overview\n\n{}\n", or_none(&piece.description));
    let _ = writeln!(out, "- Name: `{}`, version {}", piece.name, piece.version);
    if !piece.categories.is_empty() {
        let _ = writeln!(out, "- Categories: {}", piece.categories.join(", "));
    }
    if !piece.authors.is_empty() {
        let _ = writeln!(out, "- Maintained by: {}", piece.authors.join(", "));
    }
    let _ = writeln!(
        out,
        "- Needs piecework {} or later\n",
        piece.minimum_supported_release
    );

    let _ = writeln!(out, "## Authentication\n");
    match &piece.auth {
        PieceAuth::None => out.push_str("No connection needed.\n\n"),
        PieceAuth::SecretText {
            display_name,
            description,
        } => {
            let _ = writeln!(out, "A secret ({display_name}). {description}\n");
        }
        PieceAuth::Basic {
            display_name,
            description,
        } => {
            let _ = writeln!(
                out,
                "Username and password ({display_name}). {description}\n"
            );
        }
        PieceAuth::OAuth2 {
            display_name,
            scopes,
            ..
        } => {
            let _ = writeln!(
                out,
                "OAuth2 ({display_name}); scopes: {}\n",
                or_none(&scopes.join(", "))
            );
        }
        PieceAuth::Custom {
            display_name,
            description,
            props,
        } => {
            let _ = writeln!(out, "{display_name}. {description}\n");
            props_list(&mut out, props);
            out.push('\n');
        }
    }
    out.push_str("Create a connection with `piecework connection create NAME --piece ");
    let _ = writeln!(
        out,
        "{} --values -` (values on standard input).\n",
        piece.name
    );

    if !piece.actions.is_empty() {
        out.push_str("## Actions\n\n");
        for action in &piece.actions {
            let _ = writeln!(
                out,
                "### {}\n\n{}\n",
                action.display_name,
                or_none(&action.description)
            );
            let _ = writeln!(
                out,
                "Name: `{}`{}\n",
                action.name,
                if action.require_auth {
                    "; needs a connection"
                } else {
                    ""
                }
            );
            out.push_str("**Inputs:**\n");
            props_list(&mut out, &action.props);
            let _ = writeln!(out, "\n**Output:** {}\n", or_none(&action.output));
        }
    }
    if !piece.triggers.is_empty() {
        out.push_str("## Triggers\n\n");
        for trigger in &piece.triggers {
            let _ = writeln!(
                out,
                "### {}\n\n{}\n",
                trigger.display_name,
                or_none(&trigger.description)
            );
            let how = match &trigger.kind {
                TriggerKind::Polling {
                    default_interval, ..
                } => {
                    format!(
                        "polls every {} unless the flow sets `poll_interval`; each new item fires once",
                        humantime::format_duration(*default_interval)
                    )
                }
                TriggerKind::Webhook => {
                    "fires for every request to `POST /v1/webhooks/{flow}`".to_owned()
                }
                TriggerKind::Schedule => {
                    "fires on the schedule its configuration describes".to_owned()
                }
            };
            let _ = writeln!(out, "Name: `{}`; {how}.\n", trigger.name);
            out.push_str("**Configuration:**\n");
            props_list(&mut out, &trigger.props);
            out.push('\n');
        }
    }
    out
}

fn or_none(text: &str) -> &str {
    if text.is_empty() { "—" } else { text }
}

fn props_list(out: &mut String, props: &[Prop]) {
    if props.is_empty() {
        out.push_str("- none\n");
    }
    for prop in props {
        let required = if prop.required { " (required)" } else { "" };
        let kind = match &prop.kind {
            PropKind::StaticDropdown { options } => {
                let values: Vec<String> = options.iter().map(|o| o.label.clone()).collect();
                format!("one of {}", values.join("/"))
            }
            PropKind::DynamicDropdown { refreshers } if refreshers.is_empty() => {
                "one of the options the piece loads with a connection".to_owned()
            }
            PropKind::DynamicDropdown { refreshers } => format!(
                "one of the options the piece loads with a connection, given {}",
                refreshers
                    .iter()
                    .map(|r| format!("`{r}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            PropKind::SecretText => "secret".to_owned(),
            other => serde_json::to_value(other)
                .ok()
                .and_then(|v| v["type"].as_str().map(|s| s.replace('_', " ")))
                .unwrap_or_default(),
        };
        let description = if prop.description.is_empty() {
            String::new()
        } else {
            format!(": {}", prop.description)
        };
        let _ = writeln!(
            out,
            "- {} (`{}`){required}, {kind}{description}",
            prop.display_name, prop.name
        );
    }
}
