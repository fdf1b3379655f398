"""`TIKEGRPOTrainer`: TRL's GRPO trainer with the KL term from the chosen estimator."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import get_config_model_id, use_adapter

from . import model_card
from .config import TIKEConfig
from .estimators import (
    HEAD_ESTIMATORS,
    SAMPLED_TOKEN_ESTIMATORS,
    SCORE_FROM_OWN_POSITION,
    TopKLogProbs,
    baseline_offset,
    check_top_k,
    future_kl,
    importance_ratio,
    leave_one_out,
    sampled_token_kl,
    score_term,
    trl_ratio,
    truncated_kl,
)
from .fused_head import (
    LogProbRecorder,
    PolicyForward,
    ReferenceCapture,
    TIKEHead,
    completion_to_rows,
    replace_head_kernel,
    rows_to_completion,
)
from .kernels import RefHead, head_rows

# the batch key of the reference's final hidden states, kept from the generation-time pass
REF_HIDDEN_STATES = "ref_hidden_states"
# the running-mean baseline of `kl_sequence_baseline`: weight of the past per micro-batch
RUNNING_MEAN_MOMENTUM = 0.9
# TRL's loss types whose loss is normalised by the generation batch's `num_items_in_batch`
NUM_ITEMS_LOSS_TYPES = ("cispo", "dapo", "vespo")
# the model inputs besides the token ids that TRL's `_compute_loss` hands its policy forward
# (multimodal batches); the reference forward gets the same (tests/test_trl_seams.py checks the list)
FORWARD_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


@dataclass
class KLTerms:
    """The per-token KL term of one micro-batch, [batch, completion_len], plus its diagnostics."""

    kl: torch.Tensor
    topk_mass: torch.Tensor | None = None
    exact: torch.Tensor | None = None  # exact per-token KL, on `log_exact_kl_steps` steps
    tail_residual: torch.Tensor | None = None  # exact KL minus the top-k sum (paper Eq. 11)


def _input_ids(inputs: dict) -> torch.Tensor:
    """The micro-batch's prompt + completion ids, as TRL's loss builds them."""
    return torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)


def _forward_kwargs(inputs: dict) -> dict:
    """The model inputs besides the token ids that TRL hands its forwards (multimodal batches)."""
    return {key: inputs.get(key) for key in FORWARD_KEYS}


def _attention_mask(inputs: dict) -> torch.Tensor:
    """The attention mask of the micro-batch's prompt + completion ids, as TRL's loss builds it."""
    return torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)


def _loss_mask(inputs: dict) -> torch.Tensor:
    """The tokens TRL's loss counts: the completion, minus tool-call outputs when the batch has them."""
    mask = inputs["completion_mask"]
    return mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]


