"""`log_exact_kl_steps`: kl/exact and kl/tail_residual come from the same tiled policy pass, only on
the configured steps, agree with dense math on the same batch, and leave the loss untouched."""

from __future__ import annotations

import math

import pytest
import torch
from trainers import fixed_batch, make_trainer

from tike_trl import TIKEConfig, kl_estimate
from tike_trl.estimators import exact_kl

EXACT_METRICS = ("kl/exact", "kl/tail_residual")


@pytest.mark.parametrize("estimator", ["tike", "rb"])
def test_metrics_on_configured_steps_only(tiny_model_dir, tmp_path, estimator):
    trainer = make_trainer(
        tiny_model_dir, tmp_path, kl_estimator=estimator, tike_top_k=4, max_steps=3, log_exact_kl_steps=2
    )
    trainer.train()
    logs = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    assert sorted(logs) == [1, 2, 3]
    for step, log in logs.items():
        if step % 2:
            assert not any(m in log for m in EXACT_METRICS), step
        else:
            assert all(math.isfinite(log[m]) for m in EXACT_METRICS), step
            assert log["kl/exact"] >= -1e-6
            assert 0.0 < log["kl/topk_mass"] <= 1.0 + 1e-6


def _perturbed_trainer(tiny_model_dir, tmp_path, inputs_source, **overrides):
    """Our trainer with the TRL trainer's weights moved away from the reference."""
    ours = make_trainer(tiny_model_dir, tmp_path, kl_estimator="tike", tike_top_k=4, **overrides)
    with torch.no_grad():
        for p_ours, p_trl in zip(ours.model.parameters(), inputs_source.model.parameters()):
            p_ours.copy_(
                p_trl + 0.3 * torch.randn(p_trl.shape, generator=torch.Generator().manual_seed(p_trl.numel()))
            )
    ours.model.train()
    ours.current_gradient_accumulation_steps = 1
    return ours


def test_exact_minus_residual_is_the_dense_top_k_sum(tiny_model_dir, tmp_path):
    trl_trainer, inputs = fixed_batch(tiny_model_dir, tmp_path)
    ours = _perturbed_trainer(tiny_model_dir, tmp_path, trl_trainer, log_exact_kl_steps=1, tike_tail="sampled")
    ours.compute_loss(ours.model, inputs)
    metrics = {name: values[-1] for name, values in ours._metrics["train"].items()}

    # dense: full logits of both models on the same batch, at TRL's temperature
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    n = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        policy = ours.model(input_ids=ids, attention_mask=attention).logits[:, -n - 1 : -1] / ours.args.temperature
        ref = ours.ref_model(input_ids=ids, attention_mask=attention).logits[:, -n - 1 : -1] / ours.args.temperature
    sampled, mask = inputs["completion_ids"], inputs["completion_mask"].float()
    top_sum = kl_estimate(policy, ref, sampled, "tike", top_k=4, tail="drop", importance_weight=False)
    exact = exact_kl(torch.log_softmax(policy.float(), -1), torch.log_softmax(ref.float(), -1))

    def masked_mean(x):
        return ((x * mask).sum() / mask.sum()).item()

    assert metrics["kl/exact"] > 1e-3  # the policy moved: the check is not 0 == 0
    assert abs(metrics["kl/tail_residual"]) > 1e-4  # k=4 of 33 tokens leaves a real tail
    assert metrics["kl/exact"] == pytest.approx(masked_mean(exact), rel=1e-4, abs=1e-6)
    assert metrics["kl/exact"] - metrics["kl/tail_residual"] == pytest.approx(masked_mean(top_sum), rel=1e-4, abs=1e-6)


def test_logging_exact_kl_leaves_the_loss_unchanged(tiny_model_dir, tmp_path):
    trl_trainer, inputs = fixed_batch(tiny_model_dir, tmp_path)
    results = []
    for every in (0, 1):
        ours = _perturbed_trainer(tiny_model_dir, tmp_path, trl_trainer, log_exact_kl_steps=every, tike_tail="mc")
        params = [p for p in ours.model.parameters() if p.requires_grad]
        loss = ours.compute_loss(ours.model, inputs)
        results.append((loss.detach(), torch.autograd.grad(loss, params), set(ours._metrics["train"])))
    (loss_off, grads_off, keys_off), (loss_on, grads_on, keys_on) = results
    assert keys_on - keys_off == set(EXACT_METRICS)
    torch.testing.assert_close(loss_on, loss_off, atol=1e-6, rtol=1e-5)
    for g_on, g_off in zip(grads_on, grads_off):
        torch.testing.assert_close(g_on, g_off, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(log_exact_kl_steps=-1), "log_exact_kl_steps=-1 must be an integer >= 0"),
        (dict(log_exact_kl_steps=2.5), "log_exact_kl_steps=2.5 must be an integer >= 0"),
        (dict(log_exact_kl_steps=1, kl_estimator="k3"), "needs kl_estimator 'tike' or 'rb'"),
        (dict(log_exact_kl_steps=1, beta=0.0), "needs the KL term"),
    ],
)
def test_config_rejects_bad_exact_kl_logging(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        TIKEConfig(output_dir=str(tmp_path), use_cpu=True, **overrides)


def test_exact_kl_logging_is_off_by_default(tmp_path):
    assert TIKEConfig(output_dir=str(tmp_path), use_cpu=True).log_exact_kl_steps == 0
