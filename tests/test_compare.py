"""`chronorec-train compare`: two evaluation runs paired instance by instance, with the report's own buckets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chronorec.server.core.importers import detect_and_load
from chronorec.trainer import cli, evaluate
from chronorec.trainer.compare import compare_pooled, compare_runs, load_rows
from chronorec.trainer.protocols import Dataset, bootstrap_ci

METHODS = "MostPop,RecentPop-7d"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A generated log of short-lived items, evaluated once under both protocols (two baselines)."""
    from bench.eval_scale_data import write
    from bench.eval_trend_data import generate

    root = tmp_path_factory.mktemp("compare")
    data, other = root / "data", root / "other"
    write(data, [], generate(seed=3, n_items=300, n_users=400)[1])
    write(other, [], generate(seed=4, n_items=300, n_users=400)[1])
    out = root / "report"
    assert evaluate.main(["--data", str(data), "--out", str(out), "--protocol", "both", "--methods", METHODS,
                          "--no-progress"]) == 0
    return data, other, out


@pytest.fixture(scope="module")
def other_run(runs):
    """The second log's own run, temporal only."""
    _, other, out = runs
    report = out.parent / "other-report"
    assert evaluate.main(["--data", str(other), "--out", str(report), "--protocol", "temporal", "--methods", METHODS,
                          "--no-progress"]) == 0
    return report


def test_two_methods_of_one_run_are_paired_with_the_reports_buckets(runs):
    data, _, out = runs
    dataset = Dataset(*detect_and_load(data))
    rows = load_rows(out)
    report = json.loads((out / "report.json").read_text())
    for protocol in ("temporal", "loo"):
        found = compare_runs(dataset, rows, rows, protocol=protocol, method="RecentPop-7d", before_method="MostPop")
        methods = report["protocols"][protocol]["methods"]
        a, b = rows[f"{protocol}/MostPop/NDCG@10"], rows[f"{protocol}/RecentPop-7d/NDCG@10"]
        overall = found[0]
        assert (overall["scope"], overall["n"]) == ("all", len(a))
        assert overall["before"] == pytest.approx(methods["MostPop"]["metrics"]["NDCG@10"]["mean"])
        assert overall["after"] == pytest.approx(methods["RecentPop-7d"]["metrics"]["NDCG@10"]["mean"])
        assert overall["difference"] == pytest.approx(float((b - a).mean()))
        low, high = bootstrap_ci(b - a, evaluate.build_split(dataset, protocol).test_task().instances.user)
        assert overall["ci95_user_clustered"] == pytest.approx([low, high]) and low < high
        # Every gap and target bucket the report has, with its instances and means.
        for scope, key in (("gap", "by_gap"), ("target", "by_target")):
            for method, side in (("MostPop", "before"), ("RecentPop-7d", "after")):
                expected = {r["bucket"]: (r["n"], r["mean"]) for r in methods[method][key] if r["n"]}
                got = {r["bucket"]: (r["n"], r[side]) for r in found if r["scope"] == scope}
                assert got.keys() == expected.keys()
                for bucket, (n, mean) in expected.items():
                    assert got[bucket][0] == n and got[bucket][1] == pytest.approx(mean)


