%%% macula_bench -- compare Erlang distribution carriers on one host.
%%%
%%% What it measures, per carrier (inet_tcp, inet_tls, macula), each on a
%%% fresh pair of OS-level BEAM nodes A and B on 127.0.0.1:
%%%   1. connection setup: median wall time of net_kernel:connect_node/1 on A
%%%      over N fresh connections (disconnect, wait until BOTH sides have
%%%      dropped the connection, reconnect, time the connect).
%%%   2. latency: small-message round trip between a process on A and an
%%%      echo process on B (p50/p99 over 10,000 round trips), and the
%%%      erpc:call/4 round trip p50/p99 (2,000 calls).
%%%   3. throughput, A -> B, windowed so the sender can never run ahead of the
%%%      receiver (the receiver acks, the sender blocks on a full window):
%%%      1 MiB and 64 KiB binaries (MB/s, 8 messages in flight), 8 parallel
%%%      sender/receiver pairs with 64 KiB binaries, and 100-byte binaries
%%%      (messages/s, acked every 1,000, 4 batches in flight), and the same for a
%%%      tuple of 20 atoms (what the atom cache of macula-1 saves). Each run is
%%%      time bounded (default 5 s) or byte bounded, whichever comes first.
%%%   4. head-of-line blocking: while one process streams 1 MiB binaries to a
%%%      process on B (16 in flight, acked), another pair ping-pongs small
%%%      messages; their round trip p50/p99/max and how many completed while
%%%      the bulk ran, and the p99 of how long the pinger's sends were suspended
%%%      by busy distribution (part of the round trip). For macula also with the
%%%      pinging pair marked by macula_dist:prioritize/1. macula runs twice: with its default pool of
%%%      data streams (column macula) and with data_streams 1 (macula-1, one
%%%      ordered stream like TCP).
%%%   5. CPU seconds per GB moved (utime+stime from /proc/<pid>/stat of both
%%%      beam processes around the 1 MiB run, plus the whole host's busy time
%%%      from /proc/stat, which also catches kernel network work) and peak
%%%      RSS (VmHWM) per node. The CPU that other processes used meanwhile is
%%%      reported, with a warning when the host was busy.
%%%
%%% How: this module is both the orchestrator and the workload. The
%%% orchestrator is a NON-distributed node (so it never needs any carrier
%%% itself) started by bench/run. It starts the nodes with OTP 25's peer
%%% module over a TCP control connection (connection => 0), loads this module
%%% on them via -pa, and drives the measurement functions with peer:call/5.
%%% All timing happens on node A with erlang:monotonic_time/0.
%%%
%%% Safety: every node's OS pid is appended to a pid file that bench/run
%%% kills on exit; a watchdog halts the orchestrator after a deadline; each
%%% carrier's nodes are stopped (and SIGKILLed if needed) before the next
%%% carrier starts.
%%%
%%% Inputs come from bench/run through MACULA_BENCH_* environment variables
%%% (internal paths) and plain arguments after -extra (user options).
-module(macula_bench).

%% Orchestrator entry points (erl -s macula_bench main -extra ARGS; bench/netns runs
%% netns_main).
-export([main/0, netns_main/0]).
%% Called on the peer nodes through peer:call/5.
-export([dist_protocol/1, disconnect/1, wait_gone/1, wait_present/1, timed_connect/1,
         watch_start/1, watch_count/0,
         rtt/2, erpc_rtt/2, throughput/6, parallel_throughput/7, atom_rate/3, rtt_under_bulk/3]).
%% Spawned on the remote node B by the functions above.
-export([echo/1, echo/2, receiver/2]).

-include_lib("kernel/include/net_address.hrl").
-include_lib("public_key/include/public_key.hrl").

-define(HOST, "127.0.0.1").
-define(CALL_TIMEOUT, 180000).          % one peer:call; the watchdog bounds the total
-define(ACK_TIMEOUT, 30000).            % a stalled stream fails instead of hanging
-define(WAIT_TIMEOUT, 15000).           % nodeup/nodedown propagation

%%====================================================================
%% Orchestrator
%%====================================================================

main() ->
    %% Peer nodes forward their console output (logger reports, io:format)
    %% to the group leader of whoever started them: send it to stderr, so
    %% stdout carries only the result table (printed to 'user').
    group_leader(whereis(standard_error), self()),
    Code = try
               run(parse_args(init:get_plain_arguments(), defaults()))
           catch
               throw:{usage, Msg} ->
                   err("~s~n", [Msg]),
                   2;
               Class:Reason:Stack ->
                   err("bench crashed: ~p:~p~n~p~n", [Class, Reason, Stack]),
                   stop_all_nodes(),
                   2
           end,
    erlang:halt(Code).

defaults() ->
    #{carriers => [tcp, tls, macula1, macula], quick => false, markdown => undefined,
      duration => undefined}.

