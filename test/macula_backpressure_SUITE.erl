%%% @doc Memory is bounded, end to end: backpressure of the macula carrier between
%%% real, separate BEAM nodes (issue 4).
%%%
%%% As in macula_dist_SUITE, this test node is NOT distributed: every case starts its
%%% own OS-level nodes `Port@127.0.0.1' with OTP 25 `peer' over a TCP control connection
%%% (macula_test_peer) and stops them after the case whatever happened (macula_ct_hook). Each case
%%% has its own block of 10 UDP ports.
%%%
%%% The load: node A runs ?SENDERS sender processes, each sending fresh 64 KiB binaries
%%% `{seq, Sender, Id, I, <<Id:32, I:64, ...>>}' with plain `!' in a tight loop to one
%%% receiver process on node B, which checks the sequence numbers per sender (no
%%% selective receive, so a loss, duplicate or reordering shows) and the binary's
%%% header and size. What the senders report as sent is compared with what arrived.
%%%
%%% Cases:
%%% <ul>
%%% <li>`frozen_receiver': B's OS process is stopped with SIGSTOP for
%%%     MACULA_BP_FREEZE_SECONDS (default 30) while A sends as fast as it can. A's RSS
%%%     (VmRSS, sampled by this test node every 500 ms) may grow at most 64 MiB while B
%%%     is frozen, over its last value before (its value when idle is reported too:
%%%     fast traffic alone takes A's RSS some 30-80 MiB over idle); A's senders must be suspended by busy distribution (a
%%%     `[nosuspend]' probe gets `nosuspend', the senders' status is `suspended', they
%%%     make no progress); busy_dist_port system monitor events on A are recorded. Both
%%%     nodes run with net_ticktime 120, and no nodedown may happen. After SIGCONT every
%%%     message arrives, in order. How long the senders take to get back to a quarter
%%%     of their earlier rate is measured and reported, not asserted (QUIC's RTT
%%%     estimate takes the freeze in: see the case's log).</li>
%%% <li>`slow_receiver': B's receiving process sleeps 1 ms per message; A's senders
%%%     use a window (the receiver acks every ?ACK_EVERY messages) so the receiver's
%%%     own mailbox stays bounded (an application mailbox is Erlang's business, not the
%%%     carrier's). The connection's processes (controller, input handler, owner) on
%%%     both nodes must keep message queues of at most ?QUEUE_LIMIT for 10 s, and every
%%%     message arrives in order. The `[nosuspend]' probe is recorded, not asserted:
%%%     with windowed senders nothing piles up in the carrier, so A is not busy.</li>
%%% <li>`stalled_input_handler': B's input handler (the carrier's only caller of
%%%     dist_ctrl_put_data) is suspended for 8 s while A sends as fast as it can: the NIF
%%%     may then deliver only `delivery_credit' (8) messages to it, QUIC flow control
%%%     must stop A, and A's senders must be suspended by busy distribution; while
%%%     stalled A's RSS may grow at most 64 MiB and B's at most 32 MiB; no
%%%     nodedown (net_ticktime 120, see the case); after it resumes every message
%%%     arrives, in order.
%%%     This is the case where the carrier's receive-side backpressure is what stops
%%%     the sender: a slow application process (slow_receiver) does not slow the input
%%%     handler, whose dist_ctrl_put_data enqueues into the receiver's mailbox at once.</li>
%%% </ul>
-module(macula_backpressure_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([suite/0, all/0, end_per_testcase/2]).
-export([frozen_receiver/1, slow_receiver/1, stalled_input_handler/1]).

-define(P, macula_test_peer).
-define(PORT_RANGE, {20000, 29799}).

%% The load.
-define(SENDERS, 4).
-define(MSG_SIZE, 65536).
%% Growth of the sender's RSS while the receiver is frozen or stalled, over its value
%% right before, that the cases accept.
-define(RSS_LIMIT_KIB, 65536).
%% stalled_input_handler: the same for B while its input handler is stalled (QUIC may
%% buffer a stream window, 8 MiB, and the NIF a pending delivery for it).
-define(STALL_GROWTH_LIMIT_KIB, 32768).
%% Largest message queue accepted for the controller and the owner.
-define(QUEUE_LIMIT, 16).
%% The input handler holds at most 16 batches from each credit pool (normal, priority).
-define(INPUT_QUEUE_LIMIT, 32).
%% Bytes of delivered batches the input handler may hold (delivery_window, 2 MiB by
%% default, plus the priority stream's 256 KiB).
-define(DELIVERY_WINDOW, (2 bsl 20 + 256 bsl 10)).
%% slow_receiver: the receiver acks every ?ACK_EVERY messages; a sender keeps at most
%% ?WINDOW messages unacknowledged.
-define(ACK_EVERY, 8).
-define(WINDOW, 32).

%% Registered names on the nodes.
-define(LOAD, macula_bp_load).
-define(RECEIVER, macula_bp_receiver).
-define(PROBE, macula_bp_probe).
-define(BUSYMON, macula_bp_busymon).
-define(QSAMPLER, macula_bp_qsampler).
-define(STALLER, macula_bp_staller).

suite() ->
    [{timetrap, {seconds, 120}},
     {ct_hooks, [{macula_ct_hook, #{ports_per_case => 10, port_range => ?PORT_RANGE}}]}].

all() ->
    [frozen_receiver, slow_receiver, stalled_input_handler].

%% A node left frozen by a failed case is woken first, so that macula_ct_hook can stop
%% it normally.
end_per_testcase(_Case, _Config) ->
    case persistent_term:get({?MODULE, frozen}, undefined) of
        undefined -> ok;
        OsPid -> sigcont(OsPid), persistent_term:erase({?MODULE, frozen})
    end.

%%% ------------------------------------------------------------------------------------
%%% Cases
%%% ------------------------------------------------------------------------------------

%% Shows: with the receiving node frozen (SIGSTOP) for 30 s while four processes send
%% 64 KiB messages as fast as they can, the sending node's memory stays bounded, its
%% senders are suspended by busy distribution, no nodedown happens, and after SIGCONT
%% every message arrives, in order. Also measured, not asserted: how long after SIGCONT
%% the senders are back to a quarter of their earlier rate (with a 30 s freeze this has
%% taken from 0.6 s to over 60 s, while QUIC's smoothed RTT on A, fed by
%% acknowledgements of packets that waited in frozen B's socket buffer, came down from
%% 10-17 s; the log shows rtt_us and cwnd every time they change).
frozen_receiver(Config) ->
    FreezeS = freeze_seconds(),
    %% Generous: after SIGCONT the senders have been seen to stand still for 60 s.
    ct:timetrap({seconds, FreezeS + 300}),
    #{a := A, b := B, nb := NB, procs_a := ProcsA, receiver := Receiver, t0 := T0} = Rig =
        start_rig(Config, ["-kernel", "net_ticktime", "120"], #{delay_ms => 0, ack_every => 0},
                  #{busymon => true, rss => [a]}),
    [?assertEqual(120, ?P:call(N, net_kernel, get_net_ticktime, [])) || N <- [A, B]],
    timer:sleep(1500),
    %% Load.
    probe_phase(A, flowing),
    ok = ?P:run(A, fun() -> start_load(Receiver, ?SENDERS, infinity) end),
    TLoad = now_ms(),
    timer:sleep(2000),
    FlowCounts = load_counts(A),
    %% Freeze B.
    OsPidB = ?P:os_pid(B),
    persistent_term:put({?MODULE, frozen}, OsPidB),
    InfoBefore = quic_info(A, NB),
    TFreeze = now_ms(),
    sigstop(OsPidB),
    ok = ?P:wait_until(fun() -> os_state(OsPidB) =:= $T end, 2000),
    %% Let A fill whatever buffers it has, then look.
    Settle = min(5000, FreezeS * 1000 div 3),
    timer:sleep(Settle),
    probe_phase(A, frozen),
    CountsSettled = load_counts(A),
    Statuses = load_statuses(A),
    timer:sleep(max(0, TFreeze + FreezeS * 1000 - now_ms())),
    CountsEnd = load_counts(A),
    InfoFrozen = quic_info(A, NB),
    probe_phase(A, thawed),
    StateWhileFrozen = os_state(OsPidB),
    TThaw = now_ms(),
    sigcont(OsPidB),
    persistent_term:erase({?MODULE, frozen}),
    %% How long until the senders are back to a quarter of their rate before the freeze
    %% (measured over 500 ms windows).
    FlowRate = total(FlowCounts) * 500 div max(1, TFreeze - TLoad),
    Recovery = await_rate(A, NB, max(1, FlowRate div 4), 120000),
    TResumed = now_ms(),
    probe_phase(A, recovered),
    %% Let it flow again, then stop the senders and wait for everything to arrive.
    timer:sleep(1000),
    #{sent := Sent, t_stop := TStop, received := Received, t_done := TDone, samples := Samples,
      probes := Probes, busy_events := BusyEvents, queues_a := QueuesA, queues_b := QueuesB,
      events_a := EventsA, events_b := EventsB} = finish_rig(Rig, 60000),
    CtrlAfter = conn_ctrl(A, NB),
    %% The numbers.
    Idle = rss_max(Samples, a, T0, TLoad),
    Flowing = rss_max(Samples, a, TLoad, TFreeze),
    AtFreeze = rss_last(Samples, a, TLoad, TFreeze),
    Frozen = rss_max(Samples, a, TFreeze, TThaw),
    FrozenLast = rss_last(Samples, a, TFreeze, TThaw),
    AfterFreeze = rss_max(Samples, a, TThaw, TDone),
    %% What the freeze adds: the most while frozen over the last sample before it.
    Growth = Frozen - AtFreeze,
    Progress = [{Id, C2 - C1} || {{Id, C1}, {Id, C2}} <- lists:zip(CountsSettled, CountsEnd)],
    ct:pal("frozen_receiver: B frozen ~b s~n"
           "A's RSS (KiB): idle max ~b, flowing max ~b, when the freeze began ~b, frozen max ~b"
           " (last ~b), after max ~b;~n"
           "  growth while frozen ~b KiB (limit ~b); frozen max over idle ~b KiB~n"
           "RSS samples (ms since start, KiB): ~w~n"
           "sent by sender after 2 s of flow: ~w~n"
           "sent when settled (~b ms into the freeze): ~w~n"
           "sent at the end of the freeze: ~w (progress while frozen: ~w)~n"
           "senders' status while frozen: ~w~n"
           "sent in all: ~w~nreceived: ~p~n"
           "B's state while frozen: ~c~n"
           "messages per 500 ms before the freeze: ~b~n"
           "after SIGCONT (ms after SIGCONT, messages in the last 500 ms, QUIC rtt_us, cwnd, lost): ~p~n"
           "QUIC on A before the freeze: ~p~nat the end of the freeze: ~p~n"
           "probe results by phase: ~p~n"
           "busy_dist_port events on A: ~p~n"
           "message queues on A: ~p~nmessage queues on B: ~p~n"
           "node events on A: ~p~nnode events on B: ~p~n"
           "drain after SIGCONT + stop: ~b ms",
           [FreezeS, Idle, Flowing, AtFreeze, Frozen, FrozenLast, AfterFreeze, Growth, ?RSS_LIMIT_KIB,
            Frozen - Idle,
            [{T - T0, K} || {T, [{a, K}]} <- Samples],
            FlowCounts, Settle, CountsSettled, CountsEnd, Progress, Statuses, Sent, Received,
            StateWhileFrozen, FlowRate, Recovery, InfoBefore, InfoFrozen, Probes, BusyEvents,
            QueuesA, QueuesB, EventsA, EventsB,
            TDone - TStop]),
    %% Memory.
    ?assert(Growth =< ?RSS_LIMIT_KIB, {rss_growth_kib, Growth, limit, ?RSS_LIMIT_KIB}),
    %% Suspension by busy distribution.
    ?assertEqual($T, StateWhileFrozen),
    FrozenProbes = maps:get(frozen, Probes, #{}),
    ?assert(maps:get(nosuspend, FrozenProbes, 0) > 0, {probes_while_frozen, FrozenProbes}),
    ?assertEqual(0, maps:get(ok, FrozenProbes, 0), {probes_while_frozen, FrozenProbes}),
    ?assertEqual([{Id, suspended} || Id <- lists:seq(1, ?SENDERS)], Statuses),
    ?assertEqual([{Id, 0} || Id <- lists:seq(1, ?SENDERS)], Progress),
    %% Connection processes' queues.
    assert_queues(QueuesA),
    assert_queues(QueuesB),
    %% No nodedown, same connection.
    ?assertEqual([], [E || {nodedown, _, _, _} = E <- EventsA ++ EventsB]),
    ?assertEqual(maps:get(ctrl, ProcsA), CtrlAfter),
    ?assertEqual([NB], ?P:call(A, erlang, nodes, [])),
    %% Every message, in order.
    assert_received(Sent, Received),
    {comment, format("frozen ~b s; RSS of A: idle ~b MiB, flowing max ~b MiB, frozen max ~b MiB,"
                     " growth while frozen ~.1f MiB;"
                     " ~b msgs (~b MiB) sent, all received in order; ~b busy_dist_port events;"
                     " ~s ~b ms after SIGCONT",
                     [FreezeS, Idle div 1024, Flowing div 1024, Frozen div 1024, Growth / 1024,
                      total(Sent), total(Sent) * ?MSG_SIZE div (1 bsl 20),
                      maps:get(count, BusyEvents),
                      case element(1, Recovery) of
                          recovered -> "back to 1/4 of the rate";
                          not_recovered -> "NOT back to 1/4 of the rate"
                      end, TResumed - TThaw])}.

%% Shows: with a receiving process that sleeps 1 ms per message (and senders that keep
%% a window, so its own mailbox stays bounded), the message queues of the connection's
%% processes stay small on both nodes for 10 s of sending, and every message arrives
%% in order.
slow_receiver(Config) ->
    #{a := A, receiver := Receiver, t0 := T0} = Rig =
        start_rig(Config, [], #{delay_ms => 1, ack_every => ?ACK_EVERY}, #{rss => [a, b]}),
    timer:sleep(1000),
    probe_phase(A, sending),
    TLoad = now_ms(),
    ok = ?P:run(A, fun() -> start_load(Receiver, ?SENDERS, ?WINDOW) end),
    timer:sleep(10000),
    probe_phase(A, stopped),
    #{sent := Sent, t_stop := TStop, received := Received, t_done := TDone, samples := Samples,
      probes := Probes, queues_a := QueuesA, queues_b := QueuesB,
      events_a := EventsA, events_b := EventsB} = finish_rig(Rig, 30000),
    [IdleA, IdleB] = [rss_max(Samples, N, T0, TLoad) || N <- [a, b]],
    [MaxA, MaxB] = [rss_max(Samples, N, TLoad, TDone) || N <- [a, b]],
    ct:pal("slow_receiver: 10 s of sending, receiver sleeps 1 ms per message, window ~b, ack every ~b~n"
           "sent: ~w (~.1f msgs/s)~nreceived: ~p~n"
           "message queues on A: ~p~nmessage queues on B: ~p~n"
           "probe results by phase: ~p~n"
           "RSS (KiB) A: idle ~b, max ~b; B: idle ~b, max ~b~n"
           "node events on A: ~p~nnode events on B: ~p~ndrain after stop: ~b ms",
           [?WINDOW, ?ACK_EVERY, Sent, total(Sent) * 1000 / max(1, TStop - TLoad), Received,
            QueuesA, QueuesB, Probes, IdleA, MaxA, IdleB, MaxB, EventsA, EventsB, TDone - TStop]),
    assert_queues(QueuesA),
    assert_queues(QueuesB),
    %% The application process's own mailbox: bounded by the senders' windows (plus
    %% the probe's messages), so the test itself stays bounded.
    #{max := ReceiverMax} = maps:get(receiver, QueuesB),
    ?assert(ReceiverMax =< ?SENDERS * ?WINDOW + 16, {receiver_queue_max, ReceiverMax}),
    ?assertEqual([], [E || {nodedown, _, _, _} = E <- EventsA ++ EventsB]),
    ?assert(total(Sent) > 0),
    assert_received(Sent, Received),
    {comment, format("~b msgs in 10 s; max queue on B: ctrl ~b, input ~b, owner ~b;"
                     " receiver ~b; probes ~w",
                     [total(Sent) | [maps:get(max, maps:get(K, QueuesB))
                                     || K <- [ctrl, input, owner, receiver]]]
                     ++ [maps:get(sending, Probes, #{})])}.

%% Shows: with B's input handler suspended for 8 s while A sends as fast as it can,
%% the NIF delivers at most delivery_credit messages to it, A's senders are suspended
%% by busy distribution, both nodes' RSS stays bounded, no nodedown happens, and once
%% it resumes every message arrives, in order.
%%
%% net_ticktime is 120 (MACULA_BP_STALL_TICKTIME to change it, for development): a
%% receive path that makes no progress for net_ticktime is a dead connection to
%% dist_util. B's NIF stops reading once it holds a delivery it has no credit for, so
%% B's read counter (mf_getstat) stands still, and A sends no ticks while its send
%% queue is not empty (dist_util ticks only when nothing was written and nothing is
%% pending); with net_ticktime 4 B drops the connection (net_tick_timeout) about 4.2 s
%% into the stall.
stalled_input_handler(Config) ->
    StallMs = 8000,
    TickTime = case os:getenv("MACULA_BP_STALL_TICKTIME") of
                   false -> "120";
                   "" -> "120";
                   T -> T
               end,
    #{a := A, b := B, procs_b := ProcsB, receiver := Receiver, t0 := T0} = Rig =
        start_rig(Config, ["-kernel", "net_ticktime", TickTime], #{delay_ms => 0, ack_every => 0},
                  #{busymon => true, rss => [a, b]}),
    timer:sleep(1500),
    TLoad = now_ms(),
    probe_phase(A, flowing),
    ok = ?P:run(A, fun() -> start_load(Receiver, ?SENDERS, infinity) end),
    timer:sleep(2000),
    %% Stall the input handler (the suspension lasts while the staller lives).
    Input = maps:get(input, ProcsB),
    TStall = now_ms(),
    StallAtB = ?P:run(B, fun() -> start_staller(Input) end),
    timer:sleep(3000),
    probe_phase(A, stalled),
    CountsSettled = load_counts(A),
    Statuses = load_statuses(A),
    InputQueueStalled = ?P:call(B, erlang, process_info, [Input, message_queue_len]),
    timer:sleep(max(0, TStall + StallMs - now_ms())),
    CountsEnd = load_counts(A),
    probe_phase(A, resumed),
    InputQueueEnd = ?P:call(B, erlang, process_info, [Input, message_queue_len]),
    {messages, Held} = ?P:call(B, erlang, process_info, [Input, messages]),
    HeldCredit = lists:sum([Bytes || {macula_data, {_, Bytes}, _} <- Held]),
    TResume = now_ms(),
    Resumed = ?P:run(B, fun() -> stop_staller() end),
    timer:sleep(1500),
    #{sent := Sent, t_stop := TStop, received := Received, t_done := TDone, samples := Samples,
      probes := Probes, busy_events := BusyEvents, queues_a := QueuesA, queues_b := QueuesB,
      events_a := EventsA, events_b := EventsB} = finish_rig(Rig, 60000),
    [IdleA, IdleB] = [rss_max(Samples, N, T0, TLoad) || N <- [a, b]],
    [StalledA, StalledB] = [rss_max(Samples, N, TStall, TResume) || N <- [a, b]],
    %% What the stall adds: the most while stalled over the last sample before it.
    %% (Over the idle value, RSS also holds what fast traffic leaves behind, such as the
    %% messages the application's receiver has not taken from its mailbox yet.)
    [AtStallA, AtStallB] = [rss_last(Samples, N, TLoad, TStall) || N <- [a, b]],
    [GrowthA, GrowthB] = [StalledA - AtStallA, StalledB - AtStallB],
    Progress = [{Id, C2 - C1} || {{Id, C1}, {Id, C2}} <- lists:zip(CountsSettled, CountsEnd)],
    ct:pal("stalled_input_handler: B's input handler suspended ~b ms~n"
           "RSS (KiB) A: idle ~b, when the stall began ~b, stalled max ~b (growth while stalled ~b);~n"
           "          B: idle ~b, when the stall began ~b, stalled max ~b (growth while stalled ~b)~n"
           "RSS samples (ms since start, KiB): ~w~n"
           "input handler's queue 3 s into the stall: ~w, at its end: ~w~n"
           "sent when settled: ~w, at the end of the stall: ~w (progress: ~w)~n"
           "senders' status while stalled: ~w~n"
           "sent in all: ~w~nreceived: ~p~n"
           "probe results by phase: ~p~nbusy_dist_port events on A: ~p~n"
           "message queues on A: ~p~nmessage queues on B: ~p~n"
           "node events on A: ~p~nnode events on B (ms after the stall began): ~p~n"
           "resuming the input handler: ~p~ndrain after stop: ~b ms",
           [StallMs, IdleA, AtStallA, StalledA, GrowthA, IdleB, AtStallB, StalledB, GrowthB,
            [{T - T0, K} || {T, K} <- Samples],
            InputQueueStalled, InputQueueEnd, CountsSettled, CountsEnd, Progress, Statuses,
            Sent, Received, Probes, BusyEvents, QueuesA, QueuesB, EventsA,
            [{E, N, I, Ms - StallAtB} || {E, N, I, Ms} <- EventsB], Resumed, TDone - TStop]),
    ?assertEqual([], [E || {nodedown, _, _, _} = E <- EventsA ++ EventsB]),
    ?assertEqual(ok, Resumed),
    ?assert(GrowthA =< ?RSS_LIMIT_KIB, {rss_growth_kib_a, GrowthA}),
    ?assert(GrowthB =< ?STALL_GROWTH_LIMIT_KIB, {rss_growth_kib_b, GrowthB}),
    %% The NIF delivered against credit only.
    ?assert(HeldCredit =< ?DELIVERY_WINDOW, {input_handler_holds, HeldCredit, bytes}),
    assert_queues(QueuesA),
    assert_queues(QueuesB),
    %% Backpressure reached A's senders.
    StalledProbes = maps:get(stalled, Probes, #{}),
    ?assert(maps:get(nosuspend, StalledProbes, 0) > 0, {probes_while_stalled, StalledProbes}),
    ?assertEqual(0, maps:get(ok, StalledProbes, 0), {probes_while_stalled, StalledProbes}),
    ?assertEqual([{Id, suspended} || Id <- lists:seq(1, ?SENDERS)], Statuses),
    ?assertEqual([{Id, 0} || Id <- lists:seq(1, ?SENDERS)], Progress),
    assert_received(Sent, Received),
    {comment, format("stalled ~b ms; RSS A: idle ~b MiB, stalled max ~b MiB, growth while stalled"
                     " ~.1f MiB; B: idle ~b MiB, stalled max ~b MiB, growth while stalled ~.1f MiB;"
                     " input handler holds ~b bytes; ~b msgs sent, all received in order;"
                     " ~b busy_dist_port events",
                     [StallMs, IdleA div 1024, StalledA div 1024, GrowthA / 1024,
                      IdleB div 1024, StalledB div 1024, GrowthB / 1024, HeldCredit,
                      total(Sent), maps:get(count, BusyEvents)])}.

format(Format, Args) ->
    lists:flatten(io_lib:format(Format, Args)).

%% What every case sets up: nodes A and B (with `Args') connected, node watchers on
%% both, a receiver on B (`ReceiverOpts'), on A the `[nosuspend]' probe (and the
%% busy_dist_port monitor with `busymon'), queue samplers of the connection's processes
%% on both, and an RSS sampler of the nodes in `rss' ([a] or [a, b]).
start_rig(Config, Args, ReceiverOpts, Opts) ->
    [A, B] = start_nodes(Config, 2, Args),
    {NA, NB} = {?P:node_of(A), ?P:node_of(B)},
    pong = ?P:call(A, net_adm, ping, [NB]),
    ok = ?P:wait_nodes(B, [NA]),
    ok = ?P:call(A, ?P, watch_start, []),
    ok = ?P:call(B, ?P, watch_start, []),
    ProcsA = conn_procs(A, NB),
    ProcsB = conn_procs(B, NA),
    Receiver = start_receiver(B, ReceiverOpts),
    Busymon = maps:get(busymon, Opts, false),
    case Busymon of
        true -> ok = ?P:run(A, fun() -> start_busymon() end);
        false -> ok
    end,
    ok = ?P:run(A, fun() -> start_probe(Receiver) end),
    ok = ?P:run(A, fun() -> start_qsampler(ProcsA) end),
    ok = ?P:run(B, fun() -> start_qsampler(ProcsB#{receiver => Receiver}) end),
    Rss = start_rss_sampler([{Label, ?P:os_pid(N)} || {Label, N} <- [{a, A}, {b, B}],
                                                     lists:member(Label, maps:get(rss, Opts))]),
    #{a => A, b => B, nb => NB, procs_a => ProcsA, procs_b => ProcsB, receiver => Receiver,
      busymon => Busymon, rss => Rss, t0 => now_ms()}.

%% Stops A's senders, waits up to `WaitMs' for all they sent to arrive, and collects
%% what the rig recorded.
finish_rig(#{a := A, b := B, busymon := Busymon, rss := Rss}, WaitMs) ->
    Sent = stop_load(A),
    TStop = now_ms(),
    Received = await_received(B, Sent, WaitMs),
    TDone = now_ms(),
    Report = #{sent => Sent, t_stop => TStop, received => Received, t_done => TDone,
               samples => stop_rss_sampler(Rss), probes => probe_report(A)},
    Busy = case Busymon of
               true -> Report#{busy_events => busymon_report(A)};
               false -> Report
           end,
    Busy#{queues_a => qsampler_report(A), queues_b => qsampler_report(B),
          events_a => ?P:call(A, ?P, watch_events, []),
          events_b => ?P:call(B, ?P, watch_events, [])}.

%%% ------------------------------------------------------------------------------------
%%% Checks
%%% ------------------------------------------------------------------------------------

%% The connection's processes only (not the application's receiver).
assert_queues(Queues) ->
    Limit = fun(input) -> ?INPUT_QUEUE_LIMIT; (_) -> ?QUEUE_LIMIT end,
    Over = [{Name, Q} || {Name, #{max := Max} = Q} <- maps:to_list(maps:with([ctrl, input, owner], Queues)),
                         Max > Limit(Name)],
    ?assertEqual([], Over, {queue_limits, ?QUEUE_LIMIT, input, ?INPUT_QUEUE_LIMIT}).

%% Per sender: as many received as sent, the next expected number right after the
%% last sent one, and no sequence error.
assert_received(Sent, #{senders := PerSender, errors := Errors, error_count := ErrorCount}) ->
    Missing = [{Id, {sent, N}, {received, maps:get(count, maps:get(Id, PerSender, #{}), 0)},
               {next_expected, maps:get(next, maps:get(Id, PerSender, #{}), 1)}}
               || {Id, N} <- Sent,
                  maps:get(count, maps:get(Id, PerSender, #{}), 0) =/= N
                      orelse maps:get(next, maps:get(Id, PerSender, #{}), 1) =/= N + 1],
    ?assertEqual({0, [], []}, {ErrorCount, Errors, Missing}).

total(Counts) ->
    lists:sum([N || {_, N} <- Counts]).

%%% ------------------------------------------------------------------------------------
%%% Test-node side: nodes, signals, RSS
%%% ------------------------------------------------------------------------------------

freeze_seconds() ->
    case os:getenv("MACULA_BP_FREEZE_SECONDS") of
        false -> 30;
        "" -> 30;
        Text -> list_to_integer(Text)
    end.

sigstop(OsPid) -> kill_signal("STOP", OsPid).
sigcont(OsPid) -> kill_signal("CONT", OsPid).

kill_signal(Sig, OsPid) ->
    Out = os:cmd("kill -" ++ Sig ++ " " ++ integer_to_list(OsPid) ++ " 2>&1"),
    ct:log("kill -~s ~b: ~tp", [Sig, OsPid, Out]),
    ok.

%% The state letter of an OS process ($T when stopped), or none.
os_state(OsPid) ->
    case file:read_file("/proc/" ++ integer_to_list(OsPid) ++ "/stat") of
        {ok, Stat} ->
            [_, After] = string:split(Stat, ")", trailing),
            <<State, _/binary>> = string:trim(After, leading),
            State;
        {error, _} ->
            none
    end.

rss_kib(OsPid) ->
    {ok, Status} = file:read_file("/proc/" ++ integer_to_list(OsPid) ++ "/status"),
    {match, [Kib]} = re:run(Status, "VmRSS:\\s+(\\d+) kB", [{capture, all_but_first, list}]),
    list_to_integer(Kib).

%% Samples VmRSS of the labelled OS processes every 500 ms: [{Ms, [{Label, KiB}]}].
start_rss_sampler(Labelled) ->
    spawn_link(fun() -> rss_loop(Labelled, []) end).

rss_loop(Labelled, Acc) ->
    Sample = {now_ms(), [{L, catch rss_kib(P)} || {L, P} <- Labelled]},
    receive
        {stop, From} -> From ! {rss_samples, self(), lists:reverse([Sample | Acc])}
    after 500 ->
            rss_loop(Labelled, [Sample | Acc])
    end.

stop_rss_sampler(Pid) ->
    Pid ! {stop, self()},
    receive {rss_samples, Pid, Samples} -> Samples after 5000 -> error(rss_sampler_timeout) end.

rss_in(Samples, Label, From, To) ->
    [K || {T, Ks} <- Samples, T >= From, T =< To, {L, K} <- Ks, L =:= Label, is_integer(K)].

rss_max(Samples, Label, From, To) ->
    case rss_in(Samples, Label, From, To) of
        [] -> error({no_rss_samples, Label, From, To});
        Ks -> lists:max(Ks)
    end.

rss_last(Samples, Label, From, To) ->
    lists:last(rss_in(Samples, Label, From, To)).

now_ms() ->
    erlang:monotonic_time(millisecond).

%%% ------------------------------------------------------------------------------------
%%% Test-node side: talking to the node-side processes
%%% ------------------------------------------------------------------------------------

%% The connection's processes on TNode for its connection to Peer: the controller
%% (from erlang:system_info(dist_ctrl)), and among its links the input handler (idle
%% in macula_dist_ctrl:input_loop/2) and the owner.
conn_procs(TNode, Peer) ->
    Find = fun() ->
                   Ctrl = proplists:get_value(Peer, erlang:system_info(dist_ctrl)),
                   {links, Links} = process_info(Ctrl, links),
                   Current = [{P, process_info(P, current_function)} || P <- Links, is_pid(P)],
                   [Input] = [P || {P, {current_function, {macula_dist_ctrl, input_loop, 2}}} <- Current],
                   Kernel = whereis(net_kernel),
                   [Owner] = [P || {P, {current_function, {dist_util, _, _}}} <- Current,
                                   P =/= Kernel],
                   #{ctrl => Ctrl, input => Input, owner => Owner}
           end,
    Procs = ?P:run(TNode, fun() -> retry(Find, 50) end),
    ct:log("connection processes on ~p: ~p", [?P:node_of(TNode), Procs]),
    Procs.

conn_ctrl(TNode, Peer) ->
    ?P:run(TNode, fun() -> proplists:get_value(Peer, erlang:system_info(dist_ctrl)) end).

retry(Fun, 0) ->
    Fun();
retry(Fun, N) ->
    try Fun()
    catch _:_ -> timer:sleep(100), retry(Fun, N - 1)
    end.

start_receiver(TNode, Opts) ->
    ?P:run(TNode, fun() ->
                          Pid = spawn(fun() -> receiver_init(Opts) end),
                          true = register(?RECEIVER, Pid),
                          Pid
                  end).

%% Polls the receiver until it has as many messages as were sent (or Timeout); after
%% a nodedown messages may be lost, so it waits only briefly then.
await_received(TNode, Sent, Timeout0) ->
    Timeout = case [E || {nodedown, _, _, _} = E <- ?P:call(TNode, ?P, watch_events, [])] of
                  [] -> Timeout0;
                  _ -> 3000
              end,
    Total = total(Sent),
    Report = fun() -> ?P:run(TNode, fun() -> node_call(?RECEIVER, report) end) end,
    _ = ?P:wait_until(fun() -> maps:get(total, Report()) >= Total end, Timeout, 200),
    %% A little longer, so extra (duplicated) messages would show too.
    timer:sleep(300),
    Report().

load_counts(A) -> ?P:run(A, fun() -> node_call(?LOAD, counts) end).

%% Samples the senders' progress every 500 ms until they send at least Rate messages
%% in 500 ms, or for Timeout: {recovered | not_recovered, [{Ms, Msgs, RttUs, Cwnd, Lost}]}.
await_rate(A, Peer, Rate, Timeout) ->
    T0 = now_ms(),
    await_rate(A, Peer, Rate, T0, T0 + Timeout, total(load_counts(A)), []).

await_rate(A, Peer, Rate, T0, Deadline, Last, Trail) ->
    timer:sleep(500),
    Total = total(load_counts(A)),
    Info = quic_info(A, Peer),
    Get = fun(K) -> case Info of #{K := V} -> V; _ -> undefined end end,
    Trail1 = [{now_ms() - T0, Total - Last, Get(rtt_us), Get(congestion_window), Get(lost_packets)}
              | Trail],
    if
        Total - Last >= Rate -> {recovered, squeeze(lists:reverse(Trail1))};
        true ->
            case now_ms() >= Deadline of
                true -> {not_recovered, squeeze(lists:reverse(Trail1))};
                false -> await_rate(A, Peer, Rate, T0, Deadline, Total, Trail1)
            end
    end.

%% Keeps the first of each run of samples that differ only in time, and the last one.
squeeze([First | _] = Trail) ->
    Kept = squeeze(Trail, none),
    lists:usort([First, lists:last(Trail) | Kept]).

squeeze([{_Ms, Msgs, Rtt, Cwnd, Lost} = S | Rest], Prev) ->
    case {Msgs, Rtt, Cwnd, Lost} of
        Prev -> squeeze(Rest, Prev);
        New -> [S | squeeze(Rest, New)]
    end;
squeeze([], _) ->
    [].

%% QUIC path facts of TNode's connection to Peer.
quic_info(TNode, Peer) ->
    case ?P:call(TNode, macula_dist, connection_info, [Peer]) of
        {ok, Info} -> maps:with([rtt_us, sent_packets, lost_packets, congestion_window], Info);
        Other -> Other
    end.
load_statuses(A) -> ?P:run(A, fun() -> node_call(?LOAD, statuses) end).
stop_load(A) -> ?P:run(A, fun() -> node_call(?LOAD, stop, 115000) end, 120000).
probe_phase(A, Phase) -> ok = ?P:run(A, fun() -> node_call(?PROBE, {phase, Phase}) end).
probe_report(A) -> ?P:run(A, fun() -> node_call(?PROBE, report) end).
busymon_report(A) -> ?P:run(A, fun() -> node_call(?BUSYMON, report) end).
qsampler_report(N) -> ?P:run(N, fun() -> node_call(?QSAMPLER, report) end).

%%% ------------------------------------------------------------------------------------
%%% Node side
%%% ------------------------------------------------------------------------------------

node_call(Name, Request) ->
    node_call(Name, Request, 25000).

node_call(Name, Request, Timeout) ->
    Pid = whereis(Name),
    true = is_pid(Pid),
    Ref = erlang:monitor(process, Pid),
    Pid ! {Request, self(), Ref},
    receive
        {Ref, Reply} -> erlang:demonitor(Ref, [flush]), Reply;
        {'DOWN', Ref, process, Pid, Reason} -> error({Name, down, Reason})
    after Timeout ->
            error({Name, timeout, Request})
    end.

%% The load: ?SENDERS processes, a counter of what each has sent, a stop flag.
start_load(Receiver, N, Window) ->
    ?P:spawn_registered(
       ?LOAD,
       fun(Ready) ->
               Counts = counters:new(N, [write_concurrency]),
               Stop = atomics:new(1, []),
               Payload = binary:copy(<<"m">>, ?MSG_SIZE - 12),
               Senders = [{Id, spawn_opt(fun() -> sender(Receiver, Id, Counts, Stop, Window, Payload) end,
                                         [monitor])}
                          || Id <- lists:seq(1, N)],
               Ready(),
               load_loop(Senders, Counts, Stop)
       end).

load_loop(Senders, Counts, Stop) ->
    receive
        {counts, From, Ref} ->
            From ! {Ref, [{Id, counters:get(Counts, Id)} || {Id, _} <- Senders]},
            load_loop(Senders, Counts, Stop);
        {statuses, From, Ref} ->
            From ! {Ref, [{Id, element(2, process_info(P, status))} || {Id, {P, _}} <- Senders]},
            load_loop(Senders, Counts, Stop);
        {stop, From, Ref} ->
            atomics:put(Stop, 1, 1),
            Ends = [receive {'DOWN', M, process, P, Why} -> {Id, Why} end
                    || {Id, {P, M}} <- Senders],
            normal = lists:foldl(fun({_, normal}, Acc) -> Acc; (Bad, _) -> error({sender_died, Bad}) end,
                                 normal, Ends),
            From ! {Ref, [{Id, counters:get(Counts, Id)} || {Id, _} <- Senders]}
    end.

%% Sends fresh 64 KiB binaries numbered 1, 2, ... with plain `!' until told to stop;
%% with a Window, waits for acks to keep at most Window messages unacknowledged.
sender(To, Id, Counts, Stop, Window, Payload) ->
    sender(To, Id, Counts, Stop, Window, Payload, 1, 0).

sender(To, Id, Counts, Stop, Window, Payload, I, Acked) ->
    case atomics:get(Stop, 1) of
        1 ->
            ok;
        0 ->
            case Window =/= infinity andalso I - 1 - Acked >= Window of
                true ->
                    receive
                        {ack, Id, J} -> sender(To, Id, Counts, Stop, Window, Payload, I, max(J, Acked))
                    after 100 ->
                            sender(To, Id, Counts, Stop, Window, Payload, I, Acked)
                    end;
                false ->
                    To ! {seq, self(), Id, I, <<Id:32, I:64, Payload/binary>>},
                    counters:put(Counts, Id, I),
                    Acked1 = macula_test_traffic:drain_acks(ack, Id, Acked),
                    sender(To, Id, Counts, Stop, Window, Payload, I + 1, Acked1)
            end
    end.

%% The receiver: takes whatever comes next (no selective receive on numbers).
receiver_init(Opts) ->
    receiver_loop(Opts, #{senders => #{}, total => 0, errors => [], error_count => 0,
                          probes => 0}).

receiver_loop(#{delay_ms := Delay, ack_every := AckEvery} = Opts, St) ->
    receive
        {seq, From, Id, I, Bin} ->
            #{senders := Senders, total := Total} = St,
            #{next := Next, count := Count} = S = maps:get(Id, Senders, #{next => 1, count => 0}),
            St1 = case {I =:= Next, Bin} of
                      {true, <<Id:32, I:64, _/binary>>} when byte_size(Bin) =:= ?MSG_SIZE -> St;
                      _ -> receiver_error({Id, {expected, Next}, {got, I},
                                           {size, byte_size(Bin)}, {header, binary:part(Bin, 0, min(12, byte_size(Bin)))}},
                                          St)
                  end,
            AckEvery > 0 andalso I rem AckEvery =:= 0 andalso (From ! {ack, Id, I}),
            Delay > 0 andalso timer:sleep(Delay),
            receiver_loop(Opts, St1#{senders := Senders#{Id => S#{next := I + 1, count := Count + 1}},
                                     total := Total + 1});
        {probe, _} ->
            receiver_loop(Opts, maps:update_with(probes, fun(N) -> N + 1 end, St));
        {report, From, Ref} ->
            From ! {Ref, St},
            receiver_loop(Opts, St)
    end.

receiver_error(Error, #{errors := Errors, error_count := N} = St) ->
    St#{errors := case N < 20 of true -> Errors ++ [Error]; false -> Errors end,
        error_count := N + 1}.

%% Every 100 ms tries erlang:send(Receiver, Msg, [nosuspend]) and counts the answers
%% per phase (the phase is set by the test).
start_probe(Receiver) ->
    Pid = spawn(fun() -> probe_loop(Receiver, init, #{}) end),
    true = register(?PROBE, Pid),
    ok.

probe_loop(Receiver, Phase, Counts) ->
    receive
        {{phase, New}, From, Ref} ->
            From ! {Ref, ok},
            probe_loop(Receiver, New, Counts);
        {report, From, Ref} ->
            From ! {Ref, Counts},
            probe_loop(Receiver, Phase, Counts)
    after 100 ->
            Result = erlang:send(Receiver, {probe, Phase}, [nosuspend]),
            PhaseCounts = maps:get(Phase, Counts, #{}),
            probe_loop(Receiver, Phase,
                       Counts#{Phase => maps:update_with(Result, fun(N) -> N + 1 end, 1, PhaseCounts)})
    end.

%% Records busy_dist_port system monitor events (the count and the first 10).
start_busymon() ->
    ?P:spawn_registered(?BUSYMON,
                        fun(Ready) ->
                                erlang:system_monitor(self(), [busy_dist_port]),
                                Ready(),
                                busymon_loop(erlang:monotonic_time(millisecond), 0, [])
                        end).

busymon_loop(T0, Count, First) ->
    receive
        {monitor, Suspended, busy_dist_port, Ctrl} ->
            First1 = case Count < 10 of
                         true -> First ++ [{erlang:monotonic_time(millisecond) - T0, Suspended, Ctrl}];
                         false -> First
                     end,
            busymon_loop(T0, Count + 1, First1);
        {report, From, Ref} ->
            From ! {Ref, #{count => Count, first => First}},
            busymon_loop(T0, Count, First)
    end.

%% Samples the message queue length of the named processes every 5 ms (at high
%% priority, so a busy node still gets sampled): max, mean, samples per name.
start_qsampler(Procs) ->
    Pid = spawn(fun() ->
                        process_flag(priority, high),
                        qsampler_loop(maps:to_list(Procs), #{})
                end),
    true = register(?QSAMPLER, Pid),
    ok.

qsampler_loop(Procs, Stats) ->
    receive
        {report, From, Ref} ->
            From ! {Ref, maps:map(fun(_, #{sum := Sum, samples := N} = S) ->
                                          maps:remove(sum, S#{mean => Sum / max(1, N)})
                                  end, Stats)},
            qsampler_loop(Procs, Stats)
    after 5 ->
            Stats1 = lists:foldl(
                       fun({Name, Pid}, Acc) ->
                               case process_info(Pid, message_queue_len) of
                                   {message_queue_len, Len} ->
                                       #{max := Max, sum := Sum, samples := N} = S =
                                           maps:get(Name, Acc, #{max => 0, sum => 0, samples => 0}),
                                       Acc#{Name => S#{max := max(Max, Len), sum := Sum + Len,
                                                       samples := N + 1}};
                                   undefined ->
                                       Acc#{Name => maps:get(Name, Acc, #{max => 0, sum => 0, samples => 0})}
                               end
                       end, Stats, Procs),
            qsampler_loop(Procs, Stats1)
    end.

%% Suspends Pid until stop_staller/0 (a suspension ends when its suspender dies).
%% Returns this node's monotonic ms when Pid was suspended.
start_staller(Pid) ->
    Parent = self(),
    Staller = spawn(fun() ->
                            true = erlang:suspend_process(Pid),
                            Parent ! {self(), suspended, now_ms()},
                            receive {resume, From, Ref} ->
                                    From ! {Ref, try erlang:resume_process(Pid) of
                                                     true -> ok
                                                 catch error:badarg ->
                                                         {not_resumed, {alive, is_process_alive(Pid)}}
                                                 end}
                            end
                    end),
    receive {Staller, suspended, At} -> ok end,
    true = register(?STALLER, Staller),
    At.

stop_staller() ->
    node_call(?STALLER, resume).

%%% ------------------------------------------------------------------------------------
%%% Helpers (as in macula_dist_SUITE)
%%% ------------------------------------------------------------------------------------

port(Config, K) when K >= 1, K =< 9 ->
    ?config(base_port, Config) + K.

start_nodes(Config, N, Args) ->
    ?P:parallel([fun() -> ?P:start(port(Config, K), Args) end || K <- lists:seq(1, N)]).

