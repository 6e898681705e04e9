"""Importers: MovieLens 100K / latest / 1M-10M and generic JSONL, on tiny files and on the real data when present."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chronorec.server.core import errors
from chronorec.server.core.catalog import Event, Item
from chronorec.server.core.importers import (
    ITEM_FILES, JSONL, ML100K, ML_DAT, ML_LATEST, RATINGS_FILES, detect_and_load, detect_format, load_jsonl,
    load_movielens_100k, load_movielens_dat, load_movielens_latest, movielens_ratings, parse_time,
)
from chronorec.server.core.store import EventStore

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]


def flags(*names: str) -> str:
    return "|".join("1" if g in names else "0" for g in GENRES)


@pytest.fixture
def ml100k(tmp_path: Path) -> Path:
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    (folder / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(GENRES)) + "\n", encoding="latin-1")
    toy_genres = flags("Animation", "Children's", "Comedy")
    (folder / "u.item").write_text(
        f"1|Toy Story (1995)|01-Jan-1995||http://imdb/1|{toy_genres}\n"
        f"2|Café Society\x85 (1995)|01-Jan-1995||http://imdb/2|{flags('Drama')}\n"
        f"3|unknown||||{flags('unknown')}\n",
        encoding="latin-1",
    )
    (folder / "u.data").write_text("7\t2\t4\t881250949\n5\t1\t3\t881250000\n7\t1\t5\t881250950\n")
    return folder


@pytest.fixture
def ml_latest(tmp_path: Path) -> Path:
    folder = tmp_path / "ml-latest-small"
    folder.mkdir()
    (folder / "movies.csv").write_text(
        "movieId,title,genres\n"
        "1,Toy Story (1995),Adventure|Animation|Children\n"
        '11,"American President, The (1995)",Comedy|Drama|Romance\n'
        "99,Nothing (2020),(no genres listed)\n",
        encoding="utf-8",
    )
    tags = ["pixar", "fun", "Pixar", "  funny   movie "] + [f"t{k}" for k in range(12)]
    (folder / "tags.csv").write_text(
        "userId,movieId,tag,timestamp\n" + "".join(f"2,1,{t},1445714994\n" for t in tags) + "3,11,politics,1\n")
    (folder / "links.csv").write_text("movieId,imdbId,tmdbId\n1,0114709,862\n11,0112346,\n")
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,11,3.5,964981247\n")
    return folder


def test_movielens_100k_tiny(ml100k: Path):
    items, events = load_movielens_100k(ml100k)
    assert items[0] == Item("1", "Toy Story (1995)", category="Animation, Children's, Comedy",
                            attributes={"release_date": "01-Jan-1995", "imdb_url": "http://imdb/1"})
    assert items[1].title == "Café Society\x85 (1995)" and items[1].published_at is None  # 0x85: no line break
    assert items[2].category == "unknown"
    assert events == [
        Event("ml100k-1", "7", "2", "rating", 881250949.0, 4.0),
        Event("ml100k-2", "5", "1", "rating", 881250000.0, 3.0),
        Event("ml100k-3", "7", "1", "rating", 881250950.0, 5.0),
    ]
    assert detect_format(ml100k) == ML100K
    assert detect_and_load(ml100k / "u.data") == (items, events)


def test_movielens_100k_bad_line_is_named(ml100k: Path):
    with (ml100k / "u.data").open("a") as f:
        f.write("1\t2\tfour\t3\n")
    with pytest.raises(errors.InvalidArgument, match=r"u\.data:4: rating and timestamp"):
        load_movielens_100k(ml100k)
    (ml100k / "u.data").write_text("1\t2\t3\n")
    with pytest.raises(errors.InvalidArgument, match=r"u\.data:1: expected 4"):
        load_movielens_100k(ml100k)


def test_movielens_latest_tiny(ml_latest: Path):
    items, events = load_movielens_latest(ml_latest)
    toy, president, nothing = items
    assert toy.category == "Adventure, Animation, Children"
    assert toy.text == "pixar, fun, funny movie, " + ", ".join(f"t{k}" for k in range(7))  # distinct, up to 10
    assert toy.attributes == {"imdb_id": "0114709", "tmdb_id": "862"}
    assert president.title == "American President, The (1995)" and president.text == "politics"
    assert president.attributes == {"imdb_id": "0112346"}
    assert nothing.category == "" and nothing.text == ""
    assert events == [Event("mllatest-2", "1", "1", "rating", 964982703.0, 4.0),
                      Event("mllatest-3", "1", "11", "rating", 964981247.0, 3.5)]
    assert detect_format(ml_latest) == ML_LATEST
    assert detect_and_load(ml_latest) == (items, events)


def test_movielens_latest_bad_header(ml_latest: Path):
    (ml_latest / "ratings.csv").write_text("user,movie\n1,2\n")
    with pytest.raises(errors.InvalidArgument, match=r"ratings\.csv:1: header lacks"):
        load_movielens_latest(ml_latest)


@pytest.fixture
def ml_dat(tmp_path: Path) -> Path:
    """ML-1M's layout: latin-1 movies.dat, users.dat beside (not read), no tags."""
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    (folder / "movies.dat").write_text(
        "1::Toy Story (1995)::Animation|Children's|Comedy\n"
        "2::Café Society\x85 (1995)::Drama\r\n"
        "3::Nothing (2020)::(no genres listed)\n\n",
        encoding="latin-1",
    )
    (folder / "users.dat").write_text("1::F::1::10::48067\n")
    (folder / "ratings.dat").write_text("1::1193::5::978300760\n\n1::2::3.5::978302109\n")
    return folder


