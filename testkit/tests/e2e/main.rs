//! The end-to-end tests: one test binary, so that CI links (and stores) it once rather than once
//! per file. Each module is one subject; nextest runs every test in a process of its own.

mod dnat_netns;
mod dns;
mod egress;
mod fallback_netns;
mod front_cuts;
mod front_limits;
mod grpc_transport;
mod identity;
mod kubernetes;
mod lifecycle;
mod liveness;
mod partition_netns;
mod port_config;
mod prometheus_node_exporter;
mod real_clients;
mod refusal_logs;
mod refusals;
mod replicas;
mod streams;
mod through_tunnel;
