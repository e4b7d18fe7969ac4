%%% @doc Raw distribution packets through the controller's test hook (issue 11), between
%%% real, separate BEAM nodes over macula.
%%%
%%% OTP's carriers accept `{send, From, Ref, IoData}' at the controller: `IoData' goes
%%% out as one distribution packet and `From' gets `{Ref, ok}'. OTP's own suites use it
%%% to make a connection busy and to inject malformed packets. These cases do the same
%%% with their own code:
%%% <ul>
%%% <li>raw packets arrive, in order; a bad request and a stray message leave the
%%%     connection alone (the stray is logged once at debug level);</li>
%%% <li>a connection made busy through the hook while the receiving node is frozen
%%%     (SIGSTOP): the filling process is left `waiting' for its reply, a `link/1' or
%%%     `exit/2' towards the frozen node suspends the caller, and once the node thaws
%%%     the link exists and the exit kills its target, as with inet_tcp;</li>
%%% <li>each kind of malformed packet (bad control term, bad header, bad fragments, bad
%%%     external format in a message, a term whose size cannot be right, a bad atom
%%%     cache reference, a bad message left over from an earlier connection) kills only
%%%     that connection: the victim's nodedown reason is `killed' (the VM's), the
%%%     offender's `connection_closed'; a witness node stays connected to the victim,
%%%     and the offender reconnects at once.</li>
%%% </ul>
%%% Three nodes per group: victim V, offender O, witness W (`-connect_all false', so
%%% `global' does not link them up behind the cases' back). The test node itself is not
%%% distributed (macula_test_peer).
%%%
%%% The packets follow the connection's negotiated flags, given by the group: with the
%%% atom cache and fragments (group `single_stream', the default) a packet is a
%%% distribution header `131,68,0' then the control term and the message without their
%%% version bytes; without them (group `multi_stream', `data_streams' > 1, which rejects
%%% both) a packet is pass-through: `112', then each term with its version byte.
%%% Which malformed packets make sense in which mode is in docs/DEVELOPMENT.md (issue
%%% 11); in short, each mode refuses the other's format.
-module(macula_dist_data_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([suite/0, all/0, groups/0, init_per_suite/1, end_per_suite/1,
         init_per_group/2, end_per_group/2, init_per_testcase/2, end_per_testcase/2]).
-export([raw_packets/1, link_to_busy/1, exit_to_busy/1,
         bad_control/1, bad_header/1, foreign_format/1, bad_fragments/1,
         bad_message/1, bad_size/1, bad_atom_cache_ref/1, stale_connection_id/1]).
%% Run on the nodes
-export([sink/0, log/2]).

-define(P, macula_test_peer).
-define(PORT_RANGE, {30000, 39799}).

%% Operations of distribution control messages (erl_ext_dist).
-define(DOP_LINK, 1).
-define(DOP_REG_SEND, 6).
-define(DOP_SEND_SENDER, 22).

%% Registered names on the victim.
-define(SINK, macula_data_sink).
-define(SUSPENDER, macula_data_suspender).
-define(NOBODY, macula_data_nobody).

%% Ticks every 5 s: the busy cases freeze the victim for a second or two.
-define(TICKTIME, "20").
-define(BUSY_DATA_SIZE, (1024 * 1024)).

%%% ------------------------------------------------------------------------------------
%%% Common Test callbacks
%%% ------------------------------------------------------------------------------------

suite() ->
    [{timetrap, {seconds, 60}}].

all() ->
    [{group, single_stream}, {group, multi_stream}].

groups() ->
    Cases = [raw_packets, link_to_busy, exit_to_busy,
             bad_control, bad_header, foreign_format, bad_fragments,
             bad_message, bad_size, bad_atom_cache_ref, stale_connection_id],
    [{single_stream, [], Cases}, {multi_stream, [], Cases}].

init_per_suite(Config) ->
    Ebin = filename:dirname(code:which(macula_dist)),
    Nif = filename:join([filename:dirname(Ebin), "priv", "macula_dist_nif.so"]),
    filelib:is_regular(Nif) orelse ct:fail({nif_missing, Nif, "run rebar3 compile first"}),
    Snapshot = ?P:snapshot(?config(priv_dir, Config)),
    ct:pal("nodes run the copy in: ~ts", [filename:dirname(Snapshot)]),
    Config.

end_per_suite(_Config) ->
    ?P:stop_all().

%% `format': how a packet looks on this connection; `ordered': whether raw packets are
%% ordered with the VM's own packets (one data stream) or only among themselves (they
%% take a fixed stream of their own).
%% A build without the `data_streams' option has one data stream only.
init_per_group(single_stream, Config) ->
    start_group([{format, dist_header}, {ordered, true},
                 {mode_args, ["-macula_dist_opt", "data_streams", "1"]} | Config]);
init_per_group(multi_stream, Config) ->
    start_group([{format, pass_through}, {ordered, false},
                 {mode_args, ["-macula_dist_opt", "data_streams", "4"]} | Config]).

end_per_group(_Group, _Config) ->
    ?P:stop_all().

init_per_testcase(_Case, Config) ->
    [ok = ?P:call(N, ?P, watch_reset, []) || N <- [victim(Config), offender(Config), witness(Config)]],
    ok = connect_all(Config),
    Config.

%% A victim left frozen by a failed case is woken, so the next case can run.
end_per_testcase(_Case, Config) ->
    V = victim(Config),
    ?P:signal(V, "CONT"),
    case ?P:call(V, erlang, whereis, [?SUSPENDER]) of
        undefined -> ok;
        _ -> resume_sink(V)
    end.

start_group(Config) ->
    Base = ?P:port_base(3, ?PORT_RANGE),
    Args = ["-connect_all", "false", "-kernel", "net_ticktime", ?TICKTIME | ?config(mode_args, Config)],
    [V, O, W] = ?P:parallel([fun() -> ?P:start(Base + I, Args) end || I <- [0, 1, 2]]),
    [ok = ?P:call(N, ?P, watch_start, []) || N <- [V, O, W]],
    ?P:call(V, erlang, spawn, [?MODULE, sink, []]),
    ok = ?P:wait_until(fun() -> is_pid(?P:call(V, erlang, whereis, [?SINK])) end, 5000),
    [{victim, V}, {offender, O}, {witness, W} | Config].

victim(Config) -> ?config(victim, Config).
offender(Config) -> ?config(offender, Config).
witness(Config) -> ?config(witness, Config).

%% O and W connected to V (and nothing else happening).
connect_all(Config) ->
    VN = ?P:node_of(victim(Config)),
    pong = ?P:call(offender(Config), net_adm, ping, [VN]),
    pong = ?P:call(witness(Config), net_adm, ping, [VN]),
    ?P:wait_nodes(victim(Config), [?P:node_of(offender(Config)), ?P:node_of(witness(Config))]).

%%% ------------------------------------------------------------------------------------
%%% Cases: the hook itself
%%% ------------------------------------------------------------------------------------

%% Shows: 20 raw packets to a registered process on V all arrive, in order, and in
%% one-stream mode also in order with ordinary sends of the same process between them;
%% each request is answered `{Ref, ok}'. A request whose data is not iodata is answered
%% `{Ref, {error, not_iodata}}'; a stray message is logged once, at debug level, and
%% dropped; the connection survives both.
raw_packets(Config) ->
    {O, VN, Format} = {offender(Config), ?P:node_of(victim(Config)), ?config(format, Config)},
    Replies = ?P:run(O, fun() ->
                                Ctrl = ctrl_of(VN),
                                [begin
                                     R = raw_send(Ctrl, reg_send(Format, ?SINK, {raw, I})),
                                     {?SINK, VN} ! {plain, I},
                                     R
                                 end || I <- lists:seq(1, 20)]
                        end),
    ?assertEqual(lists:duplicate(20, ok), Replies),
    Got = sink_await(victim(Config), 40),
    Raw = [M || {raw, _} = M <- Got],
    ?assertEqual([{raw, I} || I <- lists:seq(1, 20)], Raw),
    ?assertEqual([{plain, I} || I <- lists:seq(1, 20)], [M || {plain, _} = M <- Got]),
    case ?config(ordered, Config) of
        true -> ?assertEqual(lists:append([[{raw, I}, {plain, I}] || I <- lists:seq(1, 20)]), Got);
        false -> ok
    end,
    %% A request that is not iodata, and a stray message.
    {BadReply, Logged, QueueLen} =
        ?P:run(O, fun() ->
                          Ctrl = ctrl_of(VN),
                          ok = capture_debug_logs(),
                          Bad = raw_send(Ctrl, {not_iodata, self()}),
                          Ctrl ! {macula_data_stray, self()},
                          Events = captured_logs(Ctrl, 1000),
                          {message_queue_len, Len} = process_info(Ctrl, message_queue_len),
                          {Bad, Events, Len}
                  end),
    ?assertEqual({error, not_iodata}, BadReply),
    ct:log("logged for the stray message: ~p", [Logged]),
    ?assertMatch([#{level := debug}], Logged),
    ?assertEqual(0, QueueLen),
    ?assertEqual(VN, ?P:call(O, erpc, call, [VN, erlang, node, []])),
    ?assertEqual([], nodedowns(victim(Config))).

%%% ------------------------------------------------------------------------------------
%%% Cases: busy connection
%%% ------------------------------------------------------------------------------------

%% Shows: with V frozen and the connection O -> V filled through the hook (the filling
%% process is left `waiting' for the reply to a packet the controller has taken, and
%% ordinary sends with `nosuspend' are refused), a process on O calling `link/1' on a process of V is suspended; once V
%% runs again the call returns, the link exists on both sides and the caller ends
%% normally. No nodedown.
link_to_busy(Config) ->
    {V, O} = {victim(Config), offender(Config)},
    Target = ?P:call(V, ?P, spawn_idle, []),
    Caller = busy_call(Config, fun() ->
                                       true = link(Target),
                                       {links, Links} = process_info(self(), links),
                                       lists:member(Target, Links)
                               end),
    ?assertEqual(ok, ?P:wait_until(fun() ->
                                           {links, Links} = ?P:call(V, erlang, process_info, [Target, links]),
                                           lists:member(Caller, Links)
                                   end, 5000)),
    ?assertEqual({normal, true}, caller_result(O, Caller)),
    ?assertEqual([], nodedowns(V)),
    ?assertEqual([], nodedowns(O)).

