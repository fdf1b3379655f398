"""The TRL internals tike_trl relies on. If one of these fails after a TRL upgrade, the seam moved:
read tike_trl/fused_head.py and tike_trl/kernels/trl_tiles.py before widening the pin."""

from __future__ import annotations

import inspect
from importlib.metadata import version

import pytest
import torch
import trl.trainer.utils as trl_utils
from packaging.version import Version
from transformers import AutoModelForCausalLM
from trl import GRPOTrainer
from trl.kernels import ChunkedLogProbFunction, chunked_divergence, chunked_logprob

from tike_trl.fused_head import ReferenceCapture, TIKEHead, replace_head_kernel
from tike_trl.trainer import FORWARD_KEYS


def test_trl_version_in_supported_range():
    assert Version("1.16") <= Version(version("trl")) < Version("1.17")


def test_fused_forward_calls_the_swappable_kernel_global():
    assert trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction
    source = inspect.getsource(trl_utils.add_fused_lm_head)
    assert "_ChunkedLogProbFunction.apply(" in source


@pytest.mark.parametrize(
    "name,params",
    [
        (
            "_forward_tile",
            [
                "tile",
                "tile_stride",
                "targets",
                "running_max",
                "sum_exp",
                "x_sum_exp",
                "sq_sum_exp",
                "z_sum",
                "max_before_target",
                "target_logit",
                "vocab_start",
                "n_cols",
                "logit_scale",
                "softcap",
                "inv_t",
                "HAS_SOFTCAP",
                "HAS_ENTROPY",
                "HAS_LOG_SUM_SQ_PROBS",
                "HAS_MEAN_LOGITS",
                "HAS_IS_TOP1",
                "BLOCK_SIZE",
            ],
        ),
        (
            "_backward_tile",
            [
                "tile",
                "tile_stride",
                "targets",
                "log_z",
                "entropy",
                "grad_logprobs",
                "grad_entropy",
                "vocab_start",
                "n_cols",
                "logit_scale",
                "softcap",
                "inv_t",
                "HAS_SOFTCAP",
                "HAS_LOGPROB_GRAD",
                "HAS_ENTROPY_GRAD",
                "BLOCK_SIZE",
            ],
        ),
    ],
)
def test_logprob_tile_kernels(name, params):
    assert list(inspect.signature(getattr(chunked_logprob, name)).parameters) == params
    for attr in (
        "_forward_kernel",
        "_backward_kernel",
        "_torch_transform",
        "_addmm_fp32",
        "_use_triton",
        "_BLOCK_SIZE",
        "TOKEN_CHUNK_SIZE",
    ):
        assert hasattr(chunked_logprob, attr), attr


@pytest.mark.parametrize(
    "name,params",
    [
        (
            "_stats_tile",
            [
                "s_tile",
                "s_stride",
                "t_tile",
                "t_stride",
                "s_max",
                "s_sum",
                "s_x_sum",
                "t_max",
                "t_sum",
                "t_weighted_gap",
                "s_weighted_gap",
                "n_cols",
                "s_scale",
                "s_softcap",
                "t_scale",
                "t_softcap",
                "inv_t",
                "S_HAS_SOFTCAP",
                "T_HAS_SOFTCAP",
                "BLOCK_SIZE",
            ],
        ),
        (
            "_backward_tile",
            [
                "s_tile",
                "s_stride",
                "t_tile",
                "t_stride",
                "s_log_z",
                "t_log_z",
                "aux",
                "grad_divergence",
                "n_cols",
                "beta",
                "s_scale",
                "s_softcap",
                "t_scale",
                "t_softcap",
                "inv_t",
                "MODE",
                "S_HAS_SOFTCAP",
                "T_HAS_SOFTCAP",
                "BLOCK_SIZE",
            ],
        ),
        ("_project", ["tile", "hidden_chunk", "weight", "bias", "start", "end", "dtype"]),
    ],
)
def test_divergence_tile_kernels(name, params):
    assert list(inspect.signature(getattr(chunked_divergence, name)).parameters) == params
    assert hasattr(chunked_divergence, "_stats_kernel") and hasattr(chunked_divergence, "VOCAB_CHUNK_SIZE")


def test_forward_keys_are_trls_model_inputs():
    """The reference forward gets the same model inputs TRL's loss gives the policy forward."""
    params = list(inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters)
    switches = ["batch_size", "compute_entropy", "compute_aux_loss"]
    assert params == ["self", "model", "input_ids", "attention_mask", "logits_to_keep", *switches, *FORWARD_KEYS]
    loss_source = inspect.getsource(GRPOTrainer._compute_loss)
    assert all(f'{key}=inputs.get("{key}")' in loss_source for key in FORWARD_KEYS)


def test_grpo_trainer_methods_we_extend():
    for name in ("_compute_loss", "_get_per_token_logps_and_entropies", "_generate_and_score_completions"):
        assert callable(getattr(GRPOTrainer, name))
    loss_source = inspect.getsource(GRPOTrainer._compute_loss)
    assert "self._get_per_token_logps_and_entropies(" in loss_source
    assert "if self.beta != 0.0:" in loss_source and 'inputs["ref_per_token_logps"]' in loss_source


def _fused_outputs(model, input_ids, head=None):
    labels = input_ids.clone()
    labels[:, :2] = -100
    if head is None:
        return model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    with replace_head_kernel(head):
        return model(input_ids=input_ids, labels=labels, fused_lm_head=True)


def test_our_head_returns_what_trls_kernel_returns(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trl_utils.add_fused_lm_head(model, temperature=0.8, outputs=("log_probs", "entropy"))
    ids = torch.randint(3, 30, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _fused_outputs(model, ids, capture := ReferenceCapture())
        ours = _fused_outputs(model, ids, head := TIKEHead(capture.heads, top_k=4, exact_kl=True))
        theirs = _fused_outputs(model, ids)
    assert trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction  # restored
    torch.testing.assert_close(ours.log_probs, theirs.log_probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.entropy, theirs.entropy, atol=1e-5, rtol=1e-5)
    assert capture.heads[0].spec.temperature == 0.8
    assert head.rows[0].exact_kl.abs().max() < 1e-5  # the same model as its own reference
