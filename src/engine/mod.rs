//! The process engine: freeze, dump and restore process trees with ptrace and /proc.

pub mod dump;
pub mod image;
pub mod restore;
pub mod sys;
pub mod tracer;

#[cfg(test)]
mod tests;
