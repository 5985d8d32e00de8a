"""Serve a built user-study site and store the answers in SQLite.

    python -m userstudy.serve SITE --db answers.sqlite [--host 127.0.0.1 --port 8000] [--export-token TOKEN]
    python -m userstudy.serve SITE --db answers.sqlite --release-code CODE

Endpoints:
    GET  /, /<file>             only the files `userstudy.build` listed in the manifest's `public_files`
                                (never manifest.json: it says which side is which method)
    POST /api/session           {"rater_id"?: str} after consent -> {"rater_id": str}; binds the id to the
                                browser session cookie. A code belongs to the first browser that claims it
                                (409 for another) until `--release-code CODE` frees it
    POST /api/answers           {"rater_id", "comparison_id", "answers": {criterion: "left"|"right"}} with all
                                five criteria; stored in one transaction, a resubmission replaces
    GET  /export.csv?token=...  all answers as CSV (schema in userstudy/README.md)

Storage: table `answers`, one row per (rater_id, comparison_id, criterion), WAL journal, one connection
per request with a busy timeout, so the threaded server's concurrent writers queue instead of failing.
The database is written once at start, so one that cannot be written stops the server there.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hmac
import io
import json
import os
import re
import secrets
import sqlite3
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flask import Flask, Response, abort, g, jsonify, request, send_file, session
from werkzeug.exceptions import ClientDisconnected, HTTPException
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from userstudy import CHOICES, CRITERION_KEYS, CSV_COLUMNS, csv_quote

MANIFEST_NAME = "manifest.json"
# A comparison's JSON is ~200 bytes; 16 KiB leaves room and stops abuse early.
MAX_BODY_BYTES = 16 * 1024
RATER_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")  # used with fullmatch: no trailing newline
# How long a request waits for another writer's lock before failing (sqlite3 `timeout`, seconds).
BUSY_TIMEOUT_S = 30.0
# Longest wait for one socket read or write; a client that stalls longer is disconnected.
REQUEST_TIMEOUT_S = 30.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS raters (
    rater_id     TEXT PRIMARY KEY,
    consented_at TEXT NOT NULL,
    claim        TEXT  -- secret in the owning browser's session cookie; NULL: free for the next browser
);
CREATE TABLE IF NOT EXISTS answers (
    rater_id      TEXT NOT NULL,
    comparison_id TEXT NOT NULL,
    criterion     TEXT NOT NULL,
    choice        TEXT NOT NULL CHECK (choice IN ('left', 'right')),
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    PRIMARY KEY (rater_id, comparison_id, criterion)
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class StudyConfig:
    """What the app needs to run."""

    site: Path  # folder written by `python -m userstudy.build`
    db: Path  # SQLite file (created if absent); must lie outside `site`
    export_token: str  # secret required by /export.csv
    # Signs the session cookie that binds a browser to one rater id. None: a key made on first start and
    # kept in the database, so sessions (and with them the claim on a participant code) survive restarts.
    secret_key: str | None = None


class ClientError(Exception):
    """A client error answered with a JSON message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def _connect(db: Path) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a writer takes the lock up front
    # (and waits on the busy timeout) instead of failing when upgrading a read lock.
    conn = sqlite3.connect(db, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    return conn


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error: all of a block's writes or none."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _db_error(db: Path, exc: sqlite3.Error) -> ValueError:
    """One line naming the file and the fix, for an SQLite error met while opening the database."""
    text = str(exc)
    if "not a database" in text:
        return ValueError(f"--db {db} is not an SQLite database; give the answers database or a new file name")
    if "readonly" in text or "unable to open" in text:
        # -wal/-shm matter too: left read-only by a permission change they stop every write.
        files = [Path(f"{db}{suffix}") for suffix in ("", "-wal", "-shm")] + [db.parent]
        locked = [str(p) for p in files if p.exists() and not os.access(p, os.W_OK)]
        which = f" (not writable: {', '.join(locked)})" if locked else ""
        return ValueError(
            f"answers database {db} cannot be written: {text}{which}; give the server's user write access to "
            f"{db}, {db}-wal, {db}-shm and folder {db.parent} (chown/chmod u+w), or choose another --db"
        )
    return ValueError(f"answers database {db} cannot be used: {text}")


def init_db(db: Path) -> None:
    """Create the tables, switch the file to WAL and prove it can be written.

    Raises ValueError with one line naming the file and the fix: a folder, a missing folder, a file that is
    not SQLite, or one that cannot be written would otherwise be found only when raters answer (500s).
    """
    db = Path(db)
    if db.is_dir():
        raise ValueError(f"--db {db} is a folder; give a file in it, e.g. --db {db / 'answers.sqlite'}")
    if not db.parent.is_dir():
        raise ValueError(f"--db {db}: folder {db.parent} does not exist; create it (mkdir -p {db.parent}) "
                         "or choose another path")
    try:
        conn = _connect(db)
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise ValueError(f"could not switch {db} to WAL mode (got {mode!r}); is it on a network disk?")
            conn.executescript(SCHEMA)
            if "claim" not in {row[1] for row in conn.execute("PRAGMA table_info(raters)")}:
                conn.execute("ALTER TABLE raters ADD COLUMN claim TEXT")  # a database from before claims
            # A real write: reads succeed on a read-only file (or read-only -wal/-shm), writes do not.
            with _transaction(conn):
                conn.execute("INSERT INTO meta (key, value) VALUES ('checked_at', ?) "
                             "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (_now(),))
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise _db_error(db, exc) from None


def stored_secret_key(db: Path) -> str:
    """The session-cookie key kept in the database's meta table; made on first use."""
    conn = _connect(db)
    try:
        with _transaction(conn):
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('secret_key', ?)",
                         (secrets.token_hex(32),))
            return conn.execute("SELECT value FROM meta WHERE key = 'secret_key'").fetchone()[0]
    finally:
        conn.close()


def release_code(db: Path, code: str) -> int:
    """Free a participant code: the next browser that enters it takes it over (e.g. the rater changed
    browser) and the old browser can no longer answer under it. The answers stay; returns their count."""
    db = Path(db)
    if not RATER_ID_PATTERN.fullmatch(code):
        raise ValueError(f"--release-code {code!r} is not a participant code (1-64 of A-Z, a-z, 0-9, '_', '-')")
    if not db.is_file():
        raise ValueError(f"--db {db} does not exist; give the database the server writes the answers to")
    init_db(db)
    conn = _connect(db)
    try:
        with _transaction(conn):
            if conn.execute("UPDATE raters SET claim = NULL WHERE rater_id = ?", (code,)).rowcount == 0:
                raise ValueError(f"no rater has participant code {code!r} in {db}")
            return conn.execute("SELECT COUNT(*) FROM answers WHERE rater_id = ?", (code,)).fetchone()[0]
    finally:
        conn.close()


def claim_code(conn: sqlite3.Connection, rater_id: str, token: str | None) -> str:
    """Bind `rater_id` to the browser holding `token` (its session's claim, or None); returns the claim.

    A code belongs to the first browser that claims it, so nobody can take over another rater's code and
    overwrite their answers: another browser gets 409 until a researcher releases the code.
    """
    with _transaction(conn):
        row = conn.execute("SELECT claim FROM raters WHERE rater_id = ?", (rater_id,)).fetchone()
        if row is not None and row[0] is not None:
            if token is not None and hmac.compare_digest(row[0], token):
                return token  # the owner's browser again (e.g. back on the first page)
            raise ClientError(
                f"participant code {rater_id!r} is already in use in another browser; continue in that "
                "browser, or ask the researcher to release the code for this one", 409,
            )
        claim = secrets.token_urlsafe(24)
        if row is None:
            conn.execute("INSERT INTO raters (rater_id, consented_at, claim) VALUES (?, ?, ?)",
                         (rater_id, _now(), claim))
        else:  # released by a researcher: this browser takes it over
            conn.execute("UPDATE raters SET claim = ? WHERE rater_id = ?", (claim, rater_id))
        return claim


def _check_claim(conn: sqlite3.Connection, rater_id: str, token: str | None) -> None:
    """Refuse answers from a browser whose code was released (and maybe taken by another browser)."""
    row = conn.execute("SELECT claim FROM raters WHERE rater_id = ?", (rater_id,)).fetchone()
    if row is None or row[0] is None or token is None or not hmac.compare_digest(row[0], token):
        raise ClientError(f"participant code {rater_id!r} is no longer held by this browser; start again at "
                          "the first page", 409)


def load_manifest(site: Path) -> dict:
    path = Path(site) / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"{site} has no {MANIFEST_NAME}; build it with `python -m userstudy.build` first")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(manifest.get("comparisons"), dict) or not manifest["comparisons"]:
        raise ValueError(f"{path} lists no comparisons")
    return manifest