def test_movielens_dat_tiny(ml_dat: Path):
    items, events = load_movielens_dat(ml_dat)
    toy, cafe, nothing = items
    assert toy == Item("1", "Toy Story (1995)", category="Animation, Children's, Comedy")
    assert cafe.title == "Café Society\x85 (1995)" and cafe.category == "Drama"  # 0x85 is no line break here
    assert nothing.category == "" and nothing.text == ""
    assert events == [Event("mldat-1", "1", "1193", "rating", 978300760.0, 5.0),
                      Event("mldat-3", "1", "2", "rating", 978302109.0, 3.5)]
    assert detect_format(ml_dat) == ML_DAT
    assert detect_and_load(ml_dat / "ratings.dat") == (items, events)


def test_movielens_dat_utf8_titles_and_tags(ml_dat: Path):
    """ML-10M's layout: UTF-8 files and a tags.dat whose tags may hold '::'."""
    (ml_dat / "movies.dat").write_text("1::Amélie (2001)::Comedy|Romance\n7::Odd::Title (1999)::Drama\n",
                                       encoding="utf-8")
    tags = ["whimsical", "Whimsical", "  paris   cafés ", "note::spoiler"] + [f"t{k}" for k in range(12)]
    (ml_dat / "tags.dat").write_text("".join(f"15::1::{t}::1215184630\n" for t in tags) + "3::7::noir::1\n",
                                     encoding="utf-8")
    amelie, odd = load_movielens_dat(ml_dat)[0]
    assert amelie.title == "Amélie (2001)" and amelie.category == "Comedy, Romance"
    assert amelie.text == "whimsical, paris cafés, note::spoiler, " + ", ".join(f"t{k}" for k in range(7))
    assert odd.title == "Odd::Title (1999)" and odd.text == "noir"


def test_movielens_dat_bad_lines_are_named(ml_dat: Path):
    with (ml_dat / "ratings.dat").open("a") as f:
        f.write("1::2::four::3\n")
    with pytest.raises(errors.InvalidArgument, match=r"ratings\.dat:4: rating and timestamp"):
        load_movielens_dat(ml_dat)
    (ml_dat / "ratings.dat").write_text("1::2::3\n")
    with pytest.raises(errors.InvalidArgument, match=r"ratings\.dat:1: expected 4"):
        load_movielens_dat(ml_dat)
    (ml_dat / "movies.dat").write_text("1 Toy Story\n")
    with pytest.raises(errors.InvalidArgument, match=r"movies\.dat:1: expected"):
        load_movielens_dat(ml_dat)
    (ml_dat / "tags.dat").write_text("15::1::whimsical::soon\n")
    with pytest.raises(errors.InvalidArgument, match=r"tags\.dat:1: expected"):
        load_movielens_dat(ml_dat)
    (ml_dat / "tags.dat").unlink()
    (ml_dat / "movies.dat").unlink()
    with pytest.raises(errors.InvalidArgument, match=r"movies\.dat: no such file"):
        load_movielens_dat(ml_dat)


