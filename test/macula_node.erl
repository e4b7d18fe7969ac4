%%% @doc Starting and stopping BEAM nodes as separate OS processes with OTP 25's
%%% `peer', the one place that does it for the test suites (through
%%% macula_test_peer), the demo (scripts/macula_demo.erl) and the benchmark
%%% (bench/macula_bench.erl). The demo and the benchmark compile this file next to
%%% their own module.
%%%
%%% A started node is `#{peer, node, os_pid}'. The caller controls the node through
%%% `peer' (`connection => 0': a TCP control connection, so the caller need not be
%%% distributed; `standard_io' for a node whose TCP connection back could not reach the
%%% caller, e.g. inside a network namespace).
-module(macula_node).

-export([start/1, macula_args/2, stop/2, kill/1, is_os_alive/1]).

-type started() :: #{peer := pid(), node := node(), os_pid := pos_integer()}.
-type start_opts() :: #{name := string(), host := string(), args := [string()],
                        connection := 0 | standard_io, wait_boot := timeout(),
                        exec => {file:filename(), [string()]},
                        env => [{string(), string()}]}.
-export_type([started/0, start_opts/0]).

-define(CALL_TIMEOUT, 30000).

%% @doc Starts `Name@Host' (long names) with `Args'. On failure the error names the
%% node, peer's reason and the command line, so it can be tried by hand.
-spec start(start_opts()) -> {ok, started()} | {error, {node_start_failed, string(), term(),
                                                        {command_line, string()}}}.
start(Opts = #{name := Name, host := Host, args := Args}) ->
    PeerOpts = maps:merge(maps:with([connection, wait_boot, exec, env], Opts),
                          #{name => Name, host => Host, longnames => true, args => Args}),
    %% peer:start/1 returns {error, _}, or exits (e.g. when the node halts during boot
    %% before it connects back).
    case try peer:start(PeerOpts) catch exit:Exit -> {error, Exit} end of
        {ok, Peer, Node} ->
            OsPid = list_to_integer(peer:call(Peer, os, getpid, [], ?CALL_TIMEOUT)),
            {ok, #{peer => Peer, node => Node, os_pid => OsPid}};
        {error, Reason} ->
            {error, {node_start_failed, Name ++ "@" ++ Host, Reason,
                     {command_line, command_line(Opts)}}}
    end.

command_line(#{name := Name, host := Host, args := Args} = Opts) ->
    Erl = case Opts of
              #{exec := {Program, PreArgs}} -> lists:join(" ", [Program | PreArgs]);
              #{} -> "erl"
          end,
    lists:flatten([Erl, " -name ", Name, "@", Host, " " | lists:join(" ", Args)]).

%% @doc The arguments of a node on the macula carrier without EPMD, with `Cookie' and
%% the code directories `CodePath' (macula_dist's ebin first).
-spec macula_args(string(), [file:filename()]) -> [string()].
macula_args(Cookie, CodePath) ->
    ["-proto_dist", "macula", "-no_epmd", "-start_epmd", "false", "-setcookie", Cookie
     | lists:append([["-pa", Dir] || Dir <- CodePath])].

%% @doc Stops a node (peer:stop closes the control connection, so the node halts) and
%% SIGKILLs it if its OS process is still there after `Timeout' ms.
-spec stop(#{peer := pid(), os_pid := pos_integer(), _ => _}, non_neg_integer()) -> ok.
stop(#{peer := Peer, os_pid := OsPid} = Started, Timeout) ->
    catch peer:stop(Peer),
    case wait_os_exit(OsPid, erlang:monotonic_time(millisecond) + Timeout) of
        ok -> ok;
        timeout -> kill(Started)
    end.

%% @doc kill -9 of the node's OS process; returns once the process is gone (5 s at most).
-spec kill(#{os_pid := pos_integer(), _ => _}) -> ok.
kill(#{os_pid := OsPid}) ->
    _ = os:cmd("kill -9 " ++ integer_to_list(OsPid)),
    ok = wait_os_exit(OsPid, erlang:monotonic_time(millisecond) + 5000).

wait_os_exit(OsPid, Deadline) ->
    case is_os_alive(OsPid) of
        false ->
            ok;
        true ->
            case erlang:monotonic_time(millisecond) >= Deadline of
                true -> timeout;
                false -> timer:sleep(50), wait_os_exit(OsPid, Deadline)
            end
    end.

%% @doc Whether an OS process exists and is not a zombie (detached nodes are not our
%% children, so nobody here reaps them).
-spec is_os_alive(pos_integer()) -> boolean().
is_os_alive(OsPid) ->
    case file:read_file("/proc/" ++ integer_to_list(OsPid) ++ "/stat") of
        {ok, Stat} ->
            %% "pid (comm) S ...": the state follows the last ')'.
            [_, After] = string:split(Stat, ")", trailing),
            case string:trim(After, leading) of
                <<"Z", _/binary>> -> false;
                <<"X", _/binary>> -> false;
                _ -> true
            end;
        {error, _} ->
            false
    end.
