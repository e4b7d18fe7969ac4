%%% @doc The demo behind `scripts/demo' (and `make demo').
%%%
%%% main/1 runs in a plain, non-distributed VM (the orchestrator). It starts two
%%% BEAM nodes as separate OS processes with `peer' (OTP 25, through
%%% test/macula_node.erl, which the suites and the benchmark use too), each with
%%% `-proto_dist macula -no_epmd', and drives them over peer's own TCP control
%%% connection (connection => 0), so everything between the two nodes goes over
%%% macula_dist's QUIC connection and nothing else. Then it:
%%% <ol>
%%% <li>connects the nodes and prints macula_dist:connection_info/1 from both sides;</li>
%%% <li>round-trips messages between a process on each node;</li>
%%% <li>makes erpc calls from one node to the other;</li>
%%% <li>moves 256 MiB in 1 MiB messages one way and one 100 MiB binary the other way,
%%%     with md5 checked on both sides, and prints time and MiB/s;</li>
%%% <li>stops both nodes with init:stop/0 and checks the survivor saw nodedown.</li>
%%% </ol>
%%% Any failure prints `DEMO FAILED' with the step and the reason, stops the nodes and
%%% exits with status 1. The other functions exported here run on the two nodes (the
%%% module is on their code path).
-module(macula_demo).

%% The orchestrator
-export([main/1]).
%% Run on the demo nodes
-export([echo_start/0, round_trips/2, remote_calls/1, bulk_send/3, big_send/2,
         sink_start/2, watch_start/0, watch_events/0]).

-define(CALL_TIMEOUT, 180000).          % one peer:call, bulk transfers included
-define(WATCHDOG_MS, 480000).           % the whole demo
-define(MiB, 1048576).
-define(STEPS, 7).

%%% ====================================================================================
%%% The orchestrator
%%% ====================================================================================

%% Arguments (strings, from `erl -run'): Ebin, HelperDir, PidFile, PortA, PortB and
%% `fixed' (use exactly these ports) or `auto' (if they are taken, try the next pairs).
main([Ebin, HelperDir, PidFile, PortA, PortB, Mode]) ->
    process_flag(trap_exit, true),
    _ = spawn_link(fun watchdog/0),
    put(pidfile, PidFile),
    put(peers, []),
    try
        run(Ebin, HelperDir, list_to_integer(PortA), list_to_integer(PortB), Mode),
        stop_all_peers(),
        io:format("~nDEMO PASSED~n"),
        halt(0)
    catch
        throw:{step_failed, Step, Reason} ->
            fail(Step, Reason);
        Class:Reason:Stack ->
            fail(get(step), {Class, Reason, Stack})
    end;
main(Args) ->
    io:format(standard_error, "usage: macula_demo main Ebin HelperDir PidFile PortA PortB fixed|auto (got ~p)~n",
              [Args]),
    halt(2).

fail(Step, Reason) ->
    io:format(standard_error, "~nDEMO FAILED at step \"~ts\":~n  ~tp~n", [Step, Reason]),
    stop_all_peers(),
    halt(1).

watchdog() ->
    receive
    after ?WATCHDOG_MS ->
            io:format(standard_error, "~nDEMO FAILED: watchdog: not finished after ~b s~n",
                      [?WATCHDOG_MS div 1000]),
            %% The nodes halt when this VM's control connections close; the shell
            %% wrapper kills whatever is left by OS pid.
            halt(1)
    end.

