//! The QUIC transport core of `macula_dist`, an Erlang distribution carrier.
//!
//! This crate knows nothing about the BEAM: it frames bytes, makes TLS identities, and
//! drives quinn endpoints and connections, reporting what happens through the
//! [`connection::Events`] trait. The `macula_nif` crate implements that trait with
//! Erlang messages; the tests here implement it with channels. Everything a peer sends
//! is treated as hostile: bad input closes that one connection, never panics.

#![forbid(unsafe_code)]

pub mod admission;
pub mod auth;
pub mod cert_subject;
pub mod connection;
mod data_in;
mod data_out;
pub mod endpoint;
mod fence;
pub mod frame;
mod graceful_close;
pub mod icmp_socket;
pub mod liveness;
pub mod node_name;
pub mod reset_key;
pub mod routing;
pub mod settings;
pub mod tls;
pub mod wire;

pub use admission::{Established, Gate};
pub use connection::{CloseReason, Closed, Connection, Events, HandshakeSendError, Refusal, SendStatus, Stats};
pub use data_in::Credit;
pub use endpoint::{AcceptError, BindError, ConnectError, Endpoint};
pub use settings::Settings;
