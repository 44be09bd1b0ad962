"""The main job runs end to end (a short version of `python -m deqkern demo`)."""
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

from deqkern.__main__ import main  # noqa: E402
from deqkern.apps.demo import run  # noqa: E402


def test_demo_compares_the_layer_families(capsys, tmp_path):
    results = run(["--epochs", "2", "--train-limit", "512", "--hidden", "32", "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "certificate" in out and len(results) == 7
    assert any(r["family"].startswith("MDEQ") for r in results)
    for r in results:
        # 10 classes: chance is 0.1. The MDEQ learns slowest (0.23 after these 2 short epochs; 0.66 after the demo's 5)
        assert r["test_accuracy"] > (0.15 if r["family"].startswith("MDEQ") else 0.5), r
        assert 1 <= r["forward_iterations"] <= 100 and 1 <= r["backward_iterations"] <= 100
    certified = {r["family"]: r["certificate"] for r in results}
    assert "proven" in certified["LipschitzDEQ"] and "mu_inf" in certified["LinfContractiveDEQ"]
    pytest.importorskip("matplotlib")
    assert (tmp_path / "demo.png").stat().st_size > 1000


def test_demo_trains_a_classifier_per_backend(capsys):
    results = run(["--epochs", "2", "--train-limit", "512", "--no-progress", "--backends", "cpu", "reference"])
    out = capsys.readouterr().out
    assert "test acc" in out and len(results) == 2
    for r in results:
        assert r["test_accuracy"] > 0.8, r  # 10 classes: chance is 0.1
        assert 1 <= r["forward_iterations"] <= 100 and 1 <= r["backward_iterations"] <= 100
    assert abs(results[0]["test_accuracy"] - results[1]["test_accuracy"]) < 0.02


def test_cli_info(capsys):
    assert main(["info"]) == 0
    assert "CPU extension: built" in capsys.readouterr().out
