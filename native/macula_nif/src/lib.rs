//! The rustler edge of `macula_dist`: Erlang terms in, `macula_quic` calls, Erlang
//! messages out. No NIF here blocks: anything that waits runs on the tokio runtime and
//! answers with a message. The Erlang stubs and their specs are in
//! `src/macula_dist_nif.erl`.

mod atoms;
mod connection_nif;
mod endpoint_nif;
mod errors;
mod events;
mod outgoing;
mod priority;
mod runtime;
mod shutdown;
mod terms;

fn on_load(_env: rustler::Env, _info: rustler::Term) -> bool {
    shutdown::install()
}

rustler::init!("macula_dist_nif", load = on_load);
