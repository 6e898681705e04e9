"""A version that ships a learned ranker, in the running server: it serves, hot-swaps without a failed call,
rolls back to the blend, and a broken ranker file refuses the version."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from chronorec.server.core.features import FEATURE_INDEX, FEATURE_NAMES
from chronorec.server.core.learned_ranker import LearnedRanker, RankerSpec
from chronorec.server.core.repository import ModelRepository
from chronorec.v1 import models_pb2, recommender_pb2
from conftest import ANCHOR
from test_hot_swap import seeded_db, wait_for
from test_server import ts

CANDIDATES = 50


def popularity_ranker() -> LearnedRanker:
    """A small LambdaRank model that learned to put the popular item first (what matters here is
    that it is a real model file the server must load, check and run)."""
    import lightgbm

    rng = np.random.default_rng(0)
    groups, size = 60, 20
    features = rng.random((groups * size, len(FEATURE_NAMES))).astype(np.float32)
    popularity = features[:, FEATURE_INDEX["popularity_share"]].reshape(groups, size)
    labels = (popularity == popularity.max(axis=1, keepdims=True)).astype(float).ravel()
    booster = lightgbm.train({"objective": "lambdarank", "min_data_in_leaf": 5, "verbosity": -1, "num_threads": 1},
                             lightgbm.Dataset(features, label=labels, group=[size] * groups), num_boost_round=15)
    return LearnedRanker(booster, RankerSpec(features=FEATURE_NAMES, candidates=CANDIDATES))


def publish_with_ranker(tiny_bert_dir, repo, ranker: LearnedRanker | None, activate: bool = False) -> str:
    from chronorec.trainer.export import publish_base_model

    return publish_base_model(tiny_bert_dir, repo, activate=activate, ranker=ranker)


def recommend(server, user: str = "u1"):
    return server.recommender.Recommend(recommender_pb2.RecommendRequest(user_id=user, k=5, at=ts(ANCHOR)), timeout=10)


def test_a_version_with_a_ranker_serves_hot_swaps_and_rolls_back(start_server, tiny_repo, tiny_bert_dir, tmp_path):
    server = start_server(tiny_repo, db=seeded_db(tmp_path), watch_interval_s=0)
    blend_version = server.engine.serving_version()
    before = recommend(server)
    assert before.items and all(not item.reasons.features for item in before.items)

    ranked_version = publish_with_ranker(tiny_bert_dir, tiny_repo, popularity_ranker())
    failures: list[str] = []
    answers: list[tuple[float, str, bool]] = []
    stop = threading.Event()

    def recommend_loop(user: str) -> None:
        while not stop.is_set():
            try:
                response = recommend(server, user)
                answers.append((time.time(), response.model_version, all(i.reasons.features for i in response.items)))
            except grpc.RpcError as error:
                failures.append(f"Recommend {error.code()}: {error.details()}")

    threads = [threading.Thread(target=recommend_loop, args=(f"u{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)
        activated = server.models.ActivateVersion(models_pb2.ActivateVersionRequest(version=ranked_version, wait=True))
        assert activated.serving_version == ranked_version
        swapped_at = time.time()
        time.sleep(0.8)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not failures, failures[:5]
    assert {version for _, version, _ in answers} == {blend_version, ranked_version}
    # Every answer of the ranked version names the features behind each item; the blend's none.
    assert all(explained for _, version, explained in answers if version == ranked_version)
    late = [version for t, version, _ in answers if t > swapped_at + 0.2]
    assert late and set(late) == {ranked_version}

    after = recommend(server)
    assert after.model_version == ranked_version
    for item in after.items:
        names = [f.name for f in item.reasons.features]
        assert names and set(names) <= set(FEATURE_NAMES)
        contributions = [abs(f.contribution) for f in item.reasons.features]
        assert contributions == sorted(contributions, reverse=True)

    # Rollback goes back to the blend, and the answers with it.
    rolled = server.models.Rollback(models_pb2.RollbackRequest(wait=True))
    assert rolled.serving_version == blend_version
    back = recommend(server)
    assert back.model_version == blend_version and all(not item.reasons.features for item in back.items)
    assert [i.item_id for i in back.items] == [i.item_id for i in before.items]


@pytest.mark.parametrize("damage", ["garbage", "missing", "unknown-feature"])
def test_a_broken_ranker_refuses_the_version(start_server, tiny_repo, tiny_bert_dir, tmp_path, damage):
    import json

    server = start_server(tiny_repo, db=seeded_db(tmp_path), watch_interval_s=0)
    repo = ModelRepository(tiny_repo)
    serving = server.engine.serving_version()
    broken = publish_with_ranker(tiny_bert_dir, tiny_repo, popularity_ranker())
    folder = repo.version_dir(broken)
    if damage == "garbage":
        (folder / "ranker.txt").write_text("tree\nnot a model at all\n")
    elif damage == "missing":
        (folder / "ranker.txt").unlink()
    else:
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["ranker"]["features"][0] = "a_feature_from_the_future"
        (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(grpc.RpcError) as info:
        server.models.ActivateVersion(models_pb2.ActivateVersionRequest(version=broken, wait=True))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "ranker" in info.value.details() or "feature" in info.value.details()
    assert repo.current() == serving
    status = server.models.GetStatus(models_pb2.GetStatusRequest())
    assert status.serving_version == serving and broken in status.last_error
    assert str(tiny_repo) not in status.last_error  # no server path in what a client reads
    assert recommend(server).model_version == serving
