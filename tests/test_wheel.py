"""The distribution as operators get it: a wheel built from this tree, installed (not editable) into a fresh
venv, runs `undo-proxy db upgrade` from anywhere, because the migrations ship inside it."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("undo_proxy", "verbs", "storage", "migrations")


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "UNDO_PROXY_CONFIG", "VIRTUAL_ENV", "PYTHONHOME")}


def sh(*args: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build from a copy of the working tree, so the build leaves no build/ or egg-info in the repo."""
    src = tmp_path_factory.mktemp("src") / "undo-proxy"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "*.pyc", "build", "dist", "*.egg-info", ".pytest_cache", ".hypothesis", ".venv"))
    out = tmp_path_factory.mktemp("dist")
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, src, cwd=out)
    [built] = out.glob("undo_proxy-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed; its dependencies come from the package index."""
    root = tmp_path_factory.mktemp("venv") / "v"
    sh(sys.executable, "-m", "venv", root, cwd=root.parent)
    sh(root / "bin" / "pip", "install", "-q", "--disable-pip-version-check", wheel, cwd=root.parent)
    return root


def test_wheel_ships_code_migrations_and_data(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
        metadata = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    expected = {str(p.relative_to(REPO)) for pkg in PACKAGES for p in (REPO / pkg).rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    assert {"migrations/env.py", "migrations/script.py.mako", "migrations/versions/0001_initial.py"} <= expected
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"
    assert not any(n.startswith("tests/") for n in names)
    assert "undo-proxy = undo_proxy.cli:main" in entry_points
    assert "Name: undo-proxy" in metadata


def test_installed_wheel_upgrades_the_database_from_anywhere(venv: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    cfg = site / "undo-proxy.toml"
    cfg.write_text(
        f'[state]\ndir = "{site / "state"}"\n\n'
        f'[snapshots]\nbackend = "copy"\nvolume = "{site / "data"}"\nstore = "{site / "snaps"}"\n\n'
        '[admin]\ntoken = "0123456789abcdef"\n')
    elsewhere = tmp_path / "elsewhere"  # neither the repo nor the config's directory
    elsewhere.mkdir()

    # The code really comes from the venv, not from this checkout.
    where = sh(venv / "bin" / "python", "-c",
               "import json, migrations, storage.db, undo_proxy; "
               "print(json.dumps([m.__file__ for m in (migrations, storage.db, undo_proxy)]))", cwd=elsewhere)
    for path in json.loads(where.stdout):
        assert Path(path).resolve().is_relative_to(venv.resolve()), path
        assert not Path(path).resolve().is_relative_to(REPO), path
    assert not list((venv / "lib").glob("python*/site-packages/__editable__*"))

    result = sh(venv / "bin" / "undo-proxy", "-c", cfg, "db", "upgrade", cwd=elsewhere)
    assert "revision" in result.stderr
    with sqlite3.connect(site / "state" / "timeline.db") as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        revision = conn.execute("SELECT version_num FROM alembic_version").fetchone()[0]
    assert {"verbs", "blobs", "snapshots", "cycles", "inconsistencies"} <= tables
    head = sh(venv / "bin" / "python", "-c", "from storage.db import head_revision; "
              "print(head_revision('sqlite://'))", cwd=elsewhere).stdout.strip()
    assert revision == head

    sh(venv / "bin" / "undo-proxy", "-c", cfg, "db", "upgrade", cwd=elsewhere)  # idempotent
    status = sh(venv / "bin" / "undo-proxy", "-c", cfg, "status", "--json", cwd=elsewhere)
    assert json.loads(status.stdout)["mode"] == "live"
