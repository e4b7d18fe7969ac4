%%% @doc EUnit tests of node names (macula_dist_name:parse/1, host/1), the address
%%% book (macula_dist_book), the `port' and `address_book' options and the port a node
%%% listens on (macula_dist_discovery:listen_port/2). No NIF, no distribution.
-module(macula_names_tests).

-include_lib("eunit/include/eunit.hrl").

%%% ------------------------------------------------------------------------------------
%%% Names
%%% ------------------------------------------------------------------------------------

parse_kinds_test_() ->
    [?_assertEqual({ok, {port, 4433, "10.0.0.5"}}, macula_dist_name:parse('4433@10.0.0.5')),
     ?_assertEqual({ok, {named, "app", "10.0.0.5"}}, macula_dist_name:parse('app@10.0.0.5')),
     ?_assertEqual({ok, {named, "app", "::1"}}, macula_dist_name:parse("app@::1")),
     ?_assertEqual({ok, {named, "undefined", "127.0.0.1"}}, macula_dist_name:parse(<<"undefined@127.0.0.1">>)),
     %% relx, nodetool and mix release helper names.
     ?_assertEqual({ok, {named, "maint1a2b3c4d-5380", "h.example"}},
                   macula_dist_name:parse('maint1a2b3c4d-5380@h.example')),
     ?_assertEqual({ok, {named, "rpc-8865-5325", "127.0.0.1"}}, macula_dist_name:parse('rpc-8865-5325@127.0.0.1')),
     ?_assertEqual({ok, {named, "rem-a1_b", "vm"}}, macula_dist_name:parse('rem-a1_b@vm')),
     %% A name part of digits that is no port is not taken for a name.
     ?_assertMatch({error, {bad_node_name, "name part is digits" ++ _}}, macula_dist_name:parse('70000@h')),
     ?_assertMatch({error, {bad_node_name, "name part is digits" ++ _}}, macula_dist_name:parse('080@h'))].

parse_refusals_say_why_test_() ->
    [?_assertEqual({error, {bad_node_name, "host part is neither an IP address nor a host name"}},
                   macula_dist_name:parse(<<"foo@under_score">>)),
     ?_assertEqual({error, {bad_node_name, "name part may only have letters, digits, '_' and '-'"}},
                   macula_dist_name:parse(<<"f o@127.0.0.1">>)),
     ?_assertEqual({error, {bad_node_name, "name part may only have letters, digits, '_' and '-'"}},
                   macula_dist_name:parse(<<"@127.0.0.1">>)),
     ?_assertEqual({error, {bad_node_name, "not of the form name@host"}}, macula_dist_name:parse(<<"a@b@c">>)),
     ?_assertEqual({error, {bad_node_name, "not of the form name@host"}}, macula_dist_name:parse(<<"host-only">>)),
     ?_assertEqual({error, {bad_node_name, "not UTF-8"}}, macula_dist_name:parse(<<"a", 255, "@h">>)),
     ?_assertEqual({error, {bad_node_name, "not a node name"}}, macula_dist_name:parse(42))].

host_test_() ->
    [?_assertEqual({ok, "10.0.0.5"}, macula_dist_name:host('4433@10.0.0.5')),
     ?_assertEqual({ok, "db1.example.org"}, macula_dist_name:host(<<"db@db1.example.org">>)),
     ?_assertMatch({error, {bad_node_name, _}}, macula_dist_name:host("x@"))].

%%% ------------------------------------------------------------------------------------
%%% Address book
%%% ------------------------------------------------------------------------------------

book_parse_test() ->
    Text = <<"# node host port\n"
             "\n"
             "app@10.0.0.5   10.0.0.5  4433\n"
             "\tdb@db1.example.org db1.example.org\t4500   # a comment\r\n"
             "app@10.0.0.6 fd00::6 4433\n"
             "   # indented comment\n">>,
    ?assertEqual({ok, #{<<"app@10.0.0.5">> => {"10.0.0.5", 4433},
                        <<"db@db1.example.org">> => {"db1.example.org", 4500},
                        <<"app@10.0.0.6">> => {"fd00::6", 4433}}},
                 macula_dist_book:parse(Text)).

