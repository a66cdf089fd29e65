//! The integration tests, one binary: each module starts the real `baton`
//! binary (and real peers) for one area of behaviour; `support` is their
//! shared harness.

mod support;

mod adopt;
mod bench;
mod demo;
mod deploy;
mod desync;
mod endurance;
mod gin;
mod grpc;
mod http2;
mod inherit;
mod kubernetes;
mod leaks;
mod notify;
mod operations;
mod proxy;
mod real_podman;
mod real_systemd;
mod recipes;
mod releases;
mod reload;
mod restart;
mod rollback;
mod services;
mod startup_errors;
mod stop;
mod storm;
mod supervise;
mod upgrade;
mod wire;
mod workers;
