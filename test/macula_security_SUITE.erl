%%% @doc Hostile input against real macula_dist nodes.
%%%
%%% Every case starts separate OS-level nodes (OTP 25 peer, through macula_test_peer)
%%% and attacks or relays them with the `macula_hostile' tool (the workspace crate
%%% native/macula_hostile, built before the suites by the `ct' pre-hook in rebar.config):
%%% <ul>
%%% <li>a flood of random UDP datagrams at a node's port during a 50 MB transfer;</li>
%%% <li>1000 QUIC connections that complete TLS and never authenticate, then a
%%%     legitimate node connecting;</li>
%%% <li>an authenticated raw client sending malformed frames (one connection per
%%%     misbehaviour) next to a working connection between two nodes;</li>
%%% <li>a man-in-the-middle that terminates QUIC/TLS towards both nodes with its own
%%%     certificate and relays the bytes (refused: the cookie proof is bound to the TLS
%%%     session), and a plain UDP relay in the same position (works).</li>
%%% </ul>
%%% UDP ports 46000-46999 only (fixed per case), loopback only. Nodes and tool processes
%%% are killed after each case whatever happened.
-module(macula_security_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([suite/0, all/0, init_per_suite/1, end_per_suite/1, end_per_testcase/2]).
-export([garbage_flood_during_transfer/0, garbage_flood_during_transfer/1,
         half_open_flood/0, half_open_flood/1,
         malformed_frames/0, malformed_frames/1,
         mitm_is_refused/0, mitm_is_refused/1,
         udp_relay_works/0, udp_relay_works/1]).
%% Run on the nodes (through macula_test_peer:call/4)
-export([ping_loop/3]).

-define(P, macula_test_peer).
-define(H, macula_hostile).
-define(MB, (1024 * 1024)).

suite() ->
    [{timetrap, {minutes, 5}},
     {ct_hooks, [{macula_ct_hook, #{}}]}].

all() ->
    [garbage_flood_during_transfer, half_open_flood, malformed_frames, mitm_is_refused,
     udp_relay_works].

init_per_suite(Config) ->
    Root = ?H:repo_root(),
    Tool = case ?H:install(Root, ?config(priv_dir, Config)) of
               {ok, Bin} -> Bin;
               {error, NotBuilt} -> ct:fail({hostile_tool_missing, NotBuilt})
           end,
    ct:pal("repo: ~ts~nhostile tool: ~ts", [Root, Tool]),
    [{tool, Tool} | Config].

end_per_suite(_Config) ->
    ?H:stop_all().

%% Before macula_ct_hook stops the nodes.
end_per_testcase(_Case, _Config) ->
    ?H:stop_all().

%%% ------------------------------------------------------------------------------------
%%% Garbage datagrams
%%% ------------------------------------------------------------------------------------

garbage_flood_during_transfer() ->
    [{timetrap, {seconds, 120}}].

%% Shows: random datagrams at 50,000 per second (env MACULA_FLOOD_PPS overrides): noise,
%% and noise dressed as QUIC v1 Initial / other long-header / unknown-version /
%% short-header packets, aimed at node B's port (its one socket: listening and
%% connections) do not break a 50 MB transfer to B nor one from B (md5 equal on both
%% sides); B still accepts a new node during the flood and stays healthy.
garbage_flood_during_transfer(Config) ->
    [A, B] = start_nodes([{46001, []}, {46002, []}]),
    {NA, NB} = {?P:node_of(A), ?P:node_of(B)},
    pong = ?P:call(A, net_adm, ping, [NB]),
    Size = 50 * ?MB,
    {true, CalmMs} = transfer(A, NB, Size),
    Rate = case os:getenv("MACULA_FLOOD_PPS") of
               false -> "50000";
               Text -> Text
           end,
    Flood = ?H:start(tool(Config), ["garbage-flood", "127.0.0.1:46002", "60", Rate]),
    {ok, _} = ?H:await_line(Flood, <<"FLOOD started">>, 5000),
    {ok, _} = ?H:await_line(Flood, <<"FLOOD progress">>, 5000),
    {Intact, FloodMs} = transfer(A, NB, Size),
    {IntactBack, BackMs} = transfer(B, NA, Size),
    %% A new node connects to the flooded node while the flood goes on.
    C = ?P:start(46003, []),
    {CPing, CMs} = timed(fun() -> ?P:call(C, net_adm, ping, [NB]) end),
    ?assertEqual(running, ?H:status(Flood)),
    Lines = ?H:stop(Flood),
    ct:log("flood output:~n~ts", [join(Lines)]),
    Progress = lists:last([L || L <- Lines, prefix(<<"FLOOD progress">>, L)]),
    ?assert(Intact),
    ?assert(IntactBack),
    ?assertEqual(pong, CPing),
    %% Healthy afterwards: the old connection still carries calls, both ways.
    ?assertEqual(NB, ?P:call(A, erpc, call, [NB, erlang, node, []])),
    ?assertEqual(NA, ?P:call(B, erpc, call, [NA, erlang, node, []])),
    ok = ?P:wait_nodes(B, [NA, ?P:node_of(C)]),
    {true, _} = transfer(A, NB, 5 * ?MB),
    ?assert(?P:is_os_alive(?P:os_pid(B))),
    Comment = io_lib:format("50 MB A->B: ~b ms calm, ~b ms under flood; B->A under flood ~b ms; "
                            "new node's ping under flood ~b ms; ~ts",
                            [CalmMs, FloodMs, BackMs, CMs, Progress]),
    ct:pal("~ts", [Comment]),
    {comment, Comment}.

%% Sends a random binary of Size bytes from A to a process on NB, which answers with
%% its md5: {Md5sEqual, Ms}.
transfer(A, NB, Size) ->
    {Md5, RemoteMd5, RemoteSize, Ms} =
        ?P:call(A, macula_test_traffic, md5_transfer, [NB, Size, 60000], 70000),
    {RemoteMd5 =:= Md5 andalso RemoteSize =:= Size, Ms}.

%%% ------------------------------------------------------------------------------------
%%% Half-open connections
%%% ------------------------------------------------------------------------------------

half_open_flood() ->
    [{timetrap, {seconds, 90}}].

%% Shows: 1000 QUIC connections opened at once that complete TLS (ALPN macula-dist/1)
%% and never authenticate (a third open no stream, a third send half a frame header, a
%% third a partial frame) are all closed by the victim (net_setuptime 3 s): beyond
%% max_pending_handshakes (64) the oldest are dropped at once, the rest after 3 s.
%% Meanwhile a legitimate node connects at once; the victim's memory stays bounded and
%% it logs every refusal. Then a paced wave (500 a second): the legitimate node
%% reconnects in the middle of it.
half_open_flood(Config) ->
    [V, L] = start_nodes([{46021, ["-kernel", "net_setuptime", "3"]}, {46022, []}]),
    {NV, NL} = {?P:node_of(V), ?P:node_of(L)},
    ok = ?P:call(V, ?H, capture_logs, []),
    Before = memory(V),
    Procs0 = ?P:call(V, erlang, system_info, [process_count]),
    Sampler = start_sampler(V),
    Tool = ?H:start(tool(Config), ["half-open", "127.0.0.1:46021", "1000", "10", "mixed"]),
    {ok, Ready} = ?H:await_line(Tool, <<"HALFOPEN ready">>, 30000),
    {Ping, PingMs} = timed(fun() -> ?P:call(L, net_adm, ping, [NV]) end),
    {ok, 0, Lines} = ?H:await_exit(Tool, 30000),
    During = stop_sampler(Sampler),
    ct:log("half-open output:~n~ts", [join(Lines)]),
    {ok, Done} = find_line(<<"HALFOPEN done">>, Lines),
    ct:pal("~ts~n~ts~nlegitimate ping: ~p after ~b ms", [Ready, Done, Ping, PingMs]),
    ?assertEqual(pong, Ping),
    ?assert(PingMs < 3000),
    #{<<"established">> := Established, <<"closed_by_server">> := Closed,
      <<"still_open">> := StillOpen, <<"failed">> := Failed} = fields(Done),
    ?assertEqual(1000, Established + Failed),
    ?assertEqual(0, StillOpen),
    ?assertEqual(Established, Closed),
    %% Nobody is kept longer than net_setuptime (3 s) plus slack.
    CloseMs = [maps:get(<<"after_ms">>, fields(Li)) || Li <- Lines, prefix(<<"HALFOPEN closed ">>, Li)],
    ?assert(lists:max(CloseMs) < 5000),
    %% The victim logged the refusals: evictions and timeouts.
    ok = ?P:wait_until(fun() -> length(refusals(V)) >= 900 end, 5000),
    Refusals = refusals(V),
    Evicted = [R || R <- Refusals, string:find(R, "too many unauthenticated") =/= nomatch],
    TimedOut = [R || R <- Refusals, string:find(R, "net_setuptime") =/= nomatch],
    ct:pal("victim logged ~b refusals: ~b evicted (too many unauthenticated), ~b timed out; e.g.~n~ts",
           [length(Refusals), length(Evicted), length(TimedOut), hd(Refusals)]),
    ?assert(length(Evicted) > 0),
    ?assert(length(TimedOut) > 0),
    %% Memory: bounded during the flood, back near the start afterwards.
    timer:sleep(1000),
    After = memory(V),
    Procs1 = ?P:call(V, erlang, system_info, [process_count]),
    ct:pal("victim processes: ~b before, ~b after", [Procs0, Procs1]),
    ?assert(Procs1 =< Procs0 + 10), % the legitimate connection adds 3
    ct:pal("victim memory (erlang total / OS RSS, MB): before ~s, peak during ~s, 1 s after ~s",
           [mem_text(Before), mem_text(During), mem_text(After)]),
    ?assert(element(1, During) - element(1, Before) < 64 * ?MB),
    ?assert(element(2, During) - element(2, Before) < 256 * ?MB),
    ?assert(element(1, After) - element(1, Before) < 16 * ?MB),
    %% Still healthy, and only the legitimate node is connected.
    ?assertEqual(NV, ?P:call(L, erpc, call, [NV, erlang, node, []])),
    ?assertEqual([NL], ?P:call(V, erlang, nodes, [])),
    %% Second wave, paced (500 connections a second for 2 s): the legitimate node
    %% reconnects in the middle of it, while new half-open connections keep arriving.
    true = ?P:call(L, erlang, disconnect_node, [NV]),
    ok = ?P:wait_nodes(V, []),
    Wave = ?H:start(tool(Config), ["half-open", "127.0.0.1:46021", "1000", "5", "mixed", "500"]),
    {ok, _} = ?H:await_line(Wave, <<"HALFOPEN started">>, 5000),
    timer:sleep(700),
    {Ping2, Ping2Ms} = timed(fun() -> ?P:call(L, net_adm, ping, [NV]) end),
    ?assertEqual(running, ?H:status(Wave)),
    {ok, 0, WaveLines} = ?H:await_exit(Wave, 30000),
    {ok, WaveDone} = find_line(<<"HALFOPEN done">>, WaveLines),
    ct:pal("paced wave: ~ts~nlegitimate ping in the middle of it: ~p after ~b ms", [WaveDone, Ping2, Ping2Ms]),
    ?assertEqual(pong, Ping2),
    ?assert(Ping2Ms < 3000),
    ?assertMatch(#{<<"still_open">> := 0}, fields(WaveDone)),
    ?assertEqual([NL], ?P:call(V, erlang, nodes, [])),
    {comment, io_lib:format("~b established, ~b failed in handshake; all closed by the victim "
                            "(max ~b ms); legit ping ~b ms, ~b ms during a paced wave; victim memory ~s -> ~s -> ~s",
                            [Established, Failed, lists:max(CloseMs), PingMs, Ping2Ms, mem_text(Before),
                             mem_text(During), mem_text(After)])}.

refusals(TNode) ->
    [T || T <- ?P:call(TNode, ?H, logs, []), string:find(T, "refused connection from") =/= nomatch].

%% Samples memory/1 every 100 ms; stop_sampler/1 gives the peak of each figure.
start_sampler(TNode) ->
    spawn_link(fun() -> sampler(TNode, memory(TNode)) end).

sampler(TNode, {Total0, Rss0}) ->
    receive
        {stop, From} -> From ! {peak, self(), {Total0, Rss0}}
    after 100 ->
            {Total, Rss} = memory(TNode),
            sampler(TNode, {max(Total, Total0), max(Rss, Rss0)})
    end.

stop_sampler(Sampler) ->
    Sampler ! {stop, self()},
    receive {peak, Sampler, Peak} -> Peak after 5000 -> error(memory_sampler_timeout) end.

%% {erlang:memory(total), VmRSS} in bytes.
memory(TNode) ->
    Total = ?P:call(TNode, erlang, memory, [total]),
    {ok, Status} = file:read_file("/proc/" ++ integer_to_list(?P:os_pid(TNode)) ++ "/status"),
    {match, [Kb]} = re:run(Status, "VmRSS:\\s+(\\d+) kB", [{capture, all_but_first, binary}]),
    {Total, binary_to_integer(Kb) * 1024}.

mem_text({Total, Rss}) ->
    io_lib:format("~.1f/~.1f", [Total / ?MB, Rss / ?MB]).

%%% ------------------------------------------------------------------------------------
%%% Malformed frames from an authenticated client
%%% ------------------------------------------------------------------------------------

malformed_frames() ->
    [{timetrap, {seconds, 120}}].

%% Shows: a raw client that knows the cookie and then breaks the protocol loses its own
%% connection only, every time; a concurrent connection between two real nodes sees no
%% nodedown and a ping loop over it keeps working throughout; the victim stays up.
%% Modes (see macula_hostile.rs): wrong cookie proof; control stream finished right
%% after authenticating; a 65535-byte garbage handshake frame; a wrong challenge
%% digest; and, after a complete dist handshake: a data frame claiming 4 GiB, data
%% frames with random payloads, a handshake frame after the handshake, a handshake
%% frame sent right behind the challenge reply, the control stream finished.
malformed_frames(Config) ->
    [A, B] = start_nodes([{46041, []}, {46042, ["-kernel", "net_setuptime", "3"]}]),
    {NA, NB} = {?P:node_of(A), ?P:node_of(B)},
    pong = ?P:call(A, net_adm, ping, [NB]),
    ok = ?P:wait_nodes(B, [NA]),
    ok = ?P:call(A, ?P, watch_start, []),
    ok = ?P:call(B, ?P, watch_start, []),
    ok = ?P:call(B, ?H, capture_logs, []),
    ok = ?P:run(A, fun() -> start_ping_loop(NB) end),
    Cookie = atom_to_list(?P:cookie()),
    %% {Mode, what the victim must close the connection with, whether the client first
    %% completes the dist handshake, how soon (ms) the victim must close it}. The victim
    %% runs net_setuptime 3 s and net_ticktime 4 s. A handshake message pipelined behind
    %% the challenge reply is found unconsumed when the handshake completes (code 1); a
    %% control stream finished without a close is closed 0.5 s later.
    Modes = [{"bad-proof", "code=2", false, 2000},
             {"auth-fin", any, false, 5000},
             {"oversized-handshake", any, false, 2000},
             {"bad-dist", any, false, 2000},
             {"junk-data", "code=1", true, 2000},
             {"junk-packet", any, true, 2000},
             {"late-control", "code=1", true, 2500},
             {"pipelined-control", "code=1", false, 2000},
             {"control-fin", any, true, 2500}],
    Results = [malformed_run(Config, A, B, Cookie, Mode, 46050 + I)
               || {I, Mode} <- lists:zip(lists:seq(1, length(Modes)), Modes)],
    ct:pal("malformed modes: ms until the victim closed the connection, how, ping-loop calls meanwhile~n~ts",
           [[io_lib:format("~-20s ~6b ms  ~-60ts ~b calls~n", [M, Ms, How, Calls])
             || #{mode := M, ms := Ms, how := How, calls := Calls} <- Results]]),
    {Ok, Errors} = ?P:run(A, fun get_ping_loop/0),
    ct:pal("ping loop A -> B: ~b calls ok, errors ~p", [Ok, Errors]),
    ?assertEqual([], Errors),
    ?assert(Ok > 0),
    [?assert(Calls > 0) || #{calls := Calls} <- Results],
    %% No nodedown (or nodeup) between the real nodes at any time.
    ?assertEqual([], [E || {_, N, _, _} = E <- ?P:call(B, ?P, watch_events, []), N =:= NA]),
    ?assertEqual([], [E || {_, N, _, _} = E <- ?P:call(A, ?P, watch_events, []), N =:= NB]),
    ?assertEqual([NA], ?P:call(B, erlang, nodes, [])),
    ?assertEqual([], ?P:call(B, erlang, nodes, [hidden])),
    ?assert(?P:is_os_alive(?P:os_pid(B))),
    Logs = ?P:call(B, ?H, logs, []),
    ct:log("victim's log:~n~ts", [lists:join("\n", Logs)]),
    ?assert(lists:any(fun(T) -> string:find(T, "wrong_cookie") =/= nomatch end, Logs)),
    %% No atom was made for the name the wrong-proof client claimed.
    BadProofName = <<"46051@127.0.0.1">>,
    ?assertMatch({'EXIT', {badarg, _}},
                 ?P:run(B, fun() -> catch binary_to_existing_atom(BadProofName, utf8) end)),
    ?assert(lists:any(fun(T) -> string:find(T, "Invalid challenge reply") =/= nomatch end, Logs)),
    {comment, io_lib:format("~b modes, each closed by the victim (~ts); ping loop ~b calls, 0 errors",
                            [length(Results),
                             lists:join(", ", [io_lib:format("~s ~b ms", [M, Ms])
                                               || #{mode := M, ms := Ms} <- Results]),
                             Ok])}.

malformed_run(Config, A, B, Cookie, {Mode, Expect, FullHandshake, MaxMs}, FakePort) ->
    Name = integer_to_list(FakePort) ++ "@127.0.0.1",
    {Calls0, []} = ?P:run(A, fun get_ping_loop/0),
    Tool = ?H:start(tool(Config), ["malformed", "127.0.0.1:46042", Cookie, Name, Mode]),
    Exit = ?H:await_exit(Tool, 30000),
    Lines = case Exit of
                {ok, _, Ls} -> Ls;
                {timeout, Ls} -> Ls
            end,
    ct:log("malformed ~s:~n~ts", [Mode, join(Lines)]),
    ?assertMatch({Mode, {ok, 0, _}}, {Mode, Exit}),
    {ok, Result} = find_line(<<"MALFORMED result">>, Lines),
    ?assertMatch({Mode, #{<<"outcome">> := <<"closed_by_server">>}}, {Mode, fields(Result)}),
    #{<<"after_ms">> := Ms} = fields(Result),
    ?assertEqual({Mode, closed_within, MaxMs, true}, {Mode, closed_within, MaxMs, Ms =< MaxMs}),
    %% What follows after_ms=N: how the victim closed it.
    [_, How] = binary:split(Result, <<"after_ms=", (integer_to_binary(Ms))/binary, " ">>),
    case Expect of
        any -> ok;
        _ -> ?assertNotEqual({Mode, nomatch}, {Mode, string:find(Result, Expect)})
    end,
    case FullHandshake of
        true -> {ok, _} = find_line(<<"MALFORMED dist handshake complete">>, Lines);
        false -> ok
    end,
    %% The victim is up, and the real connection still carries calls.
    ?assert(?P:is_os_alive(?P:os_pid(B))),
    ok = ?P:wait_until(fun() -> element(1, ?P:run(A, fun get_ping_loop/0)) > Calls0 end, 5000),
    {Calls1, _} = ?P:run(A, fun get_ping_loop/0),
    #{mode => Mode, ms => Ms, how => How, calls => Calls1 - Calls0}.

%% On A: a registered process calling B every 20 ms.
start_ping_loop(NB) ->
    Pid = spawn(?MODULE, ping_loop, [NB, 0, []]),
    true = register(macula_security_ping_loop, Pid),
    ok.

get_ping_loop() ->
    macula_security_ping_loop ! {get, self()},
    receive
        {ping_loop, Ok, Errors} -> {Ok, Errors}
    after 5000 ->
            error(ping_loop_not_answering)
    end.

ping_loop(NB, Ok, Errors) ->
    receive
        {get, From} ->
            From ! {ping_loop, Ok, lists:reverse(Errors)},
            ping_loop(NB, Ok, Errors)
    after 20 ->
            case catch erpc:call(NB, erlang, node, [], 2000) of
                NB -> ping_loop(NB, Ok + 1, Errors);
                Other -> ping_loop(NB, Ok, lists:sublist([Other | Errors], 20))
            end
    end.

%%% ------------------------------------------------------------------------------------
%%% Relays
%%% ------------------------------------------------------------------------------------

mitm_is_refused() ->
    [{timetrap, {seconds, 60}}].

%% Shows: a man-in-the-middle that terminates QUIC/TLS towards both nodes with its own
%% certificate and relays every stream byte unchanged is refused in zero-configuration
%% mode: the cookie proof A makes is bound to A's TLS session with the relay, so B
%% (whose session with the relay differs) refuses it (an "x" message with code 2, then
%% close), the relay passes that on, A gets pang quickly, and both nodes log why.
%%
%% Routing: B is named 46101@127.0.0.1 but bound to 127.0.0.2 (inet_dist_use_interface);
%% the relay listens on 127.0.0.1:46101, where A dials B's name, and forwards to
%% 127.0.0.2:46101.
mitm_is_refused(Config) ->
    {A, B, Mitm, {Ping, Ms}} = ping_through(Config, "mitm", 46101, 46103),
    NA = ?P:node_of(A),
    ok = ?P:wait_until(fun() -> [] =/= mitm_line(Mitm, <<"mirrored the close">>) end, 5000),
    timer:sleep(200),
    Lines = ?H:stop(Mitm),
    ct:log("mitm output:~n~ts", [join(Lines)]),
    ct:pal("ping through the MITM: ~p after ~b ms", [Ping, Ms]),
    ?assertEqual(pang, Ping),
    ?assert(Ms < 3000),
    %% The relay did sit in the middle: it accepted A, connected to B, and relayed the
    %% cookie-proof frame ("A" after the 2-byte length) unchanged; B answered with its
    %% refusal ("x", code 2), which A read and closed on.
    {ok, _} = find_line(<<"MITM 1 accepted">>, Lines),
    {ok, _} = find_line(<<"MITM 1 connected upstream">>, Lines),
    {ok, First} = find_line(<<"MITM 1 control dialer->target first bytes">>, Lines),
    ?assertMatch({match, _}, re:run(First, "first bytes [0-9a-f]{4}41")),
    {ok, Refusal} = find_line(<<"MITM 1 control target->dialer first bytes">>, Lines),
    ?assertMatch({match, _}, re:run(Refusal, "first bytes [0-9a-f]{4}7802")),
    %% The logs say why.
    LogsB = one_line(wait_log(B, "refused connection from")),
    LogsA = one_line(wait_log(A, "refused this node's cookie proof")),
    ct:pal("B logged: ~ts~nA logged: ~ts", [LogsB, LogsA]),
    ?assertNotEqual(nomatch, string:find(LogsB, "wrong_cookie")),
    ?assertEqual([], ?P:call(A, erlang, nodes, [])),
    ?assertEqual([], ?P:call(B, erlang, nodes, [])),
    [?assert(?P:is_os_alive(?P:os_pid(N))) || N <- [A, B]],
    ?assertEqual(NA, ?P:call(A, erlang, node, [])),
    {comment, io_lib:format("pang after ~b ms; B: ~ts", [Ms, LogsB])}.

udp_relay_works() ->
    [{timetrap, {seconds, 60}}].

%% Shows: a plain UDP relay (a NAT: datagrams forwarded untouched) in the same position
%% as the MITM above does not disturb anything: ping pong, calls both ways, and B sees
%% A at the relay's address.
udp_relay_works(Config) ->
    {A, B, Relay, {Ping, Ms}} = ping_through(Config, "udp-relay", 46111, 46113),
    {NA, NB} = {?P:node_of(A), ?P:node_of(B)},
    ?assertEqual(pong, Ping),
    ok = ?P:wait_nodes(B, [NA]),
    ?assertEqual(NB, ?P:call(A, erpc, call, [NB, erlang, node, []])),
    ?assertEqual(NA, ?P:call(B, erpc, call, [NA, erlang, node, []])),
    {true, _} = transfer(A, NB, 5 * ?MB),
    {ok, #{peer := PeerOfB}} = ?P:call(A, macula_dist, connection_info, [NB]),
    {ok, #{peer := PeerOfA}} = ?P:call(B, macula_dist, connection_info, [NA]),
    {ok, NewClient} = ?H:await_line(Relay, <<"RELAY new client">>, 1000),
    Lines = ?H:stop(Relay),
    ct:log("relay output:~n~ts", [join(Lines)]),
    ct:pal("ping through the UDP relay: ~p after ~b ms; A sees B at ~0p, B sees A at ~0p; ~ts",
           [Ping, Ms, PeerOfB, PeerOfA, NewClient]),
    ?assertEqual({{127, 0, 0, 1}, 46111}, PeerOfB),
    ?assertNotEqual({{127, 0, 0, 1}, 46113}, PeerOfA),
    {comment, io_lib:format("pong after ~b ms; B sees A at ~0p (the relay)", [Ms, PeerOfA])}.

%% B named Port@127.0.0.1 but bound to 127.0.0.2 only; A on APort@127.0.0.1.
%% Nodes as relay_nodes/2, the tool in `Mode' (mitm, udp-relay) in between, and a timed
%% ping from A to B through it.
ping_through(Config, Mode, BPort, APort) ->
    {A, B} = relay_nodes(BPort, APort),
    Through = io_lib:format("127.0.0.1:~b", [BPort]),
    To = io_lib:format("127.0.0.2:~b", [BPort]),
    Tool = ?H:start(tool(Config), [Mode, lists:flatten(Through), lists:flatten(To)]),
    Ready = case Mode of
                "mitm" -> <<"MITM listening">>;
                "udp-relay" -> <<"RELAY listening">>
            end,
    {ok, _} = ?H:await_line(Tool, Ready, 5000),
    NB = ?P:node_of(B),
    {A, B, Tool, timed(fun() -> ?P:call(A, net_adm, ping, [NB]) end)}.

relay_nodes(BPort, APort) ->
    [B, A] = start_nodes([{BPort, ["-kernel", "inet_dist_use_interface", "{127,0,0,2}"]},
                          {APort, []}]),
    Bound = ?P:run(B, fun() ->
                              {Endpoint, _, _} = persistent_term:get({macula_dist, endpoint}),
                              macula_dist_nif:endpoint_address(Endpoint)
                      end),
    ?assertEqual({ok, {{127, 0, 0, 2}, BPort}}, Bound),
    ok = ?P:call(A, ?H, capture_logs, []),
    ok = ?P:call(B, ?H, capture_logs, []),
    {A, B}.

mitm_line(Tool, Text) ->
    [L || L <- ?H:lines(Tool), binary:match(L, Text) =/= nomatch].

wait_log(TNode, Text) ->
    Find = fun() -> [T || T <- ?P:call(TNode, ?H, logs, []), string:find(T, Text) =/= nomatch] end,
    case ?P:wait_until(fun() -> Find() =/= [] end, 5000) of
        ok -> hd(Find());
        timeout -> ct:fail({not_logged, ?P:node_of(TNode), Text, ?P:call(TNode, ?H, logs, [])})
    end.

%%% ------------------------------------------------------------------------------------
%%% Helpers
%%% ------------------------------------------------------------------------------------

tool(Config) ->
    ?config(tool, Config).

%% Nodes {Port, ExtraArgs}, started in parallel.
start_nodes(Specs) ->
    ?P:parallel([fun() -> ?P:start(Port, Args) end || {Port, Args} <- Specs]).

timed(Fun) ->
    T0 = erlang:monotonic_time(millisecond),
    Result = Fun(),
    {Result, erlang:monotonic_time(millisecond) - T0}.

prefix(Prefix, Line) ->
    binary:longest_common_prefix([Prefix, Line]) =:= byte_size(Prefix).

find_line(Prefix, Lines) ->
    case [L || L <- Lines, prefix(Prefix, L)] of
        [L | _] -> {ok, L};
        [] -> {not_found, Prefix}
    end.

%% The key=value words of a tool line (values with no spaces).
fields(Line) ->
    maps:from_list(
      [case binary:split(W, <<"=">>) of
           [K, V] -> {K, try binary_to_integer(V) catch error:badarg -> V end};
           [K] -> {K, true}
       end || W <- binary:split(Line, <<" ">>, [global]), W =/= <<>>]).

one_line(Text) ->
    unicode:characters_to_list(re:replace(Text, "\\s+", " ", [global, unicode])).

join(Lines) ->
    lists:join("\n", Lines).