def test_a_run_against_itself_differs_by_nothing_and_the_command_prints_it(runs, capsys):
    data, _, out = runs
    assert cli.main(["compare", "--data", str(data), "--before", str(out), "--after", str(out / "per_instance.npz"),
                     "--method", "RecentPop-7d", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(r["difference"] == 0.0 and r["ci95_user_clustered"] == [0.0, 0.0] for r in rows)
    assert cli.main(["compare", "--data", str(data), "--before", str(out), "--after", str(out),
                     "--method", "RecentPop-7d", "--before-method", "MostPop", "--protocol", "loo"]) == 0
    table = capsys.readouterr().out
    assert "| all | all |" in table and "| target | cold |" in table and "MostPop" in table


def test_runs_that_do_not_pair_are_refused_with_what_is_wrong(runs, tmp_path, capsys):
    data, other, out = runs
    dataset = Dataset(*detect_and_load(data))
    rows = load_rows(out)
    # Another data set's instances.
    with pytest.raises(ValueError, match="not run on this data set's temporal test instances"):
        compare_runs(Dataset(*detect_and_load(other)), rows, rows, method="MostPop")
    # A method the run does not hold: the message lists those it does.
    with pytest.raises(ValueError, match="no NDCG@10 of 'EASE' under temporal; its methods there: MostPop, RecentPop-7d"):
        compare_runs(dataset, rows, rows, method="EASE")
    # A run of one protocol asked for the other.
    one = {k: v for k, v in rows.items() if k.startswith("temporal/")}
    with pytest.raises(ValueError, match="holds no loo rows"):
        compare_runs(dataset, one, rows, protocol="loo", method="MostPop")
    # Reordered instances do not pair either.
    shuffled = dict(rows)
    shuffled["temporal/pos"] = rows["temporal/pos"][::-1].copy()
    with pytest.raises(ValueError, match="not run on this data set"):
        compare_runs(dataset, rows, shuffled, method="MostPop")
    # On the command line: a clear error and exit status 1, not a traceback.
    assert cli.main(["compare", "--data", str(data), "--before", str(tmp_path), "--after", str(out)]) == 1
    assert "per_instance.npz does not exist" in capsys.readouterr().err
    np.testing.assert_array_equal(load_rows(out)["temporal/pos"], rows["temporal/pos"])


def test_several_data_sets_pool_every_instance_once_with_users_kept_apart(runs, other_run, capsys):
    data, other, out = runs
    first, second = Dataset(*detect_and_load(data)), Dataset(*detect_and_load(other))
    rows, rows2 = load_rows(out), load_rows(other_run)
    options = dict(method="RecentPop-7d", before_method="MostPop")
    # One data set: compare_runs' rows exactly.
    assert compare_pooled([(first, rows, rows)], **options) == compare_runs(first, rows, rows, **options)
    pooled = compare_pooled([(first, rows, rows), (second, rows2, rows2)], **options)
    apart = [compare_runs(first, rows, rows, **options), compare_runs(second, rows2, rows2, **options)]
    for row in pooled:
        # Counts add up and means are over every instance of both, each counted once.
        sides = [next((r for r in one if (r["scope"], r["bucket"]) == (row["scope"], row["bucket"])), None)
                 for one in apart]
        n = [s["n"] if s else 0 for s in sides]
        assert row["n"] == sum(n)
        for key in ("before", "after", "difference"):
            assert row[key] == pytest.approx(sum(s[key] * k for s, k in zip(sides, n) if s) / sum(n))
    # The interval resamples (data set, user) clusters: user 0 of one log is not user 0 of the other.
    split = [evaluate.build_split(d, "temporal").test_task().instances for d in (first, second)]
    a = np.concatenate([rows["temporal/MostPop/NDCG@10"], rows2["temporal/MostPop/NDCG@10"]])
    b = np.concatenate([rows["temporal/RecentPop-7d/NDCG@10"], rows2["temporal/RecentPop-7d/NDCG@10"]])
    users = np.concatenate([split[0].user, split[1].user + split[0].user.max() + 1])
    assert pooled[0]["ci95_user_clustered"] == pytest.approx(list(bootstrap_ci(b - a, users)))
    # The command takes each flag once per data set, one pair of runs each.
    both = ["--data", str(data), "--data", str(other)]
    runs_in_order = ["--before", str(out), "--before", str(other_run), "--after", str(out), "--after", str(other_run)]
    assert cli.main(["compare", *both, *runs_in_order, "--method", "RecentPop-7d", "--before-method", "MostPop",
                     "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == pooled
    assert cli.main(["compare", *both, *runs_in_order, "--method", "RecentPop-7d", "--before-method", "MostPop"]) == 0
    assert "pooled over 2 data sets" in capsys.readouterr().out
    # Lists of other lengths, or runs given in the wrong order, are refused with what is wrong.
    assert cli.main(["compare", *both, "--before", str(out), "--after", str(out)]) == 1
    assert "give one pair of runs per data set" in capsys.readouterr().err
    assert cli.main(["compare", *both, "--before", str(other_run), "--before", str(out),
                     "--after", str(other_run), "--after", str(out), "--method", "MostPop"]) == 1
    assert "not run on this data set's temporal test instances" in capsys.readouterr().err
    with pytest.raises(ValueError, match="nothing to compare"):
        compare_pooled([])
    # Each of the three is required, however many times it may be given.
    with pytest.raises(SystemExit):
        cli.main(["compare", "--before", str(out), "--after", str(out)])
    assert "--data" in capsys.readouterr().err
