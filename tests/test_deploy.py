"""docker-compose.yml: parses (with `docker compose config` where the client has compose), and its
services, ports and mounts agree with the undo-proxy config it mounts."""
import shutil
import subprocess
import tomllib
from pathlib import Path

import yaml

from undo_proxy.config import parse_config

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_docker_compose_config_accepts_it():
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        res = subprocess.run(["docker", "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                             capture_output=True, text=True, cwd=ROOT)
        assert res.returncode == 0, res.stderr
    doc = compose()
    assert set(doc["services"]) == {"undo-proxy", "webdav", "postfix", "timeline"}
    for name, svc in doc["services"].items():
        assert "image" in svc or "build" in svc, name


def test_services_and_ports_agree_with_the_mounted_config(monkeypatch):
    doc = compose()
    proxy = doc["services"]["undo-proxy"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in proxy["volumes"]}
    assert mounts["/etc/undo-proxy/undo-proxy.toml"] == "./deploy/undo-proxy.toml"
    assert proxy["environment"]["UNDO_PROXY_CONFIG"] == "/etc/undo-proxy/undo-proxy.toml"
    monkeypatch.setenv("UNDO_PROXY_ADMIN_TOKEN", "a-token-for-the-test")
    cfg = parse_config(ROOT / "deploy" / "undo-proxy.toml",
                       tomllib.loads((ROOT / "deploy" / "undo-proxy.toml").read_text()))
    published = {p.rsplit(":", 1)[1]: p for p in proxy["ports"]}
    # every listener of the config is published, the admin one on the host's loopback only
    assert str(cfg.admin.listen.port) in published and published[str(cfg.admin.listen.port)].startswith("127.0.0.1:")
    for fe in cfg.http + cfg.smtp:
        assert str(fe.listen.port) in published, fe.name
    # upstreams are services of the file, on the ports those services expose
    web = cfg.http[0].upstream.removeprefix("http://").split(":")
    assert web[0] == "webdav" and web[1] in doc["services"]["webdav"]["expose"]
    assert cfg.smtp[0].upstream.host == "postfix" and str(cfg.smtp[0].upstream.port) in doc["services"]["postfix"]["expose"]
    assert "@timeline:" in cfg.timeline_url and "timeline" in proxy["depends_on"]
    # the volume and store lie on the one host btrfs path every service mounts whole
    root = "/srv/undo"
    assert str(cfg.snapshots.volume).startswith(root + "/") and str(cfg.snapshots.store).startswith(root + "/")
    for name in ("undo-proxy", "webdav", "postfix"):
        assert any(v.endswith(f":{root}") for v in doc["services"][name]["volumes"]), name
    assert not str(cfg.state.dir).startswith(root)
    # the backends' data paths go through the volume's mount point
    assert f"--root {cfg.snapshots.volume}/dav" in " ".join(doc["services"]["webdav"]["command"])
    postfix_cf = (ROOT / "deploy" / "postfix" / "main.cf.append").read_text()
    assert f"virtual_mailbox_base = {cfg.snapshots.volume}/mail" in postfix_cf
