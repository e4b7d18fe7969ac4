%%% @doc Traffic the suites send between nodes, run ON a node (through
%%% macula_test_peer:call/5): the node that calls a function here is the sender, the
%%% receiver is spawned on the other node.
-module(macula_test_traffic).

-export([md5_transfer/3, md5_receiver/1, seq_transfer/4, seq_receiver/4, drain_acks/3]).

%% @doc Sends one random binary of `Size' bytes to a process on `Node', which answers
%% with its md5: `{LocalMd5, RemoteMd5, RemoteSize, Ms}', or `RemoteMd5 = timeout'
%% if no answer came within `Timeout' ms.
-spec md5_transfer(node(), pos_integer(), timeout()) ->
          {binary(), binary() | timeout, non_neg_integer(), integer()}.
md5_transfer(Node, Size, Timeout) ->
    Self = self(),
    Receiver = spawn(Node, ?MODULE, md5_receiver, [Self]),
    Bin = crypto:strong_rand_bytes(Size),
    Md5 = erlang:md5(Bin),
    T0 = erlang:monotonic_time(millisecond),
    Receiver ! {data, Self, Bin},
    receive
        {md5, Receiver, RMd5, RSize} -> {Md5, RMd5, RSize, erlang:monotonic_time(millisecond) - T0}
    after Timeout ->
            {Md5, timeout, 0, Timeout}
    end.

-spec md5_receiver(pid()) -> term().
md5_receiver(From) ->
    receive
        {data, From, Bin} -> From ! {md5, self(), erlang:md5(Bin), byte_size(Bin)}
    after 60000 ->
            ok
    end.

%% @doc Sends `N' numbered messages carrying `Payload' to a process on `Node' that
%% checks each one; `{Result, Ms}', where Result is `{ok, N}' or what the receiver
%% found wrong (a gap of more than `GapMs' between two messages counts as missing), or
%% `timeout' after `TotalMs'.
-spec seq_transfer(node(), pos_integer(), binary(), {timeout(), timeout()}) -> {term(), integer()}.
seq_transfer(Node, N, Payload, {GapMs, TotalMs}) ->
    Self = self(),
    Receiver = spawn(Node, ?MODULE, seq_receiver, [Self, N, Payload, GapMs]),
    T0 = erlang:monotonic_time(millisecond),
    [Receiver ! {seq, I, Payload} || I <- lists:seq(1, N)],
    receive
        {seq_done, Receiver, R} -> {R, erlang:monotonic_time(millisecond) - T0}
    after TotalMs ->
            {timeout, erlang:monotonic_time(millisecond) - T0}
    end.

%% @doc Takes whatever `{seq, _, _}' comes next (no selective receive on the number),
%% so a gap, a duplicate, a reordering or a changed payload shows.
-spec seq_receiver(pid(), pos_integer(), binary(), timeout()) -> term().
seq_receiver(From, N, Payload, GapMs) ->
    seq_receiver(From, 1, N, Payload, GapMs).

seq_receiver(From, I, N, _Payload, _GapMs) when I > N ->
    receive
        {seq, X, _} -> From ! {seq_done, self(), {duplicate_or_extra, X}}
    after 500 ->
            From ! {seq_done, self(), {ok, N}}
    end;
seq_receiver(From, I, N, Payload, GapMs) ->
    receive
        {seq, I, Payload} -> seq_receiver(From, I + 1, N, Payload, GapMs);
        {seq, X, _} -> From ! {seq_done, self(), {out_of_order, {expected, I}, {got, X}}}
    after GapMs ->
            From ! {seq_done, self(), {missing_from, I}}
    end.

%% @doc The highest of `Acked' and every `{Tag, From, N}' already in the mailbox,
%% without waiting: a windowed sender's view of how far its receiver got.
-spec drain_acks(atom(), term(), integer()) -> integer().
drain_acks(Tag, From, Acked) ->
    receive
        {Tag, From, N} -> drain_acks(Tag, From, max(N, Acked))
    after 0 ->
            Acked
    end.
