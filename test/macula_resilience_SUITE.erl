%%% @doc Issue 5, "Survives the real network": the single-host cases.
%%%
%%% Separate OS-level nodes `Port@127.0.0.1' over the macula carrier, started and
%%% driven through macula_test_peer (the test node itself is not distributed), all
%%% with net_ticktime 4 s unless a case says otherwise. What is checked:
%%%
%%% <ul>
%%% <li>liveness_under_load: a windowed sender of 1 MiB binaries saturates the link
%%%     into a receiver that sleeps per message, for 20 s: no nodedown on either side,
%%%     every chunk arrives intact and in order;</li>
%%% <li>kill -9, init:stop(), erlang:halt(): how soon, and with which reason, the
%%%     other node sees nodedown;</li>
%%% <li>a peer frozen with SIGSTOP for longer than net_ticktime is dropped, and after
%%%     SIGCONT the next send reconnects, with no manual action;</li>
%%% <li>a node killed and restarted under the same name is a new incarnation: links to
%%%     the old one fire, old pids are dead, new pids work;</li>
%%% <li>a 10-node full mesh: global and pg converge, survive the kill -9 of one node
%%%     (exactly one nodedown on each of the others) and take the restarted node back;</li>
%%% <li>Mnesia: a disc_copies table on 3 nodes; a killed node restarted on its
%%%     directory catches up with what was written while it was down;</li>
%%% <li>net_kernel:set_net_ticktime/1 at run time (4 -> 8, 4 -> 12, 2 -> 20):
%%%     connections stay up, the new value governs how soon a dead peer is detected,
%%%     and a frozen peer is tolerated as long as the new value says.</li>
%%% </ul>
%%%
%%% Bounds. OTP declares a silent node down after between 3/4 and 5/4 of net_ticktime
%%% (the tick interval is a quarter of it and four silent intervals are needed); a
%%% detection is expected within 5/4 of net_ticktime plus 0.5 s of scheduling margin
%%% (5.5 s for 4 s).
%%%
%%% Environment:
%%% <ul>
%%% <li>`MACULA_SOAK=1': the load case runs 60 s instead of 20 s.</li>
%%% <li>`MACULA_TEST_PORT_BASE=N': first UDP port of the run; otherwise a random free
%%%     block in 10000..19799 (below Linux's ephemeral range, and apart from
%%%     macula_dist_SUITE's 20000..29799). Each case has its own block of 20 ports.</li>
%%% </ul>
%%% Times are measured on the observing node's own monotonic clock (the
%%% macula_test_peer watcher) and reported in the case comments.
-module(macula_resilience_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([suite/0, all/0]).
-export([liveness_under_load/0, liveness_under_load/1,
         kill_gives_nodedown_within_ticktime/1,
         init_stop_gives_prompt_nodedown/1,
         halt_gives_prompt_nodedown/1,
         frozen_peer_dropped_then_reconnects/1,
         restart_is_new_incarnation/1,
         ten_node_mesh/0, ten_node_mesh/1,
         mnesia_catch_up/0, mnesia_catch_up/1,
         ticktime_change_kill_detected/1,
         ticktime_change_tolerates_longer_silence/1,
         ticktime_raised_tenfold_tolerates_silence/1]).
%% Run on the nodes
-export([slow_receiver/3, echo_loop/0]).

-define(P, macula_test_peer).
-define(PORT_RANGE, {10000, 19799}).
-define(BLOCK, 20).
-define(TICKTIME_MS, 4000).
%% Load case: chunks unacknowledged at most, and the receiver's sleep per chunk.
-define(WINDOW, 128).
-define(RECV_SLEEP_MS, 2).

suite() ->
    [{timetrap, {seconds, 60}},
     {ct_hooks, [{macula_ct_hook, #{ports_per_case => ?BLOCK, port_range => ?PORT_RANGE}}]}].

all() ->
    [liveness_under_load,
     kill_gives_nodedown_within_ticktime,
     init_stop_gives_prompt_nodedown,
     halt_gives_prompt_nodedown,
     frozen_peer_dropped_then_reconnects,
     restart_is_new_incarnation,
     ten_node_mesh,
     mnesia_catch_up,
     ticktime_change_kill_detected,
     ticktime_change_tolerates_longer_silence,
     ticktime_raised_tenfold_tolerates_silence].

liveness_under_load() ->
    [{timetrap, {seconds, load_seconds() + 90}}].

ten_node_mesh() ->
    [{timetrap, {seconds, 120}}].

mnesia_catch_up() ->
    [{timetrap, {seconds, 90}}].

load_seconds() ->
    case os:getenv("MACULA_SOAK") of
        "1" -> 60;
        _ -> 20
    end.

%% The latest a silent peer may be declared down, for a net_ticktime in ms.
max_detect_ms(TickMs) ->
    TickMs * 5 div 4 + 500.

%%% ------------------------------------------------------------------------------------
%%% Liveness under load
%%% ------------------------------------------------------------------------------------

%% Shows: for 20 s (60 s with MACULA_SOAK=1) a sender on A keeps up to 128 MiB of
%% 1 MiB binaries unacknowledged towards a receiver on B that checks each one's md5 and
%% sleeps 2 ms per chunk; with net_ticktime 4 neither node sees a nodedown, every chunk
%% arrives intact and in order, and erpc calls made during the load all return.
%% Reported: throughput, the receiver's largest mailbox, how often the VM suspended
%% the sender on a busy distribution channel (busy_dist_port), the slowest erpc.
liveness_under_load(Config) ->
    DurationMs = load_seconds() * 1000,
    ct:pal("load: ~b s", [load_seconds()]),
    [A, B] = start_nodes(Config, 2),
    {NA, NB} = {?P:node_of(A), ?P:node_of(B)},
    pong = ?P:call(A, net_adm, ping, [NB]),
    ok = wait_nodes(B, [NA]),
    ok = ?P:call(A, ?P, watch_start, []),
    ok = ?P:call(B, ?P, watch_start, []),
    R = ?P:run(A, fun() -> bulk_run(NB, DurationMs) end, DurationMs + 75000),
    ct:pal("load result on ~p: ~p", [NA, R]),
    EventsA = ?P:call(A, ?P, watch_events, []),
    EventsB = ?P:call(B, ?P, watch_events, []),
    ct:pal("node events during the load: on A ~p~non B ~p", [EventsA, EventsB]),
    ?assertEqual({[], []}, {EventsA, EventsB}),
    ?assertEqual([NB], ?P:call(A, erlang, nodes, [])),
    ?assertEqual([NA], ?P:call(B, erlang, nodes, [])),
    #{sent := Sent, received := Received, receiver := RecvStatus, ms := Ms,
      max_mailbox := MaxQ, busy_dist_port := Busy, probes := Probes,
      probe_failures := ProbeFailures, probe_max_ms := ProbeMax} = R,
    ?assertEqual(ok, RecvStatus),
    ?assertEqual(Sent, Received),
    ?assertEqual([], ProbeFailures),
    ?assert(Sent > ?WINDOW),
    MiBs = Sent * 1000 / max(1, Ms),
    Text = io_lib:format("~b x 1 MiB in ~b ms (~.1f MiB/s), no nodedown; receiver's "
                         "mailbox up to ~b; sender suspended on busy dist ~b times; "
                         "~b erpc probes during the load, slowest ~b ms",
                         [Sent, Ms, MiBs, MaxQ, Busy, Probes, ProbeMax]),
    ct:pal("~s", [Text]),
    {comment, Text}.

%% On A: sends for DurationMs, then waits for the last ack.
bulk_run(NB, DurationMs) ->
    Self = self(),
    Bin = crypto:strong_rand_bytes(1 bsl 20),
    Md5 = erlang:md5(Bin),
    Receiver = spawn(NB, ?MODULE, slow_receiver, [Self, Md5, ?RECV_SLEEP_MS]),
    Counter = spawn(fun() -> busy_counter(0) end),
    _ = erlang:system_monitor(Counter, [busy_dist_port]),
    Prober = spawn(fun() -> prober(Self, NB, 0, 0, []) end),
    T0 = erlang:monotonic_time(millisecond),
    Deadline = T0 + DurationMs,
    {Sent, Acked} = bulk_send(Receiver, Bin, 1, 0, Deadline),
    Ms = erlang:monotonic_time(millisecond) - T0,
    _ = erlang:system_monitor(undefined),
    Prober ! {stop, Self},
    {Probes, ProbeFailures, ProbeMax} = receive {probes, Prober, P} -> P after 35000 -> {0, [prober_timeout], 0} end,
    Counter ! {get, Self},
    Busy = receive {busy, Counter, N} -> N after 5000 -> -1 end,
    Receiver ! {done, Self},
    {RecvStatus, Received, MaxQ} =
        receive
            {receiver_done, Receiver, Count, Q} -> {ok, Count, Q};
            {receiver_failed, Receiver, Why} -> {Why, -1, -1}
        after 30000 -> {receiver_timeout, -1, -1}
        end,
    #{sent => Sent, acked => Acked, received => Received, receiver => RecvStatus,
      ms => Ms, max_mailbox => MaxQ, busy_dist_port => Busy, probes => Probes,
      probe_failures => ProbeFailures, probe_max_ms => ProbeMax}.

%% Returns {Sent, Acked} once time is up and every chunk sent is acknowledged.
bulk_send(Receiver, Bin, Next, Acked0, Deadline) ->
    Acked = macula_test_traffic:drain_acks(ack, Receiver, Acked0),
    Now = erlang:monotonic_time(millisecond),
    InFlight = Next - 1 - Acked,
    if
        Now >= Deadline ->
            {Next - 1, await_acks(Receiver, Acked, Next - 1, Now + 30000)};
        InFlight < ?WINDOW ->
            Receiver ! {chunk, self(), Next, Bin},
            bulk_send(Receiver, Bin, Next + 1, Acked, Deadline);
        true ->
            receive
                {ack, Receiver, Seq} -> bulk_send(Receiver, Bin, Next, max(Acked, Seq), Deadline);
                {receiver_failed, Receiver, _} = Failed -> self() ! Failed, {Next - 1, Acked}
            after 1000 ->
                    bulk_send(Receiver, Bin, Next, Acked, Deadline)
            end
    end.

await_acks(_Receiver, Acked, Last, _Deadline) when Acked >= Last ->
    Acked;
await_acks(Receiver, Acked, Last, Deadline) ->
    Left = max(0, Deadline - erlang:monotonic_time(millisecond)),
    receive
        {ack, Receiver, Seq} -> await_acks(Receiver, max(Acked, Seq), Last, Deadline);
        {receiver_failed, Receiver, _} = Failed -> self() ! Failed, Acked
    after Left ->
            Acked
    end.

%% On B: checks order and md5 of each chunk, sleeps, acknowledges.
slow_receiver(From, Md5, SleepMs) ->
    slow_receiver(From, Md5, SleepMs, 1, 0).

slow_receiver(From, Md5, SleepMs, Expect, MaxQ) ->
    receive
        {chunk, From, Expect, Bin} ->
            {message_queue_len, Q} = process_info(self(), message_queue_len),
            case erlang:md5(Bin) of
                Md5 ->
                    timer:sleep(SleepMs),
                    From ! {ack, self(), Expect},
                    slow_receiver(From, Md5, SleepMs, Expect + 1, max(MaxQ, Q));
                _ ->
                    From ! {receiver_failed, self(), {bad_md5, Expect, byte_size(Bin)}}
            end;
        {chunk, From, Other, _} ->
            From ! {receiver_failed, self(), {out_of_order, {expected, Expect}, {got, Other}}};
        {done, From} ->
            From ! {receiver_done, self(), Expect - 1, MaxQ}
    after 60000 ->
            From ! {receiver_failed, self(), {idle, {expected, Expect}}}
    end.

busy_counter(N) ->
    receive
        {monitor, _Pid, busy_dist_port, _} -> busy_counter(N + 1);
        {get, From} -> From ! {busy, self(), N}
    end.

%% Every 500 ms an erpc call to the loaded node; counts them, keeps the failures and
%% the slowest.
prober(Parent, NB, Count, Max, Failures) ->
    receive
        {stop, Parent} -> Parent ! {probes, self(), {Count, lists:reverse(Failures), Max}}
    after 500 ->
            T0 = erlang:monotonic_time(millisecond),
            Res = try erpc:call(NB, erlang, node, [], 30000) catch C:E -> {C, E} end,
            Ms = erlang:monotonic_time(millisecond) - T0,
            Failures1 = case Res of
                            NB -> Failures;
                            _ -> [{Count, Res, Ms} | Failures]
                        end,
            prober(Parent, NB, Count + 1, max(Max, Ms), Failures1)
    end.

%%% ------------------------------------------------------------------------------------
%%% How a peer goes away
%%% ------------------------------------------------------------------------------------

%% Shows: kill -9 of B gives nodedown on A within 5/4 of net_ticktime (4 s) + 0.5 s.
kill_gives_nodedown_within_ticktime(Config) ->
    [A, B] = start_nodes(Config, 2),
    {Ms, Reason} = ?P:nodedown_after(A, B, fun() -> ?P:kill(B) end),
    ct:pal("kill -9: nodedown after ~b ms, reason ~p", [Ms, Reason]),
    ?assert(Ms =< max_detect_ms(?TICKTIME_MS)),
    ?assertEqual([], ?P:call(A, erlang, nodes, [])),
    {comment, io_lib:format("nodedown after ~b ms (limit ~b), reason ~0p",
                            [Ms, max_detect_ms(?TICKTIME_MS), Reason])}.

%% Shows: init:stop() on B gives nodedown on A within 1.5 s, reason connection_closed
%% (init:stop itself takes about 1 s, with inet_tcp too).
init_stop_gives_prompt_nodedown(Config) ->
    [A, B] = start_nodes(Config, 2),
    ?P:closed_nodedown("init:stop()", A, B, fun() -> ?P:call(B, init, stop, []) end, 1500).

%% Shows: erlang:halt() on B gives nodedown on A in under 1 s, reason
%% connection_closed (the carrier closes its QUIC connections at VM exit).
halt_gives_prompt_nodedown(Config) ->
    [A, B] = start_nodes(Config, 2),
    ?P:closed_nodedown("erlang:halt()", A, B, fun() -> ?P:cast(B, erlang, halt, []) end, 999).

%% Shows: B frozen with SIGSTOP for 7 s (net_ticktime 4) is dropped by A in time; after
%% SIGCONT B sees its own nodedown, and the very next message A sends to a registered
%% process on B reconnects the nodes, with no manual action; erpc works both ways.
frozen_peer_dropped_then_reconnects(Config) ->
    [A, B] = start_nodes(Config, 2),
    {NA, NB} = {?P:node_of(A), ?P:node_of(B)},
    pong = ?P:call(A, net_adm, ping, [NB]),
    ok = wait_nodes(B, [NA]),
    ok = ?P:run(B, fun() ->
                           register(macula_test_echo, spawn(?MODULE, echo_loop, [])),
                           ok
                   end),
    ok = ?P:call(A, ?P, watch_start, []),
    ok = ?P:call(B, ?P, watch_start, []),
    T0 = ?P:call(A, ?P, now_ms, []),
    Stopped = erlang:monotonic_time(millisecond),
    ok = ?P:signal(B, "STOP"),
    Down = ?P:call(A, ?P, watch_await, [nodedown, NB, 7000]),
    timer:sleep(max(0, Stopped + 7000 - erlang:monotonic_time(millisecond))),
    ok = ?P:signal(B, "CONT"),
    ct:pal("A's nodedown for the frozen B: ~p", [Down]),
    ?assertMatch({ok, {nodedown, NB, _, _}}, Down),
    {ok, {nodedown, NB, InfoA, T1}} = Down,
    DownMs = T1 - T0,
    ?assert(DownMs =< max_detect_ms(?TICKTIME_MS)),
    %% The next send reconnects.
    Echo = ?P:run(A, fun() ->
                             S = erlang:monotonic_time(millisecond),
                             {macula_test_echo, NB} ! {echo, self(), hello},
                             receive
                                 {echoed, hello} -> {ok, erlang:monotonic_time(millisecond) - S}
                             after 15000 -> timeout
                             end
                     end, 20000),
    ct:pal("echo from A to B after SIGCONT: ~p", [Echo]),
    ?assertMatch({ok, _}, Echo),
    ok = wait_nodes(A, [NB]),
    ok = wait_nodes(B, [NA]),
    ?assertEqual(NB, ?P:run(A, fun() -> erpc:call(NB, erlang, node, []) end)),
    ?assertEqual(NA, ?P:run(B, fun() -> erpc:call(NA, erlang, node, []) end)),
    %% B saw the old connection go down, once; each side has one nodeup after that.
    EventsA = [{E, N} || {E, N, _, _} <- ?P:call(A, ?P, watch_events, [])],
    EventsB = [{E, N} || {E, N, _, _} <- ?P:call(B, ?P, watch_events, [])],
    {ok, {nodedown, NA, InfoB, _}} = ?P:call(B, ?P, watch_await, [nodedown, NA, 1000]),
    ct:pal("events on A: ~p~nevents on B: ~p", [EventsA, EventsB]),
    ?assertEqual([{nodedown, NB}, {nodeup, NB}], EventsA),
    ?assertEqual([{nodedown, NA}, {nodeup, NA}], EventsB),
    {ok, EchoMs} = Echo,
    {comment, io_lib:format("A dropped B after ~b ms (~0p); B's reason ~0p; first send "
                            "after SIGCONT answered in ~b ms",
                            [DownMs, proplists:get_value(nodedown_reason, InfoA),
                             proplists:get_value(nodedown_reason, InfoB), EchoMs])}.

echo_loop() ->
    receive
        {echo, From, Term} -> From ! {echoed, Term}, echo_loop();
        stop -> ok
    end.

%%% ------------------------------------------------------------------------------------
%%% Restarts
%%% ------------------------------------------------------------------------------------

%% Shows: a node killed and restarted under the same name is a new incarnation, in two
%% rounds: (1) the restarted B connects to A at once, possibly before A has noticed
%% the old B is dead; (2) B is restarted only after A saw nodedown, and A connects.
%% Each time: a link and a monitor from A to a process of the old incarnation fire
%% with noconnection; the old pid is dead (is_process_alive on the new B is false; a
%% new monitor or link from A gives noproc or noconnection); the new incarnation has a
%% new creation and its pids work.
restart_is_new_incarnation(Config) ->
    [A, B0] = start_nodes(Config, 2),
    NB = ?P:node_of(B0),
    PortB = port(Config, 2),
    pong = ?P:call(A, net_adm, ping, [NB]),
    ok = ?P:call(A, ?P, watch_start, []),
    %% Round 1: restart at once, the new B connects to A.
    {B1, Round1} = restart_round(A, B0, PortB, restart_at_once),
    %% Round 2: wait for A's nodedown, restart, A connects.
    {_B2, Round2} = restart_round(A, B1, PortB, restart_after_nodedown),
    ct:pal("round 1: ~p~nround 2: ~p", [Round1, Round2]),
    Summary = fun(#{down_ms := D, down_reason := W, connected_ms := Up, alive := Al,
                    late_monitor := LM, late_link := LL}) ->
                      io_lib:format("old B down on A after ~b ms (~0p), new B connected after "
                                    "~b ms; old pid: is_process_alive ~0p, monitor ~0p, link ~0p",
                                    [D, W, Up, Al, LM, LL])
              end,
    {comment, ["round 1 (restart at once): ", Summary(Round1),
               "; round 2 (restart after nodedown): ", Summary(Round2)]}.

restart_round(A, BOld, PortB, Mode) ->
    NA = ?P:node_of(A),
    NB = ?P:node_of(BOld),
    CreationOld = ?P:call(BOld, erlang, system_info, [creation]),
    ok = ?P:call(A, ?P, watch_reset, []),
    %% A holder on A, linked to and monitoring a process on the old B.
    {Holder, POld} = ?P:run(A, fun() ->
                                       Parent = self(),
                                       H = spawn(fun() -> old_holder(Parent, NB) end),
                                       receive {holder_ready, H, P} -> {H, P}
                                       after 10000 -> error(holder_not_ready)
                                       end
                               end),
    ?assertEqual(NB, node(POld)),
    ok = ?P:kill(BOld),
    KilledAt = ?P:call(A, ?P, now_ms, []),
    BNew = case Mode of
               restart_at_once ->
                   B = ?P:start(PortB, []),
                   pong = ?P:call(B, net_adm, ping, [NA]),
                   B;
               restart_after_nodedown ->
                   {_, _} = ?P:await_nodedown(A, NB, KilledAt, 20000),
                   B = ?P:start(PortB, []),
                   pong = ?P:call(A, net_adm, ping, [NB]),
                   B
           end,
    ConnectedAt = ?P:call(A, ?P, now_ms, []),
    RestartMs = ConnectedAt - KilledAt,
    ok = wait_nodes(A, [NB]),
    ok = wait_nodes(BNew, [NA]),
    CreationNew = ?P:call(BNew, erlang, system_info, [creation]),
    ?assertNotEqual(CreationOld, CreationNew),
    %% The link and the monitor to the old incarnation fired.
    {LinkReason, MonReason} = ?P:run(A, fun() ->
                                                Holder ! {get, self()},
                                                receive {holder_result, Holder, R} -> R
                                                after 20000 -> {timeout, timeout}
                                                end
                                        end, 25000),
    ?assertEqual({noconnection, noconnection}, {LinkReason, MonReason}),
    {ok, {nodedown, NB, DownInfo, DownAt}} = ?P:call(A, ?P, watch_await, [nodedown, NB, 1000]),
    ?assert(DownAt =< ConnectedAt),
    DownReason = proplists:get_value(nodedown_reason, DownInfo),
    %% The old pid is dead on the new node and from A.
    Alive = ?P:run(A, fun() ->
                              try erpc:call(NB, erlang, is_process_alive, [POld])
                              catch C:E -> {C, E}
                              end
                      end),
    {LateMon, LateLink} = ?P:run(A, fun() -> late_monitor_and_link(POld) end),
    ct:pal("old pid ~p on the new incarnation: is_process_alive -> ~p, monitor -> ~p, link -> ~p",
           [POld, Alive, LateMon, LateLink]),
    ?assertEqual(false, Alive),
    ?assert(lists:member(LateMon, [noproc, noconnection])),
    ?assert(lists:member(LateLink, [noproc, noconnection])),
    %% The new incarnation's pids work.
    PNew = ?P:call(BNew, ?P, spawn_idle, []),
    ?assertNotEqual(POld, PNew),
    ?assertEqual(NB, node(PNew)),
    ?assertEqual(true, ?P:run(A, fun() -> erpc:call(NB, erlang, is_process_alive, [PNew]) end)),
    ?assertEqual(bye, ?P:run(A, fun() ->
                                        M = erlang:monitor(process, PNew),
                                        PNew ! {exit, bye},
                                        receive {'DOWN', M, process, PNew, W} -> W
                                        after 5000 -> timeout
                                        end
                                end)),
    %% A saw exactly one nodedown (the old B) and one nodeup (the new B).
    Events = [{E, N} || {E, N, _, _} <- ?P:call(A, ?P, watch_events, [])],
    ?assertEqual([{nodedown, NB}, {nodeup, NB}], Events),
    {BNew, #{down_ms => DownAt - KilledAt, down_reason => DownReason,
             connected_ms => RestartMs, alive => Alive, late_monitor => LateMon,
             late_link => LateLink, creations => {CreationOld, CreationNew}}}.

old_holder(Parent, NB) ->
    process_flag(trap_exit, true),
    P = spawn_link(NB, macula_test_peer, idle, []),
    M = erlang:monitor(process, P),
    Parent ! {holder_ready, self(), P},
    Exit = receive {'EXIT', P, R1} -> R1 after 30000 -> timeout end,
    Down = receive {'DOWN', M, process, P, R2} -> R2 after 5000 -> timeout end,
    receive {get, From} -> From ! {holder_result, self(), {Exit, Down}} end.

late_monitor_and_link(Pid) ->
    process_flag(trap_exit, true),
    M = erlang:monitor(process, Pid),
    Mon = receive {'DOWN', M, process, Pid, R1} -> R1 after 10000 -> timeout end,
    Link = try link(Pid) of
               true -> receive {'EXIT', Pid, R2} -> R2 after 10000 -> timeout end
           catch
               error:noproc -> noproc
           end,
    {Mon, Link}.

%%% ------------------------------------------------------------------------------------
%%% Ten nodes
%%% ------------------------------------------------------------------------------------

%% Shows: 10 nodes on one machine form a full mesh (from one node pinging the others:
%% global connects the rest); a global name registered on one node resolves on all; a
%% pg group with a member on each node has 10 members everywhere. kill -9 of one node:
%% each of the other 9 sees exactly one nodedown (for it, within 5/4 net_ticktime +
%% 0.5 s) and nothing else, and stays healthy (8 others in nodes(), the global name, 9
%% pg members, erpc to the next node). The node restarted under the same name rejoins:
%% the mesh is complete again, each of the 9 saw one nodeup, the group has 10 members.
ten_node_mesh(Config) ->
    PgArgs = ["-kernel", "start_pg", "true"],
    Nodes = ?P:parallel([fun() -> ?P:start(port(Config, K), PgArgs) end || K <- lists:seq(1, 10)]),
    Names = [?P:node_of(N) || N <- Nodes],
    [N1 | _] = Nodes,
    [pong = ?P:call(N1, net_adm, ping, [Other]) || Other <- tl(Names)],
    T0 = erlang:monotonic_time(millisecond),
    [ok = wait_nodes(N, Names -- [?P:node_of(N)], 30000) || N <- Nodes],
    [ok = ?P:call(N, global, sync, []) || N <- Nodes],
    MeshMs = erlang:monotonic_time(millisecond) - T0,
    %% global: a name on node 3.
    N3 = lists:nth(3, Nodes),
    Name = macula_test_mesh_name,
    GPid = ?P:run(N3, fun() ->
                              P = ?P:spawn_idle(),
                              yes = global:register_name(Name, P),
                              P
                      end),
    [?assertEqual({?P:node_of(N), ok},
                  {?P:node_of(N), ?P:run(N, fun() -> ?P:wait_until(fun() -> global:whereis_name(Name) =:= GPid end, 10000) end)})
     || N <- Nodes],
    %% pg: one member per node.
    Group = macula_test_mesh_group,
    Join = fun() ->
                   M = ?P:spawn_idle(),
                   ok = pg:join(Group, M),
                   M
           end,
    Members = [?P:run(N, Join) || N <- Nodes],
    ok = wait_members(Nodes, Group, lists:sort(Members)),
    %% kill -9 node 5.
    Victim = lists:nth(5, Nodes),
    NV = ?P:node_of(Victim),
    Survivors = Nodes -- [Victim],
    [ok = ?P:call(N, ?P, watch_start, []) || N <- Survivors],
    T0s = [?P:call(N, ?P, now_ms, []) || N <- Survivors],
    ok = ?P:kill(Victim),
    Downs = ?P:parallel([fun() -> ?P:await_nodedown(N, NV, T, 20000) end
                      || {N, T} <- lists:zip(Survivors, T0s)]),
    ct:pal("nodedown of ~p on the 9 others (ms, reason): ~p", [NV, Downs]),
    MaxDown = lists:max([Ms || {Ms, _} <- Downs]),
    ?assert(MaxDown =< max_detect_ms(?TICKTIME_MS)),
    %% Healthy, and nothing else happened.
    timer:sleep(1000),
    SurvivorNames = Names -- [NV],
    [begin
         ?assertEqual({?P:node_of(N), [{nodedown, NV}]},
                      {?P:node_of(N), [{E, X} || {E, X, _, _} <- ?P:call(N, ?P, watch_events, [])]}),
         ok = wait_nodes(N, SurvivorNames -- [?P:node_of(N)], 5000)
     end || N <- Survivors],
    [?assertEqual(GPid, ?P:call(N, global, whereis_name, [Name])) || N <- Survivors],
    MembersWithout = lists:sort(Members -- [lists:nth(5, Members)]),
    ok = wait_members(Survivors, Group, MembersWithout),
    Ring = lists:zip(Survivors, tl(SurvivorNames) ++ [hd(SurvivorNames)]),
    [?assertEqual(Next, ?P:run(N, fun() -> erpc:call(Next, erlang, node, []) end)) || {N, Next} <- Ring],
    %% Restart it; it rejoins.
    [ok = ?P:call(N, ?P, watch_reset, []) || N <- Survivors],
    Restarted = ?P:start(port(Config, 5), PgArgs),
    T1 = erlang:monotonic_time(millisecond),
    pong = ?P:call(Restarted, net_adm, ping, [?P:node_of(N1)]),
    All = [case N of Victim -> Restarted; _ -> N end || N <- Nodes],
    [ok = wait_nodes(N, Names -- [?P:node_of(N)], 30000) || N <- All],
    [ok = ?P:call(N, global, sync, []) || N <- All],
    RejoinMs = erlang:monotonic_time(millisecond) - T1,
    ?assertEqual(GPid, ?P:call(Restarted, global, whereis_name, [Name])),
    NewMember = ?P:run(Restarted, Join),
    ok = wait_members(All, Group, lists:sort([NewMember | MembersWithout])),
    [?assertEqual({?P:node_of(N), [{nodeup, NV}]},
                  {?P:node_of(N), [{E, X} || {E, X, _, _} <- ?P:call(N, ?P, watch_events, [])]})
     || N <- Survivors],
    {comment, io_lib:format("mesh of 10 in ~b ms; kill -9: nodedown on all 9 within ~b ms; "
                            "restarted node back in a full mesh in ~b ms",
                            [MeshMs, MaxDown, RejoinMs])}.

wait_members(Nodes, Group, Sorted) ->
    Bad = [{?P:node_of(N), lists:sort(?P:call(N, pg, get_members, [Group]))}
           || N <- Nodes,
              ok =/= ?P:run(N, fun() ->
                                       ?P:wait_until(fun() -> lists:sort(pg:get_members(Group)) =:= Sorted end, 10000)
                               end, 15000)],
    case Bad of
        [] -> ok;
        _ -> {pg_members_differ, {expected, Sorted}, Bad}
    end.

%%% ------------------------------------------------------------------------------------
%%% Mnesia
%%% ------------------------------------------------------------------------------------

%% Shows: a disc_copies table on 3 nodes (a mnesia directory each); 100 records written
%% on A (sync_transaction: returns once every running replica has committed) are read
%% on B and C; after kill -9 of C, 100 more are written on B; C restarted
%% under the same name on the same directory loads the table and reads all 200; a
%% record C then writes is read on A.
mnesia_catch_up(Config) ->
    Priv = ?config(priv_dir, Config),
    Dirs = [filename:join([Priv, "mnesia", integer_to_list(port(Config, K))]) || K <- [1, 2, 3]],
    [ok = filelib:ensure_dir(filename:join(D, "x")) || D <- Dirs],
    Args = fun(Dir) -> ["-mnesia", "dir", "\"" ++ Dir ++ "\""] end,
    [A, B, C] = Nodes = ?P:parallel([fun() -> ?P:start(port(Config, K), Args(D)) end
                                  || {K, D} <- lists:zip([1, 2, 3], Dirs)]),
    [NA, NB, NC] = Names = [?P:node_of(N) || N <- Nodes],
    pong = ?P:call(A, net_adm, ping, [NB]),
    pong = ?P:call(A, net_adm, ping, [NC]),
    [ok = wait_nodes(N, Names -- [?P:node_of(N)], 10000) || N <- Nodes],
    ok = ?P:call(A, mnesia, create_schema, [Names]),
    [ok = ?P:call(N, mnesia, start, []) || N <- Nodes],
    Tab = macula_test_tab,
    {atomic, ok} = ?P:call(A, mnesia, create_table,
                           [Tab, [{disc_copies, Names}, {attributes, [key, value]}]]),
    [ok = ?P:call(N, mnesia, wait_for_tables, [[Tab], 20000]) || N <- Nodes],
    ok = write_records(A, Tab, 1, 100),
    [?assertEqual({?P:node_of(N), 100}, {?P:node_of(N), count_records(N, Tab, 1, 100)}) || N <- [B, C]],
    %% kill -9 C; the survivors go on writing.
    ok = ?P:kill(C),
    ok = ?P:wait_until(fun() -> not lists:member(NC, ?P:call(A, mnesia, system_info, [running_db_nodes])) end, 15000),
    ok = write_records(B, Tab, 101, 200),
    ?assertEqual(200, count_records(A, Tab, 1, 200)),
    %% C again, same name, same directory.
    C2 = ?P:start(port(Config, 3), Args(lists:nth(3, Dirs))),
    T0 = erlang:monotonic_time(millisecond),
    pong = ?P:call(C2, net_adm, ping, [NA]),
    ok = ?P:call(C2, mnesia, start, []),
    ok = ?P:call(C2, mnesia, wait_for_tables, [[Tab], 30000], 35000),
    CatchUpMs = erlang:monotonic_time(millisecond) - T0,
    ?assertEqual(200, count_records(C2, Tab, 1, 200)),
    ?assertEqual(lists:sort(Names), lists:sort(?P:call(C2, mnesia, system_info, [running_db_nodes]))),
    ?assert(lists:member(NC, ?P:call(A, mnesia, table_info, [Tab, disc_copies]))),
    ok = write_records(C2, Tab, 201, 201),
    ?assertEqual(201, count_records(A, Tab, 1, 201)),
    ?assertEqual(201, count_records(B, Tab, 1, 201)),
    [catch ?P:call(N, mnesia, stop, []) || N <- [A, B, C2]],
    {comment, io_lib:format("restarted node had the table, with the 100 records written "
                            "while it was down, ~b ms after it was started", [CatchUpMs])}.

write_records(TNode, Tab, From, To) ->
    ?P:run(TNode, fun() ->
                          {atomic, ok} = mnesia:sync_transaction(
                                           fun() ->
                                                   [mnesia:write({Tab, K, {value, K}}) || K <- lists:seq(From, To)],
                                                   ok
                                           end),
                          ok
                  end).

%% How many of the keys From..To this node reads from its own copy, with the right value.
count_records(TNode, Tab, From, To) ->
    ?P:run(TNode, fun() ->
                          length([K || K <- lists:seq(From, To),
                                       mnesia:dirty_read(Tab, K) =:= [{Tab, K, {value, K}}]])
                  end).

%%% ------------------------------------------------------------------------------------
%%% net_ticktime changed at run time
%%% ------------------------------------------------------------------------------------

%% Shows: net_kernel:set_net_ticktime(8) on three nodes (from 4): the connections stay
%% up through 10 s of idleness, and a node killed then is detected by the others within
%% 5/4 of the new value + 0.5 s (10.5 s).
ticktime_change_kill_detected(Config) ->
    [A, B, C] = Nodes = start_nodes(Config, 3),
    Names = [NA, NB, NC] = [?P:node_of(N) || N <- Nodes],
    pong = ?P:call(A, net_adm, ping, [NB]),
    pong = ?P:call(A, net_adm, ping, [NC]),
    [ok = wait_nodes(N, Names -- [?P:node_of(N)], 10000) || N <- Nodes],
    [ok = ?P:call(N, ?P, watch_start, []) || N <- Nodes],
    [?assertEqual(change_initiated, ?P:call(N, net_kernel, set_net_ticktime, [8])) || N <- Nodes],
    [?assertMatch({ongoing_change_to, 8}, ?P:call(N, net_kernel, get_net_ticktime, [])) || N <- Nodes],
    %% Idle: only ticks keep the connections alive.
    timer:sleep(10000),
    [?assertEqual({?P:node_of(N), []}, {?P:node_of(N), ?P:call(N, ?P, watch_events, [])}) || N <- Nodes],
    [ok = wait_nodes(N, Names -- [?P:node_of(N)], 1000) || N <- Nodes],
    ?assertEqual(NC, ?P:run(A, fun() -> erpc:call(NC, erlang, node, []) end)),
    %% Now kill C.
    T0s = [?P:call(N, ?P, now_ms, []) || N <- [A, B]],
    ok = ?P:kill(C),
    Downs = ?P:parallel([fun() -> ?P:await_nodedown(N, NC, T, 30000) end || {N, T} <- lists:zip([A, B], T0s)]),
    ct:pal("after set_net_ticktime(8): kill -9 of C detected (ms, reason): ~p", [Downs]),
    Max = lists:max([Ms || {Ms, _} <- Downs]),
    ?assert(Max =< max_detect_ms(8000)),
    ?assertEqual([NB], ?P:call(A, erlang, nodes, [])),
    ?assertEqual([NA], ?P:call(B, erlang, nodes, [])),
    {comment, io_lib:format("ticktime 4 -> 8 s: connections stayed up; kill -9 detected "
                            "after ~0p ms (limit ~b)", [[Ms || {Ms, _} <- Downs], max_detect_ms(8000)])}.

%% Shows: after net_kernel:set_net_ticktime(12) on both nodes (from 4), a peer frozen
%% (SIGSTOP) for 6 s, longer than the old ticktime but well under the 9 s after which
%% OTP may declare a node down with ticktime 12, is not dropped: no nodedown on either
%% side after SIGCONT, and erpc works both ways.
ticktime_change_tolerates_longer_silence(Config) ->
    [A, B] = start_nodes(Config, 2),
    {NA, NB} = {?P:node_of(A), ?P:node_of(B)},
    pong = ?P:call(A, net_adm, ping, [NB]),
    ok = wait_nodes(B, [NA]),
    [?assertEqual(change_initiated, ?P:call(N, net_kernel, set_net_ticktime, [12])) || N <- [A, B]],
    ok = ?P:call(A, ?P, watch_start, []),
    ok = ?P:call(B, ?P, watch_start, []),
    %% A few new tick intervals (3 s) first.
    timer:sleep(4000),
    ok = ?P:signal(B, "STOP"),
    timer:sleep(6000),
    ok = ?P:signal(B, "CONT"),
    %% Give both sides time to notice anything (B's timers run late after SIGCONT).
    timer:sleep(3000),
    EventsA = ?P:call(A, ?P, watch_events, []),
    EventsB = ?P:call(B, ?P, watch_events, []),
    ct:pal("after a 6 s freeze with ticktime 12: events on A ~p~non B ~p", [EventsA, EventsB]),
    ?assertEqual({[], []}, {EventsA, EventsB}),
    ?assertEqual([NB], ?P:call(A, erlang, nodes, [])),
    ?assertEqual(NB, ?P:run(A, fun() -> erpc:call(NB, erlang, node, []) end)),
    ?assertEqual(NA, ?P:run(B, fun() -> erpc:call(NA, erlang, node, []) end)),
    ok.

%% Shows: nodes booted with net_ticktime 2, then set to 20 at run time
%% (net_kernel:set_net_ticktime(20), within OTP's range of 1..2^32 s and the kind of
%% change an operator makes to ride out a slow network): a peer frozen for 11.5 s,
%% well under the 15 s after which OTP may declare a node down with ticktime 20, is
%% not dropped. (A limit tied to the boot-time value, such as a QUIC idle timeout of
%% 4 x 2 s, would drop it after 8 s.)
ticktime_raised_tenfold_tolerates_silence(Config) ->
    [A, B] = ?P:parallel([fun() -> ?P:start(port(Config, K), ["-kernel", "net_ticktime", "2"]) end
                       || K <- [1, 2]]),
    {NA, NB} = {?P:node_of(A), ?P:node_of(B)},
    ?assertEqual(2, ?P:call(A, net_kernel, get_net_ticktime, [])),
    pong = ?P:call(A, net_adm, ping, [NB]),
    ok = wait_nodes(B, [NA]),
    [?assertEqual(change_initiated, ?P:call(N, net_kernel, set_net_ticktime, [20])) || N <- [A, B]],
    ok = ?P:call(A, ?P, watch_start, []),
    ok = ?P:call(B, ?P, watch_start, []),
    timer:sleep(1000),
    T0 = ?P:call(A, ?P, now_ms, []),
    ok = ?P:signal(B, "STOP"),
    timer:sleep(11500),
    ok = ?P:signal(B, "CONT"),
    timer:sleep(2000),
    EventsA = ?P:call(A, ?P, watch_events, []),
    EventsB = ?P:call(B, ?P, watch_events, []),
    ct:pal("ticktime 2 -> 20, B frozen 11.5 s: events on A (ms since the freeze) ~p~non B ~p",
           [[{E, N, I, T - T0} || {E, N, I, T} <- EventsA], EventsB]),
    ?assertEqual({[], []}, {EventsA, EventsB}),
    ?assertEqual([NB], ?P:call(A, erlang, nodes, [])),
    ?assertEqual(NB, ?P:run(A, fun() -> erpc:call(NB, erlang, node, []) end)),
    ok.

%%% ------------------------------------------------------------------------------------
%%% Helpers
%%% ------------------------------------------------------------------------------------

%% The K-th UDP port of this case's block.
port(Config, K) when K >= 1, K < ?BLOCK ->
    ?config(base_port, Config) + K.

start_nodes(Config, N) ->
    ?P:parallel([fun() -> ?P:start(port(Config, K), []) end || K <- lists:seq(1, N)]).

wait_nodes(TNode, Expected) ->
    wait_nodes(TNode, Expected, 5000).

%% Waits until erlang:nodes() on TNode is exactly Expected (any order).
wait_nodes(TNode, Expected, Timeout) ->
    Want = lists:sort(Expected),
    case ?P:wait_until(fun() -> lists:sort(?P:call(TNode, erlang, nodes, [])) =:= Want end, Timeout) of
        ok -> ok;
        timeout -> {nodes_not, Want, on, ?P:node_of(TNode), but, ?P:call(TNode, erlang, nodes, [])}
    end.

