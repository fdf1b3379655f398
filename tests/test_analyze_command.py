"""`tike-trl analyze` end to end on tiny local models: it finishes, writes its outputs, and its
numbers obey what must hold."""

from __future__ import annotations

import json

import pytest
from tiny import WORDS, prompt_dataset, save_tiny_model

from tike_trl.analysis import diagnostics, sampling
from tike_trl.analysis.command import AnalysisConfig, run_analysis
from tike_trl.analysis.report import write_report
from tike_trl.cli import main

KS = (2, 4, 8, 16)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze-models")
    return save_tiny_model(root / "ref"), save_tiny_model(root / "policy", seed=1)


@pytest.fixture(scope="module")
def results(models):
    ref, policy = models
    config = AnalysisConfig(
        policy=str(policy),
        ref=str(ref),
        prompts=3,
        pool=48,
        completion_len=8,
        ks=KS,
        tike_k=4,
        bootstrap=300,
        grad_batch=4,
    )
    return run_analysis(config, prompts=prompt_dataset(3)["prompt"])


def test_coverage_obeys_the_identities(results):
    cov = results["coverage"]
    assert results["setup"]["positions"] > 3 * 48  # completions are several tokens long
    assert cov["identity_max_abs_error"] < 1e-5  # truncated KL + residual = exact KL
    masses = [cov["table"][k]["all"]["mean_mass"] for k in KS]
    assert masses == sorted(masses) and masses[-1] < 1.0  # m_k nondecreasing in k; 16 of 33 tokens is not all
    residuals = [cov["table"][k]["all"]["mean_abs_tail"] for k in KS]
    assert residuals[-1] > 0.0
    for k in KS:
        regimes = cov["table"][k]
        assert regimes["all"]["positions"] == results["setup"]["positions"]
        assert regimes["m<0.9"]["positions"] + regimes["m>=0.99"]["positions"] <= regimes["all"]["positions"]


def test_rb_has_the_smallest_variance_of_the_unbiased_estimators(results):
    bv = results["bias_variance"]
    for prompt in bv["prompts"]:
        stds = {name: prompt["estimators"][name]["std"] for name in bv["unbiased"]}
        for name, std in stds.items():
            assert all(r <= s for r, s in zip(stds["rb"], std)), name
    # ground truth is rb over the pool; the truncated estimators are off by the tail, the others are not
    summary = bv["summary"]["estimators"]
    assert abs(summary["rb"]["bias"][-1]) < 0.1 * summary["rb"]["std"][0]
    assert abs(summary["tike-drop"]["bias"][-1]) > abs(summary["tike-mc"]["bias"][-1])


def test_gradient_spread(results):
    gradient = results["gradient"]
    grads = gradient["summary"]
    assert results["setup"]["gradient_parameters"] == {"name": "model.norm.weight", "numel": 16}
    assert list(grads) == list(diagnostics.GRADIENT_ESTIMATORS) and len(gradient["prompts"]) == 3
    assert grads["rb"]["cos_to_exact"] == pytest.approx(1.0) and grads["rb-seq"]["cos_to_exact"] == pytest.approx(1.0)
    assert grads["rb-seq"]["cos_to_sequence"] == pytest.approx(1.0)
    # the exact estimator's gradient varies only through the sampled histories
    assert grads["rb"]["total_var"] < grads["k1"]["total_var"]
    assert grads["rb"]["total_var"] < grads["tike-mc"]["total_var"]
    # the sequence level adds the score term of the future KL: more variance than rb's token level
    assert grads["rb-seq"]["total_var"] > grads["rb"]["total_var"]
    for name in diagnostics.VALUE_ESTIMATORS:
        effect = gradient["baselines"][name]
        assert effect["lowest_total_var"] in ("seq", "seq-loo", "seq-mean")
        assert all(0 <= wins <= 3 for wins in effect["wins"].values())


