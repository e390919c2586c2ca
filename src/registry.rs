//! The pieces built into this binary. A new piece is added here (and to the workspace); the
//! scaffold command does both.

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
    // Private pieces (pieces/custom/).
    registry.register_built(piecework_piece_my_company_api::piece())?;
    Ok(registry)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_built_in_piece_registers() {
        let registry = super::pieces().expect("built-in pieces are valid");
        let names: Vec<&str> = registry.names().collect();
        assert_eq!(
            names,
            [
                "data",
                "http",
                "my-company-api",
                "schedule",
                "store",
                "webhook"
            ]
        );
    }
}
