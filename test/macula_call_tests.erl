%%% @doc EUnit tests of macula_call's command line and answer format (the calls
%%% themselves run against real release nodes in macula_release_SUITE).
-module(macula_call_tests).

-include_lib("eunit/include/eunit.hrl").

relx_command_lines_test() ->
    %% What relx's start script passes (erl_rpc and erl_eval).
    ?assertMatch({ok, _}, macula_call:parse_args(["-name", "4433@127.0.0.1", "-R", "-c", "secret",
                                                  "-timeout", "60", "-a", "erlang is_alive"])),
    ?assertMatch({ok, _}, macula_call:parse_args(["-R", "-c", "secret", "-address", "10.0.0.5:4433",
                                                  "-timeout", "60", "-e"])).

bad_command_lines_test() ->
    ?assertEqual({error, "no node given (-name, -sname or -address)"},
                 macula_call:parse_args(["-a", "erlang node"])),
    ?assertEqual({error, "nothing to do (-a, -e or -q)"},
                 macula_call:parse_args(["-name", "4433@127.0.0.1"])),
    ?assertEqual({error, "bad -timeout soon"},
                 macula_call:parse_args(["-name", "4433@127.0.0.1", "-timeout", "soon", "-q"])),
    ?assertEqual({error, "bad -address 70000 (expected [Host:]Port)"},
                 macula_call:parse_args(["-address", "70000", "-q"])),
    ?assertEqual({error, "unsupported argument -s"},
                 macula_call:parse_args(["-name", "4433@127.0.0.1", "-s", "-q"])).

erl_call_format_test() ->
    F = fun(T) -> lists:flatten(macula_call:format(T)) end,
    ?assertEqual("{ok, {3, \"s\"}}", F({ok, {3, "s"}})),
    ?assertEqual("[1, 2, 3]", F([1, 2, 3])),
    ?assertEqual("[a | b]", F([a | b])),
    ?assertEqual("'4433@127.0.0.1'", F('4433@127.0.0.1')),
    ?assertEqual("{badrpc, nodedown}", F({badrpc, nodedown})),
    ?assertEqual("<<\"ab\">>", F(<<"ab">>)),
    ?assertEqual("#{a => 1}", F(#{a => 1})).

helper_name_test() ->
    [Port, Host] = string:split(atom_to_list(macula_call:helper_name("127.0.0.1")), "@"),
    ?assertEqual("127.0.0.1", Host),
    ?assert(list_to_integer(Port) > 0).

apply_text_test() ->
    ?assertEqual({ok, erlang, erl, []}, macula_call:parse_apply("erlang erl")),
    ?assertEqual({ok, lists, seq, [1, 3]}, macula_call:parse_apply("  lists  seq [1, 3] ")),
    ?assertMatch({error, "the arguments of -a must be an Erlang list: x"}, macula_call:parse_apply("m f x")),
    ?assertMatch({error, _}, macula_call:parse_apply("erlang")).