book_errors_name_their_line_test_() ->
    [?_assertEqual({error, {line, 2, {expected_node_host_port, 2}}},
                   macula_dist_book:parse("a@h 10.0.0.1 1\nb@h 10.0.0.2\n")),
     ?_assertEqual({error, {line, 1, {expected_node_host_port, 4}}},
                   macula_dist_book:parse("a@h 10.0.0.1 1 extra")),
     ?_assertEqual({error, {line, 1, {bad_port, "0"}}}, macula_dist_book:parse("a@h 10.0.0.1 0")),
     ?_assertEqual({error, {line, 1, {bad_port, "65536"}}}, macula_dist_book:parse("a@h 10.0.0.1 65536")),
     ?_assertEqual({error, {line, 1, {bad_host, "bad_host"}}}, macula_dist_book:parse("a@h bad_host 1")),
     ?_assertMatch({error, {line, 1, {bad_node_name, "a@b@c", _}}}, macula_dist_book:parse("a@b@c 10.0.0.1 1")),
     ?_assertEqual({error, {line, 3, {listed_twice, <<"a@h">>}}},
                   macula_dist_book:parse("a@h 10.0.0.1 1\n\na@h 10.0.0.2 2\n"))].

book_empty_test() ->
    ?assertEqual({ok, #{}}, macula_dist_book:parse("")),
    ?assertEqual({ok, #{}}, macula_dist_book:parse("# nothing\n\n")).

book_lookup_test() ->
    {ok, Book} = macula_dist_book:parse("app@10.0.0.5 10.0.0.5 4433\n"),
    ?assertEqual({ok, {"10.0.0.5", 4433}}, macula_dist_book:lookup('app@10.0.0.5', Book)),
    ?assertEqual(error, macula_dist_book:lookup('app@10.0.0.6', Book)).

book_file_test() ->
    Path = temp_file("app@10.0.0.5 10.0.0.5 4433\n"),
    try
        ?assertMatch({ok, #{<<"app@10.0.0.5">> := {"10.0.0.5", 4433}}}, macula_dist_book:load(Path)),
        ?assertMatch({ok, #{address_book := Path}},
                     macula_dist_config:parse([{"address_book", Path}]))
    after
        file:delete(Path)
    end.

book_option_errors_test() ->
    Path = temp_file("app@10.0.0.5 10.0.0.5\n"),
    try
        ?assertEqual({error, {option, address_book, {Path, {line, 1, {expected_node_host_port, 2}}}}},
                     macula_dist_config:parse([{address_book, Path}])),
        ?assertMatch({error, {option, address_book, {"/nonexistent/book", _}}},
                     macula_dist_config:parse([{address_book, "/nonexistent/book"}]))
    after
        file:delete(Path)
    end.

%%% ------------------------------------------------------------------------------------
%%% The port this node listens on
%%% ------------------------------------------------------------------------------------

port_option_test_() ->
    [?_assertMatch({ok, #{port := 4433}}, macula_dist_config:parse([{"port", "4433"}])),
     ?_assertMatch({ok, #{port := 1}}, macula_dist_config:parse([{port, 1}])),
     ?_assertMatch({error, {option, port, {out_of_range, 65536, 1, 65535}}},
                   macula_dist_config:parse([{port, "65536"}])),
     ?_assertMatch({error, {option, port, {not_an_integer, "x"}}}, macula_dist_config:parse([{port, "x"}]))].

listen_port_test_() ->
    Defaults = macula_dist_config:defaults(),
    [?_assertEqual({ok, 4433}, macula_dist_discovery:listen_port('4433', Defaults)),
     ?_assertEqual({ok, 4433}, macula_dist_discovery:listen_port('4433', Defaults#{port => 4433})),
     ?_assertEqual({error, {port_option_differs_from_node_name, {option, 4434}, {name, 4433}}},
                   macula_dist_discovery:listen_port('4433', Defaults#{port => 4434})),
     ?_assertEqual({ok, 5000}, macula_dist_discovery:listen_port(app, Defaults#{port => 5000}))].

temp_file(Contents) ->
    Path = filename:join("/tmp", "macula_names_tests." ++ os:getpid() ++ "."
                         ++ integer_to_list(erlang:unique_integer([positive]))),
    ok = file:write_file(Path, Contents),
    Path.
