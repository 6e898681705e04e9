"""`chronorec-train run` end to end: learn, evaluate against the serving version, publish, gate, exit codes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from chronorec.server.core.catalog import Event
from chronorec.server.core.demo import generate_drift_dataset
from chronorec.server.core.manifest import TimeModelParams, load_manifest
from chronorec.server.core.repository import ModelRepository
from chronorec.server.core.store import EventStore
from chronorec.trainer.export import publish_base_model
from chronorec.trainer.pipeline import (
    EXIT_ACTIVATED, EXIT_FAILED, EXIT_GATED, EXIT_NOTHING_NEW, RunSettings, checkpoint_dir, parse_interval, run,
    run_once,
)
from tinybert import make_tiny_bert

ANCHOR = 1_790_000_000.0
TESTS = Path(__file__).resolve().parent
# Few steps of a tiny BERT: enough to learn the topics of the generated users.
# The time model is tuned on part of the validation window (366 events), so the ranker and the blend
# compare on the rest.
TRAIN = dict(steps=36, batch_size=32, lr=2e-3, eval_every=12, patience=10, progress=False, ablation=True, threads=1,
             max_tune_instances=240)
# Runs that test the gate, the exit codes and the export's atomicity train no learned ranker: first_run
# trains and ships one (and tests/test_learned_ranker.py tests it whole), which takes most of a run.
QUICK = dict(steps=2, batch_size=16, lr=2e-3, tune=False, progress=False, max_eval_instances=60, threads=1,
             ranker=False)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def drift():
    return generate_drift_dataset(seed=7, anchor=ANCHOR)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("pipeline-tiny-bert"))


def _fresh_world(root: Path, drift, tiny_folder: Path) -> tuple[Path, Path, str]:
    """An event store with the generated log and a repository serving the untrained tiny BERT."""
    db, models = root / "events.db", root / "models"
    with EventStore(db) as store:
        store.bulk_import(drift.items, drift.events)
    # A 64-token limit (in the manifest, so the trainer uses it too) keeps CPU tests quick.
    base = publish_base_model(tiny_folder, models, activate=True, max_length=64)
    return db, models, base


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, drift, tiny_folder):
    db, models, base = _fresh_world(tmp_path_factory.mktemp("pipeline"), drift, tiny_folder)
    outcome = run_once(db, models, RunSettings(**TRAIN))
    return db, models, base, outcome


def test_training_on_drifting_users_beats_the_base_model(first_run):
    _, models, base, outcome = first_run
    assert outcome.exit_code == EXIT_ACTIVATED, outcome.message
    assert outcome.serving_version == base
    # Candidate and serving version on the same latest window, full ranking, same ranking code.
    assert outcome.candidate_metrics["NDCG@10"] > outcome.serving_metrics["NDCG@10"] + 0.05
    ablation = outcome.details["ablation"]
    # The fine-tuned encoder alone beats the untrained one alone: the gain is not only the tuning.
    assert ablation["candidate_encoder_only"]["NDCG@10"] > ablation["initial_weights_encoder_only"]["NDCG@10"] + 0.02
    # And with the same tuned time model, the fine-tuned weights beat the starting ones.
    assert outcome.candidate_metrics["NDCG@10"] > ablation["initial_weights_tuned_time_model"]["NDCG@10"]
    # A step budget smaller than the window trains on the newest examples, the closest to what comes next.
    used = outcome.details["train_examples"]
    assert used["used"] == min(TRAIN["steps"] * TRAIN["batch_size"], used["window"])
    assert used["newest_only"] == (used["used"] < used["window"])


def test_the_published_version_records_how_it_was_made(first_run):
    db, models, base, outcome = first_run
    repo = ModelRepository(models)
    assert repo.current() == outcome.version and repo.list_versions() == [base, outcome.version]
    manifest = load_manifest(repo.version_dir(outcome.version))
    assert manifest.parent_version == base
    assert manifest.base_model == load_manifest(repo.version_dir(base)).base_model
    assert manifest.parity_max_abs_diff <= 1e-4
    assert manifest.metrics["NDCG@10"] == pytest.approx(outcome.candidate_metrics["NDCG@10"])
    assert manifest.metrics["serving_NDCG@10"] == pytest.approx(outcome.serving_metrics["NDCG@10"])
    assert manifest.metrics["train_examples_per_second"] > 0
    assert manifest.time_model == TimeModelParams.from_dict(outcome.details["time_model"])
    window = manifest.training_window
    assert window["start"] < window["end"] == window["valid_start"] < window["test_start"] <= window["data_end"]
    with EventStore(db, read_only=True) as store:
        assert window["max_seq"] == store.max_seq()
    assert manifest.extra["trainer"]["gate"]["passed"] is True
    # The learned ranker ships in the version: it beat the blend on the validation window.
    assert manifest.ranker is not None and (repo.version_dir(outcome.version) / manifest.ranker["file"]).is_file()
    ranker = manifest.extra["trainer"]["ranker"]
    assert ranker["used"] is True
    # Decided where the blend's time model was not tuned: the rest of the validation window.
    held = ranker["valid_held_out"]
    assert held["events"] == ranker["valid_instances"] - outcome.details["tuning"]["instances"] > 0
    assert held["NDCG@10_ranker"] > held["NDCG@10_blend"]
    assert manifest.extra["trainer"]["encoder"]["fine_tuned"] is True
    # The two tuned blends compared on the validation instances neither was tuned on.
    fused = manifest.extra["trainer"]["encoder"]["fused_valid"]
    assert fused["held_out"] and fused["instances"] == 366 - 240 and fused["ci95_user_clustered"][0] > 0
    # The trainable weights are kept beside the version, so the next run continues from them.
    assert (checkpoint_dir(models, outcome.version) / "config.json").is_file()
    assert not (models / "checkpoints" / ".in-progress").exists()


def test_the_catalog_is_encoded_into_the_new_versions_vector_cache_before_activation(first_run):
    from chronorec.server.core.encoder import EncoderSettings, OnnxEncoder
    from chronorec.server.core.indexing import open_vector_cache
    from chronorec.server.core.itemtext import item_text
    from chronorec.server.core.vector_cache import text_key

    db, models, _, outcome = first_run
    assert outcome.details["prepare"]["items"] > 0, outcome.details.get("prepare")
    repo = ModelRepository(models)
    with EventStore(db, read_only=True) as store:
        items = list(store.iter_items())
    # As a server on its defaults serves the version (its int8 graph: the trainer published one).
    encoder = OnnxEncoder(repo.version_dir(outcome.version), prefer_int8=EncoderSettings().prefer_int8)
    try:
        assert encoder.model_file == "model.int8.onnx"
        # The server's swap finds every catalog vector in the cache instead of encoding the catalog.
        cache = open_vector_cache(repo, outcome.version, encoder, EncoderSettings())
        vectors, found = cache.get([text_key(item_text(i)) for i in items])
        assert found.all() and len(items) == outcome.details["prepare"]["items"]
        # Dynamic int8 quantises each run's activations with one scale: other batch neighbours move a
        # vector by that rounding only (tests/test_index_encode.py).
        cosine = np.sum(vectors[:5] * encoder.encode([item_text(i) for i in items[:5]]), axis=1)
        assert cosine.min() >= 0.999, cosine
    finally:
        encoder.close()


def test_no_new_events_means_nothing_to_learn(first_run):
    db, models, _, outcome = first_run
    started = time.perf_counter()
    again = run_once(db, models, RunSettings(**QUICK))
    assert again.exit_code == EXIT_NOTHING_NEW, again.message
    assert time.perf_counter() - started < 10
    assert ModelRepository(models).current() == outcome.version


def test_a_worse_candidate_is_published_but_gated_and_force_activates_it(tmp_path, drift, tiny_folder):
    db, models, base = _fresh_world(tmp_path, drift, tiny_folder)
    repo = ModelRepository(models)
    # A negative threshold demands a gain no candidate reaches: the gate must hold.
    gated = run_once(db, models, RunSettings(**QUICK, threshold=-1.0))
    assert gated.exit_code == EXIT_GATED, gated.message
    assert repo.current() == base
    assert gated.version in repo.list_versions()
    assert load_manifest(repo.version_dir(gated.version)).extra["trainer"]["gate"]["passed"] is False

    # New feedback arrives; the next run trains again (from the serving weights) and --force activates.
    with EventStore(db) as store:
        user = drift.events[-1].user_id
        store.add_events([Event("late-1", user, drift.items[0].item_id, "like", ANCHOR - 60.0)])
    forced = run_once(db, models, RunSettings(**QUICK, threshold=-1.0, force=True, int8=True))
    assert forced.exit_code == EXIT_ACTIVATED, forced.message
    assert repo.current() == forced.version != gated.version
    manifest = load_manifest(repo.version_dir(forced.version))
    assert manifest.parent_version == base
    assert manifest.extra["trainer"]["gate"]["forced"] is True
    assert manifest.int8_file and (repo.version_dir(forced.version) / manifest.int8_file).is_file()
    assert 0.5 < manifest.int8_cosine["min"] <= manifest.int8_cosine["mean"] <= 1.0 + 1e-6


def test_fine_tuned_weights_that_do_not_lift_the_tuned_blend_are_not_published(tmp_path, drift, tiny_folder):
    from chronorec.server.core.encoder import OnnxEncoder
    from chronorec.server.core.itemtext import item_text

    db, models, base = _fresh_world(tmp_path, drift, tiny_folder)
    # A few small steps: a checkpoint beats the start on the encoder's own validation retrieval, but
    # the blend tuned over it does no better than the one tuned over the starting weights.
    outcome = run_once(db, models, RunSettings(steps=8, batch_size=16, lr=1e-4, eval_every=4, patience=10,
                                               progress=False, max_eval_instances=60, threads=1, ranker=False))
    choice = outcome.details["encoder"]
    assert choice["best_step"] > 0 and choice["valid_best"] > choice["valid_before"]
    low, high = choice["fused_valid"]["ci95_user_clustered"]
    assert not low > 0 and low <= choice["fused_valid"]["difference"] <= high
    assert choice["fine_tuned"] is False
    repo = ModelRepository(models)
    assert outcome.version in repo.list_versions()
    manifest = load_manifest(repo.version_dir(outcome.version))
    assert manifest.extra["trainer"]["encoder"]["fine_tuned"] is False
    assert manifest.metrics["encoder_valid_MRR"] == manifest.metrics["encoder_valid_MRR_before"]
    assert manifest.time_model == TimeModelParams.from_dict(outcome.details["time_model"])
    # The version's encoder is the starting one: the same vectors as the base version's.
    texts = [item_text(item) for item in drift.items[:20]]
    published, starting = OnnxEncoder(repo.version_dir(outcome.version)), OnnxEncoder(repo.version_dir(base))
    try:
        np.testing.assert_allclose(published.encode(texts), starting.encode(texts), atol=1e-5)
    finally:
        published.close()
        starting.close()


def test_failures_exit_1_and_leave_the_serving_version(tmp_path, first_run):
    _, models, _, outcome = first_run
    assert run_once(tmp_path / "missing.db", models, RunSettings(**QUICK)).exit_code == EXIT_FAILED
    assert ModelRepository(models).current() == outcome.version
    with pytest.raises(TypeError):
        run(tmp_path / "missing.db", models, no_such_setting=1)


def test_cli_run_exit_codes(first_run, tmp_path):
    db, models, _, _ = first_run
    command = [sys.executable, "-m", "chronorec.trainer.cli", "run", "--db", str(db), "--models", str(models),
               "--steps", "1", "--no-progress", "--threads", "1"]
    nothing_new = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert nothing_new.returncode == EXIT_NOTHING_NEW, nothing_new.stderr
    assert "nothing-new" in nothing_new.stdout
    missing = subprocess.run(command[:5] + [str(tmp_path / "nope.db")] + command[6:], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == EXIT_FAILED


def test_interval_parsing():
    assert parse_interval("30m") == 1800 and parse_interval("2h") == 7200 and parse_interval("45") == 45
    assert parse_interval("1d") == 86400
    with pytest.raises(ValueError):
        parse_interval("soon")


def test_a_trainer_killed_mid_export_leaves_no_version_the_server_would_load(tmp_path, drift, tiny_folder):
    db, models, base = _fresh_world(tmp_path, drift, tiny_folder)
    marker = tmp_path / "exporting"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(TESTS)!r})
        from pathlib import Path
        from chronorec.trainer import export
        from chronorec.trainer.pipeline import RunSettings, run_once

        real_export = export.export_onnx

        def export_then_hang(module, out_path, *args, **kwargs):
            path = real_export(module, out_path, *args, **kwargs)
            Path({str(marker)!r}).write_text(str(path))
            time.sleep(600)  # killed here: the graph is written, the manifest not yet

        export.export_onnx = export_then_hang
        run_once({str(db)!r}, {str(models)!r}, RunSettings(steps=1, batch_size=8, tune=False, progress=False,
                                                           max_eval_instances=20, threads=1, ranker=False))
    """)
    process = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert process.poll() is None, "the trainer ended before exporting"
            assert time.monotonic() < deadline, "the trainer never reached the export"
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()

    repo = ModelRepository(models)
    onnx_written = Path(marker.read_text())
    assert onnx_written.is_file() and onnx_written.parent.name.startswith(".staging-")
    assert repo.list_versions() == [base] and repo.current() == base
    staging = onnx_written.parent.name
    assert not repo.is_complete(staging)

    from chronorec.server.core.errors import Unavailable
    from chronorec.server.core.encoder import EncoderSettings, load_encoder

    with pytest.raises(Unavailable):
        load_encoder(repo, staging, EncoderSettings())
    # The next run is not confused by the leftover, publishes normally, and clears it once it is old.
    long_ago = time.time() - 7 * 3600
    os.utime(onnx_written.parent, (long_ago, long_ago))
    outcome = run_once(db, models, RunSettings(**QUICK))
    assert outcome.exit_code in (EXIT_ACTIVATED, EXIT_GATED), outcome.message
    assert outcome.version in repo.list_versions()
    assert not onnx_written.parent.exists()


