//! The pieces built into this binary: the core ones every installation has. Private pieces
//! are never added here: they ship as bundles (`piecework piece build`) and are loaded from
//! the pieces directory or the registry.

use piecework_core::Registry;
use piecework_core::registry::RegistryError;

/// Every built-in piece, registered.
pub fn pieces() -> Result<Registry, RegistryError> {
    let mut registry = Registry::new();
    registry.register_built(piecework_piece_data::piece())?;
    registry.register_built(piecework_piece_http::piece())?;
    registry.register_built(piecework_piece_schedule::piece())?;
    registry.register_built(piecework_piece_store::piece())?;
    registry.register_built(piecework_piece_webhook::piece())?;
    Ok(registry)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_built_in_piece_registers() {
        let registry = super::pieces().expect("built-in pieces are valid");
        let names: Vec<&str> = registry.names().collect();
        assert_eq!(names, ["data", "http", "schedule", "store", "webhook"]);
    }
}
