//! Benchmark harness for Quiver (criterion benches and the end-to-end driver live here).
//!
//! Speed and memory are reported as ratios against a baseline run in the same process,
//! never asserted in tests.
