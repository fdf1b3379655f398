"""The training stages: a few GRPO steps of `tike`, `rb` and TRL's own k3 on a random-weight model,
plain, with LoRA, and under DeepSpeed ZeRO-3 on one process.

Each run trains `settings.train_steps` optimizer steps with `num_iterations=2`, so TRL computes
π_old's log-probs at generation time and the first loss pass on every fresh generation batch is
on-policy. A subclass made here, for this check only, records the policy-gradient log-probs of
every loss pass (the output of TRL's `_get_per_token_logps_and_entropies` with gradients on) next
to `old_per_token_logps`: on-policy, |r − 1| = |exp(logp − logp_old) − 1| over the completion
tokens must be 0, for TRL's k3 as for tike and rb.

TRL's k3 runs through plain `trl.GRPOTrainer`; tike and rb through `TIKEGRPOTrainer`, both only
through their public API (config, `train()`, `state.log_history`) plus that recording subclass.
"""

from __future__ import annotations

import gc
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from trl import GRPOConfig, GRPOTrainer

from benchmarks.loss_step import _placeholder_tokenizer
from tike_trl import TIKEConfig, TIKEGRPOTrainer

from .settings import Settings

ESTIMATORS = ("k3", "tike", "rb")  # k3: TRL's own GRPOTrainer
SETUPS = ("plain", "lora", "zero3")
# what each step's log keeps, where TRL (or tike-trl) logs it
LOGGED = ("loss", "kl", "grad_norm", "reward", "entropy", "kl/topk_mass", "clip_ratio/region_mean", "step_time")


def zero3_config(settings: Settings) -> dict:
    """ZeRO-3 with no DeepSpeed optimizer, so that the Trainer builds torch's AdamW and DeepSpeed
    compiles no op; "auto" values are filled in from the TrainingArguments."""
    return {
        "zero_optimization": {"stage": 3, "overlap_comm": False, "stage3_gather_16bit_weights_on_model_save": False},
        "bf16": {"enabled": settings.dtype == "bfloat16"},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }


def tokenizer(settings: Settings) -> PreTrainedTokenizerFast:
    """The loss-step benchmark's tokenizer (one word per head row, so no row is outside it), split
    on spaces so that a prompt is several tokens."""
    tok = _placeholder_tokenizer(settings.geometry.vocab)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def save_model(settings: Settings, path: Path) -> Path:
    """A random-weight model of `settings.geometry` in `settings.dtype`, saved once: every run
    (and TRL's reference model) loads it from there."""
    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    with torch.device(settings.device):  # 1.5B parameters initialise slowly on a CPU
        model = AutoModelForCausalLM.from_config(settings.geometry.config(), dtype=getattr(torch, settings.dtype))
    model.save_pretrained(path)
    del model
    _release()
    return path


def prompts(settings: Settings, n: int = 16) -> Dataset:
    g = torch.Generator().manual_seed(0)
    words = torch.randint(3, settings.geometry.vocab, (n, 8), generator=g).tolist()
    return Dataset.from_dict({"prompt": [" ".join(f"t{i}" for i in row) for row in words]})


def reward_token_sum(completions, **_) -> list[float]:
    """Any reward that differs within a group, so that the advantages are not all zero: the sum of
    the completion's token numbers ("t123" is 123), modulo 7."""
    return [float(sum(int(w[1:]) for w in c.split() if w[1:].isdigit()) % 7) for c in completions]


def recording(cls: type[GRPOTrainer]) -> type[GRPOTrainer]:
    """`cls` recording |r − 1| of every loss pass (on-policy: the first on a fresh generation batch)."""

    class Recording(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.ratio_log: list[dict] = []
            self._generated_at: int | None = None
            self._loss_logps: torch.Tensor | None = None

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            if self.model.training:
                self._generated_at = self.state.global_step
            return out

        def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
            out = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
            if torch.is_grad_enabled():  # the loss's policy forward (generation-time passes run without grad)
                self._loss_logps = out[0].detach()
            return out

        def _compute_loss(self, model, inputs):
            self._loss_logps = None
            loss = super()._compute_loss(model, inputs)
            old = inputs.get("old_per_token_logps")
            if self._loss_logps is not None and old is not None:
                mask = inputs["completion_mask"].bool()
                dev = (torch.exp(self._loss_logps.double() - old.double()) - 1).abs()[mask]
                self.ratio_log.append(
                    {
                        "step": self.state.global_step + 1,
                        "on_policy": self._generated_at == self.state.global_step,
                        "tokens": int(mask.sum()),
                        "mean": dev.mean().item() if dev.numel() else 0.0,
                        "max": dev.max().item() if dev.numel() else 0.0,
                    }
                )
            return loss

    Recording.__name__ = f"Recording{cls.__name__}"
    return Recording


def _config(settings: Settings, estimator: str, setup: str, out: Path) -> GRPOConfig:
    common = dict(
        output_dir=str(out),
        per_device_train_batch_size=settings.train_batch,
        num_generations=settings.num_generations,
        max_completion_length=settings.train_completion,
        num_iterations=settings.num_iterations,
        max_steps=settings.train_steps,
        learning_rate=settings.learning_rate,
        beta=settings.beta,
        gradient_checkpointing=True,
        bf16=settings.dtype == "bfloat16",
        use_cpu=settings.device == "cpu",
        model_init_kwargs={"dtype": settings.dtype},
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        deepspeed=zero3_config(settings) if setup == "zero3" else None,
    )
    if estimator == "k3":
        return GRPOConfig(**common)
    return TIKEConfig(**common, kl_estimator=estimator, tike_top_k=settings.tike_top_k)


def _lora():
    from peft import LoraConfig

    return LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"
    )


