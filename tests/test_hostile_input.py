"""Hostile input: hypothesis over every request message never gets INTERNAL, a crash, or an unasked-for change."""

from __future__ import annotations

import hashlib
import math
import sqlite3

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chronorec.server.config import Limits
from chronorec.server.core.timetext import KNOWN_ACTIONS
from chronorec.v1 import catalog_pb2, common_pb2, encoder_pb2, models_pb2, recommender_pb2
from conftest import ANCHOR
from hardening import Stubs, running_server

pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")

EXAMPLES = 60
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every CI run: a failure is reproducible
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
MEGABYTE_TEXTS = [
    "x" * 1_000_000,
    "\u202e\u05e9\u05dc\u05d5\u05dd " * 100_000,  # RTL override and Hebrew
    "\U0001f600\u200d\U0001f525" * 333_333,  # emoji joined by zero-width joiners
]
SPECIAL = [
    "", " ", "\t\n", "\x00", "\x00abc", "abc\x00", "\x7f", "\x1b[31mred", "\u202eevil", "\ufeff", "\u200b",
    "😀", "👩‍👩‍👧‍👦", "..", "../../etc/passwd", "/", "%s%n", "'; DROP TABLE events; --", "a" * 256, "a" * 257,
    "\ud7ff", "\U0010ffff", "i1", "i2", "u1", "u2", "view", "like", "rating",
]
KNOWN_ITEMS = ["i0", "i1", "i2", "i3", "i39"]

strings = st.one_of(
    st.sampled_from(SPECIAL),
    st.text(max_size=40),
    st.text(alphabet=st.characters(categories=["Cc", "Cf", "So", "Mn", "Zs", "Lo"]), max_size=40),
)
huge_or_plain = st.one_of(strings, st.sampled_from(MEGABYTE_TEXTS))
item_ids = st.one_of(st.sampled_from(KNOWN_ITEMS), strings)
actions = st.one_of(st.sampled_from(KNOWN_ACTIONS), strings)
int32s = st.one_of(st.sampled_from([0, -1, 1, 5, 1000, 1001, 2**31 - 1, -(2**31)]), st.integers(-(2**31), 2**31 - 1))
doubles = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, -1e308, 5e-324, 0.5, 1.0, 2.0]),
    st.floats(allow_nan=True, allow_infinity=True),
)
seconds = st.one_of(
    st.sampled_from([0, -1, int(ANCHOR), int(ANCHOR) - 86400, 4102444799, 4102444800, 253402300799, -62135596800, 2**62, -(2**62)]),
    st.integers(-(2**40), 2**40),
)
nanos = st.one_of(st.sampled_from([0, 999_999_999, 1_000_000_000, -1]), st.integers(-(2**31), 2**31 - 1))


@st.composite
def timestamps(draw) -> Timestamp:
    return Timestamp(seconds=draw(seconds), nanos=draw(nanos))


def valid_time() -> st.SearchStrategy[Timestamp]:
    return st.integers(int(ANCHOR) - 90 * 86400, int(ANCHOR)).map(lambda s: Timestamp(seconds=s))


def unset() -> st.SearchStrategy:
    return st.just(None)


@st.composite
def near_valid(draw, valid: dict, hostile: dict) -> dict:
    """Field values, all valid but (usually) one hostile one, so that requests get past the
    first check and reach the deeper code; now and then everything is hostile."""
    mode = draw(st.sampled_from(["one", "one", "one", "all", "none"]))
    target = draw(st.sampled_from(sorted(hostile)))
    out = {}
    for name, strategy in valid.items():
        use_hostile = mode == "all" or (mode == "one" and name == target)
        out[name] = draw(hostile[name] if use_hostile and name in hostile else strategy)
    return out


def build(message_type, values: dict):
    message = message_type()
    for name, value in values.items():
        if value is None:
            continue
        field = message.DESCRIPTOR.fields_by_name[name]
        if isinstance(value, dict):
            getattr(message, name).update(value)  # a map field
        elif field.is_repeated:
            getattr(message, name).extend(value)
        elif field.message_type is not None:
            getattr(message, name).CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


def events() -> st.SearchStrategy[common_pb2.Event]:
    valid = {
        "event_id": st.uuids().map(str),
        "user_id": st.sampled_from(["u1", "u2", "fuzz-user"]),
        "item_id": st.sampled_from(KNOWN_ITEMS),
        "action": st.sampled_from(KNOWN_ACTIONS),
        "timestamp": st.one_of(unset(), valid_time()),
        "value": st.one_of(unset(), st.floats(1, 5)),
    }
    hostile = {
        "event_id": strings, "user_id": strings, "item_id": strings, "action": strings,
        "timestamp": timestamps(), "value": doubles,
    }
    return near_valid(valid, hostile).map(lambda v: build(common_pb2.Event, v))


