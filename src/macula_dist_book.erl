%%% @doc The static address book: where nodes with `Name@Host' names listen.
%%%
%%% A text file, one node a line, whitespace between the three fields:
%%% <pre>
%%%   # node               host           UDP port
%%%   app@10.0.0.5         10.0.0.5       4433
%%%   db@db1.example.org   db1.example.org 4500
%%%   app@10.0.0.6         fd00::6        4433
%%% </pre>
%%% `host' is an IP literal or a host name (looked up when connecting); everything
%%% after a `#' is a comment; blank lines are skipped. A node listed twice is an
%%% error, as is any malformed line, reported with its line number. The file is read
%%% once, when the node starts (option `address_book').
-module(macula_dist_book).

-export([load/1, parse/1, lookup/2]).

-export_type([book/0]).

%% Node names are kept as binaries: no atom is made for a book entry.
-type book() :: #{binary() => {Host :: string(), inet:port_number()}}.

%% @doc Reads and parses a book file. prim_file: there is no file server at boot.
-spec load(string()) -> {ok, book()} | {error, term()}.
load(Path) ->
    case prim_file:read_file(Path) of
        {ok, Bin} -> parse(Bin);
        {error, Why} -> {error, {Path, file:format_error(Why)}}
    end.

%% @doc Parses the text of a book.
-spec parse(binary() | string()) -> {ok, book()} | {error, {line, pos_integer(), term()}}.
parse(Text) ->
    Lines = string:split(unicode:characters_to_list(Text), "\n", all),
    parse_lines(Lines, 1, #{}).

parse_lines([], _N, Book) ->
    {ok, Book};
parse_lines([Line | Lines], N, Book) ->
    case parse_line(strip_comment(Line)) of
        skip ->
            parse_lines(Lines, N + 1, Book);
        {ok, Node, _Entry} when is_map_key(Node, Book) ->
            {error, {line, N, {listed_twice, Node}}};
        {ok, Node, Entry} ->
            parse_lines(Lines, N + 1, Book#{Node => Entry});
        {error, Why} ->
            {error, {line, N, Why}}
    end.

strip_comment(Line) ->
    hd(string:split(Line, "#")).

parse_line(Line) ->
    case string:lexemes(Line, " \t\r") of
        [] -> skip;
        [Node, Host, Port] -> entry(Node, Host, Port);
        Fields -> {error, {expected_node_host_port, length(Fields)}}
    end.

entry(Node, Host, PortText) ->
    case {macula_dist_name:parse(Node), macula_dist_name:host_kind(Host), port(PortText)} of
        {{error, {bad_node_name, Why}}, _, _} -> {error, {bad_node_name, Node, Why}};
        {_, {error, _} = Error, _} -> Error;
        {_, _, error} -> {error, {bad_port, PortText}};
        {{ok, _}, {ok, _}, {ok, Port}} -> {ok, unicode:characters_to_binary(Node), {Host, Port}}
    end.

port(Text) ->
    case macula_dist_name:port(Text) of
        {ok, Port} -> {ok, Port};
        {error, _} -> error
    end.

%% @doc Where the book says `Node' listens.
-spec lookup(node(), book()) -> {ok, {string(), inet:port_number()}} | error.
lookup(Node, Book) ->
    maps:find(atom_to_binary(Node, utf8), Book).