run(Ebin, HelperDir, PortA0, PortB0, Mode) ->
    Host = "127.0.0.1",
    Cookie = cookie(),
    io:format("macula_dist demo: two BEAM nodes, distributed Erlang over QUIC~n"
              "  OTP release: ~s~n"
              "  code:        ~ts~n"
              "  cookie:      ~b random characters, new for this run~n",
              [erlang:system_info(otp_release), Ebin, length(Cookie)]),

    %% 1. Two nodes, two OS processes.
    heading(1, "starting two nodes as separate OS processes"),
    {PortA, PortB} = step("check UDP ports", fun() -> free_ports(PortA0, PortB0, Mode) end),
    Args = macula_node:macula_args(Cookie, [Ebin, HelperDir]),
    io:format("  erl -name PORT@~s ~ts~n",
              [Host, lists:join(" ", [case A of Cookie -> "<cookie>"; _ -> A end || A <- Args])]),
    {PeerA, NodeA, OsA} = step("start node A", fun() -> start_node(PortA, Host, Args) end),
    {PeerB, NodeB, OsB} = step("start node B", fun() -> start_node(PortB, Host, Args) end),
    io:format("  node A: ~-20s OS pid ~s~n"
              "  node B: ~-20s OS pid ~s~n", [NodeA, OsA, NodeB, OsB]),
    true = step("separate OS processes", fun() -> OsA =/= OsB end),

    %% 2. Connect and show the QUIC connection.
    heading(2, "connecting A -> B over macula (QUIC)"),
    true = step("net_kernel:connect_node/1",
                fun() -> pcall(PeerA, net_kernel, connect_node, [NodeB]) end),
    io:format("  net_kernel:connect_node('~s') on A -> true~n", [NodeB]),
    [NodeB] = step("nodes() on A", fun() -> pcall(PeerA, erlang, nodes, []) end),
    [NodeA] = step("nodes() on B", fun() -> pcall(PeerB, erlang, nodes, []) end),
    io:format("  nodes() on A -> ~p, on B -> ~p~n", [[NodeB], [NodeA]]),
    [ok, ok] = step("start nodedown watchers",
                    fun() -> [pcall(P, ?MODULE, watch_start, []) || P <- [PeerA, PeerB]] end),
    InfoA = step("connection_info on A", fun() -> connection_info(PeerA, NodeB) end),
    InfoB = step("connection_info on B", fun() -> connection_info(PeerB, NodeA) end),
    print_info(NodeA, NodeB, InfoA),
    print_info(NodeB, NodeA, InfoB),
    step("connection facts", fun() -> check_info(InfoA, PortB, true), check_info(InfoB, PortA, false) end),
    sockets(PortA, PortB, OsA, OsB),

    %% 3. Messages.
    heading(3, "message round trips between processes on A and B"),
    {ok, Samples, Rtt} = step("round trips", fun() -> pcall(PeerA, ?MODULE, round_trips, [NodeB, 1000]) end),
    io:format("  ~b sample terms (atom, tuple, map, list, float, ref, pid, fun, 1 MiB binary)~n"
              "    sent by a process on A to a process on B and echoed back: all equal~n"
              "  ~b ping-pongs A -> B -> A: min ~s, median ~s, p99 ~s~n",
              [Samples, maps:get(n, Rtt), us(maps:get(min, Rtt)), us(maps:get(median, Rtt)),
               us(maps:get(p99, Rtt))]),

    %% 4. erpc.
    heading(4, "erpc calls from A to B"),
    Calls = step("erpc", fun() -> pcall(PeerA, ?MODULE, remote_calls, [NodeB]) end),
    [io:format("  erpc:call('~s', ~ts) -> ~ts~n", [NodeB, Call, show_result(Result)])
     || {Call, Result} <- Calls],
    step("erpc results", fun() -> check_calls(Calls, NodeB, OsB) end),

    %% 5. Bulk: many 1 MiB messages.
    heading(5, "bulk transfer A -> B: 256 MiB as 256 messages of 1 MiB"),
    Bulk = step("bulk transfer", fun() -> pcall(PeerA, ?MODULE, bulk_send, [NodeB, ?MiB, 256]) end),
    print_transfer(Bulk),

    %% 6. One large binary, the other way.
    heading(6, "one 100 MiB binary in one message B -> A"),
    Big = step("100 MiB binary", fun() -> pcall(PeerB, ?MODULE, big_send, [NodeA, 100 * ?MiB]) end),
    print_transfer(Big),
    After = step("connection_info after the transfers", fun() -> connection_info(PeerA, NodeB) end),
    io:format("  connection from A after the transfers: ~b packets sent, ~b lost, path MTU ~b, rtt ~s~n",
              [maps:get(sent_packets, After), maps:get(lost_packets, After), maps:get(mtu, After),
               us(maps:get(rtt_us, After))]),

    %% 7. Clean shutdown.
    heading(7, "clean shutdown with init:stop/0"),
    stop_node("B", PeerB, NodeB, OsB, {PeerA, "A"}),
    stop_node("A", PeerA, NodeA, OsA, none),
    ok.

heading(N, Text) ->
    put(step, Text),
    io:format("~n[~b/~b] ~ts~n", [N, ?STEPS, Text]).

%% Runs Fun; any exception or a badmatch on its result fails the demo at `Name'.
step(Name, Fun) ->
    try
        Fun()
    catch
        throw:{step_failed, _, _} = Failed -> throw(Failed);
        Class:Reason -> throw({step_failed, Name, {Class, Reason}})
    end.

pcall(Peer, M, F, A) ->
    peer:call(Peer, M, F, A, ?CALL_TIMEOUT).

cookie() ->
    Alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    [lists:nth(1 + (B rem 26), Alphabet) || <<B>> <= crypto:strong_rand_bytes(32)].

%% The two UDP ports to use. With `auto', a taken pair (another node, a test run) moves
%% the demo on to the next pairs: 4435,4436, 4437,4438, ...
free_ports(PortA, PortB, Mode) ->
    free_ports(PortA, PortB, Mode, 20).

