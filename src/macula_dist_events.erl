%%% @doc Log events of macula connections: one when a connection comes up, one when it
%%% goes down, one when one is refused; nothing per packet.
%%%
%%% Every event has the logger domain `[macula_dist]' and the metadata
%%% `macula_event' (`up | down | refused'), `node' (the peer's node name, when known),
%%% `address' (the peer's `{Ip, Port}'), `initiator' (whether this node opened the
%%% connection) and, for `down' and `refused', `reason'. A
%%% handler or filter can select them with `logger_filters:domain/2' on
%%% `[macula_dist]'. Levels: `info' for up and down (shown with logger level info, so
%%% the short-lived helper nodes of release scripts print nothing on their stdout),
%%% `warning' for refused.
-module(macula_dist_events).

-export([up/3, watch/3, refused/4]).

-include_lib("kernel/include/logger.hrl").

-define(DOMAIN, [macula_dist]).
-define(FILTER_ADDED, {?MODULE, filter_added}).

%% @doc A connection to `Node' completed its handshake.
-spec up(node(), {inet:ip_address(), inet:port_number()}, boolean()) -> ok.
up(Node, Address, Initiator) ->
    ensure_visible(),
    ?LOG_INFO("macula_dist: connection ~ts ~ts (~ts) up",
                [direction(Initiator), Node, format_address(Address)],
                #{domain => ?DOMAIN, macula_event => up, node => Node, address => Address,
                  initiator => Initiator}).

%% @doc Logs `down' with the exit reason of `Ctrl' (the nodedown reason) when that
%% connection controller exits. The watcher is a small process of its own, so no exit
%% path of the connection's processes can skip the event.
-spec watch(pid(), node(), {inet:ip_address(), inet:port_number()}) -> ok.
watch(Ctrl, Node, Address) ->
    _ = spawn(fun() ->
                      Ref = erlang:monitor(process, Ctrl),
                      receive
                          {'DOWN', Ref, process, Ctrl, Reason} -> down(Node, Address, Reason)
                      end
              end),
    ok.

down(Node, Address, Reason) ->
    ensure_visible(),
    ?LOG_INFO("macula_dist: connection with ~ts (~ts) down: ~tp",
                [Node, format_address(Address), Reason],
                #{domain => ?DOMAIN, macula_event => down, node => Node, address => Address,
                  reason => Reason}).

%% @doc A connection was refused, one coming `from' a peer or one going `to' it:
%% `Node' is the peer's name if it is known (the node we connect to, or the name an
%% incoming peer claimed), else `undefined'; `Address' likewise.
-spec refused(from | to, node() | binary() | undefined,
              {inet:ip_address(), inet:port_number()} | undefined, term()) -> ok.
refused(Direction, Node, Address, Reason) ->
    ensure_visible(),
    {First, Second} = case Direction of
                          from -> {format_address(Address), Node};
                          to -> {Node, format_address(Address)}
                      end,
    ?LOG_WARNING("macula_dist: refused connection ~ts ~ts~ts: ~ts",
                 [Direction, text(First), case text(Second) of "" -> ""; T -> " (" ++ T ++ ")" end,
                  reason_text(Reason)],
                 #{domain => ?DOMAIN, macula_event => refused, node => Node, address => Address,
                   initiator => Direction =:= to, reason => Reason}).

reason_text(Reason) when is_binary(Reason) -> Reason;
reason_text(Reason) -> macula_dist_nif:format_error(Reason).

text(undefined) -> "";
text(Atom) when is_atom(Atom) -> atom_to_list(Atom);
text(Chars) -> unicode:characters_to_list(Chars).

%% Logger is not running when distribution starts at boot, so this waits for the
%% first event.
ensure_visible() ->
    case persistent_term:get(?FILTER_ADDED, false) of
        true ->
            ok;
        false ->
            Filter = {fun logger_filters:domain/2, {log, super, ?DOMAIN}},
            case logger:add_handler_filter(default, macula_dist, Filter) of
                ok -> persistent_term:put(?FILTER_ADDED, true);
                {error, {already_exist, _}} -> persistent_term:put(?FILTER_ADDED, true);
                {error, _} -> ok  % no default handler: nothing to let through
            end
    end.

direction(true) -> "to";
direction(false) -> "from".

format_address(undefined) ->
    undefined;
format_address({Ip, Port}) when tuple_size(Ip) =:= 8 ->
    "[" ++ inet:ntoa(Ip) ++ "]:" ++ integer_to_list(Port);
format_address({Ip, Port}) ->
    inet:ntoa(Ip) ++ ":" ++ integer_to_list(Port).
