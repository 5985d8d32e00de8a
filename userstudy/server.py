"""Serve a built user-study site and store the answers in SQLite.

    python -m userstudy.serve SITE --db answers.sqlite [--host 127.0.0.1 --port 8000] [--export-token TOKEN]

Endpoints:
    GET  /, /<file>             the site's files (never manifest.json: it says which side is which method)
    POST /api/session           {"rater_id"?: str} after consent -> {"rater_id": str}; binds the id to the
                                browser session cookie
    POST /api/answers           {"rater_id", "comparison_id", "answers": {criterion: "left"|"right"}} with all
                                five criteria; stored in one transaction, a resubmission replaces
    GET  /export.csv?token=...  all answers as CSV (schema in userstudy/README.md)

Storage: table `answers`, one row per (rater_id, comparison_id, criterion), WAL journal, one connection
per request with a busy timeout, so the threaded server's concurrent writers queue instead of failing.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hmac
import io
import json
import re
import secrets
import sqlite3
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flask import Flask, Response, abort, g, jsonify, request, send_from_directory, session
from werkzeug.exceptions import HTTPException
from werkzeug.serving import BaseWSGIServer, make_server

from userstudy import CHOICES, CRITERION_KEYS, CSV_COLUMNS

MANIFEST_NAME = "manifest.json"
# A comparison's JSON is ~200 bytes; 16 KiB leaves room and stops abuse early.
MAX_BODY_BYTES = 16 * 1024
RATER_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# How long a request waits for another writer's lock before failing (sqlite3 `timeout`, seconds).
BUSY_TIMEOUT_S = 30.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS raters (
    rater_id     TEXT PRIMARY KEY,
    consented_at TEXT NOT NULL
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
"""


@dataclass(frozen=True)
class StudyConfig:
    """What the app needs to run."""

    site: Path  # folder written by `python -m userstudy.build`
    db: Path  # SQLite file (created if absent)
    export_token: str  # secret required by /export.csv
    secret_key: str  # signs the session cookie that binds a browser to one rater id


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


def init_db(db: Path) -> None:
    """Create the tables and switch the file to WAL (readers do not block the writer)."""
    conn = _connect(db)
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"could not switch {db} to WAL mode (got {mode!r}); is it on a network disk?")
        conn.executescript(SCHEMA)
    finally:
        conn.close()


def load_manifest(site: Path) -> dict:
    path = Path(site) / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"{site} has no {MANIFEST_NAME}; build it with `python -m userstudy.build` first")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(manifest.get("comparisons"), dict) or not manifest["comparisons"]:
        raise ValueError(f"{path} lists no comparisons")
    return manifest


def _require_object(payload: object) -> dict:
    if not isinstance(payload, dict):
        raise ClientError("request body must be a JSON object")
    return payload


def _check_rater_id(value: object) -> str:
    if not isinstance(value, str) or not RATER_ID_PATTERN.match(value):
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


def create_app(config: StudyConfig) -> Flask:
    """The Flask app for one site and one database."""
    site = Path(config.site).resolve()
    manifest = load_manifest(site)
    comparisons: dict = manifest["comparisons"]
    init_db(config.db)

    app = Flask(__name__, static_folder=None)
    app.config.update(
        SECRET_KEY=config.secret_key,
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
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

    def json_body() -> object:
        data = request.get_data(cache=True)  # raises 413 past MAX_CONTENT_LENGTH
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ClientError(f"malformed JSON: {exc}") from None

    @app.post("/api/session")
    def start_session() -> Response:
        body = _require_object(json_body() if request.content_length else {})
        claimed = _check_rater_id(body["rater_id"]) if body.get("rater_id") not in (None, "") else None
        bound = session.get("rater_id")
        if bound is not None:
            _bound_rater(claimed)
            return jsonify(rater_id=bound)
        rater_id = claimed or uuid.uuid4().hex
        conn = db()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("INSERT OR IGNORE INTO raters (rater_id, consented_at) VALUES (?, ?)",
                         (rater_id, _now()))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        session["rater_id"] = rater_id
        return jsonify(rater_id=rater_id)

    @app.post("/api/answers")
    def submit_answers() -> Response:
        rater_id, cid, answers = parse_answers(json_body(), comparisons)
        _bound_rater(rater_id)
        now = _now()
        conn = db()
        conn.execute("BEGIN IMMEDIATE")
        try:
            # UPSERT on the primary key: a resubmission replaces the choice, keeps created_at.
            conn.executemany(
                "INSERT INTO answers (rater_id, comparison_id, criterion, choice, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (rater_id, comparison_id, criterion) "
                "DO UPDATE SET choice = excluded.choice, updated_at = excluded.updated_at",
                [(rater_id, cid, crit, choice, now, now) for crit, choice in answers.items()],
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
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

    @app.get("/")
    def index() -> Response:
        return send_from_directory(site, "index.html")

    @app.get("/<path:filename>")
    def site_file(filename: str) -> Response:
        if filename == MANIFEST_NAME:
            abort(404)  # the manifest says which video is which method: raters must not see it
        # send_from_directory joins safely (werkzeug.security.safe_join): '..' or absolute paths -> 404.
        return send_from_directory(site, filename)

    return app


def answers_to_csv(rows: Sequence[tuple[str, str, str, str]], comparisons: dict) -> str:
    """CSV of (rater_id, comparison_id, criterion, choice) rows joined with the manifest's pairing."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for rater_id, cid, criterion, choice in rows:
        comp = comparisons[cid]
        writer.writerow([rater_id, cid, comp["prompt"], comp["left"]["method"], comp["right"]["method"],
                         criterion, choice])
    return buf.getvalue()


def make_study_server(config: StudyConfig, host: str = "127.0.0.1", port: int = 8000) -> BaseWSGIServer:
    """A threaded WSGI server (one thread per request); port 0 picks a free port (see `.server_port`)."""
    return make_server(host, port, create_app(config), threaded=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m userstudy.serve", description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path, help="folder written by `python -m userstudy.build`")
    parser.add_argument("--db", type=Path, required=True,
                        help="SQLite file for the answers (created if absent)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for a LAN)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument("--export-token", default=None,
                        help="secret for /export.csv?token=...; a random one is printed when omitted")
    parser.add_argument("--secret-key", default=None,
                        help="session-cookie key; set it to keep raters' sessions across restarts")
    args = parser.parse_args(argv)
    token = args.export_token or secrets.token_urlsafe(16)
    config = StudyConfig(site=args.site, db=args.db, export_token=token,
                         secret_key=args.secret_key or secrets.token_hex(32))
    try:
        server = make_study_server(config, args.host, args.port)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
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
