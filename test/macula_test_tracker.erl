%%% @doc A registered list of things a test started (nodes, tool processes), kept by a
%%% process linked to no test case, so that cleanup after a crashed or timed-out case
%%% still finds them. One tracker per name, started on first use.
-module(macula_test_tracker).
-behaviour(gen_server).

-export([add/2, remove/2, list/1, clear/1]).
-export([init/1, handle_call/3, handle_cast/2]).

-spec add(atom(), term()) -> ok.
add(Name, Item) -> call(Name, {add, Item}).

-spec remove(atom(), term()) -> ok.
remove(Name, Item) -> call(Name, {remove, Item}).

%% @doc Newest first.
-spec list(atom()) -> [term()].
list(Name) -> call(Name, list).

-spec clear(atom()) -> ok.
clear(Name) -> call(Name, clear).

call(Name, Request) ->
    case whereis(Name) of
        undefined ->
            %% Not start_link: the tracker must outlive the case process that starts it.
            case gen_server:start({local, Name}, ?MODULE, [], []) of
                {ok, _} -> ok;
                {error, {already_started, _}} -> ok
            end;
        _ ->
            ok
    end,
    gen_server:call(Name, Request).

init([]) ->
    {ok, []}.

handle_call({add, Item}, _From, Items) -> {reply, ok, [Item | Items]};
handle_call({remove, Item}, _From, Items) -> {reply, ok, Items -- [Item]};
handle_call(list, _From, Items) -> {reply, Items, Items};
handle_call(clear, _From, _Items) -> {reply, ok, []}.

handle_cast(_Request, Items) ->
    {noreply, Items}.
