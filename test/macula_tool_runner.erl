%%% @doc One run of an external tool (an OS process through a port), keeping every line
%%% it prints (stdout and stderr) and its exit status until asked. Started unlinked, so
%%% a crashing test case does not take the record of what the tool printed with it.
-module(macula_tool_runner).
-behaviour(gen_server).

-export([start/3, output/1, kill/1]).
-export([sh/1, must/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

-define(CALL_TIMEOUT, 10000).

-type status() :: running | {exited, integer()}.
-export_type([status/0]).

-record(run, {port :: port(), os_pid :: pos_integer(), lines = [] :: [binary()],
              partial = <<>> :: binary(), status = running :: status()}).

%% @doc Starts `Bin' with `Args' and environment `Env'.
-spec start(string(), [string()], [{string(), string()}]) -> {ok, pid()} | {error, term()}.
start(Bin, Args, Env) ->
    gen_server:start(?MODULE, {Bin, Args, Env}, []).

%% @doc Every line printed so far, oldest first, and whether the tool still runs.
-spec output(pid()) -> {[binary()], status()}.
output(Runner) ->
    gen_server:call(Runner, output, ?CALL_TIMEOUT).

%% @doc SIGKILLs the tool if it still runs and ends the runner; returns the output.
-spec kill(pid()) -> {[binary()], status()}.
kill(Runner) ->
    gen_server:call(Runner, kill, ?CALL_TIMEOUT).

%% @doc Runs a shell command to its end (at most 30 s): its exit status (or `timeout')
%% and everything it printed.
-spec sh(string()) -> {integer() | timeout, string()}.
sh(Cmd) ->
    Port = open_port({spawn_executable, "/bin/sh"},
                     [{args, ["-c", Cmd]}, exit_status, stderr_to_stdout, binary, hide]),
    sh_collect(Port, []).

sh_collect(Port, Acc) ->
    receive
        {Port, {data, D}} -> sh_collect(Port, [D | Acc]);
        {Port, {exit_status, St}} -> {St, binary_to_list(iolist_to_binary(lists:reverse(Acc)))}
    after 30000 ->
            catch port_close(Port),
            {timeout, binary_to_list(iolist_to_binary(lists:reverse(Acc)))}
    end.

%% @doc Runs a shell command that must succeed: its output, or the test case fails
%% with the command, its status and its output.
-spec must(string()) -> string().
must(Cmd) ->
    case sh(Cmd) of
        {0, Out} -> Out;
        {St, Out} -> ct:fail({command_failed, Cmd, {exit_status, St}, string:trim(Out)})
    end.

init({Bin, Args, Env}) ->
    try open_port({spawn_executable, Bin},
                  [{args, Args}, {line, 16384}, binary, exit_status, use_stdio,
                   stderr_to_stdout, {env, Env}]) of
        Port ->
            {os_pid, OsPid} = erlang:port_info(Port, os_pid),
            {ok, #run{port = Port, os_pid = OsPid}}
    catch
        error:Why -> {stop, Why}
    end.

handle_call(output, _From, Run) ->
    {reply, output_of(Run), Run};
handle_call(kill, _From, Run = #run{status = running, os_pid = OsPid}) ->
    _ = os:cmd("kill -9 " ++ integer_to_list(OsPid)),
    {stop, normal, output_of(Run), Run};
handle_call(kill, _From, Run) ->
    {stop, normal, output_of(Run), Run}.

handle_cast(_Request, Run) ->
    {noreply, Run}.

handle_info({Port, {data, {eol, Data}}}, Run = #run{port = Port, lines = Lines, partial = Partial}) ->
    {noreply, Run#run{lines = [<<Partial/binary, Data/binary>> | Lines], partial = <<>>}};
handle_info({Port, {data, {noeol, Data}}}, Run = #run{port = Port, partial = Partial}) ->
    {noreply, Run#run{partial = <<Partial/binary, Data/binary>>}};
handle_info({Port, {exit_status, Code}}, Run = #run{port = Port}) ->
    {noreply, Run#run{status = {exited, Code}}}.

output_of(#run{lines = Lines, status = Status}) ->
    {lists:reverse(Lines), Status}.
