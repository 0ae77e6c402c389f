"""The one TOML config file: loading and validation (undo_proxy/config.py), and how the `undo-proxy` command
finds it and reports its errors (exit 2, one line on stderr naming the file and the key)."""
from __future__ import annotations

import copy
import json
import os
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from undo_proxy.config import ConfigError, load_config, parse_duration, parse_host_port

UNDO_PROXY = str(Path(sys.executable).parent / "undo-proxy")


def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "UNDO_PROXY_CONFIG"}
    return subprocess.run([UNDO_PROXY, *args], cwd=cwd, env={**base, **(env or {})}, capture_output=True,
                          text=True, timeout=120)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string for the plain text used here
    raise TypeError(v)


def to_toml(doc: dict[str, Any]) -> str:
    """Just enough TOML writing for these tests: scalars, tables, arrays of tables."""
    lines = [f"{k} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, (dict, list))]
    for k, v in doc.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {toml_value(vv)}" for kk, vv in v.items()]
        elif isinstance(v, list):
            for table in v:
                lines += ["", f"[[{k}]]"] + [f"{kk} = {toml_value(vv)}" for kk, vv in table.items()]
    return "\n".join(lines) + "\n"


BASE: dict[str, Any] = {
    "state": {"dir": "state"},
    "snapshots": {"backend": "copy", "volume": "data", "store": "snaps", "every": "15m", "every_verbs": 0,
                  "keep": 5},
    "admin": {"listen": "127.0.0.1:8700", "token": "0123456789abcdef"},
    "http": [{"name": "web", "listen": "127.0.0.1:8080", "upstream": "http://127.0.0.1:8081", "verbs": "webdav"}],
}


def config(**changes: Any) -> dict[str, Any]:
    """BASE with changes: 'section.key' = value sets, = DELETE removes; 'http0.key' is in the first [[http]]."""
    doc = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *where, key = dotted.split(".")
        table = doc
        for part in where:
            table = table["http"][int(part[4:])] if part.startswith("http") and part[4:].isdigit() else table[part]
        if value is DELETE:
            del table[key]
        else:
            table[key] = value
    return doc


DELETE = object()


def test_base_config_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "undo-proxy.toml"
    path.write_text(to_toml(BASE))
    cfg = load_config(path)
    assert cfg.state.dir == tmp_path / "state"  # relative paths are relative to the config file
    assert cfg.timeline_url == f"sqlite:///{tmp_path / 'state' / 'timeline.db'}"
    assert cfg.snapshots.volume == tmp_path / "data" and cfg.snapshots.store == tmp_path / "snaps"
    assert (cfg.snapshots.every, cfg.snapshots.keep, cfg.snapshots.backend) == (900.0, 5, "copy")
    assert (str(cfg.admin.listen), cfg.admin.token) == ("127.0.0.1:8700", "0123456789abcdef")
    [web] = cfg.http
    assert (web.name, str(web.listen), web.upstream, web.verbs) == ("web", "127.0.0.1:8080",
                                                                     "http://127.0.0.1:8081", "webdav")


# Each bad config: (the TOML text, what the one error line must name besides the file).
BAD_CONFIGS: dict[str, tuple[str, str]] = {
    "unknown top-level key": (to_toml(config(bogus=1)), "bogus"),
    "unknown section": (to_toml({**config(), "snapshot": {"keep": 3}}), "snapshot"),
    "unknown key in a section": (to_toml(config(**{"snapshots.kep": 3})), "snapshots.kep"),
    "unknown key in [[http]]": (to_toml(config(**{"http0.upstreem": "http://127.0.0.1:1"})), "http[0].upstreem"),
    "unknown key in the second [[http]]": (
        to_toml({**config(), "http": BASE["http"] + [{"name": "b", "listen": "127.0.0.1:8090",
                                                       "upstream": "http://127.0.0.1:8091", "colour": "red"}]}),
        "http[1].colour"),
    "keep is a string": (to_toml(config(**{"snapshots.keep": "many"})), "snapshots.keep"),
    "keep is a float": (to_toml(config(**{"snapshots.keep": 4.5})), "snapshots.keep"),
    "keep is a boolean": (to_toml(config(**{"snapshots.keep": True})), "snapshots.keep"),
    "keep is negative": (to_toml(config(**{"snapshots.keep": -1})), "snapshots.keep"),
    "every is a number": (to_toml(config(**{"snapshots.every": 5})), "snapshots.every"),
    "every is not a duration": (to_toml(config(**{"snapshots.every": "soon"})), "snapshots.every"),
    "every has an unknown unit": (to_toml(config(**{"snapshots.every": "15 fortnights"})), "snapshots.every"),
    "every is negative": (to_toml(config(**{"snapshots.every": "-5m"})), "snapshots.every"),
    "http timeout is not a duration": (to_toml(config(**{"http0.timeout": "1 minute"})), "http[0].timeout"),
    "state dir inside the volume": (to_toml(config(**{"state.dir": "data/undo"})), "state.dir"),
    "state dir is the volume": (to_toml(config(**{"state.dir": "data"})), "state.dir"),
    "snapshot store inside the volume": (to_toml(config(**{"snapshots.store": "data/.snaps"})), "snapshots.store"),
    "unknown snapshot backend": (to_toml(config(**{"snapshots.backend": "zfs"})), "snapshots.backend"),
    "listen is nonsense": (to_toml(config(**{"admin.listen": "nonsense"})), "admin.listen"),
    "listen port out of range": (to_toml(config(**{"http0.listen": "1.2.3.4:99999"})), "http[0].listen"),
    "listen port zero": (to_toml(config(**{"http0.listen": "127.0.0.1:0"})), "http[0].listen"),
    "listen IPv6 literal is not hex": (to_toml(config(**{"http0.listen": "[zz]:80"})), "http[0].listen"),
    "listen IPv4 in brackets": (to_toml(config(**{"admin.listen": "[1.2.3.4]:80"})), "admin.listen"),
    "listen without port": (to_toml(config(**{"admin.listen": "127.0.0.1"})), "admin.listen"),
    "listen IPv4 octet out of range": (to_toml(config(**{"http0.listen": "999.1.1.1:8080"})), "http[0].listen"),
    "listen IPv4 too short": (to_toml(config(**{"http0.listen": "10.1:8080"})), "http[0].listen"),
    "listen host label ends in a dash": (to_toml(config(**{"admin.listen": "host-.example:80"})), "admin.listen"),
    "listen is a number": (to_toml(config(**{"admin.listen": 8700})), "admin.listen"),
    "duplicate listen": (to_toml(config(**{"http0.listen": "127.0.0.1:8700"})), "http[0].listen"),
    "duplicate front-end name": (
        to_toml({**config(), "http": BASE["http"] + [{**BASE["http"][0], "listen": "127.0.0.1:8090"}]}),
        "http[1].name"),
    "upstream is not http": (to_toml(config(**{"http0.upstream": "ftp://127.0.0.1/"})), "http[0].upstream"),
    "upstream is not a URL": (to_toml(config(**{"http0.upstream": "localhost:8081"})), "http[0].upstream"),
    "upstream without host": (to_toml(config(**{"http0.upstream": "http://"})), "http[0].upstream"),
    "upstream port out of range": (to_toml(config(**{"http0.upstream": "http://h:99999"})), "http[0].upstream"),
    "missing upstream": (to_toml(config(**{"http0.upstream": DELETE})), "http[0].upstream"),
    "missing listen": (to_toml(config(**{"http0.listen": DELETE})), "http[0].listen"),
    "bad verbs pack name": (to_toml(config(**{"http0.verbs": "no such/pack"})), "http[0].verbs"),
    "unknown built-in verbs pack": (to_toml(config(**{"http0.verbs": "nosuch"})), "http[0].verbs"),
    "timeline url is not a database URL": (to_toml({**config(), "timeline": {"url": "mysql://x/y"}}), "timeline.url"),
    "token too short": (to_toml(config(**{"admin.token": "short"})), "admin.token"),
    "token and token_file": (to_toml(config(**{"admin.token_file": "tok"})), "admin.token_file"),
    "section is not a table": ('state = "x"\n' + to_toml({k: v for k, v in config().items() if k != "state"}),
                               "state"),
    "http is a table, not an array": (
        to_toml({k: v for k, v in config().items() if k != "http"}) + '\n[http]\nlisten = "127.0.0.1:1"\n', "http"),
    "not TOML at all": ("[state\ndir = \n", ""),
}


# The kinds of mistakes run through the real command (every one is also checked in process below).
CLI_CASES = [
    "unknown top-level key", "unknown key in a section", "unknown key in [[http]]", "keep is a string",
    "every is a number", "every is not a duration", "state dir inside the volume", "listen is nonsense",
    "listen port out of range", "listen IPv6 literal is not hex", "duplicate listen", "upstream is not http",
    "missing upstream", "unknown built-in verbs pack", "not TOML at all",
]


@pytest.fixture(scope="module")
def bad_config_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Run `undo-proxy -c FILE status` on each CLI case, several at once (each start costs about a second)."""
    jobs = {}
    for i, name in enumerate(CLI_CASES):
        directory = tmp_path_factory.mktemp(f"bad{i}")
        path = directory / "undo-proxy.toml"
        path.write_text(BAD_CONFIGS[name][0])
        jobs[name] = (directory, path)
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run, "-c", str(path), "status", cwd=directory)
                   for name, (directory, path) in jobs.items()}
        return {name: (jobs[name][1], fut.result()) for name, fut in futures.items()}


@pytest.mark.parametrize("case", CLI_CASES)
def test_bad_config_is_one_line_naming_file_and_key_exit_2(
        case: str, bad_config_runs: dict[str, tuple[Path, subprocess.CompletedProcess]]) -> None:
    path, result = bad_config_runs[case]
    key = BAD_CONFIGS[case][1]
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.endswith("\n") and result.stderr.count("\n") == 1, result.stderr
    assert str(path) in result.stderr
    assert key in result.stderr, f"{key!r} not named in {result.stderr!r}"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_raises_config_error_in_process(case: str, tmp_path: Path) -> None:
    path = tmp_path / "undo-proxy.toml"
    path.write_text(BAD_CONFIGS[case][0])
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: ") and BAD_CONFIGS[case][1] in message


def test_wrong_type_message_says_what_was_expected(tmp_path: Path) -> None:
    path = tmp_path / "undo-proxy.toml"
    path.write_text(to_toml(config(**{"snapshots.keep": "many"})))
    with pytest.raises(ConfigError, match=r"snapshots\.keep: must be an integer, not str 'many'"):
        load_config(path)
    path.write_text(to_toml(config(**{"snapshots.every": 5})))
    with pytest.raises(ConfigError, match=r"snapshots\.every: must be a string, not int 5"):
        load_config(path)


def test_missing_config_file_exit_2(tmp_path: Path) -> None:
    result = run("-c", str(tmp_path / "nope.toml"), "status", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and str(tmp_path / "nope.toml") in result.stderr


@pytest.mark.parametrize("args", [("timeline", "--limit", "-1"), ("timeline", "--after", "x"),
                                  ("show", "-3"), ("compensate", "1", "-2"), ("show", str(10**23)),
                                  ("timeline", "--cycle", str(1 << 63))])
def test_counts_and_ids_must_be_whole_numbers_exit_2(args: tuple[str, ...], tmp_path: Path) -> None:
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert any(why in result.stderr for why in ("is negative", "is not a whole number", "is too large")), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("target", ["@x", "@", "@-3", "@1.5", " "])
def test_a_malformed_rewind_target_is_a_usage_error_even_with_the_daemon_stopped(target: str, tmp_path: Path) -> None:
    run("init", str(tmp_path), cwd=tmp_path)
    result = run("-c", str(tmp_path / "undo-proxy.toml"), "rewind", "--to", target, "--yes", cwd=tmp_path)
    assert result.returncode == 2 and "@SEQ" in result.stderr, result.stderr


@pytest.mark.parametrize("text,seconds", [
    ("90s", 90.0), ("15m", 900.0), ("2h", 7200.0), ("0", 0.0), ("1d", 86400.0), ("250ms", 0.25),
    ("1.5h", 5400.0), ("45", 45.0), (" 10m ", 600.0),
])
def test_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "15 minutes", "-5m", "m", "5x", "1h30m", "1e3s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_durations_in_the_config(tmp_path: Path) -> None:
    path = tmp_path / "undo-proxy.toml"
    for text, seconds in (("90s", 90.0), ("15m", 900.0), ("2h", 7200.0), ("0", 0.0)):
        path.write_text(to_toml(config(**{"snapshots.every": text, "http0.timeout": text})))
        cfg = load_config(path)
        assert cfg.snapshots.every == seconds and cfg.http[0].timeout == seconds


@pytest.mark.parametrize("text,host,port", [
    ("127.0.0.1:8080", "127.0.0.1", 8080), ("[::1]:8080", "::1", 8080), ("localhost:25", "localhost", 25),
    ("0.0.0.0:65535", "0.0.0.0", 65535), ("mail.example.org:1", "mail.example.org", 1),
])
def test_listen_addresses_parse(text: str, host: str, port: int) -> None:
    hp = parse_host_port(text)
    assert (hp.host, hp.port) == (host, port)
    assert str(hp) == text


# --- undo-proxy init ---------------------------------------------------------------------------------
def test_init_writes_a_sample_that_loads_and_upgrades(tmp_path: Path) -> None:
    target = tmp_path / "site"
    result = run("init", str(target), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    path = target / "undo-proxy.toml"
    assert path.stat().st_mode & 0o777 == 0o600  # it holds the admin token
    text = path.read_text()
    assert text.lstrip().startswith("#")  # commented

    cfg = load_config(path)  # loads as is
    assert cfg.state.dir == target / "state"
    assert (cfg.snapshots.volume, cfg.snapshots.store) == (target / "data", target / "snapshots")
    assert len(cfg.admin.token) >= 16 and cfg.admin.token in text
    assert cfg.http and cfg.http[0].verbs == "webdav"

    result = run("-c", str(path), "db", "upgrade", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    db = target / "state" / "timeline.db"
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"verbs", "snapshots", "cycles", "inconsistencies", "blobs", "alembic_version"} <= tables

    status = run("-c", str(path), "status", "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout) == {**json.loads(status.stdout), "mode": "live", "cycle": None,
                                         "last_seq": 0, "snapshots": 0, "daemon": "not running"}
    assert "daemon: not running" in run("-c", str(path), "status", cwd=tmp_path).stdout

    again = run("init", str(target), cwd=tmp_path)
    assert again.returncode == 1 and "exists" in again.stderr
    assert path.read_text() == text  # not overwritten


def test_every_commented_setting_of_the_sample_is_valid_toml_once_uncommented() -> None:
    """An operator uncomments one setting at a time (or a whole commented-out table with its settings): the
    file must still parse, e.g. a quoted command inside a string."""
    import re
    import tomllib
    from undo_proxy.config import sample_config
    lines = sample_config(Path("/srv/site"), "t" * 24).splitlines()
    setting, header = re.compile(r"# [a-z_]+ = "), re.compile(r"# \[")
    tries: list[list[int]] = []       # the lines to uncomment together
    block: list[int] | None = None    # a commented-out table being collected
    for i, line in enumerate(lines):
        if header.match(line):
            block = [i]
            tries.append(block)
        elif block is not None and setting.match(line):
            block.append(i)
        elif setting.match(line):
            tries.append([i])
        elif not line.startswith("#"):
            block = None
    assert len(tries) > 10 and sum(len(t) > 5 for t in tries) == 2   # [[smtp]] and [[imap]]
    for together in tries:
        tried = [line[2:] if i in together else line for i, line in enumerate(lines)]
        try:
            tomllib.loads("\n".join(tried))
        except tomllib.TOMLDecodeError as exc:
            raise AssertionError(f"uncommented, {lines[together[0]]!r} is not TOML: {exc}") from None


def test_init_without_dir_writes_into_the_current_directory(tmp_path: Path) -> None:
    result = run("init", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert load_config(tmp_path / "undo-proxy.toml").state.dir == tmp_path / "state"


# --- where the config is found -----------------------------------------------------------------------
def test_config_found_via_option_then_env_then_cwd(tmp_path: Path) -> None:
    dirs = {name: tmp_path / name for name in ("option", "env", "cwd")}
    for d in dirs.values():
        d.mkdir()
        (d / "undo-proxy.toml").write_text(to_toml(config()))
    option, env, cwd = (dirs[n] / "undo-proxy.toml" for n in ("option", "env", "cwd"))

    def upgraded() -> set[str]:
        return {n for n, d in dirs.items() if (d / "state" / "timeline.db").exists()}

    with ThreadPoolExecutor(max_workers=3) as pool:
        # A missing file wherever it is looked for is an error naming that file: so the order shows.
        missing = tmp_path / "missing.toml"
        by_option = pool.submit(run, "-c", str(missing), "status", cwd=dirs["cwd"],
                                env={"UNDO_PROXY_CONFIG": str(env)})
        by_long_option = pool.submit(run, "--config", str(missing), "status", cwd=dirs["cwd"],
                                     env={"UNDO_PROXY_CONFIG": str(env)})
        by_env = pool.submit(run, "status", cwd=dirs["cwd"], env={"UNDO_PROXY_CONFIG": str(missing)})
        for fut in (by_option, by_long_option, by_env):
            result = fut.result()
            assert result.returncode == 2 and str(missing) in result.stderr, result.stderr

    assert run("-c", str(option), "db", "upgrade", cwd=dirs["cwd"],
               env={"UNDO_PROXY_CONFIG": str(env)}).returncode == 0
    assert upgraded() == {"option"}
    assert run("db", "upgrade", cwd=dirs["cwd"], env={"UNDO_PROXY_CONFIG": str(env)}).returncode == 0
    assert upgraded() == {"option", "env"}
    assert run("db", "upgrade", cwd=dirs["cwd"]).returncode == 0
    assert upgraded() == {"option", "env", "cwd"}

    nowhere = run("status", cwd=tmp_path)  # no option, no env, no ./undo-proxy.toml
    assert nowhere.returncode == 2 and "undo-proxy.toml" in nowhere.stderr
    assert nowhere.stderr.count("\n") == 1


def test_option_after_the_subcommand_works_too(tmp_path: Path) -> None:
    path = tmp_path / "undo-proxy.toml"
    path.write_text(to_toml(config()))
    result = run("db", "upgrade", "-c", str(path), cwd=Path("/"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "state" / "timeline.db").exists()


def test_a_misspelt_required_key_is_named_as_typed(tmp_path):
    cfg = tmp_path / "undo-proxy.toml"
    cfg.write_text('[admin]\ntoken = "0123456789"\n[[http]]\nlisten = "127.0.0.1:8080"\nupstrem = "http://x:1"\n')
    with pytest.raises(ConfigError, match=r"http\[0\]\.upstrem: unknown key"):
        load_config(cfg)
    cfg.write_text('[admn]\ntoken = "0123456789"\n')
    with pytest.raises(ConfigError, match=r": admn: unknown key"):
        load_config(cfg)


def test_serve_names_the_key_of_a_volume_that_is_not_there_or_a_listen_address_that_cannot_be(tmp_path: Path) -> None:
    """What only serve can find out: exit 2 and the key when the config is at fault, exit 1 when the
    machine is (a port somebody else holds)."""
    import socket
    (tmp_path / "snaps").mkdir()

    def serve(**changes: Any) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "undo-proxy.toml"
        path.write_text(to_toml(config(**changes)))
        assert run("-c", str(path), "db", "upgrade", cwd=tmp_path).returncode == 0
        return run("-c", str(path), "serve", cwd=tmp_path)

    no_volume = serve()
    assert no_volume.returncode == 2 and "snapshots.volume" in no_volume.stderr and "does not exist" in no_volume.stderr
    (tmp_path / "data").mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        unresolvable = serve(**{"http0.listen": f"no-such-host.invalid:{port + 1}", "admin.listen": f"127.0.0.1:{port + 2}"})
        assert unresolvable.returncode == 2, unresolvable.stderr
        assert "http[0].listen" in unresolvable.stderr and "cannot resolve" in unresolvable.stderr
        in_use = serve(**{"http0.listen": f"127.0.0.1:{port}", "admin.listen": f"127.0.0.1:{port + 2}"})
        assert in_use.returncode == 1 and "http[0].listen: cannot listen on" in in_use.stderr, in_use.stderr
