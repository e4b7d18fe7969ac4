%%% @doc Data streams: per-sender order with many senders, signals in order, priority,
%%% and the two stream modes (`data_streams' 1, one ordered stream; the default pool
%%% of per-sender streams). Every case runs on separate OS-level nodes over macula.
-module(macula_streams_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, groups/0, suite/0, init_per_group/2, end_per_group/2]).
-export([stream_pool_in_connection_info/1, randomized_senders_keep_order/1,
         signals_keep_order/1, prioritized_pings_pass_a_bulk_transfer/1,
         mixed_modes_interoperate/1, prioritize_refuses_remote_pids/1,
         down_by_name_follows_the_last_messages/1, marked_mid_connection_keeps_order/1]).
%% Run on the nodes (also by macula_netns_SUITE).
-export([collector/0, sender/3, collect_report/0, bulk_sender/4, bulk_receiver/0, pinger/3,
         echo/1, named_sender/3, order_collector/3]).

-define(P, macula_test_peer).
-define(PORT_RANGE, {30000, 39799}).
-define(RX, macula_streams_rx).
%% Rounds of down_by_name_follows_the_last_messages: without the fence most rounds fail.
-define(DOWN_ROUNDS, 50).
%% The large message of each of those rounds, then this many small ones.
-define(DOWN_BIG, 4 bsl 20).
-define(DOWN_SMALL, 20).

suite() ->
    [{timetrap, {seconds, 120}},
     {ct_hooks, [{macula_ct_hook, #{ports_per_case => 10, port_range => ?PORT_RANGE}}]}].

all() ->
    [{group, single_stream}, {group, multi_stream}, mixed_modes_interoperate,
     prioritize_refuses_remote_pids].

groups() ->
    Both = [stream_pool_in_connection_info, randomized_senders_keep_order, signals_keep_order,
            down_by_name_follows_the_last_messages, marked_mid_connection_keeps_order],
    [{single_stream, [], Both},
     {multi_stream, [], Both ++ [prioritized_pings_pass_a_bulk_transfer]}].

init_per_group(single_stream, Config) ->
    [{node_args, ["-macula_dist_opt", "data_streams", "1"]}, {pool, 1} | Config];
init_per_group(multi_stream, Config) ->
    [{node_args, []}, {pool, 9} | Config].

end_per_group(_Group, _Config) ->
    ok.

start_nodes(Config, N) ->
    Args = proplists:get_value(node_args, Config, []),
    Base = ?config(base_port, Config),
    ?P:parallel([fun() -> ?P:start(Base + K, Args) end || K <- lists:seq(1, N)]).

connect(A, B) ->
    true = ?P:call(A, net_kernel, connect_node, [?P:node_of(B)]).

%%% ------------------------------------------------------------------------------------
%%% Cases
%%% ------------------------------------------------------------------------------------

%% Shows: connection_info/1 reports the data stream pool of the mode, and with the
%% pool several senders use several streams.
stream_pool_in_connection_info(Config) ->
    [A, B] = start_nodes(Config, 2),
    NB = ?P:node_of(B),
    connect(A, B),
    %% Five processes each send a message to a process on B.
    ok = ?P:run(A, fun() ->
                           Sink = spawn(NB, fun() -> receive after 5000 -> ok end end),
                           Self = self(),
                           [spawn(fun() -> Sink ! hello, Self ! sent end) || _ <- lists:seq(1, 5)],
                           [receive sent -> ok end || _ <- lists:seq(1, 5)],
                           timer:sleep(100)
                   end),
    {ok, #{data_streams := #{pool := Pool, out := Out}}} =
        ?P:call(A, macula_dist, connection_info, [NB]),
    ?assertEqual(?config(pool, Config), Pool),
    case Pool of
        1 -> ?assertEqual(1, Out);
        _ -> ?assert(Out > 1)
    end.

%% Shows: 24 senders on three nodes send messages of random sizes (10 B to 2 MiB) to
%% the other nodes at once; every message arrives exactly once, intact, and in the
%% order its sender sent it.
randomized_senders_keep_order(Config) ->
    Nodes = start_nodes(Config, 3),
    Names = [?P:node_of(N) || N <- Nodes],
    [?P:call(N, erlang, register, [?RX, ?P:call(N, erlang, spawn, [?MODULE, collector, []])])
     || N <- Nodes],
    Seed = erlang:unique_integer([positive]),
    ct:pal("seed ~p", [Seed]),
    Senders = lists:append(
                [[?P:call(N, erlang, spawn, [?MODULE, sender, [Names -- [Me], 200, {Seed, Me, K}]])
                  || K <- lists:seq(1, 8)]
                 || {N, Me} <- lists:zip(Nodes, Names)]),
    ?assertEqual(24, length(Senders)),
    %% Each sender reports to the collectors when done; collectors answer `check'.
    Reports = [?P:call(N, erlang, apply, [fun collect_report/0, []], 90000) || N <- Nodes],
    [begin
         ?assertEqual([], Violations),
         ?assertEqual(16, Finished)
     end || {Finished, Violations, _Count} <- Reports],
    Total = lists:sum([Count || {_, _, Count} <- Reports]),
    ct:pal("~p messages checked", [Total]),
    ?assert(Total > 24 * 200 div 2).

%% Shows: what one process sends keeps its order with the signals it sends after:
%% messages before its exit, a spawn reply before the new process's messages, a link
%% exit after the last message; erpc, global and pg work across the connection.
signals_keep_order(Config) ->
    [A, B] = start_nodes(Config, 2),
    {NA, NB} = {?P:node_of(A), ?P:node_of(B)},
    connect(A, B),
    %% Messages, then exit: a monitor on the other node sees all of them first.
    Seen = ?P:run(B, fun() ->
                             Self = self(),
                             Pid = spawn(NA, fun() ->
                                                     receive go -> ok end,
                                                     [Self ! {n, I} || I <- lists:seq(1, 500)],
                                                     exit(done)
                                             end),
                             Ref = monitor(process, Pid),
                             Pid ! go,
                             drain_until_down(Ref, [])
                     end),
    ?assertEqual({lists:seq(1, 500), done}, Seen),
    %% spawn_request: the reply comes before the child's messages.
    Spawned = ?P:run(A, fun() ->
                                Self = self(),
                                Req = spawn_request(NB, fun() -> [Self ! {c, I} || I <- lists:seq(1, 200)] end,
                                                    [monitor]),
                                first_after_spawn(Req, [])
                        end),
    ?assertEqual({reply_first, lists:seq(1, 200), normal}, Spawned),
    %% A link: the exit signal follows the last message.
    Linked = ?P:run(A, fun() ->
                               process_flag(trap_exit, true),
                               Self = self(),
                               Pid = spawn_link(NB, fun() ->
                                                            [Self ! {l, I} || I <- lists:seq(1, 300)],
                                                            exit(linked_done)
                                                    end),
                               drain_until_exit(Pid, [])
                       end),
    ?assertEqual({lists:seq(1, 300), linked_done}, Linked),
    ?assertEqual(NB, ?P:call(A, erpc, call, [NB, erlang, node, []])),
    Idle = ?P:call(B, ?P, spawn_idle, []),
    yes = ?P:call(B, global, register_name, [macula_streams_g, Idle]),
    ?assertEqual(Idle, ?P:run(A, fun() -> global:sync(), global:whereis_name(macula_streams_g) end)),
    ok.

drain_until_down(Ref, Acc) ->
    receive
        {n, I} -> drain_until_down(Ref, [I | Acc]);
        {'DOWN', Ref, process, _, Reason} -> {lists:reverse(Acc), Reason}
    after 20000 -> {timeout, lists:reverse(Acc)}
    end.

first_after_spawn(Req, Acc) ->
    receive
        {spawn_reply, Req, ok, _Pid} when Acc =:= [] -> collect_child(Req, []);
        {c, _} = Early -> {message_before_reply, Early};
        {spawn_reply, Req, error, Why} -> {spawn_failed, Why}
    after 20000 -> timeout
    end.

collect_child(Req, Acc) ->
    receive
        {c, I} -> collect_child(Req, [I | Acc]);
        {'DOWN', Req, process, _, Reason} -> {reply_first, lists:reverse(Acc), Reason}
    after 20000 -> {timeout, lists:reverse(Acc)}
    end.

drain_until_exit(Pid, Acc) ->
    receive
        {l, I} -> drain_until_exit(Pid, [I | Acc]);
        {'EXIT', Pid, Reason} -> {lists:reverse(Acc), Reason}
    after 20000 -> {timeout, lists:reverse(Acc)}
    end.

%% Shows: the 'DOWN' of a monitor by registered name comes after every message the
%% monitored process sent before it died, though its control message names the
%% process by its name and so travels on the fixed stream, not the process's own: a
%% registered process on B sends a large message and then small ones to a process on
%% A that monitors it by {Name, B}, then exits; 50 rounds.
down_by_name_follows_the_last_messages(Config) ->
    [A, B] = start_nodes(Config, 2),
    connect(A, B),
    down_by_name_rounds(A, ?P:node_of(B)).

%% Runs the rounds on A against named senders on NB; fails naming the bad rounds.
down_by_name_rounds(A, NB) ->
    Rounds = ?P:run(A, fun() -> [down_by_name_round(NB, R) || R <- lists:seq(1, ?DOWN_ROUNDS)] end,
                    110000),
    Early = [R || R <- Rounds, R =/= in_order],
    ct:pal("'DOWN' before the last messages in ~p of ~p rounds", [length(Early), ?DOWN_ROUNDS]),
    ?assertEqual([], Early).

down_by_name_round(NB, Round) ->
    Name = list_to_atom("macula_streams_named_" ++ integer_to_list(Round)),
    _ = spawn(NB, ?MODULE, named_sender, [self(), Name, Round]),
    Pid = receive {registered, Round, P} -> P after 20000 -> exit(no_named_sender) end,
    Ref = monitor(process, {Name, NB}),
    %% Sent after the monitor request by the same process: B sees the monitor first.
    Pid ! go,
    Expected = [big | lists:seq(1, ?DOWN_SMALL)],
    case until_down(Ref, Round, []) of
        {Expected, normal} ->
            in_order;
        {Before, Reason} ->
            %% Collect the stragglers, so the next round starts with an empty mailbox.
            {Round, Reason, before_down, Before, after_down, stragglers(Round, Expected -- Before)}
    end.

until_down(Ref, Round, Acc) ->
    receive
        {big, Round, Bin} when byte_size(Bin) =:= ?DOWN_BIG -> until_down(Ref, Round, [big | Acc]);
        {small, Round, I} -> until_down(Ref, Round, [I | Acc]);
        {'DOWN', Ref, process, _, Reason} -> {lists:reverse(Acc), Reason}
    after 20000 -> {lists:reverse(Acc), no_down}
    end.

stragglers(_Round, []) ->
    [];
stragglers(Round, Missing) ->
    receive
        {big, Round, _} -> [big | stragglers(Round, Missing -- [big])];
        {small, Round, I} -> [I | stragglers(Round, Missing -- [I])]
    after 20000 -> [{missing, Missing}]
    end.

%% Shows: a process that sends a large message, then marks itself for priority and
%% sends small ones, has them all arrive in order: its first marked packet moves it to
%% the priority stream behind a fence on its old stream (in multi-stream mode; with one
%% stream the mark changes nothing). 50 rounds, each with a fresh process.
marked_mid_connection_keeps_order(Config) ->
    [A, B] = start_nodes(Config, 2),
    connect(A, B),
    NB = ?P:node_of(B),
    Rounds = ?P:run(A, fun() -> [marked_round(NB, R) || R <- lists:seq(1, ?DOWN_ROUNDS)] end,
                    110000),
    Bad = [R || R <- Rounds, R =/= in_order],
    ct:pal("marked messages out of order in ~p of ~p rounds: ~p", [length(Bad), ?DOWN_ROUNDS, Bad]),
    ?assertEqual([], Bad).

marked_round(NB, Round) ->
    Rx = spawn(NB, ?MODULE, order_collector, [self(), Round, 1 + ?DOWN_SMALL]),
    %% The sender lives until the round is over: a mark is read when the controller
    %% hands the packet to the NIF, and a dead process's mark is gone.
    Sender = spawn(fun() ->
                           Rx ! {big, binary:copy(<<Round>>, ?DOWN_BIG)},
                           ok = macula_dist:prioritize(self()),
                           [Rx ! {small, I} || I <- lists:seq(1, ?DOWN_SMALL)],
                           receive done -> ok end
                   end),
    Expected = [big | lists:seq(1, ?DOWN_SMALL)],
    Result = receive
                 {order, Round, Expected} -> in_order;
                 {order, Round, Got} -> {Round, Got}
             after 20000 -> {Round, timeout}
             end,
    Sender ! done,
    Result.

%% On the receiving node: the order in which `N' messages of a round came.
order_collector(To, Round, N) ->
    To ! {order, Round, [receive {big, _} -> big; {small, I} -> I end || _ <- lists:seq(1, N)]}.

%% Shows: while one process streams 1 MiB binaries flat out (16 in flight), a
%% prioritised process and an ordinary one each complete round trips with a process
%% on the other node, and none of them waits for the bulk transfer to end.
prioritized_pings_pass_a_bulk_transfer(Config) ->
    [A, B] = start_nodes(Config, 2),
    NB = ?P:node_of(B),
    connect(A, B),
    Result = ?P:run(A, fun() -> pings_during_bulk(NB) end, 60000),
    ct:pal("~p", [Result]),
    #{bulk_end := BulkEnd, bulk_bytes := Bytes, pingers := Pingers} = Result,
    ?assert(Bytes > 50 * (1 bsl 20)),
    [begin
         ?assert(Count >= 20, {Kind, only, Count, round_trips}),
         ?assert(End < BulkEnd, {Kind, finished_after_the_bulk})
     end || {Kind, Count, End} <- Pingers],
    ok.

pings_during_bulk(NB) ->
    Self = self(),
    Rcv = spawn(NB, ?MODULE, bulk_receiver, []),
    _Bulk = spawn_link(?MODULE, bulk_sender, [Self, Rcv, 16, erlang:monotonic_time(millisecond) + 6000]),
    Rcv ! {sender, _Bulk},
    timer:sleep(500),
    Pingers = [spawn_link(?MODULE, pinger, [Self, NB, Prio]) || Prio <- [true, false]],
    Done = [receive {pinger, P, Kind, Count, End} -> {Kind, Count, End} end || P <- Pingers],
    receive {bulk_done, Bytes, BulkEnd} -> ok end,
    #{bulk_end => BulkEnd, bulk_bytes => Bytes, pingers => Done}.

%% Nodes with different modes agree on the connection (the multi-stream side rejects
%% the atom cache for both) and keep per-sender order both ways.
mixed_modes_interoperate(Config) ->
    Base = ?config(base_port, Config),
    [A, B] = ?P:parallel([fun() -> ?P:start(Base + 1, ["-macula_dist_opt", "data_streams", "1"]) end,
                          fun() -> ?P:start(Base + 2, []) end]),
    {NA, NB} = {?P:node_of(A), ?P:node_of(B)},
    connect(A, B),
    Echo = fun(To) ->
                   ?P:run(A, fun() ->
                                     Self = self(),
                                     _ = spawn(To, fun() -> [Self ! {m, I} || I <- lists:seq(1, 1000)] end),
                                     [receive {m, I} -> I after 10000 -> timeout end || _ <- lists:seq(1, 1000)]
                             end)
           end,
    ?assertEqual(lists:seq(1, 1000), Echo(NB)),
    ?assertEqual(NA, ?P:call(B, erpc, call, [NA, erlang, node, []])),
    {ok, #{data_streams := #{pool := 1}}} = ?P:call(A, macula_dist, connection_info, [NB]),
    {ok, #{data_streams := #{pool := 9}}} = ?P:call(B, macula_dist, connection_info, [NA]),
    %% The single-stream side follows the multi-stream side's fences: a 'DOWN' by name
    %% from B still comes after the messages sent before it.
    down_by_name_rounds(A, NB).

%% Shows: only local processes can be prioritised, with a matchable error.
prioritize_refuses_remote_pids(Config) ->
    [A, B] = start_nodes(Config, 2),
    NB = ?P:node_of(B),
    connect(A, B),
    ?assertEqual({error, not_local},
                 ?P:run(A, fun() -> macula_dist:prioritize(spawn(NB, erlang, node, [])) end)),
    ?assertEqual(ok, ?P:run(A, fun() -> macula_dist:prioritize(self()) end)),
    ?assertEqual(ok, ?P:run(A, fun() -> macula_dist:prioritize(self(), false) end)).

%%% ------------------------------------------------------------------------------------
%%% On the nodes
%%% ------------------------------------------------------------------------------------

%% Receives {seq, Sender, N, Hash, Payload} and {done, Sender, Count}; answers
%% {check, From} with {Finished, Violations, Count} once all 16 senders (8 on each of
%% the two other nodes) are done.
collector() ->
    collector(#{}, [], 0, 0, []).

collector(Last, Violations, Finished, Count, Waiting) when Finished =:= 16, Waiting =/= [] ->
    [W ! {report, {Finished, Violations, Count}} || W <- Waiting],
    collector(Last, Violations, Finished, Count, []);
collector(Last, Violations, Finished, Count, Waiting) ->
    receive
        {seq, Sender, N, Hash, Payload} ->
            Expected = maps:get(Sender, Last, 0) + 1,
            V1 = [{out_of_order, Sender, N, expected, Expected} || N =/= Expected]
                ++ [{corrupt, Sender, N} || erlang:phash2(Payload) =/= Hash],
            collector(Last#{Sender => N}, V1 ++ Violations, Finished, Count + 1, Waiting);
        {done, Sender, Sent} ->
            V1 = [{count, Sender, sent, Sent, got, maps:get(Sender, Last, 0)}
                  || Sent =/= maps:get(Sender, Last, 0)],
            collector(Last, V1 ++ Violations, Finished + 1, Count, Waiting);
        {check, From} ->
            collector(Last, Violations, Finished, Count, [From | Waiting])
    end.

collect_report() ->
    ?RX ! {check, self()},
    receive {report, R} -> R after 85000 -> {timeout, [], 0} end.

%% Sends N messages, each to the collector of a random one of `Peers', sizes mostly
%% small, some up to 2 MiB; then tells each collector how many it was sent.
sender(Peers, N, {Seed, Me, K}) ->
    rand:seed(exsss, {Seed, erlang:phash2(Me), K}),
    Sent = lists:foldl(fun(_, Acc) ->
                               Peer = lists:nth(rand:uniform(length(Peers)), Peers),
                               Seq = maps:get(Peer, Acc, 0) + 1,
                               Payload = payload(rand:uniform(100)),
                               {?RX, Peer} ! {seq, self(), Seq, erlang:phash2(Payload), Payload},
                               Acc#{Peer => Seq}
                       end, #{}, lists:seq(1, N)),
    [{?RX, Peer} ! {done, self(), maps:get(Peer, Sent, 0)} || Peer <- Peers],
    ok.

payload(R) when R =< 70 -> rand:bytes(10 + rand:uniform(200));
payload(R) when R =< 97 -> rand:bytes(rand:uniform(64 * 1024));
payload(_) -> rand:bytes(rand:uniform(2 * 1024 * 1024)).

%% Streams 1 MiB binaries to Rcv with `Window' unacknowledged, until Deadline (ms).
bulk_sender(Parent, Rcv, Window, Deadline) ->
    Bin = rand:bytes(1 bsl 20),
    bulk_loop(Parent, Rcv, Bin, Window, Deadline, 0).

bulk_loop(Parent, Rcv, Bin, 0, Deadline, Acked) ->
    receive ack -> bulk_loop(Parent, Rcv, Bin, 1, Deadline, Acked + 1) end;
bulk_loop(Parent, Rcv, Bin, Credit, Deadline, Acked) ->
    case erlang:monotonic_time(millisecond) >= Deadline of
        true ->
            Parent ! {bulk_done, Acked * byte_size(Bin), erlang:monotonic_time(millisecond)};
        false ->
            Rcv ! Bin,
            bulk_loop(Parent, Rcv, Bin, Credit - 1, Deadline, Acked)
    end.

bulk_receiver() ->
    receive {sender, S} -> bulk_receiver_loop(S) end.

bulk_receiver_loop(S) ->
    receive B when is_binary(B) -> S ! ack, bulk_receiver_loop(S) end.

%% Registers as Name, tells Parent, and on `go' sends it a large message, then small
%% ones, then exits (normally).
named_sender(Parent, Name, Round) ->
    true = register(Name, self()),
    Parent ! {registered, Round, self()},
    receive go -> ok after 20000 -> exit(no_go) end,
    Parent ! {big, Round, binary:copy(<<Round>>, ?DOWN_BIG)},
    [Parent ! {small, Round, I} || I <- lists:seq(1, ?DOWN_SMALL)],
    ok.

%% Round trips with an echo process on Node for 3 s; reports how many, and when done.
pinger(Parent, Node, Prio) ->
    ok = case Prio of true -> macula_dist:prioritize(self()); false -> ok end,
    Echo = spawn(Node, ?MODULE, echo, [Prio]),
    End = erlang:monotonic_time(millisecond) + 3000,
    Count = ping_loop(Echo, End, 0),
    Echo ! stop,
    Kind = case Prio of true -> prioritized; false -> ordinary end,
    Parent ! {pinger, self(), Kind, Count, erlang:monotonic_time(millisecond)}.

ping_loop(Echo, End, N) ->
    case erlang:monotonic_time(millisecond) >= End of
        true -> N;
        false ->
            Echo ! {self(), N},
            receive N -> ping_loop(Echo, End, N + 1) end
    end.

echo(Prio) ->
    ok = case Prio of true -> macula_dist:prioritize(self()); false -> ok end,
    echo_loop().

echo_loop() ->
    receive
        {From, N} -> From ! N, echo_loop();
        stop -> ok
    end.
