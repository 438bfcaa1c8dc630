"""emitterctl (PROTOCOL §6): exit statuses, --json documents, human tables, tail, top."""
from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from typing import Any, Dict, Iterator, List, Optional

import msgpack
import pytest

from daemon_fixture import clean_env, ctl_argv, run_ctl
from emitterd.cli import render
from waits import wait_for  # noqa: E402

UNKNOWN_KEY = "0123456789abcdef"
COMMANDS = ["ping", "start", "stop", "update", "list", "status", "publish", "tail", "parked", "top"]


def jdoc(res: Any) -> Any:
    """The one JSON document of a successful `--json` run."""
    rc, out, err = res
    assert rc == 0, "rc=%s\nstdout=%s\nstderr=%s" % (rc, out, err)
    try:
        return json.loads(out)
    except ValueError as e:
        raise AssertionError("stdout is not one JSON document (%s): %r" % (e, out)) from None


# ---- without a daemon --------------------------------------------------------

@pytest.mark.timeout(30)
def test_unreachable_absent_socket_exits_3(short_tmp: str) -> None:
    env = clean_env(short_tmp)
    for extra in ([], ["--json"]):
        rc, out, err = run_ctl(["--socket", os.path.join(short_tmp, "absent.sock")] + extra
                               + ["ping"], env=env, cwd=short_tmp)
        assert rc == 3, (rc, out, err)
        assert "absent.sock" in err and out == ""


@pytest.mark.timeout(30)
def test_unreachable_stale_socket_exits_3(short_tmp: str) -> None:
    stale = os.path.join(short_tmp, "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)
    s.close()
    rc, out, err = run_ctl(["--socket", stale, "--json", "list"], env=clean_env(short_tmp),
                           cwd=short_tmp)
    assert rc == 3, (rc, out, err)
    assert "unreachable" in err and "nobody listens on %s (stale socket file?" % stale in err
    regular = os.path.join(short_tmp, "regular")
    open(regular, "w").close()
    rc, out, err = run_ctl(["--socket", regular, "ping"], env=clean_env(short_tmp), cwd=short_tmp)
    assert rc == 3 and "%s is not a socket (is --socket right?)" % regular in err, (rc, err)


@pytest.mark.timeout(60)
def test_publish_file_errors_say_where_and_what_to_do(make_daemon: Any) -> None:
    d = make_daemon("--max-publish-events", "3")
    rc, _, err = d.ctl("publish", "--file", "-", "--batch-size", "1",
                       input='{"stream": "a", "type": "t"}\n{"stream": "", "type": "t"}\n')
    assert rc == 1 and "(line 2 of standard input, field stream)" in err, err
    path = os.path.join(d.root, "five.jsonl")
    with open(path, "w") as f:
        f.write('{"stream": "a", "type": "t"}\n' * 5)
    rc, _, err = d.ctl("publish", "--file", path)
    assert rc == 1 and "events must be a list of 1 to 3 events" in err, err
    assert "hint: the daemon takes fewer events per publish: give a smaller --batch-size" in err
    assert jdoc(d.ctl("--json", "publish", "--file", path, "--batch-size", "3")) == \
        {"published": 5, "first": 2, "last": 6}


@pytest.mark.timeout(30)
def test_default_socket_from_environment(short_tmp: str) -> None:
    env = clean_env(short_tmp, {"EMITTERD_SOCKET": os.path.join(short_tmp, "env.sock")})
    rc, _, err = run_ctl(["ping"], env=env, cwd=short_tmp)
    assert rc == 3 and "env.sock" in err, err
    env = clean_env(short_tmp)
    rc, _, err = run_ctl(["ping"], env=env, cwd=short_tmp)
    assert rc == 3 and os.path.join(short_tmp, "run", "emitterd", "emitterd.sock") in err, err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args", [
    ["frobnicate"],
    ["status"],
    ["start", "x"],
    ["--no-such-flag", "ping"],
    ["start", "x", "--type", "stream", "--selector", "s", "--pool-size", "many"],
    ["start", "x", "--type", "nonsense", "--selector", "s"],
    ["start", "x", "--type", "event_payload", "--selector", "{not json"],
    ["start", "x", "--type", "tags", "--selector", "[\"a\","],
    ["start", "x", "--type", "stream", "--selector", "s", "--option", "batch_size"],
    ["start", "x", "--type", "stream", "--selector", "s", "--option", "=5"],
    ["start", "x", "--type", "stream", "--selector", "s", "--start-from", "yesterday"],
    ["start", "x", "--type", "stream", "--selector", "s", "--subscriber", "/no/scheme.sock"],
    ["update", UNKNOWN_KEY],
    ["update", UNKNOWN_KEY, "--checkpoint", "x"],
    ["publish", "--stream", "s"],
    ["publish", "--stream", "s", "--type", "t", "--data", "{oops"],
    ["publish", "--stream", "s", "--type", "t", "--metadata", "nope"],
    ["publish", "--file", "/nonexistent/file.jsonl"],
    ["publish", "--file", "-", "--stream", "s"],
    ["tail"],
    ["tail", UNKNOWN_KEY, "--type", "stream", "--selector", "s"],
    ["tail", "--type", "stream"],
    ["parked", UNKNOWN_KEY, "--replay", "--purge"],
    ["top", "--interval", "0"],
    ["top", "--interval", "nan"],
    ["stop"],
    ["stop", UNKNOWN_KEY, "--drain-timeout", "inf"],
    ["--timeout", "inf", "ping"],
    ["--timeout", "nan", "ping"],
    ["--socket", "", "ping"],
    ["start", "x", "--type", "stream", "--selector", "a", "--start-from", "+7"],
    ["start", "x", "--type", "stream", "--selector", "a", "--start-from", "1_000"],
    ["publish", "--stream", "a", "--type", "t", "--data", "NaN"],
    ["publish", "--stream", "a", "--type", "t", "--data", '{"x": 1e400}'],   # not infinity
    ["publish", "--stream", "a", "--type", "t", "--data", "[" * 5000 + "]" * 5000],
])
def test_usage_errors_exit_2_before_connecting(short_tmp: str, args: List[str]) -> None:
    """Usage errors are found before the daemon is contacted (none runs here)."""
    rc, out, err = run_ctl(["--socket", os.path.join(short_tmp, "absent.sock")] + args,
                           env=clean_env(short_tmp), cwd=short_tmp)
    assert rc == 2, (rc, out, err)
    assert out == ""
    assert "Usage" in err or "Error" in err


@pytest.mark.timeout(60)
def test_an_unanswered_publish_says_it_may_have_been_stored(daemon: Any) -> None:
    """A publish that was sent but got no answer (here: the daemon SIGSTOPped past
    --timeout) may still be stored; emitterctl says so, and what a retry would do."""
    path = os.path.join(daemon.root, "ids.jsonl")
    with open(path, "w") as f:
        for i in range(10):
            f.write(json.dumps({"stream": "s", "type": "t", "id": "ev-%d" % i}) + "\n")
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        rc, out, err = daemon.ctl("--timeout", "1", "publish", "--stream", "s", "--type", "t")
        assert rc == 3 and out == "", (rc, out, err)
        assert "no answer to 'publish'" in err, err
        assert "the event may or may not have been stored: publishing it again may store " \
               "it twice" in err, err
        rc, out, err = daemon.ctl("--timeout", "1", "publish", "--stream", "s", "--type", "t",
                                  "--id", "one")
        assert rc == 3 and "it has an id, so publishing it again stores it once" in err, err
        rc, out, err = daemon.ctl("--timeout", "1", "publish", "--file", path, "--batch-size", "4")
        assert rc == 3, (rc, out, err)
        assert "0 events published before this batch" in err, err
        assert "this batch (lines 1..4 of %s) may or may not have been stored: its events " \
               "all have ids" % path in err, err
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    # they were stored once the daemon ran again: the warning was due; lines 5.. never left
    c = daemon.client()
    wait_for(lambda: c.ping()["head"] == 6, 15, "the three unanswered publishes stored")
    r = jdoc(daemon.ctl("--json", "publish", "--file", path, "--batch-size", "4"))
    assert r == {"published": 10, "first": 3, "last": 12}
    assert c.ping()["head"] == 12


