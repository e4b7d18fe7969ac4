%%% @doc Options of macula_dist, checked once at boot.
%%%
%%% Distribution starts before application environments are loaded (CARRIER-NOTES
%%% pitfall 2), so options come from init arguments, usable in `vm.args':
%%% <ul>
%%% <li>`-macula_dist_opt Key Value [Key Value ...]' (may be repeated);</li>
%%% <li>`-macula_dist_optfile Path': a file of Erlang terms `{Key, Value}.'</li>
%%% <li>`-macula_dist_port N', the same as `-macula_dist_opt port N'.</li>
%%% </ul>
%%% plus the kernel parameters `net_ticktime', `net_setuptime' and
%%% `inet_dist_use_interface'. A bad option stops the node at boot with a message
%%% naming the option and the reason; nothing falls back to a default silently.
%%%
%%% PKI mode (mutual TLS) is on when `certfile', `keyfile' and `cacertfile' are
%%% given; giving only some of them is an error. Here the files are only checked to be
%%% readable (with prim_file: there is no file server yet); the NIF parses them when the
%%% endpoint opens and fails the boot with `{tls, Why}' naming option and file
%%% (macula_dist_nif:listen_error()).
%%% `verify_name' (PKI mode only) makes each side check that the peer's certificate
%%% covers the host part of its node name (see macula_dist_auth).
-module(macula_dist_config).

-export([load/0, parse/1, defaults/0, nif_options/1, bind_ip/1, pki_mode/1]).

-export_type([config/0]).

-type config() :: #{atom() => term()}.

%% The one table of options: name, default, the check a value must pass, and who uses
%% it: `nif' options go to the NIF's listen/3 as they are (see nif_options/1), `erlang'
%% ones are read by the Erlang modules.
-define(OPTIONS,
        [%% 1: one ordered data stream (atom cache allowed); more: each sending process
         %% keeps to one of that many streams, plus a priority stream.
         {data_streams, 8, {integer, 1, 32}, nif},
         {stream_window, 8 bsl 20, {integer, 65536, 1 bsl 40}, nif},
         {send_window, 32 bsl 20, {integer, 65536, 1 bsl 40}, nif},
         {send_queue_limit, 8 bsl 20, {integer, 65536, 1 bsl 40}, nif},
         %% The most one send_data call frames on a scheduler thread.
         {send_batch, 1 bsl 20, {integer, 1024, 8 bsl 20}, erlang},
         {max_packet, 1 bsl 30, {integer, 1024, (1 bsl 32) - 1}, nif},
         %% Above 6500, ten GSO segments exceed the 64 KiB a UDP send may carry.
         {max_udp_payload, 6500, {integer, 1200, 6500}, nif},
         %% Received bytes handed to the input handler and not yet in the VM: how long
         %% a small message may wait there behind other senders' bulk data.
         {delivery_window, 2 bsl 20, {integer, 65536, 64 bsl 20}, nif},
         {max_pending_handshakes, 64, {integer, 1, 100000}, nif},
         {runtime_workers, 1, {integer, 1, 64}, nif},
         {congestion, cubic, {one_of, [cubic, bbr, new_reno]}, nif},
         %% Milliseconds of idleness before a QUIC keep-alive; bounds how soon a crashed
         %% peer's host answers with ICMP port unreachable (fail-fast, README).
         {liveness_interval, 500, {integer, 20, 60000}, nif},
         %% PKI mode: PEM files, all three or none.
         {certfile, undefined, file, nif},
         {keyfile, undefined, file, nif},
         {cacertfile, undefined, file, nif},
         {verify_name, false, boolean, erlang},
         %% Nodes named Name@Host (see macula_dist_discovery).
         {port, undefined, {integer, 1, 65535}, erlang},
         {address_book, undefined, address_book, erlang}]).

-define(PKI_FILES, [certfile, keyfile, cacertfile]).

%% @doc The defaults of every option.
-spec defaults() -> config().
defaults() ->
    maps:from_list([{Key, Default} || {Key, Default, _, _} <- ?OPTIONS]).

%% @doc Reads and checks the options given to this node.
-spec load() -> {ok, config()} | {error, {option, atom() | string(), term()}}.
load() ->
    try
        Pairs = file_options() ++ argument_options() ++ port_argument(),
        parse(Pairs)
    catch
        throw:{bad_option, Error} -> {error, Error}
    end.

%% @doc Checks `{Key, Value}' pairs (keys as atoms or strings, values as terms or
%% strings) against the option table and fills in defaults.
-spec parse([{atom() | string(), term()}]) -> {ok, config()} | {error, {option, atom() | string(), term()}}.
parse(Pairs) ->
    try
        {ok, check_mode(lists:foldl(fun parse_pair/2, defaults(), Pairs))}
    catch
        throw:{bad_option, Error} -> {error, Error}
    end.

