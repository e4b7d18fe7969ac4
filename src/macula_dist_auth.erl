%%% @doc Cookie proofs bound to the TLS session, exchanged before the dist_util
%%% handshake (zero-configuration mode). See native/macula_quic/src/auth.rs for why.
%%%
%%% On the control stream, before any dist_util message:
%%% <pre>
%%%   initiator -> acceptor: "A", NameLen:16, InitiatorName, Proof:32   (role initiator)
%%%   acceptor -> initiator: "a", Proof:32                               (role acceptor)
%%%                      or: "x", CloseCode:8, Reason                        (refused)
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
%%%
%%% Any well-formed node name may authenticate (macula_dist_name): `Port@Host' nodes,
%%% `Name@Host' nodes and client-only ones, such as OTP's dynamic `undefined@Host',
%%% which then asks net_kernel for a name in dist_util's handshake. A refusal tells
%%% the peer why, as an "x" message and then in its QUIC close code: 3 for a name this
%%% node does not accept (checked before the proof, so it says nothing about the
%%% cookie), 2 for a wrong proof or certificate; the reason phrase says more. The
%%% message is stream data, which QUIC retransmits: a CONNECTION_CLOSE is sent once,
%%% and if that datagram is lost the peer sees only a stateless reset. No atom is made
%%% for a peer before its proof holds.
-module(macula_dist_auth).

-export([initiate/3, respond/2, bind_name/3]).

-include_lib("kernel/include/logger.hrl").
-include_lib("kernel/include/dist.hrl").

-define(PROOF_LEN, 32).

%% QUIC close codes of a refusal (macula_quic close_code).
-define(NOT_AUTHENTICATED, 2).
-define(BAD_NODE_NAME, 3).

%% After the NIF reports the connection closed, the controller forwards the reason.
-define(CLOSE_REASON_WAIT, 1000).

%% How long a refusing acceptor waits for the peer to read its "x" message and close,
%% before it closes the connection itself.
-define(REFUSAL_LINGER, 500).

%% @doc Proves the cookie to the node we connect to, then checks its answer.
-spec initiate(macula_dist_nif:conn(), node(), node()) -> ok | {error, term()}.
initiate(Conn, MyNode, Node) ->
    Cookie = cookie(Node),
    Name = atom_to_binary(MyNode, utf8),
    Exchange = fun() ->
                       ok = unwrap(check_certificate_name(Conn, Node)),
                       Proof = unwrap(macula_dist_nif:auth_proof(Conn, Cookie, initiator, Name)),
                       ok = unwrap(macula_dist_nif:send_handshake(Conn, [$A, <<(byte_size(Name)):16>>, Name, Proof])),
                       case unwrap(recv_answer(Conn)) of
                           <<$a, Answer:?PROOF_LEN/binary>> ->
                               check(macula_dist_nif:auth_verify(Conn, Cookie, acceptor, Name, Answer));
                           <<$x, Code, Phrase/binary>> ->
                               {error, {refused_by_peer, Code, printable(Phrase)}};
                           Other ->
                               {error, {malformed_auth_reply, byte_size(Other)}}
                       end
               end,
    case outcome(Conn, {node, Node}, run(Exchange)) of
        {error, {Tag, Code, Phrase}} when (Tag =:= peer_closed orelse Tag =:= refused_by_peer),
                                          (Code =:= ?NOT_AUTHENTICATED orelse Code =:= ?BAD_NODE_NAME) ->
            refused_by_peer(Node, MyNode, Code, Phrase);
        Other ->
            Other
    end.

%% A refusal arrives as the connection's close; the controller forwards its reason.
recv_answer(Conn) ->
    case macula_dist_nif:recv_message(Conn) of
        {error, closed} ->
            receive {macula_closed, Reason} -> {error, Reason}
            after ?CLOSE_REASON_WAIT -> {error, closed}
            end;
        Other ->
            Other
    end.

refused_by_peer(Node, _MyNode, ?NOT_AUTHENTICATED, Phrase) ->
    ?LOG_WARNING("macula_dist: ~ts refused this node's cookie proof (different cookie?): ~ts",
                 [Node, Phrase]),
    {error, {refused, cookie_proof, Phrase}};
refused_by_peer(Node, MyNode, ?BAD_NODE_NAME, Phrase) ->
    ?LOG_WARNING("macula_dist: ~ts refused this node's name ~ts: ~ts", [Node, MyNode, Phrase]),
    {error, {refused, node_name, Phrase}}.

%% @doc Checks the connecting node's proof and answers it. Returns the name the peer
%% proved the cookie for.
-spec respond(macula_dist_nif:conn(), {inet:ip_address(), inet:port_number()}) -> {ok, binary()} | {error, term()}.
respond(Conn, PeerAddr) ->
    Exchange = fun() ->
                       case unwrap(macula_dist_nif:recv_message(Conn)) of
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
                {ok, [$N, F7, F6, F5, F4, F3, F2, F1, F0, _, _, _, _, L1, L0 | Rest]} = Ok ->
                    <<Flags:64>> = <<F7, F6, F5, F4, F3, F2, F1, F0>>,
                    NameLen = L1 * 256 + L0,
                    Sent = NameLen =< length(Rest)
                        andalso list_to_binary(lists:sublist(Rest, NameLen)),
                    case Sent =:= handshake_name(Name, Flags) of
                        true ->
                            Ok;
                        false ->
                            Why = {node_name_differs_from_authenticated, Name},
                            macula_dist_events:refused(from, Name, PeerAddr, Why),
                            {error, Why}
                    end;
                Other ->
                    Other
            end
    end.

%% What a peer that authenticated as `Name' sends in dist_util's send_name: its name,
%% or, for a dynamic name (`undefined@Host', flag NAME_ME), only its host.
handshake_name(Name, Flags) when Flags band ?DFLAG_NAME_ME =/= 0 ->
    case string:split(Name, <<"@">>) of
        [<<"undefined">>, Host] -> Host;
        _ -> not_dynamic
    end;
handshake_name(Name, _Flags) ->
    Name.

%% Atoms hold at most 255 characters: a longer name can never be a node's.
respond(_Conn, Name, _Proof) when byte_size(Name) > 255 ->
    {error, {bad_node_name, Name, "longer than 255 bytes"}};
respond(Conn, Name, Proof) ->
    case macula_dist_name:parse(Name) of
        {error, {bad_node_name, Why}} ->
            {error, {bad_node_name, Name, Why}};
        {ok, _} ->
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
    case macula_dist_endpoint:option(verify_name) of
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

node_host(Node) ->
    {ok, Host} = macula_dist_name:host(Node),
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
    case Peer of
        {node, Node} -> macula_dist_events:refused(to, Node, peer_address(Conn), Why);
        {address, Address} -> macula_dist_events:refused(from, claimed_name(Why), Address, Why)
    end,
    {Kind, Phrase0} = refusal(Why),
    Phrase = unicode:characters_to_binary(Phrase0),
    case Peer of
        {address, _} -> tell_refused(Conn, Kind, Phrase);
        {node, _} -> ok
    end,
    macula_dist_nif:refuse(Conn, Kind, Phrase).

%% The acceptor tells the peer in-band first (see the module doc) and gives it a moment
%% to read that and close; the controller forwards the close.
tell_refused(Conn, Kind, Phrase) ->
    case macula_dist_nif:send_handshake(Conn, [$x, close_code(Kind), Phrase]) of
        ok ->
            receive {macula_closed, _} -> ok
            after ?REFUSAL_LINGER -> ok
            end;
        {error, _} ->
            ok
    end.

%% A peer's reason phrase is logged: only printable text, and not much of it.
printable(Phrase) ->
    Text = unicode:characters_to_list(binary:part(Phrase, 0, min(byte_size(Phrase), 200))),
    case is_list(Text) andalso io_lib:printable_unicode_list(Text) of
        true -> unicode:characters_to_binary(Text);
        false -> <<"(unprintable reason)">>
    end.

close_code(not_authenticated) -> ?NOT_AUTHENTICATED;
close_code(bad_node_name) -> ?BAD_NODE_NAME.

%% The close code and reason phrase the refused peer gets: what it did wrong, never
%% anything about this node's cookie.
refusal({bad_node_name, _Name, Why}) ->
    {bad_node_name, "bad node name: " ++ Why};
refusal({Why, Name}) when is_binary(Name) ->
    refusal(Why);
refusal(wrong_cookie) ->
    {not_authenticated, "wrong cookie"};
refusal({certificate_does_not_cover_host, Host}) ->
    {not_authenticated, io_lib:format("certificate does not cover host ~ts", [Host])};
refusal(_Other) ->
    {not_authenticated, "not authenticated"}.

is_close_reason(Why) when is_atom(Why) -> lists:member(Why, [closed, connection_closed, net_tick_timeout]);
is_close_reason({Tag, _}) -> lists:member(Tag, [protocol_violation, not_authenticated, transport_error]);
is_close_reason({peer_closed, _, _}) -> true;
is_close_reason({refused_by_peer, _, _}) -> true;  % it closes; we only stop
is_close_reason(_) -> false.

peer_address(Conn) ->
    maps:get(peer, macula_dist_nif:info(Conn)).

%% The name an incoming peer claimed, as the refusal reason carries it.
claimed_name({_Why, Name}) when is_binary(Name) -> Name;
claimed_name(_Why) -> undefined.

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