@pytest.mark.timeout(60)
def test_ctrl_c_is_130_not_a_daemon_error(daemon: Any) -> None:
    """§6 keeps 1 for an error the daemon answered: Ctrl-C while a command waits for its
    answer (here: the daemon stopped) exits 130, and a publish says it may be stored."""
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        for args, says in ((["ping"], "error: interrupted (a request already sent may still take effect"),
                           (["publish", "--stream", "s", "--type", "t"],
                            "the event may or may not have been stored")):
            with daemon.ctl_running(*args) as p:
                time.sleep(0.5)          # connected, request sent, waiting
                p.send_signal(signal.SIGINT)
                out, err = p.communicate(timeout=10)
            assert p.returncode == 130 and out == "" and says in err, (args, p.returncode, err)
            assert "Aborted" not in err and "Traceback" not in err, err
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)


@pytest.mark.timeout(60)
def test_an_output_that_cannot_be_written_is_an_error_not_a_traceback(daemon: Any) -> None:
    for args in (["--json", "ping"], ["--json", "publish", "--stream", "s", "--type", "t"]):
        with open("/dev/full", "w") as full:
            r = subprocess.run(ctl_argv() + ["--socket", daemon.socket] + args, stdout=full,
                               stderr=subprocess.PIPE, text=True, env=daemon.env,
                               cwd=daemon.root, timeout=30, stdin=subprocess.DEVNULL)
        assert r.returncode == 74, (args, r.returncode, r.stderr)
        assert r.stderr == "error: cannot write the output: No space left on device\n", r.stderr
    assert daemon.client().ping()["head"] == 1       # the publish was done all the same


@pytest.mark.timeout(60)
def test_an_argument_that_is_not_utf8_is_named(daemon: Any) -> None:
    for args, says in (([b"--stream", b"order-\xff"], "the value of --stream"),
                       ([b"--stream=order-\xff"], "the value of --stream")):
        r = subprocess.run(ctl_argv() + ["--socket", daemon.socket, "publish", "--type", "t"]
                           + args, capture_output=True, env=daemon.env, cwd=daemon.root,
                           timeout=30, stdin=subprocess.DEVNULL)
        err = r.stderr.decode()
        assert r.returncode == 2 and err == "error: %s is not UTF-8 text: order-\\xff\n" % says, err
    assert daemon.client().ping()["head"] == 0


@pytest.mark.timeout(60)
def test_bad_jsonl_file_is_a_usage_error(short_tmp: str) -> None:
    path = os.path.join(short_tmp, "bad.jsonl")
    with open(path, "w") as f:
        f.write('{"stream": "s", "type": "t"}\n\n[1, 2]\n')
    rc, out, err = run_ctl(["--socket", os.path.join(short_tmp, "absent.sock"), "publish",
                            "--file", path], env=clean_env(short_tmp), cwd=short_tmp)
    assert rc == 2 and "line 3" in err, (rc, out, err)


@pytest.mark.timeout(60)
def test_help_on_every_command(short_tmp: str) -> None:
    rc, out, _ = run_ctl(["--help"], env=clean_env(short_tmp))
    assert rc == 0 and "Examples" in out and "Exit status" in out
    for cmd in COMMANDS:
        assert cmd in out
        rc, out2, err = run_ctl([cmd, "--help"], env=clean_env(short_tmp))
        assert rc == 0, (cmd, err)
        assert out2.startswith("Usage: emitterctl %s" % cmd), out2
        body = out2.split("\n\n", 2)[1].strip()
        assert len(body) > 30, "the help of %s explains it: %r" % (cmd, body)


@pytest.mark.timeout(10)
def test_json_rendering_never_fails() -> None:
    value = {"b": b"\x00\xffhi", "nested": [b"", {"x": float("nan")}], 1: "int key",
             b"k": 2, None: 3, "inf": float("-inf"),
             "ts": msgpack.Timestamp(1, 500000000), "ext": msgpack.ExtType(5, b"\x01")}
    doc = json.loads(render.dumps(value))
    assert doc["b"] == "AP9oaQ==" and doc["nested"][0] == "" and doc["nested"][1]["x"] == "NaN"
    assert doc["1"] == "int key" and doc["aw=="] == 2 and doc["null"] == 3
    assert doc["inf"] == "-Infinity" and math.isclose(doc["ts"], 1.5)
    assert doc["ext"] == {"ext": 5, "data": "AQ=="}
    assert "\n" not in render.compact(value)


@pytest.mark.timeout(10)
def test_stdin_lines_are_whole_however_they_arrive() -> None:
    """publish --file -: a line is joined from the pieces it came in (a long line arrives
    in many reads; each read is scanned once, so a 40 MB line costs 0.07 s, not 13 s)."""
    from emitterd.cli.ctl import _stream_lines
    r, w = os.pipe()
    pieces = [b"a", b"bc\nde", b"f\n", b"\n", b"x" * 200_000, b"y\nz"]

    def feed() -> None:
        for p in pieces:
            os.write(w, p)
            time.sleep(0.01)        # one read each
        os.close(w)
    t = threading.Thread(target=feed)
    t.start()
    try:
        got = [(n, line) for n, line, _ in _stream_lines(r)]
    finally:
        t.join(10)
        os.close(r)
    assert got == [(1, b"abc"), (2, b"def"), (3, b""), (4, b"x" * 200_000 + b"y"), (5, b"z")]


def test_human_helpers() -> None:
    assert render.human_bytes(1536) == "1.5K"
    assert render.human_bytes(70 * 1024 * 1024) == "70.0M"
    assert render.human_bytes(None) == "-"
    assert render.human_duration(3725) == "1h02m05s"
    t = render.table(["A", "NUM"], [["x", 1], ["long", 22]], right=[1])
    assert t.splitlines() == ["A     NUM", "x       1", "long   22"]


# ---- against the real daemon -------------------------------------------------

def start_json(daemon: Any, name: str, *extra: str) -> Dict[str, Any]:
    return jdoc(daemon.ctl("--json", "start", name, "--type", "stream", "--selector", "$all",
                           *extra))


def wait_status(daemon: Any, key: str, pred: Any, what: str, timeout: float = 15) -> Dict[str, Any]:
    c = daemon.client()
    return wait_for(lambda: (lambda s: s if pred(s) else None)(c.status(key)), timeout, what)


@pytest.mark.timeout(60)
def test_ping_json_and_human(daemon: Any) -> None:
    d = jdoc(daemon.ctl("--json", "ping"))
    assert d["pid"] == daemon.proc.pid
    for k in ("version", "store_id", "uptime", "head"):
        assert k in d
    rc, out, err = daemon.ctl("ping")
    assert rc == 0, err
    assert str(daemon.proc.pid) in out and "head" in out and daemon.socket in out


@pytest.mark.timeout(60)
def test_daemon_errors_exit_1_with_code_on_stderr(daemon: Any) -> None:
    for args in (["status", UNKNOWN_KEY], ["stop", UNKNOWN_KEY], ["status", "not-a-key"],
                 ["update", UNKNOWN_KEY, "--pool-size", "2"], ["parked", UNKNOWN_KEY],
                 ["tail", UNKNOWN_KEY]):
        rc, out, err = daemon.ctl("--json", *args)
        assert rc == 1, (args, rc, out, err)
        assert "error: not_found:" in err, (args, err)
        assert out == ""
    rc, _, err = daemon.ctl("start", "x", "--type", "stream", "--selector", "s",
                            "--pool-size", "0")
    assert rc == 1 and "invalid" in err and "subscription.pool_size" in err, err
    start_json(daemon, "twice")
    rc, _, err = daemon.ctl("start", "twice", "--type", "stream", "--selector", "$all")
    assert rc == 1 and "already_started" in err, err
    assert [s["subscription"]["name"] for s in daemon.client().list()["subscriptions"]] == ["twice"]


