%%% @doc PKI mode (mutual TLS) of macula_dist between real, separate BEAM nodes.
%%%
%%% init_per_suite makes a small PKI with `openssl' (which must be installed): a CA,
%%% node certificates with IP SAN 127.0.0.1 (EC key in SEC1 form, RSA key in PKCS#1
%%% form, EC key in PKCS#8 form), a certificate from another CA, an expired one, one
%%% for another host, and files that are not what their option expects. Nodes are
%%% started with OTP 25 `peer' through macula_test_peer (this test node is not
%%% distributed) and given the files with `-macula_dist_opt'. Configuration mistakes are
%%% checked by booting `erl ... -eval "halt()."' directly: the node must stop at boot
%%% with a non-zero exit status and name the option (and file) in its output.
%%%
%%% UDP ports: a random free block in 30000..39799 for the run, 10 per case (macula_ct_hook).
-module(macula_pki_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([suite/0, all/0, init_per_suite/1, end_per_suite/1]).
-export([right_certs_connect/1, other_ca_refused/1, expired_refused/1,
         other_host_refused_with_verify_name/1, other_host_accepted_without_verify_name/1,
         wrong_cookie_refused/1, zero_config_and_pki_refused/1, allow_is_enforced/1,
         boot_missing_file/1, boot_key_mismatch/1, boot_unknown_option/1,
         boot_only_certfile/1, boot_no_certificate_in_file/1, boot_bad_verify_name/1,
         boot_verify_name_without_pki/1, boot_optfile/1]).

-define(P, macula_test_peer).
-define(BOOT_TIMEOUT, 30000).

suite() ->
    [{timetrap, {seconds, 90}},
     {ct_hooks, [{macula_ct_hook, #{ports_per_case => 10, port_range => {30000, 39799}}}]}].

all() ->
    [right_certs_connect, other_ca_refused, expired_refused,
     other_host_refused_with_verify_name, other_host_accepted_without_verify_name,
     wrong_cookie_refused, zero_config_and_pki_refused, allow_is_enforced,
     boot_missing_file, boot_key_mismatch, boot_unknown_option, boot_only_certfile,
     boot_no_certificate_in_file, boot_bad_verify_name, boot_verify_name_without_pki,
     boot_optfile].

init_per_suite(Config) ->
    case os:find_executable("openssl") of
        false -> ct:fail("openssl is not installed: this suite needs it to make certificates");
        _ -> ok
    end,
    Dir = filename:join(?config(priv_dir, Config), "pki"),
    ok = filelib:ensure_dir(filename:join(Dir, "x")),
    make_pki(Dir),
    ct:pal("PKI files: ~ts", [Dir]),
    [{pki, Dir} | Config].

end_per_suite(_Config) ->
    ok.

%%% ------------------------------------------------------------------------------------
%%% Connections
%%% ------------------------------------------------------------------------------------

%% Certificates from the CA, with keys in all three PEM forms, and verify_name on:
%% every pair connects, both ways, and the connection reports TLS 1.3.
right_certs_connect(Config) ->
    Base = ?config(base_port, Config),
    A = start(Base + 1, pki(Config, "a", ["verify_name", "true"])),
    B = start(Base + 2, pki(Config, "b", ["verify_name", "true"])),
    C = start(Base + 3, pki(Config, "c", [])),
    pong = ping(A, B),
    pong = ping(C, A),
    pong = ping(B, C),
    ?assertEqual(lists:sort([node_of(B), node_of(C)]), lists:sort(?P:call(A, erlang, nodes, []))),
    ?assertEqual(node_of(A), ?P:call(B, erpc, call, [node_of(A), erlang, node, []])),
    {ok, Info} = ?P:call(A, macula_dist, connection_info, [node_of(B)]),
    ?assertEqual(<<"TLSv1.3">>, maps:get(tls_version, Info)),
    %% Each side sees the subject of the certificate the other presented.
    ?assertEqual(<<"CN=b">>, maps:get(peer_subject, Info)),
    {ok, InfoOnB} = ?P:call(B, macula_dist, info, [node_of(A)]),
    ?assertEqual(<<"CN=a">>, maps:get(peer_subject, InfoOnB)),
    ok.

%% A certificate from another CA is refused whichever side presents it.
other_ca_refused(Config) ->
    refused_both_ways(Config, [], fun(Port) -> start(Port, pki(Config, "foreign", [])) end).

%% An expired certificate is refused whichever side presents it.
expired_refused(Config) ->
    refused_both_ways(Config, [], fun(Port) -> start(Port, pki(Config, "expired", [])) end).

%% A certificate from the CA, but for another host: with verify_name on A, A refuses it
%% as acceptor (checked against the name in the peer's auth message) and as initiator
%% (checked against the node A connects to).
other_host_refused_with_verify_name(Config) ->
    A = refused_both_ways(Config, ["verify_name", "true"],
                          fun(Port) -> start(Port, pki(Config, "otherhost", [])) end),
    %% A third node with a right certificate still gets in.
    B = start(?config(base_port, Config) + 3, pki(Config, "b", [])),
    pong = ping(B, A).

%% The same certificate is fine when names are not checked: the chain is valid.
other_host_accepted_without_verify_name(Config) ->
    Base = ?config(base_port, Config),
    A = start(Base + 1, pki(Config, "a", ["verify_name", "false"])),
    Other = start(Base + 2, pki(Config, "otherhost", [])),
    pong = ping(Other, A),
    ok = disconnect(A, Other),
    pong = ping(A, Other).

%% Valid certificates do not replace the cookie: a wrong one is still refused.
wrong_cookie_refused(Config) ->
    refused_both_ways(Config, [], fun(Port) ->
                                          ?P:start(Port, pki(Config, "b", []), #{cookie => "not_the_cookie"})
                                  end).

%% A PKI node and a zero-configuration node do not connect.
zero_config_and_pki_refused(Config) ->
    refused_both_ways(Config, [], fun(Port) -> start(Port, []) end).

%% net_kernel:allow/1 is enforced by dist_util on the accepting side.
allow_is_enforced(Config) ->
    Base = ?config(base_port, Config),
    A = start(Base + 1, pki(Config, "a", [])),
    B = start(Base + 2, pki(Config, "b", [])),
    C = start(Base + 3, pki(Config, "c", [])),
    ok = ?P:call(A, net_kernel, allow, [[node_of(C)]]),
    pang = ping(B, A),
    ?assertEqual([], ?P:call(A, erlang, nodes, [])),
    pong = ping(C, A),
    ?assertEqual([node_of(C)], ?P:call(A, erlang, nodes, [])).

%%% ------------------------------------------------------------------------------------
%%% Configuration mistakes stop the node at boot
%%% ------------------------------------------------------------------------------------

boot_missing_file(Config) ->
    Missing = filename:join(?config(pki, Config), "no_such_file.pem"),
    Out = boot_fails(Config, ["certfile", Missing, "keyfile", file(Config, "a.key"),
                              "cacertfile", file(Config, "ca.pem")]),
    expect(Out, ["certfile", Missing, "no such file"]).

boot_key_mismatch(Config) ->
    Cert = file(Config, "a.pem"),
    Key = file(Config, "b.key"),
    Out = boot_fails(Config, ["certfile", Cert, "keyfile", Key,
                              "cacertfile", file(Config, "ca.pem")]),
    expect(Out, ["keyfile", Key, "does not match", "certfile", Cert]).

boot_unknown_option(Config) ->
    Out = boot_fails(Config, ["certfiel", file(Config, "a.pem")]),
    expect(Out, ["certfiel", "unknown_option"]).

boot_only_certfile(Config) ->
    Out = boot_fails(Config, ["certfile", file(Config, "a.pem")]),
    expect(Out, ["keyfile", "missing_for_pki_mode", "certfile"]).

%% The file is readable, but the NIF finds no certificate in it (a key) / no CA.
boot_no_certificate_in_file(Config) ->
    Key = file(Config, "a.key"),
    Out = boot_fails(Config, ["certfile", Key, "keyfile", Key,
                              "cacertfile", file(Config, "ca.pem")]),
    expect(Out, ["certfile", Key, "no certificate"]),
    Empty = file(Config, "empty.pem"),
    Out2 = boot_fails(Config, ["certfile", file(Config, "a.pem"), "keyfile", Key,
                               "cacertfile", Empty]),
    expect(Out2, ["cacertfile", Empty, "no certificate"]),
    Garbage = file(Config, "garbage.pem"),
    Out3 = boot_fails(Config, ["certfile", file(Config, "a.pem"), "keyfile", Garbage,
                               "cacertfile", file(Config, "ca.pem")]),
    expect(Out3, ["keyfile", Garbage]).

boot_bad_verify_name(Config) ->
    Out = boot_fails(Config, pki(Config, "a", ["verify_name", "yes"])),
    expect(Out, ["verify_name", "not_a_boolean"]).

boot_verify_name_without_pki(Config) ->
    Out = boot_fails(Config, ["-macula_dist_opt", "verify_name", "true"]),
    expect(Out, ["verify_name", "needs_pki_mode"]).

%% The same options from -macula_dist_optfile: a good file boots, a bad one does not.
boot_optfile(Config) ->
    Dir = ?config(pki, Config),
    Good = filename:join(Dir, "good.config"),
    ok = file:write_file(Good, io_lib:format("{certfile, ~tp}.~n{keyfile, ~tp}.~n{cacertfile, ~tp}.~n"
                                             "{verify_name, true}.~n",
                                             [file(Config, "a.pem"), file(Config, "a.key"),
                                              file(Config, "ca.pem")])),
    Base = ?config(base_port, Config),
    A = start(Base + 1, ["-macula_dist_optfile", Good]),
    B = start(Base + 2, pki(Config, "b", [])),
    pong = ping(B, A),
    Bad = filename:join(Dir, "bad.config"),
    ok = file:write_file(Bad, io_lib:format("{certfile, ~tp}.~n", [file(Config, "a.pem")])),
    Out = boot_fails(Config, ["-macula_dist_optfile", Bad]),
    expect(Out, ["keyfile", "missing_for_pki_mode"]).

%%% ------------------------------------------------------------------------------------
%%% Helpers
%%% ------------------------------------------------------------------------------------

file(Config, Name) ->
    filename:join(?config(pki, Config), Name).

%% Node arguments giving certificate `Name' (Name.pem, Name.key), the first CA, and
%% more option pairs.
pki(Config, Name, MoreOptions) ->
    ["-macula_dist_opt",
     "certfile", file(Config, Name ++ ".pem"),
     "keyfile", file(Config, Name ++ ".key"),
     "cacertfile", file(Config, "ca.pem") | MoreOptions].

start(Port, Args) ->
    ?P:start(Port, Args).

node_of(#{node := Node}) -> Node.

ping(From, To) ->
    ?P:call(From, net_adm, ping, [node_of(To)]).

disconnect(From, To) ->
    true = ?P:call(From, erlang, disconnect_node, [node_of(To)]),
    ?P:wait_until(fun() -> not lists:member(node_of(To), ?P:call(From, erlang, nodes, []))
                           andalso not lists:member(node_of(From), ?P:call(To, erlang, nodes, []))
                  end, 5000).

%% A node on the case's first port with the CA's certificate "a" (and options
%% `AOpts'), and the one `StartOther(Port)' starts on the second: neither can connect
%% to the other. Returns the first.
refused_both_ways(Config, AOpts, StartOther) ->
    Base = ?config(base_port, Config),
    A = start(Base + 1, pki(Config, "a", AOpts)),
    Other = StartOther(Base + 2),
    pang = ping(Other, A),
    pang = ping(A, Other),
    no_connections([A, Other]),
    A.

no_connections(Nodes) ->
    [?assertEqual([], ?P:call(N, erlang, nodes, [])) || N <- Nodes],
    ok.

%% Boots `erl' with `Args' (a list starting with "-macula_dist_opt" or
%% "-macula_dist_optfile", or just option pairs) and `-eval "halt()."': the boot must
%% fail. Returns the output.
boot_fails(Config, Args0) ->
    Args = case Args0 of
               ["-" ++ _ | _] -> Args0;
               _ -> ["-macula_dist_opt" | Args0]
           end,
    Port = ?config(base_port, Config) + 9,
    Erl = os:find_executable("erl"),
    Argv = ["-noshell", "-proto_dist", "macula", "-no_epmd", "-start_epmd", "false",
            "-name", integer_to_list(Port) ++ "@127.0.0.1", "-setcookie", "macula_test",
            "-pa", ?P:ebin_dir() | Args] ++ ["-eval", "halt()."],
    P = open_port({spawn_executable, Erl},
                  [{args, Argv}, {cd, ?config(priv_dir, Config)}, exit_status,
                   stderr_to_stdout, binary]),
    {Status, Out} = collect(P, <<>>),
    ct:pal("erl ~ts~nexit status ~p, output:~n~ts", [lists:join(" ", Argv), Status, Out]),
    case Status of
        0 -> ct:fail({node_booted_despite_bad_configuration, Args});
        _ -> Out
    end.

collect(Port, Acc) ->
    receive
        {Port, {data, Data}} -> collect(Port, <<Acc/binary, Data/binary>>);
        {Port, {exit_status, Status}} -> {Status, Acc}
    after ?BOOT_TIMEOUT ->
            catch port_close(Port),
            ct:fail({boot_did_not_finish, Acc})
    end.

%% The output mentions every one of `Texts'.
expect(Out, Texts) ->
    Missing = [T || T <- Texts, binary:match(Out, unicode:characters_to_binary(T)) =:= nomatch],
    case Missing of
        [] -> ok;
        _ -> ct:fail({output_does_not_mention, Missing, Out})
    end.

%%% ------------------------------------------------------------------------------------
%%% The PKI, made with openssl
%%% ------------------------------------------------------------------------------------

make_pki(Dir) ->
    Ext = fun(Name, San) ->
                  Path = filename:join(Dir, Name ++ ".ext"),
                  ok = file:write_file(Path, ["basicConstraints = CA:FALSE\n",
                                              "keyUsage = critical, digitalSignature\n",
                                              "extendedKeyUsage = serverAuth, clientAuth\n",
                                              "subjectAltName = ", San, "\n"]),
                  Path
          end,
    ok = make_ca(Dir, "ca"),
    ok = make_ca(Dir, "ca2"),
    %% Keys in the three PEM forms the carrier accepts.
    openssl(Dir, "ecparam -name prime256v1 -genkey -noout -out a.key"),         % SEC1
    openssl(Dir, "genrsa -traditional -out b.key 2048"),                           % PKCS#1
    openssl(Dir, "genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out c.key"), % PKCS#8
    [openssl(Dir, "ecparam -name prime256v1 -genkey -noout -out " ++ N ++ ".key")
     || N <- ["foreign", "expired", "otherhost"]],
    Sign = fun(Name, Ca, San) ->
                   openssl(Dir, "req -new -key " ++ Name ++ ".key -subj /CN=" ++ Name
                           ++ " -out " ++ Name ++ ".csr"),
                   openssl(Dir, "x509 -req -in " ++ Name ++ ".csr -CA " ++ Ca ++ ".pem -CAkey "
                           ++ Ca ++ ".key -CAcreateserial -days 30 -sha256 -extfile "
                           ++ Ext(Name, San) ++ " -out " ++ Name ++ ".pem")
           end,
    Sign("a", "ca", "IP:127.0.0.1"),
    Sign("b", "ca", "IP:127.0.0.1, DNS:localhost"),
    Sign("c", "ca", "IP:127.0.0.1"),
    Sign("foreign", "ca2", "IP:127.0.0.1"),
    Sign("otherhost", "ca", "IP:10.11.12.13, DNS:other.example.com"),
    %% Expired: `openssl ca' is the way to give explicit dates in OpenSSL 3.0.
    ok = file:write_file(filename:join(Dir, "ca.cnf"),
                         "[ ca ]\ndefault_ca = CA_default\n"
                         "[ CA_default ]\ndatabase = index.txt\nnew_certs_dir = .\n"
                         "serial = ca.serial\ndefault_md = sha256\npolicy = policy_any\n"
                         "[ policy_any ]\ncommonName = supplied\n"),
    ok = file:write_file(filename:join(Dir, "index.txt"), ""),
    ok = file:write_file(filename:join(Dir, "ca.serial"), "1000\n"),
    openssl(Dir, "req -new -key expired.key -subj /CN=expired -out expired.csr"),
    openssl(Dir, "ca -batch -config ca.cnf -cert ca.pem -keyfile ca.key -in expired.csr"
            " -out expired.pem -notext -startdate 20200101000000Z -enddate 20210101000000Z"
            " -extfile " ++ Ext("expired", "IP:127.0.0.1")),
    ok = file:write_file(filename:join(Dir, "empty.pem"), ""),
    ok = file:write_file(filename:join(Dir, "garbage.pem"), "this is not PEM\n"),
    [true = filelib:is_regular(filename:join(Dir, F))
     || F <- ["ca.pem", "ca2.pem", "a.pem", "b.pem", "c.pem", "foreign.pem", "expired.pem",
              "otherhost.pem"]],
    ok.

make_ca(Dir, Name) ->
    openssl(Dir, "ecparam -name prime256v1 -genkey -noout -out " ++ Name ++ ".key"),
    openssl(Dir, "req -x509 -new -key " ++ Name ++ ".key -sha256 -days 30"
            " -subj /CN=macula-test-" ++ Name ++
            " -addext basicConstraints=critical,CA:TRUE"
            " -addext keyUsage=critical,keyCertSign,cRLSign -out " ++ Name ++ ".pem"),
    ok.

%% Runs `openssl Args' in `Dir'; fails the suite with its output if it fails.
openssl(Dir, Args) ->
    Cmd = "cd '" ++ Dir ++ "' && openssl " ++ Args ++ " 2>&1; echo \"exit=$?\"",
    Out = os:cmd(Cmd),
    case string:find(Out, "exit=0") of
        nomatch -> ct:fail({openssl_failed, Args, Out});
        _ -> Out
    end.
