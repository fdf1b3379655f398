"""One GRPO loss micro-step, side by side: TRL's own k3 path against tike (several k), rb, and
the naive (materialising) versions, on one batch, in one process.

A step is what a training micro-step costs for the KL: the reference forward plus the policy
forward and backward of `compute_loss`. Every variant drives the real trainers on a saved
random-weight model:

- `trl k3`: plain `trl.GRPOTrainer` (its fused, tiled head). Its reference log-probs come from
  the pass TRL runs at generation time (`_get_per_token_logps_and_entropies(ref_model, ...)`),
  which is timed as part of the step.
- `tike`, `rb tiled`: `TIKEGRPOTrainer`, whose loss runs the reference forward itself (as it
  does on a batch it did not generate; in training that forward runs once per generation batch).
- `reference forward`: that reference pass alone, what every pass over a generation batch after
  the first saves with `num_iterations > 1`; `tike, kept reference` and `rb, kept reference`:
  those later passes, the loss applying only the reference head to hidden states kept from the
  generation-time pass.
- `tike naive`, `rb naive`: the same trainer with a head that materialises both models'
  `[tokens, vocab]` log-softmax (`tests.dense_head.DenseHead`).
- `backbone`: TRL's k3 step with no LM head at all (`benchmarks.heads.NoHead`); a variant's
  head extra memory is its peak minus this step's peak.

    python -m benchmarks.loss_step --mode cpu     # small model, a few minutes on 2 cores
    python -m benchmarks.loss_step --mode gpu     # Qwen2.5-1.5B geometry, bf16, needs CUDA

Each run writes a new pair of files, `benchmarks/results/<mode>/<UTC date>-<run name>.json` and
`.md` (the run name is `--run-name`, by default the UTC time; an existing run is never
overwritten), and the plot `docs/loss_step_<mode>.png`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models
from tqdm import tqdm
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config
from trl import GRPOConfig, GRPOTrainer

import tike_trl
from tests.dense_head import DenseHeadTrainer
from tike_trl import TIKEConfig, TIKEGRPOTrainer
from tike_trl.fused_head import replace_head_kernel
from tike_trl.trainer import REF_HIDDEN_STATES

from .heads import NoHead
from .measure import freed_memory_kept, peak_memory, timed, unique_tensor_bytes
from .run_files import run_stem, with_suffix

ROOT = Path(__file__).resolve().parents[1]
TOP_KS = (1, 4, 16, 64, 256, 1024)
NAIVE_TOP_K = 16
BETA = 1e-3  # the TIKE paper's; the same for every variant


@dataclass(frozen=True)
class Geometry:
    """A Qwen2 decoder (tied embeddings, as Qwen2.5-1.5B), random weights."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int

    def config(self) -> Qwen2Config:
        return Qwen2Config(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            intermediate_size=self.intermediate,
            max_position_embeddings=32768,
            tie_word_embeddings=True,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=1,
        )


@dataclass(frozen=True)
class Mode:
    name: str
    device: str
    dtype: str
    geometry: Geometry
    batch: int  # sequences per micro-batch
    prompt: int
    completion: int
    top_ks: tuple[int, ...] = TOP_KS
    repeats: int = 5
    warmup: int = 1
    fit_batches: tuple[int, ...] = ()  # larger micro-batches tried per variant until one runs out of memory
    # CPU modes run single-threaded: on a shared machine, a 2-thread op waits for its busier thread
    threads: int | None = None

    @property
    def tokens(self) -> int:
        return self.batch * (self.prompt + self.completion)