@pytest.mark.timeout(90)
def test_json_documents_of_the_pool_commands(daemon: Any) -> None:
    # strategy=round_robin is not JSON: it is sent as a string
    r = start_json(daemon, "docs", "--pool-size", "2", "--start-from", "origin",
                   "--option", "strategy=round_robin", "--option", "batch_size=5",
                   "--option", "retry_backoff=[0.5, 2]")
    key = r["key"]
    assert len(key) == 16
    sub = r["subscription"]
    assert sub["pool_size"] == 2 and sub["start_from"] == "origin"
    assert sub["options"]["strategy"] == "round_robin"
    assert sub["options"]["retry_backoff"] == [0.5, 2]
    st = jdoc(daemon.ctl("--json", "status", key))
    assert st["key"] == key
    assert st["subscription"]["options"]["batch_size"] == 5
    assert isinstance(st["subscription"]["options"]["batch_size"], int)
    lst = jdoc(daemon.ctl("--json", "list"))
    assert [p["key"] for p in lst["subscriptions"]] == [key]
    up = jdoc(daemon.ctl("--json", "update", key, "--pool-size", "1", "--option", "max_retries=3"))
    assert up["subscription"]["pool_size"] == 1 and up["subscription"]["options"]["max_retries"] == 3
    assert up["subscription"]["options"]["batch_size"] == 5, "a partial options update"
    stopped = jdoc(daemon.ctl("--json", "stop", key, "--drain-timeout", "1"))
    assert stopped["state"] == "stopped" and stopped["workers"] == []
    again = jdoc(daemon.ctl("--json", "stop", key))
    assert again["state"] == "stopped"
    parked = jdoc(daemon.ctl("--json", "parked", key))
    assert parked == {"events": []}
    assert jdoc(daemon.ctl("--json", "parked", key, "--purge")) == {"count": 0}
    jdoc(daemon.ctl("--json", "stop", key, "--delete"))
    rc, _, err = daemon.ctl("status", key)
    assert rc == 1 and "not_found" in err


@pytest.mark.timeout(60)
def test_update_subscriber_none_and_checkpoint(daemon: Any, short_tmp: str) -> None:
    r = start_json(daemon, "subs", "--subscriber", "unix:" + os.path.join(short_tmp, "x.sock"))
    key = r["key"]
    assert r["subscription"]["subscriber"].startswith("unix:")
    up = jdoc(daemon.ctl("--json", "update", key, "--subscriber", "none"))
    assert up["subscription"]["subscriber"] is None
    jdoc(daemon.ctl("--json", "publish", "--stream", "s", "--type", "t"))
    up = jdoc(daemon.ctl("--json", "update", key, "--checkpoint", "1"))
    assert up["checkpoint"] == 1


@pytest.mark.timeout(60)
def test_selector_parsing(daemon: Any) -> None:
    r = jdoc(daemon.ctl("--json", "start", "pat", "--type", "event_pattern",
                        "--selector", '{"stream": "order-*", "type": "paid"}'))
    assert r["subscription"]["selector"] == {"stream": "order-*", "type": "paid"}
    r = jdoc(daemon.ctl("--json", "start", "tags", "--type", "tags", "--selector", '["a", "b"]'))
    assert r["subscription"]["selector"] in (["a", "b"], {"any": ["a", "b"]})
    r = jdoc(daemon.ctl("--json", "start", "plain", "--type", "event_pattern",
                        "--selector", "order-*", "--strategy", "random"))
    assert r["subscription"]["selector"] == "order-*"
    assert r["subscription"]["options"]["strategy"] == "random"
    # §6: JSON only when it *starts* with { or [: a leading space makes it a string
    for name, sub_type, value in (("sp1", "stream", " {x"), ("sp2", "event_type", ' ["a"]')):
        r = jdoc(daemon.ctl("--json", "start", name, "--type", sub_type, "--selector", value))
        assert r["subscription"]["selector"] == value, r
    rc, out, err = daemon.ctl("start", "bad", "--type", "event_payload", "--selector", "{x")
    assert rc == 2, (rc, out, err)
    assert "not valid JSON" in err and "map form" not in err, err
    rc, _, err = daemon.ctl("start", "bad", "--type", "event_payload", "--selector", '{"a": {"$zz": 1}}')
    assert rc == 1 and "invalid" in err and "subscription.selector" in err, err


@pytest.mark.timeout(90)
def test_a_pattern_that_starts_with_a_bracket_is_pointed_to_the_map_form(daemon: Any) -> None:
    """PROTOCOL §6 reads a --selector that starts with [ as JSON, so "[eu]-*" (a glob whose
    [ is a literal character) is a usage error; its message names the map form, which works."""
    rc, out, err = daemon.ctl("start", "br", "--type", "event_pattern", "--selector", "[eu]-*")
    assert rc == 2 and out == "", (rc, out, err)
    hint = re.search(r"--selector '(\{.*\})'", err)
    assert hint, err
    selector = hint.group(1)
    assert json.loads(selector) == {"stream": "[eu]-*"}
    # a stream or event_type selector has no such form: the message does not offer it
    for sub_type in ("stream", "event_type"):
        rc, out, err = daemon.ctl("start", "br", "--type", sub_type, "--selector", "[eu]-*")
        assert rc == 2 and "map form" not in err, err
        assert "%s %s selector that starts with [ cannot be given on the command line" \
            % ("an" if sub_type == "event_type" else "a", sub_type) in err, err
    c = daemon.client()
    assert c.list()["subscriptions"] == []          # the usage error created nothing
    proc = daemon.ctl_popen("--json", "tail", "--type", "event_pattern", "--selector", selector)
    try:
        reader = LineReader(proc)
        wait_for(lambda: any(sum(w["consumers"] for w in p["workers"]) == 1
                             for p in c.list()["subscriptions"]), 15, "the tail consumer")
        positions = c.publish([{"stream": "eu-1", "type": "t"}, {"stream": "[eu]-1", "type": "t"},
                               {"stream": "e-1", "type": "t"}])["positions"]
        (line,) = reader.lines(1, 15)
        assert json.loads(line)["position"] == positions[1]
        assert json.loads(line)["stream"] == "[eu]-1"
    finally:
        rc = _finish(proc)
    assert rc == 0


@pytest.mark.timeout(60)
def test_human_tables(daemon: Any) -> None:
    key = start_json(daemon, "human", "--pool-size", "2")["key"]
    wait_status(daemon, key, lambda s: sum(w["state"] == "ready" for w in s["workers"]) == 2,
                "2 ready workers")
    rc, out, err = daemon.ctl("list")
    assert rc == 0, err
    header = out.splitlines()[0].split()
    for col in ("KEY", "NAME", "TYPE", "SELECTOR", "STATE", "WORKERS", "CHECKPOINT/HEAD",
                "IN_FLIGHT", "DELIVERED", "RESTARTS"):
        assert col in header, out
    assert key in out and "human" in out and "running" in out and "2/2" in out
    rc, out, err = daemon.ctl("status", key)
    assert rc == 0, err
    assert key in out and "checkpoint" in out
    lines = out.splitlines()
    wh = [i for i, line in enumerate(lines) if line.split()[:3] == ["#", "PID", "STATE"]]
    assert wh, out
    for col in ("RSS", "CPU%", "IN_FLIGHT", "DELIVERED", "RESTARTS", "CONSUMERS"):
        assert col in lines[wh[0]], out
    rows = lines[wh[0] + 1:]
    assert len(rows) == 2 and all("ready" in r for r in rows), out
    assert any(u in rows[0] for u in ("K", "M", "G")), "rss is human readable: " + rows[0]
    rc, out, err = daemon.ctl("stop", key)
    assert rc == 0 and "stopped" in out, err
    # another client's text cannot forge a line of status (a second "state:")
    forged = daemon.client().start({"name": "x\x1b[31m", "type": "stream",
                                    "selector": "s\nstate:       failed"})["key"]
    rc, out, err = daemon.ctl("status", forged)
    assert rc == 0 and [ln for ln in out.splitlines() if ln.startswith("state:")] == \
        ["state:       running"], out
    assert "selector:    s\\nstate:       failed" in out and "x\\x1b[31m" in out, out


