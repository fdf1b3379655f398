"""`kl_gradient="sequence"` through the trainer: the KL part of its gradient is the dense
`sequence_kl_surrogate`'s on the same batch (with a LoRA adapter too), the loss value and the kl
metric are the token-level ones, and it costs no extra forward."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig
from trainers import fixed_batch, make_trainer

from tike_trl import TIKEConfig, sequence_kl_surrogate
from tike_trl.trainer import PositionRunningMean


def _perturbed(trainer, source) -> None:
    """The trainer's policy: the batch source's weights moved off the reference, deterministically."""
    with torch.no_grad():
        for p, q in zip(trainer.model.parameters(), source.model.parameters()):
            p.copy_(q + 0.3 * torch.randn(q.shape, generator=torch.Generator().manual_seed(q.numel())))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1


def _loss_and_grads(trainer, inputs):
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    loss = trainer.compute_loss(trainer.model, inputs)
    return loss.detach(), torch.autograd.grad(loss, params)


CASES = [
    dict(kl_estimator="rb"),
    dict(kl_estimator="tike", tike_tail="mc"),
    dict(kl_estimator="tike", tike_tail="sampled"),
    dict(kl_estimator="k3"),
    dict(kl_estimator="k1"),
]


def _kl_part_of_the_gradient(trainer, inputs) -> list[torch.Tensor]:
    """The gradient at 2β minus the gradient at β, divided by β: the KL term's part alone."""
    beta = trainer.beta
    _, grads_beta = _loss_and_grads(trainer, inputs)
    trainer.beta = 2 * beta
    _, grads_twice = _loss_and_grads(trainer, inputs)
    trainer.beta = beta
    return [(a - b) / beta for a, b in zip(grads_twice, grads_beta)]