QWEN25_15B = Geometry(vocab=151_936, hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960)
MODES = {
    # Qwen2.5's vocabulary (4.6 of TRL's 32,768-column tiles) on a tiny backbone
    "cpu": Mode(
        "cpu",
        "cpu",
        "float32",
        Geometry(QWEN25_15B.vocab, 128, 2, 4, 2, 512),
        batch=2,
        prompt=32,
        completion=96,
        repeats=7,
        threads=1,
    ),
    "gpu": Mode("gpu", "cuda", "bfloat16", QWEN25_15B, batch=8, prompt=256, completion=1792, fit_batches=(16, 32, 64)),
    # seconds: checks the machinery (the benchmark's own test runs it)
    "smoke": Mode(
        "smoke",
        "cpu",
        "float32",
        Geometry(1000, 16, 1, 2, 1, 32),
        batch=2,
        prompt=4,
        completion=12,
        top_ks=(1, 4, 16),
        threads=1,
    ),
}


@dataclass
class Variant:
    """One column of the comparison: which trainer runs the step, with which estimator."""

    name: str
    k: int | None
    trainer: GRPOTrainer
    estimator: str | None = None  # TIKEGRPOTrainer's kl_estimator; None for TRL's own trainer
    no_head: bool = False
    # the reference forward only (TRL's generation-time pass): what every later pass over a
    # generation batch saves when the reference's hidden states are kept (num_iterations > 1)
    reference_only: bool = False
    # ours with the reference's hidden states kept from the generation-time pass: the loss step of
    # every pass over a generation batch (all of them at num_iterations > 1 but the first)
    kept_reference: bool = False
    _kept: dict = field(default_factory=dict)

    def step(self, inputs: dict) -> dict:
        """Reference forward + policy forward/backward; returns the loss and the logged KL."""
        trainer = self.trainer
        if self.estimator is not None:
            trainer.args.kl_estimator = self.estimator
            trainer.args.tike_top_k = self.k or trainer.args.tike_top_k
        if self.reference_only:
            _trl_reference_logps(trainer, inputs)
            return {"loss": None, "kl": None}
        if self.kept_reference:  # computed once per batch, at the untimed warm-up step
            key = id(inputs["completion_ids"])
            if key not in self._kept:
                self._kept = {key: trainer._reference_hidden_states(inputs)}
            inputs = {**inputs, REF_HIDDEN_STATES: self._kept[key]}
        with replace_head_kernel(NoHead()) if self.no_head else nullcontext():
            if self.estimator is None:  # TRL computes the reference log-probs before the loss
                inputs = {**inputs, "ref_per_token_logps": _trl_reference_logps(trainer, inputs)}
            loss = trainer.compute_loss(trainer.model, inputs)
            trainer.accelerator.backward(loss)
        return {"loss": loss.item(), "kl": trainer._metrics["train"]["kl"][-1]}


def _trl_reference_logps(trainer: GRPOTrainer, inputs: dict) -> torch.Tensor:
    """TRL's generation-time reference pass, as `_generate_and_score_completions` calls it."""
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.ref_model, input_ids, mask, inputs["completion_ids"].shape[1], batch_size=input_ids.shape[0]
        )  # TRL's per_device_train_batch_size: the whole micro-batch
    return logps


def synthetic_batch(mode: Mode, batch: int, device: torch.device) -> dict:
    """A fixed micro-batch as TRL's loss receives it: random ids, no padding, on-policy."""
    g = torch.Generator().manual_seed(0)
    vocab = mode.geometry.vocab
    inputs = {
        "prompt_ids": torch.randint(2, vocab, (batch, mode.prompt), generator=g),
        "prompt_mask": torch.ones(batch, mode.prompt, dtype=torch.long),
        "completion_ids": torch.randint(2, vocab, (batch, mode.completion), generator=g),
        "completion_mask": torch.ones(batch, mode.completion, dtype=torch.long),
        "advantages": torch.randn(batch, generator=g),
        "num_items_in_batch": torch.tensor(batch * mode.completion),
    }
    return {name: t.to(device) for name, t in inputs.items()}


