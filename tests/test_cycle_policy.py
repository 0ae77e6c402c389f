"""What a cancelled cycle found describes a history that was thrown away: it is never compensated."""
import json
import time
import urllib.request


def http(stack, method: str, path: str, data: bytes | None = None) -> int:
    req = urllib.request.Request(stack.url + path, data=data, method=method)
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def seq_of(stack, verb: str, target: str) -> int:
    for _ in range(50):  # reads are recorded in batches
        seqs = [v["seq"] for v in stack.timeline() if v["verb"] == verb and target in v["targets"]]
        if seqs:
            return seqs[-1]
        time.sleep(0.1)
    raise AssertionError(f"no {verb} {target}")


def test_a_cancelled_cycles_findings_are_not_compensated(proxy_stack):
    stack = proxy_stack()
    assert http(stack, "PUT", "/a.txt", b"alpha") == 201
    stack.cli_json("snapshot", "take", "--label", "known good")
    assert http(stack, "DELETE", "/a.txt") == 204
    assert http(stack, "GET", "/a.txt") == 404
    bad = seq_of(stack, "webdav.delete", "/a.txt")
    seq_of(stack, "webdav.get", "/a.txt")
    stack.cli("rewind", "--to", "known good", "--yes")  # a label names a snapshot too
    cycle = stack.cli_json("replay", "--skip", str(bad))
    assert cycle["inconsistencies"] == 1
    stack.cli("cancel")
    [item] = stack.cli_json("inconsistencies", "--cycle", str(cycle["id"]))
    assert item["compensation"] == "none"
    assert stack.cli_json("compensate", "--all") == []
    refused = stack.cli("compensate", str(item["id"]), check=False)
    assert refused.returncode == 1 and "cancelled" in refused.stderr
    assert json.loads(stack.cli("inconsistencies", "--json").stdout)[0]["compensation"] == "none"


def test_a_snapshot_taken_but_never_recorded_is_removed_at_start(proxy_stack):
    """A kill between the snapshot and its record leaves a directory the timeline does not know, and the
    marker `take` wrote before it: that one goes. A directory without the marker may be another timeline's
    (a moved state dir, a second instance on the same store): it stays. One on record whose directory went
    is named in the log."""
    stack = proxy_stack()
    known = stack.cli_json("snapshot", "take")
    gone = stack.cli_json("snapshot", "take")
    orphan = stack.store / "20200101T000000Z"
    orphan.mkdir()
    (orphan / "x").write_text("x")
    (stack.store / ".taking-20200101T000000Z").touch()
    stranger = stack.store / "20200102T000000Z"
    stranger.mkdir()
    (stranger / "y").write_text("y")
    (stack.store / gone["id"]).rename(stack.store / ".moved-away")
    stack.restart()
    assert not orphan.exists()
    assert not (stack.store / ".taking-20200101T000000Z").exists()
    assert (stranger / "y").read_text() == "y"
    assert (stack.store / known["id"]).is_dir()
    log = stack.log_text()
    assert "removed snapshot 20200101T000000Z: taken, but never recorded" in log
    assert "does not know (20200102T000000Z): left alone" in log
    assert f"missing from the store {stack.store} ({gone['id']})" in log
    assert not list(stack.store.glob(".taking-*")), "a recorded snapshot keeps no marker"
    assert stack.cli_json("status")["daemon"] == "running"
    listing = stack.cli("snapshot", "list").stdout
    assert f"{gone['id']}" in listing and "missing from the store" in listing
    refused = stack.cli("rewind", "--to", gone["id"], "--yes", check=False)
    assert refused.returncode == 1 and "missing" in refused.stderr
    assert stack.api("GET", "/api/cycles") == (200, []), "a rewind that could not start leaves no cycle"


def test_a_snapshot_is_deleted_by_its_id_or_by_a_label_only_it_carries(proxy_stack):
    stack = proxy_stack()
    first, second = (stack.cli_json("snapshot", "take", "--label", "twice") for _ in range(2))
    once = stack.cli_json("snapshot", "take", "--label", "once")
    ambiguous = stack.cli("snapshot", "delete", "twice", check=False)
    assert ambiguous.returncode == 2 and "2 snapshots are labelled 'twice'" in ambiguous.stderr
    stack.cli("snapshot", "delete", "once")
    assert not (stack.store / once["id"]).exists()
    stack.cli("snapshot", "delete", first["id"])
    stack.cli("snapshot", "delete", "twice")        # now only one carries it
    assert stack.cli_json("snapshot", "list") == []
    assert not (stack.store / second["id"]).exists()
    unknown = stack.cli("snapshot", "delete", "no such label", check=False)
    assert unknown.returncode == 1 and "no snapshot has the id or label 'no such label'" in unknown.stderr