def public_files(manifest: dict, site: Path) -> frozenset[str]:
    """The allow-list of site files: what the builder wrote for raters (never the manifest)."""
    files = manifest.get("public_files")
    if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
        raise ValueError(f"{site / MANIFEST_NAME} has no `public_files` list (an older build); rebuild the "
                         "site with `python -m userstudy.build ... --overwrite` (same --seed, same layout)")
    if MANIFEST_NAME in files:
        raise ValueError(f"{site / MANIFEST_NAME} lists itself in `public_files`; remove it from the list")
    return frozenset(files)


def _check_db_outside_site(db: Path, site: Path) -> None:
    # Anything in the site folder may end up public (another web server, a copy to a host), and the
    # answers, the session key and the participant codes must not.
    if Path(db).resolve().is_relative_to(site):
        raise ValueError(f"--db {db} lies inside the site folder {site}; keep the answers outside it, e.g. "
                         f"--db {site.parent / 'answers.sqlite'}")


def _require_object(payload: object) -> dict:
    if not isinstance(payload, dict):
        raise ClientError("request body must be a JSON object")
    return payload


def _check_rater_id(value: object) -> str:
    if not isinstance(value, str) or not RATER_ID_PATTERN.fullmatch(value):
        raise ClientError("rater_id must be 1-64 characters from A-Z, a-z, 0-9, '_' and '-'")
    return value


