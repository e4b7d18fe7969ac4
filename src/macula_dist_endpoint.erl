%%% @doc The node's one QUIC endpoint, as the rest of macula_dist sees it: its NIF
%%% handle, the address family it listens on and the options it was opened with.
%%% `macula_dist:listen/2' (or the client-only socket of `address/0') stores it; every
%%% other module reads it here, so nothing else knows how it is kept (a persistent
%%% term, read on every connection setup and written once per boot).
-module(macula_dist_endpoint).

-export([store/3, erase/0, endpoint/0, family/0, option/1, is_open/0]).

-define(KEY, {macula_dist, endpoint}).

-spec store(macula_dist_nif:endpoint(), inet | inet6, macula_dist_config:config()) -> ok.
store(Endpoint, Family, Config) ->
    persistent_term:put(?KEY, {Endpoint, Family, Config}).

-spec erase() -> ok.
erase() ->
    _ = persistent_term:erase(?KEY),
    ok.

-spec is_open() -> boolean().
is_open() ->
    persistent_term:get(?KEY, undefined) =/= undefined.

%% @doc The NIF handle; raises if no endpoint is open.
-spec endpoint() -> macula_dist_nif:endpoint().
endpoint() ->
    {Endpoint, _Family, _Config} = persistent_term:get(?KEY),
    Endpoint.

-spec family() -> inet | inet6.
family() ->
    {_Endpoint, Family, _Config} = persistent_term:get(?KEY),
    Family.

%% @doc The value of option `Key' (see macula_dist_config) of the open endpoint, or its
%% default when none is open (a controller of a connection set up before boot ended).
-spec option(atom()) -> term().
option(Key) ->
    case persistent_term:get(?KEY, undefined) of
        {_Endpoint, _Family, #{Key := Value}} -> Value;
        _ -> maps:get(Key, macula_dist_config:defaults())
    end.