class PositionRunningMean:
    """Per completion position, an exponential running mean of the future KL F_t over the
    micro-batches seen, bias-corrected for its zero start as Adam's moments are (the
    `"running_mean"` baseline; it restarts with the trainer, it is not saved in checkpoints)."""

    def __init__(self, momentum: float = RUNNING_MEAN_MOMENTUM) -> None:
        self.momentum = momentum
        self.total: torch.Tensor | None = None  # Σ_n momentum^(N−n)·(1 − momentum)·mean_n, per position
        self.updates: torch.Tensor | None = None  # batches that had the position, per position

    def value(self, future: torch.Tensor) -> torch.Tensor:
        """The current means at `future`'s positions ([batch, T]; 0 where none was seen yet)."""
        length = future.shape[1]
        out = torch.zeros(length, device=future.device, dtype=future.dtype)
        if self.total is not None:
            known = min(length, self.total.shape[0])
            seen = self.updates[:known] > 0
            corrected = self.total[:known] / (1 - self.momentum ** self.updates[:known]).clamp(min=1e-12)
            out[:known] = torch.where(seen, corrected, 0.0).to(out.dtype)
        return out.expand_as(future)

    def update(self, future: torch.Tensor, mask: torch.Tensor) -> None:
        length = future.shape[1]
        if self.total is None or self.total.shape[0] < length:
            total = torch.zeros(length, device=future.device, dtype=torch.float64)
            updates = torch.zeros(length, device=future.device, dtype=torch.float64)
            if self.total is not None:
                total[: self.total.shape[0]], updates[: self.updates.shape[0]] = self.total, self.updates
            self.total, self.updates = total, updates
        seen = mask.sum(0) > 0
        batch_mean = ((future * mask).sum(0) / mask.sum(0).clamp(min=1.0)).to(torch.float64)
        head = self.total[:length]
        self.total[:length] = torch.where(seen, self.momentum * head + (1 - self.momentum) * batch_mean, head)
        self.updates[:length] += seen.to(torch.float64)


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
    - `tike` and `rb` need the reference at the current policy's top-k (or everywhere), which
      only the loss knows: TRL's generation-time reference pass is replaced by one that keeps
      the reference's final hidden states with the batch (the reference is a separate model, or
      the PEFT model with adapters disabled), and at loss time the policy's one forward runs our
      tiled head (label log-prob, entropy, top-k or exact KL), which applies the reference head
      tile by tile.
    - `kl_gradient="sequence"` adds the later positions' KL as a zero-valued score-function term.

    `_compute_loss` reads top-down: the capture stands in for TRL's head kernel while TRL computes
    its loss (KL term off), then the KL terms come from what it recorded, are aggregated like TRL's
    per-token loss, and logged. docs/architecture.md follows one step through the modules.
    """

    _tag_names = ["trl", "grpo", "tike"]
    _name = "TIKE-GRPO"
    _paper = model_card.PAPER  # TIKE, ACL 2026 (no arXiv id: the card links the ACL Anthology instead)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's card, plus the estimator's tags (`kl-tike`, `tike-k16`, ...), the papers its choice rests on
        (GRPO's, the Rao-Blackwellized one for `rb`, the KL-gradient pitfalls one whenever beta != 0) and a
        sentence naming them; the choices are in tike_trl/model_card.py."""
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        self._paper = {**type(self)._paper, "citation": model_card.citation(self.args)}
        super().create_model_card(model_name, dataset_name, tags + model_card.tags(self.args))
        if self.is_world_process_zero():
            model_card.describe(f"{self.args.output_dir}/README.md", self._name, self.args)

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
        self._future_kl_mean = PositionRunningMean()  # kl_sequence_baseline="running_mean"
        self._reference_head: RefHead | None = None  # the reference's head (weight, bias, logit spec), once seen
        if kwargs.get("rollout_func") is not None:
            kwargs["rollout_func"] = _checked_rollout(kwargs["rollout_func"])
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        rows = head_rows(self.model.get_output_embeddings().weight)
        # a head padded beyond the tokenizer (e.g. 151,936 rows, 151,665 tokens): its extra rows
        # are never sampled, so they are never put in the top-k set either
        self.top_k_vocab = len(self._tokenizer) if len(self._tokenizer) < rows else None
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
        if self.beta == 0.0 or self.args.kl_estimator not in HEAD_ESTIMATORS:
            return super()._generate_and_score_completions(inputs)
        # TRL's reference pass would keep log π_ref at the sampled token only; ours keeps the
        # reference head's inputs, so the loss can apply the head at the current policy's top-k
        with self._trl_kl_term_off():
            batch = super()._generate_and_score_completions(inputs)
        batch[REF_HIDDEN_STATES] = self._reference_hidden_states(batch)
        return batch

    @torch.no_grad()
    def _reference_hidden_states(self, batch: dict) -> torch.Tensor:
        """The reference backbone's final hidden states at the completion positions,
        [batch, completion_len, hidden] in the compute dtype (zeros at padding), from one reference
        forward where TRL runs its own (in its generation-time micro-batches). TRL splits and
        shuffles every tensor of the batch, so each loss pass over it, whatever `num_iterations`,
        finds its rows and only applies the reference head."""
        mode = "train" if self.model.training else "eval"
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        mask, completion_len = _attention_mask(batch), batch["completion_ids"].size(1)
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            heads = self._reference_heads(
                _input_ids(batch), mask, completion_len, batch_size=batch_size, **_forward_kwargs(batch)
            )
        self._reference_head = replace(heads[0], hidden=heads[0].hidden[:0])  # the head itself: weight, bias, spec
        hidden = torch.cat(
            [rows_to_completion(h.hidden, m, completion_len) for h, m in zip(heads, mask.split(batch_size))]
        )
        return hidden.to("cpu", non_blocking=True) if self.args.tike_ref_hidden_on_cpu else hidden

    def _compute_loss(self, model: torch.nn.Module, inputs: dict) -> torch.Tensor:
        if self.beta == 0.0:
            return super()._compute_loss(model, inputs)
        mode = "train" if self.model.training else "eval"
        # TRL's loss makes one policy forward; the capture stands in for TRL's head kernel in it
        capture = self._policy_capture(inputs)
        policy_losses = len(self._metrics[mode].get("policy_loss", ()))
        with replace_head_kernel(capture), self._trl_kl_term_off():
            loss = super()._compute_loss(model, inputs)
        policy_loss_logged = len(self._metrics[mode].get("policy_loss", ())) > policy_losses
        forward = PolicyForward.laid_out(capture.rows, _attention_mask(inputs), inputs["completion_ids"].size(1))
        terms = self._kl_terms(forward, inputs)
        mask = _loss_mask(inputs)
        per_token = terms.kl
        if self.args.kl_gradient == "sequence":
            per_token = per_token + self._future_kl_score(terms.kl, forward.logps, inputs, mask)
        kl_loss = self.beta * self._aggregate_like_trl(per_token, mask, inputs, mode)
        self._log_kl_metrics(terms, mask, mode, kl_loss, policy_loss_logged)
        return loss + kl_loss

    # ---- the loss's policy forward ----

    def _policy_capture(self, inputs: dict) -> LogProbRecorder | TIKEHead:
        """What stands in for TRL's head kernel in the loss's policy forward: TRL's own kernel,
        recorded, for the sampled-token estimators; our tiled head for `tike` and `rb`."""
        if self.args.kl_estimator in SAMPLED_TOKEN_ESTIMATORS:
            return LogProbRecorder()
        mask, completion_len = _attention_mask(inputs), inputs["completion_ids"].size(1)
        if REF_HIDDEN_STATES in inputs:  # kept from the generation-time reference pass
            hidden = inputs[REF_HIDDEN_STATES].to(mask.device)
            refs = [replace(self._reference_head, hidden=completion_to_rows(hidden, mask, completion_len))]
        else:  # a batch generated elsewhere (TRL's own trainer, a benchmark): run the reference now
            refs = self._reference_heads(_input_ids(inputs), mask, completion_len, **_forward_kwargs(inputs))
        return self._loss_head(refs)

    def _loss_head(self, refs: list[RefHead]) -> TIKEHead:
        """Our head for the loss's policy forward (the benchmarks override it with a naive,
        materialising head). On exact-KL logging steps the one policy pass returns the top-k and
        the exact KL."""
        exact_step = self._logs_exact_kl()
        return TIKEHead(
            refs,
            top_k=self.args.tike_top_k if self.args.kl_estimator == "tike" or exact_step else 0,
            exact_kl=self.args.kl_estimator == "rb" or exact_step,
            top_k_vocab=self.top_k_vocab,
        )

    def _logs_exact_kl(self) -> bool:
        """Whether this step logs kl/exact and kl/tail_residual: optimizer steps whose number (as
        logged) is a multiple of `log_exact_kl_steps`, and every evaluation batch."""
        every = self.args.log_exact_kl_steps
        return every > 0 and (not self.model.training or (self.state.global_step + 1) % every == 0)

    @torch.no_grad()
    def _reference_heads(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int, **forward_kwargs
    ) -> list[RefHead]:
        """One reference forward through TRL's fused forward, keeping only its head's inputs."""
        capture = ReferenceCapture()
        with replace_head_kernel(capture):
            if self.ref_model is not None:
                self._get_per_token_logps_and_entropies(
                    self.ref_model, input_ids, attention_mask, logits_to_keep, **forward_kwargs
                )
            else:  # PEFT: the reference is the base model (or the initial adapter named "ref"), as in TRL
                unwrapped = self.accelerator.unwrap_model(self.model)
                with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                    self._get_per_token_logps_and_entropies(
                        self.model, input_ids, attention_mask, logits_to_keep, **forward_kwargs
                    )
        return capture.heads

    # ---- per-token KL terms ----

    def _kl_terms(self, forward: PolicyForward, inputs: dict) -> KLTerms:
        """The chosen estimator's per-token KL from what the policy forward recorded."""
        estimator = self.args.kl_estimator
        if estimator in SAMPLED_TOKEN_ESTIMATORS:
            kl = sampled_token_kl(forward.logps, inputs["ref_per_token_logps"], estimator)
            if estimator == "k3" and self.args.use_bias_correction_kl:
                old = inputs.get("old_per_token_logps")
                kl = kl * trl_ratio(forward.logps, old, _loss_mask(inputs), self.importance_sampling_level)
            return KLTerms(kl)
        if forward.topk_logprobs is None:  # rb, not an exact-KL logging step
            return KLTerms(forward.exact_kl)
        logps = TopKLogProbs(
            policy=forward.topk_logprobs,
            ref=forward.ref_topk_logprobs,
            policy_sampled=forward.sampled_logprob,
            ref_sampled=forward.ref_logprob,
            sampled_in_topk=(forward.topk_indices == inputs["completion_ids"].unsqueeze(-1)).any(-1),
        )
        if estimator == "rb":
            kl = forward.exact_kl
        else:
            behavior = self._behavior_logprobs(forward.logps, inputs) if self.args.tike_importance_weight else None
            ratio = importance_ratio(forward.logps, behavior, self.args.tike_is_clip, self.args.tike_is_clip_mode)
            kl = truncated_kl(logps, ratio, self.args.tike_tail)
        terms = KLTerms(kl, topk_mass=logps.topk_mass())
        if forward.exact_kl is not None:  # an exact-KL logging step: the residual beyond the top-k sum (Eq. 10-12)
            terms.exact = forward.exact_kl.detach()
            terms.tail_residual = (forward.exact_kl - logps.topk_sum()).detach()
        return terms

    def _future_kl_score(
        self, values: torch.Tensor, logps: torch.Tensor, inputs: dict, mask: torch.Tensor
    ) -> torch.Tensor:
        """`kl_gradient="sequence"`: per token, (log π_θ(o_t) − sg)·sg(r_t·(F_t − b_t)), zero in value,
        whose gradient carries the KL of the later positions of the completion (F_t; for k1 from t
        itself) onto the token that shaped their histories. r_t is the token's importance weight
        (1 on-policy), b_t the configured baseline. docs/estimators.md derives it."""
        estimator = self.args.kl_estimator
        future = future_kl(values, mask, inclusive=estimator in SCORE_FROM_OWN_POSITION)
        baseline = self._future_kl_baseline(future, mask)
        if self.args.kl_sequence_baseline != "none":
            baseline = baseline + baseline_offset(estimator)
        weight = importance_ratio(
            logps, self._behavior_logprobs(logps, inputs), self.args.tike_is_clip, self.args.tike_is_clip_mode
        )
        return score_term(logps, future - baseline, weight)

    def _future_kl_baseline(self, future: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """b_t per position, independent of each completion's own tokens (so it adds no bias)."""
        baseline = self.args.kl_sequence_baseline
        if baseline == "loo":  # the other completions of the micro-batch
            return leave_one_out(future, future.shape[0]) if future.shape[0] > 1 else torch.zeros_like(future)
        if baseline == "none":
            return torch.zeros_like(future)
        # from earlier micro-batches only, then updated with this one
        before = self._future_kl_mean.value(future)
        self._future_kl_mean.update(future, mask)
        return before

    def _behavior_logprobs(self, logps: torch.Tensor, inputs: dict) -> torch.Tensor | None:
        """log π_b(o): the log-probs of the distribution the sampled tokens were drawn from, the
        denominator of TIKE's importance weight. The sampler's own (vLLM, a rollout_func's
        `logprobs`) where the batch carries them and `tike_sampler_logprobs`, else π_old's (None:
        the current policy, when TRL skips them because the batch is on-policy)."""
        old = inputs.get("old_per_token_logps")
        sampler = inputs.get("sampling_per_token_logps") if self.args.tike_sampler_logprobs else None
        if sampler is None:
            return old
        return torch.where(torch.isnan(sampler), logps.detach() if old is None else old, sampler)

    def _log_kl_metrics(
        self, terms: KLTerms, mask: torch.Tensor, mode: str, kl_loss: torch.Tensor, policy_loss_logged: bool
    ) -> None:
        """`kl` (and TIKE's diagnostics) as TRL reduces its metrics; and where TRL logged its
        `policy_loss` (with an entropy bonus), the KL term it holds there when TRL adds the KL itself."""
        self._metrics[mode]["kl"].append(self._global_masked_mean(terms.kl, mask))
        for name in ("topk_mass", "exact", "tail_residual"):
            if getattr(terms, name) is not None:
                self._metrics[mode][f"kl/{name}"].append(self._global_masked_mean(getattr(terms, name), mask))
        if policy_loss_logged:
            # TRL's `policy_loss` is its loss before the accumulation scaling, except for the loss
            # types normalised by `num_items_in_batch`, whose normaliser includes it
            scaled = mode == "train" and self.loss_type not in NUM_ITEMS_LOSS_TYPES
            term = kl_loss.detach() * (self.current_gradient_accumulation_steps if scaled else 1.0)
            self._metrics[mode]["policy_loss"][-1] += self.accelerator.gather(term).nanmean().item()

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
        if self.loss_type in NUM_ITEMS_LOSS_TYPES:
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
