# macula_dist -- the two commands: `make demo` and `make test`.
#
#   make deps    apt-get install Erlang/OTP, rebar3, Common Test, iproute2, nftables if missing
#   make build   deps + rebar3 compile (cargo builds the NIF into priv/)
#   make demo    build + scripts/demo: two nodes over QUIC, messages, erpc, bulk data
#   make test    deps + cargo test + rebar3 eunit + rebar3 ct, stops at the first failure
#   make bench   build + bench/run (BENCH_ARGS="--quick" for a short run)

SHELL := /bin/bash
.DEFAULT_GOAL := help
BENCH_ARGS ?=

.PHONY: help deps build demo test bench

help:
	@sed -n 's/^#   make /  make /p' $(firstword $(MAKEFILE_LIST))

deps:
	@bash scripts/install-deps

build: deps
	rebar3 compile

demo: build
	@bash scripts/demo

test: deps
	@bash scripts/run-tests

bench: build
	bench/run $(BENCH_ARGS)