def history_events(all_valid: bool = False) -> st.SearchStrategy[common_pb2.HistoryEvent]:
    valid = {
        "item_id": st.sampled_from(KNOWN_ITEMS),
        "action": st.sampled_from(KNOWN_ACTIONS),
        "timestamp": valid_time(),
        "value": st.one_of(unset(), st.floats(1, 5)),
    }
    if all_valid:
        return st.fixed_dictionaries(valid).map(lambda v: build(common_pb2.HistoryEvent, v))
    hostile = {"item_id": strings, "action": strings, "timestamp": st.one_of(unset(), timestamps()), "value": doubles}
    return near_valid(valid, hostile).map(lambda v: build(common_pb2.HistoryEvent, v))


def items() -> st.SearchStrategy[common_pb2.Item]:
    valid = {
        "item_id": st.uuids().map(lambda u: f"fuzz-{u}"),
        "title": st.text(min_size=1, max_size=60).filter(str.strip),
        "text": st.text(max_size=200),
        "category": st.sampled_from(["jazz", "cooking", ""]),
        "published_at": st.one_of(unset(), valid_time()),
        "expires_at": unset(),
        "attributes": st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
    }
    hostile = {
        "item_id": item_ids, "title": huge_or_plain, "text": huge_or_plain, "category": huge_or_plain,
        "published_at": timestamps(), "expires_at": timestamps(),
        "attributes": st.dictionaries(strings, huge_or_plain, max_size=70),
    }
    return near_valid(valid, hostile).map(lambda v: build(common_pb2.Item, v))


@st.composite
def overrides(draw) -> recommender_pb2.TimeModelOverrides:
    message = recommender_pb2.TimeModelOverrides()
    for field in message.DESCRIPTOR.fields:
        if draw(st.booleans()):
            value = draw(int32s) if field.cpp_type == field.CPPTYPE_INT32 else draw(doubles)
            setattr(message, field.name, value)
    return message


def recommend_requests() -> st.SearchStrategy[recommender_pb2.RecommendRequest]:
    valid = {
        "user_id": st.sampled_from(["u1", "u3", "nobody", ""]),
        "k": st.integers(1, 20),
        "at": st.one_of(unset(), st.integers(int(ANCHOR), int(ANCHOR) + 30 * 86400).map(lambda s: Timestamp(seconds=s))),
        "history": st.lists(history_events(all_valid=True), max_size=2),
        "exclude_item_ids": st.lists(st.sampled_from(KNOWN_ITEMS), max_size=3),
        "categories": st.lists(st.sampled_from(["jazz", "cooking"]), max_size=2),
        "allow_repeats": st.booleans(),
        "overrides": st.one_of(unset(), st.just(recommender_pb2.TimeModelOverrides(alpha=0.3, history_max_events=5))),
    }
    hostile = {
        "user_id": strings, "k": int32s, "at": timestamps(), "history": st.lists(history_events(), min_size=1, max_size=4),
        "exclude_item_ids": st.lists(item_ids, max_size=6), "categories": st.lists(huge_or_plain, max_size=4),
        "overrides": overrides(),
    }
    return near_valid(valid, hostile).map(lambda v: build(recommender_pb2.RecommendRequest, v))


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, tiny_repo_template):
    root = tmp_path_factory.mktemp("fuzz")
    # A small message limit and text limit, so the limits themselves are fuzzed too.
    limits = Limits(max_message_bytes=4 * 1024 * 1024, max_texts_per_encode=8, max_feedback_batch=6, max_history_events=2)
    with running_server(root, tiny_repo_template, limits=limits) as running:
        channel = grpc.insecure_channel(
            f"127.0.0.1:{running.port}", options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
        )
        yield running, Stubs(channel), root / "chronorec.db"
        channel.close()


