%%% @doc `erl_call' for nodes that run the macula carrier.
%%%
%%% OTP's `erl_call' speaks only TCP distribution and EPMD, so release start scripts
%%% (relx's `bin/app ping|pid|rpc|eval|stop|restart', and its `daemon', which waits
%%% for `erlang:is_alive/0') cannot reach a macula node with it. `priv/macula_call'
%%% (a shell launcher for this module) takes the same command line: it starts a
%%% short-lived hidden node with `-proto_dist macula', connects to the target node,
%%% runs the call, prints the answer the way `erl_call' does and halts. Installed as
%%% the release's `erts-VSN/bin/erl_call', it is what relx's script runs (README,
%%% "Release admin commands").
%%%
%%% Flags: `-name|-n Node', `-sname Node', `-address [Host:]Port' (the node
%%% `Port@Host'), `-c Cookie', `-timeout Seconds', `-a "Mod Fun [Args]"', `-e'
%%% (expressions from stdin, answers `{ok, Value}'), `-q' (halt the node), `-r', `-R',
%%% `-h Name' (accepted and ignored: the helper's name is always {@link helper_name/1}),
%%% `-v'. Exit status 0 when the call was made (its answer may be `{badrpc, ...}', as
%%% with erl_call), 1 when the node cannot be reached or the command line is wrong.
-module(macula_call).

-export([main/0, main/1]).
%% Exported for the EUnit tests.
-export([parse_args/1, parse_apply/1, format/1, helper_name/1]).

%% Seconds a connection attempt may take. Admin commands run next to the node, and
%% relx's `daemon' and `stop' poll until the node answers (or stops answering), so
%% an unreachable node must be reported quickly.
-define(SETUP_TIME_S, 3).

-record(call, {node :: node() | undefined,
               names = longnames :: longnames | shortnames,
               cookie :: atom() | undefined,
               timeout = infinity :: timeout(),
               action :: {apply, string()} | eval | halt | undefined}).

%%% ------------------------------------------------------------------------------------
%%% Entry points
%%% ------------------------------------------------------------------------------------

%% @doc Entry point of `priv/macula_call' (`-s macula_call main -extra Args...').
-spec main() -> no_return().
main() ->
    main(init:get_plain_arguments()).

-spec main([string()]) -> no_return().
main(Args) ->
    Status = case parse_args(Args) of
                 {ok, Call} -> run(Call);
                 {error, Why} -> fail("~ts~n~ts", [Why, usage()])
             end,
    erlang:halt(Status).

usage() ->
    "usage: macula_call (-name Node | -sname Node | -address [Host:]Port) [-c Cookie]\n"
    "                   [-timeout Seconds] (-a \"Mod Fun [Args]\" | -e | -q)".

fail(Format, Args) ->
    io:format(standard_error, "macula_call: " ++ Format ++ "~n", Args),
    1.

%%% ------------------------------------------------------------------------------------
%%% The command line
%%% ------------------------------------------------------------------------------------

