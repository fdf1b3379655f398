"""Tokens drawn from a sampler other than the trainer's π_old (vLLM, a rollout_func): TIKE's
importance weight divides by the distribution the token was drawn from, and settings that make
generation sample from a processed distribution are named in a warning."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from tiny import WORDS, load_tokenizer, prompt_dataset, reward_length
from trainers import COMMON
from transformers import AutoModelForCausalLM

from tike_trl import TIKEConfig, TIKEGRPOTrainer, kl_estimate
from tike_trl.estimators import exact_kl

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL

V = 6


def _distributions():
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(V, generator=g, dtype=torch.float64).requires_grad_()
    ref = torch.randn(V, generator=g, dtype=torch.float64)
    sampler = torch.randn(V, generator=g, dtype=torch.float64)  # full support, different from π_θ and π_old
    old = torch.randn(V, generator=g, dtype=torch.float64)
    return theta, ref, F.log_softmax(sampler, -1), F.log_softmax(old, -1)


def _expected_mc(theta, ref, log_draw, log_weight_by):
    """E_{o ~ exp(log_draw)}[mc estimate with the importance weight dividing by exp(log_weight_by)],
    by summing over every token, no sampling; value and gradient."""
    total = 0.0
    for o in range(V):
        value = kl_estimate(
            theta.unsqueeze(0),
            ref.unsqueeze(0),
            torch.tensor([o]),
            "tike",
            top_k=2,
            tail="mc",
            old_logprobs=log_weight_by[o].reshape(1),
            is_clip=None,
        )
        total = total + log_draw[o].exp() * value.sum()
    (grad,) = torch.autograd.grad(total, theta)
    return total.detach(), grad


def test_mc_tail_is_unbiased_when_weighted_by_the_sampler():
    theta, ref, log_sampler, log_old = _distributions()
    exact = exact_kl(F.log_softmax(theta, -1), F.log_softmax(ref, -1))
    (exact_grad,) = torch.autograd.grad(exact, theta)
    value, grad = _expected_mc(theta, ref, log_draw=log_sampler, log_weight_by=log_sampler)
    torch.testing.assert_close(value, exact.detach(), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grad, exact_grad, atol=1e-12, rtol=1e-10)


def test_mc_tail_is_biased_when_weighted_by_pi_old_instead():
    theta, ref, log_sampler, log_old = _distributions()
    exact = exact_kl(F.log_softmax(theta, -1), F.log_softmax(ref, -1)).detach()
    value, _ = _expected_mc(theta, ref, log_draw=log_sampler, log_weight_by=log_old)
    assert abs(value - exact) > 1e-3
    # the bias is exactly the tail mis-weighted by sampler/π_old
    logp, logq = F.log_softmax(theta.detach(), -1), F.log_softmax(ref, -1)
    tail = logp.topk(2).indices.tolist()
    expected_bias = sum(
        (logp[o].exp() * (log_sampler[o] - log_old[o]).exp() - logp[o].exp()) * (logp[o] - logq[o])
        for o in range(V)
        if o not in tail
    )
    assert float(value - exact) == pytest.approx(float(expected_bias), rel=1e-9)


# ---- through the trainer ----

SAMPLER_LOGPROB = math.log(1 / len(WORDS))  # a uniform sampler: full support, far from the policy
COMPLETIONS = [[5, 6, 7, 1], [8, 9, 1], [10, 11, 12, 13, 1], [14, 1]]


def _rollout(prompts, trainer):
    tokenizer = trainer.processing_class
    completions = [COMPLETIONS[i % len(COMPLETIONS)] for i in range(len(prompts))]
    return {
        "prompt_ids": [tokenizer(p)["input_ids"] for p in prompts],
        "completion_ids": completions,
        "logprobs": [[SAMPLER_LOGPROB] * len(c) for c in completions],
    }


def _trainer(model_dir, tmp_path, **overrides):
    options = {**COMMON, "beta": 0.05, "tike_top_k": 4, "tike_tail": "mc", "tike_is_clip": None, **overrides}
    return TIKEGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        reward_funcs=reward_length,
        args=TIKEConfig(output_dir=str(tmp_path / "out"), **options),
        train_dataset=prompt_dataset(),
        processing_class=load_tokenizer(model_dir),
        rollout_func=_rollout,
    )


def _kl_metric_and_dense(trainer, use_sampler: bool) -> tuple[float, float]:
    """The trainer's logged kl on one generation batch, and the dense mc estimate of the same
    batch with the weight dividing by the sampler's log-probs (or by π_old = π_θ)."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    with torch.no_grad():
        for p in trainer.model.parameters():  # move the policy off the reference
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    inputs = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
    assert "sampling_per_token_logps" in inputs and "old_per_token_logps" not in inputs
    trainer.compute_loss(trainer.model, inputs)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    n = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        policy = trainer.model(input_ids=ids, attention_mask=attention).logits[:, -n - 1 : -1]
        ref = trainer.ref_model(input_ids=ids, attention_mask=attention).logits[:, -n - 1 : -1]
    sampled, mask = inputs["completion_ids"], inputs["completion_mask"].float()
    old = inputs["sampling_per_token_logps"] if use_sampler else None
    dense = kl_estimate(policy, ref, sampled, "tike", top_k=4, tail="mc", old_logprobs=old)
    return trainer._metrics["train"]["kl"][-1], ((dense * mask).sum() / mask.sum()).item()


def test_trainer_weights_by_the_samplers_logprobs(tiny_model_dir, tmp_path):
    logged, dense = _kl_metric_and_dense(_trainer(tiny_model_dir, tmp_path), use_sampler=True)
    assert logged == pytest.approx(dense, rel=1e-4, abs=1e-6)
    logged_old, dense_old = _kl_metric_and_dense(
        _trainer(tiny_model_dir, tmp_path, tike_sampler_logprobs=False), use_sampler=False
    )
    assert logged_old == pytest.approx(dense_old, rel=1e-4, abs=1e-6)
    assert abs(logged - logged_old) > 1e-3  # the switch matters on this batch


# ---- sampling settings that change the distribution ----


@pytest.mark.parametrize(
    "overrides,named",
    [
        (dict(top_p=0.9), "top_p=0.9"),
        (dict(top_k=20), "top_k=20"),
        (dict(min_p=0.05), "min_p=0.05"),
        (dict(repetition_penalty=1.1), "repetition_penalty=1.1"),
        (dict(generation_kwargs={"top_p": 0.5}), "top_p=0.5"),
        (dict(kl_estimator="k3", top_p=0.9), "kl_estimator='k3'"),
    ],
)
def test_processed_sampling_warns_naming_the_setting(tmp_path, overrides, named):
    with pytest.warns(UserWarning, match="processed distribution") as record:
        TIKEConfig(output_dir=str(tmp_path), use_cpu=True, **overrides)
    assert any(named in str(w.message) for w in record)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(top_p=0.9, kl_estimator="rb"),
        dict(top_p=0.9, tike_tail="drop"),
        dict(top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0),
    ],
)
def test_no_warning_where_the_sampled_token_is_not_read(tmp_path, overrides):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        TIKEConfig(output_dir=str(tmp_path), use_cpu=True, **overrides)
    assert not [w for w in record if "processed distribution" in str(w.message)]