def test_a_ratings_file_without_its_item_file_is_a_bare_log_where_the_caller_takes_one(ml100k, ml_latest, ml_dat):
    """The evaluation ranks items known by their ids alone; the import needs the catalogue."""
    for folder, loader in ((ml100k, load_movielens_100k), (ml_latest, load_movielens_latest),
                           (ml_dat, load_movielens_dat)):
        fmt = detect_format(folder)
        _, events = loader(folder)
        assert movielens_ratings(fmt, folder) == events
        (folder / ITEM_FILES[fmt]).unlink()
        with pytest.raises(errors.InvalidArgument, match=rf"{ITEM_FILES[fmt].replace('.', '[.]')}: no such file"):
            detect_and_load(folder)
        items, bare = detect_and_load(folder, items_optional=True)
        assert items == [] and bare == events
        # The ratings file itself is still required.
        (folder / RATINGS_FILES[fmt]).unlink()
        with pytest.raises(errors.InvalidArgument, match=rf"{RATINGS_FILES[fmt].replace('.', '[.]')}: no such file"):
            movielens_ratings(fmt, folder)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_round_trip_into_store(tmp_path: Path):
    items_path = write_jsonl(tmp_path / "items.jsonl", [
        {"item_id": "a", "title": "Sourdough", "text": "bread", "category": "cooking",
         "published_at": "2024-05-01T00:00:00Z", "expires_at": 1719792000, "attributes": {"pages": 12, "by": "Ann"}},
        "",
        {"item_id": "b", "title": "Jazz night", "published_at": "2024-05-01"},
    ])
    events_path = write_jsonl(tmp_path / "events.jsonl", [
        {"event_id": "e1", "user_id": "u", "item_id": "a", "action": "rating", "timestamp": 1714600000, "value": 5},
        {"event_id": "e2", "user_id": "u", "item_id": "b", "action": "click", "timestamp": "2024-05-02T10:00:00+02:00"},
    ])
    items, events = load_jsonl(items_path, events_path)
    assert items[0] == Item("a", "Sourdough", "bread", "cooking", 1714521600.0, 1719792000.0,
                            {"pages": "12", "by": "Ann"})
    assert items[1] == Item("b", "Jazz night", published_at=1714521600.0)
    assert events[1] == Event("e2", "u", "b", "click", 1714636800.0, None)
    assert detect_format(tmp_path) == JSONL
    assert detect_and_load(tmp_path) == (items, events)
    assert detect_and_load(events_path) == ([], events)
    assert detect_and_load(items_path) == (items, [])
    with EventStore(tmp_path / "e.db") as store:
        assert store.bulk_import(items, events).events_added == 2
        assert store.events_for_user("u")[0].value == 5.0


@pytest.mark.parametrize("line, fragment", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"event_id": "x", "user_id": "u", "item_id": "a", "action": "click"}, "missing field 'timestamp'"),
    ({"event_id": "x", "user_id": "u", "item_id": "a", "action": "poke", "timestamp": 5}, "action 'poke'"),
    ({"event_id": "x", "user_id": "u", "item_id": "a", "action": "click", "timestamp": "yesterday"}, "ISO-8601"),
    ({"event_id": 7, "user_id": "u", "item_id": "a", "action": "click", "timestamp": 5}, "'event_id' has the wrong"),
])
def test_jsonl_errors_name_the_line(tmp_path: Path, line, fragment: str):
    good = {"event_id": "ok", "user_id": "u", "item_id": "a", "action": "view", "timestamp": 1}
    path = write_jsonl(tmp_path / "events.jsonl", [good, "", line])
    with pytest.raises(errors.InvalidArgument, match=fragment) as info:
        load_jsonl(None, path)
    assert info.value.message.startswith(f"{path}:3: ")


def test_jsonl_item_errors(tmp_path: Path):
    path = write_jsonl(tmp_path / "items.jsonl", [{"item_id": "a", "title": "t", "published_at": 10, "expires_at": 5}])
    with pytest.raises(errors.InvalidArgument, match=r"items\.jsonl:1: expires_at must be later"):
        load_jsonl(path)


def test_parse_time():
    assert parse_time(None) is None
    assert parse_time(12) == 12.0
    assert parse_time("1970-01-02") == 86400.0
    assert parse_time("1970-01-01T01:00:00+01:00") == 0.0
    for bad in (True, float("nan"), "soon", [1]):
        with pytest.raises(ValueError):
            parse_time(bad)


def test_detect_unknown(tmp_path: Path):
    with pytest.raises(errors.InvalidArgument, match="no such file"):
        detect_and_load(tmp_path / "missing")
    with pytest.raises(errors.InvalidArgument, match="no known dataset"):
        detect_and_load(tmp_path)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(errors.InvalidArgument, match="unknown dataset format"):
        detect_and_load(tmp_path / "x.txt")


# -- real data (skipped when /work/shared/data is absent) --------------------------------


@pytest.mark.skipif(not (DATA / "ml-100k" / "u.data").is_file(), reason="MovieLens 100K not present")
def test_real_movielens_100k(tmp_path: Path):
    items, events = detect_and_load(DATA / "ml-100k")
    assert len(events) == 100_000 and len(items) == 1682
    assert len({e.user_id for e in events}) == 943
    assert events[0].event_id == "ml100k-1" and items[0].title == "Toy Story (1995)"
    with EventStore(tmp_path / "e.db") as store:
        assert store.bulk_import(items, events) == (1682, 100_000, 0)
        assert store.count_users() == 943
        assert [e.event_id for _, e in store.iter_events()][:3] == ["ml100k-1", "ml100k-2", "ml100k-3"]


@pytest.mark.skipif(not (DATA / "ml-latest-small" / "ratings.csv").is_file(), reason="ml-latest-small not present")
def test_real_movielens_latest_small():
    items, events = detect_and_load(DATA / "ml-latest-small")
    assert len(events) == 100_836 and len(items) == 9742
    assert len({e.user_id for e in events}) == 610
    assert {e.item_id for e in events} <= {it.item_id for it in items}
