//! `flow upgrade`: moving a flow to a newer version of one of its pieces, on purpose and
//! checked. The steps (and trigger) using the piece are re-resolved — to `to` when given,
//! else within their own ranges — while every other step keeps its pinned version; each move
//! is checked like `piece check` against the pinned version's metadata, and the new flow
//! version is applied only when no move breaks (a removed action or prop, a retyped or newly
//! required prop, a changed auth, a version number too small for its changes) — or when
//! forced, which the audit trail records. Runs already started keep their versions.

use piecework_core::flow::{self, ValidFlow};
use piecework_core::versioning::{self, Bump};
use semver::VersionReq;
use serde::Serialize;

use crate::{Actor, Runtime, RuntimeError};

/// One step's move.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct StepMove {
    /// The step's name, or `trigger`.
    pub step: String,
    pub from: String,
    pub to: String,
    pub changes: Vec<ChangeInfo>,
    /// Whether this move breaks flows that used the pinned version.
    pub breaking: bool,
}

#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct ChangeInfo {
    pub bump: String,
    pub what: String,
}

/// What an upgrade did.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Upgraded {
    pub flow: String,
    /// The flow version now latest.
    pub version: u32,
    /// False when nothing moved (the flow already used the newest versions).
    pub created: bool,
    pub steps: Vec<StepMove>,
    pub forced: bool,
}

impl Runtime {
    pub async fn upgrade_flow(
        &self,
        flow_id: &str,
        piece: &str,
        to: Option<VersionReq>,
        force: bool,
        actor: &Actor,
    ) -> Result<Upgraded, RuntimeError> {
        let started = std::time::Instant::now();
        let result = self.upgrade(flow_id, piece, to, force, actor).await;
        let action = match &result {
            Ok(upgraded) if upgraded.forced => "flow.upgrade.forced",
            _ => "flow.upgrade",
        };
        self.audit(
            actor,
            action,
            &format!("flow/{flow_id}"),
            started,
            result.as_ref().err(),
        )
        .await;
        result
    }

    async fn upgrade(
        &self,
        flow_id: &str,
        piece: &str,
        to: Option<VersionReq>,
        force: bool,
        actor: &Actor,
    ) -> Result<Upgraded, RuntimeError> {
        let record = self
            .store
            .get_flow(flow_id)
            .await?
            .ok_or_else(|| RuntimeError::NoSuchFlow(flow_id.to_owned()))?;
        let current = self
            .flow_version(flow_id, record.latest_version)
            .await?
            .ok_or_else(|| RuntimeError::NoSuchFlow(flow_id.to_owned()))?;
        let mut definition = current.definition.clone();
        let mut keys = Vec::new();
        if definition.trigger.piece == piece {
            keys.push("trigger".to_owned());
            if let Some(to) = &to {
                definition.trigger.version = Some(to.clone());
            }
        }
        definition.visit_steps_mut(&mut |_, step| {
            if step.piece == piece {
                keys.push(step.name.clone());
                if let Some(to) = &to {
                    step.version = Some(to.clone());
                }
            }
        });
        if keys.is_empty() {
            return Err(RuntimeError::Conflict(format!(
                "flow `{flow_id}` does not use piece `{piece}`"
            )));
        }
        // Keep the operator's pause: an upgrade is not a re-enable.
        definition.enabled = None;
        let registry = self.pieces();
        let valid = flow::validate(definition, &registry).await?;
        let mut resolved = valid.resolved.clone();
        for (key, pinned) in &current.resolved {
            if !keys.contains(key) {
                resolved.insert(key.clone(), pinned.clone());
            }
        }
        let mut moves = Vec::new();
        for key in &keys {
            let (Some(from), Some(to)) = (current.resolved.get(key), resolved.get(key)) else {
                continue;
            };
            if from == to {
                continue;
            }
            let new = registry
                .get(piece, to)
                .expect("validation resolved to a registered version");
            let (changes, breaking) = match registry.get(piece, from) {
                Some(old) => {
                    let report = versioning::check(old.metadata(), new.metadata());
                    let breaking =
                        !report.is_ok() || report.changes.iter().any(|c| c.bump == Bump::Major);
                    let changes = report
                        .changes
                        .iter()
                        .map(|c| ChangeInfo {
                            bump: c.bump.to_string(),
                            what: c.what.clone(),
                        })
                        .collect();
                    (changes, breaking)
                }
                None => (
                    vec![ChangeInfo {
                        bump: "unknown".into(),
                        what: format!(
                            "the pinned version {from} is gone, so the change cannot be checked"
                        ),
                    }],
                    true,
                ),
            };
            moves.push(StepMove {
                step: key.clone(),
                from: from.to_string(),
                to: to.to_string(),
                changes,
                breaking,
            });
        }
        let breaking: Vec<&StepMove> = moves.iter().filter(|m| m.breaking).collect();
        if !breaking.is_empty() && !force {
            let detail: Vec<String> = breaking
                .iter()
                .map(|m| {
                    let what: Vec<&str> = m
                        .changes
                        .iter()
                        .filter(|c| c.bump != "patch" && c.bump != "minor")
                        .map(|c| c.what.as_str())
                        .collect();
                    format!("{}: {} → {} ({})", m.step, m.from, m.to, what.join("; "))
                })
                .collect();
            return Err(RuntimeError::Conflict(format!(
                "upgrading `{piece}` in flow `{flow_id}` breaks: {}; review and use --force to apply anyway",
                detail.join(", ")
            )));
        }
        if moves.is_empty() {
            return Ok(Upgraded {
                flow: flow_id.to_owned(),
                version: current.version,
                created: false,
                steps: moves,
                forced: false,
            });
        }
        let applied = self
            .store
            .apply_flow(ValidFlow {
                definition: valid.definition,
                resolved,
            })
            .await?;
        // A trigger moved to another piece version stops listening as the old one and
        // starts as the new one, as on an apply.
        let listening = crate::trigger_hooks::Listening {
            before: record.enabled.then_some(current.version),
            after: applied.record.enabled.then_some(applied.version),
        };
        self.run_trigger_hooks(flow_id, listening, actor).await?;
        Ok(Upgraded {
            flow: flow_id.to_owned(),
            version: applied.version,
            created: applied.created,
            forced: !breaking.is_empty(),
            steps: moves,
        })
    }
}
