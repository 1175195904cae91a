//! forkpoint: checkpoint a process tree together with the files it works on.
//!
//! The binary (`src/main.rs`) is the command line; this library holds the process engine so that
//! tests and examples can drive it directly.

pub mod engine;
