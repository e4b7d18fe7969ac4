%%% @doc Helpers of macula_security_SUITE.
%%%
%%% Test-node side: runs the `macula_hostile' tool (the workspace crate
%%% native/macula_hostile, built by the `ct' pre-hook in rebar.config before any suite
%%% runs) as an OS process through a port. Every
%%% tool run is owned by a runner process (macula_tool_runner) that collects the tool's
%%% output lines; the runners are remembered by a tracker (macula_test_tracker), so
%%% {@link stop_all/0} (called from
%%% `end_per_testcase', even after a crashed or timed-out case) SIGKILLs every tool
%%% still running. The tool is also started with `MACULA_HOSTILE_EXIT_ON_EOF=1', so it
%%% exits by itself when its port (stdin) closes.
%%%
%%% Node side (called through macula_test_peer:call/4): a logger handler that keeps
%%% every log event of the node in an ETS table, so a case can check what the node
%%% logged about a refused connection.
-module(macula_hostile).

%% Test-node side
-export([repo_root/0, install/2, start/2, lines/1, status/1, await_line/3, await_exit/2,
         stop/1, stop_all/0]).
%% Node side
-export([capture_logs/0, logs/0, log/2]).

-define(TRACKER, macula_hostile_tracker).
-define(LOG_TABLE, macula_hostile_logs).
-define(LOG_HANDLER, macula_hostile_capture).

-type tool() :: pid().
-export_type([tool/0]).

%%% ------------------------------------------------------------------------------------
%%% Finding the tool
%%% ------------------------------------------------------------------------------------

%% @doc The checkout macula_dist was built from: the first directory above the loaded
%% macula_dist.beam that holds the cargo workspace (Cargo.toml and native/macula_hostile).
-spec repo_root() -> string().
repo_root() ->
    Beam = code:which(macula_dist),
    case find_root(filename:dirname(filename:absname(Beam))) of
        {ok, Root} -> Root;
        error -> error({repo_root_not_found_above, Beam})
    end.

find_root("/") ->
    error;
find_root(Dir) ->
    case filelib:is_regular(filename:join(Dir, "Cargo.toml"))
        andalso filelib:is_regular(filename:join([Dir, "native", "macula_hostile", "Cargo.toml"])) of
        true -> {ok, Dir};
        false -> find_root(filename:dirname(Dir))
    end.

%% @doc Copies the tool cargo built (target/release/macula_hostile, or under
%% `CARGO_TARGET_DIR') to `DestDir', so a rebuild during the run cannot change it.
%% `{ok, Path}', or `{error, {not_built, Path, HowToBuild}}'.
-spec install(string(), string()) -> {ok, string()} | {error, {not_built, string(), string()}}.
install(Root, DestDir) ->
    Target = case os:getenv("CARGO_TARGET_DIR") of
                 false -> filename:join(Root, "target");
                 "" -> filename:join(Root, "target");
                 Dir -> filename:absname(Dir, Root)
             end,
    Built = filename:join([Target, "release", "macula_hostile"]),
    case filelib:is_regular(Built) of
        true ->
            Dest = filename:join(DestDir, "macula_hostile"),
            {ok, _} = file:copy(Built, Dest),
            ok = file:change_mode(Dest, 8#755),
            {ok, Dest};
        false ->
            {error, {not_built, Built, "cargo build --release --locked -p macula_hostile "
                                       "(rebar3 ct runs it first)"}}
    end.

%%% ------------------------------------------------------------------------------------
%%% Running the tool
%%% ------------------------------------------------------------------------------------

%% @doc Starts the tool with `Args'; returns at once.
-spec start(string(), [string()]) -> tool().
start(Bin, Args) ->
    case macula_tool_runner:start(Bin, Args, [{"MACULA_HOSTILE_EXIT_ON_EOF", "1"}]) of
        {ok, Runner} ->
            ok = macula_test_tracker:add(?TRACKER, Runner),
            Runner;
        {error, Why} ->
            error({tool_start_failed, Bin, Args, Why})
    end.

%% @doc Every line the tool printed so far (stdout and stderr), oldest first.
-spec lines(tool()) -> [binary()].
lines(Tool) ->
    {Lines, _Status} = macula_tool_runner:output(Tool),
    Lines.

%% @doc `running' or `{exited, Status}'.
-spec status(tool()) -> macula_tool_runner:status().
status(Tool) ->
    {_Lines, Status} = macula_tool_runner:output(Tool),
    Status.

%% @doc Waits until the tool prints a line that starts with `Prefix'.
-spec await_line(tool(), binary(), timeout()) -> {ok, binary()} | {timeout, [binary()]}.
await_line(Tool, Prefix, Timeout) ->
    Deadline = erlang:monotonic_time(millisecond) + Timeout,
    await_line_loop(Tool, Prefix, Deadline).

await_line_loop(Tool, Prefix, Deadline) ->
    {Lines, Status} = macula_tool_runner:output(Tool),
    case [L || L <- Lines, binary:longest_common_prefix([L, Prefix]) =:= byte_size(Prefix)] of
        [Line | _] ->
            {ok, Line};
        [] ->
            case Status =/= running orelse erlang:monotonic_time(millisecond) >= Deadline of
                true -> {timeout, Lines};
                false -> timer:sleep(20), await_line_loop(Tool, Prefix, Deadline)
            end
    end.

%% @doc Waits until the tool exits: `{ok, ExitStatus, Lines}', or `{timeout, Lines}'
%% (the tool is then still running).
-spec await_exit(tool(), timeout()) -> {ok, integer(), [binary()]} | {timeout, [binary()]}.
await_exit(Tool, Timeout) ->
    Deadline = erlang:monotonic_time(millisecond) + Timeout,
    await_exit_loop(Tool, Deadline).

await_exit_loop(Tool, Deadline) ->
    case macula_tool_runner:output(Tool) of
        {Lines, {exited, Status}} ->
            {ok, Status, Lines};
        {Lines, running} ->
            case erlang:monotonic_time(millisecond) >= Deadline of
                true -> {timeout, Lines};
                false -> timer:sleep(50), await_exit_loop(Tool, Deadline)
            end
    end.

%% @doc SIGKILLs the tool if it still runs; returns its output.
-spec stop(tool()) -> [binary()].
stop(Tool) ->
    Lines = case catch macula_tool_runner:kill(Tool) of
                {L, _} when is_list(L) -> L;
                _ -> []
            end,
    ok = macula_test_tracker:remove(?TRACKER, Tool),
    Lines.

%% @doc Stops every tool started since the last stop_all/0.
-spec stop_all() -> ok.
stop_all() ->
    [catch stop(T) || T <- macula_test_tracker:list(?TRACKER)],
    ok.

%%% ------------------------------------------------------------------------------------
%%% Node side: capturing log events
%%% ------------------------------------------------------------------------------------

%% @doc Starts keeping every log event of this node (idempotent).
-spec capture_logs() -> ok.
capture_logs() ->
    case ets:info(?LOG_TABLE, name) of
        undefined ->
            Parent = self(),
            Holder = spawn(fun() ->
                                   _ = ets:new(?LOG_TABLE, [named_table, public, ordered_set]),
                                   Parent ! {self(), table},
                                   receive stop -> ok end
                           end),
            receive {Holder, table} -> ok end;
        _ ->
            ok
    end,
    case logger:add_handler(?LOG_HANDLER, ?MODULE, #{level => all}) of
        ok -> ok;
        {error, {already_exist, _}} -> ok
    end.

%% @doc Every log event captured so far, as text, oldest first.
-spec logs() -> [binary()].
logs() ->
    [Text || {_, Text} <- ets:tab2list(?LOG_TABLE)].

%% @private logger handler callback.
log(#{level := Level, msg := Msg, meta := Meta}, _Config) ->
    Text = try format(Msg, Meta)
           catch _:_ -> io_lib:format("~tp", [Msg])
           end,
    ets:insert(?LOG_TABLE, {erlang:unique_integer([monotonic, positive]),
                            unicode:characters_to_binary(io_lib:format("[~p] ~ts", [Level, Text]))}),
    ok.

format({string, String}, _Meta) ->
    unicode:characters_to_list(String);
format({report, Report}, #{report_cb := Cb}) when is_function(Cb, 1) ->
    {Format, Args} = Cb(Report),
    io_lib:format(Format, Args);
format({report, Report}, _Meta) ->
    io_lib:format("~tp", [Report]);
format({Format, Args}, _Meta) ->
    io_lib:format(Format, Args).
