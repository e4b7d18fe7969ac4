%%% @doc Node names as macula reads them.
%%%
%%% <ul>
%%% <li>`Port@Host' (`4433@10.0.0.5'): the name part is the node's UDP port (1..65535),
%%%     so nobody needs to look it up;</li>
%%% <li>`Name@Host' (`app@10.0.0.5'): any other name part OTP accepts (letters, digits,
%%%     `_' and `-'); where such a node listens is found by macula_dist_discovery.
%%%     Client-only nodes (relx, nodetool and mix helper names, `-dist_listen false')
%%%     and OTP's dynamic names (`undefined@Host') are of this kind.</li>
%%% </ul>
%%% The host part is an IPv4 literal, an IPv6 literal (`4433@::1') or a DNS host name.
%%% Parsing is purely syntactic (no DNS lookup, no atom made): it runs inside
%%% net_kernel and on names sent by peers that have not authenticated yet.
-module(macula_dist_name).

-export([split/1, parse/1, port/1, host_kind/1, host/1]).

-export_type([parsed/0]).

-type parsed() :: {port, inet:port_number(), string()} | {named, string(), string()}.

%% @doc `{Port, Host}' for a `Port@Host' name, `false' for anything else.
-spec split(node() | string()) -> {inet:port_number(), string()} | false.
split(Node) when is_atom(Node); is_list(Node) ->
    case parse(Node) of
        {ok, {port, Port, Host}} -> {Port, Host};
        _ -> false
    end;
split(_) ->
    false.

%% @doc What kind of node name `Node' is, or why it is none.
-spec parse(node() | string() | binary()) ->
          {ok, parsed()} | {error, {bad_node_name, string()}}.
parse(Node) when is_atom(Node) ->
    parse(atom_to_list(Node));
parse(Node) when is_binary(Node) ->
    case unicode:characters_to_list(Node) of
        List when is_list(List) -> parse(List);
        _ -> {error, {bad_node_name, "not UTF-8"}}
    end;
parse(Node) when is_list(Node) ->
    case string:split(Node, "@", all) of
        [Name, Host] ->
            case {port(Name), host_kind(Host)} of
                {_, {error, _}} -> {error, {bad_node_name, "host part is neither an IP address nor a host name"}};
                {{ok, Port}, {ok, _}} -> {ok, {port, Port, Host}};
                {{error, _}, {ok, _}} -> named(Name, Host)
            end;
        _ ->
            {error, {bad_node_name, "not of the form name@host"}}
    end;
parse(_) ->
    {error, {bad_node_name, "not a node name"}}.

%% The characters net_kernel allows in the name part of a node name it starts. A name
%% of digits only that is no port (`0', `080', `70000') is a mistake, not a name.
named(Name, Host) ->
    case Name =/= "" andalso lists:all(fun is_name_char/1, Name) of
        true ->
            case lists:all(fun is_digit/1, Name) of
                true -> {error, {bad_node_name, "name part is digits but no UDP port (1..65535, no leading zero)"}};
                false -> {ok, {named, Name, Host}}
            end;
        false ->
            {error, {bad_node_name, "name part may only have letters, digits, '_' and '-'"}}
    end.

%% @doc The host part of any macula node name.
-spec host(node() | string() | binary()) -> {ok, string()} | {error, {bad_node_name, string()}}.
host(Node) ->
    case parse(Node) of
        {ok, {port, _Port, Host}} -> {ok, Host};
        {ok, {named, _Name, Host}} -> {ok, Host};
        {error, _} = Error -> Error
    end.

%% @doc The UDP port a node name's name part stands for. Leading zeros are refused so
%% that one port has exactly one node name.
-spec port(string() | atom()) -> {ok, inet:port_number()} | {error, {bad_port, string()}}.
port(Name) when is_atom(Name) ->
    port(atom_to_list(Name));
port(Name) ->
    case length(Name) =< 5 andalso Name =/= "" andalso hd(Name) =/= $0
        andalso lists:all(fun is_digit/1, Name) of
        true ->
            case list_to_integer(Name) of
                Port when Port >= 1, Port =< 65535 -> {ok, Port};
                _ -> {error, {bad_port, Name}}
            end;
        false ->
            {error, {bad_port, Name}}
    end.

%% @doc Whether a host is an IP literal (and which family) or a host name.
-spec host_kind(string()) -> {ok, {ip, inet:ip_address()} | name} | {error, {bad_host, string()}}.
host_kind(Host) ->
    case inet:parse_strict_address(unbracket(Host)) of
        {ok, Ip} -> {ok, {ip, Ip}};
        {error, _} ->
            case is_host_name(Host) of
                true -> {ok, name};
                false -> {error, {bad_host, Host}}
            end
    end.

unbracket([$[ | Rest]) ->
    case lists:reverse(Rest) of
        [$] | Inner] -> lists:reverse(Inner);
        _ -> [$[ | Rest]
    end;
unbracket(Host) ->
    Host.

%% RFC 1123 host names; an all-numeric dotted name that is no IP literal is a typo.
is_host_name(Host0) ->
    Host = string:trim(Host0, trailing, "."),
    Labels = string:split(Host, ".", all),
    Host =/= ""
        andalso length(Host) =< 253
        andalso lists:all(fun is_label/1, Labels)
        andalso not lists:all(fun(C) -> is_digit(C) orelse C =:= $. end, Host).

is_label(Label) ->
    Label =/= ""
        andalso length(Label) =< 63
        andalso hd(Label) =/= $-
        andalso lists:last(Label) =/= $-
        andalso lists:all(fun(C) -> is_digit(C) orelse is_letter(C) orelse C =:= $- end, Label).

is_name_char(C) -> is_digit(C) orelse is_letter(C) orelse C =:= $_ orelse C =:= $-.
is_digit(C) -> C >= $0 andalso C =< $9.
is_letter(C) -> (C >= $a andalso C =< $z) orelse (C >= $A andalso C =< $Z).
