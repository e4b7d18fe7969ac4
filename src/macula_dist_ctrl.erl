%%% @doc The processes of one macula distribution connection.
%%%
%%% <ul>
%%% <li><b>Owner</b> (spawned by `macula_dist:setup/5' or `accept_connection/5'): runs
%%%     the dist_util handshake through the funs of {@link hs_data/2}, then dist_util's
%%%     con_loop (ticks, net_kernel requests). It talks to the NIF directly for the
%%%     handshake messages, ticks and statistics, so none of those wait behind data.</li>
%%% <li><b>Controller</b> (this module's start_linked/1 or start_unowned/1): the pid given
%%%     to `erlang:setnode/3'. It drains `erlang:dist_ctrl_get_data/1' into the NIF and
%%%     stops draining while the NIF's send queue is full, so the VM's busy-dist
%%%     mechanism suspends senders. It also takes OTP's test hook
%%%     `{send, From, Ref, IoData}' (one raw packet, answered `{Ref, ok}'). The NIF
%%%     monitors it: when it dies, the QUIC connection is closed. Its exit reason is
%%%     the nodedown reason.</li>
%%% <li><b>Input handler</b>: the only caller of `erlang:dist_ctrl_put_data/2', for every
%%%     data stream. The NIF sends it `{macula_data, Credit, Packets}' messages only
%%%     against credit (bytes) it returns with `ack_data/2', so its mailbox stays bounded
%%%     and QUIC flow control pushes back on the peer.</li>
%%% </ul>
%%% Links: owner - controller - input handler; any death takes the connection down.
%%% Once the handshake is complete the controller traps exits only to hand the VM's
%%% queued packets to the NIF first; it then exits with the reason it got, so
%%% `exit(Owner, Reason)' and net_kernel's `disconnect' are the nodedown reason, as
%%% net_kernel and OTP's tests expect.
-module(macula_dist_ctrl).

-export([start_linked/1, start_unowned/1, hand_over/2, hs_data/2, info/1]).
-export([check_opts/1, get_opts/2]).

-include_lib("kernel/include/net_address.hrl").
-include_lib("kernel/include/dist.hrl").
-include_lib("kernel/include/dist_util.hrl").
-include_lib("kernel/include/logger.hrl").

%% Off-heap mailboxes and eager full sweeps keep large binaries from lingering in
%% long-lived connection processes (as gen_tcp_dist does).
-define(PROCESS_OPTS, [{message_queue_data, off_heap}, {fullsweep_after, 0}]).

%% A controller waits this long for the owner net_kernel assigns after an accept.
-define(HAND_OVER_TIMEOUT, 30000).

%% After dist_ctrl_put_data/2 fails the connection is going down; wait to be killed so
%% the original exit reason is the one reported (OTP's death_row pattern).
-define(DEATH_ROW_TIMEOUT, 5000).

%% The longest a controller whose peer closed waits for the input handler to put the
%% last packets into the VM.
-define(FLUSH_TIMEOUT, 1000).

%% Times a drain after `macula_writable' yields and looks at the VM's queue again, so
%% that the senders it resumed can queue (see drain_all/1).
-define(RESUME_ROUNDS, 8).

%% A `{send, From, Ref, IoData}' request of the test hook (see inject/4).
-define(IS_RAW_SEND(Msg),
        (is_tuple(Msg) andalso tuple_size(Msg) =:= 4 andalso element(1, Msg) =:= send)).

-record(ctrl, {conn :: macula_dist_nif:conn(),
               owner :: pid(),
               dhandle :: erlang:dist_handle() | undefined,
               input :: pid() | undefined,
               batch_limit :: pos_integer(),
               busy = false :: boolean(),
               %% The raw-packet request whose packet filled the NIF's queue: answered
               %% once the queue is writable again (see inject/4).
               held_reply :: {pid(), reference()} | undefined,
               up_since :: integer() | undefined,
               %% Why the connection closed, if it did during the handshake (the owner
               %% was told; see handshaking/1).
               closed_during_handshake :: term(),
               opts = #{} :: #{nodelay => boolean()}}).

%%% ------------------------------------------------------------------------------------
%%% Starting a controller
%%% ------------------------------------------------------------------------------------

%% @doc A controller linked to the calling owner (the setup side).
-spec start_linked(macula_dist_nif:conn()) -> pid().
start_linked(Conn) ->
    Owner = self(),
    spawn_opt(fun() -> init(Conn, Owner) end, [link, {priority, max} | ?PROCESS_OPTS]).

%% @doc A controller whose owner is not known yet (the accept side); see hand_over/2.
-spec start_unowned(macula_dist_nif:conn()) -> pid().
start_unowned(Conn) ->
    spawn_opt(fun() -> init(Conn, undefined) end, [{priority, max} | ?PROCESS_OPTS]).

%% @doc Tells an unowned controller which owner net_kernel started for it.
-spec hand_over(pid(), pid()) -> ok.
hand_over(Ctrl, Owner) ->
    Ctrl ! {owner, Owner},
    ok.

init(Conn, Owner0) ->
    case macula_dist_nif:set_controller(Conn, self()) of
        ok -> ok;
        {error, closed} -> exit(connection_closed)
    end,
    Owner = case Owner0 of
                undefined -> await_owner();
                _ -> Owner0
            end,
    link(Owner),
    handshaking(#ctrl{conn = Conn, owner = Owner, batch_limit = batch_limit()}).

await_owner() ->
    receive
        {owner, Owner} -> Owner;
        {macula_closed, Reason} -> exit(Reason)
    after ?HAND_OVER_TIMEOUT ->
            exit(no_owner)
    end.

batch_limit() ->
    config(send_batch).

config(Key) ->
    macula_dist_endpoint:option(Key).

%%% ------------------------------------------------------------------------------------
%%% The handshake, seen from dist_util
%%% ------------------------------------------------------------------------------------

%% @doc The dist_util callbacks of a connection whose controller is `Ctrl'.
-spec hs_data(pid(), macula_dist_nif:conn()) -> #hs_data{}.
hs_data(Ctrl, Conn) ->
    #hs_data{socket = Ctrl,
             this_flags = 0,
             reject_flags = reject_flags(),
             f_send = fun(_Ctrl, Message) -> macula_dist_nif:send_handshake(Conn, Message) end,
             f_recv = fun(_Ctrl, 0, infinity) -> recv_handshake(Conn) end,
             f_setopts_pre_nodeup = fun(_Ctrl) -> ok end,
             f_setopts_post_nodeup = fun(_Ctrl) -> ok end,
             f_getll = fun(C) -> {ok, C} end,
             f_address = fun(_Ctrl, Node) -> net_address(Conn, Node) end,
             f_handshake_complete = fun(C, Node, DHandle) -> call(C, {handshake_complete, Node, DHandle}) end,
             mf_tick = fun(_Ctrl) -> macula_dist_nif:tick(Conn) end,
             mf_getstat = fun(_Ctrl) -> getstat(Conn) end,
             mf_setopts = fun(C, Opts) -> call(C, {setopts, Opts}) end,
             mf_getopts = fun(C, Opts) -> call(C, {getopts, Opts}) end}.

%% Several data streams carry packets of different senders in parallel, so every packet
%% must stand alone: no atom cache (its entries would be defined on one stream and used
%% on another) and no fragments (dist_util:strict_order_flags/0 and CARRIER-NOTES 3.8).
reject_flags() ->
    case config(data_streams) of
        1 -> 0;
        _ -> ?DFLAG_DIST_HDR_ATOM_CACHE bor ?DFLAG_FRAGMENTS
    end.

%% dist_util wants one whole handshake message, as a list.
recv_handshake(Conn) ->
    case macula_dist_nif:recv_message(Conn) of
        {ok, Message} -> {ok, binary_to_list(Message)};
        {error, _} = Error -> Error
    end.

%% Transport-level counters: `Received' moves whenever the peer's bytes or ticks
%% arrive, whatever the input handler is doing.
getstat(Conn) ->
    {Received, Sent, Pending} = macula_dist_nif:stats(Conn),
    {ok, Received, Sent, Pending}.

net_address(Conn, Node) ->
    case macula_dist_name:host(Node) of
        {ok, Host} ->
            #{peer := {Ip, _} = Peer} = macula_dist_nif:info(Conn),
            #net_address{address = Peer, host = Host, protocol = quic,
                         family = case tuple_size(Ip) of 4 -> inet; 8 -> inet6 end};
        {error, _} ->
            ?shutdown(Node)
    end.

call(Ctrl, Request) ->
    Ref = erlang:monitor(process, Ctrl),
    Ctrl ! {self(), Ref, Request},
    receive
        {Ref, Reply} ->
            erlang:demonitor(Ref, [flush]),
            Reply;
        {'DOWN', Ref, process, Ctrl, Reason} ->
            exit(Reason)
    end.

%% What the NIF knows (addresses, TLS, path, QUIC counters) and what the VM counts:
%% `dist_in'/`dist_out' are erlang:dist_get_stat/1's packets put into and taken out of
%% the VM for this connection.
connection_info(#ctrl{conn = Conn, dhandle = undefined, busy = Busy}) ->
    (macula_dist_nif:info(Conn))#{send_blocked => Busy};
connection_info(#ctrl{conn = Conn, dhandle = DHandle, up_since = Since, busy = Busy}) ->
    Info = (macula_dist_nif:info(Conn))#{uptime_ms => erlang:monotonic_time(millisecond) - Since,
                                         send_blocked => Busy},
    try erlang:dist_get_stat(DHandle) of
        {ok, In, Out, _Pending} -> Info#{dist_in => In, dist_out => Out}
    catch
        error:badarg -> Info  % the VM has already taken the connection down
    end.

%% @doc Information about the connection `Ctrl' controls.
-spec info(pid()) -> {ok, map()} | {error, not_connected}.
info(Ctrl) ->
    try call(Ctrl, info) of
        Info -> {ok, Info}
    catch
        exit:_ -> {error, not_connected}
    end.

%%% ------------------------------------------------------------------------------------
%%% The controller
%%% ------------------------------------------------------------------------------------

handshaking(S) ->
    receive
        {From, Ref, {handshake_complete, Node, DHandle}} ->
            S1 = complete_handshake(S, DHandle),
            announce_up(S1, Node),
            From ! {Ref, ok},
            %% Max priority was for the handshake; data runs at normal priority.
            process_flag(priority, normal),
            %% Exit signals become messages so that what the VM has queued is handed
            %% to the NIF before the controller goes (see flush_output/1).
            process_flag(trap_exit, true),
            ok = erlang:dist_ctrl_get_data_notification(DHandle),
            loop(S1);
        {macula_closed, Reason} ->
            %% The owner decides: a refusal of its cookie proof or name is reported by
            %% macula_dist_auth; in f_recv it fails the handshake, but after a `nok'
            %% status dist_util waits to be killed by net_kernel (simultaneous connect),
            %% and dying now would turn the winning connection into a failed connect.
            S#ctrl.owner ! {macula_closed, Reason},
            handshaking(S#ctrl{closed_during_handshake = Reason});
        Other ->
            handshaking(handle_common(Other, S))
    end.

complete_handshake(#ctrl{conn = Conn} = S, DHandle) ->
    Input = spawn_opt(fun() -> input_init(Conn) end, [link | ?PROCESS_OPTS]),
    ok = erlang:dist_ctrl_input_handler(DHandle, Input),
    Input ! {dist_handle, DHandle},
    false = erlang:dist_ctrl_set_opt(DHandle, get_size, true),
    case macula_dist_nif:activate(Conn, Input) of
        ok -> ok;
        {error, closed} -> closed_at_activation(S)
    end,
    S#ctrl{dhandle = DHandle, input = Input, up_since = erlang:monotonic_time(millisecond)}.

%% The `up' event, and a watcher for the `down' one.
announce_up(#ctrl{conn = Conn}, Node) ->
    #{peer := Address, initiator := Initiator} = macula_dist_nif:info(Conn),
    macula_dist_events:up(Node, Address, Initiator),
    macula_dist_events:watch(self(), Node, Address).

%% While the NIF's queue is full (busy) the controller neither drains nor takes raw
%% packets: they stay in the mailbox, each sender blocked on its reply, so nothing
%% queues up in the controller. A `dist_data' notification is not needed then, the
%% drain after `macula_writable' empties the VM's queue.
loop(#ctrl{busy = false} = S) ->
    receive
        dist_data ->
            loop(drain(S));
        {send, From, Ref, IoData} ->
            loop(inject(S, From, Ref, IoData));
        macula_writable ->
            loop(drain(S));
        Other ->
            loop(handle_common(Other, S))
    end;
loop(#ctrl{busy = true} = S) ->
    receive
        macula_writable ->
            loop(drain_all(release_held_reply(S#ctrl{busy = false})));
        dist_data ->
            loop(S);
        Other when not ?IS_RAW_SEND(Other) ->
            loop(handle_common(Other, S))
    end.

%% OTP's carrier test hook (gen_tcp_dist and inet_tls_dist's tls_sender have it):
%% `IoData' goes out as one distribution packet, on the data path, in order with what
%% the controller drains, and `{Ref, ok}' answers once the NIF has it. If that fills
%% the NIF's queue the answer waits for `macula_writable', so the sender stays blocked
%% on a busy connection as it would on a busy socket.
inject(S, From, Ref, IoData) ->
    case is_iodata(IoData) andalso send_raw(S, IoData) of
        ok ->
            From ! {Ref, ok},
            S;
        busy ->
            S#ctrl{busy = true, held_reply = {From, Ref}};
        false ->
            From ! {Ref, {error, not_iodata}},
            S
    end.

is_iodata(Term) ->
    try iolist_size(Term) of
        _ -> true
    catch
        error:badarg -> false
    end.

release_held_reply(#ctrl{held_reply = {From, Ref}} = S) ->
    From ! {Ref, ok},
    S#ctrl{held_reply = undefined};
release_held_reply(S) ->
    S.

handle_common({macula_closed, Reason}, S) ->
    %% The peer's last packets may still wait in the input handler's mailbox (they were
    %% delivered before the close was reported): like TCP's data before FIN, they reach
    %% the VM before the nodedown.
    flush_input(S#ctrl.input),
    exit(Reason);
handle_common({'EXIT', _From, normal}, S) ->
    S;
handle_common({'EXIT', _From, Reason}, S) ->
    flush_output(S),
    exit(Reason);
handle_common({From, Ref, {setopts, Opts}}, S) ->
    case check_opts(Opts) of
        ok ->
            From ! {Ref, ok},
            S#ctrl{opts = maps:merge(S#ctrl.opts, maps:from_list(Opts))};
        Error ->
            From ! {Ref, Error},
            S
    end;
handle_common({From, Ref, {getopts, Opts}}, S) ->
    From ! {Ref, get_opts(Opts, S#ctrl.opts)},
    S;
handle_common({From, Ref, info}, S) ->
    From ! {Ref, connection_info(S)},
    S;
handle_common(Stray, S) ->
    ?LOG_DEBUG("macula_dist: controller ~p dropped an unexpected message: ~0P",
               [self(), Stray, 20]),
    S.

%% Moves queued packets to the NIF in batches of up to `batch_limit' bytes. Stops when
%% the VM's queue is empty (and re-arms the notification) or the NIF says busy (and
%% waits for macula_writable, leaving the rest in the VM's queue, whose senders the VM
%% then suspends).
%%
%% The VM's queue is one FIFO for every sender. A sender that finds it busy is suspended
%% and resumed when the queue falls below half the busy limit, and then finds it busy
%% again if the bulk sender, resumed with it, queued first. So when the NIF has room
%% again the controller empties the VM's queue (up to `Allowance' bytes past the NIF's
%% limit, four times the VM's busy limit), and, the queue empty, yields a few times and
%% empties it again: each round resumes whoever the last one suspended, so a small
%% message behind a bulk transfer gets in within this drain and goes out on its own
%% stream, instead of losing the race for the queue time after time.
drain(S) ->
    case drain(S, [], 0, 0) of
        {empty, _} -> rearm(S);
        Busy -> Busy
    end.

drain_all(S) ->
    drain_rounds(S, 4 * erlang:system_info(dist_buf_busy_limit), ?RESUME_ROUNDS).

drain_rounds(S, Allowance, Rounds) ->
    case drain(S, [], 0, Allowance) of
        {empty, Left} when Rounds > 0, Left > 0 ->
            erlang:yield(),
            drain_rounds(S, Left, Rounds - 1);
        {empty, _} ->
            rearm(S);
        Busy ->
            Busy
    end.

rearm(#ctrl{dhandle = DHandle} = S) ->
    ok = erlang:dist_ctrl_get_data_notification(DHandle),
    S.

%% `{empty, AllowanceLeft}' once the VM's queue is empty and all of it is with the NIF,
%% else the state, busy.
drain(#ctrl{batch_limit = Limit} = S, Batch, Size, Allowance) when Size >= Limit ->
    case push(S, Batch) of
        ok -> drain(S, [], 0, Allowance);
        busy when Allowance > Size -> drain(S, [], 0, Allowance - Size);
        busy -> S#ctrl{busy = true}
    end;
drain(#ctrl{dhandle = DHandle} = S, Batch, Size, Allowance) ->
    case erlang:dist_ctrl_get_data(DHandle) of
        none ->
            case push(S, Batch) of
                ok -> {empty, Allowance};
                busy when Allowance > Size -> {empty, Allowance - Size};
                busy -> S#ctrl{busy = true}
            end;
        {PacketSize, Packet} ->
            drain(S, [Packet | Batch], Size + PacketSize, Allowance)
    end.

push(_S, []) ->
    ok;
push(#ctrl{conn = Conn}, Batch) ->
    sent(macula_dist_nif:send_data(Conn, lists:reverse(Batch))).

%% A raw packet from the test hook: one packet on the data path, on the fixed data
%% stream whatever it says (its control message may be garbage on purpose).
send_raw(#ctrl{conn = Conn}, IoData) ->
    sent(macula_dist_nif:send_unrouted(Conn, [IoData])).

sent(ok) -> ok;
sent(busy) -> busy;
sent({error, closed}) -> await_close();
sent({error, Reason}) -> exit({send_failed, Reason}).

%% Told to go (erlang:disconnect_node/1, a linked process died): hand everything the
%% VM has queued to the NIF, whatever its queue limit (the VM's queue is bounded by
%% busy-dist), which writes it out and ends the connection gracefully when this
%% process is gone. As with TCP, messages sent before a disconnect arrive. The exit
%% reason stays the one given, so it is the nodedown reason.
flush_output(#ctrl{dhandle = DHandle, conn = Conn}) ->
    case take_all(DHandle, []) of
        [] -> ok;
        Packets -> _ = macula_dist_nif:send_data(Conn, Packets), ok
    end.

take_all(DHandle, Acc) ->
    case erlang:dist_ctrl_get_data(DHandle) of
        none -> lists:reverse(Acc);
        {_Size, Packet} -> take_all(DHandle, [Packet | Acc])
    end.

flush_input(undefined) ->
    ok;
flush_input(Input) ->
    Ref = erlang:monitor(process, Input),
    Input ! {flush, self(), Ref},
    receive
        {Ref, flushed} -> erlang:demonitor(Ref, [flush]), ok;
        {'DOWN', Ref, process, Input, _} -> ok
    after ?FLUSH_TIMEOUT ->
            erlang:demonitor(Ref, [flush]), ok
    end.

%% The handshake completed on a connection that had already closed (a peer that ends
%% its control stream right after its last handshake message): the reason came during
%% the handshake and went to the owner, so it is not waited for again.
-spec closed_at_activation(#ctrl{}) -> no_return().
closed_at_activation(#ctrl{closed_during_handshake = undefined}) ->
    await_close();
closed_at_activation(#ctrl{closed_during_handshake = Reason}) ->
    exit(Reason).

%% The NIF reports why the connection closed; that reason is the nodedown reason.
-spec await_close() -> no_return().
await_close() ->
    receive
        {macula_closed, Reason} -> exit(Reason)
    after 5000 ->
            exit(connection_closed)
    end.

%%% ------------------------------------------------------------------------------------
%%% Options
%%% ------------------------------------------------------------------------------------

%% @doc Checks options for a connection: only `{nodelay, boolean()}' exists, and QUIC
%% sends small packets at once whatever its value.
-spec check_opts(term()) -> ok | {error, term()}.
check_opts([{nodelay, Bool} | Opts]) when is_boolean(Bool) ->
    check_opts(Opts);
check_opts([]) ->
    ok;
check_opts([Opt | _]) ->
    {error, {unsupported_option, Opt}};
check_opts(Opts) ->
    {error, {badarg, Opts}}.

%% @doc The values of the named options.
-spec get_opts([atom()], #{nodelay => boolean()}) -> {ok, [{atom(), term()}]} | {error, term()}.
get_opts(Names, Opts) when is_list(Names) ->
    case [Name || Name <- Names, Name =/= nodelay] of
        [] -> {ok, [{nodelay, maps:get(nodelay, Opts, true)} || nodelay <- Names]};
        [Unknown | _] -> {error, {unsupported_option, Unknown}}
    end.

%%% ------------------------------------------------------------------------------------
%%% The input handler
%%% ------------------------------------------------------------------------------------

input_init(Conn) ->
    receive
        {dist_handle, DHandle} -> input_loop(Conn, DHandle)
    end.

%% Batches of the priority stream go first; order only matters within a stream, and
%% each stream's batches arrive in order.
input_loop(Conn, DHandle) ->
    receive
        {macula_data, {priority, _} = Credit, Packets} ->
            input(Conn, DHandle, Credit, Packets)
    after 0 ->
            receive
                {macula_data, Credit, Packets} ->
                    input(Conn, DHandle, Credit, Packets);
                {flush, From, Ref} ->
                    %% Everything the NIF delivered before the close is in the VM now.
                    From ! {Ref, flushed},
                    input_loop(Conn, DHandle)
            end
    end.

input(Conn, DHandle, Credit, Packets) ->
    put_packets(DHandle, Packets),
    ok = macula_dist_nif:ack_data(Conn, Credit),
    input_loop(Conn, DHandle).

%% A packet the VM rejects does not make put_data fail: the VM kills the controller
%% (nodedown reason `killed') and this process dies with it through the link. put_data
%% raises only on a handle whose connection is already going down; the death comes
%% then too, and should it not, the exit names the error instead of a made-up reason.
put_packets(DHandle, [Packet | Packets]) ->
    try erlang:dist_ctrl_put_data(DHandle, Packet) of
        ok -> put_packets(DHandle, Packets)
    catch
        error:Reason -> death_row({dist_ctrl_put_data, Reason})
    end;
put_packets(_DHandle, []) ->
    ok.

-spec death_row(term()) -> no_return().
death_row(Reason) ->
    receive
    after ?DEATH_ROW_TIMEOUT -> exit(Reason)
    end.
