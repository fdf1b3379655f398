"""Where TRL's own behaviour must come through unchanged: the policy-gradient log-probs in bf16
whatever the estimator, k3 with tool masks, and every metric TRL logs."""

from __future__ import annotations

import pytest
import torch
from tiny import save_tiny_model
from trainers import fixed_batch, make_trainer
from trl import GRPOConfig, GRPOTrainer

# metrics that measure wall-clock time, not the computation
WALL_CLOCK = ("step_time",)


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory):
    """The tiny model with its head scaled so logits reach ~30, where bf16 rounds each one by
    ~0.03-0.06: what a real LM's head produces, and where precision slips show."""
    path = tmp_path_factory.mktemp("tiny-sharp")
    save_tiny_model(path)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0 / model.lm_head.weight.abs().max())
    model.save_pretrained(path)
    return path


def _perturb(trainer, scale: float, seed_offset: int = 0) -> None:
    """Move the policy away from the reference, deterministically."""
    with torch.no_grad():
        for p in trainer.model.parameters():
            g = torch.Generator().manual_seed(p.numel() + seed_offset)
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


def _loss(trainer, inputs) -> torch.Tensor:
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, inputs)


@pytest.mark.parametrize(
    "options",
    [
        dict(kl_estimator="k3"),
        dict(kl_estimator="tike"),
        dict(kl_estimator="tike", log_exact_kl_steps=1),
        dict(kl_estimator="rb"),
    ],
    ids=["k3", "tike", "tike-exact-kl-steps", "rb"],
)
def test_bf16_policy_gradient_logprobs_are_trls(sharp_model_dir, tmp_path, options):
    """In bf16 the label log-probs TRL's policy-gradient loss reads come from TRL's own head
    arithmetic for every estimator, so on-policy TRL's ratio is exactly 1: the loss with TRL's old
    log-probs (its generation-time pass) equals the loss without them."""
    _, inputs = fixed_batch(sharp_model_dir, tmp_path)
    trainer = make_trainer(sharp_model_dir, tmp_path, bf16=True, tike_top_k=4, **options)
    _perturb(trainer, 0.05)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():  # TRL's generation-time pass: its head, at the compute dtype
        old, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, mask, inputs["completion_ids"].size(1)
        )
    without_old = {k: v for k, v in inputs.items() if k != "old_per_token_logps"}
    assert torch.equal(_loss(trainer, {**without_old, "old_per_token_logps": old}), _loss(trainer, without_old))


def _tool_batch(inputs: dict) -> dict:
    """The batch with tool-call output tokens inside the completions (tool_mask 0 there)."""
    tool_mask = torch.ones_like(inputs["completion_mask"])
    tool_mask[:, 2:4] = 0
    return {**inputs, "tool_mask": tool_mask}


def _trl_and_ours(model_dir, tmp_path, **options):
    """TRL's trainer and ours (k3) with `options`, the same weights moved off the reference, and
    an off-policy batch (so TRL's ratio and its gradient matter)."""
    _, inputs = fixed_batch(model_dir, tmp_path)
    trl_trainer = make_trainer(model_dir, tmp_path, cls=GRPOTrainer, config_cls=GRPOConfig, **options)
    ours = make_trainer(model_dir, tmp_path, kl_estimator="k3", **options)
    _perturb(trl_trainer, 0.05)
    with torch.no_grad():
        for p_ours, p_trl in zip(ours.model.parameters(), trl_trainer.model.parameters()):
            p_ours.copy_(p_trl)
    noise = torch.rand_like(inputs["ref_per_token_logps"], generator=torch.Generator().manual_seed(1))
    return trl_trainer, ours, {**inputs, "old_per_token_logps": inputs["ref_per_token_logps"] - 0.1 * noise}