parse_args([], Opts) -> Opts;
parse_args(["--quick" | T], Opts) -> parse_args(T, Opts#{quick => true});
parse_args(["--markdown", File | T], Opts) -> parse_args(T, Opts#{markdown => File});
parse_args(["--duration", S | T], Opts) ->
    case string:to_integer(S) of
        {Secs, ""} when Secs > 0 -> parse_args(T, Opts#{duration => Secs * 1000});
        _ -> throw({usage, "--duration needs whole seconds: " ++ S})
    end;
parse_args(["--carriers", Cs | T], Opts) ->
    Carriers = [carrier(C) || C <- string:lexemes(Cs, ",")],
    parse_args(T, Opts#{carriers => Carriers});
parse_args([Other | _], _) ->
    throw({usage, "unknown argument: " ++ Other}).

carrier("tcp") -> tcp;
carrier("tls") -> tls;
carrier("macula") -> macula;
carrier("macula1") -> macula1;
carrier(C) -> throw({usage, "unknown carrier: " ++ C ++ " (use tcp,tls,macula1,macula)"}).

%% Workload sizes. --quick keeps every measurement but shrinks it.
config(#{quick := Quick, duration := Dur}) ->
    Base = case Quick of
               false -> #{connects => 20, rtts => 10000, erpcs => 2000,
                          duration => 5000, budget => 10000000000, hol => 10000};
               true -> #{connects => 10, rtts => 2000, erpcs => 500,
                         duration => 1000, budget => 2000000000, hol => 3000}
           end,
    case Dur of
        undefined -> Base;
        _ -> Base#{duration => Dur}
    end.

context() ->
    Env = fun(K) -> os:getenv("MACULA_BENCH_" ++ K, "") end,
    Tmp = Env("TMP"),
    Tmp =/= "" orelse throw({usage, "run this through bench/run"}),
    #{tmp => Tmp,
      bench_ebin => Env("EBIN"),
      macula_ebin => Env("MACULA_EBIN"),
      macula_status => Env("MACULA_STATUS"),
      epmd_port => Env("EPMD_PORT"),
      clk_tck => list_to_integer(Env("CLK_TCK")),
      certs => Env("CERTS"),
      watchdog => list_to_integer(Env("WATCHDOG")),
      %% "key value ..." pairs for every macula node, to compare options.
      macula_opts => string:lexemes(Env("MACULA_OPTS"), " "),
      %% A fresh random cookie: nothing else on the host can join.
      cookie => "mb" ++ integer_to_list(erlang:unique_integer([positive]))
                    ++ integer_to_list(rand:uniform(1 bsl 40))}.

run(Opts = #{carriers := Carriers}) ->
    Ctx = context(),
    Cfg = config(Opts),
    start_watchdog(maps:get(watchdog, Ctx)),
    Results = [{C, run_carrier(C, Cfg, Ctx)} || C <- Carriers],
    %% Carriers that were not requested still get a (skipped) column.
    All = [{C, proplists:get_value(C, Results, skipped)} || C <- [tcp, tls, macula1, macula]],
    Table = render(All, Cfg),
    io:put_chars(user, maps:get(text, Table)),
    case maps:get(markdown, Opts) of
        undefined -> ok;
        File -> ok = file:write_file(File, maps:get(markdown, Table))
    end,
    case [C || {C, {error, _}} <- Results] of
        [] -> 0;
        Failed ->
            err("FAILED carriers: ~p~n", [Failed]),
            1
    end.

%% Kill everything and halt if the run exceeds its time budget; bench/run
%% has a second, slightly later timeout around this whole VM.
start_watchdog(Secs) ->
    spawn(fun() ->
                  timer:sleep(Secs * 1000),
                  err("watchdog: benchmark exceeded ~p s, killing all nodes~n", [Secs]),
                  kill_tracked(),
                  erlang:halt(3)
          end).

run_carrier(C, _Cfg, #{macula_status := Status}) when (C =:= macula orelse C =:= macula1),
                                                      Status =/= "ok" ->
    err("[~p] FAILED: ~s~n", [C, Status]),
    {error, Status};
run_carrier(C, Cfg, Ctx) ->
    log(C, "starting nodes"),
    try
        {NameA, NameB} = names(C),
        A = start_node(C, NameA, Ctx),
        B = start_node(C, NameB, Ctx),
        R = measure(C, A, B, Cfg, Ctx),
        log(C, "done"),
        {ok, R}
    catch
        Class:Reason:Stack ->
            err("[~p] FAILED: ~p:~p~n  ~p~n", [C, Class, Reason, Stack]),
            {error, {Class, Reason}}
    after
        stop_all_nodes()
    end.

%% Node names. For macula the name IS the UDP port (PORT@IP); tcp/tls use
%% epmd and a listen port range instead, see carrier_args/3.
names(tcp) -> {"47101", "47102"};
names(tls) -> {"47103", "47104"};
names(macula) -> {"47001", "47002"};
names(macula1) -> {"47003", "47004"}.

carrier_args(tcp, _Name, Ctx) ->
    epmd_args(Ctx);
carrier_args(tls, Name, Ctx) ->
    ["-proto_dist", "inet_tls", "-ssl_dist_optfile", tls_optfile(Name, Ctx)
     | epmd_args(Ctx)];
carrier_args(macula, _Name, #{macula_ebin := Ebin} = Ctx) ->
    %% -proto_dist exactly once: a second one silently selects inet_tcp (OTP 25).
    ["-proto_dist", "macula", "-no_epmd", "-pa", Ebin | macula_opt_args(Ctx)];
carrier_args(macula1, Name, Ctx) ->
    carrier_args(macula, Name, Ctx) ++ ["-macula_dist_opt", "data_streams", "1"].

macula_opt_args(#{macula_opts := Opts}) ->
    opt_pairs(Opts).

opt_pairs([Key, Value | Rest]) ->
    ["-macula_dist_opt", Key, Value | opt_pairs(Rest)];
opt_pairs([]) ->
    [];
opt_pairs([Odd]) ->
    throw({usage, "MACULA_BENCH_MACULA_OPTS needs key value pairs, not " ++ Odd}).

%% A private epmd (started by bench/run) on a non-default port, so the bench
%% neither depends on nor disturbs a system epmd; dist listen ports are kept
%% in a range unlikely to collide with anything else.
epmd_args(#{epmd_port := Port}) ->
    ["-epmd_port", Port,
     "-kernel", "inet_dist_listen_min", "47110", "inet_dist_listen_max", "47199"].

start_node(C, Name, Ctx = #{bench_ebin := Ebin, cookie := Cookie, tmp := Tmp}) ->
    Dump = filename:join(Tmp, "erl_crash-" ++ Name ++ ".dump"),
    Args = ["-setcookie", Cookie, "-pa", Ebin, "-start_epmd", "false",
            %% Keep forwarded crash reports (e.g. ssl's full state) readable.
            "-kernel", "error_logger_format_depth", "30"
            | carrier_args(C, Name, Ctx)],
    Opts = #{name => Name, host => ?HOST,
             connection => 0,            % control over TCP, not over dist
             args => Args, wait_boot => 20000,
             env => [{"ERL_CRASH_DUMP", Dump}]},
    case macula_node:start(Opts) of
        {ok, #{peer := Peer, node := Node, os_pid := OsPid}} ->
            track(Peer, OsPid),
            #{peer => Peer, node => Node, ospid => OsPid};
        {error, {node_start_failed, _, Reason, _}} ->
            %% peer starts nodes -detached, so their console (where e.g.
            %% "Protocol 'macula': register/listen error" goes) is lost:
            %% boot the same command line once more in the foreground and
            %% show what it prints, plus any crash dump slogan.
            timer:sleep(1000),              % let a dying node finish its dump
            Cmd = ["erl", "-name", Name ++ "@" ++ ?HOST | Args],
            error({node_start_failed, Name, Reason,
                   {crash_slogan, crash_slogan(Dump)},
                   {command_line, lists:flatten(lists:join(" ", Cmd))},
                   {foreground_boot_output, boot_probe(Cmd, Dump ++ ".probe")}})
    end.

%% Bounded by timeout(1); the command line contains our temp dir, so
%% bench/run's exit trap would also catch a straggler.
boot_probe(Cmd, Dump) ->
    Quoted = [[$', A, $'] || A <- Cmd ++ ["-noshell", "-eval", "erlang:halt()."]],
    Out = os:cmd(lists:flatten(["ERL_CRASH_DUMP='", Dump, "' timeout -k 2 15 ",
                                lists:join(" ", Quoted), " 2>&1"])),
    string:slice(Out, 0, 2000).

crash_slogan(File) ->
    case file:read_file(File) of
        {ok, Bin} ->
            [_, Slogan | _] = binary:split(Bin, <<"\n">>, [global]) ++ [<<>>, <<>>],
            binary_to_list(Slogan);
        _ -> none
    end.

%% Remember started nodes: in the pid file for bench/run's exit trap, and in
%% the process dictionary for orderly stops between carriers.
track(Peer, OsPid) ->
    put(nodes, [{Peer, OsPid} | get_nodes()]),
    write_pidfile().

%% Only pids of live nodes are listed, so a kill on exit can never hit a
%% recycled pid of a node we already stopped.
write_pidfile() ->
    ok = file:write_file(pidfile(), [[integer_to_list(P), $\n] || {_, P} <- get_nodes()]).

pidfile() -> os:getenv("MACULA_BENCH_PIDFILE").

get_nodes() ->
    case get(nodes) of
        undefined -> [];
        L -> L
    end.

stop_all_nodes() ->
    [stop_node(P, OsPid) || {P, OsPid} <- get_nodes()],
    put(nodes, []),
    write_pidfile().

stop_node(Peer, OsPid) ->
    macula_node:stop(#{peer => Peer, os_pid => OsPid}, 5000).

kill_tracked() ->
    case file:read_file(pidfile()) of
        {ok, Bin} ->
            [os:cmd("kill -9 " ++ binary_to_list(P))
             || P <- binary:split(Bin, <<"\n">>, [global, trim_all])];
        _ -> ok
    end.

%%--------------------------------------------------------------------
%% TLS configuration: mutual TLS, TLS 1.3 only. bench/run generates the
%% certificates with openssl; without openssl we make them here.

tls_optfile(Name, #{tmp := Tmp, certs := Certs0}) ->
    Certs = case Certs0 of
                "" -> erlang_certs(filename:join(Tmp, "certs"));
                _ -> Certs0
            end,
    Common = [{certfile, filename:join(Certs, "node.pem")},
              {keyfile, filename:join(Certs, "node.key")},
              {cacertfile, filename:join(Certs, "ca.pem")},
              {verify, verify_peer},
              {versions, ['tlsv1.3']}],
    Conf = [{server, [{fail_if_no_peer_cert, true} | Common]},
            {client, Common}],
    File = filename:join(Tmp, "ssl_dist-" ++ Name ++ ".conf"),
    ok = file:write_file(File, io_lib:format("~p.~n", [Conf])),
    File.

%% One CA and one node certificate (EC P-256, SAN IP 127.0.0.1) shared by
%% both nodes for the server and the client role.
erlang_certs(Dir) ->
    case filelib:is_regular(filename:join(Dir, "node.pem")) of
        true -> Dir;
        false ->
            ok = filelib:ensure_dir(filename:join(Dir, "x")),
            Key = {key, {namedCurve, secp256r1}},
            San = {extensions,
                   [{'Extension', ?'id-ce-subjectAltName', false,
                     [{iPAddress, [127, 0, 0, 1]}, {dNSName, "127.0.0.1"},
                      {dNSName, "localhost"}]}]},
            #{server_config := S} =
                public_key:pkix_test_data(
                  #{server_chain => #{root => [Key], intermediates => [], peer => [Key, San]},
                    client_chain => #{root => [Key], intermediates => [], peer => [Key]}}),
            {KeyType, KeyDer} = proplists:get_value(key, S),
            Pem = fun(F, Entries) ->
                          ok = file:write_file(filename:join(Dir, F),
                                               public_key:pem_encode(Entries))
                  end,
            Pem("node.pem", [{'Certificate', proplists:get_value(cert, S), not_encrypted}]),
            Pem("node.key", [{KeyType, KeyDer, not_encrypted}]),
            %% cacerts = [server root, client root]; trust both.
            Pem("ca.pem", [{'Certificate', D, not_encrypted}
                           || D <- proplists:get_value(cacerts, S)]),
            Dir
    end.

%%--------------------------------------------------------------------
%% The measurement sequence for one carrier.

measure(C, A = #{peer := PA, node := NA}, B = #{peer := PB, node := NB}, Cfg, Ctx) ->
    #{connects := NConn, rtts := NRtt, erpcs := NErpc,
      duration := Dur, budget := Budget, hol := HolMs} = Cfg,
    Start = {host_busy_secs(Ctx), cpu_secs(A, Ctx) + cpu_secs(B, Ctx), erlang:monotonic_time()},
    %% First connection doubles as warm-up (code loading, e.g. ssl on TLS).
    {ok, _} = call(PA, ?MODULE, timed_connect, [NB]),
    ok = call(PB, ?MODULE, wait_present, [NA]),
    check_carrier(C, A, B),

    log(C, "connection setup x~p", [NConn]),
    Setups = [connect_cycle(A, B) || _ <- lists:seq(1, NConn)],
    SetupMs = median(Setups) / 1000,

    %% From here on the connection must stay up; count any nodedown.
    ok = call(PA, ?MODULE, watch_start, [NB]),
    ok = call(PB, ?MODULE, watch_start, [NA]),

    log(C, "message round trips x~p", [NRtt]),
    Rtt = call(PA, ?MODULE, rtt, [NB, NRtt]),
    log(C, "erpc:call round trips x~p", [NErpc]),
    Erpc = call(PA, ?MODULE, erpc_rtt, [NB, NErpc]),

    log(C, "throughput 1 MiB"),
    %% Host-wide busy CPU too: kernel softirq work for loopback TCP/UDP is
    %% not always charged to the sending or receiving process.
    Cpu0 = {cpu_secs(A, Ctx), cpu_secs(B, Ctx), host_busy_secs(Ctx)},
    T1M = call(PA, ?MODULE, throughput, [NB, 1 bsl 20, 8, 1, Dur, Budget]),
    Cpu1 = {cpu_secs(A, Ctx), cpu_secs(B, Ctx), host_busy_secs(Ctx)},
    log(C, "throughput 64 KiB"),
    T64 = call(PA, ?MODULE, throughput, [NB, 1 bsl 16, 8, 1, Dur, Budget]),
    log(C, "throughput 64 KiB x8 senders"),
    T64x8 = call(PA, ?MODULE, parallel_throughput, [NB, 1 bsl 16, 8, 1, Dur, Budget, 8]),
    log(C, "100-byte message rate"),
    T100 = call(PA, ?MODULE, throughput, [NB, 100, 4, 1000, Dur, Budget]),
    log(C, "20-atom tuple message rate"),
    TAtoms = call(PA, ?MODULE, atom_rate, [NB, Dur, Budget]),
    log(C, "small-message round trips under another pair's 1 MiB bulk transfer"),
    Hol = call(PA, ?MODULE, rtt_under_bulk, [NB, HolMs, false]),
    HolPrio = case C of
                  macula ->
                      log(C, "the same, the pinging pair prioritised"),
                      call(PA, ?MODULE, rtt_under_bulk, [NB, HolMs, true]);
                  _ ->
                      #{}
              end,

    case {call(PA, ?MODULE, watch_count, []), call(PB, ?MODULE, watch_count, [])} of
        {0, 0} -> ok;
        Downs -> error({connection_dropped_during_measurement, {nodedowns_a_b, Downs}})
    end,

    Other = other_cpu(Start, {host_busy_secs(Ctx), cpu_secs(A, Ctx) + cpu_secs(B, Ctx),
                              erlang:monotonic_time()}),
    GB = maps:get(bytes, T1M) / 1.0e9,
    {{CpuA0, CpuB0, Host0}, {CpuA1, CpuB1, Host1}} = {Cpu0, Cpu1},
    [log(C, "~s: ~p bytes in ~.2f s", [L, maps:get(bytes, T), maps:get(secs, T)])
     || {L, T} <- [{"1 MiB", T1M}, {"64 KiB", T64}, {"64 KiB x8", T64x8}, {"100 B", T100}]],
    #{setup_ms => SetupMs,
      rtt_p50 => maps:get(p50, Rtt), rtt_p99 => maps:get(p99, Rtt),
      erpc_p50 => maps:get(p50, Erpc), erpc_p99 => maps:get(p99, Erpc),
      tp_1m => maps:get(mb_s, T1M), tp_64k => maps:get(mb_s, T64),
      tp_64k_x8 => maps:get(mb_s, T64x8), rate_100b => maps:get(msgs_s, T100) / 1000,
      rate_atoms => maps:get(msgs_s, TAtoms) / 1000,
      hol_p50 => maps:get(p50, Hol), hol_p99 => maps:get(p99, Hol), hol_max => maps:get(max, Hol),
      hol_count => maps:get(count, Hol), hol_bulk => maps:get(bulk_mb_s, Hol),
      hol_suspended => maps:get(suspended_p99, Hol),
      hol_prio_p50 => maps:get(p50, HolPrio, none), hol_prio_p99 => maps:get(p99, HolPrio, none),
      hol_prio_max => maps:get(max, HolPrio, none),
      cpu_a => (CpuA1 - CpuA0) / GB, cpu_b => (CpuB1 - CpuB0) / GB,
      cpu_ab => (CpuA1 - CpuA0 + CpuB1 - CpuB0) / GB,
      cpu_host => (Host1 - Host0) / GB,
      rss_a => vm_hwm_mib(A), rss_b => vm_hwm_mib(B),
      other_cpu => Other}.

%% Make sure the connection really runs over the carrier under test: in
%% OTP 25 a duplicated -proto_dist silently falls back to inet_tcp.
check_carrier(C, #{peer := PA}, #{node := NB}) ->
    Proto = call(PA, ?MODULE, dist_protocol, [NB]),
    log(C, "connection protocol (#net_address.protocol): ~p", [Proto]),
    Ok = case C of
             tcp -> Proto =:= tcp;
             tls -> Proto =:= tls;
             _ -> Proto =/= tcp andalso Proto =/= tls
                      andalso call(PA, code, is_loaded, [macula_dist]) =/= false
         end,
    Ok orelse error({wrong_carrier, C, Proto}).

%% Tear the connection down until neither side lists the other, then time a
%% fresh connect on A. Retries if something re-connected behind our back
%% (auto-connect), so a reused connection is never timed.
connect_cycle(A, B) -> connect_cycle(A, B, 3).

connect_cycle(A = #{peer := PA, node := NA}, B = #{peer := PB, node := NB}, Tries) ->
    ok = call(PA, ?MODULE, disconnect, [NB]),
    ok = call(PB, ?MODULE, wait_gone, [NA]),
    case call(PA, ?MODULE, timed_connect, [NB]) of
        {ok, Us} ->
            ok = call(PB, ?MODULE, wait_present, [NA]),
            Us;
        already_connected when Tries > 0 ->
            connect_cycle(A, B, Tries - 1);
        already_connected ->
            error({reconnected_before_timed_connect, NB})
    end.

call(Peer, M, F, A) ->
    peer:call(Peer, M, F, A, ?CALL_TIMEOUT).

%% utime + stime of the whole beam process (all threads, including any NIF
%% runtime threads), in seconds.
cpu_secs(#{ospid := Pid}, #{clk_tck := Hz}) ->
    {ok, Bin} = file:read_file("/proc/" ++ integer_to_list(Pid) ++ "/stat"),
    %% Fields after the ")" that closes the command name start at field 3.
    [_, Rest] = string:split(binary_to_list(Bin), ")", trailing),
    Fields = string:lexemes(Rest, " "),
    Utime = list_to_integer(lists:nth(14 - 2, Fields)),
    Stime = list_to_integer(lists:nth(15 - 2, Fields)),
    (Utime + Stime) / Hz.

%% Busy (non-idle) CPU seconds of the whole host, from /proc/stat.
host_busy_secs(#{clk_tck := Hz}) ->
    {ok, Bin} = file:read_file("/proc/stat"),
    [Cpu | _] = binary:split(Bin, <<"\n">>),
    [_ | Vals] = string:lexemes(binary_to_list(Cpu), " "),
    %% user nice system idle iowait irq softirq steal (guest is inside user)
    [User, Nice, Sys, _Idle, _Iowait, Irq, SoftIrq, Steal | _] =
        [list_to_integer(V) || V <- Vals],
    (User + Nice + Sys + Irq + SoftIrq + Steal) / Hz.

%% Average number of cores busy with anything but the two nodes (the
%% orchestrator's own share is negligible).
other_cpu({Host0, Nodes0, T0}, {Host1, Nodes1, T1}) ->
    Wall = to_us(T1 - T0) / 1.0e6,
    max(0.0, ((Host1 - Host0) - (Nodes1 - Nodes0)) / Wall).

vm_hwm_mib(#{ospid := Pid}) ->
    {ok, Bin} = file:read_file("/proc/" ++ integer_to_list(Pid) ++ "/status"),
    {match, [Kb]} = re:run(Bin, "VmHWM:\\s+(\\d+) kB", [{capture, all_but_first, list}]),
    list_to_integer(Kb) / 1024.

%%====================================================================
%% Functions run on node A (or B) through peer:call
%%====================================================================

disconnect(Node) ->
    _ = erlang:disconnect_node(Node),
    wait_gone(Node).

%% nodes(connected) also lists pending connections: wait for a clean slate.
wait_gone(Node) ->
    wait_until(fun() -> not lists:member(Node, nodes(connected)) end, {still_connected, Node}).

wait_present(Node) ->
    wait_until(fun() -> lists:member(Node, nodes()) end, {not_connected, Node}).

wait_until(Pred, What) ->
    Deadline = erlang:monotonic_time(millisecond) + ?WAIT_TIMEOUT,
    wait_until(Pred, What, Deadline).

wait_until(Pred, What, Deadline) ->
    case Pred() of
        true -> ok;
        false ->
            erlang:monotonic_time(millisecond) < Deadline orelse error({timeout, What}),
            timer:sleep(1),
            wait_until(Pred, What, Deadline)
    end.

timed_connect(Node) ->
    case lists:member(Node, nodes(connected)) of
        true -> already_connected;
        false ->
            T0 = erlang:monotonic_time(),
            Result = net_kernel:connect_node(Node),
            T1 = erlang:monotonic_time(),
            Result =:= true orelse error({connect_failed, Node, Result}),
            {ok, to_us(T1 - T0)}
    end.

dist_protocol(Node) ->
    {ok, Info} = net_kernel:node_info(Node),
    #net_address{protocol = Protocol} = proplists:get_value(address, Info),
    Protocol.

%% A registered process that counts nodedowns of Node from now on.
watch_start(Node) ->
    Parent = self(),
    Pid = spawn(fun() ->
                        ok = net_kernel:monitor_nodes(true),
                        Parent ! {self(), ready},
                        watch_loop(Node, 0)
                end),
    register(macula_bench_watch, Pid),
    receive {Pid, ready} -> ok end.

watch_loop(Node, N) ->
    receive
        {nodedown, Node} -> watch_loop(Node, N + 1);
        {count, From} -> From ! {count, N}, watch_loop(Node, N);
        _ -> watch_loop(Node, N)
    end.

watch_count() ->
    macula_bench_watch ! {count, self()},
    receive {count, N} -> N after 5000 -> error(watch_timeout) end.

%%--------------------------------------------------------------------
%% Latency

%% Ping-pong a small integer with an echo process on Node.
rtt(Node, N) ->
    Echo = spawn_link(Node, ?MODULE, echo, [self()]),
    _ = ping_pong(Echo, 500, []),                     % warm-up
    Samples = ping_pong(Echo, N, []),
    Echo ! stop,
    stats(Samples).

ping_pong(_Echo, 0, Acc) -> Acc;
ping_pong(Echo, N, Acc) ->
    T0 = erlang:monotonic_time(),
    Echo ! N,
    receive N -> ok end,
    T1 = erlang:monotonic_time(),
    ping_pong(Echo, N - 1, [T1 - T0 | Acc]).

echo(From) ->
    receive
        stop -> ok;
        Msg -> From ! Msg, echo(From)
    end.

echo(From, Prioritize) ->
    ok = prioritize(Prioritize),
    echo(From).

prioritize(false) -> ok;
prioritize(true) -> macula_dist:prioritize(self()).

erpc_rtt(Node, N) ->
    _ = [erpc:call(Node, erlang, node, []) || _ <- lists:seq(1, 100)],  % warm-up
    stats([begin
               T0 = erlang:monotonic_time(),
               Node = erpc:call(Node, erlang, node, []),
               erlang:monotonic_time() - T0
           end || _ <- lists:seq(1, N)]).

%% Native-unit samples -> microsecond percentiles.
stats(Samples) ->
    Sorted = list_to_tuple(lists:sort(Samples)),
    Pct = fun(P) -> to_us(element(max(1, ceil(P * tuple_size(Sorted))), Sorted)) end,
    #{p50 => Pct(0.50), p99 => Pct(0.99), max => Pct(1.0), count => tuple_size(Sorted)}.

%% While one sender on this node streams 1 MiB binaries to a receiver on Node (16
%% in flight, each acked), another process ping-pongs a small message with an echo
%% process on Node for DurMs. Returns the ping round-trip percentiles, how many
%% round trips completed while the bulk ran, and the bulk throughput. With
%% Prioritize, the pinging process and its echo are marked with
%% macula_dist:prioritize/1 before they first talk to each other.
rtt_under_bulk(Node, DurMs, Prioritize) ->
    Self = self(),
    T0 = erlang:monotonic_time(),
    Bulk = spawn_link(fun() ->
                              Deadline = erlang:monotonic_time()
                                  + erlang:convert_time_unit(DurMs + 500, millisecond, native),
                              Self ! {bulk, stream(Node, rand:bytes(1 bsl 20), 16, 1,
                                                   1 bsl 40, Deadline)}
                      end),
    timer:sleep(500),                                  % the bulk transfer is under way
    Pinger = spawn_link(fun() ->
                                ok = prioritize(Prioritize),
                                Echo = spawn_link(Node, ?MODULE, echo, [self(), Prioritize]),
                                End = erlang:monotonic_time()
                                    + erlang:convert_time_unit(DurMs - 500, millisecond, native),
                                Samples = ping_until(Echo, End, 1, []),
                                Echo ! stop,
                                Self ! {pings, Samples}
                        end),
    Samples = receive {pings, S} -> S end,
    {Msgs, Bytes, BulkEnd} = receive {bulk, R} -> R end,
    _ = {Bulk, Pinger, Msgs},
    BulkSecs = to_us(BulkEnd - T0) / 1.0e6,
    {Suspended, RoundTrips} = lists:unzip(Samples),
    (stats(RoundTrips))#{bulk_mb_s => Bytes / BulkSecs / 1.0e6,
                         suspended_p99 => maps:get(p99, stats(Suspended))}.

%% Samples of {how long the send itself took, the round trip}: a send to a node whose
%% distribution queue is busy suspends the sender (busy dist) until the VM resumes it.
ping_until(Echo, End, N, Acc) ->
    case erlang:monotonic_time() >= End of
        true ->
            Acc;
        false ->
            T0 = erlang:monotonic_time(),
            Echo ! N,
            T1 = erlang:monotonic_time(),
            receive N -> ok end,
            ping_until(Echo, End, N + 1, [{T1 - T0, erlang:monotonic_time() - T0} | Acc])
    end.

to_us(Native) ->
    erlang:convert_time_unit(Native * 1000, native, microsecond) / 1000.

median(L) ->
    S = lists:sort(L),
    N = length(S),
    case N rem 2 of
        1 -> lists:nth(N div 2 + 1, S);
        0 -> (lists:nth(N div 2, S) + lists:nth(N div 2 + 1, S)) / 2
    end.

%%--------------------------------------------------------------------
%% Throughput. The receiver acks every AckEvery messages; the sender keeps
%% at most Window * AckEvery messages un-acked, so what we measure is data
%% actually delivered to a process on B, not data queued on A.

throughput(Node, Size, Window, AckEvery, DurMs, Budget) ->
    parallel_throughput(Node, Size, Window, AckEvery, DurMs, Budget, 1).

%% The message rate of a tuple of 20 distinct atoms (a record-like message), which
%% the atom cache of a single-stream connection sends as cache indexes and a pool of
%% streams, without the cache, as text.
atom_rate(Node, DurMs, Budget) ->
    Atoms = list_to_tuple([list_to_atom("macula_bench_field_" ++ integer_to_list(I))
                           || I <- lists:seq(1, 20)]),
    payload_throughput(Node, Atoms, 4, 1000, DurMs, Budget, 1).

%% N independent sender (on A) / receiver (on B) pairs, started together,
%% sharing one deadline and splitting the byte budget.
parallel_throughput(Node, Size, Window, AckEvery, DurMs, Budget, N) ->
    %% Random payload: no layer gets to win by compressing it.
    payload_throughput(Node, rand:bytes(Size), Window, AckEvery, DurMs, Budget, N).

payload_throughput(Node, Payload, Window, AckEvery, DurMs, Budget, N) ->
    MaxMsgs = max(1, Budget div (payload_size(Payload) * N)),
    Self = self(),
    T0 = erlang:monotonic_time(),
    Deadline = T0 + erlang:convert_time_unit(DurMs, millisecond, native),
    Workers = [spawn_link(fun() ->
                                  Self ! {self(), stream(Node, Payload, Window, AckEvery,
                                                         MaxMsgs, Deadline)}
                          end) || _ <- lists:seq(1, N)],
    Results = [receive {W, R} -> R end || W <- Workers],
    T1 = lists:max([End || {_, _, End} <- Results]),
    Secs = to_us(T1 - T0) / 1.0e6,
    Msgs = lists:sum([M || {M, _, _} <- Results]),
    Bytes = lists:sum([B || {_, B, _} <- Results]),
    #{bytes => Bytes, msgs => Msgs, secs => Secs,
      mb_s => Bytes / Secs / 1.0e6, msgs_s => Msgs / Secs}.

%% -> {MessagesDelivered, BytesDelivered, EndTime}
stream(Node, Payload, Window, AckEvery, MaxMsgs, Deadline) ->
    Rcv = spawn_link(Node, ?MODULE, receiver, [self(), AckEvery]),
    Sent = send_loop(Rcv, Payload, 0, 0, Window * AckEvery, MaxMsgs, Deadline),
    %% Dist keeps per-pair order, so 'done' arrives after the last payload.
    Rcv ! {done, self()},
    receive
        {received, Msgs, Bytes} ->
            End = erlang:monotonic_time(),
            Msgs =:= Sent orelse error({lost_messages, Sent, Msgs}),
            Bytes =:= Sent * payload_size(Payload) orelse error({lost_bytes, Bytes}),
            {Msgs, Bytes, End}
    after ?ACK_TIMEOUT -> error({stalled, final_count})
    end.

send_loop(_Rcv, _P, Sent, _InFlight, _Max, MaxMsgs, _Deadline) when Sent >= MaxMsgs ->
    Sent;
send_loop(Rcv, P, Sent, InFlight, Max, MaxMsgs, Deadline) when InFlight >= Max ->
    receive
        {ack, K} -> send_loop(Rcv, P, Sent, InFlight - K, Max, MaxMsgs, Deadline)
    after ?ACK_TIMEOUT -> error({stalled, {sent, Sent}, {in_flight, InFlight}})
    end;
send_loop(Rcv, P, Sent, InFlight, Max, MaxMsgs, Deadline) ->
    case erlang:monotonic_time() >= Deadline of
        true -> Sent;
        false ->
            Rcv ! P,
            send_loop(Rcv, P, Sent + 1, InFlight + 1, Max, MaxMsgs, Deadline)
    end.

receiver(Sender, AckEvery) -> receiver(Sender, AckEvery, 0, 0, 0).

receiver(Sender, AckEvery, Pending, Msgs, Bytes) ->
    receive
        {done, Sender} ->
            Sender ! {received, Msgs, Bytes};
        Payload ->
            case Pending + 1 of
                AckEvery ->
                    Sender ! {ack, AckEvery},
                    receiver(Sender, AckEvery, 0, Msgs + 1, Bytes + payload_size(Payload));
                P ->
                    receiver(Sender, AckEvery, P, Msgs + 1, Bytes + payload_size(Payload))
            end
    end.

%% Bytes of a payload: a binary's size, or a term's external size.
payload_size(Bin) when is_binary(Bin) -> byte_size(Bin);
payload_size(Term) -> erlang:external_size(Term).

%%====================================================================
%% Between two network namespaces (bench/netns)
%%====================================================================

%% bench/netns has made the namespaces, the veth link and the loss rule; this starts
%% one node in each for every carrier, runs rtt_under_bulk/3 on A and writes one line
%% per carrier to $MACULA_BENCH_RESULTS: carrier p50_us p99_us max_us round_trips
%% bulk_MB_s (or "carrier FAILED").
netns_main() ->
    group_leader(whereis(standard_error), self()),
    Env = fun(K) -> os:getenv("MACULA_BENCH_" ++ K, "") end,
    Code = try
               [NsA, NsB] = string:lexemes(Env("NETNS"), ","),
               [IpA, IpB] = string:lexemes(Env("NETNS_IPS"), ","),
               Ctx = (context())#{netns => {NsA, NsB}, ips => {IpA, IpB}},
               DurMs = list_to_integer(Env("HOL_MS")),
               {ok, Out} = file:open(Env("RESULTS"), [write]),
               [netns_carrier(carrier(C), DurMs, Ctx#{out => Out})
                || C <- string:lexemes(Env("CARRIERS"), ",")],
               ok = file:close(Out),
               0
           catch
               Class:Reason:Stack ->
                   err("bench/netns crashed: ~p:~p~n~p~n", [Class, Reason, Stack]),
                   stop_all_nodes(),
                   2
           end,
    erlang:halt(Code).

netns_carrier(C, DurMs, Ctx = #{netns := {NsA, NsB}, ips := {IpA, IpB}, out := Out}) ->
    log(C, "starting nodes in ~s and ~s", [NsA, NsB]),
    try
        {NameA, NameB} = names(C),
        A = start_netns_node(C, NameA, NsA, IpA, Ctx),
        B = start_netns_node(C, NameB, NsB, IpB, Ctx),
        {ok, _} = call(maps:get(peer, A), ?MODULE, timed_connect, [maps:get(node, B)]),
        check_carrier(C, A, B),
        R = call(maps:get(peer, A), ?MODULE, rtt_under_bulk, [maps:get(node, B), DurMs, false]),
        io:format(Out, "~p ~.1f ~.1f ~.1f ~b ~b ~.1f~n",
                  [C, maps:get(p50, R), maps:get(p99, R), maps:get(max, R), maps:get(count, R),
                   round(maps:get(bulk_mb_s, R)), maps:get(suspended_p99, R)])
    catch
        Class:Reason:Stack ->
            err("[~p] FAILED: ~p:~p~n  ~p~n", [C, Class, Reason, Stack]),
            io:format(Out, "~p FAILED~n", [C])
    after
        stop_all_nodes()
    end.

%% inet_tcp and inet_tls without epmd: every node listens on one fixed port
%% (-erl_epmd_port), which works because each namespace has its own address.
netns_args(macula, Name, Ctx) -> carrier_args(macula, Name, Ctx);
netns_args(macula1, Name, Ctx) -> carrier_args(macula1, Name, Ctx);
netns_args(tls, Name, Ctx) ->
    ["-proto_dist", "inet_tls", "-ssl_dist_optfile", tls_optfile(Name, Ctx) | netns_args(tcp, Name, Ctx)];
netns_args(tcp, _Name, _Ctx) ->
    ["-erl_epmd_port", "47120"].

start_netns_node(C, Name, Ns, Ip, Ctx = #{bench_ebin := Ebin, cookie := Cookie}) ->
    Erl = os:find_executable("erl"),
    IpCmd = case os:find_executable("ip", "/usr/sbin:/sbin:/usr/bin:/bin") of
                false -> "ip";
                Found -> Found
            end,
    Args = ["-setcookie", Cookie, "-pa", Ebin, "-start_epmd", "false"
            | netns_args(C, Name, Ctx)],
    Opts = #{name => Name, host => Ip, longnames => true,
             connection => standard_io,         % no TCP back to us from inside
             exec => {IpCmd, ["netns", "exec", Ns, Erl]},
             args => Args, wait_boot => 20000},
    {ok, Peer, Node} = peer:start_link(Opts),
    OsPid = list_to_integer(peer:call(Peer, os, getpid, [])),
    track(Peer, OsPid),
    #{peer => Peer, node => Node, ospid => OsPid}.

%%====================================================================
%% Report
%%====================================================================

%% {Key, Label, Decimals}
metrics() ->
    [{setup_ms,  "connection setup, median (ms)", 2},
     {rtt_p50,   "message round trip p50 (us)", 1},
     {rtt_p99,   "message round trip p99 (us)", 1},
     {erpc_p50,  "erpc:call round trip p50 (us)", 1},
     {erpc_p99,  "erpc:call round trip p99 (us)", 1},
     {tp_1m,     "throughput 1 MiB msgs (MB/s)", 0},
     {tp_64k,    "throughput 64 KiB msgs (MB/s)", 0},
     {tp_64k_x8, "throughput 64 KiB x8 senders (MB/s)", 0},
     {rate_100b, "100 B msgs (k msg/s)", 1},
     {rate_atoms, "20-atom tuple msgs (k msg/s)", 1},
     {hol_p50,   "round trip under another's bulk p50 (us)", 1},
     {hol_p99,   "round trip under another's bulk p99 (us)", 1},
     {hol_max,   "round trip under another's bulk max (us)", 1},
     {hol_suspended, "of it, the pinger suspended by busy dist p99 (us)", 1},
     {hol_count, "round trips done during the bulk", 0},
     {hol_bulk,  "the bulk transfer meanwhile (MB/s)", 0},
     {hol_prio_p50, "prioritised round trip under bulk p50 (us)", 1},
     {hol_prio_p99, "prioritised round trip under bulk p99 (us)", 1},
     {hol_prio_max, "prioritised round trip under bulk max (us)", 1},
     {cpu_a,     "CPU s/GB, sender node (1 MiB run)", 2},
     {cpu_b,     "CPU s/GB, receiver node (1 MiB run)", 2},
     {cpu_ab,    "CPU s/GB, both nodes (1 MiB run)", 2},
     {cpu_host,  "CPU s/GB, whole host (1 MiB run)", 2},
     {rss_a,     "peak RSS sender node (MiB)", 1},
     {rss_b,     "peak RSS receiver node (MiB)", 1}].

render(All, Cfg) ->
    Header = ["metric", "tcp", "tls", "macula-1", "macula", "macula/tcp", "macula/tls",
              "macula/macula-1"],
    Get = fun(C) -> proplists:get_value(C, All) end,
    Rows = [[Label | [cell(Get(C), K, D) || C <- [tcp, tls, macula1, macula]]
             ++ [ratio(Get(macula), Get(O), K) || O <- [tcp, tls, macula1]]]
            || {K, Label, D} <- metrics()],
    Notes = notes(All, Cfg),
    #{text => [text_table([Header | Rows]), Notes],
      markdown => [md_table([Header | Rows]), "\n", Notes]}.

cell({ok, R}, K, D) ->
    case maps:get(K, R) of
        none -> "-";
        V -> num(V, D)
    end;
cell({error, _}, _, _) -> "FAILED";
cell(skipped, _, _) -> "skipped".

ratio({ok, M}, {ok, O}, K) ->
    case {maps:get(K, M), maps:get(K, O)} of
        {none, _} -> "-";
        {_, none} -> "-";
        {_, V} when V == 0 -> "-";
        {U, V} -> num(U / V, 2) ++ "x"
    end;
ratio(_, _, _) -> "-".

num(V, 0) -> integer_to_list(round(V));
num(V, D) -> float_to_list(float(V), [{decimals, D}]).

text_table(Rows) ->
    Widths = col_widths(Rows),
    [Hdr | Body] = [format_row(R, Widths, "  ") || R <- Rows],
    Rule = lists:duplicate(lists:sum(Widths) + 2 * (length(Widths) - 1), $-),
    [Hdr, Rule, "\n" | Body].

md_table(Rows = [Hdr | Body]) ->
    Widths = col_widths(Rows),
    %% Numeric columns right-aligned (":" at the right end).
    [W1 | Ws] = Widths,
    Sep = ["|", lists:join("|", [lists:duplicate(W1 + 2, $-)
                                 | [[lists:duplicate(W + 1, $-), $:] || W <- Ws]]), "|\n"],
    [md_row(Hdr, Widths), Sep | [md_row(R, Widths) || R <- Body]].

md_row(R, Widths) -> ["| ", string:trim(format_row(R, Widths, " | "), trailing, "\n"), " |\n"].

col_widths(Rows) ->
    [lists:max([string:length(lists:nth(I, R)) || R <- Rows])
     || I <- lists:seq(1, length(hd(Rows)))].

%% First column left-aligned, numbers right-aligned.
format_row([First | Rest], [W1 | Ws], Sep) ->
    [string:pad(First, W1, trailing), Sep,
     lists:join(Sep, [string:pad(C, W, leading) || {C, W} <- lists:zip(Rest, Ws)]), "\n"].

notes(All, #{duration := Dur, budget := Budget, connects := NC, rtts := NR, erpcs := NE}) ->
    Failures = [io_lib:format("~p failed: ~0p~n", [C, R]) || {C, {error, R}} <- All],
    %% Other work on the host skews every number: say how much there was.
    Other = [{C, maps:get(other_cpu, R)} || {C, {ok, R}} <- All],
    LoadNote =
        case Other of
            [] -> [];
            _ -> io_lib:format("CPU used by other processes during each carrier's run "
                               "(cores): ~s.~s~n",
                               [lists:join(", ", [io_lib:format("~p ~.2f", [C, L])
                                                  || {C, L} <- Other]),
                                case [L || {_, L} <- Other, L > 0.2] of
                                    [] -> "";
                                    _ -> " WARNING: the host was busy, results are noisy."
                                end])
        end,
    [io_lib:format("~nLoopback, one host (~s), OTP ~s. Connection setup: median of ~p; "
                   "round trips: ~p messages, ~p erpc calls.~n"
                   "Throughput runs: ~.1f s or ~p MB each (whichever first), window 8 "
                   "(100 B: ack every 1000, 4 batches in flight). MB = 10^6 bytes.~n"
                   "Ratios are macula/other: >1 is better for throughput, <1 for "
                   "latency, CPU and RSS.~n",
                   [cpu_model(), otp_version(), NC, NR, NE,
                    Dur / 1000, Budget div 1000000]),
     LoadNote, Failures].

otp_version() ->
    Rel = erlang:system_info(otp_release),
    case file:read_file(filename:join([code:root_dir(), "releases", Rel, "OTP_VERSION"])) of
        {ok, V} -> string:trim(binary_to_list(V));
        _ -> Rel
    end.

cpu_model() ->
    N = erlang:system_info(logical_processors),
    Model = case file:read_file("/proc/cpuinfo") of
                {ok, Bin} ->
                    case re:run(Bin, "model name\\s*:\\s*([^\\n]+)", [{capture, all_but_first, list}]) of
                        {match, [M]} -> M;
                        _ -> "unknown cpu"
                    end;
                _ -> "unknown cpu"
            end,
    io_lib:format("~p x ~s", [N, Model]).

%%--------------------------------------------------------------------

log(C, Fmt) -> log(C, Fmt, []).
log(C, Fmt, Args) -> err("[~p] " ++ Fmt ++ "~n", [C | Args]).

%% Progress goes to stderr; stdout carries only the table.
err(Fmt, Args) -> io:format(standard_error, Fmt, Args).
