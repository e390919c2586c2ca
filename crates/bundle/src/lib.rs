//! Piece bundles: the deployable form of a piece, `NAME-VERSION.piece.tgz`.
//!
//! A bundle is a gzip-compressed tar holding `piece.json` (the [`Manifest`]: the piece's
//! metadata, how to run it, its limits and the environment it may read) and the payload (an
//! executable, or a JavaScript module for the Node host). It is identified by the SHA-256
//! [`Digest`] of its bytes and may be signed with ed25519 ([`signature`]).
//!
//! Layout: `manifest` (piece.json), `archive` (deterministic packing, checked reading and
//! unpacking), `digest`, `signature`. Nothing here runs a piece: that is `piecework-host`.

pub mod archive;
pub mod digest;
pub mod manifest;
pub mod signature;

pub use archive::{Bundle, BundleError, File, pack};
pub use digest::Digest;
pub use manifest::{Limits, Manifest, RuntimeKind, RuntimeSpec};
pub use signature::{Signature, SignatureError, SigningKey, TrustedKeys};
