"""`TIKEGRPOTrainer`: TRL's GRPO trainer with the KL term from the chosen estimator."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from trl import GRPOTrainer
from trl.trainer.utils import get_config_model_id, use_adapter

from .config import HEAD_ESTIMATORS, TIKEConfig
from .estimators import SAMPLED_TOKEN_ESTIMATORS, check_top_k, importance_ratio, sampled_token_kl, truncated_kl
from .fused_head import ReferenceCapture, TIKEHead, replace_head_kernel, rows_to_completion
from .kernels import RefHead, head_rows


@dataclass
class KLTerms:
    """The per-token KL term of one micro-batch, [batch, completion_len], plus its diagnostics."""

    kl: torch.Tensor
    topk_mass: torch.Tensor | None = None
    exact: torch.Tensor | None = None  # exact per-token KL, on `log_exact_kl_steps` steps
    tail_residual: torch.Tensor | None = None  # exact KL minus the top-k sum (paper Eq. 11)


def _checked_rollout(rollout_func: Callable) -> Callable:
    """A user's `rollout_func` whose empty completions get a clear error (TRL indexes `ids[-1]`)."""

    @functools.wraps(rollout_func)
    def rollout(prompts, trainer):
        output = rollout_func(prompts, trainer)
        empty = [i for i, ids in enumerate(output.get("completion_ids", [])) if len(ids) == 0]
        if empty:
            raise ValueError(
                f"rollout_func returned empty completion_ids for rows {empty[:8]}: a completion needs at "
                "least one token (an immediately finished one is [eos_token_id])."
            )
        return output

    return rollout


