"""`python -m deqkern reproduce`: each paper's claim, at the quick sizes (seconds), checked in its direction with a
margin, so that a change that breaks a guarantee or a claim fails here; and the files each claim writes (the .png
only with matplotlib: without it the run still completes, and says so before it starts)."""
import importlib.util
import sys

import pytest

pytest.importorskip("sklearn")

from deqkern.apps.reproduce import CLAIMS, main, run_claim  # noqa: E402
from deqkern.apps.reproduce import pcdeq  # noqa: E402
from deqkern.apps.reproduce.common import NO_PLOT_NOTE, claim_notes, number  # noqa: E402

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _rows(result):
    (columns, rows), *_ = result.tables.values()
    return rows


def _claim(name, tmp_path):
    result = run_claim(name, tmp_path, quick=True, show_progress=False)
    for path in result.files:
        assert path.exists() and path.stat().st_size > 200, path
    assert [p.suffix for p in result.files] == [".md", ".csv"] + [".png"] * HAS_MATPLOTLIB
    if HAS_MATPLOTLIB:
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.closing_line().startswith(f"{name}: ")
    return result


def test_pcdeq(tmp_path):
    result = _claim("pcdeq", tmp_path)
    unique, rates, trained = (rows for _, rows in result.tables.values())
    assert {r["weight_norm"] for r in unique} == set(pcdeq.NORMS)
    for r in unique:
        assert r["largest_distance"] < 1e-9 and r["monotone_from_zero"]  # one fixed point, whatever ||W||
    assert len(rates) == len(pcdeq.NORMS) * pcdeq.BATCH  # one row per sample: each proven rate beside its measured
    for r in rates:
        # the theorem's rate, from step 0 in ||.||_z*; the tail rate, from its step j in its ||.||_v
        assert 0 < r["measured_theorem_rate"] <= r["theorem_rate"] + 1e-12, r
        assert r["tail_rate"] is not None and r["measured_tail_rate"] <= r["tail_rate"] + 1e-12, r
        assert r["iterations"] <= r["iterations_bound"], r
    assert any(r["measured_tail_rate"] > 0.01 for r in rates)  # measured over several steps, not only 0s
    assert all(r["test_accuracy"] > 0.3 for r in trained if r["model"].startswith("pcDEQ"))  # learns (chance 0.1)
    # the sizes the notes state are the sizes run (quick: fewer starts, a smaller d)
    md = (tmp_path / "pcdeq.md").read_text()
    quick = pcdeq.SIZES[True]
    assert f"{quick['starts']} random nonnegative starts" in md and f"d = {quick['d']}," in md
    assert f"{pcdeq.SIZES[False]['starts']} random" not in md


def test_pcdeq_rates_compare_like_with_like():
    """The measured rates are those of the proven rates' own steps and norms: measured from step 0 in the max norm
    (what the table had beside the tail rate), the rate can exceed the tail rate proven from step j in ||.||_v
    (it does at ||W||_2 = 2), while the measured tail rate, over the same steps in the same norm, cannot."""
    W, c, _ = pcdeq.random_layer(2.0, pcdeq.SIZES[True]["d"])
    rows = pcdeq.rates(2.0, W, c)
    sup = pcdeq._ACTIVATION_SUP["tanh"]
    old = pcdeq.positive_concave_rates(lambda v: v @ W.T, c, "tanh", sup, pcdeq.TOL, pcdeq.MAX_ITER).measured_rate
    assert any(m > r["tail_rate"] for m, r in zip(old.tolist(), rows))  # the comparison the table used to invite
    assert all(pcdeq.rates_within(r) for r in rows)
    worse = dict(rows[0], measured_tail_rate=rows[0]["tail_rate"] * 1.01 + 1e-9)
    assert not pcdeq.rates_within(worse)
    worse = dict(rows[0], measured_theorem_rate=rows[0]["theorem_rate"] * 1.01 + 1e-9)
    assert not pcdeq.rates_within(worse)


