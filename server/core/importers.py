"""Readers turning MovieLens (100K; latest and 20M/25M/32M; 1M and 10M) and generic JSONL
files into catalog items and events.

Generic JSONL format (UTF-8, one JSON object per line, blank lines ignored):

items file, one item per line::

    {"item_id": "a1", "title": "Sourdough basics", "text": "optional longer text",
     "category": "cooking", "published_at": "2024-05-01T08:00:00Z", "expires_at": null,
     "attributes": {"author": "Ann"}}

    item_id and title are required. Times are unix seconds (number) or ISO-8601 strings
    (a date, or a date-time; without an offset it is taken as UTC); null or absent means
    unbounded. attributes values that are not strings are stored as their JSON text.

events file, one event per line::

    {"event_id": "e-1001", "user_id": "u7", "item_id": "a1", "action": "click",
     "timestamp": 1714550400, "value": null}

    event_id (the idempotency key: importing the file again adds nothing), user_id,
    item_id, action (view, click, like, purchase, rating, skip, share, add_to_cart,
    dislike) and timestamp are required; value (e.g. the rating) is optional.

Errors are errors.InvalidArgument naming the file and line.
"""

from __future__ import annotations

import csv
import json
import math
from datetime import datetime, timezone
from pathlib import Path

from chronorec.server.core import errors
from chronorec.server.core.catalog import Event, Item
from chronorec.server.core.store import event_problem, item_problem

ML100K = "movielens-100k"
ML_LATEST = "movielens-latest"
ML_DAT = "movielens-dat"
JSONL = "jsonl"
MAX_TAGS_PER_MOVIE = 10
# Each MovieLens format by the file holding its ratings, in the order detect_format looks for them
# (the evaluation report hashes that file), and by the file naming its films.
RATINGS_FILES = {ML100K: "u.data", ML_LATEST: "ratings.csv", ML_DAT: "ratings.dat"}
ITEM_FILES = {ML100K: "u.item", ML_LATEST: "movies.csv", ML_DAT: "movies.dat"}


def _bad(path: Path, line: int, problem: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(f"{path}:{line}: {problem}")


def _checked_item(path: Path, line: int, item: Item) -> Item:
    problem = item_problem(item)
    if problem:
        raise _bad(path, line, problem)
    return item


def _checked_event(path: Path, line: int, event: Event) -> Event:
    problem = event_problem(event)
    if problem:
        raise _bad(path, line, problem)
    return event


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise errors.InvalidArgument(f"{path}: no such file")
    return path


def _genres(field: str) -> str:
    """A MovieLens genres field ("Adventure|Animation", or "(no genres listed)") as an item's category."""
    return "" if field in ("", "(no genres listed)") else ", ".join(field.split("|"))


def _file_lines(path: Path, encoding: str | None = None) -> list[str]:
    """The lines of a small text file in `encoding`, or, with None, UTF-8 where the whole file
    decodes so (ML-10M's .dat files), else latin-1 (ML-1M's titles are ISO-8859-1)."""
    raw = path.read_bytes()
    if encoding is None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
    else:
        text = raw.decode(encoding)
    # Split on newlines alone: str.splitlines would also break at a latin-1 0x85 or 0x1c inside a title.
    return [line.removesuffix("\r") for line in text.split("\n")]


# -- MovieLens 100K ----------------------------------------------------------------------


def load_movielens_100k(folder: str | Path) -> tuple[list[Item], list[Event]]:
    """Items from u.item (genres named by u.genre) and rating events from u.data, in file order."""
    folder = Path(folder)
    genre_path = _require_file(folder / "u.genre")
    genres: dict[int, str] = {}
    for line_no, line in enumerate(_file_lines(genre_path, "latin-1"), start=1):
        if not line.strip():
            continue
        name, sep, index = line.rpartition("|")
        if not sep or not index.strip().isdigit():
            raise _bad(genre_path, line_no, "expected 'name|index'")
        genres[int(index)] = name
    genre_names = [genres[i] for i in sorted(genres)]

    item_path = _require_file(folder / ITEM_FILES[ML100K])
    items: list[Item] = []
    for line_no, line in enumerate(_file_lines(item_path, "latin-1"), start=1):
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) != 5 + len(genre_names):
            raise _bad(item_path, line_no, f"expected {5 + len(genre_names)} '|'-separated fields, got {len(fields)}")
        movie_id, title, release_date, _video_release_date, imdb_url = fields[:5]
        flags = fields[5:]
        category = ", ".join(name for name, flag in zip(genre_names, flags) if flag.strip() == "1")
        # Release dates are when a film came out, not when it became recommendable here.
        items.append(_checked_item(item_path, line_no, Item(
            item_id=movie_id.strip(), title=title, category=category,
            attributes={"release_date": release_date, "imdb_url": imdb_url},
        )))
    return items, movielens_ratings(ML100K, folder)


