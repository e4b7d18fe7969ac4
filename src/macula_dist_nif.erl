%%% @doc Stubs of the `macula_nif' Rust library (native/macula_nif).
%%%
%%% The library is loaded explicitly by {@link load/0}, called from
%%% `macula_dist:listen/2', never through `-on_load': in an embedded-mode release
%%% on_load handlers run only after distribution has started (CARRIER-NOTES pitfall 1).
%%%
%%% No function here blocks. Anything that waits answers later with a message:
%%% <ul>
%%% <li>`{macula_incoming, Conn, PeerAddr}', `{macula_refused, PeerAddr, refusal()}' to the
%%%     acceptor;</li>
%%% <li>`{macula_connect, {ok, Conn} | {error, connect_error()}}' to the caller of connect/4;</li>
%%% <li>`{macula_handshake, Binary}' to the caller of recv_handshake/1;</li>
%%% <li>`{macula_data, Credit, [Packet]}' to the input handler given to activate/2
%%%     (Credit goes back with ack_data/2);</li>
%%% <li>`macula_writable' and `{macula_closed, Reason}' to the connection's controller
%%%     (set_controller/2), and before that to the owner given to connect/4;</li>
%%% <li>`macula_endpoint_closed' to the caller of close_endpoint/1.</li>
%%% </ul>
%%%
%%% Errors are atoms and tagged tuples (the types below) that callers match;
%%% {@link format_error/1} makes the text for the log. Binaries inside them are free
%%% text from a library or the peer. Arguments of the wrong type raise `badarg'.
-module(macula_dist_nif).

-export([load/0, format_error/1]).
-export([listen/3, endpoint_address/1, accept/2, connect/4, close_endpoint/1, rebind/3]).
-export([set_controller/2, send_handshake/2, recv_handshake/1, recv_message/1,
         auth_proof/4, auth_verify/5,
         peer_cert_covers/2, refuse/3, activate/2, ack_data/2, send_data/2, send_unrouted/2,
         tick/1, stats/1, close/1, info/1]).
-export([set_priority/3]).

-export_type([endpoint/0, conn/0, close_reason/0, credit/0, listen_error/0, bind_error/0,
              connect_error/0, refusal/0]).

