//! Who may do what through the API: the roles of named API keys, the permissions routes
//! require, and the shape of a key.
//!
//! A key reads `pwk_<name>_<secret>`: the name says which record to check (so a lookup is one
//! read, and a leaked key in a log tells whose it is), the secret is 32 random bytes in
//! unpadded base64url. Names are lowercase letters, digits and `-`, so the first `_` after the
//! prefix ends the name.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What a key may do. Every role may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, including API keys and webhook secrets.
    Admin,
    /// Flows, pieces and connections: what a piece author and a flow's owner change.
    Developer,
    /// Runs (retry, cancel, start) and enabling or disabling flows: what on-call does.
    Operator,
    /// Read only.
    Viewer,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Admin, Role::Developer, Role::Operator, Role::Viewer];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Developer => "developer",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }

    /// Whether this role grants `permission`.
    pub fn may(self, permission: Permission) -> bool {
        use Permission::*;
        match self {
            Role::Admin => true,
            Role::Developer => matches!(
                permission,
                Read | ManageFlows | ToggleFlows | ManagePieces | ManageConnections | StartRuns
            ),
            Role::Operator => matches!(permission, Read | ToggleFlows | OperateRuns | StartRuns),
            Role::Viewer => permission == Read,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!("unknown role {s:?}: expected one of admin, developer, operator, viewer")
            })
    }
}

/// What a route requires of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    /// Read flows, runs, pieces, connections (names, never values), the audit trail.
    Read,
    /// Apply and upgrade flows.
    ManageFlows,
    /// Enable and disable flows.
    ToggleFlows,
    /// Publish and yank pieces.
    ManagePieces,
    /// Save and delete connections.
    ManageConnections,
    /// Retry and cancel runs.
    OperateRuns,
    /// Start a run of a flow by hand.
    StartRuns,
    /// Create, list and revoke API keys.
    ManageKeys,
    /// Read and rotate webhook flows' secrets.
    ReadSecrets,
}

impl Permission {
    pub const ALL: [Permission; 9] = [
        Permission::Read,
        Permission::ManageFlows,
        Permission::ToggleFlows,
        Permission::ManagePieces,
        Permission::ManageConnections,
        Permission::OperateRuns,
        Permission::StartRuns,
        Permission::ManageKeys,
        Permission::ReadSecrets,
    ];
}

/// The prefix of every key piecework issues.
pub const KEY_PREFIX: &str = "pwk_";

/// Checks a key's name: 1–64 lowercase letters, digits and `-`, starting with a letter.
pub fn check_key_name(name: &str) -> Result<(), String> {
    let valid = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "key name {name:?} must be 1–64 lowercase letters, digits and `-`, starting with a letter"
        ))
    }
}

/// Splits a key into its name and secret; `None` when it is not a key piecework issued.
pub fn split_key(key: &str) -> Option<(&str, &str)> {
    let (name, secret) = key.strip_prefix(KEY_PREFIX)?.split_once('_')?;
    (check_key_name(name).is_ok() && !secret.is_empty()).then_some((name, secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_grant_what_their_descriptions_say() {
        for permission in Permission::ALL {
            assert!(Role::Admin.may(permission));
            assert!(Role::Viewer.may(permission) == (permission == Permission::Read));
        }
        assert!(Role::Developer.may(Permission::ManagePieces));
        assert!(!Role::Developer.may(Permission::OperateRuns));
        assert!(!Role::Developer.may(Permission::ManageKeys));
        assert!(Role::Operator.may(Permission::OperateRuns));
        assert!(Role::Operator.may(Permission::ToggleFlows));
        assert!(!Role::Operator.may(Permission::ManageFlows));
        assert!(!Role::Operator.may(Permission::ManageConnections));
    }

    #[test]
    fn roles_parse_from_their_names_only() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
        let err = "root".parse::<Role>().unwrap_err();
        assert!(err.contains("\"root\"") && err.contains("viewer"), "{err}");
    }

    #[test]
    fn keys_split_at_the_first_underscore_after_the_name() {
        assert_eq!(
            split_key("pwk_ci-deploy_ab_c-d"),
            Some(("ci-deploy", "ab_c-d"))
        );
        assert_eq!(split_key("pwk_ci_"), None);
        assert_eq!(split_key("pwk_CI_secret"), None);
        assert_eq!(split_key("a-bootstrap-key-0123456789"), None);
        assert!(check_key_name("9lives").is_err());
        assert!(check_key_name(&"a".repeat(65)).is_err());
    }
}