def test_the_pool_does_not_depend_on_the_resampling(models):
    """The bootstrap draws its own random stream: skipping the gradient section leaves the sampled
    pool, and so every coverage number, unchanged."""
    ref, policy = models
    options = dict(policy=str(policy), ref=str(ref), prompts=2, pool=6, completion_len=4, ks=(2,), tike_k=2)
    runs = [
        run_analysis(AnalysisConfig(**options, bootstrap=20, gradients=gradients), prompts=prompt_dataset(2)["prompt"])
        for gradients in (True, False)
    ]
    assert runs[0]["coverage"] == runs[1]["coverage"]
    assert runs[0]["bias_variance"] == runs[1]["bias_variance"]


def test_report_files(results, tmp_path):
    paths = write_report(results, tmp_path)
    assert {p.name for p in paths} == {
        "results.json",
        "report.md",
        "coverage.png",
        "bias_variance.png",
        "token_profile.png",
        "gradient_variance.png",
    }
    assert all(p.stat().st_size > 1000 for p in paths)
    report = (tmp_path / "report.md").read_text()
    for heading in ("Top-k coverage", "Bias and variance", "Gradient variance", "probability profile"):
        assert heading in report
    for row in ("| tike-mc | yes |", "| tike-drop | no |", "| mc (k1-seq − k1) | yes | — |", "| rb-seq-loo |"):
        assert row in report
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["coverage"]["table"]["4"]["all"]["mean_mass"] == results["coverage"]["table"][4]["all"]["mean_mass"]
    profile = results["profile"]
    assert len(profile["tokens"]) == len(profile["top1"]) and all(t in WORDS for t in profile["tokens"])
    assert all(a <= b + 1e-6 for a, b in zip(profile["top1"], profile["topk_mass"]))


def test_single_token_completions_make_rb_exact(models):
    """With one token the history is fixed by the prompt: rb is deterministic, the others are not."""
    ref, policy = models
    config = AnalysisConfig(
        policy=str(policy),
        ref=str(ref),
        prompts=1,
        pool=16,
        completion_len=1,
        ks=(4,),
        tike_k=4,
        bootstrap=50,
        gradients=False,
    )
    out = run_analysis(config, prompts=prompt_dataset(1)["prompt"])
    stds = {name: e["std"] for name, e in out["bias_variance"]["prompts"][0]["estimators"].items()}
    assert max(stds["rb"]) < 1e-6
    assert min(stds["k1"]) > 1e-3 and min(stds["tike-mc"]) > 1e-3
    assert out["gradient"] is None


def test_cli_end_to_end(models, tmp_path):
    ref, policy = models
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p}) for p in prompt_dataset(2)["prompt"]))
    out = tmp_path / "report"
    assert (
        main(
            [
                "analyze",
                "--policy",
                str(policy),
                "--ref",
                str(ref),
                "--dataset",
                str(data),
                "--prompts",
                "2",
                "--pool",
                "4",
                "--completion-len",
                "4",
                "--k",
                "2",
                "8",
                "--tike-k",
                "2",
                "--bootstrap",
                "20",
                "--grad-batch",
                "2",
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    saved = json.loads((out / "results.json").read_text())
    assert saved["setup"]["sequences"] == 8 and saved["coverage"]["ks"] == [2, 8]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--pool", "1"], "pool=1 must be at least 2"),
        (["--k", "0"], "k=[0] must be one or more integers >= 1"),
        (["--temperature", "0"], "temperature=0.0 must be > 0"),
        (["--grad-batch", "1"], "grad_batch=1 must be at least 2"),
    ],
)
def test_cli_rejects_bad_input(args, message, capsys):
    assert main(["analyze", *args]) == 2
    assert message in capsys.readouterr().err


def test_default_policy_is_the_trained_model_if_any(models, tmp_path, monkeypatch):
    ref, _ = models
    monkeypatch.chdir(tmp_path)
    resolved = sampling.resolve_models(AnalysisConfig(ref=str(ref)))
    assert resolved["policy"] == str(ref) and resolved["policy_shift"] == sampling.SHIFTED_POLICY_TEMPERATURE
    assert "built-in shifted policy" in resolved["policy_name"]
    trained = save_tiny_model(tmp_path / "outputs" / "tike-train", seed=2)
    resolved = sampling.resolve_models(AnalysisConfig(ref=str(ref)))
    assert resolved["policy"] == "outputs/tike-train" and resolved["policy_shift"] == 1.0
    assert trained.exists()