def _rating_events(path: Path, separator: str, id_prefix: str, expected: str) -> list[Event]:
    """Rating events from a headerless 'user, item, rating, timestamp' file, streamed (ML-10M's
    holds 10 million lines); event ids are `id_prefix` and the line number."""
    events: list[Event] = []
    with path.open(encoding="latin-1") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.split(separator)
            if len(fields) != 4:
                raise _bad(path, line_no, expected)
            user_id, item_id, rating, timestamp = (x.strip() for x in fields)
            try:
                value, ts = float(rating), float(int(timestamp))
            except ValueError:
                raise _bad(path, line_no, "rating and timestamp must be numbers") from None
            events.append(_checked_event(path, line_no, Event(
                event_id=f"{id_prefix}-{line_no}", user_id=user_id, item_id=item_id,
                action="rating", timestamp=ts, value=value,
            )))
    return events


# -- MovieLens latest (ml-latest, ml-latest-small, ml-25m, ...) -----------------------


class _MovieTags:
    """Up to MAX_TAGS_PER_MOVIE distinct tags per movie, in file order, as an item's text."""

    def __init__(self) -> None:
        self._tags: dict[str, list[str]] = {}
        self._seen: dict[str, set[str]] = {}

    def add(self, movie_id: str, tag: str) -> None:
        tag = " ".join(tag.split())
        movie_tags = self._tags.setdefault(movie_id, [])
        # Case-insensitive distinct: users write "funny" and "Funny".
        if tag and len(movie_tags) < MAX_TAGS_PER_MOVIE and tag.casefold() not in self._seen.setdefault(movie_id, set()):
            self._seen[movie_id].add(tag.casefold())
            movie_tags.append(tag)

    def text(self, movie_id: str) -> str:
        return ", ".join(self._tags.get(movie_id, []))


def _csv_rows(path: Path, required: list[str]):
    """(physical line number, row dict) of a CSV file with a header naming `required` columns."""
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise _bad(path, 1, f"header lacks column(s) {', '.join(missing)}")
        for row in reader:
            if None in row or any(row[c] is None for c in required):
                raise _bad(path, reader.line_num, "wrong number of fields")
            yield reader.line_num, row


def load_movielens_latest(folder: str | Path) -> tuple[list[Item], list[Event]]:
    """Items from movies.csv (tags.csv, links.csv when present) and rating events from
    ratings.csv; event ids carry the line number in ratings.csv (the header is line 1)."""
    folder = Path(folder)
    tags = _MovieTags()
    tags_path = folder / "tags.csv"
    if tags_path.is_file():
        for _, row in _csv_rows(tags_path, ["movieId", "tag"]):
            tags.add(row["movieId"], row["tag"])
    links: dict[str, dict[str, str]] = {}
    links_path = folder / "links.csv"
    if links_path.is_file():
        for _, row in _csv_rows(links_path, ["movieId", "imdbId", "tmdbId"]):
            links[row["movieId"]] = {k: v for k, v in (("imdb_id", row["imdbId"]), ("tmdb_id", row["tmdbId"])) if v}

    movies_path = _require_file(folder / ITEM_FILES[ML_LATEST])
    items: list[Item] = []
    for line_no, row in _csv_rows(movies_path, ["movieId", "title", "genres"]):
        items.append(_checked_item(movies_path, line_no, Item(
            item_id=row["movieId"], title=row["title"], text=tags.text(row["movieId"]),
            category=_genres(row["genres"]), attributes=links.get(row["movieId"], {}),
        )))
    return items, movielens_ratings(ML_LATEST, folder)


