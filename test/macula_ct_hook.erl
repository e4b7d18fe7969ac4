%%% @doc The Common Test hook every suite that starts nodes uses, in `suite/0':
%%% `{ct_hooks, [{macula_ct_hook, Opts}]}'. It does what each such suite needs around
%%% its cases, so the suites hold only their own setup:
%%% <ul>
%%% <li>before the suite: fails it at once if the NIF is not built, and copies the
%%% build the nodes run under the suite's priv_dir (macula_test_peer:snapshot/1: a
%%% rebuild during the run rewrites the NIF library, which crashes nodes that have
%%% it mapped). The suite's `init_per_suite', if any, runs after this.</li>
%%% <li>with `Opts' `#{ports_per_case := N, port_range := {Lo, Hi}}': picks one random
%%% free block of UDP ports for the run (macula_test_peer:port_base/2, or
%%% `MACULA_TEST_PORT_BASE'), and gives each case `{base_port, P}' in its Config, the
%%% first of its own N ports (run base + N * its position in all/0, groups expanded),
%%% so cases never share a port;</li>
%%% <li>after each case (after the suite's `end_per_testcase') and after the suite:
%%% stops every node still running (macula_test_peer:stop_all/0), whatever
%%% happened.</li>
%%% </ul>
-module(macula_ct_hook).

-export([init/2, pre_init_per_suite/3, post_end_per_suite/4, pre_init_per_testcase/4,
         post_end_per_testcase/5]).

-type opts() :: #{ports_per_case => pos_integer(),
                  port_range => {inet:port_number(), inet:port_number()}}.
-export_type([opts/0]).

-record(state, {opts :: opts(), port_base :: inet:port_number() | undefined}).

-spec init(term(), opts()) -> {ok, #state{}}.
init(_Id, Opts) when is_map(Opts) ->
    {ok, #state{opts = Opts}}.

pre_init_per_suite(Suite, Config, State = #state{opts = Opts}) ->
    Ebin = filename:dirname(code:which(macula_dist)),
    Nif = filename:join([filename:dirname(Ebin), "priv", "macula_dist_nif.so"]),
    case filelib:is_regular(Nif) of
        false ->
            {{fail, {nif_missing, Nif, "run rebar3 compile first"}}, State};
        true ->
            Snapshot = macula_test_peer:snapshot(proplists:get_value(priv_dir, Config)),
            ct:pal("~s: nodes run the copy in ~ts", [Suite, filename:dirname(Snapshot)]),
            case Opts of
                #{ports_per_case := PerCase, port_range := Range} ->
                    Count = PerCase * (length(cases(Suite)) + 1),
                    Base = macula_test_peer:port_base(Count, Range),
                    ct:pal("~s: UDP ports of this run: ~b..~b", [Suite, Base, Base + Count - 1]),
                    {Config, State#state{port_base = Base}};
                #{} ->
                    {Config, State}
            end
    end.

post_end_per_suite(_Suite, _Config, Return, State) ->
    macula_test_peer:stop_all(),
    {Return, State}.

pre_init_per_testcase(_Suite, _Case, Config, State = #state{port_base = undefined}) ->
    {Config, State};
pre_init_per_testcase(Suite, Case, Config, State = #state{opts = #{ports_per_case := PerCase},
                                                         port_base = Base}) ->
    {[{base_port, Base + PerCase * position(Case, cases(Suite))} | Config], State}.

post_end_per_testcase(_Suite, _Case, _Config, Return, State) ->
    macula_test_peer:stop_all(),
    {Return, State}.

%% 1 for the first case.
position(Case, Cases) ->
    length(lists:takewhile(fun(C) -> C =/= Case end, Cases)) + 1.

%% Every case of the suite once, in the order of all/0 with its groups expanded.
cases(Suite) ->
    {module, Suite} = code:ensure_loaded(Suite),
    Groups = case erlang:function_exported(Suite, groups, 0) of
                 true -> Suite:groups();
                 false -> []
             end,
    unique(expand(Suite:all(), Groups)).

expand(Entries, Groups) ->
    lists:flatmap(fun({group, Name}) -> group_cases(Name, Groups);
                     ({group, Name, _Props}) -> group_cases(Name, Groups);
                     ({group, Name, _Props, _Sub}) -> group_cases(Name, Groups);
                     ({testcase, Case, _Props}) -> [Case];
                     (Case) when is_atom(Case) -> [Case]
                  end, Entries).

group_cases(Name, Groups) ->
    case lists:keyfind(Name, 1, Groups) of
        {Name, _Props, Entries} -> expand(Entries, Groups);
        {Name, Entries} -> expand(Entries, Groups);
        false -> []
    end.

unique(Cases) ->
    lists:reverse(lists:foldl(fun(C, Seen) ->
                                      case lists:member(C, Seen) of
                                          true -> Seen;
                                          false -> [C | Seen]
                                      end
                              end, [], Cases)).
