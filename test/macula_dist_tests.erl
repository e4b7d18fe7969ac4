%%% @doc EUnit tests of the pure Erlang parts of macula_dist: node names
%%% (macula_dist:splitname/1, select/1, is_node_name/1, macula_dist_name), options
%%% (macula_dist_config) and per-connection options (macula_dist_ctrl:check_opts/1,
%%% get_opts/2). Nothing here loads the NIF or starts distribution.
-module(macula_dist_tests).

-include_lib("eunit/include/eunit.hrl").

%%% ------------------------------------------------------------------------------------
%%% Node names
%%% ------------------------------------------------------------------------------------

splitname_ipv4_test() ->
    ?assertEqual({4433, "192.168.1.100"}, macula_dist:splitname('4433@192.168.1.100')),
    ?assertEqual({4433, "127.0.0.1"}, macula_dist:splitname('4433@127.0.0.1')),
    ?assertEqual({1, "10.0.0.5"}, macula_dist:splitname('1@10.0.0.5')),
    ?assertEqual({65535, "10.0.0.5"}, macula_dist:splitname('65535@10.0.0.5')).

splitname_ipv6_test() ->
    ?assertEqual({4437, "::1"}, macula_dist:splitname('4437@::1')),
    ?assertEqual({4437, "2001:db8::42"}, macula_dist:splitname('4437@2001:db8::42')),
    ?assertEqual({4437, "fe80::1:2:3:4"}, macula_dist:splitname('4437@fe80::1:2:3:4')),
    ?assertEqual({4437, "::ffff:10.0.0.1"}, macula_dist:splitname('4437@::ffff:10.0.0.1')).

splitname_host_names_test() ->
    ?assertEqual({4433, "localhost"}, macula_dist:splitname('4433@localhost')),
    ?assertEqual({4433, "example.com"}, macula_dist:splitname('4433@example.com')),
    ?assertEqual({4433, "node-1.eu-west.example.org"},
                 macula_dist:splitname('4433@node-1.eu-west.example.org')),
    ?assertEqual({4433, "Host9"}, macula_dist:splitname('4433@Host9')),
    %% A fully qualified name with its root dot.
    ?assertEqual({4433, "example.com."}, macula_dist:splitname('4433@example.com.')),
    %% Labels may start with a digit (RFC 1123) as long as the name is not all digits.
    ?assertEqual({4433, "1.2.3.com"}, macula_dist:splitname('4433@1.2.3.com')).

splitname_bad_name_part_test_() ->
    [?_assertEqual(false, macula_dist:splitname(N))
     || N <- ['foo@host', '0@h', '65536@h', '99999@h', '123456@h', '-1@h', '@h',
              '44 33@h', '4433x@h', '0x10@h', '+80@h', '080@h', '04433@127.0.0.1']].

splitname_bad_shape_test_() ->
    [?_assertEqual(false, macula_dist:splitname(N))
     || N <- ['a@b@c', '1@b@c', '4433', '4433@', 'nonode@nohost', '']].

splitname_bad_host_test_() ->
    [?_assertEqual(false, macula_dist:splitname(N))
     || N <- ['4433@bad_host', '4433@1.2.3', '4433@1.2.3.4.5', '4433@256.1.1.1',
              '4433@-host', '4433@host-', '4433@a..b', '4433@.example.com',
              '4433@exa mple.com', '4433@host!', '4433@::1::2', '4433@127.0.0.1.',
              list_to_atom("4433@" ++ lists:duplicate(64, $a) ++ ".com")]].

%% Atoms stop at 255 characters, so a host name over 253 characters is checked on
%% a string.
name_too_long_host_test() ->
    Host254 = string:join(lists:duplicate(63, "abc"), ".") ++ ".ab",
    ?assertEqual(254, length(Host254)),
    ?assertEqual(false, macula_dist_name:split("4433@" ++ Host254)),
    Host253 = string:join(lists:duplicate(63, "abc"), ".") ++ ".a",
    ?assertEqual({4433, Host253}, macula_dist_name:split("4433@" ++ Host253)).

splitname_long_labels_test() ->
    Label63 = lists:duplicate(63, $a),
    ?assertEqual({4433, Label63 ++ ".com"},
                 macula_dist:splitname(list_to_atom("4433@" ++ Label63 ++ ".com"))).

