%%% @doc Node names and discovery with real OS nodes: `Name@Host' clusters found
%%% through the address book, EPMD and the same-port convention, mixed with
%%% `Port@Host' nodes; client-only names (dynamic, relx/nodetool/mix helpers);
%%% refusals that tell both sides the real reason; `net_kernel:setopts(new, ...)';
%%% boot errors of names without a port; `Port@localhost' names.
-module(macula_names_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([suite/0, all/0, end_per_testcase/2]).
-export([address_book_cluster/1, epmd_cluster/1, same_port_cluster/1,
         client_only_names/1, refusals_say_why/1, setopts_new_connections/1,
         boot_errors/1, localhost_name_boots/1]).
%% Node side
-export([capture_logs/0, logs/0, log/2]).

-define(P, macula_test_peer).
-define(COOKIE, "macula_test").
-define(PORT_RANGE, {30000, 32599}).
-define(PORTS_PER_CASE, 10).
-define(LOG_TABLE, macula_names_logs).
-define(LOG_HANDLER, macula_names_log).

suite() ->
    [{timetrap, {seconds, 60}},
     {ct_hooks, [{macula_ct_hook, #{ports_per_case => ?PORTS_PER_CASE, port_range => ?PORT_RANGE}}]}].

all() ->
    [address_book_cluster, epmd_cluster, same_port_cluster, client_only_names,
     refusals_say_why, setopts_new_connections, boot_errors, localhost_name_boots].

end_per_testcase(_Case, _Config) ->
    stop_nodes(),
    case persistent_term:get({?MODULE, epmd}, undefined) of
        undefined -> ok;
        EpmdPort -> stop_epmd(EpmdPort)
    end.

%%% ------------------------------------------------------------------------------------
%%% Cases
%%% ------------------------------------------------------------------------------------

%% Shows: three `Name@127.0.0.1' nodes on the ports -macula_dist_port gives and one
%% `Port@127.0.0.1' node, all with the same address book (one entry names its host by
%% a host name), make one full mesh after two connect_node calls (global connects the
%% rest through the book); a name the book lacks is refused at once with the steps
%% that were tried.
address_book_cluster(Config) ->
    Base = ?config(base_port, Config),
    [PA, PB, PC, PD] = lists:seq(Base, Base + 3),
    Book = filename:join(?config(priv_dir, Config), "nodes.book"),
    ok = file:write_file(Book, io_lib:format(
                                 "# node host port~n"
                                 "a@127.0.0.1  127.0.0.1  ~b~n"
                                 "b@127.0.0.1  127.0.0.1  ~b   # a comment~n"
                                 "\tc@127.0.0.1\tlocalhost\t~b~n", [PA, PB, PC])),
    BookArgs = ["-macula_dist_opt", "address_book", Book],
    [A, B, C, D] = ?P:parallel(
                      [fun() -> start("a", "127.0.0.1", ["-macula_dist_port", integer_to_list(PA) | BookArgs]) end,
                       fun() -> start("b", "127.0.0.1", ["-macula_dist_opt", "port", integer_to_list(PB) | BookArgs]) end,
                       fun() -> start("c", "127.0.0.1", ["-macula_dist_port", integer_to_list(PC) | BookArgs]) end,
                       fun() -> start(integer_to_list(PD), "127.0.0.1", BookArgs) end]),
    All = [node_of(N) || N <- [A, B, C, D]],
    ok = ?P:call(A, macula_names_SUITE, capture_logs, []),
    ?assert(?P:call(A, net_kernel, connect_node, ['b@127.0.0.1'])),
    ?assert(?P:call(D, net_kernel, connect_node, ['c@127.0.0.1'])),
    ?assert(?P:call(D, net_kernel, connect_node, ['a@127.0.0.1'])),
    [ok = ?P:wait_nodes(N, All -- [node_of(N)]) || N <- [A, B, C, D]],
    ?assertEqual('c@127.0.0.1', ?P:call(D, erpc, call, ['c@127.0.0.1', erlang, node, []])),
    {ok, #{peer := PeerOfB}} = ?P:call(A, macula_dist, connection_info, ['b@127.0.0.1']),
    ?assertEqual({{127, 0, 0, 1}, PB}, PeerOfB),
    {ok, #{peer := PeerOfC}} = ?P:call(A, macula_dist, connection_info, ['c@127.0.0.1']),
    ?assertEqual({{127, 0, 0, 1}, PC}, PeerOfC),
    %% Not in the book, no EPMD, and the same port on this host is the node itself.
    {Us, false} = timer:tc(fun() -> ?P:call(A, net_kernel, connect_node, ['nobody@127.0.0.1']) end),
    Log = wait_log(A, "cannot connect to nobody@127.0.0.1"),
    ?assertNotEqual(nomatch, string:find(Log, "address_book,not_listed")),
    ?assertNotEqual(nomatch, string:find(Log, "epmd,not_used")),
    ?assertNotEqual(nomatch, string:find(Log, "same_host_as_this_node")),
    ?assert(Us < 2000000),
    {comment, io_lib:format("nobody@127.0.0.1 refused in ~b ms: ~ts", [Us div 1000, Log])}.

%% Shows: with a private EPMD (on a random port, given by ERL_EPMD_PORT; never the
%% default 4369), three `Name@127.0.0.1' nodes without -no_epmd and without a port
%% option listen on free UDP ports, register them, find each other through
%% port_please, and net_adm:names/0 lists them with the ports they really use.
epmd_cluster(_Config) ->
    EpmdPort = start_epmd(),
    Env = [{"ERL_EPMD_PORT", integer_to_list(EpmdPort)}],
    Nodes = ?P:parallel([fun() -> start(Name, "127.0.0.1", [], #{epmd => true, env => Env}) end
                         || Name <- ["a", "b", "c"]]),
    [A, B, C] = Nodes,
    All = [node_of(N) || N <- Nodes],
    ?assert(?P:call(A, net_kernel, connect_node, ['b@127.0.0.1'])),
    ?assert(?P:call(A, net_kernel, connect_node, ['c@127.0.0.1'])),
    [ok = ?P:wait_nodes(N, All -- [node_of(N)]) || N <- Nodes],
    {ok, Names} = ?P:call(A, net_adm, names, []),
    ?assertEqual(["a", "b", "c"], lists:sort([Name || {Name, _} <- Names])),
    %% The registered port is the UDP port peers see.
    {ok, #{peer := {_, PortOfA}}} = ?P:call(B, macula_dist, connection_info, ['a@127.0.0.1']),
    {ok, #{peer := {_, PortOfC}}} = ?P:call(B, macula_dist, connection_info, ['c@127.0.0.1']),
    ?assertEqual(PortOfA, proplists:get_value("a", Names)),
    ?assertEqual(PortOfC, proplists:get_value("c", Names)),
    ?assertEqual('c@127.0.0.1', ?P:call(B, erpc, call, ['c@127.0.0.1', erlang, node, []])),
    _ = C,
    {comment, io_lib:format("epmd on TCP port ~b: ~p", [EpmdPort, Names])}.

%% Shows: `app@127.0.0.2', `app@127.0.0.3' and `app@127.0.0.4', each bound to its own
%% address on the same -macula_dist_port, with neither book nor EPMD, find each other
%% by the same-port convention (libcluster's basename@ip).
same_port_cluster(Config) ->
    Port = ?config(base_port, Config),
    Start = fun(Last) ->
                    Ip = "127.0.0." ++ integer_to_list(Last),
                    start("app", Ip, ["-macula_dist_port", integer_to_list(Port),
                                      "-kernel", "inet_dist_use_interface",
                                      "{127,0,0," ++ integer_to_list(Last) ++ "}"])
            end,
    Nodes = ?P:parallel([fun() -> Start(L) end || L <- [2, 3, 4]]),
    [A | _] = Nodes,
    All = [node_of(N) || N <- Nodes],
    ?assert(?P:call(A, net_kernel, connect_node, ['app@127.0.0.3'])),
    ?assert(?P:call(A, net_kernel, connect_node, ['app@127.0.0.4'])),
    [ok = ?P:wait_nodes(N, All -- [node_of(N)]) || N <- Nodes],
    {ok, #{peer := Peer}} = ?P:call(A, macula_dist, connection_info, ['app@127.0.0.4']),
    ?assertEqual({{127, 0, 0, 4}, Port}, Peer),
    ok.

%% Shows: nodes whose names are not `Port@Host' and that do not listen where anyone
%% can find them connect to a macula node and run erpc: OTP's dynamic names
%% (`net_kernel:start([undefined@127.0.0.1, longnames])' and `[undefined,
%% shortnames]' with -dist_listen false, `-name undefined@127.0.0.1' as relx's
%% remote shell starts) get a name from the node they connect to; relx/nodetool and
%% mix helper names (`maint...-5380', `rpc-...-5325', hidden) and a static name with
%% -dist_listen false connect from free ports. Nobody can connect back to them.
client_only_names(Config) ->
    Port = ?config(base_port, Config),
    Server = start(integer_to_list(Port), "127.0.0.1", []),
    ServerNode = node_of(Server),
    Clients = ?P:parallel(
                [fun() -> dynamic_client(["-dist_listen", "false"], ['undefined@127.0.0.1', longnames]) end,
                 fun() -> dynamic_client(["-dist_listen", "false"], [undefined, shortnames]) end,
                 fun() -> start("undefined", "127.0.0.1", ["-dist_listen", "false"]) end,
                 fun() -> start("maint1a2b3c4d-5380", "127.0.0.1", ["-hidden"]) end,
                 fun() -> start("rpc-8865-5325", "127.0.0.1", ["-hidden"]) end,
                 fun() -> start("static-client", "127.0.0.1", ["-dist_listen", "false"]) end]),
    Named = [begin
                 ?assert(?P:call(Client, net_kernel, connect_node, [ServerNode])),
                 ?assertEqual(ServerNode, ?P:call(Client, erpc, call, [ServerNode, erlang, node, []])),
                 ?P:call(Client, erlang, node, [])
             end || Client <- Clients],
    ct:pal("client names: ~p", [Named]),
    [Dyn1, Dyn2, Dyn3, Maint, Rpc, Static] = Named,
    ?assertEqual(['maint1a2b3c4d-5380@127.0.0.1', 'rpc-8865-5325@127.0.0.1', 'static-client@127.0.0.1'],
                 [Maint, Rpc, Static]),
    %% Dynamic names are made by the server: random name part, the client's host.
    [{{match, _}, N} = {re:run(atom_to_list(N), "^[0-9A-Z]+@" ++ H ++ "$"), N}
     || {N, H} <- [{Dyn1, "127\\.0\\.0\\.1"}, {Dyn2, "[^.]+"}, {Dyn3, "127\\.0\\.0\\.1"}]],
    ?assertEqual(lists:sort(Named), lists:sort(?P:call(Server, erlang, nodes, [hidden]))),
    %% The server cannot dial them back once they are disconnected.
    ?assert(?P:call(Server, erlang, disconnect_node, [Dyn1])),
    ?assert(?P:call(Server, erlang, disconnect_node, [Rpc])),
    ?assertNot(?P:call(Server, net_kernel, connect_node, [Dyn1])),
    ?assertNot(?P:call(Server, net_kernel, connect_node, [Rpc])),
    ok.

%% Shows: a refusal tells both sides the real reason. A client whose name has an
%% invalid host part (`foo@under_score', -dist_listen false) is refused for its name
%% (QUIC close code 3): the server logs `bad_node_name', the client that its name was
%% refused, and neither mentions a cookie. A client with another cookie is refused
%% for its proof (code 2): the server logs `wrong_cookie', the client "different
%% cookie?". The server made no atom for either name.
refusals_say_why(Config) ->
    Port = ?config(base_port, Config),
    Server = start(integer_to_list(Port), "127.0.0.1", []),
    ServerNode = node_of(Server),
    Unique = "stranger" ++ integer_to_list(erlang:unique_integer([positive])),
    [BadName, WrongCookie] =
        ?P:parallel([fun() -> start("foo", "under_score", ["-dist_listen", "false"]) end,
                     fun() -> start(Unique, "127.0.0.1", ["-dist_listen", "false"],
                                    #{cookie => "another_cookie"}) end]),
    [ok = ?P:call(N, macula_names_SUITE, capture_logs, []) || N <- [Server, BadName, WrongCookie]],

    ?assertNot(?P:call(BadName, net_kernel, connect_node, [ServerNode])),
    ServerSaw1 = wait_log(Server, "bad_node_name"),
    ClientSaw1 = wait_log(BadName, "refused this node's name"),
    ?assertNotEqual(nomatch, string:find(ServerSaw1, "foo@under_score")),
    ?assertNotEqual(nomatch, string:find(ClientSaw1, "host part is neither an IP address nor a host name")),
    ?assertEqual([], [L || L <- logs(BadName) ++ [ServerSaw1], string:find(L, "cookie") =/= nomatch]),

    ?assertNot(?P:call(WrongCookie, net_kernel, connect_node, [ServerNode])),
    ServerSaw2 = wait_log(Server, "wrong_cookie"),
    ClientSaw2 = wait_log(WrongCookie, "refused this node's cookie proof (different cookie?): wrong cookie"),
    ?assertNotEqual(nomatch, string:find(ServerSaw2, Unique)),
    ?assertEqual([], [L || L <- logs(WrongCookie), string:find(L, "refused this node's name") =/= nomatch]),

    ?assertEqual([], ?P:call(Server, erlang, nodes, [connected])),
    [?assertMatch({'EXIT', {badarg, _}}, ?P:run(Server, fun() -> catch list_to_existing_atom(Name) end))
     || Name <- ["foo@under_score", Unique ++ "@127.0.0.1"]],
    {comment, io_lib:format("server: ~ts | ~ts; clients: ~ts | ~ts",
                            [ServerSaw1, ServerSaw2, ClientSaw1, ClientSaw2])}.

%% Shows: net_kernel:setopts(new, [{nodelay, false}]) applies to the connections set
%% up afterwards, both those this node opens and those it accepts, and not to the
%% ones already up; getopts reports each.
setopts_new_connections(Config) ->
    Base = ?config(base_port, Config),
    [A, B, C, D] = ?P:parallel([fun() -> start(integer_to_list(P), "127.0.0.1", []) end
                                || P <- lists:seq(Base, Base + 3)]),
    [NB, NC, ND] = [node_of(N) || N <- [B, C, D]],
    ?assert(?P:call(A, net_kernel, connect_node, [NB])),
    ?assertEqual({ok, [{nodelay, true}]}, ?P:call(A, net_kernel, getopts, [NB, [nodelay]])),
    ok = ?P:call(A, net_kernel, setopts, [new, [{nodelay, false}]]),
    ?assert(?P:call(A, net_kernel, connect_node, [NC])),
    ?assert(?P:call(D, net_kernel, connect_node, [node_of(A)])),
    ?assertEqual({ok, [{nodelay, false}]}, ?P:call(A, net_kernel, getopts, [NC, [nodelay]])),
    ?assertEqual({ok, [{nodelay, false}]}, ?P:call(A, net_kernel, getopts, [ND, [nodelay]])),
    ?assertEqual({ok, [{nodelay, true}]}, ?P:call(A, net_kernel, getopts, [NB, [nodelay]])),
    %% The peers were not told anything: theirs are still the default.
    ?assertEqual({ok, [{nodelay, true}]}, ?P:call(C, net_kernel, getopts, [node_of(A), [nodelay]])),
    ok.

%% Shows: a node whose name needs a port it was not given stops at boot with a message
%% naming what is missing; so do a -macula_dist_port that contradicts a `Port@Host'
%% name and an address book with a bad line (its number given).
boot_errors(Config) ->
    Port = ?config(base_port, Config),
    BadBook = filename:join(?config(priv_dir, Config), "bad.book"),
    ok = file:write_file(BadBook, "a@127.0.0.1 127.0.0.1 4433\nb@127.0.0.1 127.0.0.1\n"),
    Cases = [{"app@127.0.0.1", [], "needs -macula_dist_port N"},
             {integer_to_list(Port) ++ "@127.0.0.1", ["-macula_dist_port", integer_to_list(Port + 1)],
              "port_option_differs_from_node_name"},
             {"app@127.0.0.1", ["-macula_dist_port", integer_to_list(Port),
                                "-macula_dist_opt", "address_book", BadBook],
              "{line,2,{expected_node_host_port,2}}"}],
    Outputs = [begin
                   Out = boot_output(Name, Args),
                   ?assertNotEqual(nomatch, string:find(Out, Expected), {Name, Args, Out}),
                   ?assertNotEqual(nomatch, string:find(Out, "register/listen error"), Out),
                   Expected
               end || {Name, Args, Expected} <- Cases],
    {comment, lists:join(" | ", Outputs)}.

%% Shows: a node named `Port@localhost' boots at once (the README used to say it
%% hangs) and is reached by name from a `Port@127.0.0.1' node.
localhost_name_boots(Config) ->
    Port = ?config(base_port, Config),
    {Us, Local} = timer:tc(fun() -> start(integer_to_list(Port), "localhost", []) end),
    Other = start(integer_to_list(Port + 1), "127.0.0.1", []),
    ?assert(?P:call(Other, net_kernel, connect_node, [node_of(Local)])),
    ?assertEqual(node_of(Local), ?P:call(Other, erpc, call, [node_of(Local), erlang, node, []])),
    {comment, io_lib:format("~ts started in ~b ms", [node_of(Local), Us div 1000])}.

%%% ------------------------------------------------------------------------------------
%%% Nodes
%%% ------------------------------------------------------------------------------------

start(Name, Host, Args) ->
    start(Name, Host, Args, #{}).

%% Starts `Name@Host' (not necessarily Port@Host) with the macula carrier; `epmd'
%% leaves out -no_epmd (the node then uses the EPMD at ERL_EPMD_PORT from `env').
start(Name, Host, Args, Opts) ->
    start_peer(#{name => Name, host => Host, longnames => true}, Args, Opts).

%% A node started without distribution that then starts it with net_kernel:start/1.
dynamic_client(Args, StartArgs) ->
    Node = start_peer(#{}, Args, #{}),
    {ok, _} = ?P:call(Node, net_kernel, start, [StartArgs]),
    Node.

start_peer(NameOpts, Args, Opts) ->
    Cookie = maps:get(cookie, Opts, ?COOKIE),
    Epmd = case maps:get(epmd, Opts, false) of
               true -> [];
               false -> ["-no_epmd"]
           end,
    AllArgs = ["-proto_dist", "macula", "-start_epmd", "false", "-setcookie", Cookie,
               "-pa", ?P:ebin_dir(), "-pa", ?P:test_dir(),
               "-kernel", "net_ticktime", "4" | Epmd ++ Args],
    PeerOpts = NameOpts#{connection => 0, args => AllArgs, wait_boot => 20000,
                         env => maps:get(env, Opts, [])},
    case peer:start(PeerOpts) of
        {ok, Peer, _Node} -> track(Peer);
        {ok, Peer} -> track(Peer);
        {error, Reason} -> error({node_start_failed, NameOpts, Reason, AllArgs})
    end.

node_of(#{peer := Peer}) ->
    peer:call(Peer, erlang, node, []).

%% Started nodes are kept in a persistent term of the test node, so end_per_testcase
%% stops them even after a failed case.
track(Peer) ->
    OsPid = list_to_integer(peer:call(Peer, os, getpid, [])),
    Key = {?MODULE, nodes},
    Node = #{peer => Peer, os_pid => OsPid, node => peer:call(Peer, erlang, node, [])},
    persistent_term:put(Key, [Node | persistent_term:get(Key, [])]),
    Node.

stop_nodes() ->
    Key = {?MODULE, nodes},
    Nodes = persistent_term:get(Key, []),
    persistent_term:erase(Key),
    _ = ?P:parallel([fun() -> catch peer:stop(Peer), ok end || #{peer := Peer} <- Nodes]),
    [?P:kill(N) || N <- Nodes, ?P:is_os_alive(maps:get(os_pid, N))],
    ok.

%% Boots a node that is expected to fail and returns what it printed.
boot_output(Name, Args) ->
    Erl = os:find_executable("erl"),
    Command = lists:join(" ", [Erl, "-noshell", "-proto_dist", "macula", "-no_epmd",
                               "-start_epmd", "false", "-name", Name, "-setcookie", ?COOKIE,
                               "-pa", ?P:ebin_dir() | Args]
                         ++ ["-eval", "'halt(0)'", "2>&1"]),
    os:cmd("timeout 20 " ++ Command).

%%% ------------------------------------------------------------------------------------
%%% A private EPMD
%%% ------------------------------------------------------------------------------------

start_epmd() ->
    {ok, Listen} = gen_tcp:listen(0, [{ip, {127, 0, 0, 1}}]),
    {ok, Port} = inet:port(Listen),
    ok = gen_tcp:close(Listen),
    ?assertNotEqual(4369, Port),
    Epmd = os:find_executable("epmd"),
    _ = os:cmd("ERL_EPMD_ADDRESS=127.0.0.1 " ++ Epmd ++ " -port " ++ integer_to_list(Port)
               ++ " -relaxed_command_check -daemon"),
    persistent_term:put({?MODULE, epmd}, Port),
    ok = ?P:wait_until(fun() -> epmd_answers(Port) end, 5000),
    Port.

epmd_answers(Port) ->
    case gen_tcp:connect({127, 0, 0, 1}, Port, []) of
        {ok, S} -> gen_tcp:close(S), true;
        {error, _} -> false
    end.

stop_epmd(Port) ->
    persistent_term:erase({?MODULE, epmd}),
    _ = os:cmd(os:find_executable("epmd") ++ " -port " ++ integer_to_list(Port) ++ " -kill"),
    ok = ?P:wait_until(fun() -> not epmd_answers(Port) end, 5000).

%%% ------------------------------------------------------------------------------------
%%% Logs of a node (this module runs there as a logger handler)
%%% ------------------------------------------------------------------------------------

%% @doc On a node: keeps every warning and error logged from now on.
capture_logs() ->
    Self = self(),
    spawn(fun() ->
                  ets:new(?LOG_TABLE, [named_table, public, ordered_set]),
                  Self ! table_ready,
                  receive after infinity -> ok end
          end),
    receive table_ready -> ok end,
    ok = logger:add_handler(?LOG_HANDLER, ?MODULE, #{level => warning}).

%% @doc On a node: the captured lines, oldest first.
logs() ->
    [Text || {_, Text} <- ets:tab2list(?LOG_TABLE)].

%% logger handler callback.
log(Event, _Config) ->
    Text = logger_formatter:format(Event, #{single_line => true, template => [msg]}),
    ets:insert(?LOG_TABLE, {erlang:unique_integer([monotonic]), unicode:characters_to_list(Text)}).

logs(Node) ->
    ?P:call(Node, macula_names_SUITE, logs, []).

wait_log(Node, Text) ->
    Find = fun() -> [L || L <- logs(Node), string:find(L, Text) =/= nomatch] end,
    case ?P:wait_until(fun() -> Find() =/= [] end, 5000) of
        ok -> hd(Find());
        timeout -> ct:fail({not_logged, Text, logs(Node)})
    end.
