"""Settings (PROTOCOL §7): one table -> TOML file, EMITTERD_* env, `emitterd run` flags, docs.

Also the `emitterd` command (config, run --help, --version) and the log formats.
"""
import io
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import textwrap
import tomllib
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from emitterd import logs, paths, settings
from emitterd.cli import daemon_cmd
from emitterd.settings import BY_NAME, SETTINGS, ConfigError, load

REPO = Path(__file__).resolve().parent.parent
EMITTERD_BIN = Path(sys.executable).parent / "emitterd"

# The names PROTOCOL §7 requires at least.
REQUIRED = ["socket", "socket_mode", "allow_uids", "allow_gids", "data_dir", "store_id",
            "log_level", "max_frame_bytes", "max_event_bytes", "max_publish_events",
            "max_connections", "max_subscriptions", "drain_timeout", "worker_timeout",
            "heartbeat_interval", "max_worker_rss", "synchronous", "metrics_listen",
            "default_pool_size", "default_strategy", "default_batch_size",
            "default_max_in_flight", "default_ack_timeout", "default_max_retries",
            "default_retry_backoff", "default_max_restarts", "default_restart_period",
            "default_ephemeral"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No inherited EMITTERD_* / journald variables; XDG dirs inside tmp_path."""
    for var in list(os.environ):
        if var.startswith("EMITTERD_") or var == "JOURNAL_STREAM":
            monkeypatch.delenv(var)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


@pytest.fixture
def restore_logging():
    root = logging.getLogger("emitterd")
    saved = (list(root.handlers), root.level, root.propagate)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    root.propagate = saved[2]


def base_env(tmp_path) -> dict:
    return {"XDG_RUNTIME_DIR": str(tmp_path / "run"), "XDG_STATE_HOME": str(tmp_path / "state"),
            "HOME": str(tmp_path / "home")}


def write(tmp_path, text: str, name: str = "emitterd.toml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


# ---- the table -----------------------------------------------------------------

@pytest.mark.timeout(10)
def test_table_declares_every_required_setting_once():
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names))
    for name in REQUIRED:
        assert name in BY_NAME, name
    for s in SETTINGS:
        assert s.env_var == "EMITTERD_" + s.name.upper()
        assert s.flag == "--" + s.name.replace("_", "-")
        assert s.section in settings.SECTIONS
        assert len(s.help) > 20, s.name
    assert BY_NAME["synchronous"].choices == ("full", "normal")
    assert BY_NAME["log_level"].choices == ("debug", "info", "warning", "error")


@pytest.mark.timeout(10)
def test_reloadable_marks():
    for name in ("socket", "socket_mode", "data_dir", "store_id", "synchronous",
                 "metrics_listen"):
        assert not BY_NAME[name].reloadable, name
    for name in ("log_level", "log_format", "allow_uids", "allow_gids", "drain_timeout",
                 "worker_timeout", "max_worker_rss"):
        assert BY_NAME[name].reloadable, name
    for s in SETTINGS:
        if s.name.startswith(("max_", "default_")):
            assert s.reloadable, s.name


@pytest.mark.timeout(10)
def test_defaults(tmp_path):
    cfg = load(env=base_env(tmp_path))
    assert set(cfg.sources.values()) == {"default"}
    assert cfg.config_path is None
    assert cfg.socket_mode == 0o660
    assert cfg.max_frame_bytes == 8 * 1024 * 1024
    assert cfg.max_event_bytes == 1024 * 1024
    assert cfg.max_publish_events == 10000
    assert cfg.allow_uids == [] and cfg.allow_gids == []
    assert cfg.default_retry_backoff == [0.1, 30.0]
    assert cfg.default_pool_size == 1 and cfg.default_strategy == "pinned"
    assert cfg.default_max_restarts == 10 and cfg.default_restart_period == 60.0
    assert cfg.metrics_listen == "" and cfg.synchronous == "full"
    assert cfg.subscription_defaults() == {
        "pool_size": 1, "strategy": "pinned", "batch_size": 64, "max_in_flight": 256,
        "ack_timeout": 30.0, "max_retries": 10, "retry_backoff": [0.1, 30.0],
        "max_restarts": 10, "restart_period": 60.0, "ephemeral": False}
    assert cfg.warnings == []


@pytest.mark.timeout(10)
def test_config_is_read_only(tmp_path):
    cfg = load(env=base_env(tmp_path))
    with pytest.raises(AttributeError):
        cfg.max_frame_bytes = 1
    with pytest.raises(AttributeError, match="max_frame_bytes"):
        cfg.max_frame_byte


# ---- precedence: flag > env > file > default, one setting of each type -----------

PRECEDENCE = [
    # name, file value (TOML), env string, flag string, expected file / env / flag
    ("max_frame_bytes", "2097152", "3145728", "4194304", 2097152, 3145728, 4194304),
    ("drain_timeout", "1.5", "2.5", "3", 1.5, 2.5, 3.0),
    ("socket_mode", '"0600"', "0640", "0666", 0o600, 0o640, 0o666),
    ("allow_uids", "[1, 2]", "3,4", "5", [1, 2], [3, 4], [5]),
    ("default_retry_backoff", "[0.5, 5]", "1,10", "2,20", [0.5, 5.0], [1.0, 10.0], [2.0, 20.0]),
    ("log_level", '"debug"', "WARNING", "error", "debug", "warning", "error"),
    ("metrics_listen", '"127.0.0.1:1"', "127.0.0.1:2", "[::1]:3",
     "127.0.0.1:1", "127.0.0.1:2", "[::1]:3"),
    ("store_id", '"file-store"', "env.store", "flag_store", "file-store", "env.store",
     "flag_store"),
]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name,fval,eval_,flval,exp_file,exp_env,exp_flag", PRECEDENCE,
                         ids=[p[0] for p in PRECEDENCE])
def test_precedence(tmp_path, name, fval, eval_, flval, exp_file, exp_env, exp_flag):
    s = BY_NAME[name]
    path = write(tmp_path, "%s = %s\n" % (name, fval))
    env = base_env(tmp_path)
    cfg = load(env=env)
    assert (getattr(cfg, name), cfg.sources[name]) == (s.default, "default")
    cfg = load(path, env=env)
    assert (getattr(cfg, name), cfg.sources[name]) == (exp_file, "file")
    env[s.env_var] = eval_
    cfg = load(path, env=env)
    assert (getattr(cfg, name), cfg.sources[name]) == (exp_env, "env")
    cfg = load(path, {name: flval}, env=env)
    assert (getattr(cfg, name), cfg.sources[name]) == (exp_flag, "flag")
    # dashes are accepted in flag names too, and None means "not given"
    assert getattr(load(path, {s.flag[2:]: flval}, env=env), name) == exp_flag
    assert load(path, {name: None}, env=env).sources[name] == "env"


@pytest.mark.timeout(10)
def test_flags_may_be_typed(tmp_path):
    cfg = load(flags={"max_connections": 7, "allow_gids": (10, 20), "socket_mode": 0o600,
                      "default_ack_timeout": 2, "default_retry_backoff": (1, 2)},
               env=base_env(tmp_path))
    assert cfg.max_connections == 7 and cfg.allow_gids == [10, 20]
    assert cfg.socket_mode == 0o600 and cfg.default_ack_timeout == 2.0
    assert cfg.default_retry_backoff == [1.0, 2.0]


@pytest.mark.timeout(10)
def test_config_path_from_environment(tmp_path):
    a = write(tmp_path, "max_connections = 11\n", "a.toml")
    b = write(tmp_path, "max_connections = 22\n", "b.toml")
    env = dict(base_env(tmp_path), EMITTERD_CONFIG=a)
    cfg = load(env=env)
    assert cfg.max_connections == 11 and cfg.config_path == a
    assert load(b, env=env).max_connections == 22   # an explicit path wins
    assert load(flags={"config": b}, env=env).max_connections == 22
    assert load(env=dict(env, EMITTERD_CONFIG="")).config_path is None
    # an empty --config is a mistake, not the working directory read as a file
    with pytest.raises(ConfigError, match="--config: empty"):
        load(flags={"config": ""}, env=env)


@pytest.mark.timeout(10)
def test_empty_environment_variable_counts_as_unset(tmp_path):
    path = write(tmp_path, "allow_uids = [7]\nmax_connections = 9\n")
    env = dict(base_env(tmp_path), EMITTERD_ALLOW_UIDS="", EMITTERD_MAX_CONNECTIONS="")
    cfg = load(path, env=env)
    assert cfg.allow_uids == [7] and cfg.sources["allow_uids"] == "file"
    assert cfg.max_connections == 9
    # an empty flag is a value
    assert load(path, {"allow_uids": ""}, env=env).allow_uids == []


# ---- paths ---------------------------------------------------------------------

@pytest.mark.timeout(10)
def test_default_socket_and_data_dir_derive_from_paths(tmp_path):
    env = base_env(tmp_path)
    cfg = load(env=env)
    assert cfg.socket == paths.default_socket_path(env) == str(tmp_path / "run/emitterd/emitterd.sock")
    assert cfg.data_dir == paths.default_data_dir(env) == str(tmp_path / "state/emitterd")
    bare = {"HOME": str(tmp_path / "home")}
    cfg = load(env=bare)
    assert cfg.socket == paths.default_socket_path(bare)
    assert cfg.data_dir == paths.default_data_dir(bare)
    # "" in the file also means derive
    path = write(tmp_path, 'socket = ""\ndata_dir = ""\n')
    cfg = load(path, env=env)
    assert cfg.socket == paths.default_socket_path(env) and cfg.sources["socket"] == "file"
    # EMITTERD_SOCKET is the socket setting (and what clients read)
    cfg = load(env=dict(env, EMITTERD_SOCKET=str(tmp_path / "s.sock")))
    assert cfg.socket == str(tmp_path / "s.sock") and cfg.sources["socket"] == "env"


@pytest.mark.timeout(10)
def test_relative_paths(tmp_path, monkeypatch):
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    path = write(conf_dir, 'socket = "run/e.sock"\ndata_dir = "~/data"\n')
    env = base_env(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load(path, env=env)
    assert cfg.socket == str(conf_dir / "run/e.sock")        # relative to the file
    assert cfg.data_dir == str(tmp_path / "home/data")        # ~ expanded
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = load(path, {"socket": "x.sock"}, env=dict(env, EMITTERD_DATA_DIR="d"))
    assert cfg.socket == str(work / "x.sock")                 # flag: relative to the cwd
    assert cfg.data_dir == str(work / "d")


@pytest.mark.timeout(10)
def test_socket_path_too_long(tmp_path):
    with pytest.raises(ConfigError, match="^--socket: .*longer than 107"):
        load(flags={"socket": "/" + "s" * 200}, env=base_env(tmp_path))


# ---- socket_mode, lists, pairs ----------------------------------------------------

@pytest.mark.timeout(10)
def test_socket_mode_is_an_octal_string_everywhere(tmp_path):
    env = base_env(tmp_path)
    assert load(write(tmp_path, 'socket_mode = "0o750"\n'), env=env).socket_mode == 0o750
    assert load(write(tmp_path, 'socket_mode = "600"\n'), env=env).socket_mode == 0o600
    path = write(tmp_path, "socket_mode = 0o660\n")   # a TOML integer is refused
    with pytest.raises(ConfigError) as e:
        load(path, env=env)
    assert str(e.value).startswith("config file %s: socket_mode: expected an octal mode" % path)
    with pytest.raises(ConfigError, match=r'^EMITTERD_SOCKET_MODE: expected an octal mode like "0660", got \'999\''):
        load(env=dict(env, EMITTERD_SOCKET_MODE="999"))
    with pytest.raises(ConfigError, match="^--socket-mode: must be between 0000 and 0777, got 1777"):
        load(flags={"socket_mode": "1777"}, env=env)
    assert BY_NAME["socket_mode"].format(0o660) == "0660"
    assert BY_NAME["socket_mode"].toml(0o660) == '"0660"'


@pytest.mark.timeout(10)
def test_comma_lists_in_environment(tmp_path):
    env = base_env(tmp_path)
    cfg = load(env=dict(env, EMITTERD_ALLOW_UIDS="1000, 1001", EMITTERD_ALLOW_GIDS="50",
                        EMITTERD_RESTART_BACKOFF="0.5,60"))
    assert cfg.allow_uids == [1000, 1001] and cfg.allow_gids == [50]
    assert cfg.restart_backoff == [0.5, 60.0]
    for bad in ("1000,,1001", "a", "1000;1001", "1.5"):
        with pytest.raises(ConfigError, match="^EMITTERD_ALLOW_UIDS: expected comma-separated"):
            load(env=dict(env, EMITTERD_ALLOW_UIDS=bad))
    with pytest.raises(ConfigError, match="^EMITTERD_ALLOW_UIDS: must be between 0 and"):
        load(env=dict(env, EMITTERD_ALLOW_UIDS="-1"))
    with pytest.raises(ConfigError, match="^EMITTERD_DEFAULT_RETRY_BACKOFF: expected two numbers"):
        load(env=dict(env, EMITTERD_DEFAULT_RETRY_BACKOFF="1,2,3"))
    with pytest.raises(ConfigError, match="^--default-retry-backoff: the initial delay must not exceed"):
        load(flags={"default_retry_backoff": "5,1"}, env=env)
    path = write(tmp_path, 'allow_uids = "1000"\n')   # the file takes a TOML array
    with pytest.raises(ConfigError, match="allow_uids: expected an array of integers"):
        load(path, env=env)


# ---- errors name their source -----------------------------------------------------

@pytest.mark.timeout(10)
def test_type_errors_name_their_source(tmp_path):
    env = base_env(tmp_path)
    path = write(tmp_path, 'max_frame_bytes = "abc"\n')
    with pytest.raises(ConfigError) as e:
        load(path, env=env)
    assert str(e.value).startswith(
        "config file %s: max_frame_bytes: expected an integer, got 'abc'" % path)
    with pytest.raises(ConfigError, match="^EMITTERD_MAX_FRAME_BYTES: expected an integer, got 'x1'"):
        load(env=dict(env, EMITTERD_MAX_FRAME_BYTES="x1"))
    with pytest.raises(ConfigError, match="^--default-pool-size: expected an integer, got 'many'"):
        load(flags={"default_pool_size": "many"}, env=env)
    with pytest.raises(ConfigError, match="^--drain-timeout: expected a number"):
        load(flags={"drain_timeout": "soon"}, env=env)
    with pytest.raises(ConfigError, match="^EMITTERD_DRAIN_TIMEOUT: expected a finite number"):
        load(env=dict(env, EMITTERD_DRAIN_TIMEOUT="inf"))
    with pytest.raises(ConfigError, match="^EMITTERD_LOG_LEVEL: expected one of debug, info, warning, error, got 'loud'"):
        load(env=dict(env, EMITTERD_LOG_LEVEL="loud"))
    with pytest.raises(ConfigError, match="max_connections: expected an integer, got true"):
        load(write(tmp_path, "max_connections = true\n"), env=env)
    with pytest.raises(ConfigError, match="synchronous: expected a string, got 1"):
        load(write(tmp_path, "synchronous = 1\n"), env=env)
    with pytest.raises(ConfigError, match="^--metrics-listen: expected HOST:PORT"):
        load(flags={"metrics_listen": "9464"}, env=env)
    with pytest.raises(ConfigError, match="^--metrics-listen: expected HOST:PORT"):
        load(flags={"metrics_listen": "::1:9464"}, env=env)
    with pytest.raises(ConfigError, match="^--store-id: "):
        load(flags={"store_id": "a b"}, env=env)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name,value,message", [
    ("default_pool_size", "65", "must be between 1 and 64, got 65"),
    ("default_pool_size", "0", "must be between 1 and 64, got 0"),
    ("default_batch_size", "10001", "must be between 1 and 10000, got 10001"),
    ("default_max_in_flight", "0", "must be between 1 and 1000000, got 0"),
    ("default_ack_timeout", "0", "must be greater than 0, got 0.0"),
    ("default_max_retries", "-1", "must be between 0 and 1000000, got -1"),
    ("default_restart_period", "-5", "must be greater than 0, got -5.0"),
    ("default_retry_backoff", "0,1", "must be greater than 0, got 0.0"),
    ("checkpoint_interval", "2", "must be at most 1.0, got 2.0"),
    ("max_worker_rss", "-1", "must be at least 0, got -1"),
    ("max_publish_events", "0", "must be between 1 and 1000000, got 0"),
    ("drain_timeout", "-1", "must be at least 0, got -1.0"),
])
def test_range_errors_name_their_source(tmp_path, name, value, message):
    s = BY_NAME[name]
    env = base_env(tmp_path)
    with pytest.raises(ConfigError) as e:
        load(flags={name: value}, env=env)
    assert str(e.value) == "%s: %s" % (s.flag, message)
    with pytest.raises(ConfigError) as e:
        load(env=dict(env, **{s.env_var: value}))
    assert str(e.value) == "%s: %s" % (s.env_var, message)
    toml_value = "[%s]" % value if s.type == settings.FLOAT_PAIR else value
    path = write(tmp_path, "%s = %s\n" % (name, toml_value))
    with pytest.raises(ConfigError) as e:
        load(path, env=env)
    assert str(e.value) == "config file %s: %s: %s" % (path, name, message)


@pytest.mark.timeout(10)
def test_cross_checks_name_both_sources(tmp_path):
    env = base_env(tmp_path)
    path = write(tmp_path, "max_event_bytes = 200000\n")
    with pytest.raises(ConfigError) as e:
        load(path, {"max_frame_bytes": "100000"}, env=env)
    assert str(e.value) == ("config file %s: max_event_bytes: 200000 must be at most "
                            "max_frame_bytes - 4096 = 95904 (--max-frame-bytes)" % path)
    with pytest.raises(ConfigError, match="^EMITTERD_WORKER_TIMEOUT: 1.0 must be greater than "
                                          r"heartbeat_interval = 1.0 \(default heartbeat_interval\)"):
        load(env=dict(env, EMITTERD_WORKER_TIMEOUT="1"))
    with pytest.raises(ConfigError, match="^--output-buffer-bytes: 1048576 must be at least "
                                          "max_frame_bytes = 8388608"):
        load(flags={"output_buffer_bytes": "1048576"}, env=env)
    cfg = load(flags={"max_frame_bytes": "100000", "max_event_bytes": "95904"}, env=env)
    assert cfg.max_event_bytes == 95904


@pytest.mark.timeout(10)
def test_unknown_file_key_is_an_error(tmp_path):
    env = base_env(tmp_path)
    path = write(tmp_path, "max_frame_byte = 10\n")
    with pytest.raises(ConfigError) as e:
        load(path, env=env)
    assert str(e.value) == ("config file %s: max_frame_byte: unknown setting "
                            "(did you mean max_frame_bytes?)" % path)
    path = write(tmp_path, "[daemon]\nsocket = \"/x\"\n")
    with pytest.raises(ConfigError, match=r"\[daemon\]: settings are top-level keys"):
        load(path, env=env)
    path = write(tmp_path, "socket = \n")
    with pytest.raises(ConfigError, match="^config file .*: invalid TOML"):
        load(path, env=env)
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b"# caf\xe9\nlog_level = \"info\"\n")
    with pytest.raises(ConfigError, match="^config file .*: not UTF-8 text .* 0xe9 at offset 5"):
        load(str(latin1), env=env)
    missing = str(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="^config file %s: cannot read" % re.escape(missing)):
        load(missing, env=env)
    with pytest.raises(ConfigError, match="^--frobnicate: unknown setting"):
        load(flags={"frobnicate": "1"}, env=env)


@pytest.mark.timeout(10)
def test_unknown_environment_variables_only_warn(tmp_path):
    cfg = load(env=dict(base_env(tmp_path), EMITTERD_MAX_FRAME_BYTE="1", EMITTERD_CONFIG=""))
    assert cfg.max_frame_bytes == 8 * 1024 * 1024
    assert cfg.warnings == ["environment variable EMITTERD_MAX_FRAME_BYTE names no setting, "
                            "ignored (did you mean EMITTERD_MAX_FRAME_BYTES?)"]


@pytest.mark.timeout(10)
def test_a_file_value_that_the_environment_or_a_flag_overrides_is_named(tmp_path):
    """Editing the file and reloading would change nothing, with no word why (the unit's
    env file is the usual place for EMITTERD_ALLOW_UIDS)."""
    f = tmp_path / "c.toml"
    f.write_text("allow_uids = [65534]\nlog_level = \"debug\"\nmax_connections = 9\n")
    cfg = load(config_path=str(f), flags={"log_level": "info"},
               env=dict(base_env(tmp_path), EMITTERD_ALLOW_UIDS="1000"))
    assert cfg.allow_uids == [1000] and cfg.log_level == "info" and cfg.max_connections == 9
    assert cfg.warnings == [
        "config file %s sets allow_uids, but EMITTERD_ALLOW_UIDS overrides it (flags and the "
        "environment come first and are read at start only)" % f,
        "config file %s sets log_level, but --log-level overrides it (flags and the "
        "environment come first and are read at start only)" % f]
    reloaded, _, _ = cfg.reload(env=dict(base_env(tmp_path), EMITTERD_ALLOW_UIDS="1000"))
    assert len(reloaded.warnings) == 2


@pytest.mark.timeout(10)
def test_metrics_listen_not_loopback_warns(tmp_path):
    env = base_env(tmp_path)
    assert load(flags={"metrics_listen": "localhost:9464"}, env=env).warnings == []
    cfg = load(flags={"metrics_listen": "0.0.0.0:9464"}, env=env)
    assert "not a loopback address" in cfg.warnings[0]
    assert settings.parse_hostport("[::1]:9464") == ("::1", 9464)
    assert settings.parse_hostport("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert settings.parse_hostport("127.0.0.1:0") == ("127.0.0.1", 0)   # any free port
    with pytest.raises(ValueError):
        settings.parse_hostport("127.0.0.1:65536")


@pytest.mark.timeout(10)
def test_bool_type_parsing():
    s = settings.Setting("x", settings.BOOL, False, "a boolean for this test", "daemon", True)
    for raw, expected in (("yes", True), ("On", True), ("1", True), ("false", False),
                          ("0", False), ("off", False)):
        assert settings._coerce(s, raw, "env") is expected
    assert settings._coerce(s, True, "file") is True
    with pytest.raises(ValueError, match="expected true or false"):
        settings._coerce(s, "maybe", "env")
    with pytest.raises(ValueError, match="expected true or false"):
        settings._coerce(s, 1, "file")
    assert s.format(True) == "true" and s.toml(False) == "false"


# ---- diff, replace, reload ---------------------------------------------------------

@pytest.mark.timeout(10)
def test_diff_replace_and_as_dict(tmp_path):
    env = base_env(tmp_path)
    a = load(env=env)
    b = load(flags={"log_level": "debug", "allow_uids": "5"}, env=env)
    assert a.diff(b) == {"log_level": ("info", "debug"), "allow_uids": ([], [5])}
    assert a.diff(a) == {} and a == load(env=env)
    d = a.as_dict()
    assert list(d) == [s.name for s in SETTINGS]
    d["allow_uids"].append(1)             # a copy
    assert a.allow_uids == []
    c = a.replace(max_connections=3)
    assert c.max_connections == 3 and c.sources["max_connections"] == "flag"
    assert a.max_connections == 1024
    with pytest.raises(ConfigError, match="^--max-connections: must be between"):
        a.replace(max_connections=0)


@pytest.mark.timeout(10)
def test_reload_applies_only_reloadable_settings(tmp_path):
    env = base_env(tmp_path)
    path = tmp_path / "e.toml"
    path.write_text('log_level = "info"\nstore_id = "one"\n')
    cfg = load(str(path), {"max_connections": "5"}, env=env)
    path.write_text('log_level = "debug"\nstore_id = "two"\nmax_connections = 7\n'
                    'default_batch_size = 8\n')
    new, applied, pending = cfg.reload(env=env)
    assert applied == {"log_level": ("info", "debug"), "default_batch_size": (64, 8)}
    assert pending == {"store_id": ("one", "two")}
    assert new.log_level == "debug" and new.store_id == "one"
    assert new.max_connections == 5              # the flag still wins
    assert new.sources["default_batch_size"] == "file"
    path.write_text('worker_timeout = "x"\n')
    with pytest.raises(ConfigError, match="worker_timeout"):
        cfg.reload(env=env)


# ---- the example file and the docs ------------------------------------------------

@pytest.mark.timeout(10)
def test_example_toml_is_in_step_with_the_table():
    text = (REPO / "systemd" / "emitterd.toml").read_text(encoding="utf-8")
    assert text == settings.render_toml(), "run scripts/gen-config"


@pytest.mark.timeout(10)
def test_example_toml_loads_to_the_defaults(tmp_path):
    env = base_env(tmp_path)
    cfg = load(str(REPO / "systemd" / "emitterd.toml"), env=env)
    assert cfg.as_dict() == load(env=env).as_dict()
    assert set(cfg.sources.values()) == {"file"}
    data = tomllib.loads(settings.render_toml())
    assert list(data) == [s.name for s in SETTINGS]
    for s in SETTINGS:
        assert "# env %s, flag %s" % (s.env_var, s.flag) in settings.render_toml()


@pytest.mark.timeout(30)
def test_gen_config_check(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "gen-config"), "--check"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr


@pytest.mark.timeout(10)
def test_render_table_lists_every_setting(tmp_path):
    table = settings.render_table()
    for s in SETTINGS:
        assert re.search(r"^%s +\S+ +%s +[R-]$" % (s.name, s.env_var), table, re.M), s.name
    cfg = load(flags={"max_connections": "9"}, env=base_env(tmp_path))
    table = settings.render_table(cfg)
    assert re.search(r"^max_connections +9 \(flag\) +EMITTERD_MAX_CONNECTIONS", table, re.M)
    assert re.search(r"^socket_mode +0660 \(default\)", table, re.M)


# ---- the emitterd command -----------------------------------------------------------

def _cli_env(tmp_path) -> dict:
    return {"XDG_RUNTIME_DIR": str(tmp_path / "run"), "XDG_STATE_HOME": str(tmp_path / "state")}


@pytest.mark.timeout(20)
def test_cli_config_lists_every_setting(tmp_path):
    runner = CliRunner()
    r = runner.invoke(daemon_cmd.cli, ["config"], env=_cli_env(tmp_path))
    assert r.exit_code == 0, r.output
    assert r.stdout == settings.render_table()
    for s in SETTINGS:
        assert s.name in r.stdout and s.env_var in r.stdout
    r = runner.invoke(daemon_cmd.cli, ["config", "--toml"], env=_cli_env(tmp_path))
    assert r.exit_code == 0 and r.stdout == settings.render_toml()
    path = write(tmp_path, "max_subscriptions = 12\n")
    r = runner.invoke(daemon_cmd.cli, ["config", "--config", path],
                      env=dict(_cli_env(tmp_path), EMITTERD_STORE_ID="s1"))
    assert r.exit_code == 0, r.output
    assert re.search(r"^max_subscriptions +12 \(file\)", r.stdout, re.M)
    assert re.search(r"^store_id +s1 \(env\)", r.stdout, re.M)
    r = runner.invoke(daemon_cmd.cli, ["config", "--effective"],
                      env=dict(_cli_env(tmp_path), EMITTERD_MAX_CONNECTIONS="0"))
    assert r.exit_code == 2
    assert "EMITTERD_MAX_CONNECTIONS: must be between 1 and" in r.stderr


@pytest.mark.timeout(20)
def test_cli_run_help_lists_every_flag():
    r = CliRunner().invoke(daemon_cmd.cli, ["run", "--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    for s in SETTINGS:
        assert s.flag in r.stdout, s.flag
        assert s.env_var in r.stdout, s.env_var
    assert "--config FILE" in r.stdout
    assert "Subscription defaults:" in r.stdout and "Limits:" in r.stdout


@pytest.mark.timeout(20)
def test_cli_run_bad_value_exits_2(tmp_path, restore_logging):
    r = CliRunner().invoke(daemon_cmd.cli, ["run", "--max-frame-bytes", "abc"],
                           env=_cli_env(tmp_path))
    assert r.exit_code == 2
    assert "--max-frame-bytes: expected an integer, got 'abc'" in r.stderr
    path = write(tmp_path, "nope = 1\n")
    r = CliRunner().invoke(daemon_cmd.cli, ["run", "--config", path], env=_cli_env(tmp_path))
    assert r.exit_code == 2 and "nope: unknown setting" in r.stderr


@pytest.mark.timeout(20)
def test_cli_run_hands_the_config_to_the_daemon(tmp_path, monkeypatch, restore_logging):
    seen = {}

    def fake_run(cfg):
        seen["cfg"] = cfg
        logs.get("daemon").info("fake daemon ran", pid=1)
        return 7

    monkeypatch.setitem(sys.modules, "emitterd.daemon",
                        types.SimpleNamespace(run=fake_run, __name__="emitterd.daemon"))
    path = write(tmp_path, "max_publish_events = 50\n")
    r = CliRunner().invoke(
        daemon_cmd.cli,
        ["run", "--config", path, "--socket", str(tmp_path / "s.sock"), "--allow-uids",
         "1000,1001", "--socket-mode", "0600", "--log-level", "debug", "--store-id", "st"],
        env=dict(_cli_env(tmp_path), EMITTERD_DEFAULT_POOL_SIZE="3", EMITTERD_BOGUS="1"))
    assert r.exit_code == 7, r.output
    cfg = seen["cfg"]
    assert cfg.socket == str(tmp_path / "s.sock") and cfg.allow_uids == [1000, 1001]
    assert cfg.socket_mode == 0o600 and cfg.store_id == "st" and cfg.log_level == "debug"
    assert cfg.max_publish_events == 50 and cfg.default_pool_size == 3
    assert cfg.sources["max_publish_events"] == "file"
    assert cfg.sources["default_pool_size"] == "env" and cfg.sources["socket"] == "flag"
    assert "EMITTERD_BOGUS names no setting" in r.stderr
    assert "fake daemon ran pid=1" in r.stderr


@pytest.mark.timeout(20)
def test_cli_version():
    r = CliRunner().invoke(daemon_cmd.cli, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == "emitterd %s" % settings_version()


def settings_version() -> str:
    import emitterd
    return emitterd.__version__


def _subprocess_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("EMITTERD_", "JOURNAL_STREAM", "NOTIFY_SOCKET", "LISTEN_"))}
    env.update(_cli_env(tmp_path))
    env["COLUMNS"] = "200"
    return env


@pytest.mark.timeout(60)
@pytest.mark.skipif(not EMITTERD_BIN.exists(), reason="emitterd console script not installed")
def test_installed_command(tmp_path):
    env = _subprocess_env(tmp_path)

    def run(*args, **kw):
        return subprocess.run([str(EMITTERD_BIN), *args], capture_output=True, text=True,
                              env=kw.get("env", env), timeout=30)

    r = run("config")
    assert r.returncode == 0, r.stderr
    for s in SETTINGS:
        assert re.search(r"^%s +\S+ +%s " % (s.name, s.env_var), r.stdout, re.M), s.name
    r = run("run", "--help")
    assert r.returncode == 0, r.stderr
    for s in SETTINGS:
        assert s.flag in r.stdout and s.env_var in r.stdout, s.name
    r = run("config", "--toml")
    assert r.returncode == 0 and r.stdout == settings.render_toml()
    # with a file, --toml writes the effective values (it printed the defaults, ignoring it)
    mine = tmp_path / "mine.toml"
    mine.write_text("max_connections = 77\n")
    r = run("config", "--config", str(mine), "--toml")
    assert r.returncode == 0, r.stderr
    assert "\nmax_connections = 77\n" in r.stdout and "effective value" in r.stdout
    again = tmp_path / "again.toml"
    again.write_text(r.stdout)
    cfg = load(env=_subprocess_env(tmp_path), config_path=str(again))
    assert cfg.max_connections == 77 and cfg.sources["max_connections"] == "file"
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == "emitterd " + settings_version()
    r = run("run", "--default-pool-size", "65")
    assert r.returncode == 2
    assert r.stderr.strip() == "emitterd: --default-pool-size: must be between 1 and 64, got 65"
    r = run("run", env=dict(env, EMITTERD_SOCKET_MODE="0x1"))
    assert r.returncode == 2 and "EMITTERD_SOCKET_MODE: expected an octal mode" in r.stderr


# ---- logs ----------------------------------------------------------------------------

@pytest.mark.timeout(10)
def test_log_text_format(restore_logging):
    out = io.StringIO()
    logs.configure("info", "text", stream=out, journal=False)
    log = logs.get("pool")
    log.info("worker started", pool="p 1", pid=42)
    log.debug("hidden")
    log.warning("odd", note='say "hi"')
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(Z|[+-]\d\d:\d\d) INFO emitterd\.pool: "
                        r'worker started pool="p 1" pid=42', lines[0]), lines[0]
    assert lines[1].endswith('WARNING emitterd.pool: odd note="say \\"hi\\""')
    logs.set_level("debug")
    log.debug("shown now")
    assert out.getvalue().splitlines()[-1].endswith("DEBUG emitterd.pool: shown now")
    logs.set_level("error")
    log.warning("hidden again")
    assert len(out.getvalue().splitlines()) == 3
    with pytest.raises(ValueError):
        logs.set_level("loud")
    with pytest.raises(ValueError):
        logs.configure("info", "xml", stream=out)


@pytest.mark.timeout(10)
def test_log_json_format(restore_logging):
    out = io.StringIO()
    logs.configure("debug", "json", stream=out, journal=False)
    logs.get("x").debug("hello", n=1, path=Path("/p"), raw=b"\x00")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logs.get("x").exception("failed", op="start")
    first, second = [json.loads(line) for line in out.getvalue().splitlines()]
    assert set(first) == {"ts", "level", "logger", "msg", "fields"}
    assert first["level"] == "debug" and first["logger"] == "emitterd.x"
    assert first["msg"] == "hello" and first["fields"] == {"n": 1, "path": "/p", "raw": "b'\\x00'"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", first["ts"])
    assert second["level"] == "error" and "RuntimeError: boom" in second["exc"]


@pytest.mark.timeout(10)
def test_log_journal_prefix(restore_logging):
    out = io.StringIO()
    logs.configure("debug", "text", stream=out, journal=True)
    log = logs.get("j")
    log.debug("d")
    log.info("i", k="v")
    log.warning("w")
    log.error("e")
    try:
        raise ValueError("bad")
    except ValueError:
        log.exception("x")
    lines = out.getvalue().splitlines()
    assert lines[:4] == ["<7>emitterd.j: d", "<6>emitterd.j: i k=v", "<4>emitterd.j: w",
                         "<3>emitterd.j: e"]
    assert all(line.startswith("<3>") for line in lines[4:]) and len(lines) > 5
    out = io.StringIO()
    logs.configure("info", "json", stream=out, journal=True)
    log.info("i")
    line = out.getvalue()
    assert line.startswith("<6>{") and json.loads(line[3:])["msg"] == "i"


_JOURNAL_CHILD = """
import os, sys
from emitterd import logs
st = os.fstat(2)
if sys.argv[1] == "match":
    os.environ["JOURNAL_STREAM"] = "%d:%d" % (st.st_dev, st.st_ino)
else:
    os.environ["JOURNAL_STREAM"] = "%d:%d" % (st.st_dev, st.st_ino + 1)
logs.configure("info", "text")
logs.get("t").warning("hello", a=1)
"""


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode,expected", [("match", "<4>emitterd.t: hello a=1\n"),
                                           ("other", None)])
def test_log_journal_detected_from_journal_stream(tmp_path, mode, expected):
    """JOURNAL_STREAM counts only when it names stderr's device:inode (systemd.exec(5))."""
    log_path = tmp_path / "err.log"
    with open(log_path, "w") as err:
        r = subprocess.run([sys.executable, "-c", _JOURNAL_CHILD, mode], stderr=err,
                           env=_subprocess_env(tmp_path), timeout=20)
    assert r.returncode == 0
    text = log_path.read_text()
    if expected is not None:
        assert text == expected
    else:
        assert re.fullmatch(r"\S+ WARNING emitterd\.t: hello a=1\n", text), text


def _unit_environment() -> dict:
    """The Environment= assignments of systemd/emitterd.service."""
    env = {}
    with open(REPO / "systemd" / "emitterd.service") as f:
        for line in f:
            m = re.match(r"^Environment=(.*)$", line.strip())
            if m:
                for item in shlex.split(m.group(1)):
                    k, _, v = item.partition("=")
                    env[k] = v
    return env


@pytest.mark.timeout(10)
def test_example_config_under_the_unit_gives_no_warnings() -> None:
    """The shipped example config, installed as the README and install-systemd say, under the
    shipped unit's environment: every start and every reload warns that the file's `socket` and
    `data_dir` are overridden (the unit sets EMITTERD_SOCKET and EMITTERD_DATA_DIR), although
    the operator changed nothing."""
    env = _unit_environment()
    assert env.get("EMITTERD_SOCKET") and env.get("EMITTERD_DATA_DIR")
    # what `install -m 0640 -g emitterd .../emitterd.toml.example /etc/emitterd/emitterd.toml`
    # plus EMITTERD_CONFIG=/etc/emitterd/emitterd.toml in emitterd.env give the daemon
    env["EMITTERD_CONFIG"] = str(REPO / "systemd" / "emitterd.toml")
    cfg = settings.load(env=env)
    assert cfg.warnings == [], cfg.warnings


_LONG_RUNTIME = "/run/user/1000/" + "d" * 80       # the default socket path is > 107 bytes
_LONG_ENV = {"XDG_RUNTIME_DIR": _LONG_RUNTIME, "HOME": "/root"}


@pytest.mark.timeout(10)
def test_the_example_file_does_not_refuse_a_socket_flag_when_the_default_is_too_long() -> None:
    """A config file key left at its built-in default (the shipped example file has every key so)
    "asks for nothing" (README), yet since the override check in settings.load() it is resolved
    as a file value even when a flag overrides it: `socket = ""` resolves to the *default* socket
    path from the environment, and when that default is too long for sun_path (a long
    XDG_RUNTIME_DIR: the very reason to give --socket) the daemon refuses to start, blaming
    "config file ...: socket" for a value the file does not hold. The same flags without the file,
    or the same file before this change, start fine."""
    # without a file the flag is all that counts
    assert settings.load(None, {"socket": "/tmp/short.sock"}, _LONG_ENV).socket == "/tmp/short.sock"
    # the shipped example restates the defaults (socket = ""): it must not change that
    cfg = settings.load(str(REPO / "systemd" / "emitterd.toml"), {"socket": "/tmp/short.sock"}, _LONG_ENV)
    assert cfg.socket == "/tmp/short.sock"


@pytest.mark.timeout(10)
def test_a_default_socket_key_under_a_flag_is_not_blamed_on_the_file(tmp_path: Path) -> None:
    path = tmp_path / "emitterd.toml"
    path.write_text('socket = ""\ndefault_batch_size = 5\n')
    cfg = settings.load(str(path), {"socket": "/tmp/short.sock"}, _LONG_ENV)
    assert (cfg.socket, cfg.default_batch_size) == ("/tmp/short.sock", 5)