def _dense_gradient(trainer, inputs, options, baseline, reference) -> list[torch.Tensor]:
    """`sequence_kl_surrogate`'s gradient on the batch, summed and normalised as dr_grpo does;
    `reference` is the reference model's forward (a model, or the policy with its adapters off)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    n = inputs["completion_ids"].shape[1]
    temperature = trainer.args.temperature
    policy = trainer.model(input_ids=ids, attention_mask=attention).logits[:, -n - 1 : -1] / temperature
    with torch.no_grad():
        ref = reference(input_ids=ids, attention_mask=attention).logits[:, -n - 1 : -1] / temperature
    surrogate = sequence_kl_surrogate(
        policy,
        ref,
        inputs["completion_ids"],
        inputs["completion_mask"],
        estimator=options["kl_estimator"],
        top_k=4,
        tail=options.get("tike_tail", "sampled"),
        old_logprobs=inputs.get("old_per_token_logps"),
        group_size=ids.shape[0] if baseline == "loo" else None,
    )
    dense = surrogate.sum() / (ids.shape[0] * trainer.max_completion_length)
    expected = torch.autograd.grad(dense, [p for p in trainer.model.parameters() if p.requires_grad])
    assert max(e.abs().max().item() for e in expected) > 1e-3
    return list(expected)


@pytest.mark.parametrize("off_policy", [False, True])
@pytest.mark.parametrize("baseline", ["none", "loo"])
@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_kl_gradient_equals_the_dense_surrogate(tiny_model_dir, tmp_path, options, baseline, off_policy):
    """dr_grpo sums the per-token terms, so the KL part of the gradient is the dense surrogate's,
    summed and normalised likewise."""
    source, inputs = fixed_batch(tiny_model_dir, tmp_path)
    if off_policy:
        noise = torch.rand(inputs["completion_ids"].shape, generator=torch.Generator().manual_seed(5))
        inputs = {**inputs, "old_per_token_logps": inputs["ref_per_token_logps"] - 0.2 * noise}
    config = dict(loss_type="dr_grpo", kl_gradient="sequence", kl_sequence_baseline=baseline, tike_top_k=4)
    trainer = make_trainer(tiny_model_dir, tmp_path, tike_is_clip=None, **config, **options)
    _perturbed(trainer, source)
    ours = _kl_part_of_the_gradient(trainer, inputs)
    expected = _dense_gradient(trainer, inputs, options, baseline, trainer.ref_model)
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-3)


@pytest.mark.parametrize("options", CASES[:2], ids=lambda o: "-".join(str(v) for v in o.values()))
def test_kl_gradient_with_a_lora_adapter(tiny_model_dir, tmp_path, options):
    """PEFT: the reference is the model with its new adapter disabled, and the KL part of the
    adapter's gradient is still the dense surrogate's (reference forward with the adapter off)."""
    _, inputs = fixed_batch(tiny_model_dir, tmp_path)
    config = dict(loss_type="dr_grpo", kl_gradient="sequence", kl_sequence_baseline="loo", tike_top_k=4)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = make_trainer(tiny_model_dir, tmp_path, peft_config=lora, **config, **options)
    assert trainer.ref_model is None
    with torch.no_grad():  # a new adapter starts as the identity (B = 0): move it off the reference
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    ours = _kl_part_of_the_gradient(trainer, inputs)

    def adapters_off(**kwargs):
        with trainer.model.disable_adapter():
            return trainer.model(**kwargs)

    expected = _dense_gradient(trainer, inputs, options, "loo", adapters_off)
    assert len(expected) == sum("lora_" in name for name, _ in trainer.model.named_parameters())
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-3)


@pytest.mark.parametrize("options", CASES[:4], ids=lambda o: "-".join(str(v) for v in o.values()))
def test_sequence_keeps_the_loss_and_kl_and_changes_the_gradient(tiny_model_dir, tmp_path, options):
    source, inputs = fixed_batch(tiny_model_dir, tmp_path)
    results = {}
    for gradient in ("token", "sequence"):
        trainer = make_trainer(tiny_model_dir, tmp_path, kl_gradient=gradient, tike_top_k=4, **options)
        _perturbed(trainer, source)
        loss, grads = _loss_and_grads(trainer, inputs)
        results[gradient] = (loss, grads, trainer._metrics["train"]["kl"][-1])
    (loss_t, grads_t, kl_t), (loss_s, grads_s, kl_s) = results["token"], results["sequence"]
    torch.testing.assert_close(loss_s, loss_t)
    assert kl_s == kl_t
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_s, grads_t))


def test_sequence_runs_no_more_forwards_than_token(tiny_model_dir, tmp_path):
    counts = {}
    for gradient in ("token", "sequence"):
        trainer = make_trainer(tiny_model_dir, tmp_path, kl_estimator="tike", kl_gradient=gradient, max_steps=1)
        calls = {"policy": 0, "ref": 0}
        hooks = [
            m.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
            for name, m in (("policy", trainer.model), ("ref", trainer.ref_model))
        ]
        trainer.train()
        for h in hooks:
            h.remove()
        counts[gradient] = calls
    assert counts["sequence"] == counts["token"]


def test_running_mean_baseline_uses_earlier_batches_only():
    running = PositionRunningMean(momentum=0.5)
    future = torch.tensor([[3.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert torch.equal(running.value(future), torch.zeros_like(future))  # nothing seen yet
    running.update(future, mask)
    # bias-corrected: after one batch, that batch's per-position means
    torch.testing.assert_close(running.value(future)[0], torch.tensor([2.0, 0.5, 0.0]))
    running.update(torch.tensor([[4.0, 3.0, 2.0, 1.0]]), torch.ones(1, 4))
    # (0.5·0.5·m1 + 0.5·m2) / (1 − 0.25) at seen-twice positions; the 4th position seen once
    torch.testing.assert_close(running.value(torch.zeros(1, 4))[0], torch.tensor([10 / 3, 13 / 6, 4 / 3, 1.0]))


@pytest.mark.parametrize("field,value", [("kl_gradient", "seq"), ("kl_sequence_baseline", "group")])
def test_config_rejects_unknown_values(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        TIKEConfig(output_dir=str(tmp_path), use_cpu=True, **{field: value})


def test_sequence_without_kl_term_warns_once(tmp_path):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        TIKEConfig(output_dir=str(tmp_path), use_cpu=True, beta=0.0, kl_gradient="sequence")
    about_beta = [w for w in record if "beta=0.0" in str(w.message)]
    assert len(about_beta) == 1 and "kl_gradient='sequence'" in str(about_beta[0].message)
