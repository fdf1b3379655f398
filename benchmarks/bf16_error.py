"""How accurate is each estimator's KL value and gradient when the heads run in bf16?

Each estimator is computed twice on the same inputs: by the trainer's path (our tiled heads, or
TRL's head for the sampled-token estimators) from bf16 hidden states and bf16 weights, and in
fp64 from the *same* bf16 numbers, with the *same* top-k set and the *same* sampled token, so
truncation and sampling do not count as error, only arithmetic does. The policy is near the
reference: the reference's head and hidden states are the policy's plus a perturbation of size
eps, swept so the true per-token KL spans 1e-4 ... 1e-1. Logits are realistic in scale (top
logits 20-30, where bf16 rounds each one by ~0.03-0.06) and in shape (a few tokens hold most of
the mass).

    python -m benchmarks.bf16_error                 # ~1 min on 2 CPU cores
    python -m benchmarks.bf16_error --smoke         # tiny, seconds (the test suite runs it)

Writes `benchmarks/results/bf16_error/<UTC date>-<run name>.json` and `.md`: per estimator and
KL level, the relative error of the mean value (bias), the per-token RMS error relative to the
RMS true value, and the relative error of the gradient with respect to the policy's hidden states;
plus the time of the tike head (forward + backward) on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest.mock import patch

import torch
import torch.nn.functional as F

from tike_trl.estimators import TopKLogProbs, exact_kl, sampled_token_kl, truncated_kl
from tike_trl.kernels import HeadSpec, RefHead, policy_head, reference_logprobs
from tike_trl.kernels import policy as kernel_policy
from tike_trl.kernels import reference as kernel_reference
from tike_trl.kernels.precise import needs_exact_columns

from .run_files import add_run_arguments, write_run

ESTIMATORS = ("k1", "k2", "k3", "rb", "tike-drop", "tike-sampled", "tike-mc")


@dataclass(frozen=True)
class Setup:
    vocab: int = 32768
    hidden: int = 256
    tokens: int = 256
    top_k: int = 16
    eps: tuple[float, ...] = (0.0092, 0.029, 0.092, 0.29)  # calibrated to true KLs of ~1e-4 ... 1e-1
    seed: int = 0


SMOKE = Setup(vocab=2048, hidden=64, tokens=32, top_k=8, eps=(0.027, 0.27))


def make_heads(setup: Setup, eps: float) -> tuple[torch.Tensor, ...]:
    """bf16 (hidden, weight) of the policy and of a reference eps away. Logits: a shared offset
    (one hidden coordinate against a constant weight column) puts the top ones at 20-30; per row,
    4 tokens the context favours sit 9-14 above the Gaussian rest, so the top-16 hold most of the
    mass, as in a language model."""
    g = torch.Generator().manual_seed(setup.seed)
    d, v, n = setup.hidden, setup.vocab, setup.tokens
    weight = torch.randn(v, d, generator=g) / d**0.5
    weight[:, 0] = 1.0
    favoured = torch.randint(0, v, (n, 4), generator=g)
    boosts = 9.0 + 5.0 * torch.rand(n, 4, 1, generator=g)
    rest = weight[favoured].clone()
    rest[..., 0] = 0.0  # the offset coordinate stays out of the context directions
    direction = rest / rest.pow(2).sum(-1, keepdim=True)  # h·w_f ≈ boost for each favoured f
    hidden = torch.randn(n, d, generator=g) + (boosts * direction).sum(1)
    hidden[:, 0] = 14.0
    ref_weight = weight + eps * torch.randn(v, d, generator=g) / d**0.5
    ref_weight[:, 0] = 1.0
    ref_hidden = hidden + eps * torch.randn(n, d, generator=g)
    ref_hidden[:, 0] = 14.0
    return tuple(t.to(torch.bfloat16) for t in (hidden, weight, ref_hidden, ref_weight))


def _fp64_logprobs(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(hidden.double() @ weight.double().t(), dim=-1)


def estimates(hidden, weight, ref_hidden, ref_weight, sampled, top_k: int) -> dict[str, tuple]:
    """Per estimator: (value from the trainer's path [n], value in fp64 [n], gradient of the summed
    value w.r.t. the policy's hidden states from each path)."""
    spec = HeadSpec()
    out = {}
    for name in ESTIMATORS:
        h = hidden.clone().requires_grad_()
        h64 = hidden.double().requires_grad_()
        logp64 = F.log_softmax(h64 @ weight.double().t(), dim=-1)
        logq64 = _fp64_logprobs(ref_hidden, ref_weight)
        if name == "rb":
            head = policy_head(h, weight, None, sampled, spec, ref=RefHead(ref_hidden, ref_weight))
            ours, exact = head.exact_kl, exact_kl(logp64, logq64)
        elif name in ("k1", "k2", "k3"):  # both label log-probs from TRL's head arithmetic, as in the trainer
            head = policy_head(h, weight, None, sampled, spec)
            logq_o = policy_head(ref_hidden, ref_weight, None, sampled, spec).logprob
            ours = sampled_token_kl(head.logprob, logq_o, name)
            ids = sampled[:, None]
            exact = sampled_token_kl(logp64.gather(1, ids)[:, 0], logq64.gather(1, ids)[:, 0], name)
        else:
            head = policy_head(h, weight, None, sampled, spec, top_k=top_k)
            columns = torch.cat([head.topk_indices, sampled[:, None]], dim=1)
            logq = reference_logprobs(ref_hidden, ref_weight, None, columns, spec)
            tail = name.removeprefix("tike-")
            logps = TopKLogProbs(
                policy=head.topk_logprobs,
                ref=logq[:, :-1],
                policy_sampled=head.sampled_logprob,
                ref_sampled=logq[:, -1],
                sampled_in_topk=(head.topk_indices == sampled[:, None]).any(-1),
            )
            ones = torch.ones(len(sampled), dtype=torch.float64)
            ours = truncated_kl(logps, ones.float(), tail)
            exact = truncated_kl(TopKLogProbs.gather(logp64, logq64, head.topk_indices, sampled), ones, tail)
        (grad,) = torch.autograd.grad(ours.sum(), h)
        (grad64,) = torch.autograd.grad(exact.sum(), h64)
        out[name] = (ours.detach().double(), exact.detach(), grad.double(), grad64)
    return out


def errors(ours: torch.Tensor, exact: torch.Tensor, grad: torch.Tensor, grad64: torch.Tensor) -> dict:
    return {
        "true_mean": exact.mean().item(),
        "mean_rel_error": abs((ours.mean() - exact.mean()) / exact.mean()).item(),
        "token_rel_rms_error": ((ours - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt()).item(),
        "grad_rel_error": ((grad - grad64).norm() / grad64.norm()).item(),
    }


VARIANTS = ("tiles only", "exact columns")


@contextmanager
def variant(name: str) -> Iterator[None]:
    """'exact columns': the kernels as shipped; 'tiles only': the log-probs at S ∪ {o} read off
    the compute-dtype tiles, as before the exact columns were added (the same code, switched)."""

    def switch(dtype: torch.dtype) -> bool:
        return name == "exact columns" and needs_exact_columns(dtype)

    with (
        patch.object(kernel_policy, "needs_exact_columns", switch),
        patch.object(kernel_reference, "needs_exact_columns", switch),
    ):
        yield


def _tike_head_step(hidden, weight, ref_hidden, ref_weight, sampled, top_k: int) -> float:
    h = hidden.clone().requires_grad_()
    start = time.perf_counter()
    head = policy_head(h, weight, None, sampled, HeadSpec(), top_k=top_k)
    columns = torch.cat([head.topk_indices, sampled[:, None]], dim=1)
    logq = reference_logprobs(ref_hidden, ref_weight, None, columns)
    (head.topk_logprobs.exp() * (head.topk_logprobs - logq[:, :-1])).sum().backward()
    return time.perf_counter() - start


def head_times(setup: Setup, repeats: int = 7) -> dict[str, float]:
    """Median seconds of the tike head (policy top-k pass + reference log-probs, forward and
    backward) in bf16 at this setup's size, with the exact columns and without them (the tiles'
    rounded logits, as before they were added), interleaved in one process."""
    tensors = make_heads(setup, setup.eps[0])
    sampled = torch.randint(0, setup.vocab, (setup.tokens,), generator=torch.Generator().manual_seed(1))
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for i in range(repeats + 1):
        for name in VARIANTS:
            with variant(name):
                seconds = _tike_head_step(*tensors, sampled, setup.top_k)
            if i:  # the first round warms up
                times[name].append(seconds)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run(setup: Setup) -> dict:
    rows = []
    for eps in setup.eps:
        hidden, weight, ref_hidden, ref_weight = make_heads(setup, eps)
        with torch.no_grad():
            logp = _fp64_logprobs(hidden, weight)
        sampled = torch.multinomial(logp.exp(), 1, generator=torch.Generator().manual_seed(2))[:, 0]
        top_mass = logp.topk(setup.top_k, dim=-1).values.exp().sum(-1).mean().item()
        top_logit = (hidden.double() @ weight.double().t()).max(-1).values.mean().item()
        for kernels in VARIANTS:
            with variant(kernels):
                results = estimates(hidden, weight, ref_hidden, ref_weight, sampled, setup.top_k)
            for name, (ours, exact, grad, grad64) in results.items():
                context = {"eps": eps, "estimator": name, "kernels": kernels, "topk_mass": top_mass}
                rows.append({**context, "top_logit": top_logit, **errors(ours, exact, grad, grad64)})
    return {"setup": asdict(setup), "rows": rows, "tike_head_time_s": head_times(setup), "torch": torch.__version__}


def markdown(result: dict) -> str:
    """Per true-KL level and estimator: the three errors with the tiles' rounded logits → with the
    exact columns (only TIKE reads the columns, so only its rows change)."""
    table: dict[float, dict[str, dict[str, dict]]] = {}
    for row in result["rows"]:
        table.setdefault(row["eps"], {}).setdefault(row["estimator"], {})[row["kernels"]] = row
    lines = [
        "| true KL per token (rb) | estimator | true mean | mean rel. error | token rel. RMS error | "
        "gradient rel. error |",
        "|---|---|---|---|---|---|",
    ]
    for rows in table.values():
        kl = rows["rb"]["exact columns"]["true_mean"]
        for name, by_kernels in rows.items():
            before, after = by_kernels["tiles only"], by_kernels["exact columns"]

            def cell(key: str) -> str:
                if name.startswith("tike"):
                    return f"{100 * before[key]:.2f}% → {100 * after[key]:.2f}%"
                return f"{100 * after[key]:.2f}%"

            lines.append(
                f"| {kl:.2e} | {name} | {after['true_mean']:.3e} | {cell('mean_rel_error')} | "
                f"{cell('token_rel_rms_error')} | {cell('grad_rel_error')} |"
            )
    s, times = result["setup"], result["tike_head_time_s"]
    first, exact, tiles = result["rows"][0], times["exact columns"], times["tiles only"]
    lines.append("")
    lines.append(
        f"vocabulary {s['vocab']}, hidden {s['hidden']}, {s['tokens']} tokens, k = {s['top_k']}; top-k mass "
        f"{first['topk_mass']:.3f}, mean top logit {first['top_logit']:.1f}. tike head forward + backward, bf16, "
        f"one CPU thread (median of 7, interleaved): {1000 * exact:.1f} ms with the exact columns, "
        f"{1000 * tiles:.1f} ms without ({exact / tiles:.2f}x; torch {result['torch']})."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    add_run_arguments(parser, "bf16_error")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(SMOKE if args.smoke else Setup())
    write_run(Path(args.out_dir), args.run_name, result, markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