def _bound_rater(claimed: str | None) -> str:
    """The rater id this browser session is bound to; a different claimed id is refused."""
    bound = session.get("rater_id")
    if bound is None:
        raise ClientError("no consent recorded in this browser session; start at the first page", 403)
    if claimed is not None and claimed != bound:
        raise ClientError(
            f"this browser session belongs to rater {bound!r}; one session cannot answer as another rater "
            "(close the browser or use a private window for a new rater)", 409,
        )
    return bound


def parse_answers(payload: object, comparisons: dict) -> tuple[str, str, dict[str, str]]:
    """Validate one comparison's submission -> (rater_id, comparison_id, {criterion: choice})."""
    body = _require_object(payload)
    missing = [k for k in ("rater_id", "comparison_id", "answers") if k not in body]
    if missing:
        raise ClientError(f"missing field(s): {', '.join(missing)}")
    unknown_fields = sorted(set(body) - {"rater_id", "comparison_id", "answers"})
    if unknown_fields:
        raise ClientError(f"unknown field(s): {', '.join(unknown_fields)}")
    rater_id = _check_rater_id(body["rater_id"])
    cid = body["comparison_id"]
    if not isinstance(cid, str) or cid not in comparisons:
        raise ClientError(f"unknown comparison_id {cid!r}")
    answers = body["answers"]
    if not isinstance(answers, dict):
        raise ClientError("answers must be an object mapping each criterion to 'left' or 'right'")
    missing_criteria = [k for k in CRITERION_KEYS if k not in answers]
    if missing_criteria:
        raise ClientError(f"answers missing criteria: {', '.join(missing_criteria)} (all of "
                         f"{', '.join(CRITERION_KEYS)} are required)")
    unknown = sorted(set(answers) - set(CRITERION_KEYS))
    if unknown:
        raise ClientError(f"unknown criteria: {', '.join(map(str, unknown))}")
    for key in CRITERION_KEYS:
        if answers[key] not in CHOICES:
            raise ClientError(f"answer for {key} must be one of {list(CHOICES)}, got {answers[key]!r}")
    return rater_id, cid, {k: answers[k] for k in CRITERION_KEYS}