free_ports(PortA, PortB, Mode, Tries) ->
    case [{P, Why} || P <- [PortA, PortB], {error, Why} <- [port_free(P)]] of
        [] ->
            {PortA, PortB};
        [{Port, Why} | _] when Mode =:= "auto", Tries > 1 ->
            Shift = abs(PortB - PortA) + 1,
            io:format("  UDP port ~b is taken (~s); trying ~b and ~b~n",
                      [Port, inet:format_error(Why), PortA + Shift, PortB + Shift]),
            free_ports(PortA + Shift, PortB + Shift, Mode, Tries - 1);
        [{Port, Why} | _] ->
            error({udp_port_unavailable, Port, inet:format_error(Why),
                   "set MACULA_DEMO_PORTS=PortA,PortB to use other ports"})
    end.

port_free(Port) ->
    case gen_udp:open(Port, [{ip, {0, 0, 0, 0}}]) of
        {ok, Socket} -> gen_udp:close(Socket);
        {error, _} = Error -> Error
    end.

start_node(Port, Host, Args) ->
    case macula_node:start(#{name => integer_to_list(Port), host => Host, args => Args,
                             connection => 0, wait_boot => 30000}) of
        {ok, #{peer := Peer, node := Node, os_pid := Pid}} ->
            put(peers, [Peer | get(peers)]),
            OsPid = integer_to_list(Pid),
            ok = file:write_file(get(pidfile), [OsPid, $\n], [append]),
            {Peer, Node, OsPid};
        {error, Failed} ->
            error(Failed)
    end.

%% Halts whatever node is still running (after a failure; after success none is).
stop_all_peers() ->
    [catch peer:stop(P) || P <- get(peers), is_process_alive(P)],
    ok.

connection_info(Peer, Node) ->
    {ok, Info} = pcall(Peer, macula_dist, connection_info, [Node]),
    Info.

print_info(Here, There, Info) ->
    #{peer := {Ip, Port}} = Info,
    io:format("  macula_dist:connection_info('~s') on ~s:~n", [There, Here]),
    Rows = [{protocol, io_lib:format("~p", [maps:get(protocol, Info)])},
            {tls_version, maps:get(tls_version, Info)},
            {cipher_suite, maps:get(cipher_suite, Info)},
            {alpn, maps:get(alpn, Info)},
            {peer, [inet:ntoa(Ip), $:, integer_to_list(Port)]},
            {rtt, us(maps:get(rtt_us, Info))},
            {initiator, atom_to_list(maps:get(initiator, Info))}],
    [io:format("    ~-13s ~ts~n", [Key, Value]) || {Key, Value} <- Rows],
    ok.

check_info(Info, PeerPort, Initiator) ->
    #{protocol := quic, tls_version := <<"TLSv1.3">>, peer := {{127, 0, 0, 1}, PeerPort},
      initiator := Initiator, rtt_us := Rtt, cipher_suite := Suite} = Info,
    true = is_integer(Rtt) andalso byte_size(Suite) > 0,
    ok.

%% What the OS says about the two nodes' sockets (informational: needs `ss').
sockets(PortA, PortB, OsA, OsB) ->
    case os:find_executable("ss") of
        false ->
            io:format("  (ss not found: skipping the socket listing)~n");
        _ ->
            Filter = io_lib:format("'( sport = :~b or sport = :~b )'", [PortA, PortB]),
            Udp = lines(os:cmd("ss -H -uanp " ++ lists:flatten(Filter))),
            io:format("  UDP sockets on ports ~b and ~b (ss -uanp):~n", [PortA, PortB]),
            [io:format("    ~ts~n", [squeeze(L)]) || L <- Udp],
            Owned = fun(L) -> string:find(L, "pid=" ++ OsA ++ ",") =/= nomatch orelse
                                  string:find(L, "pid=" ++ OsB ++ ",") =/= nomatch end,
            Tcp = [L || L <- lines(os:cmd("ss -H -tlnp")), Owned(L)],
            case Tcp of
                [] -> io:format("  TCP listening sockets of the two nodes (ss -tlnp): none~n");
                _ -> io:format("  TCP listening sockets of the two nodes (ss -tlnp):~n"),
                     [io:format("    ~ts~n", [squeeze(L)]) || L <- Tcp]
            end
    end,
    ok.

