"""ONNX export, parity, int8 and atomic publishing of encoder versions, on a tiny random BERT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from chronorec.server.core.manifest import INT8_FILE, ONNX_FILE, TOKENIZER_FILE, TimeModelParams, load_manifest
from chronorec.server.core.repository import ModelRepository
from chronorec.trainer import cli, export
from chronorec.trainer.export import ParityError, SentenceEncoderModule
from tinybert import make_tiny_bert

TEXTS = [
    "jazz",
    "3 days ago, rated 5: Toy Story (1995) | animation ; just now, viewed: cooking with jazz",
    "astronomy and football",
    "programming " * 200,
    "yesterday, liked: gardening tips",
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tinybert"))


@pytest.fixture(scope="module")
def loaded(tiny_bert):
    return export.load_base_model(tiny_bert)


def _staging_dirs(root: Path) -> list[Path]:
    return [p for p in (root / "encoder").iterdir() if p.name.startswith(".staging-")]


def test_tiny_bert_builds_fast_with_topic_vocabulary(tmp_path):
    import time

    make_tiny_bert(tmp_path / "warm")  # the first call pays transformers' lazy imports
    started = time.perf_counter()
    folder = make_tiny_bert(tmp_path / "bert")
    assert time.perf_counter() - started < 1.0
    vocab = (folder / "vocab.txt").read_text().split()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    for word in ("cooking", "astronomy", "jazz", "days", "ago", "rated", "yesterday", "minutes", "7"):
        assert word in vocab
    assert (folder / TOKENIZER_FILE).is_file() and (folder / "config.json").is_file()


def test_export_has_dynamic_axes_and_matches_torch(loaded, tmp_path):
    module, tokenizer = loaded
    path = export.export_onnx(module, tmp_path / "model.onnx")
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in graph.output] == ["sentence_embedding"]
    tokenizer.save_pretrained(tmp_path / "tok")
    diff = export.check_parity(module, path, tokenizer, TEXTS, tokenizer_json=tmp_path / "tok" / TOKENIZER_FILE)
    assert diff <= 1e-4

    # Batch and sequence sizes other than the traced ones run.
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.full((5, 37), 20, dtype=np.int64)
    out = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)})[0]
    assert out.shape == (5, 32)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_export_leaves_a_training_module_in_train_mode(loaded, tmp_path):
    module, _ = loaded
    module.train()
    try:
        export.export_onnx(module, tmp_path / "model.onnx")
        assert module.training
    finally:
        module.eval()


def test_check_parity_raises_when_graph_differs(loaded, tmp_path):
    module, tokenizer = loaded
    path = export.export_onnx(module, tmp_path / "model.onnx")
    other = export.load_base_model(make_tiny_bert(tmp_path / "other", seed=1))[0]
    with pytest.raises(ParityError):
        export.check_parity(other, path, tokenizer, TEXTS, report=None)


def test_module_is_trainable_and_outputs_unit_vectors(tiny_bert):
    module, tokenizer = export.load_base_model(tiny_bert)
    module.train()
    batch = module.tokenize(tokenizer, ["cooking jazz", "astronomy days ago"])
    vectors = module(**batch)
    loss = 1.0 - (vectors[0] * vectors[1]).sum()
    loss.backward()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    encoded = module.encode_texts(tokenizer, TEXTS, batch_size=2)
    assert module.training  # encode_texts restores the mode it found
    assert encoded.shape == (len(TEXTS), 32) and encoded.dtype == torch.float32
    np.testing.assert_allclose(encoded.norm(dim=1).numpy(), 1.0, atol=1e-5)


def test_publish_base_model_writes_complete_activated_version(tiny_bert, tmp_path):
    version = export.publish_base_model(tiny_bert, tmp_path, int8=True)
    repo = ModelRepository(tmp_path)
    assert repo.list_versions() == [version]
    assert repo.current() == version
    folder = repo.version_dir(version)
    assert {ONNX_FILE, INT8_FILE, TOKENIZER_FILE, "manifest.json"} <= {p.name for p in folder.iterdir()}
    manifest = load_manifest(folder)
    assert manifest.version == version
    assert manifest.dimension == 32 and manifest.max_length == 128 and manifest.pooling == "mean"
    assert manifest.base_model == str(tiny_bert.resolve())
    assert manifest.parity_max_abs_diff is not None and manifest.parity_max_abs_diff <= 1e-4
    assert manifest.time_model == TimeModelParams()
    assert manifest.created_at and manifest.parent_version is None
    assert manifest.int8_file == INT8_FILE
    assert 0.9 <= manifest.int8_cosine["min"] <= manifest.int8_cosine["mean"] <= 1.0 + 1e-6
    assert not _staging_dirs(tmp_path)


def test_publish_module_records_lineage_without_activating(loaded, tmp_path):
    module, tokenizer = loaded
    repo = ModelRepository(tmp_path)
    parent = export.publish_module(module, tokenizer, repo, base_model="tiny", activate=True)
    params = TimeModelParams(alpha=0.7)
    child = export.publish_module(
        module, tokenizer, repo, base_model="tiny", parent_version=parent, time_model=params,
        metrics={"temporal": {"ndcg@10": 0.1}}, training_window={"start": 0.0, "end": 10.0},
    )
    manifest = load_manifest(repo.version_dir(child))
    assert manifest.parent_version == parent and manifest.time_model.alpha == 0.7
    assert manifest.metrics == {"temporal": {"ndcg@10": 0.1}}
    assert repo.list_versions() == [parent, child]
    assert repo.current() == parent


def test_parity_failure_publishes_nothing(tiny_bert, tmp_path, monkeypatch):
    real_export = export.export_onnx
    impostor = export.load_base_model(make_tiny_bert(tmp_path / "other", seed=7))[0]
    monkeypatch.setattr(export, "export_onnx", lambda module, path, opset=17: real_export(impostor, path, opset))
    with pytest.raises(ParityError):
        export.publish_base_model(tiny_bert, tmp_path / "models")
    repo = ModelRepository(tmp_path / "models")
    assert repo.list_versions() == [] and repo.current() is None
    assert not _staging_dirs(tmp_path / "models")


def test_failure_after_onnx_written_keeps_previous_version(tiny_bert, tmp_path, monkeypatch):
    first = export.publish_base_model(tiny_bert, tmp_path)
    seen = []

    def fail_after_export(module, onnx_path, *args, **kwargs):
        seen.append(Path(onnx_path))
        assert Path(onnx_path).is_file()
        raise RuntimeError("simulated crash after the ONNX file was written")

    monkeypatch.setattr(export, "check_parity", fail_after_export)
    with pytest.raises(RuntimeError, match="simulated crash"):
        export.publish_base_model(tiny_bert, tmp_path)
    repo = ModelRepository(tmp_path)
    assert seen and seen[0].parent.name.startswith(".staging-")
    assert repo.list_versions() == [first]
    assert repo.current() == first
    assert not _staging_dirs(tmp_path)


def test_killed_export_leaves_no_loadable_version_and_no_pointer_change(tiny_bert, tmp_path):
    first = export.publish_base_model(tiny_bert, tmp_path)
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        os.environ["HF_HUB_OFFLINE"] = "1"
        from chronorec.trainer import export
        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        export.check_parity = die
        export.publish_base_model({str(tiny_bert)!r}, {str(tmp_path)!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    repo = ModelRepository(tmp_path)
    leftovers = _staging_dirs(tmp_path)
    assert leftovers and (leftovers[0] / ONNX_FILE).is_file()  # the kill landed after the export
    assert repo.list_versions() == [first]
    assert repo.current() == first
    assert repo.clean_staging() == len(leftovers)


def test_publish_rejects_max_length_beyond_model_positions(tmp_path):
    folder = make_tiny_bert(tmp_path / "short", max_position_embeddings=64)
    with pytest.raises(ValueError, match="exceeds"):
        export.publish_base_model(folder, tmp_path / "models", max_length=128)
    assert ModelRepository(tmp_path / "models").list_versions() == []


def test_cli_export_base(tiny_bert, tmp_path, capsys):
    assert cli.main(["export-base", "--model", str(tiny_bert), "--models", str(tmp_path), "--no-activate"]) == 0
    out = capsys.readouterr().out
    repo = ModelRepository(tmp_path)
    [version] = repo.list_versions()
    assert version in out and "parity" in out
    assert repo.current() is None

    assert cli.main(["export-base", "--model", str(tmp_path / "missing"), "--models", str(tmp_path)]) == 1
    assert "error: export-base failed" in capsys.readouterr().err
    assert repo.list_versions() == [version]


def _register_noop(subparsers):
    parser = subparsers.add_parser("noop", help="does nothing")
    parser.set_defaults(handler=lambda args: 0)
    return parser


def test_cli_registry_accepts_lazy_subcommands(monkeypatch, capsys):
    # Other owners plug in `run` and `eval` as "module:function" without touching export-base.
    monkeypatch.setitem(cli.SUBCOMMANDS, "noop", f"{__name__}:_register_noop")
    assert cli.main(["noop"]) == 0
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "noop" in capsys.readouterr().out


def test_cli_skips_a_subcommand_that_fails_to_import(monkeypatch, capsys):
    monkeypatch.setitem(cli.SUBCOMMANDS, "broken", "chronorec.trainer.no_such_module:register")
    parser = cli.build_parser()
    assert "warning: subcommand broken is unavailable" in capsys.readouterr().err
    assert parser.parse_args(["export-base", "--models", "/tmp/x"]).command == "export-base"