def json_body(default: object = None) -> object:
    """The request's JSON body, sent with Content-Length or chunked; `default` for an empty body."""
    try:
        # werkzeug de-chunks a chunked body and stops reading it at MAX_CONTENT_LENGTH, silently: a body
        # longer than MAX_BODY_BYTES is caught by the length check below (MAX_CONTENT_LENGTH is one more).
        data = request.get_data(cache=True)
    except ClientDisconnected:  # the socket timed out (client stalled) or closed before the body ended
        raise ClientError("request body ended early or stalled; send it again", 408) from None
    if len(data) > MAX_BODY_BYTES:
        abort(413)
    if not data and default is not None:
        return default
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        # ValueError: bad UTF-8, bad JSON, or an integer past Python's digit limit; RecursionError: nesting
        # deeper than the parser's stack. Both are the client's fault, not the server's.
        raise ClientError(f"malformed JSON: {exc}") from None


def create_app(config: StudyConfig) -> Flask:
    """The Flask app for one site and one database."""
    site = Path(config.site).resolve()
    _check_db_outside_site(config.db, site)
    manifest = load_manifest(site)
    comparisons: dict = manifest["comparisons"]
    allowed = public_files(manifest, site)
    init_db(config.db)

    app = Flask(__name__, static_folder=None)
    app.config.update(
        SECRET_KEY=config.secret_key or stored_secret_key(config.db),
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES + 1,  # one byte more, so json_body can tell "over the limit"
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",  # cross-site POSTs carry no session, so they cannot answer as a rater
    )

    def db() -> sqlite3.Connection:
        if "db" not in g:
            g.db = _connect(config.db)
        return g.db

    @app.teardown_appcontext
    def _close_db(_exc: BaseException | None) -> None:
        conn = g.pop("db", None)
        if conn is not None:
            conn.close()

    @app.errorhandler(ClientError)
    def _bad_request(exc: ClientError) -> tuple[Response, int]:
        return jsonify(error=exc.message), exc.status

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        message = exc.description or exc.name
        if exc.code == 413:
            message = f"request body larger than {MAX_BODY_BYTES} bytes"
        return jsonify(error=message), exc.code or 500

    @app.errorhandler(sqlite3.Error)
    def _db_failure(exc: sqlite3.Error) -> tuple[Response, int]:
        # The researcher needs the cause in the log; the rater needs to know the answer was not stored.
        app.logger.error("answers database %s: %s", config.db, exc)
        return jsonify(error="the server could not store this; please tell the researcher"), 500

    @app.post("/api/session")
    def start_session() -> Response:
        body = _require_object(json_body(default={}))
        claimed = _check_rater_id(body["rater_id"]) if body.get("rater_id") not in (None, "") else None
        bound = _bound_rater(claimed) if "rater_id" in session else None
        rater_id = bound or claimed or uuid.uuid4().hex
        session["claim"] = claim_code(db(), rater_id, session.get("claim") if bound else None)
        session["rater_id"] = rater_id
        session.permanent = True  # a cookie that outlives the browser window: closing it keeps the claim
        return jsonify(rater_id=rater_id)

    @app.post("/api/answers")
    def submit_answers() -> Response:
        rater_id, cid, answers = parse_answers(json_body(), comparisons)
        _bound_rater(rater_id)
        now = _now()
        conn = db()
        with _transaction(conn):
            _check_claim(conn, rater_id, session.get("claim"))
            # UPSERT on the primary key: a resubmission replaces the choice, keeps created_at.
            conn.executemany(
                "INSERT INTO answers (rater_id, comparison_id, criterion, choice, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (rater_id, comparison_id, criterion) "
                "DO UPDATE SET choice = excluded.choice, updated_at = excluded.updated_at",
                [(rater_id, cid, crit, choice, now, now) for crit, choice in answers.items()],
            )
        return jsonify(ok=True, comparison_id=cid, stored=len(answers))

    @app.get("/export.csv")
    def export_csv() -> Response:
        token = request.args.get("token", "")
        if not hmac.compare_digest(token.encode(), config.export_token.encode()):
            abort(403, description="a valid ?token= is required to export answers")
        rows = db().execute(
            "SELECT rater_id, comparison_id, criterion, choice FROM answers "
            "ORDER BY rater_id, comparison_id, criterion"
        ).fetchall()
        try:
            text = answers_to_csv(rows, comparisons)
        except KeyError as exc:
            abort(500, description=f"stored answers name comparison {exc.args[0]!r}, which this site's "
                  "manifest lacks; serve the site the answers were collected with")
        return Response(text, mimetype="text/csv",
                        headers={"Content-Disposition": "attachment; filename=answers.csv"})

    def serve(filename: str) -> Response:
        # The URL path (percent-decoded by werkzeug) must equal a name the builder wrote, character for
        # character: any other spelling of the manifest or of a file outside the site (trailing slash, dot
        # segments, encoded letters, other case, '..') is simply not on the list.
        if filename not in allowed:
            abort(404)
        path = (site / filename).resolve()
        if not path.is_relative_to(site) or not path.is_file():
            abort(404)  # a listed name that became a symlink out of the site, or was removed
        return send_file(path)

    @app.get("/")
    def index() -> Response:
        return serve("index.html")

    @app.get("/<path:filename>")
    def site_file(filename: str) -> Response:
        return serve(filename)

    return app