def _placeholder_tokenizer(size: int) -> PreTrainedTokenizerFast:
    """The trainers need a tokenizer to start; the benchmark's batch is token ids already. It has one
    token per head row, or the trainer would take rows beyond it for padding outside the top-k."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"t{i}": i for i in range(3, size)}}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
    )


def _no_reward(completions, **_) -> list[float]:
    return [0.0] * len(completions)


def _trainer_args(config_cls: type, mode: Mode, workdir: Path) -> GRPOConfig:
    return config_cls(
        output_dir=str(workdir / "out"),
        per_device_train_batch_size=mode.batch,
        num_generations=2,
        max_completion_length=mode.completion,
        beta=BETA,
        bf16=mode.dtype == "bfloat16",
        use_cpu=mode.device == "cpu",
        model_init_kwargs={"dtype": mode.dtype},
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )


@dataclass
class Bench:
    """The trainers (sharing one policy and one reference model) and the variants on them."""

    mode: Mode
    device: torch.device
    variants: list[Variant] = field(default_factory=list)

    def live_bytes(self, inputs: dict) -> int:
        trainer = self.variants[0].trainer
        tensors = [
            *trainer.model.parameters(),
            *trainer.model.buffers(),
            *trainer.ref_model.parameters(),
            *trainer.ref_model.buffers(),
            *inputs.values(),
        ]
        return unique_tensor_bytes(tensors)


def build(mode: Mode, workdir: Path) -> Bench:
    """Save a random-weight model, build TRL's trainer and ours on it, and list the variants."""
    torch.manual_seed(0)
    device = torch.device(mode.device)
    with device:  # initialise on the device: 1.5B parameters initialise slowly on a CPU
        model = AutoModelForCausalLM.from_config(mode.geometry.config(), dtype=getattr(torch, mode.dtype))
    model.save_pretrained(workdir / "model")
    del model
    common = dict(
        reward_funcs=_no_reward,
        train_dataset=Dataset.from_dict({"prompt": ["unused"] * 2}),
        processing_class=_placeholder_tokenizer(mode.geometry.vocab),
    )
    trl_trainer = GRPOTrainer(model=str(workdir / "model"), args=_trainer_args(GRPOConfig, mode, workdir), **common)
    ours, naive = (
        cls(model=trl_trainer.model, args=_trainer_args(TIKEConfig, mode, workdir), **common)
        for cls in (TIKEGRPOTrainer, DenseHeadTrainer)
    )
    for trainer in (ours, naive):  # one reference model for all, as in a real run
        trainer.accelerator.free_memory()  # its list of prepared models would keep the trainer's own reference
        trainer.ref_model = trl_trainer.ref_model
    _release(device)
    with torch.no_grad():  # move the policy off the reference, so that the KL is not zero
        g = torch.Generator(device=device).manual_seed(1)
        for p in trl_trainer.model.parameters():
            p.add_(torch.randn(p.shape, generator=g, device=device, dtype=p.dtype), alpha=0.02)
    for trainer in (trl_trainer, ours, naive):
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
    _checkpoint_layers(trl_trainer.model)

    bench = Bench(mode, device)
    bench.variants = [
        Variant("backbone", None, trl_trainer, no_head=True),
        Variant("trl k3", None, trl_trainer),
        *(Variant("tike", k, ours, "tike") for k in mode.top_ks),
        Variant("rb tiled", None, ours, "rb"),
        Variant("reference forward", None, trl_trainer, reference_only=True),
        Variant("tike, kept reference", NAIVE_TOP_K, ours, "tike", kept_reference=True),
        Variant("rb, kept reference", None, ours, "rb", kept_reference=True),
        Variant("tike naive", min(NAIVE_TOP_K, max(mode.top_ks)), naive, "tike"),
        Variant("rb naive", None, naive, "rb"),
    ]
    return bench


def _checkpoint_layers(model: torch.nn.Module) -> None:
    """Gradient checkpointing, as in a TRL run (GRPOConfig's default). Recent transformers turn it
    on when the Trainer is built, older ones only in `train()`, which the benchmark never calls."""
    if not _is_checkpointing(model):
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()


