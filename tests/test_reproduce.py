"""`python -m deqkern reproduce`: each paper's claim, at the quick sizes (seconds), checked in its direction with a
margin, so that a change that breaks a guarantee or a claim fails here; and the files each claim writes."""
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from deqkern.reproduce import CLAIMS, main, run_claim  # noqa: E402


def _rows(result):
    (columns, rows), *_ = result.tables.values()
    return rows


def _claim(name, tmp_path):
    result = run_claim(name, tmp_path, quick=True, show_progress=False)
    for path in result.files:
        assert path.exists() and path.stat().st_size > 200, path
    assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.closing_line().startswith(f"{name}: ")
    return result


def test_pcdeq(tmp_path):
    result = _claim("pcdeq", tmp_path)
    theory, trained = (rows for _, rows in result.tables.values())
    assert {r["weight_norm"] for r in theory} == {0.5, 2.0, 10.0, 100.0}
    for r in theory:
        assert r["largest_distance"] < 1e-9 and r["monotone_from_zero"]  # one fixed point, whatever ||W||
        assert r["measured_rate"] <= r["theorem_rate"] + 1e-12 and r["tail_rate"] <= r["theorem_rate"] + 1e-12
    assert all(r["test_accuracy"] > 0.3 for r in trained if r["model"].startswith("pcDEQ"))  # learns (chance 0.1)


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


def test_cli(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["no-such-claim"])
    assert set(CLAIMS) == {"pcdeq", "jacobian-reg", "gd-convergence", "linf-contractive", "lipschitz"}
    results = main(["lipschitz", "--quick", "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert results[0].closing_line() in out and "wrote" in out
