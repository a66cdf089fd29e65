//! The demo: the embedded example app (`app`), which `baton demo` runs and
//! the integration tests use as their probe.

pub mod app;
