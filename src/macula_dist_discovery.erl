%%% @doc Where nodes listen: this node's UDP port, and the address of a node to
%%% connect to.
%%%
%%% This node listens on
%%% <ul>
%%% <li>the port its name gives (`4433@10.0.0.5');</li>
%%% <li>for any other name (`app@10.0.0.5'), the `port' option (`-macula_dist_port N');
%%%     without it, on a free port if this node uses EPMD (started without `-no_epmd'),
%%%     which then tells peers the port, or if it is hidden (helper nodes of relx,
%%%     nodetool and mix releases), which then can only connect out; a visible node
%%%     without EPMD does not start, as nobody could find it.</li>
%%% </ul>
%%% With EPMD in use the node registers its UDP port there under its name part, so
%%% `net_adm:names/0' lists it.
%%%
%%% A node to connect to is found by {@link locate/2}, in this order:
%%% <ol>
%%% <li>`Port@Host': that port on that host; nothing else is asked;</li>
%%% <li>the address book (option `address_book', see macula_dist_book);</li>
%%% <li>EPMD on the node's host, if this node uses EPMD;</li>
%%% <li>the same port as this node's own, on the node's host (libcluster's
%%%     `basename@ip' convention), if this node's port is fixed (from its name or the
%%%     `port' option).</li>
%%% </ol>
%%% locate/2 may block (DNS, EPMD): it runs in the process setup/5 spawns, never in
%%% net_kernel.
-module(macula_dist_discovery).

-export([listen_port/2, start/4, locate/2, epmd_in_use/0]).

-define(STATE, {?MODULE, state}).

%% @doc The UDP port this node listens on (0: any free port, told to EPMD).
-spec listen_port(atom(), macula_dist_config:config()) -> {ok, inet:port_number()} | {error, term()}.
listen_port(Name, Config) ->
    Option = maps:get(port, Config),
    case macula_dist_name:port(Name) of
        {ok, Port} when Option =:= undefined; Option =:= Port ->
            {ok, Port};
        {ok, Port} ->
            {error, {port_option_differs_from_node_name, {option, Option}, {name, Port}}};
        {error, _} when Option =/= undefined ->
            {ok, Option};
        {error, _} ->
            case epmd_in_use() orelse is_hidden() of
                true -> {ok, 0};
                false -> {error, {no_port, Name, "a visible node whose name is not a port number "
                                  "needs -macula_dist_port N (or EPMD, i.e. no -no_epmd)"}}
            end
    end.

%% @doc Remembers what locate/2 needs and, if this node uses EPMD and listens as
%% `{listen, Name}', registers `Name' with its port there. Returns the creation to give
%% net_kernel (EPMD's, or -1: net_kernel picks one).
-spec start({listen, atom()} | client_only, inet:port_number(), inet | inet6,
            macula_dist_config:config()) -> {ok, integer()} | {error, term()}.
start(Role, Port, Family, Config) ->
    case load_book(Config) of
        {ok, Book} ->
            FixedPort = case {Role, maps:get(port, Config)} of
                            {client_only, _} -> undefined;
                            {{listen, Name}, undefined} -> fixed_name_port(Name);
                            {_, Option} -> Option
                        end,
            persistent_term:put(?STATE, #{book => Book, same_port => FixedPort}),
            register_node(Role, Port, Family, FixedPort);
        {error, _} = Error ->
            Error
    end.

fixed_name_port(Name) ->
    case macula_dist_name:port(Name) of
        {ok, Port} -> Port;
        {error, _} -> undefined
    end.

load_book(Config) ->
    case maps:get(address_book, Config) of
        undefined -> {ok, #{}};
        Path -> macula_dist_book:load(Path)
    end.

%% A visible node on a free port must be registered, or nobody finds it; one on a
%% fixed port is still found by the book or the same-port rule if EPMD cannot be
%% reached, and a hidden helper node only connects out anyway.
register_node(client_only, _Port, _Family, _FixedPort) ->
    {ok, -1};
register_node({listen, Name}, Port, Family, FixedPort) ->
    case epmd_in_use() of
        false ->
            {ok, -1};
        true ->
            Epmd = net_kernel:epmd_module(),
            case catch Epmd:register_node(atom_to_list(Name), Port, Family) of
                {ok, Creation} when is_integer(Creation), Creation > 0 -> {ok, Creation};
                {ok, _} -> {ok, -1};
                {error, duplicate_name} = Duplicate -> Duplicate;
                Other ->
                    case FixedPort =:= undefined andalso not is_hidden() of
                        true -> {error, {epmd_register, Other}};
                        false -> {ok, -1}
                    end
            end
    end.

%% net_kernel notes `-hidden' (or net_kernel:start's `hidden') before it calls listen/2.
is_hidden() ->
    persistent_term:get({net_kernel, publish_type}, normal) =:= hidden
        orelse init:get_argument(hidden) =/= error.

%% @doc Whether this node was started to use EPMD (without `-no_epmd').
-spec epmd_in_use() -> boolean().
epmd_in_use() ->
    init:get_argument(no_epmd) =/= {ok, [[]]}.

%% @doc Host and UDP port of `Node'. `Timeout' (ms) bounds an EPMD lookup.
-spec locate(node(), timeout()) -> {ok, {string(), inet:port_number()}} | {error, term()}.
locate(Node, Timeout) ->
    case macula_dist_name:parse(Node) of
        {ok, {port, Port, Host}} ->
            {ok, {Host, Port}};
        {ok, {named, Name, Host}} ->
            State = persistent_term:get(?STATE, #{book => #{}, same_port => undefined}),
            Steps = [fun() -> from_book(Node, State) end,
                     fun() -> from_epmd(Name, Host, Timeout) end,
                     fun() -> from_same_port(Host, State) end],
            first(Steps, []);
        {error, _} = Error ->
            Error
    end.

first([Step | Steps], Tried) ->
    case Step() of
        {ok, _} = Found -> Found;
        {skip, Why} -> first(Steps, [Why | Tried])
    end;
first([], Tried) ->
    {error, {not_found, lists:reverse(Tried)}}.

from_book(Node, #{book := Book}) ->
    case macula_dist_book:lookup(Node, Book) of
        {ok, _} = Found -> Found;
        error when Book =:= #{} -> {skip, {address_book, none}};
        error -> {skip, {address_book, not_listed}}
    end.

from_epmd(Name, Host, Timeout) ->
    case epmd_in_use() of
        false ->
            {skip, {epmd, not_used}};
        true ->
            case host_ip(Host) of
                {ok, Ip} ->
                    case epmd_port(Name, Ip, Timeout) of
                        {port, Port, _Version} -> {ok, {Host, Port}};
                        Other -> {skip, {epmd, Other}}
                    end;
                {error, Why} ->
                    {skip, {epmd, {resolve, Host, Why}}}
            end
    end.

epmd_port(Name, Ip, Timeout) ->
    Epmd = net_kernel:epmd_module(),
    _ = code:ensure_loaded(Epmd),
    try
        case erlang:function_exported(Epmd, port_please, 3) of
            true -> Epmd:port_please(Name, Ip, Timeout);
            false -> Epmd:port_please(Name, Ip)
        end
    catch
        Class:Why -> {error, {Class, Why}}
    end.

host_ip(Host) ->
    case macula_dist_name:host_kind(Host) of
        {ok, {ip, Ip}} -> {ok, Ip};
        {ok, name} -> inet:getaddr(Host, inet);
        {error, _} = Error -> Error
    end.

%% On this node's own host the same port is this node itself.
from_same_port(_Host, #{same_port := undefined}) ->
    {skip, {same_port, this_node_has_no_fixed_port}};
from_same_port(Host, #{same_port := Port}) ->
    case macula_dist_name:host(node()) of
        {ok, Host} -> {skip, {same_port, same_host_as_this_node}};
        _ -> {ok, {Host, Port}}
    end.