@pytest.mark.timeout(60)
def test_status_says_when_workers_are_not_connected_to_the_subscriber(daemon: Any,
                                                                        short_tmp: str) -> None:
    """A worker that cannot reach its unix: subscriber retries and holds its events; status
    says so on the subscriber line (the log says why), and stops saying it once connected."""
    from subscriber_helper import Subscriber
    path = os.path.join(short_tmp, "later.sock")
    key = start_json(daemon, "later", "--pool-size", "2", "--subscriber", "unix:" + path)["key"]
    wait_status(daemon, key, lambda s: sum(w["state"] == "ready" for w in s["workers"]) == 2,
                "2 ready workers")
    rc, out, err = daemon.ctl("status", key)
    assert rc == 0, err
    line = [ln for ln in out.splitlines() if ln.startswith("subscriber:")][0]
    assert "unix:%s (NOT CONNECTED from 2 of 2 ready workers" % path in line, out
    sub = Subscriber(path)
    try:
        wait_status(daemon, key, lambda s: all(w["consumers"] == 1 for w in s["workers"]), "both "
                    "workers connected (they retry with a backoff of up to 5 s)", timeout=20)
        rc, out, err = daemon.ctl("status", key)
        line = [ln for ln in out.splitlines() if ln.startswith("subscriber:")][0]
        assert line.split() == ["subscriber:", "unix:" + path], out
    finally:
        sub.close()
    key2 = start_json(daemon, "nobody-attached")["key"]
    wait_status(daemon, key2, lambda s: any(w["state"] == "ready" for w in s["workers"]),
                "a ready worker")
    out = daemon.ctl("status", key2)[1]
    assert "- (attached consumers; none attached: events wait for one)" in out, out


@pytest.mark.timeout(90)
def test_publish_single_and_file(daemon: Any) -> None:
    r = jdoc(daemon.ctl("--json", "publish", "--stream", "user-1", "--type", "created",
                        "--data", '{"id": 1}', "--metadata", '{"by": "me"}', "--tag", "a",
                        "--tag", "b", "--id", "evt-1"))
    assert r == {"positions": [1], "versions": [0]}
    again = jdoc(daemon.ctl("--json", "publish", "--stream", "user-1", "--type", "created",
                            "--id", "evt-1"))
    assert again["positions"] == [1], "idempotent by id"
    rc, out, err = daemon.ctl("publish", "--stream", "user-1", "--type", "x")
    assert rc == 0 and "position 2" in out, (out, err)
    rc, _, err = daemon.ctl("publish", "--stream", "user-1", "--type", "x",
                            "--expected-version", "0")
    assert rc == 1 and "conflict" in err, err

    path = os.path.join(daemon.root, "events.jsonl")
    n = 2500
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"stream": "bulk-%d" % (i % 7), "type": "bulk", "data": {"i": i}})
                    + "\n")
            if i % 1000 == 10:
                f.write("\n")   # blank lines are skipped
    d = jdoc(daemon.ctl("--json", "publish", "--file", path))
    assert d == {"published": n, "first": 3, "last": n + 2}
    assert daemon.client().ping()["head"] == n + 2
    rc, out, err = daemon.ctl("publish", "--file", path)
    assert rc == 0 and "published %d events" % n in out, (out, err)
    assert "publishing" not in out, "no progress bar when stdout is not a terminal"
    # from stdin
    d = jdoc(daemon.ctl("--json", "publish", "--file", "-",
                        input='{"stream": "in", "type": "t"}\n{"stream": "in", "type": "t"}\n'))
    assert d == {"published": 2, "first": 2 * n + 3, "last": 2 * n + 4}
    empty = os.path.join(daemon.root, "empty.jsonl")
    open(empty, "w").close()
    assert jdoc(daemon.ctl("--json", "publish", "--file", empty)) == \
        {"published": 0, "first": None, "last": None}


@pytest.mark.timeout(60)
def test_publish_file_errors(daemon: Any) -> None:
    head = daemon.client().ping()["head"]
    bad_json = os.path.join(daemon.root, "bad.jsonl")
    with open(bad_json, "w") as f:
        f.write('{"stream": "s", "type": "t"}\n{"stream": \n')
    rc, out, err = daemon.ctl("--json", "publish", "--file", bad_json)
    assert rc == 2 and "line 2" in err, (rc, out, err)
    assert daemon.client().ping()["head"] == head, "nothing is published from a bad file"
    invalid = os.path.join(daemon.root, "invalid.jsonl")
    with open(invalid, "w") as f:
        f.write('{"stream": "s", "type": "t"}\n{"stream": "", "type": "t"}\n')
    rc, out, err = daemon.ctl("--json", "publish", "--file", invalid)
    assert rc == 1 and "invalid" in err and "line 2" in err, (rc, out, err)
    head = daemon.client().ping()["head"]
    not_utf8 = os.path.join(daemon.root, "latin1.jsonl")
    with open(not_utf8, "wb") as f:
        f.write(b'{"stream": "s", "type": "t"}\n{"stream": "caf\xe9", "type": "t"}\n')
    rc, out, err = daemon.ctl("publish", "--file", not_utf8)
    assert rc == 2 and "line 2: not UTF-8" in err, (rc, err)
    assert daemon.client().ping()["head"] == head
    bom = os.path.join(daemon.root, "bom.jsonl")
    with open(bom, "wb") as f:      # as some editors save "UTF-8"
        f.write(b'\xef\xbb\xbf{"stream": "s", "type": "t"}\n')
    assert jdoc(daemon.ctl("--json", "publish", "--file", bom))["published"] == 1


TICK = json.dumps({"stream": "gen", "type": "tick"}) + "\n"


@contextlib.contextmanager
def _publishing_two_lines_from_stdin(daemon: Any, c: Any, head: int) -> Iterator[Any]:
    """`emitterctl --json publish --file -` with two lines written to its open stdin and
    published (the head at `head` + 2); yields the process, which the block ends."""
    with daemon.ctl_running("--json", "publish", "--file", "-", stdin=subprocess.PIPE) as p:
        p.stdin.write(TICK * 2)
        p.stdin.flush()
        wait_for(lambda: c.ping()["head"] == head + 2, 10,
                 "the first 2 lines published while the pipe stays open")
        yield p


@pytest.mark.timeout(60)
def test_publish_from_a_pipe_publishes_each_line_as_it_comes(daemon: Any) -> None:
    """A generator behind a pipe (stdin, or a FIFO named by --file) may write a line a
    minute or never end: what has arrived is published when the input pauses, not held
    back until --batch-size events are there or the input ends (where a kill would lose
    them)."""
    c = daemon.client()
    head, line = c.ping()["head"], TICK
    with _publishing_two_lines_from_stdin(daemon, c, head) as p:
        assert p.poll() is None
        p.stdin.write(line)
        p.stdin.flush()
        wait_for(lambda: c.ping()["head"] == head + 3, 10, "the third line published")
        p.stdin.close()
        out = p.stdout.read()
        assert p.wait(10) == 0
        assert json.loads(out) == {"published": 3, "first": head + 1, "last": head + 3}
    fifo = os.path.join(daemon.root, "events.fifo")
    os.mkfifo(fifo)
    with daemon.ctl_running("--json", "publish", "--file", fifo) as p:
        with open(fifo, "w") as w:      # opens once emitterctl opens it for reading
            w.write(line * 2)
            w.flush()
            wait_for(lambda: c.ping()["head"] == head + 5, 10,
                     "a FIFO's lines published while it stays open")
        out = p.stdout.read()
        assert p.wait(10) == 0
        assert json.loads(out) == {"published": 2, "first": head + 4, "last": head + 5}


@pytest.mark.timeout(60)
def test_arguments_msgpack_cannot_carry_are_usage_errors(daemon: Any) -> None:
    """An integer past 64 bits or text that is not Unicode (argv bytes that are not UTF-8)
    cannot be sent: exit 2 with a message, nothing sent, no traceback."""
    head = daemon.client().ping()["head"]
    for args, says in ((["start", "x", "--type", "stream", "--selector", "a",
                         "--pool-size", "99999999999999999999999"], "cannot be encoded as msgpack"),
                       (["publish", "--stream", "a", "--type", "t", "--data",
                         "-99999999999999999999"], "cannot be encoded as msgpack"),
                       (["publish", "--stream", "\udcff\udcfe", "--type", "t"],
                        "the value of --stream is not UTF-8 text: \\xff\\xfe")):
        rc, out, err = daemon.ctl(*args)
        assert rc == 2 and out == "" and says in err, (args, rc, err)
        assert "Traceback" not in err
    assert daemon.client().ping()["head"] == head
    assert daemon.client().list()["subscriptions"] == []


