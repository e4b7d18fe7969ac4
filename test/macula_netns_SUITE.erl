%%% @doc Issue 5, "Survives the real network": cases on a real (virtual) link between
%%% two Linux network namespaces.
%%%
%%% Each case makes its own pair of namespaces, `macula-t-<run>-<case>a' and `...b',
%%% joined by a veth pair (10.77.0.1/24 in `a', 10.77.0.2/24 in `b'), and runs one node
%%% in each (`ip netns exec NS erl ...', '46501@10.77.0.1' and '46502@10.77.0.2'),
%%% driven through macula_test_peer:start_netns/4 over the nodes' stdio (peer's TCP
%%% control connection cannot leave a namespace). The test node itself stays in the
%%% root namespace and is not distributed.
%%%
%%% <ul>
%%% <li>Packet loss: an nftables table `inet macula_t_loss' in BOTH namespaces drops
%%%     incoming UDP at random (`numgen random mod 100 < 5' or `< 20'), so each
%%%     direction loses that share. The nodes run with the default net_ticktime (60 s).
%%%     100,000 sequenced messages must arrive complete and in order; 50 binaries of
%%%     1 MiB must arrive intact (md5 of each); no nodedown on either side; the loss
%%%     counters must show packets were dropped. Throughput under loss is reported.
%%%     Those transfers take about a second, far less than a 60 s tick period, so
%%%     loss_20pct_short_ticktime checks liveness under loss: net_ticktime 4, 20% loss
%%%     from before the nodes connect, 20 s of busy and idle periods.</li>
%%% <li>Connection migration (net_ticktime 4): while sequenced streams run both ways,
%%%     the connecting node moves its UDP socket with macula_dist:rebind/2 to a new
%%%     port, or to a second address added to its veth; the connection survives, with
%%%     no nodedown and no lost or reordered message, and the peer sees the new
%%%     address.</li>
%%% </ul>
%%%
%%% Needs root, `ip' (iproute2) and `nft' (nftables). Without them every case FAILS
%%% (it never skips) with a message saying what is missing. Whatever happens, the
%%% nodes, nft tables and namespaces a case made are removed in end_per_testcase (and
%%% any namespace of this run left over, in end_per_suite).
%%%
%%% `MACULA_SOAK=1': 5 times as much data in the loss cases (500,000 messages,
%%% 250 MiB), 120 s instead of 20 s in loss_20pct_short_ticktime, and 30 s instead of
%%% 6 s of streaming in the migration cases.
%%%
%%% The veth ends are set to `gso_max_segs 1': QUIC sends with UDP segmentation
%%% offload, and without the cap a burst of datagrams crosses the veth as one
%%% super-packet, so nft's per-packet drop would drop bursts of up to 64 KB at once.
-module(macula_netns_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([suite/0, all/0, init_per_suite/1, end_per_suite/1,
         init_per_testcase/2, end_per_testcase/2]).
-export([loss_5pct_sequenced/1, loss_5pct_bulk/1,
         loss_20pct_sequenced/1, loss_20pct_bulk/1,
         loss_20pct_short_ticktime/0, loss_20pct_short_ticktime/1,
         migrate_to_new_port/1, migrate_to_new_address/1, loss_5pct_random_senders/1]).
%% Run on the nodes
-export([bulk_receiver/2, stream_sender/4, stream_receiver/0,
         seq_transfer/2]).

-define(P, macula_test_peer).
-define(NS_PREFIX, "macula-t-").
-define(NFT_TABLE, "macula_t_loss").
-define(IP_A, "10.77.0.1").
-define(IP_B, "10.77.0.2").
-define(IP_A2, "10.77.0.11").
-define(PORT_A, 46501).
-define(PORT_B, 46502).
-define(PORT_A_NEW, 46511).
-define(DEFAULT_TICKTIME, ["-kernel", "net_ticktime", "60"]).
%% Migration streams: messages unacknowledged at most, and one ack per this many.
-define(STREAM_WINDOW, 5000).
-define(STREAM_ACK_EVERY, 500).

suite() ->
    [{timetrap, {seconds, 150}},
     {ct_hooks, [{macula_ct_hook, #{}}]}].

all() ->
    [loss_5pct_sequenced, loss_5pct_bulk, loss_20pct_sequenced, loss_20pct_bulk,
     loss_20pct_short_ticktime, migrate_to_new_port, migrate_to_new_address,
     loss_5pct_random_senders].

loss_20pct_short_ticktime() ->
    [{timetrap, {seconds, loss_hold_seconds() + 120}}].

init_per_suite(Config) ->
    Run = lists:flatten(io_lib:format("~6.16.0b", [rand:uniform(16#ffffff)])),
    ct:pal("namespaces of this run: ~ts~ts-*", [?NS_PREFIX, Run]),
    [{run, Run} | Config].

%% Nodes are stopped before their namespaces go (macula_ct_hook would do it after).
end_per_suite(Config) ->
    ?P:stop_all(),
    Prefix = ?NS_PREFIX ++ ?config(run, Config) ++ "-",
    [delete_netns(Ns) || Ns <- list_netns(), lists:prefix(Prefix, Ns)],
    ok.

%% Names only: creating anything here would turn a failure into a skip.
init_per_testcase(Case, Config) ->
    Tag = ?config(run, Config) ++ "-" ++ integer_to_list(index(Case, all())),
    Env = #{ns_a => ?NS_PREFIX ++ Tag ++ "a", ns_b => ?NS_PREFIX ++ Tag ++ "b",
            veth_a => "mt" ++ ?config(run, Config) ++ "a",
            veth_b => "mt" ++ ?config(run, Config) ++ "b",
            dir => ?config(priv_dir, Config)},
    [{env, Env} | Config].

end_per_testcase(_Case, Config) ->
    ?P:stop_all(),
    #{ns_a := NsA, ns_b := NsB} = ?config(env, Config),
    Existing = list_netns(),
    [begin
         _ = sh(ip() ++ " netns exec " ++ Ns ++ " " ++ nft() ++ " delete table inet " ++ ?NFT_TABLE),
         delete_netns(Ns)
     end || Ns <- [NsA, NsB], lists:member(Ns, Existing)],
    Left = [Ns || Ns <- list_netns(), Ns =:= NsA orelse Ns =:= NsB],
    case Left of
        [] -> ok;
        _ -> {fail, {namespaces_not_deleted, Left}}
    end.

index(X, [X | _]) -> 1;
index(X, [_ | T]) -> 1 + index(X, T).

soak() ->
    os:getenv("MACULA_SOAK") =:= "1".

%% How long loss_20pct_short_ticktime keeps the link lossy.
loss_hold_seconds() ->
    case soak() of true -> 120; false -> 20 end.

%%% ------------------------------------------------------------------------------------
%%% Packet loss
%%% ------------------------------------------------------------------------------------

%% Shows: with 5% of UDP packets dropped in each direction and the default
%% net_ticktime, 100,000 sequenced messages arrive complete and in order, with no
%% nodedown on either side.
loss_5pct_sequenced(Config) ->
    loss_case(Config, 5, sequenced).

%% Shows: with 5% loss each way, 50 binaries of 1 MiB arrive intact (md5 of each),
%% with no nodedown.
loss_5pct_bulk(Config) ->
    loss_case(Config, 5, bulk).

%% Shows: as loss_5pct_sequenced, with 20% loss each way.
loss_20pct_sequenced(Config) ->
    loss_case(Config, 20, sequenced).

%% Shows: as loss_5pct_bulk, with 20% loss each way.
loss_20pct_bulk(Config) ->
    loss_case(Config, 20, bulk).

loss_case(Config, Pct, Kind) ->
    Env = setup_link(Config),
    {A, B} = start_pair(Env, ?DEFAULT_TICKTIME),
    {NA, NB} = {?P:node_of(A), ?P:node_of(B)},
    ?assertEqual(60, ?P:call(A, net_kernel, get_net_ticktime, [])),
    pong = ?P:call(A, net_adm, ping, [NB]),
    ok = ?P:wait_nodes(B, [NA]),
    ok = ?P:call(A, ?P, watch_start, []),
    ok = ?P:call(B, ?P, watch_start, []),
    [ok = add_loss(Env, Ns, Pct) || Ns <- [ns_a, ns_b]],
    Scale = case soak() of true -> 5; false -> 1 end,
    {Result, Ms, What, Units} =
        case Kind of
            sequenced ->
                N = 100000 * Scale,
                {R, T} = ?P:run(A, fun() -> seq_transfer(NB, N) end, 600000),
                ?assertEqual({ok, N}, R),
                {R, T, io_lib:format("~b sequenced messages", [N]), N};
            bulk ->
                N = 50 * Scale,
                {R, T} = ?P:run(A, fun() -> bulk_transfer(NB, N) end, 600000),
                ?assertEqual(ok, R),
                {R, T, io_lib:format("~b x 1 MiB (md5 of each checked)", [N]), N}
        end,
    Counters = [{Ns, loss_counters(Env, Ns)} || Ns <- [ns_a, ns_b]],
    Info = ?P:call(A, macula_dist, connection_info, [NB]),
    EventsA = ?P:call(A, ?P, watch_events, []),
    EventsB = ?P:call(B, ?P, watch_events, []),
    ct:pal("~b% loss, ~s: ~p in ~b ms~nnft counters (udp packets in, dropped): ~p~n"
           "connection_info on A: ~p~nevents: A ~p, B ~p",
           [Pct, What, Result, Ms, Counters, Info, EventsA, EventsB]),
    ?assertEqual({[], []}, {EventsA, EventsB}),
    ?assertEqual([NB], ?P:call(A, erlang, nodes, [])),
    %% The loss was real.
    [?assert(Dropped > 0) || {_, {_, Dropped}} <- Counters],
    {In, Dropped} = lists:foldl(fun({_, {I, D}}, {I0, D0}) -> {I0 + I, D0 + D} end, {0, 0}, Counters),
    Rate = case Kind of
               sequenced -> io_lib:format("~b msg/s", [round(Units * 1000 / max(1, Ms))]);
               bulk -> io_lib:format("~.2f MiB/s", [Units * 1000 / max(1, Ms)])
           end,
    Text = io_lib:format("~b% loss each way (dropped ~b of ~b UDP packets, ~.1f%): ~s in ~b ms, "
                         "~s; no nodedown",
                         [Pct, Dropped, In, 100 * Dropped / max(1, In), What, Ms, Rate]),
    ct:pal("~s", [Text]),
    {comment, Text}.

%% Shows: three nodes, two in namespace a and one in b, with 5% loss on the link
%% between the namespaces; 8 senders on each node send 100 messages of random sizes
%% (10 B to 2 MiB) to random other nodes at once, over the data-stream pool. Every
%% message arrives exactly once, intact, in its sender's order (the collectors and
%% senders of macula_streams_SUITE check it).
loss_5pct_random_senders(Config) ->
    Env = #{ns_a := NsA, ns_b := NsB} = setup_link(Config),
    [A, C, B] = ?P:parallel([fun() -> ?P:start_netns(NsA, ?PORT_A, ?DEFAULT_TICKTIME, #{host => ?IP_A}) end,
                             fun() -> ?P:start_netns(NsA, ?PORT_A + 2, ?DEFAULT_TICKTIME, #{host => ?IP_A}) end,
                             fun() -> ?P:start_netns(NsB, ?PORT_B, ?DEFAULT_TICKTIME, #{host => ?IP_B}) end]),
    Nodes = [A, C, B],
    Names = [?P:node_of(N) || N <- Nodes],
    [pong = ?P:call(X, net_adm, ping, [?P:node_of(Y)]) || X <- Nodes, Y <- Nodes, X =/= Y],
    [ok = add_loss(Env, Ns, 5) || Ns <- [ns_a, ns_b]],
    [?P:call(N, erlang, register,
             [macula_streams_rx, ?P:call(N, erlang, spawn, [macula_streams_SUITE, collector, []])])
     || N <- Nodes],
    Seed = erlang:unique_integer([positive]),
    [?P:call(N, erlang, spawn, [macula_streams_SUITE, sender, [Names -- [Me], 100, {Seed, Me, K}]])
     || {N, Me} <- lists:zip(Nodes, Names), K <- lists:seq(1, 8)],
    Reports = [?P:call(N, erlang, apply, [fun macula_streams_SUITE:collect_report/0, []], 100000)
               || N <- Nodes],
    Counters = [{Ns, loss_counters(Env, Ns)} || Ns <- [ns_a, ns_b]],
    ct:pal("seed ~p; reports (finished senders, violations, messages): ~p~nnft counters: ~p",
           [Seed, Reports, Counters]),
    [?assertEqual({16, []}, {Finished, Violations}) || {Finished, Violations, _} <- Reports],
    [?assert(Dropped > 0) || {_, {_, Dropped}} <- Counters],
    Total = lists:sum([Count || {_, _, Count} <- Reports]),
    ?assertEqual(24 * 100, Total),
    {comment, io_lib:format("~b messages from 24 senders, in order, none lost or doubled, 5% loss",
                            [Total])}.

%% On A: N sequenced messages to a receiver on NB; {Result, Ms}.
seq_transfer(NB, N) ->
    macula_test_traffic:seq_transfer(NB, N, binary:copy(<<"0123456789">>, 7), {60000, 540000}).

%% On A: N distinct random 1 MiB binaries to a receiver on NB, which answers with the
%% md5 of each, in the order received; {ok | {mismatch, ...}, Ms}.
bulk_transfer(NB, N) ->
    Self = self(),
    Receiver = spawn(NB, ?MODULE, bulk_receiver, [Self, N]),
    Bins = [crypto:strong_rand_bytes(1 bsl 20) || _ <- lists:seq(1, N)],
    Md5s = [erlang:md5(B) || B <- Bins],
    T0 = erlang:monotonic_time(millisecond),
    [Receiver ! {bulk, Self, I, B} || {I, B} <- lists:zip(lists:seq(1, N), Bins)],
    receive
        {bulk_done, Receiver, Got} ->
            Ms = erlang:monotonic_time(millisecond) - T0,
            case Got =:= lists:zip(lists:seq(1, N), Md5s) of
                true -> {ok, Ms};
                false -> {{mismatch, length(Got), N}, Ms}
            end
    after 540000 ->
            {timeout, erlang:monotonic_time(millisecond) - T0}
    end.

bulk_receiver(From, N) ->
    From ! {bulk_done, self(), bulk_receive(From, N, [])}.

bulk_receive(_From, 0, Acc) ->
    lists:reverse(Acc);
bulk_receive(From, N, Acc) ->
    receive
        {bulk, From, I, Bin} when byte_size(Bin) =:= 1 bsl 20 ->
            bulk_receive(From, N - 1, [{I, erlang:md5(Bin)} | Acc]);
        {bulk, From, I, Bin} ->
            bulk_receive(From, N - 1, [{I, {size, byte_size(Bin)}} | Acc])
    after 120000 ->
            lists:reverse(Acc)
    end.

%% Shows: with 20% loss each way from the start and net_ticktime 4, the nodes connect
%% (the QUIC/TLS handshake, cookie proofs and dist handshake all under loss; up to 3
%% pings of 7 s net_setuptime each, attempts reported), then for 20 s (120 s with
%% MACULA_SOAK=1) alternate 2 x 20,000 sequenced messages (A->B, then B->A) with 3 s
%% of idleness, where only ticks cross the lossy link: every batch arrives complete
%% and in order, and neither node sees a nodedown through some 20 tick intervals.
loss_20pct_short_ticktime(Config) ->
    Env = setup_link(Config),
    [ok = add_loss(Env, Ns, 20) || Ns <- [ns_a, ns_b]],
    {A, B} = start_pair(Env, []),
    {NA, NB} = {?P:node_of(A), ?P:node_of(B)},
    ?assertEqual(4, ?P:call(A, net_kernel, get_net_ticktime, [])),
    {Attempts, ConnectMs} = ?P:run(A, fun() -> connect_attempts(NB, 1, 3) end, 40000),
    ?assert(is_integer(Attempts)),
    ok = ?P:wait_nodes(B, [NA]),
    ok = ?P:call(A, ?P, watch_start, []),
    ok = ?P:call(B, ?P, watch_start, []),
    HoldMs = loss_hold_seconds() * 1000,
    Cycles = ?P:run(A, fun() -> busy_idle_cycles(NB, erlang:monotonic_time(millisecond) + HoldMs, []) end,
                    HoldMs + 120000),
    Counters = [{Ns, loss_counters(Env, Ns)} || Ns <- [ns_a, ns_b]],
    EventsA = ?P:call(A, ?P, watch_events, []),
    EventsB = ?P:call(B, ?P, watch_events, []),
    ct:pal("20% loss, ticktime 4: connected at attempt ~p after ~b ms~ncycles (A->B, B->A, ms): ~p~n"
           "nft counters: ~p~nevents: A ~p, B ~p",
           [Attempts, ConnectMs, Cycles, Counters, EventsA, EventsB]),
    [?assertEqual({{ok, 20000}, {ok, 20000}}, {AB, BA}) || {{AB, _}, {BA, _}} <- Cycles],
    ?assertEqual({[], []}, {EventsA, EventsB}),
    ?assertEqual([NB], ?P:call(A, erlang, nodes, [])),
    [?assert(Dropped > 0) || {_, {_, Dropped}} <- Counters],
    {In, Dropped} = lists:foldl(fun({_, {I, D}}, {I0, D0}) -> {I0 + I, D0 + D} end, {0, 0}, Counters),
    Text = io_lib:format("20% loss each way (dropped ~b of ~b UDP packets), ticktime 4: connected "
                         "at attempt ~b after ~b ms; ~b busy/idle cycles in ~b s, every batch "
                         "in order; no nodedown",
                         [Dropped, In, Attempts, ConnectMs, length(Cycles), HoldMs div 1000]),
    ct:pal("~s", [Text]),
    {comment, Text}.

%% On A: net_adm:ping until pong, at most Max times; {Attempt, Ms} or {failed, Ms}.
connect_attempts(NB, I, Max) ->
    T0 = erlang:monotonic_time(millisecond),
    connect_attempts(NB, I, Max, T0).

connect_attempts(NB, I, Max, T0) ->
    case net_adm:ping(NB) of
        pong -> {I, erlang:monotonic_time(millisecond) - T0};
        pang when I < Max -> connect_attempts(NB, I + 1, Max, T0);
        pang -> {failed, erlang:monotonic_time(millisecond) - T0}
    end.

%% On A: until Deadline, 20,000 sequenced messages A->B, then B->A, then 3 s idle.
busy_idle_cycles(NB, Deadline, Acc) ->
    case erlang:monotonic_time(millisecond) >= Deadline of
        true ->
            lists:reverse(Acc);
        false ->
            AB = seq_transfer(NB, 20000),
            BA = try erpc:call(NB, ?MODULE, seq_transfer, [node(), 20000], 120000)
                 catch C:E -> {{C, E}, 0}
                 end,
            timer:sleep(3000),
            busy_idle_cycles(NB, Deadline, [{AB, BA} | Acc])
    end.

%%% ------------------------------------------------------------------------------------
%%% Connection migration
%%% ------------------------------------------------------------------------------------

%% Shows: A (the connecting node) moves its UDP socket to port 46511 with
%% macula_dist:rebind({0,0,0,0}, 46511) while sequenced streams run both ways
%% (net_ticktime 4): B sees A at 10.77.0.1:46511, erpc works both ways right after,
%% both streams arrive complete and in order, and neither node sees a nodedown.
migrate_to_new_port(Config) ->
    Env = setup_link(Config),
    migrate_case(Env, {0, 0, 0, 0}, ?PORT_A_NEW, {{10, 77, 0, 1}, ?PORT_A_NEW}).

%% Shows: as migrate_to_new_port, but A moves to a second address added to its veth,
%% 10.77.0.11, on a free port (macula_dist:rebind({10,77,0,11}, 0)): B sees A at
%% 10.77.0.11.
migrate_to_new_address(Config) ->
    Env = setup_link(Config),
    #{ns_a := NsA, veth_a := VethA} = Env,
    must(ip() ++ " -n " ++ NsA ++ " addr add " ++ ?IP_A2 ++ "/24 dev " ++ VethA),
    migrate_case(Env, {10, 77, 0, 11}, 0, {{10, 77, 0, 11}, any}).

migrate_case(Env, RebindIp, RebindPort, {ExpectIp, ExpectPort}) ->
    {A, B} = start_pair(Env, []),
    {NA, NB} = {?P:node_of(A), ?P:node_of(B)},
    pong = ?P:call(A, net_adm, ping, [NB]),
    ok = ?P:wait_nodes(B, [NA]),
    ?assertMatch({ok, #{initiator := true}}, ?P:call(A, macula_dist, connection_info, [NB])),
    ok = ?P:call(A, ?P, watch_start, []),
    ok = ?P:call(B, ?P, watch_start, []),
    DurationMs = case soak() of true -> 30000; false -> 6000 end,
    R = ?P:run(A, fun() -> migrate_run(NB, RebindIp, RebindPort, DurationMs) end,
               DurationMs + 120000),
    EventsA = ?P:call(A, ?P, watch_events, []),
    EventsB = ?P:call(B, ?P, watch_events, []),
    ct:pal("migration ~p -> ~p:~n~p~nevents: A ~p, B ~p",
           [{RebindIp, RebindPort}, {ExpectIp, ExpectPort}, R, EventsA, EventsB]),
    #{rebind := Rebind, peer_before := Before, peer_after := After,
      erpc := Erpc, a_to_b := AtoB, b_to_a := BtoA, rebind_at_ms := At} = R,
    ?assertEqual(ok, Rebind),
    ?assertEqual({{10, 77, 0, 1}, ?PORT_A}, Before),
    {AfterIp, AfterPort} = After,
    ?assertEqual(ExpectIp, AfterIp),
    case ExpectPort of
        any -> ?assertNotEqual(?PORT_A, AfterPort);
        _ -> ?assertEqual(ExpectPort, AfterPort)
    end,
    ?assertEqual({NB, NA}, Erpc),
    ?assertMatch({{ok, _}, _}, AtoB),
    ?assertMatch({{ok, _}, _}, BtoA),
    ?assertEqual({[], []}, {EventsA, EventsB}),
    ?assertEqual([NB], ?P:call(A, erlang, nodes, [])),
    {{ok, CountAB}, _} = AtoB,
    {{ok, CountBA}, _} = BtoA,
    Text = io_lib:format("rebind at ~b ms of ~b; B sees A at ~s:~b (was ~s:~b); ~b messages "
                         "A->B and ~b B->A, all in order; no nodedown",
                         [At, DurationMs, inet:ntoa(AfterIp), AfterPort,
                          inet:ntoa(element(1, Before)), element(2, Before), CountAB, CountBA]),
    ct:pal("~s", [Text]),
    {comment, Text}.

%% On A: streams both ways for DurationMs; rebinds a third of the way through.
%% (A DOWN or EXIT from a stream would show as a timeout or a missing result.)
migrate_run(NB, RebindIp, RebindPort, DurationMs) ->
    Self = self(),
    RB = spawn(NB, ?MODULE, stream_receiver, []),
    SA = spawn(?MODULE, stream_sender, [RB, DurationMs, Self, a_to_b]),
    RA = spawn(?MODULE, stream_receiver, []),
    SB = spawn(NB, ?MODULE, stream_sender, [RA, DurationMs, Self, b_to_a]),
    PeerOf = fun() ->
                     {ok, #{peer := Peer}} = erpc:call(NB, macula_dist, connection_info, [node()], 10000),
                     Peer
             end,
    T0 = erlang:monotonic_time(millisecond),
    timer:sleep(DurationMs div 3),
    Before = PeerOf(),
    At = erlang:monotonic_time(millisecond) - T0,
    Rebind = macula_dist:rebind(RebindIp, RebindPort),
    Erpc = {catch erpc:call(NB, erlang, node, [], 10000),
            catch erpc:call(NB, erpc, call, [node(), erlang, node, [], 10000], 15000)},
    %% B follows once it has validated the new path.
    _ = ?P:wait_until(fun() -> PeerOf() =/= Before end, 5000),
    After = PeerOf(),
    Results = [receive {stream_done, S, Dir, Res} -> {Dir, Res}
               after DurationMs + 90000 -> {S, timeout}
               end || S <- [SA, SB]],
    maps:merge(maps:from_list(Results),
               #{rebind => Rebind, rebind_at_ms => At, peer_before => Before,
                 peer_after => After, erpc => Erpc}).

%% Sends {sq, self(), I, Payload} for DurationMs, at most ?WINDOW ahead of the acks;
%% then {sq_end, self(), Last}; reports {stream_done, self(), Dir, {Result, Last}}.
stream_sender(Receiver, DurationMs, Report, Dir) ->
    Payload = crypto:strong_rand_bytes(1024),
    Deadline = erlang:monotonic_time(millisecond) + DurationMs,
    Last = stream_send(Receiver, Payload, 1, 0, Deadline),
    Receiver ! {sq_end, self(), Last},
    Result = receive {sq_result, Receiver, R} -> R after 60000 -> receiver_timeout end,
    Report ! {stream_done, self(), Dir, {Result, Last}}.

stream_send(Receiver, Payload, Next, Acked, Deadline) ->
    case erlang:monotonic_time(millisecond) >= Deadline of
        true ->
            Next - 1;
        false when Next - 1 - Acked < ?STREAM_WINDOW ->
            Receiver ! {sq, self(), Next, Payload},
            Acked1 = macula_test_traffic:drain_acks(sq_ack, Receiver, Acked),
            stream_send(Receiver, Payload, Next + 1, Acked1, Deadline);
        false ->
            receive
                {sq_ack, Receiver, I} -> stream_send(Receiver, Payload, Next, max(Acked, I), Deadline)
            after 100 ->
                    stream_send(Receiver, Payload, Next, Acked, Deadline)
            end
    end.

stream_receiver() ->
    stream_receiver(undefined, 1).

stream_receiver(From, I) ->
    receive
        {sq, S, I, _} when From =:= undefined; S =:= From ->
            case I rem ?STREAM_ACK_EVERY of
                0 -> S ! {sq_ack, self(), I};
                _ -> ok
            end,
            stream_receiver(S, I + 1);
        {sq, S, X, _} ->
            S ! {sq_result, self(), {out_of_order, {expected, I}, {got, X}}};
        {sq_end, S, Last} when Last =:= I - 1 ->
            S ! {sq_result, self(), {ok, Last}};
        {sq_end, S, Last} ->
            S ! {sq_result, self(), {missing, {received, I - 1}, {sent, Last}}}
    after 60000 ->
            case From of
                undefined -> ok;
                _ -> From ! {sq_result, self(), {idle, {expected, I}}}
            end
    end.

%%% ------------------------------------------------------------------------------------
%%% Namespaces, veth, nftables
%%% ------------------------------------------------------------------------------------

%% Checks the prerequisites and makes the two namespaces and the veth link between
%% them; fails the case, with what is missing, if it cannot.
setup_link(Config) ->
    #{ns_a := NsA, ns_b := NsB, veth_a := VethA, veth_b := VethB} = Env = ?config(env, Config),
    case string:trim(os:cmd("id -u")) of
        "0" -> ok;
        Uid -> ct:fail({not_root, "the network namespace cases need root (ip netns add, "
                                  "nft); this test runs as uid " ++ Uid})
    end,
    [case os:find_executable(Tool, "/usr/sbin:/sbin:/usr/bin:/bin") of
         false -> ct:fail({missing_tool, Tool, "install " ++ Pkg ++ " (apt-get install " ++ Pkg ++ ")"});
         _ -> ok
     end || {Tool, Pkg} <- [{"ip", "iproute2"}, {"nft", "nftables"}]],
    must(ip() ++ " netns add " ++ NsA),
    must(ip() ++ " netns add " ++ NsB),
    must(ip() ++ " link add name " ++ VethA ++ " netns " ++ NsA
         ++ " type veth peer name " ++ VethB ++ " netns " ++ NsB),
    [must(ip() ++ " -n " ++ Ns ++ " " ++ Cmd)
     || {Ns, Veth, Ip} <- [{NsA, VethA, ?IP_A}, {NsB, VethB, ?IP_B}],
        Cmd <- ["link set lo up", "addr add " ++ Ip ++ "/24 dev " ++ Veth,
                %% One UDP datagram per packet on the link: without this, QUIC's
                %% segmentation offload (GSO) crosses the veth as super-packets of up
                %% to 64 KB, and nft would drop whole bursts of datagrams at a time.
                "link set dev " ++ Veth ++ " gso_max_segs 1",
                "link set " ++ Veth ++ " up"]],
    %% Both ends up before any node is started (the veth may take a moment).
    [begin
         Show = ip() ++ " -n " ++ Ns ++ " -o link show dev " ++ Veth,
         case ?P:wait_until(fun() -> string:find(must(Show), "state UP") =/= nomatch end, 5000, 100) of
             ok -> ok;
             timeout -> ct:fail({veth_not_up, Show, sh(Show)})
         end
     end || {Ns, Veth} <- [{NsA, VethA}, {NsB, VethB}]],
    %% nft works in the namespaces (the module may be missing from the kernel).
    [must(ip() ++ " netns exec " ++ Ns ++ " " ++ nft() ++ " list ruleset") || Ns <- [NsA, NsB]],
    Env.

%% Drops Pct% of the UDP packets that enter the namespace; the first rule counts them
%% all, the second the dropped ones.
add_loss(Env, Which, Pct) ->
    Ns = maps:get(Which, Env),
    Rules = io_lib:format("table inet ~s {~n"
                          "  chain in {~n"
                          "    type filter hook input priority 0; policy accept;~n"
                          "    meta l4proto udp counter~n"
                          "    meta l4proto udp numgen random mod 100 < ~b counter drop~n"
                          "  }~n"
                          "}~n", [?NFT_TABLE, Pct]),
    File = filename:join(maps:get(dir, Env), "nft-" ++ Ns ++ ".conf"),
    ok = file:write_file(File, Rules),
    must(ip() ++ " netns exec " ++ Ns ++ " " ++ nft() ++ " -f " ++ File),
    ok.

%% {UDP packets that entered, packets dropped} in the namespace so far.
loss_counters(Env, Which) ->
    Ns = maps:get(Which, Env),
    Out = must(ip() ++ " netns exec " ++ Ns ++ " " ++ nft() ++ " list table inet " ++ ?NFT_TABLE),
    case re:run(Out, "counter packets ([0-9]+)", [global, {capture, all_but_first, list}]) of
        {match, [[In], [Dropped]]} -> {list_to_integer(In), list_to_integer(Dropped)};
        _ -> ct:fail({unexpected_nft_output, Out})
    end.

list_netns() ->
    {_, Out} = sh(ip() ++ " netns list"),
    [hd(string:lexemes(Line, " ")) || Line <- string:lexemes(Out, "\n"), Line =/= ""].

delete_netns(Ns) ->
    case sh(ip() ++ " netns delete " ++ Ns) of
        {0, _} -> ok;
        Error -> ct:pal("could not delete namespace ~s: ~p", [Ns, Error])
    end.

ip() ->
    tool("ip").

nft() ->
    tool("nft").

tool(Name) ->
    case os:find_executable(Name, "/usr/sbin:/sbin:/usr/bin:/bin") of
        false -> Name;
        Path -> Path
    end.

%% Runs a shell command: {ExitStatus, Output (stdout and stderr)}.
sh(Cmd) ->
    macula_tool_runner:sh(Cmd).

%% Runs a command that must succeed; its output, or the case fails with it.
must(Cmd) ->
    macula_tool_runner:must(Cmd).

%%% ------------------------------------------------------------------------------------
%%% Nodes
%%% ------------------------------------------------------------------------------------

%% One node in each namespace, started in parallel.
start_pair(#{ns_a := NsA, ns_b := NsB}, ExtraArgs) ->
    [A, B] = ?P:parallel([fun() -> ?P:start_netns(NsA, ?PORT_A, ExtraArgs, #{host => ?IP_A}) end,
                       fun() -> ?P:start_netns(NsB, ?PORT_B, ExtraArgs, #{host => ?IP_B}) end]),
    {A, B}.

