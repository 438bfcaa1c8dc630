"""The `emitterd` command: `run` (the daemon, in the foreground) and `config` (PROTOCOL §6, §7),
and `backup` / `restore` of the event log (emitterd.backup).

Every flag of `emitterd run` is generated from emitterd.settings.SETTINGS; the
flags take strings and hand them to settings.load() untouched, so a bad value
gets the same message (naming the flag) as a bad environment variable or
file key, and exit status 2.
"""
import sys
from typing import Any, Optional

import click

from emitterd import __version__, logs, settings

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _SectionedCommand(click.Command):
    """A command whose --help lists its options by settings section."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        groups: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                section = getattr(param, "emitterd_section", "options")
                groups.setdefault(section, []).append(record)
        for section, records in groups.items():
            with formatter.section(section[:1].upper() + section[1:]):
                formatter.write_dl(records)


def _flag_help(s: settings.Setting) -> str:
    default = s.format(s.default) or '""'
    return "%s  [default: %s; env: %s%s]" % (s.help, default, s.env_var,
                                              "; reloadable" if s.reloadable else "")


def _setting_options() -> list:
    params = []
    for s in settings.SETTINGS:
        if s.type == settings.BOOL:
            opt = click.Option(["%s/--no-%s" % (s.flag, s.flag[2:]), s.name], default=None,
                               help=_flag_help(s))
        else:
            # type=str on purpose: settings.load() parses and validates (one set of rules)
            opt = click.Option([s.flag, s.name], type=str, default=None,
                               metavar=s.flag_metavar, help=_flag_help(s))
        opt.emitterd_section = s.section  # type: ignore[attr-defined]
        params.append(opt)
    return params


def _config_option() -> click.Option:
    opt = click.Option(["--config", "config_path"], type=str, default=None, metavar="FILE",
                       help="TOML config file (top-level keys as in `emitterd config`); "
                            "default $EMITTERD_CONFIG, else none.")
    opt.emitterd_section = "general"  # type: ignore[attr-defined]
    return opt


def _load(config_path: Optional[str], flags: dict) -> settings.Config:
    try:
        return settings.load(config_path, flags)
    except settings.ConfigError as e:
        # under journald the "<3>" makes it an error entry (`journalctl -p err` shows why)
        click.echo("%semitterd: %s" % ("<3>" if logs.journal_stream_matches(sys.stderr) else "",
                                        e), err=True)
        sys.exit(2)


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="emitterd",
                      message="%(prog)s %(version)s")
def cli() -> None:
    """emitterd: local event-delivery daemon (durable log, supervised pools of worker
    processes). `emitterd run` starts it; `emitterctl` talks to it."""


def _run(config_path: Optional[str], **flags: Any) -> None:
    cfg = _load(config_path, flags)
    logs.configure(cfg.log_level, cfg.log_format)
    log = logs.get("config")
    for warning in cfg.warnings:
        log.warning(warning)
    log.debug("settings loaded", config=cfg.config_path or "",
              non_default=",".join(n for n, src in cfg.sources.items() if src != "default"))
    from emitterd.daemon import run  # lazily: `emitterd config` must not import the daemon
    sys.exit(run(cfg))


run_command = _SectionedCommand(
    "run", callback=_run, context_settings=CONTEXT,
    params=[_config_option()] + _setting_options(),
    help="Run the daemon in the foreground (logs on stderr).\n\n"
         "Every setting can be given as a flag, an EMITTERD_<NAME> environment variable or a "
         "key of the --config file; precedence: flag, then environment, then file, then "
         "built-in default. Lists are comma-separated (--allow-uids 1000,1001); "
         "--socket-mode is octal (0660). `emitterd config` lists every setting.",
    short_help="Run the daemon in the foreground.")
cli.add_command(run_command)


@cli.command("config", context_settings=CONTEXT)
@click.option("--config", "config_path", type=str, default=None, metavar="FILE",
              help="Also read this TOML file and show the effective values and their sources.")
@click.option("--effective", is_flag=True,
              help="Show effective values (flags aside): environment, $EMITTERD_CONFIG or "
                   "--config file, defaults.")
@click.option("--toml", "as_toml", is_flag=True,
              help="Print a config file: every setting at its default, or with --config / "
                   "--effective at its effective value.")
def config_command(config_path: Optional[str], effective: bool, as_toml: bool) -> None:
    """Print every setting: its default, environment variable and help."""
    if as_toml and config_path is None and not effective:
        click.echo(settings.render_toml(), nl=False)
        return
    if config_path is not None or effective:
        cfg = _load(config_path, {})
        click.echo(settings.render_toml(cfg) if as_toml else settings.render_table(cfg),
                   nl=False)
        for warning in cfg.warnings:
            click.echo("emitterd: warning: %s" % warning, err=True)
        return
    click.echo(settings.render_table(), nl=False)


def _data_dir_options(f: Any) -> Any:
    f = click.option("--data-dir", "data_dir", type=str, default=None, metavar="DIR",
                     help="Data directory; default: the daemon's, found as `emitterd run` "
                          "does ($EMITTERD_DATA_DIR, then data_dir in the --config file, "
                          "else the built-in default).")(f)
    return click.option("--config", "config_path", type=str, default=None, metavar="FILE",
                        help="TOML config file the daemon runs with (for its data_dir); "
                             "default $EMITTERD_CONFIG, else none.")(f)


def _mib(n: int) -> str:
    return "%.1f MiB" % (n / (1 << 20))


@cli.command("backup", context_settings=CONTEXT,
             short_help="Copy the event log to a new file, while the daemon runs or not.")
@click.argument("dest", metavar="DEST")
@_data_dir_options
def backup_command(dest: str, config_path: Optional[str], data_dir: Optional[str]) -> None:
    """Copy the event log (events, subscriptions with their checkpoints, parked events) to
    the new file DEST, as of one commit, while the daemon runs or not.

    Copying the data directory's files with cp while the daemon runs gives a damaged log;
    this does not. DEST gets mode 0600 and is on disk (fsynced) when the command exits 0.
    `emitterd restore DEST` puts it back. Exit status: 0 done, 1 failed (nothing written),
    2 usage error.
    """
    from emitterd import backup
    if not dest.strip():
        raise click.BadParameter("an empty path (an unset variable?)", param_hint="DEST")
    cfg = _load(config_path, {"data_dir": data_dir})
    try:
        info = backup.backup(cfg.data_dir, dest)
    except backup.BackupError as e:
        click.echo("emitterd: %s" % e, err=True)
        sys.exit(1)
    click.echo("backed up %s to %s: head %d, %d subscription(s), %s"
               % (cfg.data_dir, dest, info["head"], info["subscriptions"], _mib(info["bytes"])))


@cli.command("restore", context_settings=CONTEXT,
             short_help="Make a backup the event log again (the daemon stopped).")
@click.argument("source", metavar="BACKUP")
@_data_dir_options
def restore_command(source: str, config_path: Optional[str], data_dir: Optional[str]) -> None:
    """Make BACKUP (made by `emitterd backup`) the event log of the data directory. The
    daemon must be stopped: the directory's lock is taken first.

    The log already there is moved into a replaced-<time> directory inside it, never
    deleted. Events published after the backup are not in it, and their positions are given
    out again; ids the daemon generates are not (a restore draws a new id salt). Subscribers
    that remember positions past the backup's head must be told. Exit status: 0 done,
    1 failed (the data directory unchanged, or its old log in the directory named), 2 usage
    error.
    """
    from emitterd import backup
    cfg = _load(config_path, {"data_dir": data_dir})
    try:
        info = backup.restore(source, cfg.data_dir)
    except backup.BackupError as e:
        click.echo("emitterd: %s" % e, err=True)
        sys.exit(1)
    click.echo("restored %s into %s: head %d, %d subscription(s)"
               % (source, cfg.data_dir, info["head"], info["subscriptions"]))
    if info["replaced"]:
        click.echo("the log it replaced is in %s" % info["replaced"])


def main(argv: Optional[list] = None) -> Any:
    """Entry point of the `emitterd` console script."""
    return cli.main(args=argv, prog_name="emitterd")


if __name__ == "__main__":
    main()