@pytest.mark.timeout(90)
def test_publish_file_splits_a_batch_whose_frame_is_too_large(make_daemon: Any) -> None:
    """The daemon refuses a frame over max_frame_bytes whole (nothing stored) and closes the
    connection: emitterctl sends the batch again in halves; an event too large alone is an
    error naming its line, not an unreachable daemon that may have stored it."""
    d = make_daemon("--max-frame-bytes", "262144", "--max-event-bytes", "65536")
    path = os.path.join(d.root, "fat.jsonl")
    with open(path, "w") as f:
        for i in range(200):             # 200 x 4 KB: one batch of 800 KB, over 256 KiB
            f.write(json.dumps({"stream": "fat", "type": "t", "id": "fat-%d" % i,
                                "data": "y" * 4000}) + "\n")
    for source in ("file", "stdin"):
        rc, out, err = (d.ctl("--json", "publish", "--file", path) if source == "file" else
                        d.ctl("--json", "publish", "--file", "-", input=open(path).read()))
        assert rc == 0, (source, err)
        assert json.loads(out) == {"published": 200, "first": 1, "last": 200}, (source, out)
    assert d.client().ping()["head"] == 200, "the ids keep the second run from storing again"
    huge = os.path.join(d.root, "huge.jsonl")
    with open(huge, "w") as f:
        f.write(json.dumps({"stream": "fat", "type": "t", "data": "y" * 300_000}) + "\n")
    rc, out, err = d.ctl("publish", "--file", huge)
    assert rc == 1 and "frame_too_large" in err and "(line 1 of %s)" % huge in err, (rc, err)
    assert "may or may not" not in err
    assert d.client().ping()["head"] == 200
    # the client library says the same: a typed error, not a lost connection
    from emitterd.client import FrameTooLarge
    with pytest.raises(FrameTooLarge):
        d.client().publish([{"stream": "fat", "type": "t", "data": "y" * 60_000}] * 8)
    assert d.client().ping()["head"] == 200


@pytest.mark.timeout(60)
def test_publish_from_a_stream_ends_cleanly_on_sigint_and_a_file_says_what_was_left(
        daemon: Any) -> None:
    c = daemon.client()
    head, line = c.ping()["head"], TICK
    with _publishing_two_lines_from_stdin(daemon, c, head) as p:
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=10)
    assert p.returncode == 0, err
    assert json.loads(out) == {"published": 2, "first": head + 1, "last": head + 2}
    assert "Aborted" not in err and "Traceback" not in err
    # a file stopped part way: 130, the summary, and the last line published
    path = os.path.join(daemon.root, "many.jsonl")
    with open(path, "w") as f:
        f.write(line * 200_000)
    with daemon.ctl_running("--json", "publish", "--file", path, "--batch-size", "50") as p:
        wait_for(lambda: c.ping()["head"] > head + 1000, 30, "the file being published")
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=10)
    assert p.returncode == 130, (p.returncode, err)
    doc = json.loads(out)
    stored = c.ping()["head"] - head - 2
    assert doc["published"] == stored and 1000 <= stored < 200_000, (doc, stored)
    assert "after line %d were not sent" % stored in err, err


@pytest.mark.timeout(90)
def test_publish_file_stopped_while_checking_the_file_says_nothing_was_published(
        daemon: Any) -> None:
    """The first pass (every line checked before anything is sent) had no signal handler:
    SIGTERM then killed emitterctl silently (143)."""
    path = os.path.join(daemon.root, "million.jsonl")
    with open(path, "w") as f:
        f.write(TICK * 1_000_000)
    c = daemon.client()
    head = c.ping()["head"]
    with daemon.ctl_running("publish", "--file", path) as p:
        def reading() -> bool:
            fds = "/proc/%d/fd" % p.pid
            for fd in os.listdir(fds):
                try:
                    if os.readlink(os.path.join(fds, fd)) == path:
                        return True
                except OSError:      # closed meanwhile
                    pass
            return False
        wait_for(reading, 20, "the first pass reading the file")
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and out == "", (p.returncode, out, err)
    assert "stopped by a signal while checking %s: nothing was published" % path in err, err
    assert c.ping()["head"] == head


@pytest.mark.timeout(60)
def test_no_progress_bar_in_json_on_a_terminal(daemon: Any) -> None:
    """--json promises one JSON document on stdout, even when stdout is a terminal."""
    import pty
    path = os.path.join(daemon.root, "few.jsonl")
    with open(path, "w") as f:
        f.write((json.dumps({"stream": "s", "type": "t"}) + "\n") * 3)
    master, slave = pty.openpty()
    chunks = []
    try:
        with daemon.ctl_running("--json", "publish", "--file", path, stdout=slave) as p:
            os.close(slave)
            slave = -1
            while True:
                try:
                    data = os.read(master, 65536)
                except OSError:          # EIO: the other side closed
                    break
                if not data:
                    break
                chunks.append(data)
            assert p.wait(10) == 0
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    text = b"".join(chunks).decode().replace("\r\n", "\n")
    assert json.loads(text)["published"] == 3, text
    assert "publishing" not in text and "\x1b" not in text


@pytest.mark.timeout(60)
def test_parked_purge_and_replay_take_every_parked_event(daemon: Any) -> None:
    """The protocol's limit (default 100) is for a listing; `--purge` means all of them."""
    c = daemon.client()
    key = c.start({"name": "parker", "type": "stream", "selector": "$all"})["key"]
    wait_for(lambda: any(w["state"] == "ready" for w in c.status(key)["workers"]), 15,
             "a ready worker")
    c.publish([{"stream": "p", "type": "t"}] * 150)
    parked = 0
    with c.attach(key) as consumer:
        for batch in consumer.batches(timeout=10):
            consumer.nack([e["position"] for e in batch], action="park", reason="test")
            parked += len(batch)
            if parked >= 150:
                break
    wait_for(lambda: c.status(key)["parked"] == 150, 15, "150 parked events")
    rc, out, err = daemon.ctl("--json", "parked", key)
    assert rc == 0 and len(json.loads(out)["events"]) == 100, "a listing shows 100 by default"
    rc, out, err = daemon.ctl("parked", key)
    assert rc == 0 and "(100 of 150 parked events shown, the oldest; --limit N for more)" in out
    rc, out, err = daemon.ctl("--json", "parked", key, "--purge")
    assert rc == 0 and json.loads(out) == {"count": 150}, (out, err)
    assert c.status(key)["parked"] == 0
    # a stop whose drain times out says so (the log is not where a script author looks)
    c.publish([{"stream": "p", "type": "t"}])
    with c.attach(key) as consumer:
        assert len(next(consumer.batches(timeout=10))) == 1      # held, never acked
        rc, out, err = daemon.ctl("stop", key, "--drain-timeout", "0.3")
    assert rc == 0 and "1 event was not acked (the drain timed out, or no consumer was " \
        "connected to take them); they are delivered again when the pool starts" in out, (out, err)


@pytest.mark.timeout(60)
def test_parked_lists_as_many_large_events_as_fit_in_one_answer(make_daemon: Any) -> None:
    """`limit` is a most: parked events too large to list together within max_frame_bytes
    come back as many as fit (not `internal` for the whole answer), and emitterctl says so."""
    d = make_daemon("--max-frame-bytes", "200000", "--max-event-bytes", "100000")
    c = d.client()
    key = c.start({"name": "bigparker", "type": "stream", "selector": "$all"})["key"]
    wait_for(lambda: any(w["state"] == "ready" for w in c.status(key)["workers"]), 15,
             "a ready worker")
    ps = [c.publish([{"stream": "p", "type": "t", "data": "x" * 60000}])["positions"][0]
          for _ in range(5)]
    taken: List[int] = []
    with c.attach(key) as consumer:
        for batch in consumer.batches(timeout=10):
            consumer.nack([e["position"] for e in batch], action="park", reason="big")
            taken += [e["position"] for e in batch]
            if len(taken) >= 5:
                break
    wait_for(lambda: c.status(key)["parked"] == 5, 15, "5 parked events")
    listed = [e["position"] for e in c.parked(key)["events"]]
    assert listed == ps[:3], listed                 # 3 x 60 kB fit in 200 kB, 4 do not
    rc, out, err = d.ctl("parked", key)
    assert rc == 0 and "(3 of 5 parked events shown, the oldest; no more fit in one answer " \
        "of max_frame_bytes" in out, (out, err)
    assert c.parked(key, "purge", limit=3)["count"] == 3
    assert [e["position"] for e in c.parked(key)["events"]] == ps[3:]


