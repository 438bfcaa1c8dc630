"""The workload behind scripts/demo: a real daemon, a real subscriber, real kills."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import psutil

VENV_BIN = os.path.dirname(sys.executable)
EMITTERD = os.path.join(VENV_BIN, "emitterd")
EMITTERCTL = os.path.join(VENV_BIN, "emitterctl")

SUBSCRIBER = r'''
import sys, threading
from emitterd.client import serve_subscriber
out = open(sys.argv[2], "a", buffering=1)
def handle(event):
    out.write("%d %d %s\n" % (event["position"], event["attempt"], event["stream"]))
serve_subscriber(sys.argv[1], handle)
'''


def say(text: str) -> None:
    print("\n== " + text, flush=True)


def ctl(env: dict, *args: str, show: bool = True) -> str:
    r = subprocess.run([EMITTERCTL] + list(args), env=env, capture_output=True, text=True, timeout=60)
    if show:
        print("$ emitterctl " + " ".join(args))
        print((r.stdout + r.stderr).rstrip())
    if r.returncode != 0:
        raise SystemExit("emitterctl %s failed (exit %d)" % (args[0], r.returncode))
    return r.stdout


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit("demo: timed out waiting for " + what)


def main() -> int:
    import json
    root = tempfile.mkdtemp(prefix="emitterd-demo-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMITTERD_", "NOTIFY_SOCKET",
                                                                    "LISTEN_", "WATCHDOG_"))}
    env.update(XDG_RUNTIME_DIR=os.path.join(root, "run"), XDG_STATE_HOME=os.path.join(root, "state"),
               PYTHONUNBUFFERED="1")
    os.makedirs(env["XDG_RUNTIME_DIR"], mode=0o700)
    os.makedirs(env["XDG_STATE_HOME"], mode=0o700)
    received = os.path.join(root, "received.txt")
    sub_sock = os.path.join(root, "subscriber.sock")
    daemon = sub = None
    try:
        say("starting the daemon with its embedded defaults: `emitterd run`")
        log = open(os.path.join(root, "daemon.log"), "wb")
        daemon = subprocess.Popen([EMITTERD, "run"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: subprocess.run([EMITTERCTL, "ping"], env=env, capture_output=True).returncode == 0,
                 20, "the daemon to answer ping")
        ctl(env, "ping")
        print("socket under %s, event log under %s" % (env["XDG_RUNTIME_DIR"], env["XDG_STATE_HOME"]))

        say("a subscriber program listening on unix:%s" % sub_sock)
        sub = subprocess.Popen([sys.executable, "-c", SUBSCRIBER, sub_sock, received], env=env,
                               start_new_session=True)
        wait_for(lambda: os.path.exists(sub_sock), 10, "the subscriber socket")

        say("a subscription for streams matching order-* with a pool of 2 worker processes")
        out = ctl(env, "--json", "start", "orders", "--type", "event_pattern", "--selector", "order-*",
                  "--subscriber", "unix:" + sub_sock, "--pool-size", "2", "--start-from", "origin",
                  show=False)
        key = json.loads(out)["key"]
        print("started subscription orders, key", key)
        wait_for(lambda: all(w["state"] == "ready" for w in json.loads(ctl(env, "--json", "status", key, show=False))["workers"])
                 and len(json.loads(ctl(env, "--json", "status", key, show=False))["workers"]) == 2, 10, "2 ready workers")
        ctl(env, "status", key)

        say("publishing 40 events on 4 streams (10 of them on user-1, which does not match)")
        for i in range(40):
            stream = ["order-1", "order-2", "order-3", "user-1"][i % 4]
            ctl(env, "publish", "--stream", stream, "--type", "Placed", "--data",
                json.dumps({"n": i}), show=(i == 0))
        wait_for(lambda: json.loads(ctl(env, "--json", "status", key, show=False))["checkpoint"] >= 40,
                 15, "checkpoint 40")
        ctl(env, "status", key)

        st = json.loads(ctl(env, "--json", "status", key, show=False))
        victim = [w for w in st["workers"] if w["index"] == 1][0]["pid"]
        say("killing worker #1 (pid %d) with SIGKILL while 300 more events are published" % victim)
        events = [{"stream": "order-%d" % (i % 5), "type": "Placed", "data": {"n": 40 + i}}
                  for i in range(300)]
        from emitterd.client import Client
        with Client(env["XDG_RUNTIME_DIR"] + "/emitterd/emitterd.sock") as c:
            c.publish(events[:150])
            os.kill(victim, signal.SIGKILL)
            c.publish(events[150:])
            head = c.ping()["head"]

        def replaced():
            s = json.loads(ctl(env, "--json", "status", key, show=False))
            pids = [w["pid"] for w in s["workers"]]
            return s if (victim not in pids and len(pids) == 2 and s["checkpoint"] == head
                         and all(w["state"] == "ready" for w in s["workers"])) else None
        s = wait_for(replaced, 20, "the replacement worker and checkpoint == head")
        new = [w for w in s["workers"] if w["index"] == 1][0]["pid"]
        print("worker #1 replaced: pid %d -> %d, pool restarts = %d" % (victim, new, s["restarts"]))
        ctl(env, "status", key)

        lines = open(received).read().split()
        got = [(int(lines[i]), int(lines[i + 1])) for i in range(0, len(lines), 3)]
        positions = {p for p, _ in got}
        with Client(env["XDG_RUNTIME_DIR"] + "/emitterd/emitterd.sock") as c:
            matching = {p for p in range(1, head + 1)} - {p for p in range(4, 41, 4)}
        missing = matching - positions
        redelivered = sum(1 for _, a in got if a > 1)
        print("subscriber received %d deliveries: %d distinct matching events of %d, missing %d; "
              "%d arrived with attempt >= 2 (they were held by the killed worker)"
              % (len(got), len(positions & matching), len(matching), len(missing), redelivered))
        if missing:
            raise SystemExit("demo: events missing: %s" % sorted(missing)[:20])

        say("resizing the pool to 3 workers, then back to 1 (survivors keep their pids)")
        ctl(env, "update", key, "--pool-size", "3")
        wait_for(lambda: sum(w["state"] == "ready" for w in json.loads(ctl(env, "--json", "status", key, show=False))["workers"]) == 3, 10, "3 workers")
        ctl(env, "update", key, "--pool-size", "1")
        wait_for(lambda: len(json.loads(ctl(env, "--json", "status", key, show=False))["workers"]) == 1, 15, "1 worker")
        ctl(env, "list")

        say("stopping the daemon with SIGTERM (drains, persists checkpoints, stops workers)")
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(30)
        print("emitterd exited with status %d" % code)
        print("\n-- last lines of the daemon log --")
        with open(os.path.join(root, "daemon.log"), "rb") as f:
            print("\n".join(f.read().decode("utf-8", "replace").splitlines()[-12:]))
        print("\ndemo finished: every matching event delivered at least once, nothing lost.")
        return 0 if code == 0 else 1
    finally:
        for p in (sub, daemon):
            if p is not None and p.poll() is None:
                try:
                    kids = psutil.Process(p.pid).children(recursive=True)
                except psutil.Error:
                    kids = []
                p.kill()
                p.wait(10)
                for k in kids:
                    try:
                        k.kill()
                    except psutil.Error:
                        pass
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
