"""The shared rules (chronorec.client.rules) and how the server and the client apply them: ids, times, Timestamp nanos."""

from __future__ import annotations

import math
import subprocess
import sys

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from chronorec.client import rules
from chronorec.client.client import FeedbackEvent, build_recommend_request, event_to_proto, item_to_proto
from chronorec.server.core import errors
from chronorec.server.core.catalog import Event
from chronorec.server.core.store import event_problem
from chronorec.server.service.convert import check_id, to_seconds
from chronorec.v1 import catalog_pb2, common_pb2, recommender_pb2
from conftest import ANCHOR
from hardening import Stubs, running_server

C1_IDS = ["a\x85b", "\x80", "x\x9f", "\x8dline"]  # NEL, PAD, APC, RI: the C1 block U+0080..U+009F
C0_IDS = ["a\x00b", "\x1b[31mred", "tab\there", "\x7f"]


# -- the rules themselves -----------------------------------------------------------------


@pytest.mark.parametrize("value", C1_IDS + C0_IDS)
def test_control_characters_are_refused_in_ids(value):
    assert rules.id_problem(value) == "contains control characters"


@pytest.mark.parametrize("value", ["i1", "a" * rules.MAX_ID_CHARS, "\xa0nbsp", "é", "東京", "😀", "a b", "../x"])
def test_ordinary_ids_pass(value):
    assert rules.id_problem(value) is None
    assert rules.check_id(value, "item_id") == value


@pytest.mark.parametrize("value, problem", [
    ("", "is empty"),
    ("a" * (rules.MAX_ID_CHARS + 1), "is longer than 256 characters"),
    (7, "must be a string, got int"),
    (None, "must be a string, got NoneType"),
])
def test_id_problems_name_the_rule(value, problem):
    assert rules.id_problem(value) == problem
    with pytest.raises(ValueError, match=f"^user_id {problem}"):
        rules.check_id(value, "user_id")


@pytest.mark.parametrize("seconds", [-1, -0.001, rules.MAX_TIME, 1.7e12, math.nan, math.inf, True, "0", None])
def test_times_outside_1970_to_2100_are_refused(seconds):
    assert rules.time_problem(seconds) is not None
    with pytest.raises(ValueError, match="^at "):
        rules.check_time(seconds, "at")


@pytest.mark.parametrize("seconds", [0, 0.0, ANCHOR, rules.MAX_TIME - 1])
def test_times_inside_pass(seconds):
    assert rules.time_problem(seconds) is None and rules.check_time(seconds, "at") == float(seconds)


@pytest.mark.parametrize("nanos", [-1, rules.NANOS_PER_SECOND, 2**31 - 1, -(2**31)])
def test_timestamp_nanos_outside_a_second_are_refused(nanos):
    assert rules.timestamp_problem(int(ANCHOR), nanos) == f"nanos must be between 0 and 999999999, got {nanos}"


def test_timestamp_in_range_passes_and_its_seconds_are_checked():
    assert rules.timestamp_problem(int(ANCHOR), 0) is None
    assert rules.timestamp_problem(int(ANCHOR), rules.NANOS_PER_SECOND - 1) is None
    assert "between 1970 and 2100" in rules.timestamp_problem(-1, 500)