class LineReader:
    """Reads a subprocess's stdout lines on a thread."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.q: "queue.Queue[Optional[str]]" = queue.Queue()
        self.t = threading.Thread(target=self._run, args=(proc,), daemon=True)
        self.t.start()

    def _run(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.q.put(line)
        self.q.put(None)

    def lines(self, n: int, timeout: float) -> List[str]:
        got: List[str] = []
        deadline = time.monotonic() + timeout
        while len(got) < n:
            try:
                line = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError("got only %d of %d lines: %r" % (len(got), n, got)) from None
            if line is None:
                raise AssertionError("stdout closed after %d lines: %r" % (len(got), got))
            got.append(line)
        return got


def _finish(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
        raise


def _tail_pool(c: Any) -> Optional[Dict[str, Any]]:
    """The status of the ephemeral subscription a `tail --type --selector` made, once its
    consumer is attached."""
    for p in c.list()["subscriptions"]:
        if p["subscription"]["name"].startswith("tail-") and \
                sum(w["consumers"] for w in p["workers"]) == 1:
            return p
    return None


def _consumers(daemon: Any, key: str) -> int:
    try:
        return sum(w["consumers"] for w in daemon.client().status(key)["workers"])
    except Exception:  # noqa: BLE001
        return 0


@pytest.mark.timeout(90)
def test_tail_key_json_prints_and_acks(daemon: Any) -> None:
    key = start_json(daemon, "tailed")["key"]
    wait_status(daemon, key, lambda s: any(w["state"] == "ready" for w in s["workers"]), "ready")
    proc = daemon.ctl_popen("--json", "tail", key)
    try:
        reader = LineReader(proc)
        wait_for(lambda: _consumers(daemon, key) == 1, 15, "the tail consumer")
        c = daemon.client()
        positions = c.publish([{"stream": "t-%d" % i, "type": "ty", "data": {"i": i, "b": "x"}}
                               for i in range(3)])["positions"]
        evs = [json.loads(line) for line in reader.lines(3, 15)]
        assert sorted(e["position"] for e in evs) == positions
        assert {e["data"]["i"] for e in evs} == {0, 1, 2}
        for e in evs:
            assert set(e) >= {"position", "id", "stream", "version", "type", "data", "metadata",
                              "tags", "timestamp", "attempt"}
        wait_status(daemon, key, lambda s: s["checkpoint"] >= positions[-1], "acks from tail")
    finally:
        rc = _finish(proc)
    assert rc == 0, proc.stderr.read()


@pytest.mark.timeout(60)
def test_tail_tells_a_stopped_pool_from_a_daemon_gone(make_daemon: Any) -> None:
    """Exit 3 is for a daemon that cannot be reached (§6); a pool stopped under tail by
    another client is the daemon's answer: exit 1, naming the state."""
    d = make_daemon()
    key = start_json(d, "tailstop")["key"]
    wait_status(d, key, lambda s: any(w["state"] == "ready" for w in s["workers"]), "ready")
    proc = d.ctl_popen("tail", key)
    try:
        wait_for(lambda: _consumers(d, key) == 1, 15, "the tail consumer")
        d.client().stop(key, drain_timeout=0.2)
        rc = proc.wait(15)
    finally:
        _finish(proc)
    err = proc.stderr.read()
    assert rc == 1 and "error: the pool of %s is stopped" % key in err, (rc, err)

    d.client().start({"name": "tailstop", "type": "stream", "selector": "$all"})
    wait_status(d, key, lambda s: any(w["state"] == "ready" for w in s["workers"]), "ready")
    proc = d.ctl_popen("tail", key)
    try:
        wait_for(lambda: _consumers(d, key) == 1, 15, "the tail consumer")
        d.collect_children()
        d.proc.kill()
        rc = proc.wait(15)
    finally:
        _finish(proc)
    err = proc.stderr.read()
    assert rc == 3 and "no longer answers" in err, (rc, err)


@pytest.mark.timeout(60)
def test_tail_of_a_daemon_shutting_down_exits_3(daemon: Any) -> None:
    """On SIGTERM the daemon stops every pool and still answers while another pool drains:
    tail, asking why its connection closed, hears "stopped"; that is the daemon going
    away (exit 3, which a supervising script retries), not another client's stop (1)."""
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)   # accepts, never acks
    mute.bind(os.path.join(daemon.root, "mute.sock"))
    mute.listen(4)
    try:
        c = daemon.client()
        held = c.start({"name": "held", "type": "stream", "selector": "held",
                        "subscriber": "unix:" + os.path.join(daemon.root, "mute.sock")})["key"]
        key = start_json(daemon, "tailed-down")["key"]
        c.publish([{"stream": "held", "type": "t"}])
        wait_status(daemon, held, lambda s: s["workers"][0]["consumers"] == 1
                    and s["in_flight"] == 1, "the event held by the mute subscriber")
        wait_status(daemon, key, lambda s: any(w["state"] == "ready" for w in s["workers"]),
                    "ready")
        proc = daemon.ctl_popen("tail", key)
        try:
            wait_for(lambda: _consumers(daemon, key) == 1, 15, "the tail consumer")
            daemon.collect_children()
            daemon.proc.send_signal(signal.SIGTERM)     # drains "held" for 10 s
            rc = proc.wait(30)
        finally:
            _finish(proc)
        err = proc.stderr.read()
        assert rc == 3 and "error: the daemon is shutting down" in err, (rc, err)
    finally:
        mute.close()


@pytest.mark.timeout(90)
def test_tail_human_lines(daemon: Any) -> None:
    key = start_json(daemon, "tailed-h")["key"]
    wait_status(daemon, key, lambda s: any(w["state"] == "ready" for w in s["workers"]), "ready")
    proc = daemon.ctl_popen("tail", key)
    try:
        reader = LineReader(proc)
        wait_for(lambda: _consumers(daemon, key) == 1, 15, "the tail consumer")
        pos = daemon.client().publish([{"stream": "orders-9", "type": "order.paid",
                                        "data": {"amount": 12}}])["positions"][0]
        (line,) = reader.lines(1, 15)
        assert line.split()[:3] == [str(pos), "orders-9", "order.paid"], line
        assert '{"amount":12}' in line
        # one line per event (§6): a client's stream name cannot forge a line, nor send
        # escape sequences to the terminal
        pos = daemon.client().publish([{"stream": "evil\n999  fake  x", "type": "t\x1b[2J",
                                        "data": 1}])["positions"][0]
        (line,) = reader.lines(1, 15)
        assert line.rstrip("\n") == "%d  evil\\n999  fake  x  t\\x1b[2J  1" % pos, repr(line)
    finally:
        rc = _finish(proc)
    assert rc == 0


@pytest.mark.timeout(60)
def test_tail_ends_when_its_reader_goes_with_no_event_to_write(daemon: Any) -> None:
    """`emitterctl tail ... | head -2`: once head exits and no more events come, there is
    no EPIPE to end tail; it must notice the reader is gone anyway (exit 0), and its
    ephemeral subscription goes with it."""
    c = daemon.client()
    c.publish([{"stream": "h", "type": "t", "data": {"i": i}} for i in range(3)])
    r, w = os.pipe()
    proc = subprocess.Popen(ctl_argv() + ["--socket", daemon.socket, "tail", "--type", "stream",
                                          "--selector", "h", "--start-from", "origin"],
                            stdin=subprocess.DEVNULL, stdout=w, stderr=subprocess.DEVNULL,
                            env=daemon.env, cwd=daemon.root)
    os.close(w)
    try:
        with os.fdopen(r) as reader:           # `head -2`
            got = [reader.readline(), reader.readline()]
        assert [line.split()[0] for line in got] == ["1", "2"], got
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    wait_for(lambda: c.list()["subscriptions"] == [], 15, "the ephemeral subscription deleted")


