%%% @doc Separate OS-level BEAM nodes running the macula carrier, for Common Test.
%%%
%%% The test node itself is not distributed: every node is started with OTP 25's
%%% `peer' over a TCP control connection (`connection => 0'), so code runs on a node
%%% through {@link call/5} / {@link run/3} without any distribution on this side.
%%% Nodes inside a network namespace ({@link start_netns/4}) use their stdio as the
%%% control connection instead (`connection => standard_io').
%%%
%%% A node is a map `#{peer, node, port, os_pid}', started by macula_node (the one
%%% node-start module, shared with the demo and the benchmark). Every started node is
%%% remembered by a tracker (macula_test_tracker), so {@link stop_all/0} (called by
%%% macula_ct_hook after every case, even a failed or timed-out one) can stop them, and
%%% SIGKILL any that do not exit in time.
%%%
%%% The second half of this module runs ON the nodes: a node event watcher
%%% (`net_kernel:monitor_nodes(true, [nodedown_reason])') whose events carry the
%%% node's monotonic time in milliseconds, and a few small long-lived processes.
-module(macula_test_peer).

%% Test-node side
-export([start/2, start/3, stop/1, stop_all/0, os_pid/1, kill/1, is_os_alive/1,
         call/4, call/5, run/2, run/3, wait_until/2, wait_until/3,
         snapshot/1, ebin_dir/0, test_dir/0, cookie/0]).
%% Test-node side, added for the resilience and network-namespace suites
-export([start_netns/4, cast/4, signal/2]).
%% Shared by the suites
-export([parallel/1, node_of/1, port_base/2, wait_nodes/2, nodedown_after/3, await_nodedown/4,
         closed_nodedown/5]).
%% Node side (called through call/5)
-export([watch_start/0, watch_events/0, watch_reset/0, watch_await/3, now_ms/0,
         spawn_idle/0, idle/0, spawn_registered/2]).

-include_lib("stdlib/include/assert.hrl").

-define(COOKIE, "macula_test").
-define(TICKTIME, "4").
-define(CALL_TIMEOUT, 30000).
-define(TRACKER, macula_test_peer_tracker).
-define(WATCH, macula_test_watch).

-type tnode() :: #{peer := pid(), node := node(), port := inet:port_number(),
                   os_pid := pos_integer()}.
-export_type([tnode/0]).

%%% ------------------------------------------------------------------------------------
%%% Starting and stopping nodes
%%% ------------------------------------------------------------------------------------

%% @doc Starts `Port@127.0.0.1' with the macula carrier, plus `ExtraArgs'.
-spec start(inet:port_number(), [string()]) -> tnode().
start(Port, ExtraArgs) ->
    start(Port, ExtraArgs, #{}).

%% @doc As start/2; `Opts' may give `host' (default "127.0.0.1") and `cookie'
%% (default "macula_test").
-spec start(inet:port_number(), [string()], map()) -> tnode().
start(Port, ExtraArgs, Opts) ->
    start_node(Port, ExtraArgs, Opts, #{connection => 0}).

%% @doc Starts `Port@Host' inside the network namespace `Netns' (`ip netns exec Netns
%% erl ...'), with the same arguments as start/3 plus `ExtraArgs'. The control
%% connection is the node's stdio (`connection => standard_io'): peer's default TCP
%% connection back to this node's 127.0.0.1 cannot leave the namespace. The node is
%% tracked, so stop_all/0 stops it. Opts as for start/3.
-spec start_netns(string(), inet:port_number(), [string()], map()) -> tnode().
start_netns(Netns, Port, ExtraArgs, Opts) ->
    Erl = case os:find_executable("erl") of
              false -> error({no_erl_on_path, os:getenv("PATH")});
              E -> E
          end,
    Ip = case os:find_executable("ip") of
             false -> "/usr/sbin/ip";
             I -> I
         end,
    start_node(Port, ExtraArgs, Opts,
               #{connection => standard_io, exec => {Ip, ["netns", "exec", Netns, Erl]}}).

start_node(Port, ExtraArgs, Opts, How) ->
    Args = macula_node:macula_args(maps:get(cookie, Opts, ?COOKIE), [ebin_dir(), test_dir()])
           ++ ["-kernel", "net_ticktime", ?TICKTIME | ExtraArgs],
    NodeOpts = How#{name => integer_to_list(Port), host => maps:get(host, Opts, "127.0.0.1"),
                    args => Args, wait_boot => 20000},
    case macula_node:start(NodeOpts) of
        {ok, Started} ->
            TNode = Started#{port => Port},
            track(TNode),
            TNode;
        {error, Failed} ->
            error(Failed)
    end.

%% @doc Stops a node (peer:stop, which closes the control connection so the node
%% halts) and SIGKILLs it if it is still there after 5 s.
-spec stop(tnode()) -> ok.
stop(TNode) ->
    macula_node:stop(TNode, 5000),
    untrack(TNode),
    ok.

%% @doc Stops every node started since the last stop_all/0.
-spec stop_all() -> ok.
stop_all() ->
    Nodes = tracked(),
    %% peer:stop of each node in parallel: each may wait a while.
    Self = self(),
    Pids = [spawn(fun() -> catch stop(N), Self ! {stopped, self()} end) || N <- Nodes],
    [receive {stopped, P} -> ok after 15000 -> ok end || P <- Pids],
    %% Whatever survived that gets SIGKILL.
    [kill(N) || N <- Nodes, is_os_alive(maps:get(os_pid, N))],
    clear_tracked(),
    ok.

-spec os_pid(tnode()) -> pos_integer().
os_pid(#{os_pid := OsPid}) ->
    OsPid.

%% @doc kill -9 of the node's OS process; returns once the process is gone.
-spec kill(tnode()) -> ok.
kill(TNode) ->
    macula_node:kill(TNode).

%% @doc Whether an OS process exists and is not a zombie.
-spec is_os_alive(pos_integer()) -> boolean().
is_os_alive(OsPid) ->
    macula_node:is_os_alive(OsPid).

%% @doc Sends a signal to the node's OS process (`kill -SIG pid'): "STOP", "CONT", ...
-spec signal(tnode(), string()) -> ok.
signal(#{os_pid := OsPid}, Sig) ->
    _ = os:cmd("kill -" ++ Sig ++ " " ++ integer_to_list(OsPid)),
    ok.

%%% ------------------------------------------------------------------------------------
%%% Running code on nodes
%%% ------------------------------------------------------------------------------------

%% @doc Applies M:F(A) on the node without waiting for a reply (peer:cast): for calls
%% that never return, such as erlang:halt/0.
-spec cast(tnode(), module(), atom(), [term()]) -> ok.
cast(#{peer := Peer}, M, F, A) ->
    peer:cast(Peer, M, F, A).

-spec call(tnode(), module(), atom(), [term()]) -> term().
call(TNode, M, F, A) ->
    call(TNode, M, F, A, ?CALL_TIMEOUT).

-spec call(tnode(), module(), atom(), [term()], timeout()) -> term().
call(#{peer := Peer}, M, F, A, Timeout) ->
    peer:call(Peer, M, F, A, Timeout).

%% @doc Runs `Fun()' on the node (in a fresh process there) and returns its value;
%% exceptions are re-raised here. The fun's module must be in test_dir().
-spec run(tnode(), fun(() -> term())) -> term().
run(TNode, Fun) ->
    run(TNode, Fun, ?CALL_TIMEOUT).

-spec run(tnode(), fun(() -> term()), timeout()) -> term().
run(TNode, Fun, Timeout) ->
    call(TNode, erlang, apply, [Fun, []], Timeout).

%%% ------------------------------------------------------------------------------------
%%% Waiting
%%% ------------------------------------------------------------------------------------

%% @doc Polls `Pred()' every 50 ms until it returns true: ok, or timeout.
-spec wait_until(fun(() -> boolean()), non_neg_integer()) -> ok | timeout.
wait_until(Pred, Timeout) ->
    wait_until(Pred, Timeout, 50).

-spec wait_until(fun(() -> boolean()), non_neg_integer(), pos_integer()) -> ok | timeout.
wait_until(Pred, Timeout, Interval) ->
    Deadline = erlang:monotonic_time(millisecond) + Timeout,
    wait_loop(Pred, Deadline, Interval).

wait_loop(Pred, Deadline, Interval) ->
    case catch Pred() of
        true ->
            ok;
        _ ->
            case erlang:monotonic_time(millisecond) >= Deadline of
                true ->
                    timeout;
                false ->
                    timer:sleep(Interval),
                    wait_loop(Pred, Deadline, Interval)
            end
    end.

%%% ------------------------------------------------------------------------------------
%%% Paths and names
%%% ------------------------------------------------------------------------------------

%% @doc Copies the build the nodes run (macula_dist's ebin/ and priv/, and the
%% compiled test modules) under `Dir' and makes ebin_dir/0 and test_dir/0 point at the
%% copy. The NIF library is memory-mapped by every running node: a rebuild that
%% rewrites priv/macula_dist_nif.so in place (any `rebar3 compile' on the same
%% checkout) makes those nodes crash, so a run must not depend on that file staying
%% untouched. Returns the new ebin directory.
-spec snapshot(file:filename()) -> string().
snapshot(Dir) ->
    Ebin = filename:dirname(code:which(macula_dist)),
    Priv = filename:join(filename:dirname(Ebin), "priv"),
    Test = filename:dirname(code:which(?MODULE)),
    Root = filename:join(Dir, "macula_dist"),
    Copy = fun(From, To, Pattern) ->
                   ok = filelib:ensure_dir(filename:join(To, "x")),
                   [{ok, _} = file:copy(F, filename:join(To, filename:basename(F)))
                    || F <- filelib:wildcard(filename:join(From, Pattern))],
                   ok
           end,
    ok = Copy(Ebin, filename:join(Root, "ebin"), "*"),
    ok = Copy(Priv, filename:join(Root, "priv"), "*.so"),
    ok = Copy(Test, filename:join(Root, "test"), "*.beam"),
    persistent_term:put({?MODULE, dirs}, {filename:join(Root, "ebin"), filename:join(Root, "test")}),
    filename:join(Root, "ebin").

%% @doc The macula_dist ebin directory the nodes use (priv/ with the NIF is its
%% sibling): the snapshot if snapshot/1 was called, else the loaded macula_dist's.
-spec ebin_dir() -> string().
ebin_dir() ->
    case persistent_term:get({?MODULE, dirs}, undefined) of
        {Ebin, _Test} -> Ebin;
        undefined -> filename:dirname(code:which(macula_dist))
    end.

%% @doc The directory of the compiled test modules, put on the nodes' code path.
-spec test_dir() -> string().
test_dir() ->
    case persistent_term:get({?MODULE, dirs}, undefined) of
        {_Ebin, Test} -> Test;
        undefined -> filename:dirname(code:which(?MODULE))
    end.

-spec cookie() -> atom().
cookie() ->
    list_to_atom(?COOKIE).

%%% ------------------------------------------------------------------------------------
%%% The tracker: which nodes are running
%%% ------------------------------------------------------------------------------------

track(TNode) -> macula_test_tracker:add(?TRACKER, TNode).
untrack(TNode) -> macula_test_tracker:remove(?TRACKER, TNode).
tracked() -> macula_test_tracker:list(?TRACKER).
clear_tracked() -> macula_test_tracker:clear(?TRACKER).

%%% ------------------------------------------------------------------------------------
%%% Node side: node event watcher
%%% ------------------------------------------------------------------------------------

%% @doc Starts (or restarts) the watcher on this node: it records every nodeup and
%% nodedown as `{Event, Node, Info, MonotonicMs}', oldest first.
-spec watch_start() -> ok.
watch_start() ->
    case whereis(?WATCH) of
        undefined -> ok;
        Old -> exit(Old, kill), wait_unregistered(?WATCH)
    end,
    Parent = self(),
    Pid = spawn(fun() ->
                        ok = net_kernel:monitor_nodes(true, [nodedown_reason]),
                        Parent ! {self(), watching},
                        watch_loop([], [])
                end),
    receive {Pid, watching} -> ok end,
    true = register(?WATCH, Pid),
    ok.

wait_unregistered(Name) ->
    case whereis(Name) of
        undefined -> ok;
        _ -> timer:sleep(10), wait_unregistered(Name)
    end.

%% @doc Every event so far.
-spec watch_events() -> [{nodeup | nodedown, node(), list(), integer()}].
watch_events() ->
    watch_call(events).

%% @doc Forgets the events so far.
-spec watch_reset() -> ok.
watch_reset() ->
    watch_call(reset).

%% @doc The first recorded `Event' (nodeup | nodedown) for `Node', waiting up to
%% `Timeout' ms for it: `{ok, {Event, Node, Info, Ms}}' or `timeout'.
-spec watch_await(nodeup | nodedown, node(), timeout()) -> {ok, tuple()} | timeout.
watch_await(Event, Node, Timeout) ->
    Ref = make_ref(),
    ?WATCH ! {await, self(), Ref, Event, Node},
    receive
        {Ref, Found} -> {ok, Found}
    after Timeout ->
            timeout
    end.

watch_call(Request) ->
    Ref = make_ref(),
    ?WATCH ! {Request, self(), Ref},
    receive {Ref, Reply} -> Reply after 5000 -> error(watcher_timeout) end.

watch_loop(Events, Waiters) ->
    receive
        {Event, Node, Info} when Event =:= nodeup; Event =:= nodedown ->
            E = {Event, Node, Info, now_ms()},
            Events1 = Events ++ [E],
            watch_loop(Events1, notify(Events1, Waiters));
        {await, From, Ref, Event, Node} ->
            watch_loop(Events, notify(Events, [{From, Ref, Event, Node} | Waiters]));
        {events, From, Ref} ->
            From ! {Ref, Events},
            watch_loop(Events, Waiters);
        {reset, From, Ref} ->
            From ! {Ref, ok},
            watch_loop([], Waiters)
    end.

notify(Events, Waiters) ->
    lists:filter(
      fun({From, Ref, Event, Node}) ->
              case [E || {Ev, N, _, _} = E <- Events, Ev =:= Event, N =:= Node] of
                  [First | _] -> From ! {Ref, First}, false;
                  [] -> true
              end
      end, Waiters).

%% @doc This node's monotonic clock in milliseconds.
-spec now_ms() -> integer().
now_ms() ->
    erlang:monotonic_time(millisecond).

%% @doc Spawns `Body(Ready)' on this node and registers it as `Name' once it has called
%% `Ready()' (when its setup is done).
-spec spawn_registered(atom(), fun((fun(() -> term())) -> term())) -> ok.
spawn_registered(Name, Body) ->
    Parent = self(),
    Tag = make_ref(),
    Pid = spawn(fun() -> Body(fun() -> Parent ! {Tag, ready} end) end),
    receive {Tag, ready} -> ok end,
    true = register(Name, Pid),
    ok.

%% @doc A process on this node that lives until killed (or told `stop').
-spec spawn_idle() -> pid().
spawn_idle() ->
    spawn(?MODULE, idle, []).

-spec idle() -> no_return() | ok.
idle() ->
    receive
        stop -> ok;
        {exit, Reason} -> exit(Reason)
    end.

%%% ------------------------------------------------------------------------------------
%%% Shared by the suites
%%% ------------------------------------------------------------------------------------

%% @doc Runs the funs at once (e.g. starting nodes) and returns their results in order;
%% an exception in one is raised again here.
-spec parallel([fun(() -> T)]) -> [T].
parallel(Funs) ->
    Self = self(),
    Pids = [spawn(fun() ->
                          Self ! {self(), try {ok, F()} catch C:R:S -> {raise, C, R, S} end}
                  end) || F <- Funs],
    Results = [receive {P, Res} -> Res end || P <- Pids],
    [case Res of
         {ok, V} -> V;
         {raise, C, R, S} -> erlang:raise(C, R, S)
     end || Res <- Results].

%% @doc The node name of a started node.
-spec node_of(tnode()) -> node().
node_of(#{node := Node}) ->
    Node.

%% @doc The first of `Count' consecutive UDP ports, free now, in `{Lo, Hi}' (or from
%% `MACULA_TEST_PORT_BASE'): a random block, so runs on one machine rarely collide.
-spec port_base(pos_integer(), {inet:port_number(), inet:port_number()}) -> inet:port_number().
port_base(Count, Range) ->
    case os:getenv("MACULA_TEST_PORT_BASE") of
        false -> random_port_base(Count, Range, 20);
        Text -> list_to_integer(Text)
    end.

random_port_base(_Count, _Range, 0) ->
    ct:fail(no_free_udp_port_block);
random_port_base(Count, {Lo, Hi} = Range, Tries) ->
    Base = Lo + 200 * rand:uniform(max(1, (Hi - Lo - Count) div 200)) - 200,
    case lists:all(fun udp_port_free/1, lists:seq(Base, Base + Count - 1)) of
        true -> Base;
        false -> random_port_base(Count, Range, Tries - 1)
    end.

udp_port_free(Port) ->
    case gen_udp:open(Port, [{ip, {0, 0, 0, 0}}]) of
        {ok, S} -> gen_udp:close(S), true;
        {error, _} -> false
    end.

%% @doc Waits (5 s) until erlang:nodes() on `TNode' is exactly `Expected' (any order);
%% returns `ok', or a term saying what it saw (so `ok = wait_nodes(...)' fails clearly).
-spec wait_nodes(tnode(), [node()]) -> ok | tuple().
wait_nodes(TNode, Expected) ->
    Want = lists:sort(Expected),
    case wait_until(fun() -> lists:sort(call(TNode, erlang, nodes, [])) =:= Want end, 5000) of
        ok -> ok;
        timeout -> {nodes_not, Want, on, node_of(TNode), but, call(TNode, erlang, nodes, [])}
    end.

%% @doc Connects `A' to `B', runs `Stop()' (which must return ok) and waits up to 20 s
%% for A's nodedown of B: `{Ms, NodedownReason}', Ms on A's monotonic clock from just
%% before `Stop()'.
-spec nodedown_after(tnode(), tnode(), fun(() -> ok)) -> {integer(), term()}.
nodedown_after(A, B, Stop) ->
    NB = node_of(B),
    pong = call(A, net_adm, ping, [NB]),
    ok = call(A, ?MODULE, watch_start, []),
    T0 = call(A, ?MODULE, now_ms, []),
    ok = Stop(),
    await_nodedown(A, NB, T0, 20000).

%% @doc Waits (the watcher must run on `TNode') for TNode's nodedown of `Node':
%% `{Ms since T0, NodedownReason}'; fails the case if none comes within `Timeout'.
-spec await_nodedown(tnode(), node(), integer(), timeout()) -> {integer(), term()}.
await_nodedown(TNode, Node, T0, Timeout) ->
    case call(TNode, ?MODULE, watch_await, [nodedown, Node, Timeout], Timeout + 5000) of
        {ok, {nodedown, Node, Info, T1}} ->
            {T1 - T0, proplists:get_value(nodedown_reason, Info)};
        timeout ->
            ct:fail({no_nodedown, {on, node_of(TNode)}, {for, Node}, {within_ms, Timeout},
                     {nodes, call(TNode, erlang, nodes, [])}})
    end.

%% @doc For a `Stop' that ends node B cleanly (init:stop/0, erlang:halt/0), labelled
%% `What' in the log: A's nodedown of B must say connection_closed and come within
%% `LimitMs', and B's OS process must exit. Returns the case comment.
-spec closed_nodedown(string(), tnode(), tnode(), fun(() -> ok), pos_integer()) -> {comment, iodata()}.
closed_nodedown(What, A, B, Stop, LimitMs) ->
    {Ms, Reason} = nodedown_after(A, B, Stop),
    ct:pal("~s: nodedown after ~b ms, reason ~p", [What, Ms, Reason]),
    ?assertEqual(connection_closed, Reason),
    ?assert(Ms =< LimitMs),
    ok = wait_until(fun() -> not is_os_alive(os_pid(B)) end, 10000),
    {comment, io_lib:format("nodedown after ~b ms, reason ~0p", [Ms, Reason])}.