def _latest_ratings(ratings_path: Path) -> list[Event]:
    events: list[Event] = []
    for line_no, row in _csv_rows(ratings_path, ["userId", "movieId", "rating", "timestamp"]):
        try:
            value, ts = float(row["rating"]), float(int(row["timestamp"]))
        except ValueError:
            raise _bad(ratings_path, line_no, "rating and timestamp must be numbers") from None
        events.append(_checked_event(ratings_path, line_no, Event(
            event_id=f"mllatest-{line_no}", user_id=row["userId"], item_id=row["movieId"],
            action="rating", timestamp=ts, value=value,
        )))
    return events


# -- MovieLens 1M / 10M ("::"-separated .dat files) ------------------------------------


def load_movielens_dat(folder: str | Path) -> tuple[list[Item], list[Event]]:
    """Items from movies.dat (tags.dat when present, as in ML-10M) and rating events from
    ratings.dat, the "::"-separated files of ML-1M and ML-10M; event ids carry the line number
    in ratings.dat. users.dat (ML-1M's demographics) is not read."""
    folder = Path(folder)
    tags = _MovieTags()
    tags_path = folder / "tags.dat"
    if tags_path.is_file():
        for line_no, line in enumerate(_file_lines(tags_path), start=1):
            if not line.strip():
                continue
            # A tag may itself hold "::": the user and movie lead, the timestamp ends the line.
            fields = line.split("::", 2)
            tag, sep, timestamp = fields[-1].rpartition("::")
            if len(fields) != 3 or not sep or not timestamp.strip().isdigit():
                raise _bad(tags_path, line_no, "expected 'user::movie::tag::timestamp'")
            tags.add(fields[1].strip(), tag)

    movies_path = _require_file(folder / ITEM_FILES[ML_DAT])
    items: list[Item] = []
    for line_no, line in enumerate(_file_lines(movies_path), start=1):
        if not line.strip():
            continue
        movie_id, sep, rest = line.partition("::")
        title, sep2, genres = rest.rpartition("::")
        if not sep or not sep2:
            raise _bad(movies_path, line_no, "expected 'movie::title::genres'")
        movie_id = movie_id.strip()
        items.append(_checked_item(movies_path, line_no, Item(
            item_id=movie_id, title=title, text=tags.text(movie_id), category=_genres(genres.strip()),
        )))
    return items, movielens_ratings(ML_DAT, folder)


# How each line-per-rating format reads: separator, event id prefix, what a bad line should hold.
_RATING_LINES = {
    ML100K: ("\t", "ml100k", "expected 4 tab-separated fields: user item rating timestamp"),
    ML_DAT: ("::", "mldat", "expected 4 '::'-separated fields: user::movie::rating::timestamp"),
}


def movielens_ratings(fmt: str, folder: str | Path) -> list[Event]:
    """The rating events of a MovieLens folder of format `fmt` (its RATINGS_FILES file)."""
    path = _require_file(Path(folder) / RATINGS_FILES[fmt])
    if fmt == ML_LATEST:
        return _latest_ratings(path)
    return _rating_events(path, *_RATING_LINES[fmt])


# -- generic JSONL ------------------------------------------------------------------------


