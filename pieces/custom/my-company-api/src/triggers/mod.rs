pub mod new_ticket;
