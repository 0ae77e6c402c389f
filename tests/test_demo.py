"""`undo-proxy demo` end to end: as root on btrfs, and as an ordinary user with the copy backend."""
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

UNDO_PROXY = str(Path(sys.executable).with_name("undo-proxy"))


def run_demo(workdir: Path, user: str | None = None) -> subprocess.CompletedProcess:
    argv = [UNDO_PROXY, "demo", "--workdir", str(workdir)]
    if user:
        argv = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", "--reset-env", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd="/")


def check_summary(out: str) -> None:
    assert "all checks hold" in out, out
    replayed = int(re.search(r"verbs replayed:\s+(\d+) \(skipped (\d+) bad verbs", out).group(1))
    skipped = int(re.search(r"skipped (\d+) bad verbs", out).group(1))
    inconsistencies = int(re.search(r"inconsistencies:\s+(\d+)", out).group(1))
    mail = re.search(r"verified:\s+(\d+)/(\d+) messages present exactly once; (\d+)/(\d+) documents right", out)
    assert replayed > 100 and skipped == 12 and inconsistencies > 0
    assert mail and mail.group(1) == mail.group(2) and mail.group(3) == mail.group(4), out
    assert int(mail.group(2)) >= 300


def no_leftovers(workdir: Path) -> None:
    mounts = Path("/proc/mounts").read_text()
    assert str(workdir) not in mounts
    ps = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True)
    assert ps.stdout.strip() == "", ps.stdout


def test_demo_as_root_on_btrfs_with_postfix():
    base = Path(tempfile.mkdtemp(prefix="undo-demo-root-"))  # Postfix's users must be able to enter it
    os.chmod(base, 0o755)
    workdir = base / "demo"
    try:
        res = run_demo(workdir)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "btrfs subvolume on a loop-mounted" in res.stdout
    assert "mail backend: Postfix (a private instance" in res.stdout  # .ci/install-deps.sh installs it
    check_summary(res.stdout)
    no_leftovers(workdir)


def test_demo_in_a_private_directory_falls_back_to_the_embedded_mta(tmp_path):
    res = run_demo(tmp_path / "demo")  # pytest's tmp dirs are root-only: Postfix could not deliver there
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "embedded aiosmtpd MTA" in res.stdout and "not searchable by others" in res.stdout
    check_summary(res.stdout)
    no_leftovers(tmp_path / "demo")


def test_demo_as_an_ordinary_user_uses_the_copy_backend():
    base = Path(tempfile.mkdtemp(prefix="undo-demo-user-"))  # pytest's tmp dirs are root-only
    os.chmod(base, 0o777)
    workdir = base / "demo"
    try:
        res = run_demo(workdir, user="nobody")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "copy backend" in res.stdout and "not running as root" in res.stdout
    check_summary(res.stdout)
    no_leftovers(workdir)
