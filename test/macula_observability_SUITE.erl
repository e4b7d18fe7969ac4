%%% @doc What a running node tells about its macula connections: macula_dist:info/0,1,
%%% the counters net_kernel and erlang:dist_get_stat/1 report, and the logger events of
%%% the domain `[macula_dist]' (up, refused, down), between real separate nodes.
%%%
%%% Log events are captured on a node by a logger handler this module implements
%%% (log/2), which forwards each `[macula_dist]' event to a collector process there.
-module(macula_observability_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([suite/0, all/0]).
-export([info_after_traffic/1, dist_counters/1, log_events/1]).
%% Node side
-export([capture_start/0, captured/0, log/2, send_burst/2]).

-define(P, macula_test_peer).
-define(PORT_RANGE, {30000, 30999}).
-define(COLLECTOR, macula_observability_collector).

suite() ->
    [{timetrap, {seconds, 60}},
     {ct_hooks, [{macula_ct_hook, #{ports_per_case => 10, port_range => ?PORT_RANGE}}]}].

all() ->
    [info_after_traffic, dist_counters, log_events].


%%% ------------------------------------------------------------------------------------
%%% Cases
%%% ------------------------------------------------------------------------------------

%% info/0 lists every connection with its QUIC and TLS facts; the counters move with
%% the traffic (2 MiB sent from A to B).
info_after_traffic(Config) ->
    Base = ?config(base_port, Config),
    [A, B] = ?P:parallel([fun() -> ?P:start(Base, []) end, fun() -> ?P:start(Base + 1, []) end]),
    NodeB = ?P:node_of(B),
    true = ?P:call(A, net_kernel, connect_node, [NodeB]),
    Bin = crypto:strong_rand_bytes(2 * 1024 * 1024),
    Bin = ?P:call(A, erpc, call, [NodeB, erlang, hd, [[Bin]]]),
    All = ?P:call(A, macula_dist, info, []),
    ?assertEqual([NodeB], maps:keys(All)),
    {ok, Info} = ?P:call(A, macula_dist, info, [NodeB]),
    ct:pal("info on A of its connection to B:~n~p", [Info]),
    ?assertEqual({{127, 0, 0, 1}, Base + 1}, maps:get(peer, Info)),
    ?assertEqual(<<"TLSv1.3">>, maps:get(tls_version, Info)),
    ?assertEqual(<<"TLS_AES_128_GCM_SHA256">>, maps:get(cipher_suite, Info)),
    ?assertEqual(true, maps:get(initiator, Info)),
    [?assert(maps:get(K, Info) >= 2 * 1024 * 1024, K) || K <- [bytes_sent, bytes_received]],
    [?assert(maps:get(K, Info) > 0, K)
     || K <- [rtt_us, congestion_window, sent_packets, datagrams_sent, datagrams_received,
              frames_sent, frames_received, dist_in, dist_out]],
    ?assert(maps:get(uptime_ms, Info) >= 0),
    ?assert(is_integer(maps:get(lost_packets, Info))),
    %% Zero-configuration mode: the acceptor shows a throw-away self-signed
    %% certificate, the initiator none.
    ?assert(is_binary(maps:get(peer_subject, Info))),
    {ok, InfoOnB} = ?P:call(B, macula_dist, info, [?P:node_of(A)]),
    ?assertEqual(undefined, maps:get(peer_subject, InfoOnB)),
    ?assertEqual(false, maps:get(initiator, InfoOnB)),
    ?assertEqual({error, not_connected}, ?P:call(A, macula_dist, info, ['1@127.0.0.1'])),
    %% The old name answers the same.
    {ok, Again} = ?P:call(A, macula_dist, connection_info, [NodeB]),
    ?assertEqual(lists:sort(maps:keys(Info)), lists:sort(maps:keys(Again))).

%% The VM's own counters of a process controller (erlang:dist_get_stat/1, shown as
%% dist_in/dist_out) and net_kernel:node_info/2's in/out count real packets: 500
%% messages sent raise them by at least 500.
dist_counters(Config) ->
    Base = ?config(base_port, Config),
    [A, B] = ?P:parallel([fun() -> ?P:start(Base, []) end, fun() -> ?P:start(Base + 1, []) end]),
    NodeA = ?P:node_of(A),
    NodeB = ?P:node_of(B),
    true = ?P:call(A, net_kernel, connect_node, [NodeB]),
    {ok, Before} = ?P:call(A, macula_dist, info, [NodeB]),
    {ok, OutBefore} = ?P:call(A, net_kernel, node_info, [NodeB, out]),
    {ok, InOnBBefore} = ?P:call(B, net_kernel, node_info, [NodeA, in]),
    ok = ?P:call(A, ?MODULE, send_burst, [NodeB, 500]),
    {ok, After} = ?P:call(A, macula_dist, info, [NodeB]),
    {ok, OutAfter} = ?P:call(A, net_kernel, node_info, [NodeB, out]),
    {ok, InOnBAfter} = ?P:call(B, net_kernel, node_info, [NodeA, in]),
    ct:pal("dist_out ~b -> ~b, node_info out ~b -> ~b, in on B ~b -> ~b",
           [maps:get(dist_out, Before), maps:get(dist_out, After), OutBefore, OutAfter,
            InOnBBefore, InOnBAfter]),
    ?assert(maps:get(dist_out, After) - maps:get(dist_out, Before) >= 500),
    ?assert(OutAfter - OutBefore >= 500),
    ?assert(InOnBAfter - InOnBBefore >= 500).

%% One event when a connection comes up, one when a node with another cookie is
%% refused, one when a connection goes down; each in the domain [macula_dist] with
%% node, address and (refused, down) reason as metadata.
log_events(Config) ->
    Base = ?config(base_port, Config),
    [A, B] = ?P:parallel([fun() -> ?P:start(Base, ["-kernel", "logger_level", "info"]) end,
                          fun() -> ?P:start(Base + 1, []) end]),
    NodeB = ?P:node_of(B),
    ok = ?P:call(A, ?MODULE, capture_start, []),
    true = ?P:call(A, net_kernel, connect_node, [NodeB]),
    Stranger = ?P:start(Base + 2, [], #{cookie => "not_the_cookie"}),
    false = ?P:call(Stranger, net_kernel, connect_node, [?P:node_of(A)]),
    ?P:stop(B),
    ok = ?P:wait_until(fun() -> length(?P:call(A, ?MODULE, captured, [])) >= 3 end, 10000),
    Events = ?P:call(A, ?MODULE, captured, []),
    ct:pal("events on A:~n~p", [Events]),
    [Up] = [E || #{meta := #{macula_event := up}} = E <- Events],
    ?assertMatch(#{level := info,
                   meta := #{domain := [macula_dist], node := NodeB, initiator := true,
                             address := {{127, 0, 0, 1}, _}}}, Up),
    [Refused] = [E || #{meta := #{macula_event := refused}} = E <- Events],
    StrangerName = atom_to_binary(?P:node_of(Stranger)),
    ?assertMatch(#{level := warning,
                   meta := #{domain := [macula_dist], node := StrangerName, initiator := false,
                             address := {{127, 0, 0, 1}, _},
                             reason := {wrong_cookie, StrangerName}}}, Refused),
    [Down] = [E || #{meta := #{macula_event := down}} = E <- Events],
    ?assertMatch(#{level := info,
                   meta := #{domain := [macula_dist], node := NodeB,
                             address := {{127, 0, 0, 1}, _}, reason := _}}, Down),
    ?assertEqual(3, length(Events)).

%%% ------------------------------------------------------------------------------------
%%% Node side
%%% ------------------------------------------------------------------------------------

%% A collector process and a logger handler feeding it the [macula_dist] events.
capture_start() ->
    Collector = spawn(fun() -> collect([]) end),
    register(?COLLECTOR, Collector),
    ok = logger:add_handler(macula_capture, ?MODULE,
                            #{level => all, filter_default => stop,
                              filters => [{macula, {fun logger_filters:domain/2,
                                                    {log, super, [macula_dist]}}}],
                              config => #{collector => Collector}}).

collect(Events) ->
    receive
        {event, Event} -> collect([Event | Events]);
        {get, From} -> From ! {events, lists:reverse(Events)}, collect(Events)
    end.

captured() ->
    ?COLLECTOR ! {get, self()},
    receive {events, Events} -> Events end.

%% logger handler callback
log(#{level := Level, meta := Meta}, #{config := #{collector := Collector}}) ->
    Collector ! {event, #{level => Level, meta => maps:with([domain, macula_event, node, address,
                                                              reason, initiator], Meta)}},
    ok.

%% `Count' messages to a process on `Node', then one round trip, so all have arrived.
send_burst(Node, Count) ->
    Self = self(),
    Pid = erpc:call(Node, erlang, spawn, [fun() -> sink(Self, 0) end]),
    [Pid ! {n, N} || N <- lists:seq(1, Count)],
    Pid ! {done, Count},
    receive {sunk, Count} -> ok after 10000 -> timeout end.

sink(From, N) ->
    receive
        {n, _} -> sink(From, N + 1);
        {done, Count} when N =:= Count -> From ! {sunk, Count}
    end.