parse_pair({Key0, Value0}, Acc) ->
    Key = option_key(Key0),
    {Key, _Default, Check, _Use} = lists:keyfind(Key, 1, ?OPTIONS),
    Acc#{Key => check(Key, Check, Value0)}.

option_key(Key) when is_atom(Key) -> option_key(atom_to_list(Key));
option_key(Key) when is_list(Key) ->
    case [K || {K, _, _, _} <- ?OPTIONS, atom_to_list(K) =:= Key] of
        [K] -> K;
        [] -> bad(Key, {unknown_option, known_options()})
    end;
option_key(Key) ->
    bad(Key, unknown_option).

known_options() ->
    [K || {K, _, _, _} <- ?OPTIONS].

check(Key, {integer, Min, Max}, Value) when is_list(Value) ->
    try list_to_integer(Value) of
        Int -> check(Key, {integer, Min, Max}, Int)
    catch
        error:badarg -> bad(Key, {not_an_integer, Value})
    end;
check(_Key, {integer, Min, Max}, Value) when is_integer(Value), Value >= Min, Value =< Max ->
    Value;
check(Key, {integer, Min, Max}, Value) when is_integer(Value) ->
    bad(Key, {out_of_range, Value, Min, Max});
check(Key, {integer, _Min, _Max}, Value) ->
    bad(Key, {not_an_integer, Value});
check(Key, {one_of, Values}, Value) ->
    Given = case Value of
                _ when is_atom(Value) -> atom_to_list(Value);
                _ -> Value
            end,
    case [V || V <- Values, atom_to_list(V) =:= Given] of
        [V] -> V;
        [] -> bad(Key, {not_one_of, Value, Values})
    end;
check(Key, boolean, Value) ->
    case Value of
        _ when is_boolean(Value) -> Value;
        "true" -> true;
        "false" -> false;
        _ -> bad(Key, {not_a_boolean, Value})
    end;
check(Key, file, Value) ->
    Path = case Value of
               _ when is_binary(Value) -> unicode:characters_to_list(Value);
               _ when is_atom(Value) -> atom_to_list(Value);
               _ -> Value
           end,
    case io_lib:printable_unicode_list(Path) of
        true when Path =/= "" -> check_readable(Key, Path);
        _ -> bad(Key, {not_a_file_name, Value})
    end;
check(Key, address_book, Value) ->
    Path = check(Key, file, Value),
    case macula_dist_book:load(Path) of
        {ok, _Book} -> Path;
        {error, Why} -> bad(Key, {Path, Why})
    end.

%% Reads the file once, so a missing, unreadable or directory path is reported here
%% with the option's name; its contents are checked by the NIF.
check_readable(Key, Path) ->
    case prim_file:read_file(Path) of
        {ok, _} -> Path;
        {error, Why} -> bad(Key, {Path, file:format_error(Why)})
    end.

%% All three PKI files or none; verify_name only means something in PKI mode.
check_mode(Config) ->
    Given = [Key || Key <- ?PKI_FILES, maps:get(Key, Config) =/= undefined],
    case Given of
        [] ->
            case maps:get(verify_name, Config) of
                true -> bad(verify_name, {needs_pki_mode, ?PKI_FILES});
                false -> Config
            end;
        ?PKI_FILES ->
            Config;
        _ ->
            [Missing | _] = ?PKI_FILES -- Given,
            bad(Missing, {missing_for_pki_mode, {given, Given}, {needed, ?PKI_FILES}})
    end.

