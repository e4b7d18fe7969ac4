%%% @doc Erlang distribution over QUIC: the net_kernel callback module.
%%%
%%% Start a node with
%%% `erl -proto_dist macula -no_epmd -start_epmd false -name 4433@10.0.0.5'.
%%% The name part of such a node name is its UDP port, so no EPMD is involved; other
%%% names (`app@10.0.0.5') are found through macula_dist_discovery. Every
%%% connection is one QUIC connection with TLS 1.3; the distribution handshake runs on
%%% a control stream and distribution data on a data stream (see macula_dist_ctrl for
%%% the processes of a connection and native/macula_quic for the wire format).
%%%
%%% The endpoint (one UDP socket) both accepts and initiates connections; it is made by
%%% listen/2 and kept in a persistent term for setup/5.
-module(macula_dist).

%% net_kernel callbacks
-export([childspecs/0, listen/1, listen/2, accept/1, accept_connection/5, setup/5,
         close/1, select/1, address/0]).
%% Optional callbacks and tools
-export([is_node_name/1, splitname/1, setopts/2, getopts/2]).
%% Operations on a running node
-export([info/0, info/1, connection_info/1, rebind/2, option/1, prioritize/1, prioritize/2]).

-include_lib("kernel/include/net_address.hrl").
-include_lib("kernel/include/dist.hrl").
-include_lib("kernel/include/dist_util.hrl").
-include_lib("kernel/include/logger.hrl").

-define(PROTOCOL, quic).

%%% ------------------------------------------------------------------------------------
%%% net_kernel callbacks
%%% ------------------------------------------------------------------------------------

%% Nothing to supervise: the NIF owns the QUIC runtime.
-spec childspecs() -> {ok, []}.
childspecs() ->
    {ok, []}.

