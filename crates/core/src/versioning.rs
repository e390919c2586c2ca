//! Whether a piece's new version number fits its changes (`piecework piece check`).
//!
//! The comparison is of metadata, the contract flows rely on: removing an action, trigger or
//! prop, retyping a prop, making one required, dropping dropdown options or changing the auth
//! breaks existing flows and needs a major version; adding actions, triggers, optional props or
//! options needs a minor one; anything else (descriptions, labels) a patch. Before 1.0.0 a
//! minor bump may carry breaking changes, as semver allows.

use std::fmt;

use piecework_sdk::prop::Prop;
use piecework_sdk::{PieceMetadata, PropKind};
use semver::Version;

/// How big a change is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Bump {
    Patch,
    Minor,
    Major,
}

impl fmt::Display for Bump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Bump::Patch => "patch",
            Bump::Minor => "minor",
            Bump::Major => "major",
        })
    }
}

/// One difference between two versions of a piece.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub bump: Bump,
    pub what: String,
}

/// The outcome of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub changes: Vec<Change>,
    /// The smallest bump the changes need.
    pub required: Bump,
    /// The bump the new version number makes, if it increased.
    pub made: Option<Bump>,
}

impl Report {
    pub fn is_ok(&self) -> bool {
        self.made.is_some_and(|made| made >= self.required)
    }
}

/// Compares two versions of a piece's metadata.
pub fn check(old: &PieceMetadata, new: &PieceMetadata) -> Report {
    let mut changes = Vec::new();
    let mut change = |bump, what: String| changes.push(Change { bump, what });
    if old.auth != new.auth {
        let breaking = auth_breaks(old, new);
        change(
            if breaking { Bump::Major } else { Bump::Minor },
            "the auth changed".into(),
        );
    }
    for old_action in &old.actions {
        match new.actions.iter().find(|a| a.name == old_action.name) {
            None => change(
                Bump::Major,
                format!("action `{}` was removed", old_action.name),
            ),
            Some(new_action) => {
                compare_props(
                    &format!("action `{}`", old_action.name),
                    &old_action.props,
                    &new_action.props,
                    &mut change,
                );
                if old_action.require_auth != new_action.require_auth && new_action.require_auth {
                    change(
                        Bump::Major,
                        format!("action `{}` now requires a connection", old_action.name),
                    );
                }
            }
        }
    }
    for new_action in new
        .actions
        .iter()
        .filter(|a| !old.actions.iter().any(|o| o.name == a.name))
    {
        change(
            Bump::Minor,
            format!("action `{}` was added", new_action.name),
        );
    }
    for old_trigger in &old.triggers {
        match new.triggers.iter().find(|t| t.name == old_trigger.name) {
            None => change(
                Bump::Major,
                format!("trigger `{}` was removed", old_trigger.name),
            ),
            Some(new_trigger) => {
                compare_props(
                    &format!("trigger `{}`", old_trigger.name),
                    &old_trigger.props,
                    &new_trigger.props,
                    &mut change,
                );
                if old_trigger.kind != new_trigger.kind {
                    change(
                        Bump::Major,
                        format!("trigger `{}` changed how it is driven", old_trigger.name),
                    );
                }
            }
        }
    }
    for new_trigger in new
        .triggers
        .iter()
        .filter(|t| !old.triggers.iter().any(|o| o.name == t.name))
    {
        change(
            Bump::Minor,
            format!("trigger `{}` was added", new_trigger.name),
        );
    }
    let mut rest = old.clone();
    rest.version = new.version.clone();
    rest.actions = new.actions.clone();
    rest.triggers = new.triggers.clone();
    rest.auth = new.auth.clone();
    if rest != *new || metadata_text_changed(old, new) {
        change(Bump::Patch, "descriptions or labels changed".into());
    }
    let required = changes.iter().map(|c| c.bump).max().unwrap_or(Bump::Patch);
    Report {
        changes,
        required: effective(required, &new.version),
        made: bump_between(&old.version, &new.version),
    }
}

/// Before 1.0.0, breaking changes go in a minor bump.
fn effective(required: Bump, version: &Version) -> Bump {
    if version.major == 0 && required == Bump::Major {
        Bump::Minor
    } else {
        required
    }
}

fn bump_between(old: &Version, new: &Version) -> Option<Bump> {
    if new <= old {
        None
    } else if new.major > old.major {
        Some(Bump::Major)
    } else if new.minor > old.minor {
        Some(Bump::Minor)
    } else {
        Some(Bump::Patch)
    }
}