%% @doc True when the configuration asks for PKI mode (mutual TLS).
-spec pki_mode(config()) -> boolean().
pki_mode(Config) ->
    maps:get(certfile, Config, undefined) =/= undefined.

-spec bad(term(), term()) -> no_return().
bad(Key, Why) ->
    throw({bad_option, {option, Key, Why}}).

argument_options() ->
    case init:get_argument(macula_dist_opt) of
        {ok, Lists} -> lists:append([pairs(List) || List <- Lists]);
        error -> []
    end.

%% The original project's vm.args option.
port_argument() ->
    case init:get_argument(macula_dist_port) of
        {ok, [[Port]]} -> [{port, Port}];
        {ok, [Values]} -> bad(macula_dist_port, {expected_one_port, Values});
        {ok, Given} -> bad(macula_dist_port, {given_more_than_once, Given});
        error -> []
    end.

pairs([Key, Value | Rest]) -> [{Key, Value} | pairs(Rest)];
pairs([]) -> [];
pairs([Key]) -> bad(Key, missing_value).

%% file:consult/1 is not available this early in boot (no file server yet).
file_options() ->
    case init:get_argument(macula_dist_optfile) of
        {ok, [[Path]]} -> consult(Path);
        {ok, Paths} -> bad(macula_dist_optfile, {given_more_than_once, Paths});
        error -> []
    end.

consult(Path) ->
    case prim_file:read_file(Path) of
        {ok, Bin} -> parse_terms(Path, binary_to_list(Bin));
        {error, Why} -> bad(macula_dist_optfile, {Path, file:format_error(Why)})
    end.

parse_terms(Path, Text) ->
    case erl_scan:string(Text) of
        {ok, Tokens, _} -> parse_forms(Path, Tokens);
        {error, Info, _} -> bad(macula_dist_optfile, {Path, Info})
    end.

parse_forms(_Path, []) ->
    [];
parse_forms(Path, Tokens) ->
    {Form, Rest} = lists:splitwith(fun(T) -> element(1, T) =/= dot end, Tokens),
    case Rest of
        [Dot | More] ->
            case erl_parse:parse_term(Form ++ [Dot]) of
                {ok, {Key, Value}} -> [{Key, Value} | parse_forms(Path, More)];
                {ok, Other} -> bad(macula_dist_optfile, {Path, {not_a_key_value_pair, Other}});
                {error, Info} -> bad(macula_dist_optfile, {Path, Info})
            end;
        [] ->
            bad(macula_dist_optfile, {Path, missing_final_dot})
    end.

%% @doc The map the NIF's listen/3 takes: every `nif' option of the table (PKI file
%% names as binaries, `undefined' in zero-configuration mode; `liveness_interval' in
%% milliseconds), the kernel timers in milliseconds, and an empty restart identity
%% (macula_dist:listen/2 fills it in).
-spec nif_options(config()) -> map().
nif_options(Config) ->
    Options = maps:from_list([{Key, nif_value(Check, maps:get(Key, Config))}
                              || {Key, _Default, Check, nif} <- ?OPTIONS]),
    Options#{node_name => <<>>, cookie => <<>>,
             tick_time_ms => kernel_seconds(net_ticktime, 60) * 1000,
             handshake_timeout_ms => kernel_seconds(net_setuptime, 7) * 1000}.

nif_value(file, undefined) -> undefined;
nif_value(file, Path) -> unicode:characters_to_binary(Path);
nif_value(_Check, Value) -> Value.

kernel_seconds(Key, Default) ->
    case application:get_env(kernel, Key) of
        {ok, Seconds} when is_integer(Seconds), Seconds > 0 -> Seconds;
        _ -> Default
    end.

%% @doc The address to bind: `inet_dist_use_interface' if set, else any address of the
%% node name's family.
-spec bind_ip(inet | inet6) -> inet:ip_address().
bind_ip(Family) ->
    case application:get_env(kernel, inet_dist_use_interface) of
        {ok, Ip} when is_tuple(Ip) -> Ip;
        _ when Family =:= inet6 -> {0, 0, 0, 0, 0, 0, 0, 0};
        _ -> {0, 0, 0, 0}
    end.