@pytest.mark.timeout(90)
def test_tail_ephemeral_subscription(daemon: Any) -> None:
    proc = daemon.ctl_popen("--json", "tail", "--type", "event_type", "--selector", "wanted")
    c = daemon.client()
    try:
        reader = LineReader(proc)

        pool = wait_for(lambda: _tail_pool(c), 15, "the ephemeral tail subscription")
        sub = pool["subscription"]
        assert sub["options"]["ephemeral"] is True and sub["start_from"] == "now"
        assert sub["type"] == "event_type" and sub["selector"] == "wanted"
        positions = c.publish([{"stream": "e", "type": "other"}, {"stream": "e", "type": "wanted"}])[
            "positions"]
        (line,) = reader.lines(1, 15)
        assert json.loads(line)["position"] == positions[1]
    finally:
        rc = _finish(proc)
    assert rc == 0
    wait_for(lambda: all(p["key"] != pool["key"] for p in c.list()["subscriptions"]), 15,
             "the ephemeral subscription to be deleted after tail exits")


@pytest.mark.timeout(60)
def test_tail_attaches_again_when_its_worker_dies(daemon: Any) -> None:
    """The worker serving tail is killed: the pool runs on (its ephemeral subscription
    waits for a consumer), so tail attaches again and goes on printing. It used to exit 1,
    and its subscription was deleted with the event it was about to print."""
    proc = daemon.ctl_popen("--json", "tail", "--type", "stream", "--selector", "kept")
    c = daemon.client()
    try:
        reader = LineReader(proc)

        pool = wait_for(lambda: _tail_pool(c), 15, "the ephemeral tail subscription")
        first = c.publish([{"stream": "kept", "type": "t"}])["positions"][0]
        assert json.loads(reader.lines(1, 15)[0])["position"] == first
        os.kill(pool["workers"][0]["pid"], signal.SIGKILL)

        def on_new_worker() -> bool:
            p = _tail_pool(c)
            return p is not None and p["workers"][0]["pid"] != pool["workers"][0]["pid"]
        wait_for(on_new_worker, 20, "tail attached to the new worker")
        second = c.publish([{"stream": "kept", "type": "t"}])["positions"][0]
        # the first comes again when its ack had not reached the worker (at least once)
        seen = [json.loads(reader.lines(1, 15)[0])["position"]]
        if seen[0] == first:
            seen.append(json.loads(reader.lines(1, 15)[0])["position"])
        assert seen[-1] == second, seen
        assert proc.poll() is None
    finally:
        rc = _finish(proc)
    assert rc == 0
    assert "attaching again" in proc.stderr.read()


@pytest.mark.timeout(60)
def test_top_once(daemon: Any) -> None:
    key = start_json(daemon, "topped")["key"]
    d = jdoc(daemon.ctl("--json", "top", "--once"))
    assert d["daemon"]["pid"] == daemon.proc.pid
    (p,) = d["pools"]
    assert p["key"] == key and p["lag"] == p["head"] - p["checkpoint"]
    assert p["delivered_per_s"] is None
    rc, out, err = daemon.ctl("top", "--once")
    assert rc == 0, err
    assert "\x1b[" not in out, "no ANSI codes when stdout is not a terminal"
    assert key in out and "DELIV/S" in out and "LAG" in out


@pytest.mark.timeout(60)
def test_top_refreshes_with_rates(daemon: Any) -> None:
    start_json(daemon, "rates")
    proc = daemon.ctl_popen("--json", "top", "--interval", "0.2")
    try:
        reader = LineReader(proc)
        frames = [json.loads(line) for line in reader.lines(3, 20)]
    finally:
        rc = _finish(proc)
    assert rc == 0
    assert frames[0]["pools"][0]["delivered_per_s"] is None
    assert frames[2]["pools"][0]["delivered_per_s"] is not None


@pytest.mark.timeout(60)
def test_a_bad_json_tags_or_payload_selector_is_told_its_json_form(daemon: Any) -> None:
    """A tags selector IS given on the command line, as a JSON list (README's own example);
    one whose items lack their quotes was told "cannot be given on the command line (the
    Python client takes it)", and so was an event_payload one (a map, on both)."""
    rc, out, err = daemon.ctl("start", "vip", "--type", "tags", "--selector", "[vip, gold]")
    assert rc == 2, (rc, out, err)
    assert "cannot be given on the command line" not in err, err
    assert "a tags selector is a JSON list of quoted strings" in err, err
    doc = json.loads(daemon.ctl("--json", "start", "vip", "--type", "tags",
                                "--selector", '["vip", "gold"]')[1])
    assert doc["subscription"]["selector"] == ["vip", "gold"]
    rc, out, err = daemon.ctl("start", "p", "--type", "event_payload", "--selector", "['a']")
    assert rc == 2, (rc, out, err)
    assert "the Python client takes it" not in err and "is a JSON map" in err, err
    rc, out, err = daemon.ctl("start", "e", "--type", "event_type", "--selector", "")
    assert rc == 1 and "an event_type selector must be a non-empty string" in err, (rc, err)


# ---- emitterctl with stdout closed (`cmd >&-`): Python starts with sys.stdout None and the
# CLI crashes with an AttributeError traceback and exit 1 (the status PROTOCOL §6 keeps for
# an error answered by the daemon), after the command was done.

def _run_stdout_closed(daemon: Any, *args: str) -> subprocess.CompletedProcess:
    # exec with fd 1 closed, as the shell's `>&-` does
    argv = ["sh", "-c", 'exec "$@" >&-', "sh"] + ctl_argv() + ["--socket", daemon.socket] \
        + list(args)
    return subprocess.run(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=daemon.env, cwd=daemon.root, timeout=30)


@pytest.mark.timeout(60)
def test_closed_stdout_is_not_a_traceback_nor_a_daemon_error(daemon: Any) -> None:
    r = _run_stdout_closed(daemon, "--json", "publish", "--stream", "s", "--type", "t")
    assert daemon.client().ping()["head"] == 1          # the event was stored
    assert "Traceback" not in r.stderr, r.stderr
    # the output is discarded, as `> /dev/null` would: never 1, which says the daemon
    # refused, so a script retries and stores the event twice
    assert r.returncode == 0, (r.returncode, r.stderr)


@pytest.mark.timeout(60)
def test_closed_stdout_publish_file(daemon: Any, short_tmp: str) -> None:
    path = short_tmp + "/ev.jsonl"
    with open(path, "w") as f:
        f.write('{"stream": "s", "type": "t"}\n')
    r = _run_stdout_closed(daemon, "publish", "--file", path)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 0, (r.returncode, r.stderr)


# ---- emitterctl whose stdout reader has gone (`emitterctl publish ... | true`, or a
# `| head -1` that exits before a large output is written): click's main() catches EPIPE
# itself and calls sys.exit(1), so emitterctl's own BrokenPipeError handler (exit 0) never
# runs and the script sees 1, "an error answered by the daemon", for a command that was
# done.

def _run_reader_gone(daemon: Any, *args: str) -> subprocess.CompletedProcess:
    r, w = os.pipe()
    os.close(r)                     # the reader is gone before anything is written
    try:
        return subprocess.run(ctl_argv() + ["--socket", daemon.socket] + list(args),
                              stdin=subprocess.DEVNULL, stdout=w, stderr=subprocess.PIPE,
                              text=True, env=daemon.env, cwd=daemon.root, timeout=30)
    finally:
        os.close(w)


@pytest.mark.timeout(60)
def test_epipe_on_stdout_is_not_exit_1(daemon: Any) -> None:
    for args in (["ping"], ["--json", "publish", "--stream", "s", "--type", "t"], ["list"]):
        res = _run_reader_gone(daemon, *args)
        assert "Traceback" not in res.stderr, res.stderr
        # the reader is gone: nobody wants the output (as `| head -1`), the command was done
        assert res.returncode == 0, (args, res.returncode, res.stderr)
    assert daemon.client().ping()["head"] == 1          # the publish was done


# ---- emitterctl tail (and parked) crash on an event whose data nests ~500 levels deep:
# render.to_jsonable() recurses twice per level and hits Python's recursion limit, though the
# daemon takes values nested up to 1,024 deep. tail dies with a RecursionError traceback and
# exit 1 before acking, so every later `tail KEY` gets the same event and dies again.

DEPTH = 600