lines(Text) ->
    [L || L <- string:split(Text, "\n", all), string:trim(L) =/= ""].

squeeze(Line) ->
    lists:join(" ", string:lexemes(Line, " \t")).

check_calls(Calls, NodeB, OsB) ->
    {_, NodeB} = lists:keyfind("erlang, node, []", 1, Calls),
    {_, OsB} = lists:keyfind("os, getpid, []", 1, Calls),
    {_, 500000500000} = lists:keyfind("lists, sum, [lists:seq(1, 1000000)]", 1, Calls),
    {_, {caught, error, badarith}} = lists:keyfind("erlang, '/', [1, 0]", 1, Calls),
    ok.

show_result({caught, Class, Reason}) ->
    io_lib:format("raises ~p:~p (the exception on B is raised again in the caller on A)",
                  [Class, Reason]);
show_result(Result) ->
    io_lib:format("~tp", [Result]).

print_transfer(#{bytes := Bytes, us := Us, md5_sent := Sent, md5_received := Received,
                 messages := Messages}) ->
    Secs = Us / 1.0e6,
    io:format("  ~b MiB in ~b message~s: ~.3f s, ~.1f MiB/s (~.2f Gbit/s)~n"
              "  md5 on the sender:   ~s~n"
              "  md5 on the receiver: ~s~n",
              [Bytes div ?MiB, Messages, plural(Messages), Secs, Bytes / ?MiB / Secs,
               Bytes * 8 / 1.0e9 / Secs, hex(Sent), hex(Received)]),
    case Sent =:= Received of
        true -> io:format("  md5 sums match~n");
        false -> throw({step_failed, get(step), {md5_mismatch, hex(Sent), hex(Received)}})
    end.

plural(1) -> "";
plural(_) -> "s".

hex(Bin) ->
    [io_lib:format("~2.16.0b", [B]) || <<B>> <= Bin].

us(Us) when Us < 1000 -> io_lib:format("~b us", [Us]);
us(Us) -> io_lib:format("~.2f ms", [Us / 1000]).

%% init:stop/0 on one node; wait until its OS process is gone; the other node (if any)
%% must have seen the nodedown.
stop_node(Label, Peer, Node, OsPid, Survivor) ->
    Mon = erlang:monitor(process, Peer),
    ok = step("init:stop() on " ++ Label, fun() -> pcall(Peer, init, stop, []) end),
    io:format("  init:stop() on ~s (~s)~n", [Label, Node]),
    receive
        {'DOWN', Mon, process, Peer, _} -> ok
    after 30000 ->
            throw({step_failed, get(step), {node_did_not_stop, Node}})
    end,
    put(peers, get(peers) -- [Peer]),
    case wait_until(fun() -> not os_alive(OsPid) end, 10000) of
        true -> io:format("    OS process ~s of ~s has exited~n", [OsPid, Node]);
        false -> throw({step_failed, get(step), {os_process_still_running, Node, OsPid}})
    end,
    case Survivor of
        none ->
            ok;
        {Other, OtherLabel} ->
            Saw = fun() -> [R || {nodedown, N, R} <- pcall(Other, ?MODULE, watch_events, []),
                                 N =:= Node] end,
            case wait_until(fun() -> Saw() =/= [] end, 10000) of
                true ->
                    [Reason | _] = Saw(),
                    io:format("    ~s saw {nodedown, '~s'} (reason: ~tp); nodes() on ~s -> ~p~n",
                              [OtherLabel, Node, Reason, OtherLabel,
                               pcall(Other, erlang, nodes, [])]);
                false ->
                    throw({step_failed, get(step), {no_nodedown_seen, OtherLabel, Node}})
            end
    end.

os_alive(OsPid) ->
    macula_node:is_os_alive(list_to_integer(OsPid)).

wait_until(Fun, Ms) when Ms =< 0 ->
    Fun();
wait_until(Fun, Ms) ->
    case Fun() of
        true -> true;
        false -> timer:sleep(100), wait_until(Fun, Ms - 100)
    end.

%%% ====================================================================================
%%% On the demo nodes
%%% ====================================================================================

%% An echo process: sends every `{From, Ref, Term}' back as `{Ref, Term}'.
echo_start() ->
    spawn(fun echo/0).

echo() ->
    receive
        {From, Ref, Term} -> From ! {Ref, Term}, echo();
        stop -> ok
    after 120000 -> ok
    end.

