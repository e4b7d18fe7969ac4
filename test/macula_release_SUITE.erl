%%% @doc Release admin commands over macula, as a user runs them: a relx release
%%% (rebar3 3.19, prod mode) and a `mix release' (Debian's Elixir) of small projects
%%% that depend on this one, each configured as the README says, two copies of each
%%% booted as daemons and driven only through their `bin/' scripts.
%%%
%%% init_per_suite builds both releases once, offline (macula_dist as a `_checkouts'
%%% dependency for rebar3, a `path:' dependency for mix); each group copies its release
%%% twice (two nodes, A and B) and the cases run in order: boot, ping, pid, rpc, eval,
%%% remote shell, restart, stop, foreground. Every OS process a case starts is killed
%%% in end_per_group if it is still there.
-module(macula_release_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([suite/0, all/0, groups/0, init_per_suite/1, end_per_suite/1,
         init_per_group/2, end_per_group/2]).
-export([relx_daemon/1, relx_ping/1, relx_pid/1, relx_rpc/1, relx_eval/1,
         relx_remote_console/1, relx_restart/1, relx_stop/1, relx_foreground/1,
         relx_console/1]).
-export([mix_daemon/1, mix_eval/1, mix_rpc/1, mix_pid/1, mix_remote/1, mix_stop/1,
         mix_start/1]).

-define(P, macula_test_peer).
-define(PORT_RANGE, {31000, 31999}).
-define(COOKIE, "macula_release_test").
%% Seconds a script command may take before the case fails.
-define(COMMAND_TIMEOUT, 90).

suite() ->
    [{timetrap, {seconds, 180}}].

all() ->
    [{group, relx}, {group, mix}].

groups() ->
    [{relx, [], [relx_daemon, relx_ping, relx_pid, relx_rpc, relx_eval, relx_remote_console,
                 relx_restart, relx_stop, relx_foreground, relx_console]},
     {mix, [], [mix_daemon, mix_eval, mix_rpc, mix_pid, mix_remote, mix_stop, mix_start]}].

%%% ------------------------------------------------------------------------------------
%%% Building the releases
%%% ------------------------------------------------------------------------------------

init_per_suite(Config) ->
    Root = repo_root(),
    Work = filename:join(?config(priv_dir, Config), "projects"),
    Rebar3 = executable("rebar3"),
    Mix = executable("mix"),
    Started = erlang:monotonic_time(millisecond),
    Relx = build_relx(Work, Root, Rebar3),
    MixRel = build_mix(Work, Root, Rebar3, Mix),
    ct:pal("releases built in ~b ms:~n  relx: ~ts~n  mix:  ~ts",
           [erlang:monotonic_time(millisecond) - Started, Relx, MixRel]),
    Base = ?P:port_base(4, ?PORT_RANGE),
    [{root, Root}, {work, Work}, {relx_release, Relx}, {mix_release, MixRel},
     {ports, {Base, Base + 1}} | Config].

end_per_suite(_Config) ->
    ok.

%% The checkout this suite was built from (rebar3 links _build/test/lib/macula_dist/src
%% to its src/).
repo_root() ->
    Src = filename:join(code:lib_dir(macula_dist), "src"),
    filename:dirname(string:trim(os:cmd("cd '" ++ Src ++ "' && pwd -P"))).

executable(Name) ->
    case os:find_executable(Name) of
        false -> ct:fail({missing, Name, "scripts/install-deps installs it (make deps)"});
        Path -> Path
    end.

%% The README's relx configuration, with macula_dist as a _checkouts dependency.
build_relx(Work, Root, Rebar3) ->
    Dir = filename:join(Work, "relapp"),
    write(filename:join([Dir, "src", "relapp.app.src"]),
          "{application, relapp, [{description, \"macula release test\"}, {vsn, \"1.0.0\"},\n"
          "  {applications, [kernel, stdlib, macula_dist]}, {env, []}]}.\n"),
    write(filename:join(Dir, "rebar.config"),
          "{deps, [macula_dist]}.\n"
          "{relx, [{release, {relapp, \"1.0.0\"}, [relapp, macula_dist]},\n"
          "        {mode, prod},\n"
          "        {vm_args, \"config/vm.args\"},\n"
          "        {overlay, [{copy, \"{{output_dir}}/lib/macula_dist-*/priv/erl_call\",\n"
          "                    \"erts-{{release_erts_version}}/bin/\"}]}]}.\n"),
    write(filename:join([Dir, "config", "vm.args"]), vm_args(4433)),
    ok = filelib:ensure_dir(filename:join([Dir, "_checkouts", "x"])),
    ok = file:make_symlink(Root, filename:join([Dir, "_checkouts", "macula_dist"])),
    build(Dir, [Rebar3, " release"], []),
    filename:join([Dir, "_build", "default", "rel", "relapp"]).

vm_args(Port) ->
    io_lib:format("-name ~b@127.0.0.1\n-setcookie " ?COOKIE "\n"
                  "-proto_dist macula\n-no_epmd\n-start_epmd false\n", [Port]).

%% The README's mix configuration, with macula_dist as a path dependency.
build_mix(Work, Root, Rebar3, Mix) ->
    Dir = filename:join(Work, "mixapp"),
    write(filename:join(Dir, "mix.exs"),
          ["defmodule Mixapp.MixProject do\n"
           "  use Mix.Project\n"
           "  def project do\n"
           "    [app: :mixapp, version: \"1.0.0\", elixir: \"~> 1.14\",\n"
           "     deps: [{:macula_dist, path: \"", Root, "\", manager: :rebar3}],\n"
           "     releases: [mixapp: [cookie: \"" ?COOKIE "\"]]]\n"
           "  end\n"
           "  def application, do: [extra_applications: [:logger]]\n"
           "end\n"]),
    write(filename:join([Dir, "lib", "mixapp.ex"]), "defmodule Mixapp do\nend\n"),
    Dist = "-proto_dist macula\n-no_epmd\n-start_epmd false\n",
    write(filename:join([Dir, "rel", "vm.args.eex"]), Dist),
    write(filename:join([Dir, "rel", "remote.vm.args.eex"]), [Dist, "-kernel logger_level warning\n"]),
    write(filename:join([Dir, "rel", "env.sh.eex"]),
          "export RELEASE_DISTRIBUTION=name\n"
          "export RELEASE_NODE=\"${RELEASE_NODE:-4433@127.0.0.1}\"\n"),
    build(Dir, [Mix, " release --overwrite"],
          [{"MIX_ENV", "prod"}, {"MIX_REBAR3", Rebar3}, {"RELEASE_COOKIE", ?COOKIE}]),
    filename:join([Dir, "_build", "prod", "rel", "mixapp"]).

build(Dir, Command, Env) ->
    case run(Dir, Command, Env, "", 600) of
        {0, _Output} -> ok;
        {Status, Output} -> ct:fail({build_failed, Dir, Status, Output})
    end.

write(File, Text) ->
    ok = filelib:ensure_dir(File),
    ok = file:write_file(File, Text).

%%% ------------------------------------------------------------------------------------
%%% Groups: two copies of a release
%%% ------------------------------------------------------------------------------------

init_per_group(Kind, Config) ->
    {PortA, PortB} = ?config(ports, Config),
    Release = ?config(list_to_atom(atom_to_list(Kind) ++ "_release"), Config),
    Nodes = [copy_release(Kind, Release, ?config(work, Config), Name, Port)
             || {Name, Port} <- [{a, PortA}, {b, PortB}]],
    [{nodes, Nodes} | Config].

end_per_group(_Kind, Config) ->
    [kill_node(N) || N <- ?config(nodes, Config)],
    ok.

%% A node: #{dir, port, node, script, env}.
copy_release(Kind, Release, Work, Name, Port) ->
    Dir = filename:join(Work, atom_to_list(Kind) ++ "_" ++ atom_to_list(Name)),
    "" = os:cmd("rm -rf '" ++ Dir ++ "' && cp -a '" ++ Release ++ "' '" ++ Dir ++ "'"),
    Node = list_to_atom(integer_to_list(Port) ++ "@127.0.0.1"),
    case Kind of
        relx ->
            write(filename:join([Dir, "releases", "1.0.0", "vm.args"]), vm_args(Port)),
            #{dir => Dir, port => Port, node => Node, script => "bin/relapp", env => []};
        mix ->
            #{dir => Dir, port => Port, node => Node, script => "bin/mixapp",
              env => [{"RELEASE_NODE", atom_to_list(Node)}]}
    end.

%% Runs `bin/APP Args' of a node; {ExitStatus, Output}.
cmd(N, Args) ->
    cmd(N, Args, "").

cmd(#{dir := Dir, script := Script, env := Env}, Args, Input) ->
    Started = erlang:monotonic_time(millisecond),
    {Status, Output} = run(Dir, [Script | [[" ", quote(A)] || A <- Args]], Env, Input,
                           ?COMMAND_TIMEOUT),
    ct:pal("~ts ~ts (~ts): status ~b after ~b ms~n~ts",
           [Script, lists:join(" ", Args), filename:basename(Dir), Status,
            erlang:monotonic_time(millisecond) - Started, Output]),
    {Status, Output}.

%% Runs a shell command in `Dir' with stdin from `Input', stdout and stderr to files
%% (so a daemon it leaves behind holds no pipe of ours); kills it after `Timeout' s.
%% Returns the exit status and stdout; stderr goes to the CT log.
run(Dir, Command, Env, Input, Timeout) ->
    Id = integer_to_list(erlang:unique_integer([positive])),
    Base = filename:join(filename:dirname(Dir), "cmd-" ++ Id),
    write(Base ++ ".sh",
          ["unset ERL_FLAGS ERL_AFLAGS ERL_ZFLAGS ERL_LIBS\n",
           [["export ", K, "=", quote(V), "\n"] || {K, V} <- Env],
           "cd ", quote(Dir), "\n", Command, "\n"]),
    write(Base ++ ".in", Input),
    Status = os:cmd(lists:flatten(io_lib:format(
                      "timeout -k 5 ~b sh '~ts.sh' < '~ts.in' > '~ts.out' 2> '~ts.err'; echo $?",
                      [Timeout, Base, Base, Base, Base]))),
    {ok, Output} = file:read_file(Base ++ ".out"),
    case file:read_file(Base ++ ".err") of
        {ok, <<>>} -> ok;
        {ok, Err} -> ct:log("stderr of ~ts:~n~ts", [Command, Err])
    end,
    {list_to_integer(string:trim(Status)), Output}.

quote(Text) ->
    "'" ++ string:replace(lists:flatten(Text), "'", "'\\''", all) ++ "'".

%% What the node answers to `Mod:Fun(Args)', asked with macula's erl_call as the relx
%% release carries it in lib/macula_dist-VSN/priv (with the Erlang on PATH),
%% independently of the release scripts.
ask(#{node := Node}, Config, Apply) ->
    [ErlCall] = filelib:wildcard(filename:join([?config(relx_release, Config), "lib",
                                                "macula_dist-*", "priv", "erl_call"])),
    run(?config(work, Config), [ErlCall, " -name ", atom_to_list(Node), " -c " ?COOKIE,
                                " -timeout 10 -a ", quote(Apply)], [], "", 30).

wait_alive(N, Config) ->
    ?P:wait_until(fun() -> element(1, ask(N, Config, "erlang is_alive")) =:= 0 end, 60000, 500).

os_pid(N, Config) ->
    {0, Quoted} = ask(N, Config, "os getpid"),
    list_to_integer(string:trim(binary_to_list(Quoted), both, "\"\n")).

kill_node(N) ->
    %% The node's port identifies its BEAM: the UDP socket it holds.
    Pids = string:lexemes(os:cmd(io_lib:format("ss -Hlunp 'sport = :~b' | grep -o 'pid=[0-9]*' "
                                               "| cut -d= -f2", [maps:get(port, N)])), "\n"),
    [os:cmd("kill -9 " ++ P) || P <- Pids],
    ok.

nodes_of(Config) ->
    [A, B] = ?config(nodes, Config),
    {A, B}.

output(Bin) ->
    string:trim(binary_to_list(Bin)).

fmt(Format, Args) ->
    lists:flatten(io_lib:format(Format, Args)).

%%% ------------------------------------------------------------------------------------
%%% relx
%%% ------------------------------------------------------------------------------------

%% `bin/relapp daemon' returns once the node answers (relx polls erlang:is_alive/0
%% through erl_call, here macula's).
relx_daemon(Config) ->
    {A, B} = nodes_of(Config),
    [{0, _}, {0, _}] = ?P:parallel([fun() -> cmd(N, ["daemon"]) end || N <- [A, B]]),
    [{0, "true"}, {0, "true"}] = [{S, output(O)} || {S, O} <- [ask(N, Config, "erlang is_alive")
                                                              || N <- [A, B]]].

relx_ping(Config) ->
    {A, B} = nodes_of(Config),
    [{0, "pong"}, {0, "pong"}] = [{S, output(O)} || {S, O} <- [cmd(N, ["ping"]) || N <- [A, B]]].

%% `pid' prints the OS pid of the node's BEAM.
relx_pid(Config) ->
    {A, _B} = nodes_of(Config),
    {0, Out} = cmd(A, ["pid"]),
    Pid = list_to_integer(output(Out)),
    ?assertEqual(os_pid(A, Config), Pid),
    {ok, Exe} = file:read_link("/proc/" ++ integer_to_list(Pid) ++ "/exe"),
    ?assertEqual("beam.smp", filename:basename(Exe)).

%% `rpc' runs on the node; A connects to B over macula and its info/0 shows traffic.
relx_rpc(Config) ->
    {A, #{node := NodeB}} = nodes_of(Config),
    NodeA = atom_to_list(maps:get(node, A)),
    {0, Me} = cmd(A, ["rpc", "erlang", "node"]),
    ?assertEqual("'" ++ NodeA ++ "'", output(Me)),
    {0, Connected} = cmd(A, ["rpc", "net_kernel", "connect_node", io_lib:format("['~ts']", [NodeB])]),
    ?assertEqual("true", output(Connected)),
    {0, Nodes} = cmd(A, ["rpc", "erlang", "nodes"]),
    ?assertEqual(fmt("['~ts']", [NodeB]), output(Nodes)),
    {0, Seq} = cmd(A, ["rpc", "lists", "seq", "[1, 3]"]),
    ?assertEqual("[1, 2, 3]", output(Seq)).

%% `eval' evaluates on the node: here a call from A to B over their macula connection,
%% and A's counters of it.
relx_eval(Config) ->
    {A, #{node := NodeB}} = nodes_of(Config),
    {0, Answer} = cmd(A, ["eval", io_lib:format("erpc:call('~ts', erlang, node, []).", [NodeB])]),
    ?assertEqual(fmt("'~ts'", [NodeB]), output(Answer)),
    {0, Traffic} = cmd(A, ["eval", io_lib:format("#{bytes_sent := S, bytes_received := R} = "
                                                 "maps:get('~ts', macula_dist:info()), S > 0 andalso R > 0.",
                                                 [NodeB])]),
    ?assertEqual("true", output(Traffic)).

%% `remote_console' on a terminal (test/macula_release_SUITE_data/on_a_terminal.py
%% types as a person would): the expression runs on the node (its node name and OS
%% pid), and leaving the shell leaves the node running.
relx_remote_console(Config) ->
    {A, _B} = nodes_of(Config),
    Pid = os_pid(A, Config),
    {0, _} = on_a_terminal(A, Config, "remote_console",
                           "io:format(\"remsh:~s:~s~n\", [node(), os:getpid()]).",
                           fmt("remsh:~ts:~b", [maps:get(node, A), Pid])),
    ?assertEqual(Pid, os_pid(A, Config)).

%% Runs `bin/APP Command' on a pseudo-terminal: waits for the shell prompt, types
%% `Line', waits for `Answer' (a literal), leaves the shell with Ctrl-G q.
on_a_terminal(N, Config, Command, Line, Answer) ->
    Driver = filename:join(?config(data_dir, Config), "on_a_terminal.py"),
    AnswerRe = re:replace(Answer, "[.^$*+?()\\[\\]{}|\\\\]", "\\\\&", [global, {return, list}]),
    cmd(N#{script => "python3"}, [Driver, "60", "\\d+> ", AnswerRe, Line,
                                  maps:get(script, N), Command]).

%% `restart' restarts the node's applications in the same OS process (net_kernel is a
%% new process afterwards), three times in a row, each time with A connected to B: the
%% new incarnation listens on its port again at once and answers `ping'. (Once in a
%% loaded full run the new incarnation found the port still held by the old one's
%% endpoint, whose terms the VM had not yet collected, and halted.)
relx_restart(Config) ->
    {A, B} = nodes_of(Config),
    Pid = os_pid(B, Config),
    [restart(A, B, Config) || _ <- lists:seq(1, 3)],
    ?assertEqual(Pid, os_pid(B, Config)).

restart(A, #{node := NodeB} = B, Config) ->
    ?assertEqual({0, <<"true">>}, ask(A, Config, fmt("net_kernel connect_node ['~ts']", [NodeB]))),
    {0, Kernel} = ask(B, Config, "erlang whereis [net_kernel]"),
    {0, _} = cmd(B, ["restart"]),
    ok = ?P:wait_until(fun() ->
                               case ask(B, Config, "erlang whereis [net_kernel]") of
                                   {0, Kernel} -> false;
                                   {0, <<"<", _/binary>>} -> true;
                                   _ -> false
                               end
                       end, 60000, 500),
    {0, Pong} = cmd(B, ["ping"]),
    ?assertEqual("pong", output(Pong)).

%% `stop' returns once the OS process has gone; `ping' then says so.
relx_stop(Config) ->
    {A, B} = nodes_of(Config),
    Pids = [os_pid(N, Config) || N <- [A, B]],
    [{0, _}, {0, _}] = ?P:parallel([fun() -> cmd(N, ["stop"]) end || N <- [A, B]]),
    [?assertNot(?P:is_os_alive(P)) || P <- Pids],
    {1, NotRunning} = cmd(A, ["ping"]),
    ?assertEqual("Node is not running!", output(NotRunning)).

%% `foreground' runs the node in the script's process; `stop' ends it.
relx_foreground(Config) ->
    {A, _B} = nodes_of(Config),
    Log = filename:join(maps:get(dir, A), "foreground.log"),
    {0, _} = run(maps:get(dir, A), ["nohup bin/relapp foreground > ", quote(Log), " 2>&1 &"],
                 [], "", 10),
    ok = wait_alive(A, Config),
    {0, Pong} = cmd(A, ["ping"]),
    ?assertEqual("pong", output(Pong)),
    Pid = os_pid(A, Config),
    {0, _} = cmd(A, ["stop"]),
    ?assertNot(?P:is_os_alive(Pid)).

%% `console' with its input from a pipe runs the release with a shell on it.
relx_console(Config) ->
    {A, _B} = nodes_of(Config),
    {0, Out} = cmd(A, ["console"], "io:format(\"console:~s~n\", [node()]), halt().\n"),
    ?assertNotEqual(nomatch, string:find(Out, io_lib:format("console:~ts", [maps:get(node, A)])), Out).

%%% ------------------------------------------------------------------------------------
%%% mix release
%%% ------------------------------------------------------------------------------------

%% `bin/mixapp daemon' returns at once; the nodes come up.
mix_daemon(Config) ->
    {A, B} = nodes_of(Config),
    [{0, _}, {0, _}] = [cmd(N, ["daemon"]) || N <- [A, B]],
    [ok, ok] = [wait_alive(N, Config) || N <- [A, B]].

%% `eval' runs on a fresh VM of the release, distribution or not.
mix_eval(Config) ->
    {A, _B} = nodes_of(Config),
    {0, Out} = cmd(A, ["eval", "IO.puts(Enum.sum([1, 2, 3]))"]),
    ?assertEqual("6", output(Out)).

%% `rpc' runs on the node: A connects to B over macula.
mix_rpc(Config) ->
    {A, #{node := NodeB}} = nodes_of(Config),
    {0, Me} = cmd(A, ["rpc", "IO.puts(node())"]),
    ?assertEqual(atom_to_list(maps:get(node, A)), output(Me)),
    {0, Connected} = cmd(A, ["rpc", io_lib:format("IO.inspect(Node.connect(:\"~ts\"))", [NodeB])]),
    ?assertEqual("true", output(Connected)),
    {0, Remote} = cmd(A, ["rpc", io_lib:format("IO.puts(:erpc.call(:\"~ts\", :erlang, :node, []))", [NodeB])]),
    ?assertEqual(atom_to_list(NodeB), output(Remote)).

mix_pid(Config) ->
    {A, _B} = nodes_of(Config),
    {0, Out} = cmd(A, ["pid"]),
    ?assertEqual(os_pid(A, Config), list_to_integer(output(Out))).

%% `remote' on a terminal: the expression runs on the node; leaving the shell leaves
%% the node running.
mix_remote(Config) ->
    {A, _B} = nodes_of(Config),
    Pid = os_pid(A, Config),
    {0, _} = on_a_terminal(A, Config, "remote", "IO.puts(\"remote:#{node()}:#{System.pid()}\")",
                           fmt("remote:~ts:~b", [maps:get(node, A), Pid])),
    ?assertEqual(Pid, os_pid(A, Config)).

mix_stop(Config) ->
    {A, B} = nodes_of(Config),
    Pids = [os_pid(N, Config) || N <- [A, B]],
    [{0, _}, {0, _}] = [cmd(N, ["stop"]) || N <- [A, B]],
    [ok = ?P:wait_until(fun() -> not ?P:is_os_alive(P) end, 30000) || P <- Pids].

%% `start' runs the node in the script's process; `stop' ends it.
mix_start(Config) ->
    {A, _B} = nodes_of(Config),
    Log = filename:join(maps:get(dir, A), "start.log"),
    {0, _} = run(maps:get(dir, A), ["nohup bin/mixapp start > ", quote(Log), " 2>&1 &"],
                 maps:get(env, A), "", 10),
    ok = wait_alive(A, Config),
    Pid = os_pid(A, Config),
    {0, _} = cmd(A, ["stop"]),
    ok = ?P:wait_until(fun() -> not ?P:is_os_alive(Pid) end, 30000).
