%%% @doc Cookie proofs bound to the TLS session, exchanged before the dist_util
%%% handshake (zero-configuration mode). See native/macula_quic/src/auth.rs for why.
%%%
%%% On the control stream, before any dist_util message:
%%% <pre>
%%%   initiator -> acceptor: "A", NameLen:16, InitiatorName, Proof:32   (role initiator)
%%%   acceptor -> initiator: "a", Proof:32                               (role acceptor)
%%% </pre>
%%% Each `Proof' is HMAC-SHA256 of the cookie over a TLS exporter value of this session,
%%% the role and the initiator's node name. The acceptor checks first and answers only
%%% a peer that proved the cookie, so strangers learn nothing to guess cookies with.
%%% Per-node cookies (`erlang:set_cookie(Node, Cookie)') are used where set.
%%%
%%% In PKI mode the same exchange runs (TLS has verified both certificates against the
%%% CA by then), and with the `verify_name' option each side also checks that the
%%% peer's certificate covers the host part of the peer's node name: the initiator for
%%% the node it connects to, before it proves anything; the acceptor for the name in the
%%% "A" message, before it checks the proof. (macula_dist then holds the dist_util
%%% handshake to that same name.)
-module(macula_dist_auth).

-export([initiate/3, respond/2, bind_name/3]).

-include_lib("kernel/include/logger.hrl").

-define(PROOF_LEN, 32).

%% @doc Proves the cookie to the node we connect to, then checks its answer.
-spec initiate(macula_dist_nif:conn(), node(), node()) -> ok | {error, term()}.
initiate(Conn, MyNode, Node) ->
    Cookie = cookie(Node),
    Name = atom_to_binary(MyNode, utf8),
    Exchange = fun() ->
                       ok = unwrap(check_certificate_name(Conn, Node)),
                       Proof = unwrap(macula_dist_nif:auth_proof(Conn, Cookie, initiator, Name)),
                       ok = unwrap(macula_dist_nif:send_handshake(Conn, [$A, <<(byte_size(Name)):16>>, Name, Proof])),
                       case unwrap(macula_dist_ctrl:recv_message(Conn)) of
                           <<$a, Answer:?PROOF_LEN/binary>> ->
                               check(macula_dist_nif:auth_verify(Conn, Cookie, acceptor, Name, Answer));
                           Other ->
                               {error, {malformed_auth_reply, byte_size(Other)}}
                       end
               end,
    outcome(Conn, {node, Node}, run(Exchange)).

%% @doc Checks the connecting node's proof and answers it. Returns the name the peer
%% proved the cookie for.
-spec respond(macula_dist_nif:conn(), {inet:ip_address(), inet:port_number()}) -> {ok, binary()} | {error, term()}.
respond(Conn, PeerAddr) ->
    Exchange = fun() ->
                       case unwrap(macula_dist_ctrl:recv_message(Conn)) of
                           <<$A, Len:16, Name:Len/binary, Proof:?PROOF_LEN/binary>> ->
                               respond(Conn, Name, Proof);
                           Other ->
                               {error, {malformed_auth_message, byte_size(Other)}}
                       end
               end,
    outcome(Conn, {address, PeerAddr}, run(Exchange)).

%% @doc The peer must give dist_util the node name it authenticated as (cookie proof and,
%% with verify_name, certificate): its first handshake message ('N', send_name) is
%% checked against that name before dist_util sees it.
-spec bind_name(fun((term(), 0, infinity) -> {ok, string()} | {error, term()}), binary(),
                {inet:ip_address(), inet:port_number()}) -> fun().
bind_name(Recv, Name, PeerAddr) ->
    fun(Socket, Length, Timeout) ->
            case Recv(Socket, Length, Timeout) of
                {ok, [$N, _, _, _, _, _, _, _, _, _, _, _, _, L1, L0 | Rest]} = Ok ->
                    NameLen = L1 * 256 + L0,
                    case NameLen =< length(Rest)
                        andalso list_to_binary(lists:sublist(Rest, NameLen)) =:= Name of
                        true ->
                            Ok;
                        false ->
                            {Ip, Port} = PeerAddr,
                            ?LOG_WARNING("macula_dist: refused connection from ~ts:~b: "
                                         "authenticated as ~ts, handshake names another node",
                                         [inet:ntoa(Ip), Port, Name]),
                            {error, {node_name_differs_from_authenticated, Name}}
                    end;
                Other ->
                    Other
            end
    end.

respond(Conn, Name, Proof) ->
    case macula_dist_name:split(binary_to_list(Name)) of
        false ->
            {error, {bad_node_name, Name}};
        _ ->
            Cookie = cookie_for_name(Name),
            Checked = case check_certificate_name(Conn, Name) of
                          ok -> check(macula_dist_nif:auth_verify(Conn, Cookie, initiator, Name, Proof));
                          {error, _} = NameError -> NameError
                      end,
            case Checked of
                ok ->
                    Answer = unwrap(macula_dist_nif:auth_proof(Conn, Cookie, acceptor, Name)),
                    ok = unwrap(macula_dist_nif:send_handshake(Conn, [$a, Answer])),
                    {ok, Name};
                {error, Why} ->
                    {error, {Why, Name}}
            end
    end.

%% With `verify_name' (PKI mode), the peer's verified certificate must cover the host
%% part of `Node': an IP SAN for an IP address, a DNS SAN for a host name.
check_certificate_name(Conn, Node) ->
    case macula_dist:option(verify_name) of
        false ->
            ok;
        true ->
            Host = node_host(Node),
            case macula_dist_nif:peer_cert_covers(Conn, unicode:characters_to_binary(Host)) of
                true -> ok;
                false -> {error, {certificate_does_not_cover_host, Host}};
                {error, Why} -> {error, {certificate_name_check, Why}}
            end
    end.

node_host(Node) when is_atom(Node) -> node_host(atom_to_list(Node));
node_host(Node) when is_binary(Node) -> node_host(unicode:characters_to_list(Node));
node_host(Node) ->
    {_Port, Host} = macula_dist_name:split(Node),
    Host.

run(Exchange) ->
    try Exchange()
    catch throw:{?MODULE, Error} -> Error
    end.

%% Every refusal is logged once, here, then the peer is told (QUIC close code 2).
outcome(_Conn, _Peer, ok) ->
    ok;
outcome(_Conn, _Peer, {ok, _} = Ok) ->
    Ok;
outcome(Conn, Peer, {error, Why} = Error) ->
    case is_close_reason(Why) of
        true -> Error;  % the connection is gone; whoever closed it has said why
        false -> refuse(Conn, Peer, Why), Error
    end.

refuse(Conn, Peer, Why) ->
    ?LOG_WARNING("macula_dist: refused ~ts: ~tp", [describe(Peer), Why]),
    macula_dist_nif:refuse(Conn, unicode:characters_to_binary(io_lib:format("~tp", [Why]))).

is_close_reason(Why) when is_atom(Why) -> lists:member(Why, [closed, connection_closed, net_tick_timeout]);
is_close_reason({Tag, _}) -> lists:member(Tag, [protocol_violation, not_authenticated, transport_error]);
is_close_reason({peer_closed, _, _}) -> true;
is_close_reason(_) -> false.

describe({node, Node}) ->
    io_lib:format("connection to ~ts", [Node]);
describe({address, {Ip, Port}}) ->
    io_lib:format("connection from ~ts:~b", [inet:ntoa(Ip), Port]).

unwrap(ok) -> ok;
unwrap({ok, Value}) -> Value;
unwrap({error, _} = Error) -> throw({?MODULE, Error}).

check(true) -> ok;
check(false) -> {error, wrong_cookie};
check({error, _} = Error) -> Error.

%% A name that is not an atom yet cannot have a per-node cookie; no atom is made for
%% an unauthenticated peer.
cookie_for_name(Name) ->
    try binary_to_existing_atom(Name, utf8) of
        Node -> cookie(Node)
    catch
        error:badarg -> cookie(node())
    end.

cookie(Node) when Node =:= node() ->
    atom_to_binary(erlang:get_cookie(), utf8);
cookie(Node) ->
    atom_to_binary(auth:get_cookie(Node), utf8).