%% On A: starts an echo process on Node (with erpc), round-trips sample terms and then
%% N small messages, timing each.
round_trips(Node, N) ->
    Echo = erpc:call(Node, ?MODULE, echo_start, []),
    Node = node(Echo),
    Samples = [hello, {a, tuple, 3}, #{map => [1, 2, 3], nested => #{x => 1.5}},
               "a string", lists:seq(1, 1000), 3.14159, make_ref(), self(),
               fun lists:reverse/1, crypto:strong_rand_bytes(?MiB)],
    [echo(Echo, Term) || Term <- Samples],
    Rtts = lists:sort([element(1, timer:tc(fun() -> echo(Echo, I) end)) || I <- lists:seq(1, N)]),
    Echo ! stop,
    {ok, length(Samples), #{n => N, min => hd(Rtts), median => lists:nth(N div 2, Rtts),
                            p99 => lists:nth(max(1, (N * 99) div 100), Rtts)}}.

echo(Echo, Term) ->
    Ref = make_ref(),
    Echo ! {self(), Ref, Term},
    receive
        {Ref, Term} -> ok;                       % Term is bound: an exact match
        {Ref, Other} -> error({echo_mismatch, Term, Other})
    after 10000 ->
            error({echo_timeout, Term})
    end.

%% On A: a few erpc calls to Node, returned as `{Text, Result}'.
remote_calls(Node) ->
    [{"erlang, node, []", erpc:call(Node, erlang, node, [])},
     {"os, getpid, []", erpc:call(Node, os, getpid, [])},
     {"lists, sum, [lists:seq(1, 1000000)]", erpc:call(Node, lists, sum, [lists:seq(1, 1000000)])},
     {"erlang, '/', [1, 0]",
      try erpc:call(Node, erlang, '/', [1, 0]) of
          Result -> Result
      catch
          error:{exception, Reason, _Stack} -> {caught, error, Reason}
      end}].

%% A receiving process on this node for `Count' messages from `From'; answers
%% `{sink_received, Sink, Bytes}' as soon as the last one is in, then
%% `{sink_md5, Sink, Md5}' over everything received, in order.
sink_start(From, Count) ->
    spawn_opt(fun() -> sink(From, Count, 0, []) end, [{message_queue_data, off_heap}]).

sink(From, 0, Bytes, Acc) ->
    From ! {sink_received, self(), Bytes},
    From ! {sink_md5, self(), erlang:md5(lists:reverse(Acc))};
sink(From, Count, Bytes, Acc) ->
    receive
        {chunk, Bin} -> sink(From, Count - 1, Bytes + byte_size(Bin), [Bin | Acc])
    after 60000 ->
            exit({sink_timeout, Count, Bytes})
    end.

%% Sends `Count' random binaries of `Size' bytes to a sink on Node. The time runs from
%% the first send until the sink reports it has everything.
bulk_send(Node, Size, Count) ->
    transfer(Node, [crypto:strong_rand_bytes(Size) || _ <- lists:seq(1, Count)]).

%% The same with one binary of `Size' bytes.
big_send(Node, Size) ->
    transfer(Node, [crypto:strong_rand_bytes(Size)]).

transfer(Node, Chunks) ->
    Md5 = erlang:md5(Chunks),
    Sink = erpc:call(Node, ?MODULE, sink_start, [self(), length(Chunks)]),
    T0 = erlang:monotonic_time(microsecond),
    [Sink ! {chunk, Chunk} || Chunk <- Chunks],
    Bytes = receive {sink_received, Sink, B} -> B after 120000 -> error(transfer_timeout) end,
    T1 = erlang:monotonic_time(microsecond),
    Received = receive {sink_md5, Sink, M} -> M after 120000 -> error(md5_timeout) end,
    Bytes = iolist_size(Chunks),
    #{bytes => Bytes, messages => length(Chunks), us => max(1, T1 - T0),
      md5_sent => Md5, md5_received => Received}.

%% A registered process that records nodeup/nodedown events of this node.
watch_start() ->
    Self = self(),
    Pid = spawn(fun() ->
                        ok = net_kernel:monitor_nodes(true, [nodedown_reason]),
                        Self ! {watching, self()},
                        watch([])
                end),
    receive {watching, Pid} -> ok end,
    true = register(macula_demo_watch, Pid),
    ok.

watch(Events) ->
    receive
        {get, From, Ref} -> From ! {Ref, lists:reverse(Events)}, watch(Events);
        {nodeup, Node, _} -> watch([{nodeup, Node, up} | Events]);
        {nodedown, Node, Info} ->
            watch([{nodedown, Node, proplists:get_value(nodedown_reason, Info)} | Events])
    end.

watch_events() ->
    Ref = make_ref(),
    macula_demo_watch ! {get, self(), Ref},
    receive {Ref, Events} -> Events after 5000 -> error(watcher_not_answering) end.
