%%% @doc Node names of the form `Port@Host'.
%%%
%%% The name part is the node's UDP port (1..65535), so no EPMD is needed to find it.
%%% The host part is an IPv4 literal, an IPv6 literal (`4433@::1') or a DNS host name.
%%% Parsing is purely syntactic (no DNS lookup): it runs inside net_kernel.
-module(macula_dist_name).

-export([split/1, port/1, host_kind/1]).

%% @doc `{Port, Host}' for a macula node name, `false' for anything else.
-spec split(node() | string()) -> {inet:port_number(), string()} | false.
split(Node) when is_atom(Node) ->
    split(atom_to_list(Node));
split(Node) when is_list(Node) ->
    case string:split(Node, "@") of
        [Name, Host] ->
            case {port(Name), host_kind(Host)} of
                {{ok, Port}, {ok, _}} -> {Port, Host};
                _ -> false
            end;
        _ ->
            false
    end;
split(_) ->
    false.

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

is_digit(C) -> C >= $0 andalso C =< $9.
is_letter(C) -> (C >= $a andalso C =< $z) orelse (C >= $A andalso C =< $Z).