def _is_checkpointing(model: torch.nn.Module) -> bool:
    flag = getattr(model, "is_activation_checkpointing", None)  # recent transformers' name
    return bool(model.is_gradient_checkpointing if flag is None else flag)


def measure(bench: Bench, inputs: dict) -> list[dict]:
    """Warm up every variant, time them in rounds of one step each (so drifting load hits all
    alike), in a new shuffled order every round (in a fixed order, the variant that always came
    right after the head-less step ran ~10% slower on a CPU), then record each one's peak memory in a
    separate, untimed step. A variant that runs out of device memory is dropped from the rounds
    and reported with `"oom": true` and no numbers."""
    mode, device, variants = bench.mode, bench.device, bench.variants
    model = variants[0].trainer.model
    times: dict[int, list[tuple[float, float | None]]] = {i: [] for i in range(len(variants))}
    outputs: dict[int, dict] = {}
    oom: set[int] = set()

    def attempt(i: int, call) -> object:
        model.zero_grad(set_to_none=True)
        try:
            return call()
        except torch.OutOfMemoryError:
            oom.add(i)
            model.zero_grad(set_to_none=True)
            _release(device)
            return None

    with tqdm(
        total=len(variants) * (mode.warmup + mode.repeats + 1), desc=f"{mode.name}: loss steps", unit="step"
    ) as bar:
        for repeat in range(mode.warmup + mode.repeats):
            for i in random.Random(repeat).sample(range(len(variants)), len(variants)):
                variant = variants[i]
                if i not in oom:
                    seconds = attempt(i, lambda: timed(lambda: outputs.__setitem__(i, variant.step(inputs)), device))
                    if repeat >= mode.warmup and seconds is not None:
                        times[i].append(seconds)
                bar.update()
        peaks = {}
        for i, variant in enumerate(variants):
            if i not in oom:
                gc.collect()
                peaks[i] = attempt(
                    i, lambda: peak_memory(lambda: variant.step(inputs), device, bench.live_bytes(inputs))
                )
            bar.update()
    model.zero_grad(set_to_none=True)
    tokens = inputs["prompt_ids"].numel() + inputs["completion_ids"].numel()
    rows = [
        _row(variant, tokens, None if i in oom else (times[i], peaks[i], outputs[i]))
        for i, variant in enumerate(variants)
    ]
    backbone = rows[0]
    for row in rows:
        if not row["oom"]:
            row["head_extra_mem_bytes"] = row["peak_mem_bytes"] - backbone["peak_mem_bytes"]
            row["head_time_s"] = row["time_s"] - backbone["time_s"]
    return rows


def _row(variant: Variant, tokens: int, measured: tuple | None) -> dict:
    """One variant's JSON row; `measured` is (times, (start, peak) memory, step outputs), None if it ran
    out of memory."""
    row = {"variant": variant.name, "k": variant.k, "tokens": tokens, "oom": measured is None}
    if measured is None:
        return {
            **row,
            **dict.fromkeys(
                (
                    "time_s",
                    "cpu_time_s",
                    "start_mem_bytes",
                    "peak_mem_bytes",
                    "head_extra_mem_bytes",
                    "head_time_s",
                    "loss",
                    "kl",
                )
            ),
            "times_s": [],
        }
    times, (start, peak), outputs = measured
    wall, cpu = zip(*times)
    return {
        **row,
        "time_s": statistics.median(wall),
        "times_s": list(wall),
        "cpu_time_s": None if cpu[0] is None else statistics.median(cpu),
        "start_mem_bytes": start,
        "peak_mem_bytes": peak,
        **outputs,
    }


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def largest_fits(bench: Bench) -> list[dict]:
    """For each variant, one step at each larger micro-batch of `mode.fit_batches`, until it runs
    out of device memory (GPU mode); the cache is emptied after every step."""
    mode, results = bench.mode, []
    model = bench.variants[0].trainer.model
    for batch in mode.fit_batches:
        inputs = synthetic_batch(mode, batch, bench.device)
        for variant in tqdm(bench.variants, desc=f"{mode.name}: {batch} sequences", unit="variant"):
            if any((r["variant"], r["k"], r["fits"]) == (variant.name, variant.k, False) for r in results):
                continue  # it already ran out of memory at a smaller size
            model.zero_grad(set_to_none=True)
            try:
                _, peak = peak_memory(lambda: variant.step(inputs), bench.device, 0)
            except torch.OutOfMemoryError:
                peak = None
            model.zero_grad(set_to_none=True)
            _release(bench.device)
            results.append(
                {
                    "variant": variant.name,
                    "k": variant.k,
                    "tokens": batch * (mode.prompt + mode.completion),
                    "fits": peak is not None,
                    "peak_mem_bytes": peak,
                }
            )
    return results