%% Shows: the same with `exit(Target, Reason)': the caller is suspended while the
%% connection is busy, and once V runs again the target on V dies with that reason.
exit_to_busy(Config) ->
    {V, O} = {victim(Config), offender(Config)},
    Target = ?P:call(V, ?P, spawn_idle, []),
    Watcher = ?P:run(V, fun() -> watch_down(Target) end),
    Caller = busy_call(Config, fun() -> exit(Target, macula_data_busy_exit) end),
    ?assertEqual({normal, true}, caller_result(O, Caller)),
    ?assertEqual({down, macula_data_busy_exit}, ?P:run(V, fun() -> down_reason(Watcher) end)),
    ?assertEqual([], nodedowns(V)),
    ?assertEqual([], nodedowns(O)).

%% Freezes V, makes O -> V busy, spawns `Fun' on O and checks that it is suspended
%% while the connection is busy; then thaws V. Returns the caller's pid; it waits,
%% once Fun has returned, to be asked for the result (caller_result/2).
busy_call(Config, Fun) ->
    {V, O, Format} = {victim(Config), offender(Config), ?config(format, Config)},
    VN = ?P:node_of(V),
    ?P:signal(V, "STOP"),
    ok = ?P:wait_until(fun() -> os_state(?P:os_pid(V)) =:= $T end, 2000),
    Busy = try
               ?P:run(O, fun() -> make_busy(VN, Format, Fun) end)
           after
               ?P:signal(V, "CONT")
           end,
    ct:log("busy: ~p", [Busy]),
    #{filler := FillerStatus, filler_moved := Moved, ctrl_queue := CtrlQueue,
      nosuspend_refused := Refused, caller := Caller, caller_info := CallerInfo} = Busy,
    %% The filler waits for the answer to a packet the controller took and handed to
    %% the NIF (none is left in the controller's mailbox): the answer is held back
    %% while the NIF is busy.
    ?assertEqual(waiting, FillerStatus),
    ?assertEqual(false, Moved),
    ?assertEqual(0, CtrlQueue),
    ?assert(Refused),
    %% Where OTP's own suite finds such a caller with inet_tcp.
    [{status, suspended}, {current_function, {M, F, _}}] = CallerInfo,
    ?assert(lists:member({M, F}, [{erlang, bif_return_trap}, {erts_internal, dsend_continue_trap}])),
    Caller.

%% On O. Fills the connection through the hook until a raw send goes unanswered (the
%% NIF is busy and the controller holds the reply), then fills the VM's queue with
%% ordinary `nosuspend' sends until they are refused; then starts the caller.
make_busy(VN, Format, Fun) ->
    Ctrl = ctrl_of(VN),
    Data = busy_packet(Format),
    Sent = atomics:new(1, []),
    Filler = spawn(fun() -> fill(Ctrl, Data, Sent) end),
    ok = until(fun() -> process_info(Filler, status) =:= {status, waiting} end, 10000),
    Before = atomics:get(Sent, 1),
    timer:sleep(300),
    {status, FillerStatus} = process_info(Filler, status),
    Moved = atomics:get(Sent, 1) =/= Before,
    {message_queue_len, CtrlQueue} = process_info(Ctrl, message_queue_len),
    Refused = fill_vm_queue(VN, binary:copy(<<7>>, ?BUSY_DATA_SIZE), 1000),
    Caller = spawn(fun() ->
                           Result = Fun(),
                           receive {result, From} -> From ! {self(), Result} end
                   end),
    timer:sleep(200),
    CallerInfo = process_info(Caller, [status, current_function]),
    exit(Filler, kill),
    #{filler => FillerStatus, filler_moved => Moved, ctrl_queue => CtrlQueue,
      raw_sent => atomics:get(Sent, 1),
      nosuspend_refused => Refused, caller => Caller, caller_info => CallerInfo}.

fill(Ctrl, Data, Sent) ->
    ok = raw_send(Ctrl, Data, infinity),
    atomics:add(Sent, 1, 1),
    fill(Ctrl, Data, Sent).

fill_vm_queue(_VN, _Data, 0) ->
    false;
fill_vm_queue(VN, Data, N) ->
    case erlang:send({?NOBODY, VN}, Data, [nosuspend]) of
        nosuspend -> true;
        _ -> fill_vm_queue(VN, Data, N - 1)
    end.

%% The exit reason of the caller and the value of its fun.
caller_result(O, Caller) ->
    ?P:run(O, fun() ->
                      Ref = monitor(process, Caller),
                      Caller ! {result, self()},
                      Value = receive {Caller, V} -> V after 10000 -> no_result end,
                      receive {'DOWN', Ref, process, Caller, Reason} -> {Reason, Value}
                      after 10000 -> {still_running, Value}
                      end
              end).

watch_down(Pid) ->
    spawn(fun() ->
                  Ref = monitor(process, Pid),
                  Reason = receive {'DOWN', Ref, process, Pid, R} -> R end,
                  receive {get, From} -> From ! {self(), {down, Reason}} end
          end).

down_reason(Watcher) ->
    Watcher ! {get, self()},
    receive {Watcher, Result} -> Result after 10000 -> no_down end.

%%% ------------------------------------------------------------------------------------
%%% Cases: malformed packets
%%% ------------------------------------------------------------------------------------

%% Shows: control terms that decode but are no valid control message (a REG_SEND with
%% a surplus element, a LINK without its target, a REG_SEND to a name that is not an
%% atom, a SEND_SENDER to a name instead of a pid) each kill the connection, with the
%% reasons in the module doc. (A SEND_SENDER whose sender is not a pid is delivered:
%% the VM does not look at the sender.)
bad_control(Config) ->
    killed_by(Config, fun(F) -> packet(F, {?DOP_REG_SEND, self(), '', ?SINK, surplus}, {bad}) end),
    killed_by(Config, fun(F) -> packet(F, {?DOP_LINK, self()}) end),
    killed_by(Config, fun(F) -> packet(F, {?DOP_REG_SEND, self(), '', 42}, {bad}) end),
    killed_by(Config, fun(F) -> packet(F, {?DOP_SEND_SENDER, self(), ?SINK}, {bad}) end),
    ?assertEqual([], sink_take(victim(Config))).

%% Shows: a packet whose header is broken kills the connection: one that claims atom
%% cache references it does not carry, or (pass-through) a bad version byte or nothing
%% after the tag.
bad_header(Config) ->
    Bad = case ?config(format, Config) of
              dist_header -> [[131, $D, 255], [131, $D, 1, 16#08]];
              pass_through -> [[112], [112, 130, 97, 1]]
          end,
    [killed_by(Config, fun(_) -> Packet end) || Packet <- Bad],
    ?assertEqual([], sink_take(victim(Config))).

%% Shows: a well-formed packet in the format this connection did not negotiate kills
%% it: pass-through where the atom cache is in use, a distribution header where it is
%% not.
foreign_format(Config) ->
    Other = case ?config(format, Config) of
                dist_header -> pass_through;
                pass_through -> dist_header
            end,
    killed_by(Config, fun(_) -> reg_send(Other, ?SINK, {foreign}) end),
    ?assertEqual([], sink_take(victim(Config))).

%% Shows: with fragments negotiated, a continuation fragment of a message never begun
%% and a message begun twice kill the connection; a fragment in a connection without
%% fragments does too.
bad_fragments(Config) ->
    case ?config(format, Config) of
        dist_header ->
            killed_by(Config, fun(_) -> [fragment(77, 1), <<"orphan">>] end),
            killed_by(Config, fun(_) ->
                                      First = [first_fragment(78, 3), ext({?DOP_REG_SEND, self(), '', ?SINK}),
                                               <<"part">>],
                                      {multi, [First, First]}
                              end);
        pass_through ->
            killed_by(Config, fun(_) ->
                                      [first_fragment(79, 1), ext({?DOP_REG_SEND, self(), '', ?SINK}),
                                       ext({fragment})]
                              end)
    end,
    ?assertEqual([], sink_take(victim(Config))).

%% Shows: a valid control message whose message is not a valid term (an atom cache
%% reference without a cache, a tuple cut short) kills the connection when the
%% receiving process decodes it; that process lives on and gets only the good
%% messages around it.
bad_message(Config) ->
    V = victim(Config),
    [begin
         killed_by(Config, fun(F) ->
                                   {multi, [reg_send(F, ?SINK, {before, N}),
                                            packet_raw_payload(F, {?DOP_REG_SEND, self(), '', ?SINK}, Payload)]}
                           end),
         ?assertEqual([{before, N}], sink_take(V))
     end || {N, Payload} <- [{1, [$R, 137]}, {2, [104, 3, 97, 1]}]],
    ?assert(is_pid(sink_pid(Config))).

%% Shows: a message whose size cannot be computed (an unknown tag; a binary claiming
%% 4 GiB) does not hurt while it waits in a suspended process's queue; it kills the
%% connection once the VM sizes that queue (`process_info(P, total_heap_size)'). The
%% process gets only the good message.
bad_size(Config) ->
    {V, O} = {victim(Config), offender(Config)},
    [begin
         ok = connect_all(Config),
         [ok = ?P:call(T, ?P, watch_reset, []) || T <- [V, O]],
         suspend_sink(V),
         ok = inject(Config, fun(F) ->
                                     {multi, [reg_send(F, ?SINK, {good, N}),
                                              packet_raw_payload(F, {?DOP_REG_SEND, self(), '', ?SINK}, Payload)]}
                             end),
         %% Everything O sent has arrived (same connection, after it) and it is still up.
         VN = ?P:node_of(V),
         ?assertEqual(VN, ?P:call(O, erpc, call, [VN, erlang, node, []])),
         ?assertEqual([], nodedowns(V)),
         _ = ?P:call(V, erlang, process_info, [sink_pid(Config), total_heap_size]),
         expect_killed(Config),
         resume_sink(V),
         ?assertEqual([{good, N}], sink_take(V))
     end || {N, Payload} <- [{1, [$?, 66]}, {2, [109, 16#FF, 16#FF, 16#FF, 16#F0, 1, 2, 3]}]].

%% Shows: atom cache references that point nowhere kill the connection: in a control
%% term, an index beyond the entries the header defines (one-stream mode), or any
%% reference at all (pass-through, no atom cache).
bad_atom_cache_ref(Config) ->
    killed_by(Config, fun(dist_header) ->
                              Atom = <<"macula_data_sink">>,
                              %% One new entry (index 0, segment 0), then a control term
                              %% that refers to index 5.
                              [131, $D, 1, 16#08, 0, byte_size(Atom), Atom,
                               104, 4, 97, ?DOP_REG_SEND, ext_pid(), $R, 0, $R, 5];
                         (pass_through) ->
                              [112, 131, 104, 4, 97, ?DOP_REG_SEND, ext_pid(), 100, 0, 0, $R, 0]
                      end),
    ?assertEqual([], sink_take(victim(Config))).

%% Shows: a bad message still queued in a suspended process when its connection went
%% down (net_kernel:disconnect/1 on O) does not take down the next connection when it
%% is finally decoded: it is dropped, the process gets nothing, the new connection
%% stays up.
stale_connection_id(Config) ->
    {V, O} = {victim(Config), offender(Config)},
    {VN, ON} = {?P:node_of(V), ?P:node_of(O)},
    suspend_sink(V),
    ok = inject(Config, fun(F) -> packet_raw_payload(F, {?DOP_REG_SEND, self(), '', ?SINK}, [$R, 137]) end),
    ?assertEqual(VN, ?P:call(O, erpc, call, [VN, erlang, node, []])),
    {message_queue_len, 1} = ?P:call(V, erlang, process_info, [sink_pid(Config), message_queue_len]),
    true = ?P:call(O, net_kernel, disconnect, [VN]),
    ?assertEqual(connection_closed, nodedown_reason(V, ON)),
    ?assertEqual(disconnect, nodedown_reason(O, VN)),
    ok = connect_all(Config),
    [ok = ?P:call(N, ?P, watch_reset, []) || N <- [V, O]],
    resume_sink(V),
    timer:sleep(1000),
    ?assertEqual([], sink_take(V)),
    ?assertEqual([], nodedowns(V)),
    ?assertEqual([], nodedowns(O)),
    ?assertEqual(VN, ?P:call(O, erpc, call, [VN, erlang, node, []])).

%%% ------------------------------------------------------------------------------------
%%% What a killed connection must look like
%%% ------------------------------------------------------------------------------------

%% Injects what `MakePackets(Format)' gives from O (one packet, or `{multi, Packets}'),
%% then expect_killed/1.
killed_by(Config, MakePackets) ->
    ok = connect_all(Config),
    [ok = ?P:call(N, ?P, watch_reset, []) || N <- [victim(Config), offender(Config)]],
    ok = inject(Config, MakePackets),
    expect_killed(Config).

%% V's nodedown reason for O is `killed', O's for V `connection_closed'; W is still
%% connected to V, and O connects again at once and makes a call.
expect_killed(Config) ->
    {V, O, W} = {victim(Config), offender(Config), witness(Config)},
    {VN, ON, WN} = {?P:node_of(V), ?P:node_of(O), ?P:node_of(W)},
    ?assertEqual(killed, nodedown_reason(V, ON)),
    ?assertEqual(connection_closed, nodedown_reason(O, VN)),
    ?assert(lists:member(WN, ?P:call(V, erlang, nodes, []))),
    ?assertEqual([], [E || {nodedown, N, _, _} = E <- ?P:call(V, ?P, watch_events, []), N =:= WN]),
    ?assertEqual(VN, ?P:call(W, erpc, call, [VN, erlang, node, []])),
    T0 = erlang:monotonic_time(millisecond),
    ?assertEqual(pong, ?P:call(O, net_adm, ping, [VN])),
    ct:log("reconnected in ~b ms", [erlang:monotonic_time(millisecond) - T0]),
    ?assertEqual(VN, ?P:call(O, erpc, call, [VN, erlang, node, []])).

inject(Config, MakePackets) ->
    {O, VN, Format} = {offender(Config), ?P:node_of(victim(Config)), ?config(format, Config)},
    ?P:run(O, fun() ->
                      Ctrl = ctrl_of(VN),
                      Packets = case MakePackets(Format) of
                                    {multi, Ps} -> Ps;
                                    P -> [P]
                                end,
                      case lists:usort([raw_send(Ctrl, P) || P <- Packets]) of
                          [ok] -> ok;
                          Other -> {raw_send_failed, Other}
                      end
              end).

nodedown_reason(TNode, Peer) ->
    case ?P:call(TNode, ?P, watch_await, [nodedown, Peer, 5000]) of
        {ok, {nodedown, Peer, Info, _Ms}} -> proplists:get_value(nodedown_reason, Info);
        timeout -> no_nodedown
    end.

nodedowns(TNode) ->
    [E || {nodedown, _, _, _} = E <- ?P:call(TNode, ?P, watch_events, [])].

%%% ------------------------------------------------------------------------------------
%%% Packets (built on the offender: `self()' is a local pid there)
%%% ------------------------------------------------------------------------------------

%% One packet with control term `Control' and optionally a message, in `Format'.
packet(Format, Control) ->
    packet_raw_payload(Format, Control, []).

packet(Format, Control, Message) ->
    packet_raw_payload(Format, Control, message_ext(Format, Message)).

reg_send(Format, Name, Message) ->
    packet(Format, {?DOP_REG_SEND, self(), '', Name}, Message).

%% `Payload' is put after the control term as it is: it may be a broken term.
packet_raw_payload(dist_header, Control, Payload) ->
    [131, $D, 0, ext(Control), Payload];
packet_raw_payload(pass_through, Control, Payload) ->
    [112, term_to_binary(Control), pass_through_payload(Payload)].

%% Broken payloads are given without a version byte; pass-through needs one.
pass_through_payload([]) -> [];
pass_through_payload(<<131, _/binary>> = Ext) -> Ext;
pass_through_payload(Payload) -> [131, Payload].

message_ext(dist_header, Message) -> ext(Message);
message_ext(pass_through, Message) -> term_to_binary(Message).

%% A term in the external format without its version byte.
ext(Term) ->
    <<131, Ext/binary>> = term_to_binary(Term),
    Ext.

ext_pid() ->
    ext(self()).

%% Headers of the first and of a later fragment of message `Seq'.
first_fragment(Seq, FragmentId) ->
    [131, $E, <<Seq:64, FragmentId:64>>, 0].

fragment(Seq, FragmentId) ->
    [131, $F, <<Seq:64, FragmentId:64>>].

%% A packet of about 1 MiB for a name nobody has.
busy_packet(Format) ->
    Data = binary:copy(<<253>>, ?BUSY_DATA_SIZE),
    packet(Format, {?DOP_REG_SEND, self(), '', ?NOBODY}, Data).

%%% ------------------------------------------------------------------------------------
%%% On the nodes
%%% ------------------------------------------------------------------------------------

%% The state letter of an OS process (T: stopped).
os_state(OsPid) ->
    {ok, Stat} = file:read_file("/proc/" ++ integer_to_list(OsPid) ++ "/stat"),
    [_, After] = string:split(Stat, ")", trailing),
    hd(string:trim(binary_to_list(After), leading)).

ctrl_of(Node) ->
    {Node, Ctrl} = lists:keyfind(Node, 1, erlang:system_info(dist_ctrl)),
    Ctrl.

%% The hook: one raw packet through the controller.
raw_send(Ctrl, IoData) ->
    raw_send(Ctrl, IoData, 5000).

raw_send(Ctrl, IoData, Timeout) ->
    Ref = make_ref(),
    Ctrl ! {send, self(), Ref, IoData},
    receive {Ref, Reply} -> Reply
    after Timeout -> no_reply
    end.

until(Pred, Timeout) when Timeout =< 0 ->
    case Pred() of true -> ok; false -> timeout end;
until(Pred, Timeout) ->
    case Pred() of
        true -> ok;
        false -> timer:sleep(10), until(Pred, Timeout - 10)
    end.

%% The victim's registered receiver: keeps what it receives, hands it over on request.
sink() ->
    register(?SINK, self()),
    sink_loop([]).

sink_loop(Got) ->
    receive
        {'$macula_data_take', From, Ref} ->
            From ! {Ref, lists:reverse(Got)},
            sink_loop([]);
        Message ->
            sink_loop([Message | Got])
    end.

sink_pid(Config) ->
    ?P:call(victim(Config), erlang, whereis, [?SINK]).

%% What the sink has received since last asked.
sink_take(V) ->
    ?P:run(V, fun() ->
                      Ref = make_ref(),
                      ?SINK ! {'$macula_data_take', self(), Ref},
                      receive {Ref, Got} -> Got after 5000 -> sink_not_answering end
              end).

%% What the sink receives until it has `Count' messages (or 5 s have passed).
sink_await(V, Count) ->
    sink_await(V, Count, [], erlang:monotonic_time(millisecond) + 5000).

sink_await(V, Count, Got, Deadline) ->
    All = Got ++ sink_take(V),
    case length(All) >= Count orelse erlang:monotonic_time(millisecond) > Deadline of
        true -> All;
        false -> timer:sleep(50), sink_await(V, Count, All, Deadline)
    end.

%% The sink stays suspended as long as the suspender process lives.
suspend_sink(V) ->
    ok = ?P:run(V, fun() ->
                           Self = self(),
                           Pid = spawn(fun() ->
                                               true = erlang:suspend_process(whereis(?SINK)),
                                               register(?SUSPENDER, self()),
                                               Self ! suspended,
                                               receive resume -> ok end
                                       end),
                           receive suspended -> ok after 5000 -> {not_suspended, Pid} end
                   end).

resume_sink(V) ->
    ok = ?P:run(V, fun() ->
                           Pid = whereis(?SUSPENDER),
                           Ref = monitor(process, Pid),
                           Pid ! resume,
                           receive {'DOWN', Ref, process, Pid, _} -> ok after 5000 -> not_resumed end
                   end).

%% Debug-level logger events of this node go to the calling process (see log/2).
capture_debug_logs() ->
    ok = logger:set_primary_config(level, debug),
    _ = logger:remove_handler(macula_data_capture),
    logger:add_handler(macula_data_capture, ?MODULE, #{level => debug, config => #{to => self()}}).

captured_logs(Ctrl, Timeout) ->
    timer:sleep(Timeout),
    ok = logger:remove_handler(macula_data_capture),
    ok = logger:set_primary_config(level, notice),
    collect_logs(Ctrl, []).

collect_logs(Ctrl, Acc) ->
    receive
        {macula_data_log, #{meta := #{pid := Ctrl}} = Event} -> collect_logs(Ctrl, [Event | Acc]);
        {macula_data_log, _} -> collect_logs(Ctrl, Acc)
    after 0 ->
            lists:reverse(Acc)
    end.

%% logger handler callback.
log(Event, #{config := #{to := To}}) ->
    To ! {macula_data_log, Event},
    ok.
