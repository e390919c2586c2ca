//! The `piecework` binary's own code: the CLI ([`cli`]), what each command does
//! ([`commands`]), configuration layering ([`config`]), the built-in piece registry
//! ([`registry`]), flow files ([`flows`]), and the embedded sandbox behind `piecework dev`
//! ([`dev`]), which the end-to-end tests in `tests/` drive as well.

pub mod cli;
pub mod commands;
pub mod config;
pub mod dev;
pub mod feed;
pub mod flows;
pub mod registry;