def parse_time(value: object) -> float | None:
    """Unix seconds from a number or an ISO-8601 string (UTC when it has no offset); None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"not a time: {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"not a finite time: {value!r}")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        # Python 3.10's fromisoformat does not take the "Z" suffix.
        if text[-1:] in ("Z", "z"):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"not an ISO-8601 time: {value!r}") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        return parsed.timestamp()
    raise ValueError(f"not a time: {value!r}")


def _jsonl_objects(path: Path):
    with _require_file(path).open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _bad(path, line_no, f"invalid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise _bad(path, line_no, "expected a JSON object")
            yield line_no, obj


def _field(path: Path, line: int, obj: dict, name: str, kind: type | tuple, default: object = ...) -> object:
    if name not in obj or obj[name] is None:
        if default is ...:
            raise _bad(path, line, f"missing field {name!r}")
        return default
    value = obj[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _bad(path, line, f"field {name!r} has the wrong type ({type(value).__name__})")
    return value


def _time_field(path: Path, line: int, obj: dict, name: str, required: bool) -> float | None:
    if required and obj.get(name) is None:
        raise _bad(path, line, f"missing field {name!r}")
    try:
        return parse_time(obj.get(name))
    except ValueError as exc:
        raise _bad(path, line, f"field {name!r}: {exc}") from None


def _load_jsonl_items(path: Path) -> list[Item]:
    items = []
    for line_no, obj in _jsonl_objects(path):
        attributes = _field(path, line_no, obj, "attributes", dict, {})
        items.append(_checked_item(path, line_no, Item(
            item_id=_field(path, line_no, obj, "item_id", str),
            title=_field(path, line_no, obj, "title", str),
            text=_field(path, line_no, obj, "text", str, ""),
            category=_field(path, line_no, obj, "category", str, ""),
            published_at=_time_field(path, line_no, obj, "published_at", required=False),
            expires_at=_time_field(path, line_no, obj, "expires_at", required=False),
            attributes={str(k): v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
                        for k, v in attributes.items()},
        )))
    return items


def _load_jsonl_events(path: Path) -> list[Event]:
    events = []
    for line_no, obj in _jsonl_objects(path):
        value = _field(path, line_no, obj, "value", (int, float), None)
        events.append(_checked_event(path, line_no, Event(
            event_id=_field(path, line_no, obj, "event_id", str),
            user_id=_field(path, line_no, obj, "user_id", str),
            item_id=_field(path, line_no, obj, "item_id", str),
            action=_field(path, line_no, obj, "action", str),
            timestamp=_time_field(path, line_no, obj, "timestamp", required=True),
            value=None if value is None else float(value),
        )))
    return events


def load_jsonl(items_path: str | Path | None, events_path: str | Path | None = None) -> tuple[list[Item], list[Event]]:
    """Items and events from the generic JSONL files described in this module's docstring."""
    items = _load_jsonl_items(Path(items_path)) if items_path is not None else []
    events = _load_jsonl_events(Path(events_path)) if events_path is not None else []
    return items, events


def _is_events_jsonl(path: Path) -> bool:
    for _, obj in _jsonl_objects(path):
        return "event_id" in obj or "user_id" in obj
    return False


# -- detection ----------------------------------------------------------------------------


def detect_format(path: str | Path) -> str:
    """ML100K for a folder holding u.data, ML_LATEST for one holding ratings.csv, ML_DAT for
    one holding ratings.dat (ML-1M, ML-10M), JSONL for a .jsonl file or a folder holding
    items.jsonl / events.jsonl."""
    path = Path(path)
    if path.is_file() and path.name in (*RATINGS_FILES.values(), *ITEM_FILES.values()):
        path = path.parent
    if path.is_dir():
        for fmt, name in RATINGS_FILES.items():
            if (path / name).is_file():
                return fmt
        if (path / "items.jsonl").is_file() or (path / "events.jsonl").is_file():
            return JSONL
        raise errors.InvalidArgument(
            f"{path}: no known dataset here (expected {', '.join(RATINGS_FILES.values())}, items.jsonl or events.jsonl)")
    if path.is_file() and path.suffix == ".jsonl":
        return JSONL
    if not path.exists():
        raise errors.InvalidArgument(f"{path}: no such file or folder")
    raise errors.InvalidArgument(f"{path}: unknown dataset format (expected a MovieLens folder or a .jsonl file)")


_MOVIELENS_LOADERS = {ML100K: load_movielens_100k, ML_LATEST: load_movielens_latest, ML_DAT: load_movielens_dat}


def detect_and_load(path: str | Path, items_optional: bool = False) -> tuple[list[Item], list[Event]]:
    """Load whatever dataset `path` names (see detect_format). A single .jsonl file is
    read as an events file when its first record has event_id or user_id, else as items.
    `items_optional`: a MovieLens folder without its item file is a bare ratings log (no items),
    as an events-only JSONL file is; else that file is required."""
    path = Path(path)
    fmt = detect_format(path)
    folder = path.parent if path.is_file() and fmt != JSONL else path
    if fmt in _MOVIELENS_LOADERS:
        if items_optional and not (folder / ITEM_FILES[fmt]).exists():
            return [], movielens_ratings(fmt, folder)
        return _MOVIELENS_LOADERS[fmt](folder)
    if path.is_dir():
        items_path, events_path = path / "items.jsonl", path / "events.jsonl"
        return load_jsonl(items_path if items_path.is_file() else None,
                          events_path if events_path.is_file() else None)
    if _is_events_jsonl(path):
        return load_jsonl(None, path)
    return load_jsonl(path)
