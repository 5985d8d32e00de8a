"""User-study server and analysis defects of issue #16 (section 2): one test per defect.

Blinding (only the builder's public files are served), participant codes that cannot be taken over,
a database that cannot be written stopping the start, CSV formula cells, request bodies that broke
the parser, chunked bodies, stalled clients, and rows the analysis must refuse.
"""

from __future__ import annotations

import csv
import http.client
import io
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest

import userstudy.server as server_mod
from userstudy import CRITERION_KEYS, CSV_COLUMNS, csv_quote, csv_unquote
from userstudy.analyze import load_answers, preference_table
from userstudy.analyze import main as analyze_main
from userstudy.build import build_site, load_side
from userstudy.server import StudyConfig, create_app, init_db, make_study_server, release_code
from userstudy.server import main as serve_main

TOKEN = "tok"
LEFT = dict.fromkeys(CRITERION_KEYS, "left")
RIGHT = dict.fromkeys(CRITERION_KEYS, "right")


def write_fake_video(path: Path, tag: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(f"not a real mp4: {tag}".encode())


def make_site(root: Path, prompts: tuple[str, ...] = ("a panda", "a goat"), ours: str = "ours",
              base: str = "base") -> tuple[Path, dict]:
    """A small site of fake videos under root/site (fast: nothing is decoded)."""
    for i, prompt in enumerate(prompts):
        write_fake_video(root / "ours" / f"{prompt.replace(' ', '_')}.mp4", f"o{i}")
        write_fake_video(root / "base" / f"{prompt.replace(' ', '_')}.mp4", f"b{i}")
    manifest = build_site(load_side(root / "ours", ours), [load_side(root / "base", base)], root / "site", seed=0)
    return root / "site", manifest


@pytest.fixture()
def env(tmp_path: Path) -> dict:
    site, manifest = make_site(tmp_path)
    db = tmp_path / "answers.sqlite"
    app = create_app(StudyConfig(site=site, db=db, export_token=TOKEN, secret_key="k"))
    return {"app": app, "site": site, "db": db, "manifest": manifest, "cid": next(iter(manifest["comparisons"]))}


@pytest.fixture()
def live(env: dict) -> Iterator[dict]:
    """The env's site on a real loopback server with a 1 s socket timeout (for the stalled-client test)."""
    server = make_study_server(StudyConfig(site=env["site"], db=env["db"], export_token=TOKEN, secret_key="k"),
                               "127.0.0.1", 0, request_timeout_s=1.0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {**env, "port": server.server_port}
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def raw_get(port: int, path: str) -> tuple[int, bytes]:
    """GET `path` sent byte for byte (http.client does not normalise it)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def stored(db: Path) -> list[tuple[str, str, str, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT rater_id, comparison_id, criterion, choice FROM answers "
                            "ORDER BY rater_id, comparison_id, criterion").fetchall()


def no_server_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `main` fail loudly instead of serving forever if a bad --db got past the checks."""
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the server started although --db is unusable")
    monkeypatch.setattr(server_mod, "make_server", refuse)


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------------
# Blinding: only the files the builder wrote for raters


MANIFEST_SPELLINGS = ["/manifest.json", "/manifest.json/", "/%2e/manifest.json", "/./manifest.json",
                      "//manifest.json", "/videos/../manifest.json", "/static/%2e%2e/manifest.json",
                      "/%6danifest.json", "/MANIFEST.JSON", "/manifest.json%00", "/%2fmanifest.json",
                      "/manifest.json?x=1", "/manifest.json%20", "/.%2fmanifest.json"]


def test_manifest_is_not_served_under_any_spelling(live: dict) -> None:
    secret = (live["site"] / "manifest.json").read_bytes()
    for path in MANIFEST_SPELLINGS:
        status, body = raw_get(live["port"], path)
        assert status in (403, 404), (path, status)
        assert b"comparisons" not in body and b"source" not in body and secret not in body, path
    assert raw_get(live["port"], "/")[0] == 200  # the site itself still works
    assert raw_get(live["port"], "/" + live["manifest"]["comparisons"][live["cid"]]["page"])[0] == 200


def test_only_the_builders_public_files_are_served(env: dict, tmp_path: Path) -> None:
    site: Path = env["site"]
    public = env["manifest"]["public_files"]
    assert "manifest.json" not in public and "index.html" in public and "static/study.js" in public
    client = env["app"].test_client()
    for name in public:
        assert client.get("/" + name).status_code == 200, name
    outside = tmp_path / "outside.txt"
    outside.write_text("TOP-SECRET")
    (site / "notes.txt").write_text("TOP-SECRET")  # a stray file in the site folder, not built
    (site / "link.txt").symlink_to(outside)
    video = site / public[-1]
    video.unlink()
    video.symlink_to(outside)  # a listed name that now points out of the site
    for path in ("/notes.txt", "/link.txt", "/" + public[-1]):
        r = client.get(path)
        assert r.status_code == 404 and b"TOP-SECRET" not in r.data, path


def test_site_without_public_files_list_is_refused(env: dict, tmp_path: Path) -> None:
    manifest = dict(env["manifest"])
    del manifest["public_files"]
    (env["site"] / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="public_files.*--overwrite"):
        create_app(StudyConfig(site=env["site"], db=tmp_path / "x.sqlite", export_token=TOKEN))


def test_db_inside_the_site_is_refused(env: dict, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    no_server_start(monkeypatch)
    for db in (env["site"] / "answers.sqlite", env["site"] / "videos" / "a.sqlite"):
        assert serve_main([str(env["site"]), "--db", str(db), "--port", "0"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert str(db) in line and "inside the site folder" in line
        assert not db.exists()


# ------------------------------------------------------------------------------------------------
# Participant codes belong to the first browser that claims them


def test_participant_code_cannot_be_taken_over(env: dict, capsys: pytest.CaptureFixture[str]) -> None:
    app, db, cid = env["app"], env["db"], env["cid"]
    first = app.test_client()
    assert first.post("/api/session", json={"rater_id": "alice"}).status_code == 200
    assert first.post("/api/answers", json={"rater_id": "alice", "comparison_id": cid,
                                            "answers": LEFT}).status_code == 200
    before = stored(db)

    intruder = app.test_client()  # a fresh browser typing alice's code
    r = intruder.post("/api/session", json={"rater_id": "alice"})
    assert r.status_code == 409 and "already in use" in r.get_json()["error"]
    r = intruder.post("/api/answers", json={"rater_id": "alice", "comparison_id": cid, "answers": RIGHT})
    assert r.status_code == 403  # no session: nothing written
    assert stored(db) == before

    # The owner's browser may claim its code again (e.g. back on the first page).
    assert first.post("/api/session", json={"rater_id": "alice"}).get_json() == {"rater_id": "alice"}
    assert first.post("/api/session", json={}).get_json() == {"rater_id": "alice"}

    # The researcher reissues the code: the old browser loses it, a new one may take it over.
    assert serve_main([str(env["site"]), "--db", str(db), "--release-code", "alice"]) == 0
    assert "released participant code 'alice' (5 answers kept)" in capsys.readouterr().out
    r = first.post("/api/answers", json={"rater_id": "alice", "comparison_id": cid, "answers": RIGHT})
    assert r.status_code == 409 and "no longer held" in r.get_json()["error"]
    assert intruder.post("/api/session", json={"rater_id": "alice"}).status_code == 200
    assert intruder.post("/api/answers", json={"rater_id": "alice", "comparison_id": cid,
                                               "answers": RIGHT}).status_code == 200
    assert {row[3] for row in stored(db)} == {"right"}
    assert first.post("/api/session", json={"rater_id": "alice"}).status_code == 409

    assert serve_main([str(env["site"]), "--db", str(db), "--release-code", "nobody"]) == 2
    assert "no rater has participant code 'nobody'" in one_error_line(capsys.readouterr().err)


def test_session_key_is_kept_in_the_database(env: dict) -> None:
    # Without --secret-key the key is stored in the db, so a restart keeps the browser's claim on its code
    # (with a fresh random key every restart, raters would be locked out of their own codes).
    config = StudyConfig(site=env["site"], db=env["db"], export_token=TOKEN)
    client = create_app(config).test_client()
    assert client.post("/api/session", json={"rater_id": "bob"}).status_code == 200
    cookie = client.get_cookie("session")
    restarted = create_app(config).test_client()
    restarted.set_cookie("session", cookie.value)
    r = restarted.post("/api/answers", json={"rater_id": "bob", "comparison_id": env["cid"], "answers": LEFT})
    assert r.status_code == 200, r.get_json()
    with sqlite3.connect(env["db"]) as conn:
        assert len(conn.execute("SELECT value FROM meta WHERE key = 'secret_key'").fetchone()[0]) == 64


def test_release_of_an_unknown_database_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        release_code(tmp_path / "none.sqlite", "alice")
    with pytest.raises(ValueError, match="not a participant code"):
        release_code(tmp_path / "none.sqlite", "alice\n")


# ------------------------------------------------------------------------------------------------
# A database that cannot be written stops the start with one line


@pytest.mark.parametrize("case", ["folder", "missing_folder", "not_sqlite"])
def test_unusable_db_path_is_one_line(env: dict, tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    no_server_start(monkeypatch)
    if case == "folder":
        db = tmp_path / "dbdir"
        db.mkdir()
        expected = "is a folder"
    elif case == "missing_folder":
        db = tmp_path / "no" / "such" / "answers.sqlite"
        expected = "does not exist; create it"
    else:
        db = tmp_path / "notes.sqlite"
        db.write_text("these are notes, not a database\n" * 50)
        expected = "is not an SQLite database"
    assert serve_main([str(env["site"]), "--db", str(db), "--port", "0"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(db) in line and expected in line
    if case == "not_sqlite":
        assert db.read_text().startswith("these are notes")  # left as it was


def run_unprivileged(fn: Callable[[], str]) -> str:
    """`fn()` in a forked child that cannot write what its user does not own; returns what fn returned.

    Tests run as root here, and root writes read-only files anyway (chmod does not stop it), so as root
    the child drops to user `nobody`: then file permissions apply exactly as to a server run by a user.
    """
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status = 1
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            result = fn()
            os.write(write_end, result.encode())
            status = 0
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the test
            os.write(write_end, f"child raised {type(exc).__name__}: {exc}".encode())
        finally:
            os._exit(status)
    os.close(write_end)
    deadline = time.monotonic() + 60
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the unprivileged child did not finish in 60 s")
        time.sleep(0.05)
    with os.fdopen(read_end, "rb") as fh:
        return fh.read().decode()


@pytest.fixture()
def shared_dir() -> Iterator[Path]:
    """A folder the unprivileged child can write (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="userstudy-ro-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def readable_site(root: Path) -> Path:
    """A site under `root` that the unprivileged child can read whatever the umask."""
    site, _ = make_site(root)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return site


def serve_main_in_child(site: Path, db: Path) -> Callable[[], str]:
    def run() -> str:
        server_mod.make_server = lambda *a, **k: sys.exit("the server started although --db is read-only")
        sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
        rc = serve_main([str(site), "--db", str(db), "--port", "0"])
        return json.dumps({"rc": rc, "err": sys.stderr.getvalue()})
    return run


def test_read_only_db_stops_the_start(shared_dir: Path) -> None:
    site = readable_site(shared_dir)
    db = shared_dir / "answers.sqlite"
    init_db(db)  # an existing database with the tables, then made read-only
    db.chmod(0o444)
    output = run_unprivileged(serve_main_in_child(site, db))
    assert output.startswith("{"), output
    result = json.loads(output)
    assert result["rc"] == 2
    line = one_error_line(result["err"])
    assert str(db) in line and "cannot be written" in line and "chmod" in line


def test_read_only_wal_and_shm_after_a_permission_flip_stop_the_start(shared_dir: Path) -> None:
    # The db file stays writable for the server's user, but its -wal/-shm files are not (as after
    # `chmod a-w answers.sqlite*` while the server ran, undone for the db file only, or a run as another
    # user): every write fails, also after a restart. The start must say so and name those files.
    site = readable_site(shared_dir)
    db = shared_dir / "answers.sqlite"
    init_db(db)
    holder = sqlite3.connect(db)  # an open connection keeps -wal/-shm on disk, as a killed server leaves them
    try:
        holder.execute("INSERT INTO meta (key, value) VALUES ('x', 'y')")
        holder.commit()
        wal, shm = Path(f"{db}-wal"), Path(f"{db}-shm")
        assert wal.exists() and shm.exists()
        if os.geteuid() == 0:
            os.chown(db, 65534, 65534)  # the server's user owns the db; root keeps -wal/-shm
        wal.chmod(0o444)
        shm.chmod(0o444)
        output = run_unprivileged(serve_main_in_child(site, db))
    finally:
        holder.close()
    assert output.startswith("{"), output
    result = json.loads(output)
    assert result["rc"] == 2
    line = one_error_line(result["err"])
    assert "cannot be written" in line and f"{db}-wal" in line and f"{db}-shm" in line


# ------------------------------------------------------------------------------------------------
# Request bodies


def test_export_neutralises_formula_cells(tmp_path: Path) -> None:
    site, manifest = make_site(tmp_path, prompts=("=HYPERLINK(x)", "@SUM(A1)"), ours="+ours", base="-base")
    db = tmp_path / "a.sqlite"
    app = create_app(StudyConfig(site=site, db=db, export_token=TOKEN, secret_key="k"))
    client = app.test_client()
    assert client.post("/api/session", json={"rater_id": "-rater"}).status_code == 200
    for cid in manifest["comparisons"]:
        assert client.post("/api/answers", json={"rater_id": "-rater", "comparison_id": cid,
                                                 "answers": LEFT}).status_code == 200
    text = client.get(f"/export.csv?token={TOKEN}").get_data(as_text=True)
    table = list(csv.reader(io.StringIO(text)))
    assert tuple(table[0]) == CSV_COLUMNS and len(table) == 1 + 2 * 5
    for row in table[1:]:
        assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in row), row
        assert row[0] == "'-rater" and row[2] in ("'=HYPERLINK(x)", "'@SUM(A1)")
        assert {row[3], row[4]} == {"'+ours", "'-base"}
    path = tmp_path / "answers.csv"
    path.write_text(text)
    answers = load_answers(path, manifest)  # the analysis reads the original values back
    assert set(answers["rater_id"]) == {"-rater"} and set(answers["left_method"]) <= {"+ours", "-base"}
    res = preference_table(answers, "+ours")
    assert list(res["baseline"].unique()) == ["-base"] and res["total"].tolist() == [2] * 5


@pytest.mark.parametrize("cell", ["=1+1", "+1", "-1", "@x", "\tx", "\rx", "'", "'=x", "''", "plain", "", "a=b"])
def test_csv_quote_round_trips(cell: str) -> None:
    quoted = csv_quote(cell)
    assert not quoted.startswith(("=", "+", "-", "@", "\t", "\r"))
    assert csv_unquote(quoted) == cell


BAD_SESSION_BODIES = [
    (json.dumps({"rater_id": "alice\n"}), "rater_id must be"),
    ('{"rater_id": ' + "9" * 5000 + "}", "malformed JSON"),  # past Python's int-digit limit: was a 500
    ("[" * 5000 + "]" * 5000, "malformed JSON"),  # deeper than the parser's stack: was a 500
    ('{"a":' * 2500 + "1" + "}" * 2500, "malformed JSON"),
]


@pytest.mark.parametrize("body,message", BAD_SESSION_BODIES)
def test_hostile_session_bodies_are_400(env: dict, body: str, message: str) -> None:
    r = env["app"].test_client().post("/api/session", data=body, content_type="application/json")
    assert r.status_code == 400 and message in r.get_json()["error"]
    with sqlite3.connect(env["db"]) as conn:
        assert conn.execute("SELECT COUNT(*) FROM raters").fetchone()[0] == 0


def post_chunked(port: int, path: str, chunks: list[bytes], headers: dict[str, str] | None = None
                 ) -> tuple[int, dict, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body=iter(chunks), encode_chunked=True,
                     headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}"), dict(resp.getheaders())
    finally:
        conn.close()


def test_chunked_body_keeps_the_participant_code(live: dict) -> None:
    body = json.dumps({"rater_id": "chunky"}).encode()
    status, data, headers = post_chunked(live["port"], "/api/session", [body[:7], body[7:]])
    assert status == 200 and data == {"rater_id": "chunky"}
    cookie = headers["Set-Cookie"].split(";")[0]
    answer = json.dumps({"rater_id": "chunky", "comparison_id": live["cid"], "answers": LEFT}).encode()
    status, data, _ = post_chunked(live["port"], "/api/answers", [answer[:20], answer[20:]], {"Cookie": cookie})
    assert status == 200 and data["stored"] == 5
    assert {row[0] for row in stored(live["db"])} == {"chunky"}
    # The 16 KiB limit holds for chunked bodies too (werkzeug alone would cut the body at the limit and
    # accept the valid JSON in front).
    status, data, _ = post_chunked(live["port"], "/api/session", [b'{"rater_id": "big"}'] + [b" " * 4096] * 5)
    assert status == 413 and "larger than" in data["error"]


def test_stalled_client_is_disconnected(live: dict) -> None:
    # The live server's socket timeout is 1 s: a client that stops sending loses its connection soon after.
    stalls = [
        b"POST /api/session HTTP/1.1\r\nHost: x\r\n",  # headers never finished
        b"POST /api/session HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{\"rater_id\"",  # body never finished
    ]
    for request in stalls:
        with socket.create_connection(("127.0.0.1", live["port"]), timeout=10) as sock:
            start = time.monotonic()
            sock.sendall(request)
            received = b""
            while chunk := sock.recv(4096):  # b"" once the server closes the connection
                received += chunk
            elapsed = time.monotonic() - start
        assert elapsed < 5, (request, elapsed)
        if received:
            assert received.startswith(b"HTTP/1.1 408 "), received[:80]
    with sqlite3.connect(live["db"]) as conn:
        assert conn.execute("SELECT COUNT(*) FROM raters").fetchone()[0] == 0


# ------------------------------------------------------------------------------------------------
# Analysis refuses rows it cannot attribute


def table(rows: list[tuple[str, str, str, str]]) -> pd.DataFrame:
    """(rater, comparison, left, right) -> all five criteria answered 'left'."""
    return pd.DataFrame([[r, c, f"prompt {c}", left, right, k, "left"] for r, c, left, right in rows
                         for k in CRITERION_KEYS], columns=list(CSV_COLUMNS))


def test_analysis_rejects_contradicting_sides_and_empty_ids() -> None:
    good = table([("r1", "c1", "ours", "B"), ("r2", "c1", "ours", "B")])
    assert preference_table(good, "ours")["votes_for"].tolist() == [2] * 5
    swapped = table([("r1", "c1", "ours", "B"), ("r2", "c1", "B", "ours")])
    with pytest.raises(ValueError, match=r"row 6 \(line 7 of the CSV: rater 'r2'.*contradict row 1"):
        preference_table(swapped, "ours")
    empty = table([("r1", "c1", "ours", "B"), ("", "c1", "ours", "B")])
    with pytest.raises(ValueError, match=r"row 6 .*empty rater_id"):
        preference_table(empty, "ours")
    manifest = {"comparisons": {"c1": {"prompt": "prompt c1", "left": {"method": "B"},
                                       "right": {"method": "ours"}}}}
    with pytest.raises(ValueError, match=r"row 1 .*contradict the manifest's \('prompt c1', 'B', 'ours'\)"):
        preference_table(good, "ours", manifest=manifest)
    manifest["comparisons"]["c1"]["left"], manifest["comparisons"]["c1"]["right"] = {"method": "ours"}, {"method": "B"}
    assert len(preference_table(good, "ours", manifest=manifest)) == 5
    with pytest.raises(ValueError, match="comparison 'c2' is not in the manifest"):
        preference_table(table([("r1", "c2", "ours", "B")]), "ours", manifest=manifest)


def test_analyze_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert analyze_main([str(tmp_path), "--method", "ours"]) == 2
    assert "is a folder" in one_error_line(capsys.readouterr().err)
    path = tmp_path / "answers.csv"
    table([("r1", "c1", "ours", "B")]).to_csv(path, index=False)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"comparisons": {"c1": {"prompt": "prompt c1", "left": {"method": "B"},
                                                           "right": {"method": "ours"}}}}))
    assert analyze_main([str(path), "--method", "ours", "--manifest", str(manifest)]) == 2
    assert "contradict the manifest" in one_error_line(capsys.readouterr().err)
    assert analyze_main([str(path), "--method", "ours", "--manifest", str(tmp_path / "none.json")]) == 2
    one_error_line(capsys.readouterr().err)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert analyze_main([str(empty), "--method", "ours"]) == 2
    assert "not a readable answers CSV" in one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------------
# Crashes under load: kill -9 twice while 50 raters answer


REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Rater:
    """One browser: keeps its session cookie and retries a request until the server acknowledges it."""

    def __init__(self, port: int, deadline: float) -> None:
        self.port, self.deadline, self.cookie = port, deadline, ""

    def post(self, path: str, body: dict) -> dict:
        while time.monotonic() < self.deadline:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                conn.request("POST", path, body=json.dumps(body),
                             headers={"Content-Type": "application/json", "Cookie": self.cookie})
                resp = conn.getresponse()
                data = json.loads(resp.read())
                if resp.status == 200:
                    cookie = resp.getheader("Set-Cookie")
                    self.cookie = cookie.split(";")[0] if cookie else self.cookie
                    return data
                if resp.status < 500:
                    raise AssertionError(f"{path} {body}: {resp.status} {data}")
            except (OSError, http.client.HTTPException, json.JSONDecodeError):
                pass  # server killed or restarting: send the same request again
            finally:
                conn.close()
            time.sleep(0.05)
        raise AssertionError(f"{path} {body}: no acknowledgement before the deadline")


def test_kill_9_under_load_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    raters, n_comparisons, kills = 50, 6, 2
    site, manifest = make_site(tmp_path, prompts=tuple(f"prompt {i}" for i in range(n_comparisons)))
    db, port = tmp_path / "answers.sqlite", free_port()
    cmd = [sys.executable, "-m", "userstudy.serve", str(site), "--db", str(db), "--port", str(port),
           "--export-token", TOKEN]  # no --secret-key: the key kept in the db must survive the kills
    log = (tmp_path / "server.log").open("w")
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log)]
    deadline = time.monotonic() + 120
    acknowledged: dict[tuple[str, str], dict[str, str]] = {}
    lock = threading.Lock()
    errors: list[str] = []
    at_kill: list[int] = []  # submissions acknowledged when each kill came
    clients = [Rater(port, deadline) for _ in range(raters)]

    def rate(i: int) -> None:
        try:
            client = clients[i]
            rid = f"k{i:02d}"
            for n, cid in enumerate(manifest["comparisons"]):
                answers = {k: ("left", "right")[(i + n + j) % 2] for j, k in enumerate(CRITERION_KEYS)}
                client.post("/api/answers", {"rater_id": rid, "comparison_id": cid, "answers": answers})
                with lock:
                    acknowledged[(rid, cid)] = answers
        except AssertionError as exc:
            errors.append(str(exc))

    try:
        for i, client in enumerate(clients):  # consent first: a lost consent reply would need a release
            assert client.post("/api/session", {"rater_id": f"k{i:02d}"}) == {"rater_id": f"k{i:02d}"}
        threads = [threading.Thread(target=rate, args=(i,)) for i in range(raters)]
        for t in threads:
            t.start()
        for k in range(1, kills + 1):  # kill -9 after a third and after two thirds of the submissions
            while len(acknowledged) < k * raters * n_comparisons // (kills + 1) and time.monotonic() < deadline:
                time.sleep(0.01)
            at_kill.append(len(acknowledged))
            procs[-1].kill()
            procs[-1].wait(timeout=30)
            procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log))
        for t in threads:
            t.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)
        log.close()
    assert errors == [] and not any(t.is_alive() for t in threads)
    assert [p.returncode for p in procs[:kills]] == [-9] * kills
    assert all(0 < n < raters * n_comparisons for n in at_kill), at_kill  # the kills came mid-load
    assert len(acknowledged) == raters * n_comparisons
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute("SELECT rater_id, comparison_id, criterion, choice FROM answers").fetchall()
    assert len(rows) == raters * n_comparisons * len(CRITERION_KEYS) == 1500
    got: dict[tuple[str, str], dict[str, str]] = {}
    for rid, cid, criterion, choice in rows:
        got.setdefault((rid, cid), {})[criterion] = choice
    assert got == acknowledged