fn metadata_text_changed(old: &PieceMetadata, new: &PieceMetadata) -> bool {
    let text = |m: &PieceMetadata| {
        let actions: Vec<String> = m
            .actions
            .iter()
            .map(|a| format!("{}{}{:?}", a.display_name, a.description, a.props))
            .collect();
        let triggers: Vec<String> = m
            .triggers
            .iter()
            .map(|t| format!("{}{}{:?}", t.display_name, t.description, t.props))
            .collect();
        (actions, triggers)
    };
    text(old) != text(new)
}

/// A change of auth breaks connections unless it only adds optional props to custom auth.
fn auth_breaks(old: &PieceMetadata, new: &PieceMetadata) -> bool {
    use piecework_sdk::PieceAuth::Custom;
    match (&old.auth, &new.auth) {
        (
            Custom {
                props: old_props, ..
            },
            Custom {
                props: new_props, ..
            },
        ) => {
            let mut breaking = false;
            compare_props("auth", old_props, new_props, &mut |bump, _| {
                breaking |= bump == Bump::Major
            });
            breaking
        }
        _ => true,
    }
}

fn compare_props(owner: &str, old: &[Prop], new: &[Prop], change: &mut impl FnMut(Bump, String)) {
    for old_prop in old {
        let Some(new_prop) = new.iter().find(|p| p.name == old_prop.name) else {
            change(
                Bump::Major,
                format!("{owner}: prop `{}` was removed", old_prop.name),
            );
            continue;
        };
        let newly_required = new_prop.required && !old_prop.required && new_prop.default.is_none();
        if newly_required {
            change(
                Bump::Major,
                format!("{owner}: prop `{}` became required", old_prop.name),
            );
        }
        match (&old_prop.kind, &new_prop.kind) {
            (
                PropKind::StaticDropdown { options: before },
                PropKind::StaticDropdown { options: after },
            ) => {
                let removed: Vec<String> = before
                    .iter()
                    .filter(|o| !after.iter().any(|n| n.value == o.value))
                    .map(|o| o.value.to_string())
                    .collect();
                if !removed.is_empty() {
                    change(
                        Bump::Major,
                        format!(
                            "{owner}: prop `{}` lost options {}",
                            old_prop.name,
                            removed.join(", ")
                        ),
                    );
                } else if after.len() > before.len() {
                    change(
                        Bump::Minor,
                        format!("{owner}: prop `{}` gained options", old_prop.name),
                    );
                }
            }
            // Any text a flow holds is still a value a dynamic dropdown takes.
            (PropKind::ShortText | PropKind::LongText, PropKind::DynamicDropdown { .. }) => {
                change(
                    Bump::Minor,
                    format!("{owner}: prop `{}` now offers options", old_prop.name),
                );
            }
            (before, after) if std::mem::discriminant(before) != std::mem::discriminant(after) => {
                change(
                    Bump::Major,
                    format!("{owner}: prop `{}` changed type", old_prop.name),
                );
            }
            _ => {}
        }
    }
    for new_prop in new.iter().filter(|p| !old.iter().any(|o| o.name == p.name)) {
        if new_prop.required && new_prop.default.is_none() {
            change(
                Bump::Major,
                format!("{owner}: required prop `{}` was added", new_prop.name),
            );
        } else {
            change(
                Bump::Minor,
                format!("{owner}: optional prop `{}` was added", new_prop.name),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use piecework_sdk::prelude::*;
    use serde_json::Value;

    struct A(ActionSpec);

    impl Action for A {
        type Input = Value;
        type Output = Value;
        fn spec(&self) -> ActionSpec {
            self.0.clone()
        }
        async fn run(&self, _ctx: &Context, input: Value) -> Result<Value, PieceError> {
            Ok(input)
        }
    }

    fn create(props: Vec<Prop>) -> ActionSpec {
        props
            .into_iter()
            .fold(ActionSpec::new("create", "Create"), ActionSpec::prop)
    }

    fn base_props() -> Vec<Prop> {
        vec![
            Prop::short_text("title", "Title").required(),
            Prop::static_dropdown("priority", "Priority", [("Low", "low"), ("High", "high")]),
        ]
    }

    fn meta(version: &str, actions: Vec<ActionSpec>) -> PieceMetadata {
        actions
            .into_iter()
            .fold(Piece::builder("p", "P").version(version), |b, a| {
                b.action(A(a))
            })
            .build()
            .unwrap()
            .metadata()
            .clone()
    }

    fn check_with(version: &str, actions: Vec<ActionSpec>) -> Report {
        check(
            &meta("1.2.3", vec![create(base_props())]),
            &meta(version, actions),
        )
    }

    #[test]
    fn breaking_changes_need_a_major_version() {
        let cases: Vec<(Vec<ActionSpec>, &str)> = vec![
            (vec![], "action `create` was removed"),
            (
                vec![create(vec![base_props()[0].clone()])],
                "action `create`: prop `priority` was removed",
            ),
            (
                vec![create(vec![
                    base_props()[0].clone(),
                    Prop::static_dropdown("priority", "Priority", [("Low", "low")]),
                ])],
                "action `create`: prop `priority` lost options \"high\"",
            ),
            (
                vec![create(vec![
                    base_props()[0].clone(),
                    base_props()[1].clone().required(),
                ])],
                "action `create`: prop `priority` became required",
            ),
            (
                vec![create(vec![
                    Prop::number("title", "Title").required(),
                    base_props()[1].clone(),
                ])],
                "action `create`: prop `title` changed type",
            ),
            (
                vec![create(
                    [
                        base_props(),
                        vec![Prop::short_text("team", "Team").required()],
                    ]
                    .concat(),
                )],
                "action `create`: required prop `team` was added",
            ),
        ];
        for (actions, expected) in cases {
            let report = check_with("1.3.0", actions.clone());
            assert_eq!(report.required, Bump::Major, "{expected}");
            assert!(
                report.changes.iter().any(|c| c.what == expected),
                "{:?}",
                report.changes
            );
            assert!(!report.is_ok(), "a minor bump is too small for: {expected}");
            assert!(check_with("2.0.0", actions).is_ok());
        }
    }

    #[test]
    fn additions_need_a_minor_version() {
        let more = vec![
            create([base_props(), vec![Prop::short_text("team", "Team")]].concat()),
            ActionSpec::new("close", "Close"),
        ];
        let report = check_with("1.2.4", more.clone());
        assert_eq!(report.required, Bump::Minor);
        assert_eq!(report.made, Some(Bump::Patch));
        assert!(!report.is_ok());
        let whats: Vec<&str> = report.changes.iter().map(|c| c.what.as_str()).collect();
        assert!(
            whats.contains(&"action `create`: optional prop `team` was added"),
            "{whats:?}"
        );
        assert!(whats.contains(&"action `close` was added"), "{whats:?}");
        assert!(check_with("1.3.0", more).is_ok());
        // A text prop that now loads its options still takes every text a flow holds.
        let options = vec![create(vec![
            Prop::dynamic_dropdown("title", "Title", Vec::<String>::new()).required(),
            base_props()[1].clone(),
        ])];
        let report = check_with("1.3.0", options);
        assert_eq!(report.required, Bump::Minor);
        assert!(report.is_ok(), "{:?}", report.changes);
        assert_eq!(
            report.changes[0].what,
            "action `create`: prop `title` now offers options"
        );
    }

    #[test]
    fn text_changes_need_a_patch_and_the_version_must_grow() {
        let reworded = vec![create(base_props()).description("Creates a thing")];
        assert_eq!(check_with("1.2.4", reworded.clone()).required, Bump::Patch);
        assert!(check_with("1.2.4", reworded.clone()).is_ok());
        let same = check_with("1.2.3", reworded);
        assert_eq!(same.made, None);
        assert!(!same.is_ok());
    }

    struct Hook;

    impl WebhookTrigger for Hook {
        type Input = Value;
        fn spec(&self) -> TriggerSpec {
            TriggerSpec::webhook("hook", "Hook")
        }
    }

    #[test]
    fn removing_a_trigger_or_changing_the_auth_is_breaking() {
        let with_trigger = Piece::builder("p", "P")
            .version("1.0.0")
            .webhook_trigger(Hook)
            .build()
            .unwrap();
        let without = Piece::builder("p", "P").version("1.1.0").build().unwrap();
        let report = check(with_trigger.metadata(), without.metadata());
        assert_eq!(report.required, Bump::Major);
        assert!(
            report
                .changes
                .iter()
                .any(|c| c.what == "trigger `hook` was removed"),
            "{:?}",
            report.changes
        );
        let keyed = Piece::builder("p", "P")
            .version("1.1.0")
            .auth(PieceAuth::secret_text("Key"))
            .build()
            .unwrap();
        let plain = Piece::builder("p", "P").version("1.0.0").build().unwrap();
        let report = check(plain.metadata(), keyed.metadata());
        assert_eq!((report.required, report.is_ok()), (Bump::Major, false));
    }

    #[test]
    fn before_one_a_minor_bump_may_break() {
        let old = meta("0.3.0", vec![create(base_props())]);
        let report = check(&old, &meta("0.4.0", vec![]));
        assert_eq!(report.required, Bump::Minor);
        assert!(report.is_ok());
    }
}
