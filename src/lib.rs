//! The `piecework` binary's own code: the CLI ([`cli`]), what each command does
//! ([`commands`]), configuration layering ([`config`]), the built-in piece registry
//! ([`registry`]), flow files ([`flows`]), and the embedded sandbox behind `piecework dev`
//! ([`dev`]), which the end-to-end tests in `tests/` drive as well; [`infra`] builds the runtime
//! on the in-memory adapters or on NATS and Redis, [`pieces`] loads and follows where bundles
//! come from, [`bundles`] builds, inspects, signs and publishes them, [`health`] serves worker and scheduler
//! health checks and metrics, [`audit`] follows the audit trail.

pub mod audit;
pub mod bundles;
pub mod cli;
pub mod client;
pub mod commands;
pub mod config;
pub mod demo;
pub mod dev;
pub mod doctor;
pub mod feed;
pub mod flows;
pub mod health;
pub mod infra;
pub mod node;
pub mod piece_test;
pub mod pieces;
pub mod registry;
pub mod runs;
pub mod scaffold;