def train_one(settings: Settings, model_dir: Path, setup: str, estimator: str, workdir: Path) -> dict:
    """One run: build the trainer, train, and return its per-step log, |r − 1| and checks."""
    cuda = settings.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    cls = recording(GRPOTrainer if estimator == "k3" else TIKEGRPOTrainer)
    trainer = cls(
        model=str(model_dir),
        reward_funcs=reward_token_sum,
        args=_config(settings, estimator, setup, workdir / f"{setup}-{estimator}"),
        train_dataset=prompts(settings),
        processing_class=tokenizer(settings),
        peft_config=_lora() if setup == "lora" else None,
    )
    built = time.perf_counter()
    head = trainer.model.get_output_embeddings().weight
    sharded = hasattr(head, "ds_id") and head.numel() == 0  # a ZeRO-3 partition, empty outside a gather
    distributed = str(trainer.accelerator.distributed_type).removeprefix("DistributedType.")
    trainer.train()
    trained = time.perf_counter()
    steps = [
        {"step": log["step"], **{k: log[k] for k in LOGGED if k in log}}
        for log in trainer.state.log_history
        if "loss" in log
    ]
    ratios = trainer.ratio_log
    result = {
        "setup": setup,
        "estimator": estimator,
        "trainer": type(trainer).__mro__[1].__name__,
        "distributed_type": distributed,
        "head_sharded": sharded,
        "steps": steps,
        "ratio_passes": ratios,
        "build_s": built - start,
        "train_s": trained - built,
        "peak_mem_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    }
    del trainer
    _release()
    result["checks"] = run_checks(result, settings.train_steps)
    if setup == "zero3":
        result["checks"].insert(
            0, _check("DeepSpeed, LM head sharded", distributed == "DEEPSPEED" and sharded, sharded)
        )
    return result


def run_checks(run: dict, steps: int) -> list[dict]:
    """Correctness checks of one run: every step logged a finite loss and kl, and on-policy |r − 1| = 0."""
    logged = run["steps"]
    on_policy = [p for p in run["ratio_passes"] if p["on_policy"]]
    worst = max((p["max"] for p in on_policy), default=None)
    return [
        _check(f"{steps} steps logged", len(logged) == steps, len(logged)),
        _check(
            "finite loss and kl every step",
            all(math.isfinite(s.get("loss", math.nan)) and math.isfinite(s.get("kl", math.nan)) for s in logged),
            [[s.get("loss"), s.get("kl")] for s in logged],
        ),
        _check("on-policy |r - 1| recorded", bool(on_policy), len(on_policy)),
        _check("on-policy max |r - 1| = 0", worst == 0.0, worst),
    ]


def _check(name: str, ok: bool, value) -> dict:
    return {"name": name, "ok": bool(ok), "value": value, "kind": "correctness"}


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(settings: Settings, workdir: Path, setups: tuple[str, ...], emit: Callable[[dict], None]) -> dict:
    """Every estimator in every setup, one after the other; `emit` gets the result after each run,
    so that a stage cut off by its timeout still reports the runs it finished."""
    result: dict = {
        "setups": list(setups),
        "estimators": list(ESTIMATORS),
        "geometry": asdict(settings.geometry),
        "dtype": settings.dtype,
        "runs": [],
    }
    start = time.perf_counter()
    model_dir = save_model(settings, workdir / "model")
    result["model_s"] = time.perf_counter() - start
    emit(result)
    for setup in setups:
        for estimator in ESTIMATORS:
            try:
                run_result = train_one(settings, model_dir, setup, estimator, workdir)
            except Exception as exc:  # the other runs still tell something; the stage is marked failed
                traceback.print_exc()
                run_result = {
                    "setup": setup,
                    "estimator": estimator,
                    "error": f"{type(exc).__name__}: {exc}"[:2000],
                    "checks": [_check("trained", False, f"{type(exc).__name__}: {exc}"[:300])],
                }
                _release()
            result["runs"].append(run_result)
            emit(result)
    return result
