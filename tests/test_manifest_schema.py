"""The manifest schema, the repository's view of broken versions, and path redaction, without a server."""

from __future__ import annotations

import json
import shutil

import pytest

from chronorec.server.core.errors import redact_paths
from chronorec.server.core.manifest import (
    MANIFEST_FILE,
    MANIFEST_FIELDS,
    Manifest,
    ManifestError,
    ManifestUnreadable,
    TimeModelParams,
    load_manifest,
)
from chronorec.server.core.repository import ModelRepository


def good_manifest() -> dict:
    manifest = Manifest(version="v1", base_model="tiny", dimension=32, metrics={"ndcg@10": 0.1, "nested": {"a": 1}},
                        training_window={"start": 0.0}, parent_version="v0", created_at="2026-01-01T00:00:00Z",
                        int8_file="model.int8.onnx", int8_cosine={"mean": 0.99, "min": 0.98}, parity_max_abs_diff=1e-6,
                        extra={"trainer": {"gate": {"passed": True}}})
    return json.loads(manifest.to_json())


def test_a_written_manifest_reads_back_equal():
    data = good_manifest()
    assert Manifest.from_json(json.dumps(data)).to_json() == json.dumps(data, indent=2, sort_keys=True)
    # Only the three identifying fields are required; fields a newer trainer adds are ignored.
    minimal = Manifest.from_json(json.dumps({"version": "v", "base_model": "b", "dimension": 8, "future": [1]}))
    assert minimal.time_model == TimeModelParams() and minimal.onnx_file == "model.onnx"


@pytest.mark.parametrize(
    "field, value",
    [("version", 3), ("base_model", None), ("dimension", 0), ("dimension", True), ("dimension", 32.5),
     ("max_length", 0), ("max_length", "128"), ("max_length", 10**9), ("pooling", ["mean"]), ("normalize", "yes"),
     ("metrics", [1, 2]), ("metrics", None), ("training_window", "2020"), ("parent_version", 7),
     ("created_at", 12345), ("onnx_file", "../../../../etc/hostname"), ("onnx_file", "/etc/hostname"),
     ("onnx_file", "sub/model.onnx"), ("onnx_file", ""), ("onnx_file", ".."), ("int8_file", "..\\\\x"),
     ("int8_cosine", {"mean": "high"}), ("int8_cosine", [0.9]), ("parity_max_abs_diff", "small"),
     ("extra", 3), ("schema", 2), ("schema", True), ("time_model", [0.5])],
)
def test_every_field_of_the_schema_is_checked(field, value):
    assert field in MANIFEST_FIELDS or field == "time_model"
    data = {**good_manifest(), field: value}
    with pytest.raises(ManifestError, match=field):
        Manifest.from_json(json.dumps(data))


@pytest.mark.parametrize(
    "name, value",
    [("alpha", 5), ("alpha", -0.1), ("alpha", "0.5"), ("alpha", True), ("history_max_events", "twenty"),
     ("history_max_events", 20.5), ("history_max_events", 0), ("w_trend", 1e9), ("trend_window_days", float("inf"))],
)
def test_the_time_model_is_checked_against_its_bounds(name, value):
    data = good_manifest()
    data["time_model"][name] = value
    with pytest.raises(ManifestError, match=f"time_model.{name}"):
        Manifest.from_json(json.dumps(data))


def test_time_model_values_keep_their_types():
    data = good_manifest()
    data["time_model"].update(alpha=1, history_max_events=30.0, w_trend=None)
    params = Manifest.from_json(json.dumps(data)).time_model
    assert params.alpha == 1.0 and isinstance(params.alpha, float)
    assert params.history_max_events == 30 and isinstance(params.history_max_events, int)
    assert params.w_trend == TimeModelParams().w_trend  # null keeps the default


def test_graph_file_errors_do_not_echo_the_path():
    data = {**good_manifest(), "onnx_file": "/etc/hostname"}
    with pytest.raises(ManifestError) as info:
        Manifest.from_json(json.dumps(data))
    assert "hostname" not in str(info.value)


@pytest.mark.parametrize("text", ["", '{"version": ', "[]", "null", "\"v1\""])
def test_a_manifest_that_is_no_json_object_is_unreadable(text):
    with pytest.raises(ManifestUnreadable):
        Manifest.from_json(text)


def test_a_manifest_that_is_not_utf8_is_unreadable(tmp_path):
    (tmp_path / MANIFEST_FILE).write_bytes(b"\xff\xfe{}")
    with pytest.raises(ManifestUnreadable):
        load_manifest(tmp_path)


def test_the_repository_lists_broken_manifests_with_the_reason(tiny_repo):
    repo = ModelRepository(tiny_repo)
    good = repo.current()

    def copy(name: str, **changes) -> None:
        shutil.copytree(repo.version_dir(good), repo.version_dir(name))
        data = json.loads((repo.version_dir(name) / MANIFEST_FILE).read_text())
        data.update(changes, version=name)
        (repo.version_dir(name) / MANIFEST_FILE).write_text(json.dumps(data))

    copy("v-metrics-array", metrics=[1, 2])
    copy("v-half-written")
    (repo.version_dir("v-half-written") / MANIFEST_FILE).write_text('{"version": ')
    copy("v-no-graph")
    (repo.version_dir("v-no-graph") / "model.onnx").unlink()

    described = {info.version: info for info in repo.describe_versions()}
    assert set(described) == {good, "v-metrics-array"}  # half-written and incomplete ones are no versions
    assert described[good].usable and described[good].manifest is not None
    broken = described["v-metrics-array"]
    assert not broken.usable and broken.manifest is None and "metrics must be an object" in broken.problem
    assert repo.list_versions() == [good]
    assert not repo.is_complete("v-metrics-array") and not repo.is_complete("v-half-written")
    copy("v-linked-tokenizer")
    (repo.version_dir("v-linked-tokenizer") / "tokenizer.json").unlink()
    (repo.version_dir("v-linked-tokenizer") / "tokenizer.json").symlink_to(repo.version_dir(good) / "tokenizer.json")
    assert "tokenizer.json links outside" in repo.describe("v-linked-tokenizer").problem
    assert repo.describe("no-such") is None and repo.describe("../encoder") is None and repo.describe(".staging-x") is None


def test_redact_paths_replaces_roots_and_quoted_absolute_paths(tmp_path):
    root = tmp_path / "models"
    text = (f"Load model from {root}/encoder/v1/model.onnx failed; [Errno 2] No such file: '{tmp_path}/other/x.json'"
            f" at node Name:'/embeddings/position_embeddings/Gather'")
    redacted = redact_paths(text, [root])
    assert str(tmp_path) not in redacted
    assert "<models>/encoder/v1/model.onnx" in redacted and "'<path>'" in redacted
    assert "'/embeddings/position_embeddings/Gather'" in redacted  # a graph node name, not a path