def environment(device: torch.device) -> dict:
    import transformers
    import trl

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return {
        "device": name,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "tike_trl": tike_trl.__version__,
        },
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def run_files(out_dir: Path, mode: str, run_name: str | None = None, now: datetime | None = None) -> tuple[Path, Path]:
    """The JSON and markdown files of one run: `<out_dir>/<mode>/<UTC date>-<run name>.json` and `.md`,
    the run name defaulting to the UTC time (`HHMMSSZ`), so that every run gets its own files."""
    stem = run_stem(out_dir / mode, run_name, now)
    return with_suffix(stem, ".json"), with_suffix(stem, ".md")


def run(mode: Mode, files: tuple[Path, Path], plot_path: Path | None) -> dict:
    """Run the comparison in `mode`; write the result to `files` (JSON, then the markdown table)."""
    device = torch.device(mode.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(mode.threads or threads)
    try:
        env = environment(device)
        load_before = os.getloadavg()
        with (
            tempfile.TemporaryDirectory(prefix="tike-bench-") as tmp,
            freed_memory_kept() if device.type == "cpu" else nullcontext(False) as kept,
        ):
            bench = build(mode, Path(tmp))
            checkpointing = _is_checkpointing(bench.variants[0].trainer.model)
            rows = measure(bench, synthetic_batch(mode, mode.batch, device))
            fits = largest_fits(bench) if mode.fit_batches else []
        load_after = os.getloadavg()
    finally:
        torch.set_num_threads(threads)
    for row in rows:
        row.update(env)
    result = {
        "mode": mode.name,
        **env,
        "geometry": asdict(mode.geometry),
        "dtype": mode.dtype,
        "micro_batch": {
            "sequences": mode.batch,
            "prompt": mode.prompt,
            "completion": mode.completion,
            "tokens": mode.tokens,
        },
        "gradient_checkpointing": checkpointing,
        "beta": BETA,
        "repeats": mode.repeats,
        "warmup": mode.warmup,
        "memory_measure": "torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "tensor bytes alive at the start (models, batch) + peak of torch.profiler's CPU allocation trace",
        "load_average_1min": {"before": load_before[0], "after": load_after[0]},
        "cpu_freed_memory_kept": kept,
        "rows": rows,
        "fits": fits,
    }
    json_path, md_path = files
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path.write_text(markdown_table(result) + "\n")
    if plot_path is not None:
        from .plot import plot_loss_step

        plot_loss_step(result, plot_path)
    return result


def markdown_table(result: dict) -> str:
    """The rows as a markdown table, with ratios to TRL's k3 step (and to its head's share)."""
    rows = result["rows"]
    k3 = next(r for r in rows if r["variant"] == "trl k3")
    with_cpu_time = k3["cpu_time_s"] is not None

    def ratio(key: str, r: dict) -> str:
        return f"{r[key] / k3[key]:.2f}x" if k3[key] else "n/a"

    def cells(r: dict) -> list[str]:
        if r["oom"]:
            return ["OOM"] * (8 + with_cpu_time)
        return [
            f"{1e3 * r['time_s']:.0f} ms",
            ratio("time_s", r),
            *([ratio("cpu_time_s", r)] * with_cpu_time),
            ratio("head_time_s", r),
            _size(r["peak_mem_bytes"]),
            ratio("peak_mem_bytes", r),
            _size(r["head_extra_mem_bytes"]),
            ratio("head_extra_mem_bytes", r),
        ]

    header = [
        "variant",
        "k",
        "step time",
        "× k3",
        *(["CPU time × k3"] * with_cpu_time),
        "head time × k3 head",
        "peak memory",
        "× k3",
        "head extra memory",
        "× k3 head",
    ]
    lines = [
        f"{result['device']} · {result['mode']} mode · {result['micro_batch']['tokens']} tokens per micro-batch "
        f"· median of {result['repeats']} steps · 1-min load average {result['load_average_1min']['before']:.1f}",
        "",
        _table_line(header),
        _table_line(["---"] * len(header)),
    ]
    lines += [_table_line([r["variant"], _k(r), *cells(r)]) for r in rows]
    if result["fits"]:
        sizes = sorted({f["tokens"] for f in result["fits"]})
        found = {(f["variant"], f["k"], f["tokens"]): f for f in result["fits"]}
        lines += [
            "",
            "Peak memory at larger micro-batches (OOM: ran out of device memory):",
            "",
            _table_line(["variant", "k", *(f"{t} tokens" for t in sizes)]),
            _table_line(["---"] * (2 + len(sizes))),
        ]
        for r in rows:
            hits = [found.get((r["variant"], r["k"], t)) for t in sizes]
            lines.append(
                _table_line(
                    [
                        r["variant"],
                        _k(r),
                        *("" if f is None else _size(f["peak_mem_bytes"]) if f["fits"] else "OOM" for f in hits),
                    ]
                )
            )
    return "\n".join(lines)


def _table_line(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _k(row: dict) -> str:
    return "" if row["k"] is None else str(row["k"])


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if abs(n_bytes) >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--mode",
        choices=list(MODES),
        default="cpu",
        help="cpu: small model (minutes on 2 cores); gpu: Qwen2.5-1.5B geometry, bf16 (needs CUDA); "
        "smoke: a tiny model (seconds)",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=ROOT / "benchmarks" / "results",
        help="results folder; a run writes <out-dir>/<mode>/<UTC date>-<run name>.json and .md "
        "(default: benchmarks/results)",
    )
    parser.add_argument(
        "--run-name",
        help="what distinguishes this run, e.g. 'h100-idle' (default: the UTC time); "
        "an existing run is never overwritten",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: the mode's; cpu and smoke run single-threaded)",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="PNG of memory and time vs k (default: docs/loss_step_<mode>.png; 'none' skips it)",
    )
    args = parser.parse_args(argv)
    mode = MODES[args.mode] if args.threads is None else replace(MODES[args.mode], threads=args.threads)
    if mode.device == "cuda" and not torch.cuda.is_available():
        sys.exit(
            f"--mode {args.mode} needs a CUDA GPU and torch.cuda.is_available() is False here; "
            "run `python -m benchmarks.loss_step --mode cpu` on this machine."
        )
    if args.run_name is not None and (not args.run_name or "/" in args.run_name):
        sys.exit(f"--run-name {args.run_name!r}: give a non-empty name without '/'.")
    files = run_files(args.out_dir, mode.name, args.run_name)
    if any(f.exists() for f in files):
        sys.exit(f"{files[0]} already exists: give this run another --run-name.")
    plot = ROOT / "docs" / f"loss_step_{mode.name}.png" if args.plot is None else args.plot
    result = run(mode, files, None if str(plot) == "none" else plot)
    print(markdown_table(result))
    print(f"wrote {files[0]} and {files[1]}")
    return result


if __name__ == "__main__":
    main()