def _loss_grads_metrics(trainer, inputs):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    trainer._metrics["train"].clear()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    loss = trainer.compute_loss(trainer.model, inputs)
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items() if name not in WALL_CLOCK}
    return loss.detach(), torch.autograd.grad(loss, params), metrics


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "luspo"])
def test_k3_with_tool_mask_equals_trl(tiny_model_dir, tmp_path, level, loss_type):
    """TRL's k3 ratio (`use_bias_correction_kl`) averages the sequence-level log-ratio over the
    model's own tokens only (completion_mask * tool_mask); so do we."""
    trl_trainer, ours, inputs = _trl_and_ours(
        tiny_model_dir, tmp_path, importance_sampling_level=level, loss_type=loss_type
    )
    inputs = _tool_batch(inputs)
    loss_trl, grads_trl, metrics_trl = _loss_grads_metrics(trl_trainer, inputs)
    loss_ours, grads_ours, metrics_ours = _loss_grads_metrics(ours, inputs)
    torch.testing.assert_close(loss_ours, loss_trl, atol=1e-6, rtol=1e-5)
    for g_ours, g_trl in zip(grads_ours, grads_trl):
        torch.testing.assert_close(g_ours, g_trl, atol=1e-6, rtol=1e-5)
    assert metrics_ours["kl"] == pytest.approx(metrics_trl["kl"], rel=1e-5) and metrics_trl["kl"] > 1e-4


@pytest.mark.parametrize("tool_mask", [False, True])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo"])
def test_k3_logs_every_metric_trl_logs(tiny_model_dir, tmp_path, loss_type, tool_mask):
    """With an entropy bonus (so TRL logs `policy_loss`, which holds its KL term), k3 logs exactly
    the metrics TRL logs, with TRL's values."""
    trl_trainer, ours, inputs = _trl_and_ours(tiny_model_dir, tmp_path, loss_type=loss_type, entropy_coef=0.01)
    inputs = _tool_batch(inputs) if tool_mask else inputs
    _, _, metrics_trl = _loss_grads_metrics(trl_trainer, inputs)
    _, _, metrics_ours = _loss_grads_metrics(ours, inputs)
    assert "policy_loss" in metrics_trl and "kl" in metrics_trl
    assert sorted(metrics_ours) == sorted(metrics_trl)
    for name, value in metrics_trl.items():
        assert metrics_ours[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name


@pytest.mark.filterwarnings("ignore:beta=0.0 switches the KL term off")  # TRL's side runs without the KL
@pytest.mark.parametrize("estimator", ["tike", "rb"])
def test_head_estimators_log_trls_other_metrics(tiny_model_dir, tmp_path, estimator):
    """tike and rb change only the KL: every other metric TRL logs (entropy, clip ratios, ...) is
    TRL's on the same batch, and the logged policy loss holds the KL term, as TRL's does."""
    trl_trainer, _, inputs = _trl_and_ours(tiny_model_dir, tmp_path, entropy_coef=0.01, beta=0.0)
    ours = make_trainer(tiny_model_dir, tmp_path, kl_estimator=estimator, entropy_coef=0.01, tike_top_k=4)
    with torch.no_grad():
        for p_ours, p_trl in zip(ours.model.parameters(), trl_trainer.model.parameters()):
            p_ours.copy_(p_trl)
    _, _, metrics_trl = _loss_grads_metrics(trl_trainer, inputs)
    loss, _, metrics_ours = _loss_grads_metrics(ours, inputs)
    assert "kl" not in metrics_trl and metrics_ours["kl"] > 1e-4
    assert set(metrics_ours) - set(metrics_trl) == {"kl"} | ({"kl/topk_mass"} if estimator == "tike" else set())
    for name, value in metrics_trl.items():
        if name != "policy_loss":
            assert metrics_ours[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    # grpo, one process, no accumulation: loss = policy_loss (policy gradient + beta·KL) − coef·entropy
    assert loss.item() == pytest.approx(metrics_ours["policy_loss"] - 0.01 * metrics_ours["entropy"], rel=1e-5)
    assert metrics_ours["policy_loss"] != pytest.approx(metrics_trl["policy_loss"], rel=1e-6)