splitname_non_atoms_test_() ->
    [?_assertEqual(false, macula_dist:splitname(T))
     || T <- [4433, <<"4433@127.0.0.1">>, {4433, "127.0.0.1"}, 1.5, self(), make_ref(),
              #{}]].

select_test_() ->
    [?_assert(macula_dist:select('4433@127.0.0.1')),
     ?_assert(macula_dist:select('4437@::1')),
     ?_assert(macula_dist:select('4433@localhost')),
     %% Name@Host nodes are located by macula_dist_discovery when connecting.
     ?_assert(macula_dist:select('foo@127.0.0.1')),
     ?_assertNot(macula_dist:select('70000@127.0.0.1')),
     ?_assertNot(macula_dist:select('4433@bad_host')),
     ?_assertNot(macula_dist:select('nonode@nohost'))].

is_node_name_test_() ->
    [?_assert(macula_dist:is_node_name('4433@192.168.1.100')),
     ?_assert(macula_dist:is_node_name('4437@::1')),
     ?_assert(macula_dist:is_node_name('foo@host')),
     ?_assertNot(macula_dist:is_node_name('a@b@c')),
     ?_assertNot(macula_dist:is_node_name(<<"4433@127.0.0.1">>)),
     ?_assertNot(macula_dist:is_node_name(42))].

name_port_test() ->
    ?assertEqual({ok, 4433}, macula_dist_name:port('4433')),
    ?assertEqual({ok, 4433}, macula_dist_name:port("4433")),
    ?assertEqual({error, {bad_port, "0"}}, macula_dist_name:port("0")),
    ?assertEqual({error, {bad_port, "65536"}}, macula_dist_name:port("65536")),
    ?assertEqual({error, {bad_port, "foo"}}, macula_dist_name:port(foo)),
    ?assertEqual({error, {bad_port, ""}}, macula_dist_name:port("")).

name_host_kind_test() ->
    ?assertEqual({ok, {ip, {127, 0, 0, 1}}}, macula_dist_name:host_kind("127.0.0.1")),
    ?assertEqual({ok, {ip, {0, 0, 0, 0, 0, 0, 0, 1}}}, macula_dist_name:host_kind("::1")),
    ?assertEqual({ok, {ip, {0, 0, 0, 0, 0, 0, 0, 1}}}, macula_dist_name:host_kind("[::1]")),
    ?assertEqual({ok, name}, macula_dist_name:host_kind("example.com")),
    ?assertEqual({error, {bad_host, "bad_host"}}, macula_dist_name:host_kind("bad_host")),
    ?assertEqual({error, {bad_host, "1.2.3"}}, macula_dist_name:host_kind("1.2.3")),
    ?assertEqual({error, {bad_host, ""}}, macula_dist_name:host_kind("")).

%%% ------------------------------------------------------------------------------------
%%% Options (macula_dist_config)
%%% ------------------------------------------------------------------------------------

defaults_test() ->
    ?assertEqual(#{data_streams => 8,
                   stream_window => 8 bsl 20,
                   send_window => 32 bsl 20,
                   send_queue_limit => 8 bsl 20,
                   send_batch => 1 bsl 20,
                   max_packet => 1 bsl 30,
                   max_udp_payload => 6500,
                   delivery_window => 2 bsl 20,
                   max_pending_handshakes => 64,
                   runtime_workers => 1,
                   congestion => cubic,
                   liveness_interval => 500,
                   certfile => undefined,
                   keyfile => undefined,
                   cacertfile => undefined,
                   verify_name => false,
                   port => undefined,
                   address_book => undefined},
                 macula_dist_config:defaults()).

congestion_option_test_() ->
    [?_assertMatch({ok, #{congestion := bbr}}, macula_dist_config:parse([{"congestion", "bbr"}])),
     ?_assertMatch({ok, #{congestion := new_reno}}, macula_dist_config:parse([{congestion, new_reno}])),
     ?_assertMatch({error, {option, congestion, {not_one_of, "vegas", _}}},
                   macula_dist_config:parse([{"congestion", "vegas"}]))].

not_an_integer_term_test() ->
    ?assertMatch({error, {option, send_batch, {not_an_integer, 2048.0}}},
                 macula_dist_config:parse([{send_batch, 2048.0}])).

parse_empty_gives_defaults_test() ->
    ?assertEqual({ok, macula_dist_config:defaults()}, macula_dist_config:parse([])).

parse_atom_keys_integer_values_test() ->
    {ok, C} = macula_dist_config:parse([{stream_window, 65536}, {runtime_workers, 4}]),
    ?assertEqual(65536, maps:get(stream_window, C)),
    ?assertEqual(4, maps:get(runtime_workers, C)),
    ?assertEqual(maps:get(send_window, macula_dist_config:defaults()), maps:get(send_window, C)).

%% -macula_dist_opt Key Value gives strings for both.
parse_string_keys_and_values_test() ->
    {ok, C} = macula_dist_config:parse([{"stream_window", "131072"},
                                        {"delivery_window", "100000"},
                                        {"max_udp_payload", "1200"}]),
    ?assertEqual(131072, maps:get(stream_window, C)),
    ?assertEqual(100000, maps:get(delivery_window, C)),
    ?assertEqual(1200, maps:get(max_udp_payload, C)),
    %% Keys are atoms in the result whatever they were given as.
    ?assertEqual(lists:sort(maps:keys(macula_dist_config:defaults())), lists:sort(maps:keys(C))).

parse_atom_key_string_value_test() ->
    ?assertMatch({ok, #{send_batch := 2048}}, macula_dist_config:parse([{send_batch, "2048"}])).

parse_last_value_wins_test() ->
    ?assertMatch({ok, #{runtime_workers := 3}},
                 macula_dist_config:parse([{runtime_workers, 2}, {"runtime_workers", "3"}])).

parse_bounds_are_inclusive_test() ->
    ?assertMatch({ok, #{max_udp_payload := 1200}}, macula_dist_config:parse([{max_udp_payload, 1200}])),
    ?assertMatch({ok, #{max_udp_payload := 6500}}, macula_dist_config:parse([{max_udp_payload, 6500}])),
    ?assertMatch({ok, #{data_streams := 1}}, macula_dist_config:parse([{data_streams, 1}])),
    ?assertMatch({ok, #{data_streams := 32}}, macula_dist_config:parse([{data_streams, "32"}])),
    ?assertMatch({ok, #{max_packet := 4294967295}}, macula_dist_config:parse([{max_packet, "4294967295"}])).

parse_unknown_option_test() ->
    Known = lists:sort(maps:keys(macula_dist_config:defaults())),
    {error, {option, "no_such_option", {unknown_option, Listed}}} =
        macula_dist_config:parse([{"no_such_option", "1"}]),
    ?assertEqual(Known, lists:sort(Listed)),
    %% An atom key is reported as given or as its text (the spec allows both).
    {error, {option, Key, {unknown_option, _}}} = macula_dist_config:parse([{no_such_option, 1}]),
    ?assert(lists:member(Key, [no_such_option, "no_such_option"])),
    %% A key that is neither atom nor string.
    ?assertMatch({error, {option, 42, unknown_option}}, macula_dist_config:parse([{42, 1}])),
    %% A bad option after good ones is still found.
    ?assertMatch({error, {option, _, {unknown_option, _}}},
                 macula_dist_config:parse([{stream_window, 65536}, {"bogus", "1"}])).

parse_out_of_range_test() ->
    Max40 = 1 bsl 40,
    ?assertEqual({error, {option, stream_window, {out_of_range, 1, 65536, Max40}}},
                 macula_dist_config:parse([{stream_window, 1}])),
    ?assertEqual({error, {option, stream_window, {out_of_range, 65535, 65536, Max40}}},
                 macula_dist_config:parse([{"stream_window", "65535"}])),
    ?assertEqual({error, {option, max_udp_payload, {out_of_range, 6501, 1200, 6500}}},
                 macula_dist_config:parse([{max_udp_payload, 6501}])),
    ?assertEqual({error, {option, runtime_workers, {out_of_range, 0, 1, 64}}},
                 macula_dist_config:parse([{runtime_workers, "0"}])),
    ?assertEqual({error, {option, data_streams, {out_of_range, 33, 1, 32}}},
                 macula_dist_config:parse([{"data_streams", "33"}])),
    ?assertEqual({error, {option, send_batch, {out_of_range, 1 bsl 30, 1024, 8 bsl 20}}},
                 macula_dist_config:parse([{send_batch, 1 bsl 30}])),
    ?assertEqual({error, {option, max_packet, {out_of_range, 1 bsl 32, 1024, (1 bsl 32) - 1}}},
                 macula_dist_config:parse([{max_packet, 1 bsl 32}])).

parse_not_an_integer_test() ->
    ?assertEqual({error, {option, send_batch, {not_an_integer, "abc"}}},
                 macula_dist_config:parse([{"send_batch", "abc"}])),
    ?assertEqual({error, {option, send_batch, {not_an_integer, "1.5"}}},
                 macula_dist_config:parse([{send_batch, "1.5"}])),
    ?assertEqual({error, {option, send_batch, {not_an_integer, ""}}},
                 macula_dist_config:parse([{send_batch, ""}])),
    ?assertEqual({error, {option, send_batch, {not_an_integer, " 2048"}}},
                 macula_dist_config:parse([{send_batch, " 2048"}])),
    %% Terms that are not integers (from -macula_dist_optfile) are refused too.
    ?assertMatch({error, {option, send_batch, _}}, macula_dist_config:parse([{send_batch, 2048.0}])),
    ?assertMatch({error, {option, send_batch, _}}, macula_dist_config:parse([{send_batch, big}])),
    ?assertMatch({error, {option, send_batch, _}}, macula_dist_config:parse([{send_batch, <<"2048">>}])).

%% The EUnit node has no -macula_dist_opt / -macula_dist_optfile arguments.
load_without_arguments_gives_defaults_test() ->
    ?assertEqual(error, init:get_argument(macula_dist_opt)),
    ?assertEqual(error, init:get_argument(macula_dist_optfile)),
    ?assertEqual({ok, macula_dist_config:defaults()}, macula_dist_config:load()).

nif_options_test() ->
    Opts = macula_dist_config:nif_options(macula_dist_config:defaults()),
    ?assertEqual(lists:sort([data_streams, stream_window, send_window, send_queue_limit, max_packet,
                             max_udp_payload, delivery_window, max_pending_handshakes,
                             runtime_workers, congestion, tick_time_ms, handshake_timeout_ms,
                             certfile, keyfile, cacertfile, liveness_interval,
                             node_name, cookie]),
                 lists:sort(maps:keys(Opts))),
    %% The restart identity is filled in by macula_dist:listen/2; none by default.
    ?assertEqual({<<>>, <<>>}, {maps:get(node_name, Opts), maps:get(cookie, Opts)}),
    ?assertEqual(500, maps:get(liveness_interval, Opts)),
    ?assertEqual(8 bsl 20, maps:get(stream_window, Opts)),
    %% Zero-configuration mode: the PKI files are present, undefined.
    ?assertEqual({undefined, undefined, undefined}, {maps:get(certfile, Opts), maps:get(keyfile, Opts),
                                      maps:get(cacertfile, Opts)}),
    ?assert(is_integer(maps:get(tick_time_ms, Opts)) andalso maps:get(tick_time_ms, Opts) > 0),
    ?assert(is_integer(maps:get(handshake_timeout_ms, Opts))
            andalso maps:get(handshake_timeout_ms, Opts) > 0).

nif_options_follow_kernel_timers_test() ->
    Saved = [{K, application:get_env(kernel, K)} || K <- [net_ticktime, net_setuptime]],
    try
        ok = application:set_env(kernel, net_ticktime, 4),
        ok = application:set_env(kernel, net_setuptime, 3),
        Opts = macula_dist_config:nif_options(macula_dist_config:defaults()),
        ?assertEqual(4000, maps:get(tick_time_ms, Opts)),
        ?assertEqual(3000, maps:get(handshake_timeout_ms, Opts))
    after
        restore_kernel_env(Saved)
    end.

%%% PKI options: the files only have to be readable here (the NIF parses them).

pki_test_file(Name) ->
    Dir = filename:join(["/tmp", "macula_dist_tests_" ++ os:getpid()]),
    ok = filelib:ensure_dir(filename:join(Dir, "x")),
    Path = filename:join(Dir, Name),
    ok = file:write_file(Path, <<"-----BEGIN CERTIFICATE-----\n">>),
    Path.

pki_options_all_three_test() ->
    [C, K, A] = [pki_test_file(F) || F <- ["c.pem", "k.pem", "a.pem"]],
    {ok, Config} = macula_dist_config:parse([{"certfile", C}, {keyfile, list_to_binary(K)},
                                             {cacertfile, A}, {"verify_name", "true"}]),
    ?assertMatch(#{certfile := C, keyfile := K, cacertfile := A, verify_name := true}, Config),
    ?assert(macula_dist_config:pki_mode(Config)),
    ?assertNot(macula_dist_config:pki_mode(macula_dist_config:defaults())),
    Opts = macula_dist_config:nif_options(Config),
    ?assertEqual(list_to_binary(C), maps:get(certfile, Opts)),
    ?assertEqual(list_to_binary(K), maps:get(keyfile, Opts)),
    ?assertEqual(list_to_binary(A), maps:get(cacertfile, Opts)),
    ?assertMatch({ok, #{verify_name := false}},
                 macula_dist_config:parse([{certfile, C}, {keyfile, K}, {cacertfile, A},
                                           {verify_name, false}])).

pki_options_only_some_test() ->
    C = pki_test_file("c.pem"),
    ?assertMatch({error, {option, keyfile, {missing_for_pki_mode, {given, [certfile]}, _}}},
                 macula_dist_config:parse([{certfile, C}])),
    ?assertMatch({error, {option, certfile, {missing_for_pki_mode, {given, [keyfile, cacertfile]}, _}}},
                 macula_dist_config:parse([{keyfile, C}, {cacertfile, C}])),
    ?assertMatch({error, {option, cacertfile, {missing_for_pki_mode, _, _}}},
                 macula_dist_config:parse([{certfile, C}, {keyfile, C}])).

pki_options_bad_files_test() ->
    Missing = "/nonexistent/macula/cert.pem",
    ?assertEqual({error, {option, certfile, {Missing, "no such file or directory"}}},
                 macula_dist_config:parse([{"certfile", Missing}])),
    ?assertMatch({error, {option, cacertfile, {"/tmp", _}}},
                 macula_dist_config:parse([{cacertfile, "/tmp"}])),
    ?assertMatch({error, {option, keyfile, {not_a_file_name, ""}}},
                 macula_dist_config:parse([{keyfile, ""}])),
    ?assertMatch({error, {option, keyfile, {not_a_file_name, 42}}},
                 macula_dist_config:parse([{keyfile, 42}])).

verify_name_option_test() ->
    ?assertEqual({error, {option, verify_name, {not_a_boolean, "yes"}}},
                 macula_dist_config:parse([{"verify_name", "yes"}])),
    ?assertEqual({error, {option, verify_name, {not_a_boolean, 1}}},
                 macula_dist_config:parse([{verify_name, 1}])),
    %% Without the PKI files there is no certificate to check a name against.
    ?assertEqual({error, {option, verify_name, {needs_pki_mode, [certfile, keyfile, cacertfile]}}},
                 macula_dist_config:parse([{verify_name, "true"}])),
    ?assertMatch({ok, #{verify_name := false}}, macula_dist_config:parse([{verify_name, "false"}])).

bind_ip_test() ->
    Saved = [{inet_dist_use_interface, application:get_env(kernel, inet_dist_use_interface)}],
    try
        ok = application:unset_env(kernel, inet_dist_use_interface),
        ?assertEqual({0, 0, 0, 0}, macula_dist_config:bind_ip(inet)),
        ?assertEqual({0, 0, 0, 0, 0, 0, 0, 0}, macula_dist_config:bind_ip(inet6)),
        ok = application:set_env(kernel, inet_dist_use_interface, {127, 0, 0, 1}),
        ?assertEqual({127, 0, 0, 1}, macula_dist_config:bind_ip(inet))
    after
        restore_kernel_env(Saved)
    end.

restore_kernel_env(Saved) ->
    [case V of
         undefined -> application:unset_env(kernel, K);
         {ok, Value} -> application:set_env(kernel, K, Value)
     end || {K, V} <- Saved],
    ok.

%%% ------------------------------------------------------------------------------------
%%% Per-connection options (macula_dist_ctrl) and the listen-handle callbacks
%%% ------------------------------------------------------------------------------------

check_opts_test() ->
    ?assertEqual(ok, macula_dist_ctrl:check_opts([])),
    ?assertEqual(ok, macula_dist_ctrl:check_opts([{nodelay, true}])),
    ?assertEqual(ok, macula_dist_ctrl:check_opts([{nodelay, false}])),
    ?assertEqual(ok, macula_dist_ctrl:check_opts([{nodelay, false}, {nodelay, true}])),
    ?assertEqual({error, {unsupported_option, {nodelay, yes}}},
                 macula_dist_ctrl:check_opts([{nodelay, yes}])),
    ?assertEqual({error, {unsupported_option, {packet, 4}}},
                 macula_dist_ctrl:check_opts([{nodelay, true}, {packet, 4}])),
    ?assertEqual({error, {unsupported_option, nodelay}},
                 macula_dist_ctrl:check_opts([nodelay])),
    ?assertEqual({error, {badarg, nodelay}}, macula_dist_ctrl:check_opts(nodelay)),
    ?assertEqual({error, {badarg, bad_tail}},
                 macula_dist_ctrl:check_opts([{nodelay, true} | bad_tail])).

get_opts_test() ->
    ?assertEqual({ok, [{nodelay, true}]}, macula_dist_ctrl:get_opts([nodelay], #{})),
    ?assertEqual({ok, [{nodelay, false}]}, macula_dist_ctrl:get_opts([nodelay], #{nodelay => false})),
    ?assertEqual({ok, [{nodelay, true}]}, macula_dist_ctrl:get_opts([nodelay], #{nodelay => true})),
    ?assertEqual({ok, []}, macula_dist_ctrl:get_opts([], #{})),
    ?assertEqual({ok, [{nodelay, true}, {nodelay, true}]},
                 macula_dist_ctrl:get_opts([nodelay, nodelay], #{})),
    ?assertEqual({error, {unsupported_option, packet}},
                 macula_dist_ctrl:get_opts([nodelay, packet], #{})),
    ?assertError(function_clause, macula_dist_ctrl:get_opts(nodelay, #{})).

listen_handle_opts_test() ->
    ?assertEqual(ok, macula_dist:setopts(make_ref(), [{nodelay, true}])),
    ?assertMatch({error, _}, macula_dist:setopts(make_ref(), [{packet, 4}])),
    ?assertEqual({ok, [{nodelay, true}]}, macula_dist:getopts(make_ref(), [nodelay])).

childspecs_test() ->
    ?assertEqual({ok, []}, macula_dist:childspecs()).

%%% The log text of the NIF's typed errors (macula_dist_nif:format_error/1): boot
%%% messages name the option and the file.

format_error_names_option_and_file_test() ->
    ?assertEqual("keyfile /k.pem does not match the certificate in certfile /c.pem",
                 macula_dist_nif:format_error({tls, {key_mismatch, <<"/c.pem">>, <<"/k.pem">>}})),
    ?assertEqual("cacertfile /ca.pem: no certificate in file",
                 macula_dist_nif:format_error({tls, {file, cacertfile, <<"/ca.pem">>,
                                                     <<"no certificate in file">>}})),
    ?assertEqual("cannot bind udp [::1]:4433: address already in use",
                 macula_dist_nif:format_error({bind, {{0, 0, 0, 0, 0, 0, 0, 1}, 4433}, eaddrinuse})),
    ?assertEqual("port unreachable from 127.0.0.1:4433",
                 macula_dist_nif:format_error({unreachable, {port, {{127, 0, 0, 1}, 4433}}})),
    ?assertEqual("dropped: too many unauthenticated connections",
                 macula_dist_nif:format_error(overloaded)),
    %% Anything else (a configuration error) is printed as a term, on one line.
    ?assertEqual("{option,port,{out_of_range,0,1,65535}}",
                 macula_dist_nif:format_error({option, port, {out_of_range, 0, 1, 65535}})).
