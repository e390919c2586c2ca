pub mod merge;
pub mod set;
