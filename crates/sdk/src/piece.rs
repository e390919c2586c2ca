//! A piece: metadata plus its actions and triggers, built like the guide's `createPiece`.

use std::collections::HashSet;
use std::sync::Arc;

use semver::Version;
use serde::{Deserialize, Serialize};

use crate::action::{Action, ActionHandle, ActionSpec, DynAction};
use crate::auth::{DynValidateAuth, PieceAuth, ValidateAuth};
use crate::trigger::{
    self, PollingTrigger, ScheduleTrigger, TriggerHandle, TriggerSpec, WebhookTrigger,
};

/// Well-known categories, as in the pieces framework's `PieceCategory`.
pub mod category {
    pub const ARTIFICIAL_INTELLIGENCE: &str = "artificial_intelligence";
    pub const BUSINESS_INTELLIGENCE: &str = "business_intelligence";
    pub const COMMUNICATION: &str = "communication";
    pub const CORE: &str = "core";
    pub const DEVELOPER_TOOLS: &str = "developer_tools";
    pub const PRODUCTIVITY: &str = "productivity";
}

/// Everything a catalog, a docs generator or a version check needs to know about a piece.
/// `piecework piece metadata` writes this as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PieceMetadata {
    pub name: String,
    pub display_name: String,
    pub description: String,
    pub version: Version,
    pub auth: PieceAuth,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logo_url: Option<String>,
    #[serde(default)]
    pub categories: Vec<String>,
    #[serde(default)]
    pub authors: Vec<String>,
    /// The oldest piecework release this piece runs on.
    pub minimum_supported_release: Version,
    pub actions: Vec<ActionSpec>,
    pub triggers: Vec<TriggerSpec>,
}

/// A piece definition that cannot be registered; the message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("piece `{piece}`: {problem}")]
pub struct PieceDefinitionError {
    pub piece: String,
    pub problem: String,
}

/// A built piece, ready to register. Cheap to clone: clones share one definition.
#[derive(Clone)]
pub struct Piece {
    inner: Arc<Definition>,
}

struct Definition {
    metadata: PieceMetadata,
    actions: Vec<Arc<dyn DynAction>>,
    triggers: Vec<TriggerHandle>,
    auth_validator: Option<Arc<dyn DynValidateAuth>>,
}

impl std::fmt::Debug for Piece {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Piece")
            .field("name", &self.inner.metadata.name)
            .field("version", &self.inner.metadata.version.to_string())
            .finish_non_exhaustive()
    }
}

impl Piece {
    /// Starts a piece definition. `name` is the stable identifier flows refer to
    /// (lowercase letters, digits and `-`).
    pub fn builder(name: impl Into<String>, display_name: impl Into<String>) -> PieceBuilder {
        PieceBuilder {
            name: name.into(),
            display_name: display_name.into(),
            description: String::new(),
            version: String::from("0.1.0"),
            auth: PieceAuth::None,
            logo_url: None,
            categories: Vec::new(),
            authors: Vec::new(),
            minimum_supported_release: String::from("0.1.0"),
            actions: Vec::new(),
            triggers: Vec::new(),
            auth_validator: None,
        }
    }

