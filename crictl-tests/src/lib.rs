//! Helpers for driving a real berthd from tests and benchmarks.