def test_rules_import_only_the_standard_library():
    """A client-only install has grpcio and protobuf alone: the rules must not need even those."""
    probe = (
        "import sys; import chronorec.client.rules; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'grpc', 'google', 'numpy', 'chronorec_server'}), "
        "sorted(m for m in sys.modules if m.startswith('chronorec.') and m != 'chronorec.client.rules' "
        "and m != 'chronorec.client'))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split("\n")[0]
    assert out == "[] []"


# -- every side applies the same rule ------------------------------------------------------


@pytest.mark.parametrize("value", C1_IDS)
def test_server_store_and_client_all_refuse_c1_ids(value):
    with pytest.raises(errors.InvalidArgument, match="^event 0: user_id contains control characters"):
        check_id(value, "event 0: user_id")
    assert event_problem(Event("e1", value, "i1", "view", ANCHOR)) == "user_id contains control characters"
    with pytest.raises(ValueError, match="user_id contains control characters"):
        event_to_proto(FeedbackEvent(value, "i1", "view", timestamp=ANCHOR))
    with pytest.raises(ValueError, match="item_id contains control characters"):
        item_to_proto({"item_id": value, "title": "t"})


def test_converter_refuses_nanos_and_names_the_field():
    with pytest.raises(errors.InvalidArgument, match=r"^at nanos must be between 0 and 999999999, got -1$"):
        to_seconds(Timestamp(seconds=int(ANCHOR), nanos=-1), "at")
    assert to_seconds(Timestamp(seconds=int(ANCHOR), nanos=500_000_000), "at") == ANCHOR + 0.5


def test_client_refuses_times_the_server_would_refuse():
    with pytest.raises(ValueError, match="event: timestamp must be unix seconds between 1970 and 2100"):
        event_to_proto(FeedbackEvent("u1", "i1", "view", timestamp=1.7e12))  # milliseconds by mistake
    with pytest.raises(ValueError, match="recommend: at must be unix seconds"):
        build_recommend_request("u1", at=-5.0)
    assert build_recommend_request("u1", at=ANCHOR).at.seconds == int(ANCHOR)


# -- over gRPC (F9) --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stubs(tmp_path_factory, tiny_repo_template):
    root = tmp_path_factory.mktemp("rules")
    with running_server(root, tiny_repo_template) as running:
        channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        yield Stubs(channel), running
        channel.close()


def _invalid(call, request) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    return info.value.details()


def _event(**fields) -> common_pb2.Event:
    values = {"event_id": "f9-event", "user_id": "u1", "item_id": "i1", "action": "view"}
    values.update(fields)
    return common_pb2.Event(**values)


@pytest.mark.parametrize("value", ["a\x85b", "\x9f"])
def test_c1_ids_are_invalid_argument_naming_the_field(stubs, value):
    stub, running = stubs
    store = running.engine.store
    before = (store.count_events(), store.count_items())
    feedback = lambda event: _invalid(stub.recommender.Feedback, recommender_pb2.FeedbackRequest(events=[event]))
    assert "user_id contains control characters" in feedback(_event(user_id=value))
    assert "event_id contains control characters" in feedback(_event(event_id=value))
    assert "item_id contains control characters" in feedback(_event(item_id=value))
    upsert = catalog_pb2.UpsertItemsRequest(items=[common_pb2.Item(item_id=value, title="t")])
    assert "item_id contains control characters" in _invalid(stub.catalog.UpsertItems, upsert)
    recommend = recommender_pb2.RecommendRequest(user_id=value, k=3)
    assert "user_id contains control characters" in _invalid(stub.recommender.Recommend, recommend)
    history = recommender_pb2.RecommendRequest(k=3, history=[common_pb2.HistoryEvent(
        item_id=value, action="view", timestamp=Timestamp(seconds=int(ANCHOR)))])
    assert "item_id contains control characters" in _invalid(stub.recommender.Recommend, history)
    assert (store.count_events(), store.count_items()) == before


@pytest.mark.parametrize("nanos", [-1, 1_000_000_000])
def test_timestamp_nanos_outside_a_second_are_invalid_argument(stubs, nanos):
    stub, running = stubs
    store = running.engine.store
    before = (store.count_events(), store.count_items())
    bad = Timestamp(seconds=int(ANCHOR) - 3600, nanos=nanos)
    details = _invalid(stub.recommender.Feedback, recommender_pb2.FeedbackRequest(events=[_event(timestamp=bad)]))
    assert f"timestamp nanos must be between 0 and 999999999, got {nanos}" in details
    details = _invalid(stub.recommender.Recommend, recommender_pb2.RecommendRequest(user_id="u1", k=3, at=bad))
    assert "at nanos must be between" in details
    upsert = catalog_pb2.UpsertItemsRequest(items=[common_pb2.Item(item_id="f9-item", title="t", published_at=bad)])
    assert "published_at nanos must be between" in _invalid(stub.catalog.UpsertItems, upsert)
    assert (store.count_events(), store.count_items()) == before
    # The same request with valid nanos goes through.
    good = Timestamp(seconds=int(ANCHOR) - 3600, nanos=999_999_999)
    assert stub.recommender.Recommend(recommender_pb2.RecommendRequest(user_id="u1", k=3, at=good), timeout=30).items