    /// Assembles a piece from metadata and already type-erased members, checking it as
    /// [`PieceBuilder::build`] does. This is for piece hosts, which run a piece elsewhere (in
    /// a child process) and stand in for its actions and triggers; authors use the builder.
    pub fn assemble(
        metadata: PieceMetadata,
        actions: Vec<Arc<dyn DynAction>>,
        triggers: Vec<TriggerHandle>,
        auth_validator: Option<Arc<dyn DynValidateAuth>>,
    ) -> Result<Piece, PieceDefinitionError> {
        let fail = |problem: String| PieceDefinitionError {
            piece: metadata.name.clone(),
            problem,
        };
        check_definition(
            &metadata.name,
            actions.iter().map(|a| a.spec()),
            triggers.iter().map(TriggerHandle::spec),
            &metadata.auth,
        )
        .map_err(&fail)?;
        let declared = |names: Vec<&str>, members: Vec<&str>, what: &str| {
            if names == members {
                Ok(())
            } else {
                Err(fail(format!(
                    "the metadata lists {what} {names:?} but the piece has {members:?}"
                )))
            }
        };
        declared(
            metadata.actions.iter().map(|a| a.name.as_str()).collect(),
            actions.iter().map(|a| a.spec().name.as_str()).collect(),
            "actions",
        )?;
        declared(
            metadata.triggers.iter().map(|t| t.name.as_str()).collect(),
            triggers.iter().map(|t| t.spec().name.as_str()).collect(),
            "triggers",
        )?;
        Ok(Piece {
            inner: Arc::new(Definition {
                metadata,
                actions,
                triggers,
                auth_validator,
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.inner.metadata.name
    }

    pub fn version(&self) -> &Version {
        &self.inner.metadata.version
    }

    pub fn metadata(&self) -> &PieceMetadata {
        &self.inner.metadata
    }

    pub fn auth(&self) -> &PieceAuth {
        &self.inner.metadata.auth
    }

    pub fn action(&self, name: &str) -> Option<&Arc<dyn DynAction>> {
        self.inner.actions.iter().find(|a| a.spec().name == name)
    }

    pub fn trigger(&self, name: &str) -> Option<&TriggerHandle> {
        self.inner.triggers.iter().find(|t| t.spec().name == name)
    }

    /// Whether the piece checks connection values against its system when they are saved.
    pub fn has_auth_check(&self) -> bool {
        self.inner.auth_validator.is_some()
    }

    /// Runs the piece's auth check (if it has one) on the values in `ctx.auth()`.
    pub async fn validate_auth(&self, ctx: &crate::Context) -> Result<(), crate::PieceError> {
        match &self.inner.auth_validator {
            Some(validator) => validator.validate(ctx).await,
            None => Ok(()),
        }
    }

    pub fn actions(&self) -> impl Iterator<Item = &Arc<dyn DynAction>> {
        self.inner.actions.iter()
    }

    pub fn triggers(&self) -> impl Iterator<Item = &TriggerHandle> {
        self.inner.triggers.iter()
    }

    /// Whether two handles are the same definition (not merely equal metadata).
    pub fn same_definition(&self, other: &Piece) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

/// Builder for [`Piece`]; `build` checks the definition.
pub struct PieceBuilder {
    name: String,
    display_name: String,
    description: String,
    version: String,
    auth: PieceAuth,
    logo_url: Option<String>,
    categories: Vec<String>,
    authors: Vec<String>,
    minimum_supported_release: String,
    actions: Vec<Arc<dyn DynAction>>,
    triggers: Vec<TriggerHandle>,
    auth_validator: Option<Arc<dyn DynValidateAuth>>,
}

impl PieceBuilder {
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// The piece's semver version (bump major for breaking changes).
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    pub fn auth(mut self, auth: PieceAuth) -> Self {
        self.auth = auth;
        self
    }

    pub fn logo_url(mut self, url: impl Into<String>) -> Self {
        self.logo_url = Some(url.into());
        self
    }

    pub fn categories(mut self, categories: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.categories = categories.into_iter().map(Into::into).collect();
        self
    }

    pub fn authors(mut self, authors: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.authors = authors.into_iter().map(Into::into).collect();
        self
    }

    pub fn minimum_supported_release(mut self, release: impl Into<String>) -> Self {
        self.minimum_supported_release = release.into();
        self
    }

    /// Checks connection values against the real system when a connection is saved (the
    /// guide's auth `validate`).
    pub fn validate_auth(mut self, validator: impl ValidateAuth) -> Self {
        self.auth_validator = Some(Arc::new(validator));
        self
    }

    pub fn action(mut self, action: impl Action) -> Self {
        self.actions.push(Arc::new(ActionHandle::new(action)));
        self
    }

    pub fn polling_trigger(mut self, trigger: impl PollingTrigger) -> Self {
        self.triggers.push(trigger::polling(trigger));
        self
    }

    pub fn webhook_trigger(mut self, trigger: impl WebhookTrigger) -> Self {
        self.triggers.push(trigger::webhook(trigger));
        self
    }

    pub fn schedule_trigger(mut self, trigger: impl ScheduleTrigger) -> Self {
        self.triggers.push(trigger::schedule(trigger));
        self
    }

    pub fn build(self) -> Result<Piece, PieceDefinitionError> {
        let fail = |problem: String| PieceDefinitionError {
            piece: self.name.clone(),
            problem,
        };
        let version = Version::parse(&self.version)
            .map_err(|e| fail(format!("version {:?} is not semver: {e}", self.version)))?;
        let minimum_supported_release =
            Version::parse(&self.minimum_supported_release).map_err(|e| {
                fail(format!(
                    "minimum_supported_release {:?} is not semver: {e}",
                    self.minimum_supported_release
                ))
            })?;
        check_definition(
            &self.name,
            self.actions.iter().map(|a| a.spec()),
            self.triggers.iter().map(TriggerHandle::spec),
            &self.auth,
        )
        .map_err(&fail)?;
        let metadata = PieceMetadata {
            name: self.name,
            display_name: self.display_name,
            description: self.description,
            version,
            auth: self.auth,
            logo_url: self.logo_url,
            categories: self.categories,
            authors: self.authors,
            minimum_supported_release,
            actions: self.actions.iter().map(|a| a.spec().clone()).collect(),
            triggers: self.triggers.iter().map(|t| t.spec().clone()).collect(),
        };
        Ok(Piece {
            inner: Arc::new(Definition {
                metadata,
                actions: self.actions,
                triggers: self.triggers,
                auth_validator: self.auth_validator,
            }),
        })
    }
}

/// Checks metadata as [`PieceBuilder::build`] checks a definition: a valid name, well-named and
/// unique actions, triggers and props. For metadata that arrives from elsewhere (a bundle).
pub fn check_metadata(metadata: &PieceMetadata) -> Result<(), PieceDefinitionError> {
    check_definition(
        &metadata.name,
        metadata.actions.iter(),
        metadata.triggers.iter(),
        &metadata.auth,
    )
    .map_err(|problem| PieceDefinitionError {
        piece: metadata.name.clone(),
        problem,
    })
}

/// The checks every piece passes, however it was put together: a valid name, well-named and
/// unique actions, triggers and props.
fn check_definition<'a>(
    name: &str,
    actions: impl Iterator<Item = &'a ActionSpec>,
    triggers: impl Iterator<Item = &'a TriggerSpec>,
    auth: &PieceAuth,
) -> Result<(), String> {
    if !is_piece_name(name) {
        return Err(
            "name must be lowercase letters, digits and '-', starting with a letter".into(),
        );
    }
    let mut seen = HashSet::new();
    for spec in actions {
        check_member("action", &spec.name, &spec.props, &mut seen)?;
    }
    let mut seen = HashSet::new();
    for spec in triggers {
        check_member("trigger", &spec.name, &spec.props, &mut seen)?;
    }
    if let PieceAuth::Custom { props, .. } = auth {
        check_member("auth", "custom", props, &mut HashSet::new())?;
    }
    Ok(())
}

fn check_member(
    what: &str,
    name: &str,
    props: &[crate::prop::Prop],
    seen: &mut HashSet<String>,
) -> Result<(), String> {
    if !is_identifier(name) {
        return Err(format!(
            "{what} name {name:?} must be lowercase letters, digits and '_', starting with a letter"
        ));
    }
    if !seen.insert(name.to_owned()) {
        return Err(format!("{what} `{name}` is defined twice"));
    }
    let mut prop_names = HashSet::new();
    for prop in props {
        if !is_identifier(&prop.name) {
            return Err(format!(
                "{what} `{name}`: prop name {:?} must be snake_case",
                prop.name
            ));
        }
        if !prop_names.insert(prop.name.as_str()) {
            return Err(format!(
                "{what} `{name}`: prop `{}` is declared twice",
                prop.name
            ));
        }
    }
    Ok(())
}

/// `my-company-api`
pub fn is_piece_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-')
        && !name.contains("--")
}

/// `create_ticket`
pub fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prelude::*;
    use serde_json::{Value, json};

    struct Echo;

    impl Action for Echo {
        type Input = Value;
        type Output = Value;

        fn spec(&self) -> ActionSpec {
            ActionSpec::new("echo", "Echo").prop(Prop::json("value", "Value").required())
        }

        async fn run(&self, _ctx: &Context, input: Value) -> Result<Value, PieceError> {
            Ok(input["value"].clone())
        }
    }

    #[tokio::test]
    async fn actions_validate_then_run() {
        let piece = Piece::builder("echo-piece", "Echo")
            .action(Echo)
            .build()
            .unwrap();
        let action = piece.action("echo").unwrap();
        let ctx = Context::for_test("s");
        assert_eq!(
            action
                .run_json(&ctx, json!({"value": [1, 2]}))
                .await
                .unwrap(),
            json!([1, 2])
        );
        let err = action.run_json(&ctx, json!({})).await.unwrap_err();
        assert_eq!(err.to_string(), "prop `value`: is required");
        assert!(!err.is_retryable());
    }

    #[test]
    fn bad_definitions_are_refused_with_the_reason() {
        let err = Piece::builder("Bad Name", "x").build().unwrap_err();
        assert!(err.problem.contains("lowercase"), "{err}");
        let err = Piece::builder("p", "x").version("one").build().unwrap_err();
        assert!(err.problem.contains("not semver"), "{err}");
        let err = Piece::builder("p", "x")
            .action(Echo)
            .action(Echo)
            .build()
            .unwrap_err();
        assert_eq!(err.to_string(), "piece `p`: action `echo` is defined twice");
    }

    #[test]
    fn metadata_round_trips_as_json() {
        let piece = Piece::builder("echo-piece", "Echo")
            .version("1.2.3")
            .auth(PieceAuth::secret_text("API key"))
            .categories([category::CORE])
            .action(Echo)
            .build()
            .unwrap();
        let json = serde_json::to_value(piece.metadata()).unwrap();
        assert_eq!(json["version"], "1.2.3");
        assert_eq!(json["auth"]["type"], "secret_text");
        assert_eq!(json["actions"][0]["props"][0]["type"], "json");
        let back: PieceMetadata = serde_json::from_value(json).unwrap();
        assert_eq!(&back, piece.metadata());
    }
}
