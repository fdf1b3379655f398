"""TIKEGRPOTrainer on a tiny random model built locally: every estimator trains, k3 is TRL's,
tike/rb cost no extra forwards, PEFT's reference is the model with adapters disabled."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from dense_head import DenseHeadTrainer
from peft import LoraConfig, get_peft_model
from tiny import save_tiny_model
from trainers import fixed_batch, make_trainer
from transformers import AutoModelForCausalLM
from trl import GRPOConfig

from tike_trl import TIKEConfig


def train_and_check(trainer, expect_topk_mass: bool = False) -> list[dict]:
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for log in logs:
        assert math.isfinite(log["loss"]) and math.isfinite(log["kl"])
        if expect_topk_mass:
            assert 0.0 < log["kl/topk_mass"] <= 1.0 + 1e-6
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed, "no parameter moved"
    return logs


ESTIMATOR_CASES = [
    ("k1", "sampled"),
    ("k2", "sampled"),
    ("k3", "sampled"),
    ("rb", "sampled"),
    ("tike", "sampled"),
    ("tike", "drop"),
    ("tike", "mc"),
]


@pytest.mark.parametrize("estimator,tail", ESTIMATOR_CASES)
def test_every_estimator_trains(tiny_model_dir, tmp_path, estimator, tail):
    trainer = make_trainer(tiny_model_dir, tmp_path, kl_estimator=estimator, tike_tail=tail, tike_top_k=4)
    logs = train_and_check(trainer, expect_topk_mass=estimator == "tike")
    # the first step is on-policy from the reference: every estimator but k1 reads (near) zero there
    assert logs[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert logs[1]["kl"] != 0.0


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo"])
@pytest.mark.parametrize("estimator", ["tike", "rb"])
def test_loss_types(tiny_model_dir, tmp_path, loss_type, estimator):
    trainer = make_trainer(tiny_model_dir, tmp_path, kl_estimator=estimator, loss_type=loss_type, tike_top_k=4)
    train_and_check(trainer, expect_topk_mass=estimator == "tike")


@pytest.mark.parametrize("estimator", ["tike", "rb"])
def test_num_iterations_two(tiny_model_dir, tmp_path, estimator):
    trainer = make_trainer(
        tiny_model_dir, tmp_path, kl_estimator=estimator, num_iterations=2, tike_top_k=4, tike_tail="mc"
    )
    train_and_check(trainer, expect_topk_mass=estimator == "tike")


LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def _last_hidden(model, input_ids):
    return model(input_ids=input_ids, output_hidden_states=True).hidden_states[-1][0, :-1]


@pytest.mark.parametrize("estimator", ["tike", "rb"])
def test_peft_new_adapter_reference_is_adapters_disabled(tiny_model_dir, tmp_path, estimator):
    trainer = make_trainer(
        tiny_model_dir, tmp_path, peft_config=LoraConfig(**LORA), kl_estimator=estimator, tike_top_k=4
    )
    assert trainer.ref_model is None
    logs = train_and_check(trainer, expect_topk_mass=estimator == "tike")
    assert logs[1]["kl"] > 1e-6  # the adapter moved; the reference did not
    # the captured reference head is the model with its adapters disabled, not the trained policy
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        ref = trainer._reference_heads(ids, torch.ones_like(ids), logits_to_keep=4, batch_size=None)[0]
        with trainer.model.disable_adapter():
            base_hidden = _last_hidden(trainer.model, ids)
        policy_hidden = _last_hidden(trainer.model, ids)
    torch.testing.assert_close(ref.hidden, base_hidden.reshape(ref.hidden.shape))
    assert not torch.allclose(ref.hidden, policy_hidden.reshape(ref.hidden.shape), atol=1e-4)


def test_peft_existing_adapter_reference_is_its_initial_copy(tiny_model_dir, tmp_path):
    # TRL's rule: re-training an existing adapter compares against a frozen copy named "ref"
    lora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(**LORA, init_lora_weights=False)
    )
    trainer = make_trainer(tiny_model_dir, tmp_path, model=lora, kl_estimator="tike", tike_top_k=4)
    assert "ref" in trainer.model.peft_config
    logs = train_and_check(trainer, expect_topk_mass=True)
    assert logs[0]["kl"] == pytest.approx(0.0, abs=1e-6) and logs[1]["kl"] > 1e-6


def _loss_and_grads(trainer, inputs):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    loss = trainer.compute_loss(trainer.model, inputs)
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo"])
@pytest.mark.parametrize("sequence_level", [False, True])
def test_k3_equals_trl(tiny_model_dir, tmp_path, loss_type, sequence_level):
    level = dict(importance_sampling_level="sequence" if sequence_level else "token", loss_type=loss_type)
    trl_trainer, inputs = fixed_batch(tiny_model_dir, tmp_path)
    trl_trainer.loss_type, trl_trainer.importance_sampling_level = loss_type, level["importance_sampling_level"]
    ours = make_trainer(tiny_model_dir, tmp_path, kl_estimator="k3", **level)
    # an off-policy batch, so TRL's ratio and its gradient matter
    inputs = {
        **inputs,
        "old_per_token_logps": inputs["ref_per_token_logps"]
        - 0.1 * torch.rand_like(inputs["ref_per_token_logps"], generator=torch.Generator().manual_seed(1)),
    }
    with torch.no_grad():  # move the policy away from the reference, so the KL is not zero
        for p_ours, p_trl in zip(ours.model.parameters(), trl_trainer.model.parameters()):
            p_trl.add_(0.05 * torch.randn(p_trl.shape, generator=torch.Generator().manual_seed(p_trl.numel())))
            p_ours.copy_(p_trl)
    loss_trl, grads_trl = _loss_and_grads(trl_trainer, inputs)
    loss_ours, grads_ours = _loss_and_grads(ours, inputs)
    torch.testing.assert_close(loss_ours, loss_trl, atol=1e-6, rtol=1e-5)
    for g_ours, g_trl in zip(grads_ours, grads_trl):
        torch.testing.assert_close(g_ours, g_trl, atol=1e-6, rtol=1e-5)
    assert trl_trainer._metrics["train"]["kl"][-1] == pytest.approx(ours._metrics["train"]["kl"][-1], rel=1e-5)
    assert trl_trainer._metrics["train"]["kl"][-1] > 1e-4


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-tied"), tie_word_embeddings=True)


@pytest.mark.parametrize("estimator,tail", [("rb", "sampled"), ("tike", "sampled"), ("tike", "drop"), ("tike", "mc")])
def test_tiled_head_equals_dense_head_tied_embeddings(tied_model_dir, tmp_path, estimator, tail):
    """Through the trainer, on a model whose LM head is its input embedding: our tiled head gives
    the loss and gradients of the naive head that materialises both models' log_softmax (the
    the dense `DenseHead`, built on `tike_trl.estimators`), off-policy."""
    _, inputs = fixed_batch(tied_model_dir, tmp_path)
    inputs = {
        **inputs,
        "old_per_token_logps": inputs["ref_per_token_logps"]
        - 0.1 * torch.rand_like(inputs["ref_per_token_logps"], generator=torch.Generator().manual_seed(2)),
    }
    options = dict(kl_estimator=estimator, tike_tail=tail, tike_top_k=4)
    tiled = make_trainer(tied_model_dir, tmp_path, **options)
    dense = make_trainer(tied_model_dir, tmp_path, cls=DenseHeadTrainer, **options)
    assert tiled.model.get_output_embeddings().weight is tiled.model.get_input_embeddings().weight
    with torch.no_grad():  # the same move away from the reference for both
        for p_tiled, p_dense in zip(tiled.model.parameters(), dense.model.parameters()):
            p_tiled.add_(0.3 * torch.randn(p_tiled.shape, generator=torch.Generator().manual_seed(p_tiled.numel())))
            p_dense.copy_(p_tiled)
    loss_tiled, grads_tiled = _loss_and_grads(tiled, inputs)
    loss_dense, grads_dense = _loss_and_grads(dense, inputs)
    assert tiled._metrics["train"]["kl"][-1] > 1e-4
    assert tiled._metrics["train"]["kl"][-1] == pytest.approx(dense._metrics["train"]["kl"][-1], rel=1e-5)
    torch.testing.assert_close(loss_tiled, loss_dense, atol=1e-6, rtol=1e-5)
    for g_tiled, g_dense in zip(grads_tiled, grads_dense):
        torch.testing.assert_close(g_tiled, g_dense, atol=1e-6, rtol=1e-4)


def _count_forwards(trainer, steps: int = 1) -> dict[str, int]:
    counts = {"policy": 0, "ref": 0}
    models = {"policy": trainer.model, "ref": trainer.ref_model}

    def counter(name):
        def hook(module, args, kwargs):
            counts[name] += 1

        return hook

    handles = [m.register_forward_pre_hook(counter(n), with_kwargs=True) for n, m in models.items() if m is not None]
    trainer.args.max_steps = steps
    trainer.train()
    for h in handles:
        h.remove()
    return counts


@pytest.mark.parametrize("estimator", ["tike", "rb"])
def test_no_more_forwards_than_trl_k3(tiny_model_dir, tmp_path, estimator):
    # 2 micro-batches per optimizer step, so the per-micro-batch reference pass is counted twice
    shape = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, num_iterations=1)
    k3 = _count_forwards(make_trainer(tiny_model_dir, tmp_path, kl_estimator="k3", **shape))
    ours = _count_forwards(make_trainer(tiny_model_dir, tmp_path, kl_estimator=estimator, **shape))
    assert k3["ref"] == 2  # TRL: the reference scores each micro-batch once, at generation time
    assert ours["ref"] == k3["ref"]  # ours: once per micro-batch, at loss time
    assert ours["policy"] == k3["policy"]
    assert sum(ours.values()) <= sum(k3.values())


@pytest.mark.parametrize("num_iterations", [1, 2, 4])
@pytest.mark.parametrize("estimator", ["tike", "rb"])
def test_reference_backbone_once_per_generation_batch(tiny_model_dir, tmp_path, estimator, num_iterations):
    """num_iterations optimizer steps over one generation batch: the reference backbone runs once
    (where TRL runs its reference pass), whatever the number of loss passes over the batch."""
    shape = dict(num_iterations=num_iterations)
    k3 = _count_forwards(make_trainer(tiny_model_dir, tmp_path, kl_estimator="k3", **shape), num_iterations)
    ours = _count_forwards(make_trainer(tiny_model_dir, tmp_path, kl_estimator=estimator, **shape), num_iterations)
    assert k3["ref"] == 1
    assert ours == k3


def test_generation_keeps_the_reference_hidden_states(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, kl_estimator="tike")
    batch = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
    assert "ref_per_token_logps" not in batch  # TRL's reference pass: skipped
    assert trainer.beta == 0.05  # restored after the generation pass
    hidden = batch["ref_hidden_states"]
    assert hidden.shape == (*batch["completion_ids"].shape, trainer.model.config.hidden_size)
    assert (hidden[batch["completion_mask"] == 0] == 0).all() and hidden[batch["completion_mask"] == 1].abs().sum() > 0


@pytest.mark.parametrize("on_cpu", [False, True])
@pytest.mark.parametrize("estimator,tail", [("tike", "mc"), ("tike", "sampled"), ("rb", "sampled")])
def test_kept_reference_states_give_the_loss_of_a_fresh_reference_pass(
    tiny_model_dir, tmp_path, estimator, tail, on_cpu
):
    """The loss and gradients from the hidden states kept at generation equal those of a reference
    forward at loss time (the path for batches generated elsewhere), off-policy."""
    trainer = make_trainer(
        tiny_model_dir, tmp_path, kl_estimator=estimator, tike_tail=tail, tike_top_k=4, tike_ref_hidden_on_cpu=on_cpu
    )
    trainer.model.train()
    batch = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
    assert batch["ref_hidden_states"].device.type == "cpu"
    with torch.no_grad():  # move the policy off the reference, and off π_old
        for p in trainer.model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    batch["old_per_token_logps"] = -torch.rand(
        batch["completion_ids"].shape, generator=torch.Generator().manual_seed(0)
    )
    kept = _loss_and_grads(trainer, batch)
    fresh = _loss_and_grads(trainer, {k: v for k, v in batch.items() if k != "ref_hidden_states"})
    assert trainer._metrics["train"]["kl"][-1] > 1e-3
    torch.testing.assert_close(kept[0], fresh[0], atol=1e-6, rtol=1e-5)
    for g_kept, g_fresh in zip(kept[1], fresh[1]):
        torch.testing.assert_close(g_kept, g_fresh, atol=1e-6, rtol=1e-5)


# ---- bad input ----


@pytest.mark.parametrize(
    "field,value", [("kl_estimator", "k4"), ("tike_tail", "tails"), ("tike_top_k", 0), ("tike_top_k", -3)]
)
def test_config_rejects(tmp_path, field, value):
    with pytest.raises(ValueError) as err:
        TIKEConfig(output_dir=str(tmp_path), use_cpu=True, **{field: value})
    assert field in str(err.value) and repr(value) in str(err.value)


def test_config_error_lists_allowed_values(tmp_path):
    with pytest.raises(ValueError, match="'k1', 'k2', 'k3', 'rb', 'tike'"):
        TIKEConfig(output_dir=str(tmp_path), use_cpu=True, kl_estimator="exact")


def test_config_defaults(tmp_path):
    args = TIKEConfig(output_dir=str(tmp_path), use_cpu=True)
    assert (args.beta, args.kl_estimator, args.tike_top_k, args.tike_tail, args.tike_importance_weight) == (
        1e-3,
        "tike",
        16,
        "sampled",
        True,
    )


def test_beta_zero_warns(tmp_path):
    with pytest.warns(UserWarning, match="beta=0.0 switches the KL term off"):
        TIKEConfig(output_dir=str(tmp_path), use_cpu=True, beta=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        TIKEConfig(output_dir=str(tmp_path), use_cpu=True, beta=1e-3)


def test_top_k_larger_than_vocabulary(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="tike_top_k=1000 is larger than the policy's vocabulary"):
        make_trainer(tiny_model_dir, tmp_path, tike_top_k=1000)


def test_grpo_config_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(TypeError, match="TIKEConfig"):
        make_trainer(tiny_model_dir, tmp_path, config_cls=GRPOConfig)


def test_beta_zero_trains_without_reference(tiny_model_dir, tmp_path):
    with pytest.warns(UserWarning):
        trainer = make_trainer(tiny_model_dir, tmp_path, beta=0.0)
    assert trainer.ref_model is None
    trainer.train()
    assert all("kl" not in h for h in trainer.state.log_history)
