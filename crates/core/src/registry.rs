//! The pieces a process can run, by name and version.
//!
//! Flows name a piece and a semver range; the range is resolved here when a flow version is
//! created, and again by the worker, which refuses a step whose range it cannot serve.

use std::collections::BTreeMap;

use piecework_sdk::{Piece, PieceDefinitionError, PieceMetadata};
use semver::{Version, VersionReq};

/// Registered pieces; several versions of one piece may be registered side by side.
#[derive(Default, Clone, Debug)]
pub struct Registry {
    /// Per name, versions newest first.
    pieces: BTreeMap<String, Vec<Piece>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Definition(#[from] PieceDefinitionError),
    #[error("piece `{0}` version {1} is registered twice")]
    Duplicate(String, Version),
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register(&mut self, piece: Piece) -> Result<(), RegistryError> {
        let versions = self.pieces.entry(piece.name().to_owned()).or_default();
        if versions.iter().any(|p| p.version() == piece.version()) {
            return Err(RegistryError::Duplicate(
                piece.name().to_owned(),
                piece.version().clone(),
            ));
        }
        versions.push(piece);
        versions.sort_by(|a, b| b.version().cmp(a.version()));
        Ok(())
    }

    /// Registers the result of a piece's constructor, surfacing a bad definition.
    pub fn register_built(
        &mut self,
        piece: Result<Piece, PieceDefinitionError>,
    ) -> Result<(), RegistryError> {
        self.register(piece?)
    }

    /// The newest registered version matching `range`.
    pub fn resolve(&self, name: &str, range: &VersionReq) -> Option<&Piece> {
        self.pieces
            .get(name)?
            .iter()
            .find(|p| range.matches(p.version()))
    }

    pub fn get(&self, name: &str, version: &Version) -> Option<&Piece> {
        self.pieces
            .get(name)?
            .iter()
            .find(|p| p.version() == version)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.pieces.contains_key(name)
    }

    /// Registered versions of a piece, newest first.
    pub fn versions(&self, name: &str) -> Vec<&Version> {
        self.pieces
            .get(name)
            .map(|v| v.iter().map(Piece::version).collect())
            .unwrap_or_default()
    }

    /// Every registered piece, by name then newest version first.
    pub fn pieces(&self) -> impl Iterator<Item = &Piece> {
        self.pieces.values().flatten()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.pieces.keys().map(String::as_str)
    }

    /// Metadata of the newest version of every piece, for the catalog.
    pub fn catalog(&self) -> Vec<&PieceMetadata> {
        self.pieces
            .values()
            .filter_map(|v| v.first())
            .map(Piece::metadata)
            .collect()
    }
}