-spec listen(atom()) -> {ok, {macula_dist_nif:endpoint(), #net_address{}, -1}} | {error, term()}.
listen(Name) ->
    {ok, Host} = inet:gethostname(),
    listen(Name, Host).

%% Opens the node's UDP endpoint on the port its name gives (or, for other names, the
%% one macula_dist_discovery picks). The creation is EPMD's when the node registers
%% there, else -1, which makes net_kernel pick a random one: either way each
%% incarnation of a name differs.
-spec listen(atom(), string()) -> {ok, {macula_dist_nif:endpoint(), #net_address{}, integer()}} | {error, term()}.
listen(Name, Host) ->
    case open_endpoint(Name, Host) of
        {ok, Endpoint, Address, Creation} ->
            {ok, {Endpoint, Address, Creation}};
        {error, Reason} = Error ->
            report_boot_error(io_lib:format("listen as ~ts@~ts", [Name, Host]), Reason),
            Error
    end.

open_endpoint(Name, Host) ->
    try
        Config = unwrap(load()),
        Port = unwrap(macula_dist_discovery:listen_port(Name, Config)),
        {Ip, Family} = unwrap(resolve(Host)),
        {Endpoint, BoundPort} = unwrap(bind_endpoint(Family, Port, Config, reset_identity(Name, Host))),
        case macula_dist_discovery:start({listen, Name}, BoundPort, Family, Config) of
            {ok, Creation} ->
                {ok, Endpoint, #net_address{address = {Ip, BoundPort}, host = Host,
                                            protocol = ?PROTOCOL, family = Family},
                 Creation};
            {error, _} = Error ->
                close(Endpoint),
                Error
        end
    catch
        throw:{?MODULE, Reason} -> {error, Reason}
    end.

%% The stateless-reset key is derived from the node name and this node's own cookie
%% (-setcookie or ~/.erlang.cookie, which auth, started before net_kernel, has read),
%% so a restarted node's resets end its old connections at once. No cookie: no identity,
%% and a random key (a restart is then noticed by ICMP or ticks only).
reset_identity(Name, Host) ->
    case auth:get_cookie() of
        nocookie -> #{};
        Cookie -> #{node_name => unicode:characters_to_binary([atom_to_list(Name), $@, Host]),
                    cookie => atom_to_binary(Cookie, utf8)}
    end.

%% Loads the NIF and the options.
load() ->
    case macula_dist_nif:load() of
        ok -> macula_dist_config:load();
        {error, _} = Error -> Error
    end.

%% Binds, and remembers the endpoint for setup/5. `Identity' keys the stateless resets.
bind_endpoint(Family, Port, Config, Identity) ->
    Options = maps:merge(macula_dist_config:nif_options(Config), Identity),
    case macula_dist_nif:listen(macula_dist_config:bind_ip(Family), Port, Options) of
        {ok, Endpoint} ->
            ok = macula_dist_endpoint:store(Endpoint, Family, Config),
            {ok, {_Ip, BoundPort}} = macula_dist_nif:endpoint_address(Endpoint),
            {ok, {Endpoint, BoundPort}};
        {error, _} = Error ->
            Error
    end.

unwrap({ok, Value}) -> Value;
unwrap({error, Reason}) -> throw({?MODULE, Reason}).

%% A host name is not resolved here: the native resolver is not running yet when
%% distribution starts at boot, and a lookup would hang. The endpoint then listens on
%% every IPv4 address (or on inet_dist_use_interface).
resolve(Host) ->
    case macula_dist_name:host_kind(Host) of
        {ok, {ip, Ip}} -> {ok, {Ip, family(Ip)}};
        {ok, name} -> {ok, {macula_dist_config:bind_ip(inet), inet}};
        {error, _} = Error -> Error
    end.

family(Ip) when tuple_size(Ip) =:= 4 -> inet;
family(Ip) when tuple_size(Ip) =:= 8 -> inet6.

%% The logger is not running yet when listen/2 fails at boot; stderr is. One line.
report_boot_error(What, Reason) ->
    Text = io_lib:format("macula_dist: cannot ~ts: ~ts~n", [What, macula_dist_nif:format_error(Reason)]),
    catch erlang:display_string(lists:flatten(Text)),
    ok.

%% Spawns the acceptor, linked to net_kernel (which calls this again if it exits).
-spec accept(macula_dist_nif:endpoint()) -> pid().
accept(Endpoint) ->
    Kernel = self(),
    spawn_opt(fun() -> acceptor_init(Kernel, Endpoint) end, [link, {priority, max}]).

acceptor_init(Kernel, Endpoint) ->
    ok = macula_dist_nif:accept(Endpoint, self()),
    acceptor_loop(Kernel, macula_dist_endpoint:family()).

%% The NIF hands over connections whose QUIC/TLS handshake is complete. Each gets a
%% controller; net_kernel then starts the owner (accept_connection/5) it is handed to.
acceptor_loop(Kernel, Family) ->
    receive
        {macula_incoming, Conn, PeerAddr} ->
            Ctrl = macula_dist_ctrl:start_unowned(Conn),
            Kernel ! {accept, self(), Ctrl, Family, ?PROTOCOL},
            receive
                {Kernel, controller, Owner} ->
                    macula_dist_ctrl:hand_over(Ctrl, Owner),
                    Owner ! {self(), controller, Conn, PeerAddr};
                {Kernel, unsupported_protocol} ->
                    exit(Ctrl, kill),
                    exit(unsupported_protocol)
            end;
        {macula_refused, PeerAddr, Why} ->
            macula_dist_events:refused(from, undefined, PeerAddr, Why)
    end,
    acceptor_loop(Kernel, Family).

-spec accept_connection(pid(), pid(), node(), [node()], non_neg_integer()) -> pid().
accept_connection(AcceptPid, Ctrl, MyNode, Allowed, SetupTime) ->
    Kernel = self(),
    spawn_opt(fun() -> do_accept(Kernel, AcceptPid, Ctrl, MyNode, Allowed, SetupTime) end,
              dist_util:net_ticker_spawn_options()).

do_accept(Kernel, AcceptPid, Ctrl, MyNode, Allowed, SetupTime) ->
    receive
        {AcceptPid, controller, Conn, PeerAddr} ->
            Timer = dist_util:start_timer(SetupTime),
            Name = case macula_dist_auth:respond(Conn, PeerAddr) of
                       {ok, AuthName} -> AuthName;
                       {error, _} -> ?shutdown(no_node)
                   end,
            HSData0 = with_new_connection_opts(macula_dist_ctrl:hs_data(Ctrl, Conn),
                                               inet_dist_listen_options),
            HSData = HSData0#hs_data{
                       f_recv = macula_dist_auth:bind_name(HSData0#hs_data.f_recv, Name, PeerAddr),
                       kernel_pid = Kernel,
                       this_node = MyNode,
                       timer = Timer,
                       allowed = Allowed},
            dist_util:handshake_other_started(HSData)
    after SetupTime ->
            ?shutdown(no_node)
    end.

%% Returns at once; the spawned owner connects, then runs the handshake.
-spec setup(node(), normal | hidden, node(), longnames | shortnames, non_neg_integer()) -> pid().
setup(Node, Type, MyNode, _LongOrShortNames, SetupTime) ->
    Kernel = self(),
    spawn_opt(fun() -> do_setup(Kernel, Node, Type, MyNode, SetupTime) end,
              dist_util:net_ticker_spawn_options()).

do_setup(Kernel, Node, Type, MyNode, SetupTime) ->
    Timer = dist_util:start_timer(SetupTime),
    {Host, Port} = case macula_dist_discovery:locate(Node, SetupTime div 2) of
                       {ok, HostPort} ->
                           HostPort;
                       {error, NotFound} ->
                           ?LOG_WARNING("macula_dist: cannot connect to ~ts: ~tp", [Node, NotFound]),
                           ?shutdown2(Node, {cannot_locate, NotFound})
                   end,
    dist_util:reset_timer(Timer),
    case macula_dist_nif:connect(macula_dist_endpoint:endpoint(), unicode:characters_to_binary(Host), Port, self()) of
        ok -> ok;
        {error, NotListening} -> ?shutdown2(Node, NotListening)
    end,
    Conn = receive
               {macula_connect, {ok, C}} -> C;
               {macula_connect, {error, {tls, _} = Why}} ->
                   %% Certificates refused (PKI mode), by either side: say so.
                   macula_dist_events:refused(to, Node, undefined, Why),
                   ?shutdown2(Node, Why);
               {macula_connect, {error, {unreachable, _} = Why}} ->
                   %% ICMP said nobody is there (TCP's "connection refused"): fail now.
                   ?LOG_WARNING("macula_dist: cannot connect to ~ts: ~ts",
                                [Node, macula_dist_nif:format_error(Why)]),
                   ?shutdown2(Node, Why);
               {macula_connect, {error, Why}} ->
                   ?shutdown2(Node, Why)
           end,
    dist_util:reset_timer(Timer),
    Ctrl = macula_dist_ctrl:start_linked(Conn),
    %% A call to the controller, so it owns the connection's events before the cookie
    %% proof goes out: a refusal's close reason then reaches this process through it,
    %% instead of the controller dying of a connection closed under it.
    HSData0 = with_new_connection_opts(macula_dist_ctrl:hs_data(Ctrl, Conn),
                                       inet_dist_connect_options),
    case macula_dist_auth:initiate(Conn, MyNode, Node) of
        ok -> ok;
        {error, AuthError} -> ?shutdown2(Node, {not_authenticated, AuthError})
    end,
    HSData = HSData0#hs_data{
               kernel_pid = Kernel,
               other_node = Node,
               this_node = MyNode,
               timer = Timer,
               request_type = Type},
    dist_util:handshake_we_started(HSData).

%% net_kernel:setopts(new, Opts) keeps the options of new connections in these kernel
%% parameters (the listen one for accepted connections, the connect one for those set
%% up here); `dist_nodelay' is the default. Only `nodelay' means something to macula.
with_new_connection_opts(#hs_data{socket = Ctrl, mf_setopts = SetOpts} = HSData, Param) ->
    Default = [{nodelay, application:get_env(kernel, dist_nodelay, true)}],
    Given = case application:get_env(kernel, Param) of
                {ok, List} when is_list(List) -> [Opt || {nodelay, _} = Opt <- List];
                _ -> []
            end,
    case lists:last(Default ++ Given) of
        {nodelay, Bool} = Opt when is_boolean(Bool) -> ok = SetOpts(Ctrl, [Opt]);
        _ -> ok
    end,
    HSData.

%% Closes every connection (peers see connection_closed at once) and the socket. The
%% port is free once the NIF reports (it closes the socket after the close frames, not
%% when the VM frees the endpoint's terms), so distribution restarted in this VM
%% (init:restart/0) can listen on it again; a listen also frees ports of endpoints
%% closed earlier, should this wait have timed out.
-spec close(macula_dist_nif:endpoint()) -> ok.
close(Endpoint) ->
    ok = macula_dist_nif:close_endpoint(Endpoint),
    receive
        macula_endpoint_closed -> ok
    after 1000 -> ok
    end,
    macula_dist_endpoint:erase().

%% Runs inside net_kernel for every outgoing connection: syntax only, no lookups
%% (where a Name@Host node listens is found by the process setup/5 spawns).
-spec select(node()) -> boolean().
select(Node) ->
    is_node_name(Node).

%% Only for nodes that do not listen (`-dist_listen false', OTP's dynamic names
%% `undefined@Host'): they still need a socket to connect from, so one is opened on an
%% ephemeral port. Nobody can connect to such a node; it connects out.
-spec address() -> #net_address{}.
address() ->
    {ok, Host} = inet:gethostname(),
    Family = family(macula_dist_config:bind_ip(inet)),
    case macula_dist_endpoint:is_open() of
        false -> open_client_endpoint(Family);
        true -> ok
    end,
    #net_address{host = Host, protocol = ?PROTOCOL, family = Family}.

open_client_endpoint(Family) ->
    Opened = case load() of
                 {ok, Config} ->
                     case bind_endpoint(Family, 0, Config, #{}) of
                         {ok, {_Endpoint, Port}} -> macula_dist_discovery:start(client_only, Port, Family, Config);
                         {error, _} = Error -> Error
                     end;
                 {error, _} = Error ->
                     Error
             end,
    case Opened of
        {ok, _Creation} -> ok;
        {error, Reason} ->
            report_boot_error("open a socket to connect from", Reason),
            erlang:error({macula_dist, Reason})
    end.

%%% ------------------------------------------------------------------------------------
%%% Optional callbacks and tools
%%% ------------------------------------------------------------------------------------

%% Any name macula can connect to: `Port@Host' or `Name@Host' (not `nonode@nohost',
%% the name of a node that is not distributed).
-spec is_node_name(term()) -> boolean().
is_node_name(nonode@nohost) ->
    false;
is_node_name(Node) when is_atom(Node) ->
    element(1, macula_dist_name:parse(Node)) =:= ok;
is_node_name(_) ->
    false.

%% @doc `{Port, Host}' of a macula node name, `false' for anything else.
-spec splitname(term()) -> {inet:port_number(), string()} | false.
splitname(Node) ->
    macula_dist_name:split(Node).

%% Options net_kernel:setopts(new, Opts) stores for new connections (in the kernel
%% parameters with_new_connection_opts/2 reads). QUIC never delays small packets, so
%% `nodelay' is accepted whatever its value and only reported back by getopts.
-spec setopts(macula_dist_nif:endpoint(), [{atom(), term()}]) -> ok | {error, term()}.
setopts(_Endpoint, Opts) ->
    macula_dist_ctrl:check_opts(Opts).

-spec getopts(macula_dist_nif:endpoint(), [atom()]) -> {ok, [{atom(), term()}]} | {error, term()}.
getopts(_Endpoint, Opts) ->
    macula_dist_ctrl:get_opts(Opts, #{}).

%%% ------------------------------------------------------------------------------------
%%% Operations on a running node
%%% ------------------------------------------------------------------------------------

%% @doc Facts about every macula connection of this node, by peer node (the keys are
%% those of info/1).
-spec info() -> #{node() => map()}.
info() ->
    maps:from_list([{Node, Info} || {Node, Ctrl} <- erlang:system_info(dist_ctrl), is_pid(Ctrl),
                                    {ok, Info} <- [macula_dist_ctrl:info(Ctrl)]]).

%% @doc Facts about the connection to `Node': addresses, TLS, round-trip time,
%% congestion window, traffic counters, uptime (README, "Operations").
-spec info(node()) -> {ok, map()} | {error, not_connected}.
info(Node) ->
    case lists:keyfind(Node, 1, erlang:system_info(dist_ctrl)) of
        {Node, Ctrl} when is_pid(Ctrl) -> macula_dist_ctrl:info(Ctrl);
        _ -> {error, not_connected}
    end.

%% @doc The same as info/1 (its name in version 0.1.0).
-spec connection_info(node()) -> {ok, map()} | {error, not_connected}.
connection_info(Node) ->
    info(Node).

%% @doc The value of option `Key' (see macula_dist_config) of the running endpoint.
-spec option(atom()) -> term().
option(Key) ->
    macula_dist_endpoint:option(Key).

%% @doc Sends `Pid''s distribution traffic on the priority data stream of every
%% connection (see prioritize/2).
-spec prioritize(pid()) -> ok | {error, not_local | not_started}.
prioritize(Pid) ->
    prioritize(Pid, true).

%% @doc Marks (`true') or unmarks a local process for priority. Its messages, links,
%% monitors and exits then travel on a data stream of higher QUIC urgency, ahead of
%% other processes' bulk traffic; its own order is kept. It applies at once, also on
%% connections the process already used (its next packet there moves it behind a
%% fence). The mark ends when the process exits. No effect with `data_streams' 1,
%% where every packet shares one ordered stream.
-spec prioritize(pid(), boolean()) -> ok | {error, not_local | not_started}.
prioritize(Pid, On) when is_pid(Pid), is_boolean(On) ->
    if
        node(Pid) =/= node() -> {error, not_local};
        true ->
            try macula_dist_nif:set_priority(Pid, term_to_binary(Pid), On)
            catch error:{not_loaded, _} -> {error, not_started}
            end
    end.

%% @doc Moves this node's UDP socket to `{Ip, Port}' (port 0: any free port). Every
%% connection migrates with it: peers follow the new address (QUIC connection
%% migration), nothing is lost and no node goes down.
-spec rebind(inet:ip_address(), inet:port_number()) -> ok | {error, term()}.
rebind(Ip, Port) ->
    macula_dist_nif:rebind(macula_dist_endpoint:endpoint(), Ip, Port).