class TIKEGRPOTrainer(GRPOTrainer):
    """GRPO with a choice of KL(π_θ‖π_ref) estimator (`TIKEConfig.kl_estimator`).

    A drop-in for `trl.GRPOTrainer`: same arguments, same launchers. TRL computes the policy-
    gradient part of the loss; this class adds `beta` times the chosen estimator, aggregated the
    way TRL aggregates its per-token loss for the configured `loss_type`.

    - `k1`, `k2`, `k3` use TRL's generation-time reference log-probs; `k3` (with TRL's
      `use_bias_correction_kl` factor) reproduces `trl.GRPOTrainer` exactly.
    - `tike` and `rb` skip TRL's generation-time reference pass and evaluate the reference at
      loss time, on the micro-batch, because the top-k set belongs to the current policy. The
      policy's one forward runs our tiled head (label log-prob, entropy, top-k or exact KL);
      the reference (a separate model, or the PEFT model with adapters disabled) contributes
      its final hidden states, and its head is applied tile by tile.
    """

    _tag_names = ["trl", "grpo", "tike"]
    _name = "TIKE-GRPO"

    def __init__(
        self, model: Any, reward_funcs: Any = None, args: TIKEConfig | None = None, *rest: Any, **kwargs: Any
    ) -> None:
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = TIKEConfig(f"{name.split('/')[-1]}-TIKE")
        elif not isinstance(args, TIKEConfig):
            raise TypeError(
                f"TIKEGRPOTrainer needs a TIKEConfig, got {type(args).__name__}: swap the import of "
                "GRPOConfig for `from tike_trl import TIKEConfig`."
            )
        self._kl_request: dict | None = None
        self._kl_terms: KLTerms | None = None
        if kwargs.get("rollout_func") is not None:
            kwargs["rollout_func"] = _checked_rollout(kwargs["rollout_func"])
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        rows = head_rows(self.model.get_output_embeddings().weight)
        # a head padded beyond the tokenizer (e.g. 151,936 rows, 151,665 tokens): its extra rows
        # are never sampled, so they are never put in the top-k set either
        self._top_k_vocab = len(self._tokenizer) if len(self._tokenizer) < rows else None
        if self.beta != 0.0 and (args.kl_estimator == "tike" or args.log_exact_kl_steps):
            check_top_k(args.tike_top_k, min(rows, len(self._tokenizer)))

    # ---- TRL's KL term, switched off while TRL computes the rest ----

    @contextmanager
    def _trl_kl_term_off(self) -> Iterator[None]:
        """TRL reads `self.beta` to decide whether to run its reference pass and add its k3 term."""
        beta, self.beta = self.beta, 0.0
        try:
            yield
        finally:
            self.beta = beta

    def _generate_and_score_completions(self, inputs: list[dict]) -> dict:
        if self.beta != 0.0 and self.args.kl_estimator in HEAD_ESTIMATORS:
            with self._trl_kl_term_off():  # the generation-time reference pass would be dead work
                return super()._generate_and_score_completions(inputs)
        return super()._generate_and_score_completions(inputs)

    def _compute_loss(self, model: torch.nn.Module, inputs: dict) -> torch.Tensor:
        if self.beta == 0.0:
            return super()._compute_loss(model, inputs)
        self._kl_request = inputs  # the policy forward inside TRL's loss computes the KL terms
        try:
            with self._trl_kl_term_off():
                loss = super()._compute_loss(model, inputs)
            terms = self._kl_terms
        finally:
            self._kl_request, self._kl_terms = None, None
        if terms is None:
            raise RuntimeError("TRL's loss did not call `_get_per_token_logps_and_entropies`: the seam moved.")
        mask = (
            inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        )
        mode = "train" if self.model.training else "eval"
        loss = loss + self.beta * self._aggregate_like_trl(terms.kl, mask, inputs, mode)
        self._metrics[mode]["kl"].append(self._global_masked_mean(terms.kl, mask))
        for name in ("topk_mass", "exact", "tail_residual"):
            if getattr(terms, name) is not None:
                self._metrics[mode][f"kl/{name}"].append(self._global_masked_mean(getattr(terms, name), mask))
        return loss

    def _logs_exact_kl(self) -> bool:
        """Whether this step logs kl/exact and kl/tail_residual: optimizer steps whose number (as
        logged) is a multiple of `log_exact_kl_steps`, and every evaluation batch."""
        every = self.args.log_exact_kl_steps
        return every > 0 and (not self.model.training or (self.state.global_step + 1) % every == 0)

    # ---- the policy forward of the loss ----

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False, **kwargs
    ):
        inputs, self._kl_request = self._kl_request, None
        forward = super()._get_per_token_logps_and_entropies
        if inputs is None:  # generation-time passes: TRL's own
            return forward(model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, **kwargs)
        if self.args.kl_estimator in SAMPLED_TOKEN_ESTIMATORS:
            logps, entropies, aux = forward(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, **kwargs
            )
            self._kl_terms = self._sampled_token_terms(logps, inputs)
            return logps, entropies, aux
        head = self._loss_head(self._reference_heads(input_ids, attention_mask, logits_to_keep, batch_size, **kwargs))
        with replace_head_kernel(head):
            logps, entropies, aux = forward(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, **kwargs
            )
        self._kl_terms = self._head_terms(head, logps, inputs, attention_mask, logits_to_keep, batch_size)
        return logps, entropies, aux

    def _loss_head(self, refs: list[RefHead]) -> TIKEHead:
        """What stands in for TRL's head kernel during the loss's policy forward (the benchmarks
        override it with a naive, materialising head). On exact-KL logging steps the one policy
        pass returns the top-k and the exact KL."""
        exact_step = self._logs_exact_kl()
        return TIKEHead(
            refs,
            top_k=self.args.tike_top_k if self.args.kl_estimator == "tike" or exact_step else 0,
            exact_kl=self.args.kl_estimator == "rb" or exact_step,
            top_k_vocab=self._top_k_vocab,
        )

    @torch.no_grad()
    def _reference_heads(self, input_ids, attention_mask, logits_to_keep, batch_size, **kwargs) -> list[RefHead]:
        """One reference forward through TRL's fused forward, keeping only its head's inputs."""
        capture = ReferenceCapture()
        forward = super()._get_per_token_logps_and_entropies
        with replace_head_kernel(capture):
            if self.ref_model is not None:
                forward(self.ref_model, input_ids, attention_mask, logits_to_keep, batch_size, **kwargs)
            else:  # PEFT: the reference is the base model (or the initial adapter named "ref"), as in TRL
                unwrapped = self.accelerator.unwrap_model(self.model)
                with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                    forward(self.model, input_ids, attention_mask, logits_to_keep, batch_size, **kwargs)
        return capture.heads

    # ---- per-token KL terms ----

    def _sampled_token_terms(self, logps: torch.Tensor, inputs: dict) -> KLTerms:
        kl = sampled_token_kl(logps, inputs["ref_per_token_logps"], self.args.kl_estimator)
        if self.args.kl_estimator == "k3" and self.args.use_bias_correction_kl:
            kl = kl * self._trl_importance_weights(logps, inputs)
        return KLTerms(kl)

    def _trl_importance_weights(self, logps: torch.Tensor, inputs: dict) -> torch.Tensor:
        """TRL's differentiable `coef_1` = π_θ/π_old, token- or sequence-level, which its
        `use_bias_correction_kl` multiplies into k3."""
        old = inputs.get("old_per_token_logps")
        log_ratio = logps - (logps.detach() if old is None else old)
        if self.importance_sampling_level == "sequence":
            mask = inputs["completion_mask"]
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        return torch.exp(log_ratio)

    def _head_terms(
        self,
        head: TIKEHead,
        logps: torch.Tensor,
        inputs: dict,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        batch_size: int | None,
    ) -> KLTerms:
        step = batch_size or attention_mask.shape[0]
        masks = attention_mask.split(step)
        if len(head.results) != len(masks):
            raise RuntimeError(f"{len(head.results)} policy head calls for {len(masks)} batch chunks.")

        def laid_out(pick) -> torch.Tensor:
            return torch.cat([rows_to_completion(pick(r), m, logits_to_keep) for r, m in zip(head.results, masks)])

        exact = laid_out(lambda r: r[0].exact_kl) if head.exact_kl else None
        if not head.top_k:
            return KLTerms(exact)
        topk_logps = laid_out(lambda r: r[0].topk_logprobs)
        topk_ids = laid_out(lambda r: r[0].topk_indices)
        ref_logps = laid_out(lambda r: r[1])
        top_args = (
            topk_logps,
            ref_logps[..., :-1],
            logps,
            ref_logps[..., -1],
            (topk_ids == inputs["completion_ids"].unsqueeze(-1)).any(-1),
        )
        if self.args.kl_estimator == "rb":
            kl = exact
        else:
            old = inputs.get("old_per_token_logps") if self.args.tike_importance_weight else None
            ratio = importance_ratio(logps, old, self.args.tike_is_clip, self.args.tike_is_clip_mode)
            kl = truncated_kl(*top_args, ratio, self.args.tike_tail)
        terms = KLTerms(kl, topk_logps.detach().exp().sum(-1))
        if exact is not None:  # an exact-KL logging step: the residual beyond the plain top-k sum (Eq. 10-12)
            with torch.no_grad():
                top_sum = truncated_kl(*top_args, torch.ones_like(logps), "drop")
            terms.exact, terms.tail_residual = exact.detach(), (exact - top_sum).detach()
        return terms

    # ---- TRL's loss aggregation and metric reduction ----

    def _aggregate_like_trl(
        self, per_token: torch.Tensor, mask: torch.Tensor, inputs: dict, mode: str
    ) -> torch.Tensor:
        """Aggregate a per-token term as TRL 1.16's `_compute_loss` aggregates its per-token loss
        for `loss_type`. That aggregation is linear, so TRL's loss plus beta times this equals TRL
        adding beta·KL to its per-token loss (`tests/test_trainer.py` checks k3 against TRL)."""
        masked = per_token * mask
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self.loss_type in ("grpo", "sapo"):
            return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
        if self.loss_type == "bnpo":
            return masked.sum() / mask.sum().clamp(min=1.0) / accumulation
        if self.loss_type == "dr_grpo":
            return masked.sum() / (per_token.size(0) * self.max_completion_length) / accumulation
        if self.loss_type == "luspo":
            return masked.sum(-1).mean() / accumulation
        if self.loss_type in ("cispo", "dapo", "vespo"):
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return masked.sum() / normalizer
        raise ValueError(f"Unknown loss type: {self.loss_type}")

    def _global_masked_mean(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        """Token-weighted mean over every rank, as TRL reduces its metrics."""
        local = torch.stack([(values.detach() * mask).sum(), mask.sum().float()])
        totals = self.accelerator.reduce(local, reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()