def test_the_prepare_step_indexes_as_the_server_recorded_in_the_repository(tmp_path, drift, tiny_folder):
    """The server's vector-cache folder and int8 choice come from <models>/serving.json, not from trainer flags."""
    from chronorec.server.core.encoder import EncoderSettings, load_encoder
    from chronorec.server.core.indexing import VECTOR_CACHE_DIR, open_vector_cache
    from chronorec.server.core.itemtext import item_text
    from chronorec.server.core.repository import ServingSettings
    from chronorec.server.core.vector_cache import text_key
    from chronorec.trainer.pipeline import _prepare

    db, models, _ = _fresh_world(tmp_path, drift, tiny_folder)
    version = publish_base_model(tiny_folder, models, activate=False, max_length=64, int8=True)
    repo = ModelRepository(models)
    elsewhere = tmp_path / "server-vector-cache"
    served = ServingSettings(vector_cache=True, vector_cache_dir=str(elsewhere), prefer_int8=True, hnsw_m=16,
                             hnsw_ef_construction=100, hnsw_ef_search=64)
    repo.write_serving_settings(served)
    with EventStore(db, read_only=True) as store:
        items = list(store.iter_items())
    said: list[str] = []
    figures = _prepare(repo, version, items, RunSettings(threads=1), said.append)
    assert figures["items"] == len(items) and figures["serving_settings"]["prefer_int8"] is True
    assert "the server's recorded settings" in said[-1]
    assert elsewhere.is_dir() and not (models / VECTOR_CACHE_DIR).exists()

    def cached(settings: EncoderSettings) -> int:
        encoder = load_encoder(repo, version, settings)
        try:
            _, found = open_vector_cache(repo, version, encoder, settings).get([text_key(item_text(i)) for i in items])
            return int(found.sum())
        finally:
            encoder.close()

    # The server's int8 graph finds every vector; the fp32 graph, which that server does not run, none.
    assert cached(EncoderSettings.from_serving_settings(served)) == len(items)
    assert cached(EncoderSettings.from_serving_settings(served, prefer_int8=False)) == 0

    # A server without a vector cache: nothing to prepare, nothing written.
    repo.write_serving_settings(ServingSettings(vector_cache=False, vector_cache_dir=None, prefer_int8=False,
                                                hnsw_m=16, hnsw_ef_construction=100, hnsw_ef_search=64))
    skipped = _prepare(repo, version, items, RunSettings(threads=1), said.append)
    assert "skipped" in skipped and not (models / VECTOR_CACHE_DIR).exists()

    # A new version gets an int8 graph when the server serves int8 (or says nothing), unless --int8/--no-int8 says.
    from chronorec.trainer.pipeline import _publishes_int8

    assert _publishes_int8(repo, RunSettings()) is False and _publishes_int8(repo, RunSettings(int8=True)) is True
    repo.write_serving_settings(served)
    assert _publishes_int8(repo, RunSettings()) is True and _publishes_int8(repo, RunSettings(int8=False)) is False
