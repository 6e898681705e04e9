"""The pinned versions of the libraries that move the evaluation's figures (server/constraints.txt):
what setup.sh installs, what the evaluation report compares the installed ones with."""

from __future__ import annotations

import importlib.metadata
import os
import re
from pathlib import Path

import pytest

from chronorec.trainer import report, resources

REPO = Path(__file__).resolve().parents[1]


def _constraints() -> dict[str, str]:
    return resources.parse_pins((REPO / "server" / "constraints.txt").read_text())


def test_every_figure_library_but_the_gpu_runtime_is_pinned_and_nothing_else():
    pins = _constraints()
    assert set(pins) == set(resources.FIGURE_LIBRARIES) - {"onnxruntime-gpu"}
    # The installed package reads the same file (package data of chronorec.server).
    assert resources.pinned_versions() == pins


def test_torch_is_pinned_alike_in_the_constraints_the_trainer_extra_and_setup():
    tomllib = pytest.importorskip("tomllib")
    trainer = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["trainer"]
    assert f"torch=={_constraints()['torch']}" in trainer
    setup = (REPO / "server" / "setup.sh").read_text()
    assert f'"torch=={_constraints()["torch"]}"' in setup
    assert "--constraint server/constraints.txt" in setup


@pytest.mark.skipif(os.environ.get("CHRONOREC_UNPINNED") == "1", reason="set up with CHRONOREC_UNPINNED=1")
def test_setup_installed_the_pinned_versions():
    installed = {name: importlib.metadata.version(name) for name in _constraints()}
    assert resources.off_pin(installed, _constraints()) == {}


def test_parse_pins_reads_name_equals_version_lines_by_normalised_name():
    text = "# a comment\n\nNumPy==2.4.6  # trailing\nsome_lib.x==1.0+local\n"
    assert resources.parse_pins(text) == {"numpy": "2.4.6", "some-lib-x": "1.0+local"}
    for bad in ("numpy>=2", "numpy==", "==1.0"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            resources.parse_pins(bad)


def test_off_pin_names_each_library_at_another_version_and_ignores_a_local_build_tag():
    pins = {"torch": "2.13.0", "numpy": "2.4.6", "onnxruntime": "1.32.0"}
    installed = {"python": "3.11.7", "torch": "2.13.0+cpu", "numpy": "2.4.5", "onnxruntime-gpu": "1.31.0"}
    assert resources.off_pin(installed, pins) == {"numpy": ("2.4.5", "2.4.6")}


def test_the_report_says_whether_the_libraries_are_the_pinned_ones_and_names_the_cpu():
    document = {
        "dataset": {"path": "d", "format": "jsonl", "n_events": 1, "n_users": 1, "n_items": 1},
        "bootstrap": {"level": 0.95, "resamples": 10, "seed": 1},
        "machine": {"cpus": 2, "load_average": [0.0, 0.0, 0.0],
                    "cpu": {"model": "AMD EPYC", "simd": ["X86_V3", "X86_V4"],
                            "blas": [{"library": "openblas", "version": "0.3.31", "architecture": "SkylakeX"},
                                     {"library": "openblas", "version": "0.3.30", "architecture": "SkylakeX"}]}},
        "machine_at_end": {"load_average": [1.0, 1.0, 1.0]},
        "libraries": {"python": "3.11.7", "numpy": "2.4.6", "torch": "2.13.0+cpu"},
        "libraries_pinned": {"numpy": "2.4.6", "torch": "2.13.0"},
        "protocols": {},
    }
    text = report.markdown_report(document)
    assert "Machine: 2 CPUs (AMD EPYC; NumPy's SIMD X86_V3, X86_V4; openblas kernels SkylakeX), load" in text
    assert "These are the versions server/constraints.txt pins." in text
    document["libraries"]["numpy"] = "2.5.0"
    text = report.markdown_report(document)
    assert "Not the versions server/constraints.txt pins" in text and "numpy 2.5.0 (pinned 2.4.6)" in text
    # A report made before the pins (or without the file) says nothing of them.
    del document["libraries_pinned"]
    assert "constraints.txt" not in report.markdown_report(document)


def test_cpu_description_reads_this_machine():
    import numpy as np  # loads NumPy's BLAS, which threadpoolctl then finds

    np.ones((2, 2)) @ np.ones((2, 2))
    cpu = resources.cpu_description()
    assert set(cpu) <= {"model", "simd", "blas"}
    if Path("/proc/cpuinfo").exists() and "model name" in Path("/proc/cpuinfo").read_text():
        assert cpu["model"]
    assert all(isinstance(name, str) for name in cpu.get("simd", []))
    pytest.importorskip("threadpoolctl")
    assert cpu["blas"] and all(set(blas) == {"library", "version", "architecture"} for blas in cpu["blas"])
