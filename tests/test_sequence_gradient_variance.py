"""`benchmarks/sequence_gradient_variance.py` at smoke size (one table): it runs, writes the JSON and
table it promises, and what must hold does: the exact estimators' sequence gradients have no bias
(with every baseline), the token-level gradient has, the whole return in place of F_t (KL in the reward,
plus the local term) is unbiased only where v_t does not depend on o_t beyond a zero-mean local gradient
(rb, k1), prefix ratios remove the off-policy bias, and the sum aggregation is exact."""

from benchmarks import sequence_gradient_variance as bench


def test_smoke_run_writes_the_tables_and_the_exact_cases_are_exact(tmp_path):
    result = bench.main(["--smoke", "--out-dir", str(tmp_path), "--run-name", "smoke"])
    (md,) = tmp_path.glob("*-smoke.md")
    assert len(list(tmp_path.glob("*-smoke.json"))) == 1
    text = md.read_text()
    for label, _, _ in bench.VARIANCE_ROWS:
        assert f"| {label} |" in text
    (entry,) = result["tables"]
    for label, name, _ in bench.VARIANCE_ROWS:
        rows = entry["estimators"][label]
        assert set(rows) == set(bench.BASELINES)
        for row in rows.values():
            assert row["mse2"] >= row["rel_bias"] ** 2 - 1e-12  # MSE = variance + bias²
        if name in bench.EXACT:
            assert max(rows[b]["rel_bias"] for b in bench.BASELINES if b not in ("token", "return-loo")) < 1e-12
            assert (rows["return-loo"]["rel_bias"] < 1e-12) == (name in ("k1", "rb"))
            assert rows["token"]["rel_bias"] > 0.1  # the future term is real
    for row in entry["off_policy"]:
        assert row["prefix ratios"]["rel_bias"] < 1e-12 < 0.01 < row["token ratio"]["rel_bias"]
    for rows in entry["loss_types"]["estimators"].values():
        assert rows["sum (dr_grpo, luspo)"]["rel_error_after_rescaling"] < 1e-12
        assert rows["per completion 1/|y| (grpo, sapo)"]["rel_error_after_rescaling"] > 0.01