-type endpoint() :: reference().
-type conn() :: reference().
-type credit() :: {normal | priority, non_neg_integer()}.
-type address() :: {inet:ip_address(), inet:port_number()}.
%% An OS error as inet names it (`eaddrinuse', ...), or its text if it has no name.
-type posix() :: inet:posix() | binary().
-type bind_error() :: {bind, address(), posix()}
                    | not_listening   % no endpoint was ever opened
                    | bind_timeout.   % the runtime thread did not answer
-type tls_error() :: {file, certfile | keyfile | cacertfile, Path :: binary(), Why :: binary()}
                   | {key_mismatch, Certfile :: binary(), Keyfile :: binary()}
                   | {setup, binary()}.
-type listen_error() :: bind_error() | {tls, tls_error()} | {runtime, posix()}.
-type connect_error() :: not_listening
                       | {bad_host, binary()}
                       | {resolve, Host :: binary(), no_address | binary()}
                       %% The TLS handshake failed (a certificate refused, PKI mode).
                       | {tls, {alert, 0..255, binary()}}
                       %% ICMP: nobody is there (TCP's "connection refused").
                       | {unreachable, {port | host | network | prohibited | other, address()}}
                       | {connect, timeout | binary()}.
%% Why an incoming connection was dropped before the acceptor saw it.
-type refusal() :: overloaded | handshake_timeout | {handshake, binary()}.
-type close_reason() :: connection_closed | net_tick_timeout | closed
                      | {peer_closed, non_neg_integer(), binary()}
                      | {protocol_violation, binary()}
                      | {not_authenticated, binary()}
                      | {transport_error, binary()}.

-define(NOT_LOADED, erlang:nif_error({not_loaded, ?MODULE})).

%% @doc Loads the shared library from this application's priv directory (idempotent).
-spec load() -> ok | {error, term()}.
load() ->
    Path = filename:join(priv_dir(), "macula_dist_nif"),
    case erlang:load_nif(Path, 0) of
        ok -> ok;
        {error, {reload, _}} -> ok;
        {error, Reason} -> {error, {load_nif, Path, Reason}}
    end.

%% @doc The log text of an error of this module's functions and messages (anything
%% else is printed as a term).
-spec format_error(term()) -> string().
format_error(Reason) ->
    lists:flatten(describe(Reason)).

describe({bind, Address, Why}) ->
    io_lib:format("cannot bind udp ~ts: ~ts", [address(Address), posix(Why)]);
describe(not_listening) -> "no endpoint is listening";
describe(bind_timeout) -> "the runtime thread did not answer";
describe({runtime, Why}) -> io_lib:format("cannot start runtime: ~ts", [posix(Why)]);
describe({tls, {file, Option, Path, Why}}) -> io_lib:format("~ts ~ts: ~ts", [Option, Path, Why]);
describe({tls, {key_mismatch, Certfile, Keyfile}}) ->
    io_lib:format("keyfile ~ts does not match the certificate in certfile ~ts", [Keyfile, Certfile]);
describe({tls, {setup, Why}}) -> io_lib:format("tls configuration failed: ~ts", [Why]);
describe({tls, {alert, Alert, Why}}) -> io_lib:format("tls handshake failed (alert ~b): ~ts", [Alert, Why]);
describe({bad_host, Host}) -> io_lib:format("'~ts' is neither an IP address nor a valid host name", [Host]);
describe({resolve, Host, no_address}) -> io_lib:format("~ts: host name has no address", [Host]);
describe({resolve, Host, Why}) -> io_lib:format("~ts: host name lookup failed: ~ts", [Host, Why]);
describe({unreachable, {Kind, Address}}) ->
    io_lib:format("~ts from ~ts", [unreachable(Kind), address(Address)]);
describe({connect, timeout}) -> "handshake timed out";
describe({connect, Why}) -> io_lib:format("connection failed: ~ts", [Why]);
describe(overloaded) -> "dropped: too many unauthenticated connections";
describe(handshake_timeout) -> "did not authenticate within net_setuptime";
describe({handshake, Why}) -> io_lib:format("handshake failed: ~ts", [Why]);
describe(no_peer_certificate) -> "the peer presented no certificate";
describe({bad_peer_certificate, Why}) -> io_lib:format("the peer's certificate cannot be parsed: ~ts", [Why]);
describe(Other) -> io_lib:print(Other, 1, 1 bsl 20, -1).

posix(Why) when is_atom(Why) -> inet:format_error(Why);
posix(Why) -> Why.

unreachable(port) -> "port unreachable";
unreachable(host) -> "host unreachable";
unreachable(network) -> "network unreachable";
unreachable(prohibited) -> "administratively prohibited";
unreachable(other) -> "destination unreachable".

address({Ip, Port}) when tuple_size(Ip) =:= 8 -> io_lib:format("[~ts]:~b", [inet:ntoa(Ip), Port]);
address({Ip, Port}) -> io_lib:format("~ts:~b", [inet:ntoa(Ip), Port]).

priv_dir() ->
    case code:priv_dir(macula_dist) of
        {error, bad_name} ->
            filename:join(filename:dirname(filename:dirname(code:which(?MODULE))), "priv");
        Dir ->
            Dir
    end.

%%% Endpoint

%% How long listen/3 and rebind/3 wait for the runtime thread that binds the socket.
-define(BIND_TIMEOUT, 10000).

%% Binds the node's UDP endpoint (on a runtime thread; this waits for the answer).
-spec listen(inet:ip_address(), inet:port_number(), map()) -> {ok, endpoint()} | {error, listen_error()}.
listen(Ip, Port, Options) ->
    ok = start_listen(Ip, Port, Options),
    receive
        {macula_listen, Result} -> Result
    after ?BIND_TIMEOUT ->
            {error, bind_timeout}
    end.

start_listen(_Ip, _Port, _Options) -> ?NOT_LOADED.

-spec endpoint_address(endpoint()) -> {ok, address()} | {error, posix()}.
endpoint_address(_Endpoint) -> ?NOT_LOADED.

-spec accept(endpoint(), pid()) -> ok | {error, not_listening}.
accept(_Endpoint, _Acceptor) -> ?NOT_LOADED.

%% `Owner' (the process that runs the handshake) gets the connection's events until
%% set_controller/2 names the controller; its death closes the connection.
-spec connect(endpoint(), binary(), inet:port_number(), Owner :: pid()) -> ok | {error, not_listening}.
connect(_Endpoint, _Host, _Port, _Owner) -> ?NOT_LOADED.

-spec close_endpoint(endpoint()) -> ok.
close_endpoint(_Endpoint) -> ?NOT_LOADED.

%% Moves the endpoint to a new UDP socket (bound on a runtime thread; this waits).
-spec rebind(endpoint(), inet:ip_address(), inet:port_number()) -> ok | {error, bind_error()}.
rebind(Endpoint, Ip, Port) ->
    case start_rebind(Endpoint, Ip, Port) of
        ok ->
            receive
                {macula_rebind, Result} -> Result
            after ?BIND_TIMEOUT ->
                    {error, bind_timeout}
            end;
        {error, not_listening} = Error ->
            Error
    end.

start_rebind(_Endpoint, _Ip, _Port) -> ?NOT_LOADED.

%%% Connection

%% Names the connection's controller (see macula_dist_ctrl): it gets the connection's
%% events, and its death closes the connection.
-spec set_controller(conn(), pid()) -> ok | {error, closed}.
set_controller(_Conn, _Controller) -> ?NOT_LOADED.

-spec send_handshake(conn(), iodata()) -> ok | {error, closed | handshake_over | too_large}.
send_handshake(_Conn, _Message) -> ?NOT_LOADED.

%% @doc The next control-stream message (cookie proof or handshake), for the owner.
%% A connection that closes meanwhile is reported by the controller as
%% `{macula_closed, Reason}'.
-spec recv_message(conn()) -> {ok, binary()} | {error, term()}.
recv_message(Conn) ->
    case recv_handshake(Conn) of
        {ok, Message} ->
            {ok, Message};
        wait ->
            receive
                {macula_handshake, Message} -> {ok, Message};
                {macula_closed, Reason} -> {error, Reason}
            end;
        {error, _} = Error ->
            Error
    end.

%% A message already received is returned at once; otherwise `wait', and the next one
%% comes as `{macula_handshake, Binary}'.
-spec recv_handshake(conn()) -> {ok, binary()} | wait | {error, closed}.
recv_handshake(_Conn) -> ?NOT_LOADED.

%% This side's cookie proof for the connection's TLS session (see macula_dist_auth).
-spec auth_proof(conn(), Cookie :: binary(), initiator | acceptor, NodeName :: binary()) ->
          {ok, binary()} | {error, closed}.
auth_proof(_Conn, _Cookie, _Role, _NodeName) -> ?NOT_LOADED.

%% Checks the peer's proof: `true' authenticates it.
-spec auth_verify(conn(), Cookie :: binary(), initiator | acceptor, NodeName :: binary(), Proof :: binary()) ->
          boolean() | {error, closed}.
auth_verify(_Conn, _Cookie, _Role, _NodeName, _Proof) -> ?NOT_LOADED.

%% Whether the certificate the peer presented covers `Host' (IP SAN for an IP address,
%% DNS SAN for a host name); in PKI mode it is already verified against the CA.
-spec peer_cert_covers(conn(), Host :: binary()) ->
          boolean() | {error, no_peer_certificate | {bad_peer_certificate, binary()}}.
peer_cert_covers(_Conn, _Host) -> ?NOT_LOADED.

%% Closes a connection whose peer failed to authenticate; it sees close code 2
%% (`not_authenticated') or 3 (`bad_node_name') and the reason phrase `Why'.
-spec refuse(conn(), not_authenticated | bad_node_name, binary()) -> ok.
refuse(_Conn, _Kind, _Why) -> ?NOT_LOADED.

-spec activate(conn(), pid()) -> ok | {error, closed}.
activate(_Conn, _InputHandler) -> ?NOT_LOADED.

%% Returns the credit of a `{macula_data, Credit, Packets}' message.
-spec ack_data(conn(), credit()) -> ok.
ack_data(_Conn, _Credit) -> ?NOT_LOADED.

%% Each packet goes on its sender's data stream (one stream in single-stream mode).
-spec send_data(conn(), [iodata()]) -> ok | busy | {error, closed | too_large}.
send_data(_Conn, _Packets) -> ?NOT_LOADED.

%% As send_data/2, but on the fixed data stream whatever the packets say.
-spec send_unrouted(conn(), [iodata()]) -> ok | busy | {error, closed | too_large}.
send_unrouted(_Conn, _Packets) -> ?NOT_LOADED.

%%% Node-wide

%% Marks (`true') or unmarks a local process for the priority data stream;
%% `External' is term_to_binary(Pid).
-spec set_priority(pid(), binary(), boolean()) -> ok.
set_priority(_Pid, _External, _On) -> ?NOT_LOADED.

-spec tick(conn()) -> ok.
tick(_Conn) -> ?NOT_LOADED.

-spec stats(conn()) -> {Received :: non_neg_integer(), Sent :: non_neg_integer(), Pending :: non_neg_integer()}.
stats(_Conn) -> ?NOT_LOADED.

-spec close(conn()) -> ok.
close(_Conn) -> ?NOT_LOADED.

-spec info(conn()) -> #{atom() => term()}.
info(_Conn) -> ?NOT_LOADED.