@pytest.mark.timeout(60)
@pytest.mark.parametrize("as_json", [True, False])
def test_tail_prints_a_deeply_nested_event(daemon: Any, as_json: bool) -> None:
    c = daemon.client()
    data: Any = 1
    for _ in range(DEPTH):
        data = [data]
    c.publish([{"stream": "deep", "type": "deep", "data": data}])
    key = c.start({"name": "deep", "type": "event_type", "selector": "deep",
                   "start_from": "origin"})["key"]
    args = (["--json"] if as_json else []) + ["tail", key]
    err_path = os.path.join(daemon.root, "tail.err")
    with open(err_path, "w") as err, daemon.ctl_running(*args, stderr=err) as p:
        line = p.stdout.readline()          # "" when tail died
        if not line:
            p.wait(10)
            with open(err_path) as f:
                raise AssertionError("tail exited %s without printing the event:\n%s"
                                     % (p.returncode, f.read()[-400:]))
        if as_json:
            assert json.loads(line)["position"] == 1
        else:
            assert line.startswith("1 ")


# ---- publish --file with a line whose JSON parses but cannot be sent (a lone surrogate
# "\\ud800", or an integer beyond 64 bits): the first pass lets it through, the batches before
# it are published, then msgpack's EncodeError escapes _publish_file and main() reports it as a
# usage error (exit 2, "nothing was done") without the line, without how many events were
# published, and without the summary. README: a regular file is checked line by line before
# anything is sent; a refused event's message names the line and how many events went before.

@pytest.mark.timeout(60)
# a lone surrogate; an integer past 64 bits; 1,021 lists, fine alone, but the publish request
# carries the event three levels deeper, past msgpack's 1,024
@pytest.mark.parametrize("bad", ['"\\ud800"', "99999999999999999999999",
                                 "[" * 1021 + "1" + "]" * 1021])
def test_unencodable_line_is_found_before_publishing_or_named(daemon: Any, short_tmp: str,
                                                              bad: str) -> None:
    path = short_tmp + "/ev.jsonl"
    with open(path, "w") as f:
        f.write('{"stream": "s", "type": "t", "data": 1}\n')
        f.write('{"stream": "s", "type": "t", "data": 2}\n')
        f.write('{"stream": "s", "type": "t", "data": %s}\n' % bad)
    rc, out, err = daemon.ctl("publish", "--file", path, "--batch-size", "1")
    head = daemon.client().ping()["head"]
    assert rc != 0
    assert "line 3" in err, (rc, err, head)
    # either nothing was published (checked first, as README says), or the status and the
    # message do not claim a usage error with nothing done
    assert head == 0 or (rc != 2 and "2 events published" in err), (rc, err, head)


@pytest.mark.timeout(60)
def test_stopped_publish_with_reader_gone_says_lines_were_not_sent(daemon: Any, short_tmp: str) -> None:
    """`emitterctl publish --file F | tee log`, Ctrl-C: the terminal's SIGINT ends tee and stops
    publish between two batches. publish then prints its summary into the pipe nobody reads:
    ctl.out() turns that EPIPE into exit 0 at once, before _publish_file says "stopped by a
    signal: the lines of F after line N were not sent" and exits 130. The script (or user)
    sees 0 and no word about the lines that were never published."""
    path = short_tmp + "/ev.jsonl"
    n = 20000
    with open(path, "w") as f:
        for i in range(n):
            f.write('{"stream": "s", "type": "t", "data": %d}\n' % i)
    r, w = os.pipe()
    os.close(r)                     # the reader (tee) is gone: Ctrl-C ended it
    errf = open(os.path.join(short_tmp, "err"), "w+")
    try:
        p = subprocess.Popen(ctl_argv() + ["--socket", daemon.socket, "publish", "--file", path,
                                           "--batch-size", "1"],
                             stdin=subprocess.DEVNULL, stdout=w, stderr=errf,
                             env=daemon.env, cwd=daemon.root)
    finally:
        os.close(w)
    try:
        c = daemon.client()
        wait_for(lambda: c.ping()["head"] >= 5, 20, "publishing under way")
        p.send_signal(signal.SIGINT)
        rc = p.wait(20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
    head = daemon.client().ping()["head"]
    errf.seek(0)
    err = errf.read()
    errf.close()
    assert head < n, "published everything before the signal: inconclusive"
    # the stop is what matters here, not the lost summary: 130 and the lines not sent
    assert rc == 130 and "were not sent" in err, (rc, err, head)


def _swallowing_server(path: str, ready: threading.Event) -> None:
    """Accept one connection, read one whole request frame, close without answering (a
    daemon killed between its commit and its answer)."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    ready.set()
    conn, _ = srv.accept()
    with conn:
        head = b""
        while len(head) < 4:
            head += conn.recv(4 - len(head))
        (n,) = struct.unpack(">I", head)
        got = 0
        while got < n:
            got += len(conn.recv(n - got))
    srv.close()


@pytest.mark.timeout(30)
def test_retry_advice_counts_a_null_id_as_no_id(short_tmp: str) -> None:
    """`emitterctl publish --file` whose publish goes unanswered tells the user whether sending
    the batch again is safe. It decides by `"id" in event`, so a line with `"id": null` (the
    daemon's default: a generated id, PROTOCOL "id?") counts as having an id, and the user is
    told "publishing them again stores each once" -- republishing stores those events twice."""
    sock = os.path.join(short_tmp, "s.sock")
    events = os.path.join(short_tmp, "ev.jsonl")
    with open(events, "w") as f:
        f.write('{"stream": "s", "type": "t", "id": "a"}\n')
        f.write('{"stream": "s", "type": "t", "id": null}\n')
    ready = threading.Event()
    t = threading.Thread(target=_swallowing_server, args=(sock, ready), daemon=True)
    t.start()
    assert ready.wait(5)
    rc, out, err = run_ctl(["--socket", sock, "publish", "--file", events],
                           env=clean_env(short_tmp), timeout=20)
    t.join(5)
    assert rc == 3, (rc, out, err)
    assert "may or may not have been stored" in err, err
    # line 2 has no id of its own: publishing the batch again stores it a second time
    assert "stores each once" not in err, err
    assert "may store some twice" in err, err


def _columns(text: str) -> int:
    """Terminal columns by Unicode's tables: wide and fullwidth 2, combining marks 0."""
    import unicodedata
    return sum(0 if unicodedata.combining(ch) else
               2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text)


@pytest.mark.timeout(60)
def test_list_columns_stay_aligned_around_wide_and_combining_characters(daemon: Any) -> None:
    """§6 "Without it, a human table": each row's STATE starts in the header's column when a
    selector holds wide (CJK, emoji) or combining characters (padding counted code points:
    found by the selector audit, nineteenth session)."""
    for name, sel in (("ascii", "orders"), ("wide", "注文注文"), ("emoji", "s-😀😀"),
                      ("comb", "zu\u0308ri\u0301ch")):
        rc, out, err = daemon.ctl("start", name, "--type", "stream", "--selector", sel)
        assert rc == 0, err
    rc, out, err = daemon.ctl("list")
    assert rc == 0, err
    lines = out.splitlines()
    want = _columns(lines[0][:lines[0].index("STATE")])
    got = {line.split()[1]: _columns(line[:line.index("running")]) for line in lines[1:]}
    assert len(got) == 4 and set(got.values()) == {want}, (want, got, out)


@pytest.mark.timeout(60)
def test_a_long_emoji_selector_is_clipped_to_its_column(daemon: Any) -> None:
    """render.clip cuts to `width` terminal columns, "…" included; list clips SELECTOR to 40.
    "❤️" (a heart and a variation selector) takes 2 columns; counted a code point at a time
    it took 1, and 30 of them came out 61 columns wide (found by the review)."""
    from wcwidth import wcswidth
    rc, out, err = daemon.ctl("start", "e", "--type", "stream", "--selector", "\u2764\ufe0f" * 30)
    assert rc == 0, err
    rc, out, err = daemon.ctl("list")
    assert rc == 0, err
    header, row = out.splitlines()[:2]
    cols = wcswidth(header[:header.index("SELECTOR")])
    i = 0
    while wcswidth(row[:i]) < cols:
        i += 1
    cell = row[i:].split("  ")[0]
    assert cell.endswith("…") and wcswidth(cell) <= 40, (wcswidth(cell), cell)
