pub mod create_ticket;
pub mod health_check;
pub mod update_ticket;