def test_notes_state_the_sizes_given():
    doc = "`claim` (paper): the claim.\n\nMore."
    summary, notes = claim_notes(doc, "{starts} starts, tol {tol:g}, lr {lr}, widths {widths}", starts=8, tol=1e-4,
                                 lr=0.5, widths="{32, 128}")
    assert summary == "`claim` (paper): the claim." and notes == "8 starts, tol 1e-4, lr 0.5, widths {32, 128}"
    assert [number(x) for x in (1e-13, 3e-3, 2.5e-3, 0.02, 1000.0, 3.0)] == ["1e-13", "3e-3", "2.5e-3", "0.02",
                                                                             "1000", "3"]


def test_jacobian_regularisation_lowers_iterations_and_radius(tmp_path):
    rows = _rows(_claim("jacobian-reg", tmp_path))
    for lr in {r["learning_rate"] for r in rows}:
        plain, reg = (next(r for r in rows if r["learning_rate"] == lr and bool(r["jac_reg"]) == j) for j in (0, 1))
        assert reg["forward_iterations_last_epoch"] < plain["forward_iterations_last_epoch"]
        assert reg["spectral_radius"] < plain["spectral_radius"]


def test_gd_convergence_linear_rate_small_weights_and_the_identity_floor(tmp_path):
    rows = _rows(_claim("gd-convergence", tmp_path))
    tanh = [r for r in rows if r["activation"] == "tanh"]
    assert all(r["fitted_rate"] < 1 and r["final_loss"] < 0.05 * r["initial_loss"] for r in tanh)
    assert tanh[-1]["largest_weight_norm"] < 1.0  # the wider layer stays a contraction
    assert tanh[-1]["relative_weight_change"] < tanh[0]["relative_weight_change"]
    floor = rows[0]["affine_floor"]
    assert all(r["min_loss"] >= floor - 1e-9 for r in rows if r["activation"] == "identity")
    assert all(r["final_loss"] < floor for r in tanh)


def test_linf_certificates_hold_and_the_penalty_lowers_the_bound(tmp_path):
    rows = _rows(_claim("linf-contractive", tmp_path))
    for r in rows:
        assert r["mu_inf"] <= r["mu"] + 1e-6
        assert r["worst_measured_contraction"] <= r["certified_factor"] + 1e-6
        assert r["empirical_lipschitz"] <= r["lipschitz_bound"]
        assert r["forward_iterations"] <= r["forward_iterations_bound"]
    plain, regularised = rows
    assert regularised["lipschitz_bound"] < plain["lipschitz_bound"]


def test_lipschitz_layers_stay_within_their_iteration_bounds(tmp_path):
    rows = _rows(_claim("lipschitz", tmp_path))
    certified = [r for r in rows if r["forward_bound"] is not None]
    assert len(certified) == 2
    for r in certified:
        assert r["largest_forward"] <= r["forward_bound"] and r["largest_backward"] <= r["backward_bound"]


def test_lipschitz_mdeq_is_certified_and_solves_in_fewer_iterations(tmp_path):
    plain, regularised, lipschitz = _rows(_claim("lipschitz-mdeq", tmp_path))
    assert lipschitz["measured_lipschitz"] <= lipschitz["proven_lipschitz"] <= 0.9 and lipschitz["paper_estimate"] > 0
    assert lipschitz["unconverged_batches"] == 0.0  # a 0.9-contraction reaches tol 1e-3 well within 30 steps
    for other in (plain, regularised):
        assert lipschitz["forward_iterations"] < other["forward_iterations"]
        assert lipschitz["backward_iterations"] < other["backward_iterations"]
        assert other["proven_lipschitz"] is None


def test_cli(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["no-such-claim"])
    assert set(CLAIMS) == {"pcdeq", "jacobian-reg", "gd-convergence", "linf-contractive", "lipschitz",
                           "lipschitz-mdeq"}
    results = main(["lipschitz", "--quick", "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert results[0].closing_line() in out and "wrote" in out


def test_without_matplotlib_the_run_completes_and_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    results = main(["jacobian-reg", "--quick", "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert NO_PLOT_NOTE in out and out.index(NO_PLOT_NOTE) < out.index("=== jacobian-reg")  # before the run
    assert [p.name for p in results[0].files] == ["jacobian-reg.md", "jacobian-reg.csv"]
    assert all(p.stat().st_size > 200 for p in results[0].files) and not (tmp_path / "jacobian-reg.png").exists()
    assert results[0].closing_line() in out