def answers_to_csv(rows: Sequence[tuple[str, str, str, str]], comparisons: dict) -> str:
    """CSV of (rater_id, comparison_id, criterion, choice) rows joined with the manifest's pairing.

    Every cell goes through `csv_quote`: prompts, method names and rater ids come from outside and must not
    run as spreadsheet formulas when a researcher opens the file.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for rater_id, cid, criterion, choice in rows:
        comp = comparisons[cid]
        cells = [rater_id, cid, comp["prompt"], comp["left"]["method"], comp["right"]["method"], criterion, choice]
        writer.writerow([csv_quote(str(cell)) for cell in cells])
    return buf.getvalue()


def make_study_server(config: StudyConfig, host: str = "127.0.0.1", port: int = 8000,
                      request_timeout_s: float = REQUEST_TIMEOUT_S) -> BaseWSGIServer:
    """A threaded WSGI server (one thread per request); port 0 picks a free port (see `.server_port`).

    `request_timeout_s` bounds every socket read and write, so a client that sends headers (or part of a
    body) and then stalls is disconnected instead of holding a thread and a connection forever.
    """

    class Handler(WSGIRequestHandler):
        timeout = request_timeout_s  # socketserver.StreamRequestHandler sets it on each connection

    return make_server(host, port, create_app(config), threaded=True, request_handler=Handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m userstudy.serve", description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path, help="folder written by `python -m userstudy.build`")
    parser.add_argument("--db", type=Path, required=True,
                        help="SQLite file for the answers (created if absent), outside the site folder")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for a LAN)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument("--export-token", default=None,
                        help="secret for /export.csv?token=...; a random one is printed when omitted")
    parser.add_argument("--secret-key", default=None,
                        help="session-cookie key (default: one made on first start and kept in --db)")
    parser.add_argument("--request-timeout", type=float, default=REQUEST_TIMEOUT_S,
                        help="seconds one socket read or write may wait before the connection is dropped")
    parser.add_argument("--release-code", metavar="CODE", default=None,
                        help="free participant code CODE for the next browser that enters it (a rater "
                             "changed browser), keep its answers, and exit")
    args = parser.parse_args(argv)
    token = args.export_token or secrets.token_urlsafe(16)
    config = StudyConfig(site=args.site, db=args.db, export_token=token, secret_key=args.secret_key)
    try:
        if args.release_code is not None:
            kept = release_code(args.db, args.release_code)
            print(f"released participant code {args.release_code!r} ({kept} answers kept); the next browser "
                  "that enters it takes it over")
            return 0
        server = make_study_server(config, args.host, args.port, args.request_timeout)
    except (ValueError, OSError) as exc:
        print("error: " + " ".join(str(exc).splitlines()), file=sys.stderr)  # one line, no traceback
        return 2
    print(f"serving {args.site} on http://{args.host}:{server.server_port}/  (answers -> {args.db})")
    print(f"export: http://{args.host}:{server.server_port}/export.csv?token={token}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
