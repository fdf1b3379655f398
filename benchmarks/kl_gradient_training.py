"""Token- vs sequence-level KL gradient in training: does `kl_gradient="sequence"` reach a lower
KL to the reference at the same reward?

GRPO on the embedded task (SmolLM2-135M-Instruct, single-digit sums, exact-number reward), for
`rb` and `tike` (k = 16, tail `mc`, the two estimators whose sequence gradient is exact) with
`kl_gradient` "token" and "sequence", two seeds each, at a beta large enough that the KL term
moves the policy. Every few steps, a held-out evaluation samples completions from the current
policy for prompts it never trains on and measures the *sequence* KL to the reference exactly
(Σ_t of the full-vocabulary per-position KL along each sampled completion, i.e. the
Rao-Blackwellized estimate) and the reward.

    python -m benchmarks.kl_gradient_training                # 8 runs, ~35-45 min on 2 CPU cores
    python -m benchmarks.kl_gradient_training --smoke        # the tiny test model, seconds

Writes `benchmarks/results/kl_gradient/<UTC date>-<run name>.json` and `.md`, and the plot
`docs/kl_gradient_training.png` (reward and held-out sequence KL against steps; final held-out
(reward, KL) per run, the Rao-Blackwellized paper's Pareto view).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl.data_utils import maybe_apply_chat_template

from tike_trl import TIKEConfig, TIKEGRPOTrainer
from tike_trl.estimators import exact_kl
from tike_trl.models import embedded_model_path
from tike_trl.rewards import exact_number_reward
from tike_trl.scripts.data import arithmetic_dataset

from .run_files import add_run_arguments, write_run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [(estimator, gradient) for estimator in ("rb", "tike") for gradient in ("token", "sequence")]


@dataclass(frozen=True)
class Setup:
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    beta: float = 0.1
    steps: int = 20
    batch: int = 8  # completions per step
    generations: int = 4
    completion_len: int = 8
    learning_rate: float = 1e-5
    seeds: tuple[int, ...] = (0, 1)
    configs: tuple[tuple[str, str], ...] = tuple(CONFIGS)  # (kl_estimator, kl_gradient) pairs
    eval_every: int = 5
    eval_prompts: int = 12
    eval_samples: int = 4


def held_out_prompts(setup: Setup) -> tuple[list, list[str]]:
    """Arithmetic problems from a seed the training data never uses."""
    data = arithmetic_dataset(setup.eval_prompts, seed=10_000)
    return list(data["prompt"]), list(data["answer"])


class HeldOutEval(TrainerCallback):
    """Every `eval_every` steps (and before the first), the policy's held-out sequence KL to the
    reference and its reward, from completions sampled from the policy at the training temperature
    (one batched `generate`, then one forward of each model over the sampled completions)."""

    def __init__(self, trainer: TIKEGRPOTrainer, setup: Setup, seed: int) -> None:
        self.trainer, self.setup, self.seed = trainer, setup, seed
        prompts, answers = held_out_prompts(setup)
        tokenizer = trainer.processing_class
        texts = [maybe_apply_chat_template({"prompt": p}, tokenizer)["prompt"] for p in prompts]
        self.texts = [t for t in texts for _ in range(setup.eval_samples)]
        self.answers = [a for a in answers for _ in range(setup.eval_samples)]
        self.rows: list[dict] = []

    @torch.no_grad()
    def evaluate(self, step: int) -> None:
        trainer, setup = self.trainer, self.setup
        tokenizer, model = trainer.processing_class, trainer.model
        was_training = model.training
        model.eval()
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        prompts = tokenizer(self.texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        tokenizer.padding_side = side
        with torch.random.fork_rng():  # held-out sampling must not move the training run's random stream
            torch.manual_seed(self.seed * 1000 + step)
            ids = model.generate(
                **prompts,
                do_sample=True,
                temperature=trainer.args.temperature,
                top_p=1.0,
                top_k=0,
                max_new_tokens=setup.completion_len,
                pad_token_id=tokenizer.pad_token_id,
            )
        completion = ids[:, prompts.input_ids.shape[1] :]
        is_eos = completion == tokenizer.eos_token_id
        mask = (is_eos.cumsum(-1) - is_eos.long()) == 0  # up to and including the first EOS
        attention = torch.cat([prompts.attention_mask, mask.long()], dim=1)
        n = completion.shape[1]

        def logprobs(m: torch.nn.Module) -> torch.Tensor:
            logits = m(input_ids=ids, attention_mask=attention).logits[:, -n - 1 : -1].float()
            return torch.log_softmax(logits / trainer.args.temperature, -1)

        sequence_kl = (exact_kl(logprobs(model), logprobs(trainer.ref_model)) * mask).sum(-1)
        texts = tokenizer.batch_decode(torch.where(mask, completion, tokenizer.pad_token_id), skip_special_tokens=True)
        rewards = exact_number_reward(texts, answer=self.answers)
        self.rows.append(
            {"step": step, "sequence_kl": sequence_kl.mean().item(), "reward": sum(rewards) / len(rewards)}
        )
        model.train(was_training)

    def on_train_begin(self, args, state, control, **kwargs):
        self.evaluate(0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.setup.eval_every == 0 or state.global_step == args.max_steps:
            self.evaluate(state.global_step)


def train_one(setup: Setup, estimator: str, gradient: str, seed: int, workdir: Path, model: str) -> dict:
    args = TIKEConfig(
        output_dir=str(workdir / f"{estimator}-{gradient}-{seed}"),
        kl_estimator=estimator,
        kl_gradient=gradient,
        tike_top_k=16,
        tike_tail="mc",
        beta=setup.beta,
        max_steps=setup.steps,
        per_device_train_batch_size=setup.batch,
        num_generations=setup.generations,
        max_completion_length=setup.completion_len,
        learning_rate=setup.learning_rate,
        lr_scheduler_type="constant",
        gradient_checkpointing=False,  # a 135M model needs no memory saving; checkpointing recomputes every forward
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = TIKEGRPOTrainer(
        model=model,
        reward_funcs=exact_number_reward,
        args=args,
        train_dataset=arithmetic_dataset(2000, seed=seed),
        processing_class=AutoTokenizer.from_pretrained(model),
    )
    evaluation = HeldOutEval(trainer, setup, seed)
    trainer.add_callback(evaluation)
    trainer.remove_callback(PrinterCallback)  # the runs' logs go to the result file
    started = time.monotonic()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {
        "estimator": estimator,
        "kl_gradient": gradient,
        "seed": seed,
        "wall_s": round(time.monotonic() - started, 1),
        "train": [{"step": h["step"], "reward": h["reward"], "kl": h.get("kl")} for h in logs],
        "held_out": evaluation.rows,
    }


def summarise(runs: list[dict]) -> list[dict]:
    """Per configuration, the mean over seeds of the final held-out reward and sequence KL."""
    out = []
    for estimator, gradient in CONFIGS:
        mine = [r for r in runs if (r["estimator"], r["kl_gradient"]) == (estimator, gradient)]
        if not mine:
            continue
        finals = [r["held_out"][-1] for r in mine]
        summary = {"estimator": estimator, "kl_gradient": gradient, "runs": len(mine)}
        summary["final_reward"] = sum(f["reward"] for f in finals) / len(finals)
        summary["final_sequence_kl"] = sum(f["sequence_kl"] for f in finals) / len(finals)
        summary["per_seed"] = [(f["reward"], f["sequence_kl"]) for f in finals]
        out.append(summary)
    return out


def markdown(result: dict) -> str:
    lines = [
        "| estimator | kl_gradient | runs | final held-out reward | final held-out sequence KL | per seed "
        "(reward, KL) |",
        "|---|---|---|---|---|---|",
    ]
    for s in result["summary"]:
        seeds = ", ".join(f"({r:.3f}, {kl:.3f})" for r, kl in s["per_seed"])
        lines.append(
            f"| {s['estimator']} | {s['kl_gradient']} | {s['runs']} | {s['final_reward']:.3f} | "
            f"{s['final_sequence_kl']:.3f} | {seeds} |"
        )
    setup = result["setup"]
    lines.append("")
    lines.append(
        f"beta {setup['beta']}, {setup['steps']} steps of {setup['batch']} completions ({setup['generations']} per "
        f"prompt, at most {setup['completion_len']} tokens), lr {setup['learning_rate']}; held-out: "
        f"{setup['eval_prompts']} prompts x {setup['eval_samples']} samples every {setup['eval_every']} steps; "
        f"wall time {result['wall_s'] / 60:.1f} min on {result['machine']}."
    )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(CONFIGS, ("tab:blue", "tab:cyan", "tab:red", "tab:orange")))
    fig, (ax_r, ax_kl, ax_p) = plt.subplots(1, 3, figsize=(14, 3.8))
    for run in result["runs"]:
        key = (run["estimator"], run["kl_gradient"])
        first_seed = run["seed"] == result["setup"]["seeds"][0]
        label = f"{key[0]}, {key[1]}" if first_seed else None
        style = dict(color=colors[key], alpha=0.8, lw=1.2, ls="-" if first_seed else "--")
        ax_r.plot([h["step"] for h in run["held_out"]], [h["reward"] for h in run["held_out"]], label=label, **style)
        ax_kl.plot([h["step"] for h in run["held_out"]], [h["sequence_kl"] for h in run["held_out"]], **style)
        final = run["held_out"][-1]
        ax_p.scatter(
            final["sequence_kl"], final["reward"], color=colors[key], marker="o" if key[1] == "token" else "^"
        )
    ax_r.set(xlabel="step", ylabel="held-out reward", title="reward (seed 0 solid, seed 1 dashed)")
    ax_kl.set(xlabel="step", ylabel="nats per completion", title="held-out sequence KL(π_θ‖π_ref)")
    ax_p.set(xlabel="final held-out sequence KL", ylabel="final held-out reward", title="final (KL, reward) per run")
    ax_r.legend(fontsize=8)
    fig.suptitle(f"kl_gradient token vs sequence, beta = {result['setup']['beta']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(setup: Setup, workdir: Path) -> dict:
    model = setup.model or str(embedded_model_path())
    started = time.monotonic()
    runs = []
    with tqdm(total=len(setup.configs) * len(setup.seeds), desc="training runs", unit="run") as bar:
        for estimator, gradient in setup.configs:
            for seed in setup.seeds:
                runs.append(train_one(setup, estimator, gradient, seed, workdir, model))
                final = runs[-1]["held_out"][-1]
                bar.write(
                    f"{estimator}, {gradient}, seed {seed}: {runs[-1]['wall_s']:.0f} s; held-out reward "
                    f"{final['reward']:.3f}, sequence KL {final['sequence_kl']:.3f}"
                )
                bar.update()
    return {
        "setup": asdict(setup),
        "runs": runs,
        "summary": summarise(runs),
        "wall_s": time.monotonic() - started,
        "machine": f"{torch.get_num_threads()} CPU threads" if not torch.cuda.is_available() else "CUDA",
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny test model, 2 steps, 1 seed")
    parser.add_argument("--model", default=None, help="a local model folder (default: the embedded model)")
    parser.add_argument("--beta", type=float, default=Setup.beta)
    parser.add_argument("--steps", type=int, default=Setup.steps)
    parser.add_argument(
        "--configs",
        nargs="+",
        default=[f"{e}:{g}" for e, g in CONFIGS],
        help="estimator:gradient pairs to run, e.g. rb:token (default: all four)",
    )
    add_run_arguments(parser, "kl_gradient")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "kl_gradient_training.png"))
    parser.add_argument("--workdir", default=None, help="where the runs write (default: a temporary folder)")
    args = parser.parse_args(argv)
    configs = tuple(tuple(pair.split(":", 1)) for pair in args.configs)
    setup = Setup(model=args.model, beta=args.beta, steps=args.steps, configs=configs)
    if args.smoke:
        smoke = dict(steps=1, batch=4, generations=4, seeds=(0,), eval_every=1, eval_prompts=2, eval_samples=2)
        setup = replace(setup, **smoke)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(setup, Path(args.workdir or tmp))
    write_run(Path(args.out_dir), args.run_name, result, markdown(result))
    plot(result, Path(args.plot))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