def stored_state(db) -> tuple:
    """Everything a request could change in the database, in a comparable form."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        items_digest = hashlib.sha256(
            repr(conn.execute("SELECT item_id, title, text, category, published_at, expires_at, attributes, deleted_at FROM items ORDER BY item_id").fetchall()).encode()
        ).hexdigest()
        count, last = conn.execute("SELECT count(*), coalesce(max(seq), 0) FROM events").fetchone()
    return items_digest, count, last


def call(rpc, request, *, stream=False):
    """(status code, response or None, details)."""
    try:
        response = rpc(iter(request) if stream else request, timeout=60)
    except grpc.RpcError as error:
        assert error.code() not in NEVER, f"{error.code()}: {error.details()}"
        return error.code(), None, error.details()
    return grpc.StatusCode.OK, response, ""


def still_serving(stubs: Stubs) -> None:
    health = health_pb2_grpc.HealthStub(stubs.channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert stubs.recommender.Recommend(recommender_pb2.RecommendRequest(user_id="u1", k=3), timeout=10).items


def assert_read_only(db, rpc, request, **kw):
    before = stored_state(db)
    result = call(rpc, request, **kw)
    assert stored_state(db) == before, "a read-only RPC changed stored data"
    return result


# Unicode of any kind (control characters, RTL, emoji, combining marks) is a valid text.
any_text = st.one_of(strings, st.text(min_size=1, max_size=300))


@FUZZ
@given(texts=st.one_of(st.lists(any_text, min_size=1, max_size=8), st.lists(huge_or_plain, max_size=10)))
def test_encode(fuzz_server, texts):
    running, stubs, db = fuzz_server
    code, response, _ = assert_read_only(db, stubs.encoder.Encode, encoder_pb2.EncodeRequest(texts=texts))
    if code == grpc.StatusCode.OK:
        assert len(response.embeddings) == len(texts)
        assert all(math.isfinite(v) for e in response.embeddings for v in e.values)


@FUZZ
@given(request=recommend_requests())
def test_recommend(fuzz_server, request):
    running, stubs, db = fuzz_server
    code, response, _ = assert_read_only(db, stubs.recommender.Recommend, request)
    if code == grpc.StatusCode.OK:
        assert len(response.items) <= request.k
        assert all(math.isfinite(r.score) for r in response.items)


def _check_feedback(db, code, response, before, sent):
    after = stored_state(db)
    if code == grpc.StatusCode.OK:
        assert after[0] == before[0]  # feedback never touches items
        assert after[1] == before[1] + response.stored
        assert response.stored + response.duplicates == sent
    else:
        assert after == before, "a refused feedback batch stored something"


@FUZZ
@given(batch=st.lists(events(), max_size=7))
def test_feedback(fuzz_server, batch):
    running, stubs, db = fuzz_server
    before = stored_state(db)
    code, response, _ = call(stubs.recommender.Feedback, recommender_pb2.FeedbackRequest(events=batch))
    _check_feedback(db, code, response, before, len(batch))


@FUZZ
@given(batches=st.lists(st.lists(events(), max_size=3), max_size=3))
def test_feedback_stream(fuzz_server, batches):
    running, stubs, db = fuzz_server
    before = stored_state(db)
    requests = [recommender_pb2.FeedbackRequest(events=b) for b in batches]
    code, response, _ = call(stubs.recommender.FeedbackStream, requests, stream=True)
    if code == grpc.StatusCode.OK:
        _check_feedback(db, code, response, before, sum(len(b) for b in batches))
    else:
        # Batches before the refused one were stored, each whole: the count grew by whole batches.
        after = stored_state(db)
        assert after[0] == before[0]
        assert after[1] - before[1] <= sum(len(b) for b in batches)


@FUZZ
@given(batch=st.lists(items(), max_size=4))
def test_upsert_items(fuzz_server, batch):
    running, stubs, db = fuzz_server
    before = stored_state(db)
    code, response, _ = call(stubs.catalog.UpsertItems, catalog_pb2.UpsertItemsRequest(items=batch))
    if code != grpc.StatusCode.OK:
        assert stored_state(db) == before, "a refused upsert changed the catalog"
        return
    assert response.upserted == len(batch)
    last = {item.item_id: item for item in batch}
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        for item_id, item in last.items():
            row = conn.execute("SELECT title, text, deleted_at FROM items WHERE item_id = ?", (item_id,)).fetchone()
            assert row == (item.title, item.text, None)
    got = stubs.catalog.GetItem(catalog_pb2.GetItemRequest(item_id=batch[-1].item_id), timeout=10).item
    assert got.title == last[batch[-1].item_id].title


@FUZZ
@given(ids=st.lists(st.one_of(strings, st.uuids().map(str)), max_size=5))
def test_delete_items(fuzz_server, ids):
    # Known ids are left out: deleting the catalog would make the other fuzz tests vacuous.
    ids = [i for i in ids if i not in KNOWN_ITEMS]
    running, stubs, db = fuzz_server
    before = stored_state(db)
    code, response, _ = call(stubs.catalog.DeleteItems, catalog_pb2.DeleteItemsRequest(item_ids=ids))
    if code != grpc.StatusCode.OK:
        assert stored_state(db) == before


@FUZZ
@given(item_id=item_ids)
def test_get_item(fuzz_server, item_id):
    running, stubs, db = fuzz_server
    code, response, _ = assert_read_only(db, stubs.catalog.GetItem, catalog_pb2.GetItemRequest(item_id=item_id))
    if code == grpc.StatusCode.OK:
        assert response.item.item_id == item_id


@settings(FUZZ, max_examples=30)
@given(version=st.one_of(strings, st.sampled_from(["../encoder", "..", ".staging-x", "CURRENT", "HISTORY", "v1/../v1"])), wait=st.booleans())
def test_activate_version(fuzz_server, version, wait):
    running, stubs, db = fuzz_server
    serving = running.engine.serving_version()
    code, _, _ = assert_read_only(db, stubs.models.ActivateVersion, models_pb2.ActivateVersionRequest(version=version, wait=wait))
    assert code != grpc.StatusCode.OK or version == serving
    assert running.engine.serving_version() == serving
    assert running.engine.repository.current() == serving


@settings(FUZZ, max_examples=10)
@given(wait=st.booleans())
def test_models_reads_and_rollback(fuzz_server, wait):
    running, stubs, db = fuzz_server
    serving = running.engine.serving_version()
    assert assert_read_only(db, stubs.models.GetStatus, models_pb2.GetStatusRequest())[0] == grpc.StatusCode.OK
    assert assert_read_only(db, stubs.models.ListVersions, models_pb2.ListVersionsRequest())[0] == grpc.StatusCode.OK
    code, _, _ = assert_read_only(db, stubs.models.Rollback, models_pb2.RollbackRequest(wait=wait))
    assert code == grpc.StatusCode.NOT_FOUND  # one version: nothing to roll back to
    assert running.engine.serving_version() == serving


METHODS = {
    "/chronorec.v1.EncoderService/Encode": False,
    "/chronorec.v1.RecommenderService/Recommend": False,
    "/chronorec.v1.RecommenderService/Feedback": True,
    "/chronorec.v1.RecommenderService/FeedbackStream": True,
    "/chronorec.v1.CatalogService/UpsertItems": True,
    "/chronorec.v1.CatalogService/DeleteItems": True,
    "/chronorec.v1.CatalogService/GetItem": False,
    "/chronorec.v1.ModelService/GetStatus": False,
    "/chronorec.v1.ModelService/ListVersions": False,
    "/chronorec.v1.ModelService/ActivateVersion": False,
    "/chronorec.v1.ModelService/Rollback": False,
}


@settings(FUZZ, max_examples=120)
@given(method=st.sampled_from(sorted(METHODS)), payload=st.binary(max_size=200))
def test_raw_bytes_to_every_method(fuzz_server, method, payload):
    """Bytes that are not the request message (what a non-Python client with a bug could send)."""
    running, stubs, db = fuzz_server
    before = stored_state(db)
    if method.endswith("Stream"):
        call(stubs.channel.stream_unary(method), [payload], stream=True)
    else:
        call(stubs.channel.unary_unary(method), payload)
    if not METHODS[method]:
        assert stored_state(db) == before


def test_invalid_utf8_is_invalid_argument(fuzz_server):
    running, stubs, db = fuzz_server
    # Field 1 (texts), length 2, bytes that are not UTF-8: protobuf refuses to parse them.
    code, _, details = call(stubs.channel.unary_unary("/chronorec.v1.EncoderService/Encode"), b"\x0a\x02\xff\xfe")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid protobuf" in details
    code, _, _ = call(stubs.channel.stream_unary("/chronorec.v1.RecommenderService/FeedbackStream"), [b"\x0a\x02\xff\xfe"], stream=True)
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_limits_name_themselves(fuzz_server):
    running, stubs, db = fuzz_server
    cases = [
        (stubs.encoder.Encode, encoder_pb2.EncodeRequest(texts=["a"] * 9), "max_texts_per_encode"),
        (stubs.encoder.Encode, encoder_pb2.EncodeRequest(texts=["a" * 20_001]), "max_text_chars"),
        (stubs.recommender.Recommend, recommender_pb2.RecommendRequest(user_id="u1", k=1001), "max_k"),
        (
            stubs.recommender.Recommend,
            recommender_pb2.RecommendRequest(k=3, history=[common_pb2.HistoryEvent(item_id="i1")] * 3),
            "max_history_events",
        ),
        (stubs.recommender.Recommend, recommender_pb2.RecommendRequest(user_id="u1", k=3, exclude_item_ids=["x"] * 10_001), "max_exclude_items"),
        (stubs.recommender.Recommend, recommender_pb2.RecommendRequest(user_id="u1", k=3, categories=["x"] * 1001), "max_categories"),
        (stubs.recommender.Feedback, recommender_pb2.FeedbackRequest(events=[common_pb2.Event()] * 7), "max_feedback_batch"),
        (
            stubs.catalog.UpsertItems,
            catalog_pb2.UpsertItemsRequest(items=[common_pb2.Item(item_id="a", title="t", attributes={str(i): "v" for i in range(65)})]),
            "max_item_attributes",
        ),
    ]
    for rpc, request, limit in cases:
        code, _, details = call(rpc, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and limit in details, (limit, code, details)
    code, _, details = call(stubs.encoder.Encode, encoder_pb2.EncodeRequest(texts=["x" * 5_000_000]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details
    still_serving(stubs)


def test_server_survived_the_fuzzing(fuzz_server):
    running, stubs, db = fuzz_server
    still_serving(stubs)
