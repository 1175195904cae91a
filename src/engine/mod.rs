//! The process engine: freeze, dump and restore process trees with ptrace and /proc.
