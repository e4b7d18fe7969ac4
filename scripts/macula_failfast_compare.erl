%%% @doc How soon each kind of failure is noticed, macula next to inet_tcp (run by
%%% scripts/failfast-compare, which prints the table in the README's "How failures are
%%% noticed"). For each carrier it starts fresh pairs of nodes on 127.0.0.1 with the
%%% default net_ticktime (60 s) and net_setuptime (7 s), through OTP's peer over a TCP
%%% control connection, and measures on the host clock:
%%% <ul>
%%% <li>disconnect_node: from erlang:disconnect_node(B) on A to B's nodedown;</li>
%%% <li>kill -9 of B: from the kill to A's nodedown;</li>
%%% <li>connect_node to a node that is not running: until `false'.</li>
%%% </ul>
%%% Each is repeated `Rounds' times; the median and the largest value are printed.
-module(macula_failfast_compare).

-export([main/1]).
%% On the nodes
-export([stamp_downs/1]).

-define(COOKIE, "failfast_compare").

main([Ebin, Rounds, PortBase]) ->
    N = list_to_integer(Rounds),
    Base = list_to_integer(PortBase),
    Dir = filename:dirname(code:which(?MODULE)),
    Rows = [{Carrier, measure(Carrier, Ebin, Dir, N, Base)} || Carrier <- [inet_tcp, macula]],
    io:format("~n~-28s ~22s ~22s~n", ["median / max (ms)", "inet_tcp", "macula"]),
    [io:format("~-28s ~22s ~22s~n",
               [What | [cell(proplists:get_value(What, Values)) || {_, Values} <- Rows]])
     || What <- ["disconnect_node", "kill -9", "connect to a stopped node"]],
    ok.

cell(Ms) ->
    Sorted = lists:sort(Ms),
    io_lib:format("~.1f / ~.1f", [lists:nth((length(Sorted) + 1) div 2, Sorted), lists:last(Sorted)]).

measure(Carrier, Ebin, Dir, N, Base) ->
    Disconnect = [with_pair(Carrier, Ebin, Dir, Base, fun disconnect/4) || _ <- lists:seq(1, N)],
    Kill = [with_pair(Carrier, Ebin, Dir, Base, fun kill/4) || _ <- lists:seq(1, N)],
    Connect = [with_pair(Carrier, Ebin, Dir, Base, fun connect_stopped/4) || _ <- lists:seq(1, N)],
    [{"disconnect_node", Disconnect}, {"kill -9", Kill}, {"connect to a stopped node", Connect}].

with_pair(Carrier, Ebin, Dir, Base, Fun) ->
    {A, NA} = start(Carrier, Ebin, Dir, Base),
    {B, NB} = start(Carrier, Ebin, Dir, Base + 1),
    try
        pong = peer:call(A, net_adm, ping, [NB]),
        Fun(A, NA, B, NB)
    after
        [catch peer:stop(P) || P <- [A, B]]
    end.

start(Carrier, Ebin, Dir, Port) ->
    Common = ["-setcookie", ?COOKIE, "-pa", Dir],
    {Name, Args} = case Carrier of
                       inet_tcp -> {"ff" ++ integer_to_list(Port), Common};
                       macula -> {integer_to_list(Port),
                                  ["-proto_dist", "macula", "-no_epmd", "-start_epmd", "false",
                                   "-pa", Ebin | Common]}
                   end,
    {ok, Peer, Node} = peer:start(#{name => Name, host => "127.0.0.1", longnames => true,
                                    connection => 0, args => Args}),
    {Peer, Node}.

disconnect(A, NA, B, NB) ->
    Stamps = stamps(B, NA),
    T0 = peer:call(A, erlang, apply, [fun() ->
                                              T = os:system_time(microsecond),
                                              true = erlang:disconnect_node(NB),
                                              T
                                      end, []]),
    (down_at(B, Stamps) - T0) / 1000.

kill(A, NA, B, NB) ->
    _ = NA,
    Stamps = stamps(A, NB),
    OsPid = peer:call(B, os, getpid, []),
    T0 = os:system_time(microsecond),
    _ = os:cmd("kill -9 " ++ OsPid),
    (down_at(A, Stamps) - T0) / 1000.

connect_stopped(A, _NA, B, NB) ->
    Stamps = stamps(A, NB),
    ok = peer:stop(B),
    _ = down_at(A, Stamps),
    {Us, false} = peer:call(A, timer, tc, [net_kernel, connect_node, [NB]], 30000),
    Us / 1000.

stamps(Peer, Node) ->
    Pid = peer:call(Peer, erlang, spawn, [?MODULE, stamp_downs, [Node]]),
    timer:sleep(100),
    Pid.

down_at(Peer, Stamps) ->
    peer:call(Peer, erlang, apply, [fun() ->
                                            Stamps ! {get, self()},
                                            receive {Stamps, At} -> At end
                                    end, []], 120000).

%% @private On a node: remembers when `Node' went down (host clock, microseconds).
stamp_downs(Node) ->
    ok = net_kernel:monitor_nodes(true),
    receive
        {nodedown, Node} ->
            At = os:system_time(microsecond),
            receive {get, From} -> From ! {self(), At} end
    end.