%% @doc The call a command line asks for.
-spec parse_args([string()]) -> {ok, #call{}} | {error, string()}.
parse_args(Args) ->
    case parse_args(Args, #call{}) of
        {ok, #call{node = undefined}} -> {error, "no node given (-name, -sname or -address)"};
        {ok, #call{action = undefined}} -> {error, "nothing to do (-a, -e or -q)"};
        Other -> Other
    end.

parse_args([Flag, Node | Rest], C) when Flag =:= "-name"; Flag =:= "-n" ->
    parse_args(Rest, C#call{node = full_name(Node), names = longnames});
parse_args(["-sname", Node | Rest], C) ->
    parse_args(Rest, C#call{node = full_name(Node), names = shortnames});
parse_args(["-address", Address | Rest], C) ->
    case address_node(Address) of
        {ok, Node} -> parse_args(Rest, C#call{node = Node});
        error -> {error, "bad -address " ++ Address ++ " (expected [Host:]Port)"}
    end;
parse_args(["-c", Cookie | Rest], C) ->
    parse_args(Rest, C#call{cookie = list_to_atom(Cookie)});
parse_args([Flag, Seconds | Rest], C) when Flag =:= "-timeout"; Flag =:= "-t" ->
    try list_to_integer(Seconds) of
        S when S > 0 -> parse_args(Rest, C#call{timeout = S * 1000});
        _ -> {error, "bad -timeout " ++ Seconds}
    catch
        error:badarg -> {error, "bad -timeout " ++ Seconds}
    end;
parse_args(["-a", Apply | Rest], C) ->
    parse_args(Rest, C#call{action = {apply, Apply}});
parse_args(["-e" | Rest], C) ->
    parse_args(Rest, C#call{action = eval});
parse_args(["-q" | Rest], C) ->
    parse_args(Rest, C#call{action = halt});
parse_args(["-h", _HiddenName | Rest], C) ->
    parse_args(Rest, C);
parse_args([Flag | Rest], C) when Flag =:= "-r"; Flag =:= "-R" ->
    parse_args(Rest, C);
parse_args(["-v" | Rest], C) ->
    parse_args(Rest, C);
parse_args([], C) ->
    {ok, C};
parse_args([Other | _], _C) ->
    {error, "unsupported argument " ++ Other}.

%% erl_call adds this host's name to a node name without one.
full_name(Name) ->
    case lists:member($@, Name) of
        true -> list_to_atom(Name);
        false -> list_to_atom(Name ++ "@" ++ this_host())
    end.

%% A macula node's name is its UDP port: `-address 4433' is the node 4433@localhost's
%% address as this host names it.
address_node(Address) ->
    {Host, Port} = case string:split(Address, ":", trailing) of
                       [P] -> {"127.0.0.1", P};
                       [H, P] -> {H, P}
                   end,
    try list_to_integer(Port) of
        N when N > 0, N < 65536 -> {ok, list_to_atom(Port ++ "@" ++ Host)};
        _ -> error
    catch
        error:badarg -> error
    end.

this_host() ->
    {ok, Host} = inet:gethostname(),
    Host.

%%% ------------------------------------------------------------------------------------
%%% Running the call
%%% ------------------------------------------------------------------------------------

run(#call{node = Node} = C) ->
    case start_helper(C) of
        ok ->
            case net_kernel:connect_node(Node) of
                true -> act(C);
                _ -> fail("failed to connect to node ~ts", [Node])
            end;
        {error, Why} ->
            fail("cannot start a macula node to call ~ts from: ~tp", [Node, Why])
    end.

%% A hidden node with a name of its own; the cookie is the one given, else the
%% one in ~/.erlang.cookie (as net_kernel reads it).
start_helper(#call{node = Node, names = Names, cookie = Cookie}) ->
    ok = application:set_env(kernel, net_setuptime, ?SETUP_TIME_S),
    [_, Host] = string:split(atom_to_list(Node), "@"),
    case net_kernel:start(helper_name(Host), #{name_domain => Names, hidden => true}) of
        {ok, _} when Cookie =:= undefined -> ok;
        {ok, _} -> erlang:set_cookie(Cookie), ok;
        {error, _} = Error -> Error
    end.

%% @doc The helper node's name: `Port@Host' with a UDP port that was free a moment
%% ago, on the host the target node is named by (admin commands run beside the node).
-spec helper_name(string()) -> node().
helper_name(Host) ->
    Family = case inet:parse_address(Host) of
                 {ok, Ip} when tuple_size(Ip) =:= 8 -> inet6;
                 _ -> inet
             end,
    {ok, Socket} = gen_udp:open(0, [Family]),
    {ok, Port} = inet:port(Socket),
    ok = gen_udp:close(Socket),
    list_to_atom(integer_to_list(Port) ++ "@" ++ Host).

act(#call{node = Node, action = {apply, Apply}, timeout = Timeout}) ->
    case parse_apply(Apply) of
        {ok, M, F, A} ->
            print(rpc:call(Node, M, F, A, Timeout)),
            0;
        {error, Why} ->
            fail("~ts", [Why])
    end;
act(#call{node = Node, action = eval, timeout = Timeout}) ->
    Text = read_stdin([]),
    print(case parse_exprs(Text) of
              {ok, Exprs} ->
                  case rpc:call(Node, erl_eval, exprs, [Exprs, []], Timeout) of
                      {value, Value, _Bindings} -> {ok, Value};
                      {badrpc, Reason} -> {error, Reason}
                  end;
              {error, _} = Error ->
                  Error
          end),
    0;
act(#call{node = Node, action = halt, timeout = Timeout}) ->
    %% Answered by the connection going down.
    _ = rpc:call(Node, erlang, halt, [], Timeout),
    0.

%% "Mod Fun [Args]": Args, if any, is an Erlang list.
parse_apply(Apply) ->
    case re:run(Apply, "^\\s*(\\S+)\\s+(\\S+)\\s*(.*)$", [{capture, all_but_first, list}, dotall, unicode]) of
        {match, [M, F, ""]} ->
            {ok, list_to_atom(M), list_to_atom(F), []};
        {match, [M, F, ArgsText]} ->
            case parse_term(ArgsText) of
                {ok, Args} when is_list(Args) -> {ok, list_to_atom(M), list_to_atom(F), Args};
                _ -> {error, "the arguments of -a must be an Erlang list: " ++ ArgsText}
            end;
        nomatch ->
            {error, "-a wants \"Mod Fun [Args]\", got: " ++ Apply}
    end.

parse_term(Text) ->
    case erl_scan:string(Text ++ ".") of
        {ok, Tokens, _} -> erl_parse:parse_term(Tokens);
        {error, _, _} = Error -> Error
    end.

parse_exprs(Text) ->
    case erl_scan:string(Text) of
        {ok, Tokens, _} ->
            case erl_parse:parse_exprs(Tokens) of
                {ok, Exprs} -> {ok, Exprs};
                {error, {_, erl_parse, Message}} -> {error, "*** " ++ lists:flatten(erl_parse:format_error(Message))}
            end;
        {error, {_, erl_scan, Message}, _} ->
            {error, "*** " ++ lists:flatten(erl_scan:format_error(Message))}
    end.

read_stdin(Acc) ->
    case io:get_line(standard_io, "") of
        eof -> lists:flatten(lists:reverse(Acc));
        {error, _} -> lists:flatten(lists:reverse(Acc));
        Line -> read_stdin([unicode:characters_to_list(Line) | Acc])
    end.

%% erl_call prints the answer without a newline.
print(Term) ->
    io:put_chars(format(Term)).

%% @doc A term as erl_call prints it: elements separated by ", ".
-spec format(term()) -> iodata().
format(Tuple) when is_tuple(Tuple) ->
    ["{", join([format(E) || E <- tuple_to_list(Tuple)]), "}"];
format([]) ->
    "[]";
format(List) when is_list(List) ->
    case io_lib:printable_unicode_list(List) of
        true -> io_lib:format("~0tp", [List]);
        false -> format_list(List, [])
    end;
format(Map) when is_map(Map) ->
    ["#{", join([[format(K), " => ", format(V)] || {K, V} <- maps:to_list(Map)]), "}"];
format(Other) ->
    io_lib:format("~0tp", [Other]).

format_list([H | T], Acc) when is_list(T) ->
    format_list(T, [format(H) | Acc]);
format_list([H | T], Acc) ->
    ["[", join(lists:reverse([format(H) | Acc])), " | ", format(T), "]"];
format_list([], Acc) ->
    ["[", join(lists:reverse(Acc)), "]"].

join(Parts) ->
    lists:join(", ", Parts).
