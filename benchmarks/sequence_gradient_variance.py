"""Exact bias and variance of the sequence-level KL gradient (`kl_gradient="sequence"`), per estimator and
baseline, by enumeration on the tabular model of the tests (V = 5, T = 3: all 125 sequences, all 125²
ordered pairs; fp64, no sampling).

For each estimator g(y) is one completion's gradient of `sequence_kl_surrogate` with respect to the
logit tables; the target is ∇KL(π_θ(y)‖π_ref(y)). Linearity does the baselines: with A = ∇surrogate
(b = 0) and C_t = ∇log π(o_t|h_t), a baseline b_t gives g(b) = A − Σ_t C_t·r_t·b_t. Reported:

- on-policy, per table: E‖ḡ − ∇KL‖² / ‖∇KL‖² of the mean ḡ over a batch of 2 completions (the
  leave-one-out baseline needs 2; the others are i.i.d., so Var/2 + bias²), for the token-level
  gradient (TRL's: no future term), the sequence gradient without a baseline, with the leave-one-out
  mean of F_t (per position, or one scalar per completion: the other's mean of F_t over positions), with
  the running mean's limit (E[F_t] per position, or its mean over positions), and with the whole return
  Σ_s v_s in place of F_t (the KL-in-the-reward placement, leave-one-out);
- off-policy (sequences from π_old, old_logprobs = log π_old): ‖E[g] − ∇KL‖ / ‖∇KL‖ with the token's
  ratio sg(r_t) (what the surrogate does), with PPO's clipped weight, with prefix ratios;
- loss types (completions ended by EOS): the sum aggregation against the length-normalised ones.

    python -m benchmarks.sequence_gradient_variance            # seconds
    python -m benchmarks.sequence_gradient_variance --smoke    # one table (the test suite runs it)

Writes `benchmarks/results/sequence_gradient_variance/<UTC date>-<run name>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tike_trl.estimators import SCORE_FROM_OWN_POSITION, future_kl, kl_estimate, sequence_kl_surrogate

from .run_files import add_run_arguments, write_run

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tabular model of the enumeration tests
from tabular import (  # noqa: E402
    SEQUENCES,
    T,
    batch_logits,
    eos_mask,
    position_gradients,
    probabilities,
    sequence_kl,
    table_gradients,
    tables,
    token_logprobs,
)

ESTIMATORS = {
    "k1": dict(estimator="k1"),
    "k3": dict(estimator="k3", bias_correction=True),  # TRL's ratio
    "rb": dict(estimator="rb"),
    "tike-mc": dict(estimator="tike", top_k=2, tail="mc"),
    "tike-drop": dict(estimator="tike", top_k=2, tail="drop"),
    "tike-sampled": dict(estimator="tike", top_k=2, tail="sampled"),
}
EXACT = ("k1", "k3", "rb", "tike-mc")
# the variance table's rows: (label, estimator, shift). k1's local gradient ∇ℓ(o_t) = ∇log π(o_t) is a score
# term with coefficient 1, so its whole coefficient is 1 + F_t; the shifted row's baselines estimate that
VARIANCE_ROWS = [(name, name, 0.0) for name in ESTIMATORS]
VARIANCE_ROWS.insert(1, ("k1, baseline of 1 + F_t", "k1", 1.0))
BASELINES = ("token", "none", "loo", "loo-seq", "mean", "mean-seq", "return-loo")
BASELINE_NAMES = {
    "token": "token level (no future term)",
    "none": "sequence, no baseline",
    "loo": "sequence, leave-one-out mean of F_t per position",
    "loo-seq": "sequence, leave-one-out mean of the other completions' mean of F_t over positions (one scalar)",
    "mean": "sequence, E[F_t] per position (the running mean's limit)",
    "mean-seq": "sequence, E[F_t] averaged over positions (one scalar)",
    "return-loo": "KL in the reward: the whole return Σ_s v_s in place of F_t, leave-one-out, plus the local term",
}
OFF_POLICY = ("token", "token ratio", "ppo clip", "prefix on score", "prefix ratios")


@dataclass(frozen=True)
class Setup:
    # (seed, near): near=None draws the reference independently (per-token KL ~ 1), else π_ref = π_θ + near·noise
    tables: tuple[tuple[int, float | None], ...] = ((0, None), (1, None), (2, None), (0, 0.3), (1, 0.3), (2, 0.3))
    deltas: tuple[float, ...] = (0.1, 0.3, 1.0)  # π_old's logits = π_θ's + delta·noise
    off_policy_estimators: tuple[str, ...] = ("rb", "tike-mc")
    ppo_epsilon: float = 0.2
    batches: tuple[int, ...] = (2, 8)  # batch sizes the mean gradient is scored at


SMOKE = Setup(tables=((0, None),), deltas=(0.3,))


def pieces(theta, ref, kwargs: dict, old=None, mask=None) -> dict:
    """Per sequence (dim 0) and position (dim 1): the value v_t, the gradient of v_t (the local term),
    C_t = ∇log π(o_t|h_t), F_t as the surrogate forms it, sg(r_t), and the surrogate's own gradient,
    which is checked against Σ_t local_t + Σ_t C_t·r_t·F_t."""
    logits, ref_logits = batch_logits(theta), batch_logits(ref)
    mask = torch.ones(SEQUENCES.shape, dtype=torch.float64) if mask is None else mask
    old_logprobs = None if old is None else token_logprobs(old)
    values = kl_estimate(logits, ref_logits, SEQUENCES, old_logprobs=old_logprobs, **kwargs) * mask
    logp_o = torch.log_softmax(logits, -1).gather(-1, SEQUENCES.unsqueeze(-1)).squeeze(-1) * mask
    future = future_kl(values, mask, inclusive=kwargs["estimator"] in SCORE_FROM_OWN_POSITION)
    ratio = torch.ones_like(future) if old is None else (logp_o.detach() - old_logprobs).exp() * mask
    surrogate = sequence_kl_surrogate(logits, ref_logits, SEQUENCES, mask, old_logprobs=old_logprobs, **kwargs)
    out = dict(
        weights=probabilities(theta if old is None else old),
        values=values.detach(),
        local=position_gradients(values, logits),
        score=position_gradients(logp_o, logits),
        future=future,
        ratio=ratio,
        grad=table_gradients(surrogate, logits),
    )
    rebuilt = out["local"].sum(1) + torch.einsum("ntp,nt->np", out["score"], ratio * future)
    if not torch.allclose(rebuilt, out["grad"], atol=1e-12, rtol=1e-10):
        raise RuntimeError(f"the decomposition does not reproduce sequence_kl_surrogate's gradient ({kwargs})")
    return out


def moments(weights: torch.Tensor, grads: torch.Tensor, target: torch.Tensor) -> dict:
    """bias = ‖E[g] − target‖, var = E‖g − E[g]‖² under `weights` (summing to 1 over dim 0)."""
    mean = weights @ grads
    var = (weights * (grads - mean).pow(2).sum(-1)).sum()
    return {"bias": (mean - target).norm().item(), "var": var.item()}


def leave_one_out_moments(weights, a, y, z, batch: int, target) -> dict:
    """Bias and variance of ḡ = (1/B)·Σ_i [a_i − Σ_t y_{i,t}·mean_{j≠i} z_{j,t}] over a batch of B i.i.d.
    completions, exactly, from moments over single completions (E[y_t] = 0: y is a score term).

    With u = a − E[a], W = Σ_{i≠j} y_i z_j / (B(B−1)): E[ḡ] = E[a] and
    E‖ḡ − E[a]‖² = E‖u‖²/B − 2·Σ_t E[⟨y_t, u⟩]·E[z_t]/B
                   + (Σ_ts G_ts S_ts + Σ_ts ⟨H_ts, H_st⟩ + (B − 2)·E[z]ᵀ G E[z]) / (B(B − 1)),
    G_ts = E⟨y_t, y_s⟩, S_ts = E[z_t z_s], H_ts = E[y_t z_s] (every other pairing has a lone E[y] = 0)."""
    mean = weights @ a
    u = a - mean
    zbar = weights @ z
    gram = torch.einsum("n,ntp,nsp->ts", weights, y, y)
    second = torch.einsum("n,nt,ns->ts", weights, z, z)
    cross = torch.einsum("n,ntp,ns->tsp", weights, y, z)
    w2 = (gram * second).sum() + torch.einsum("tsp,stp->", cross, cross) + (batch - 2) * zbar @ gram @ zbar
    var = (weights * u.pow(2).sum(-1)).sum() / batch
    var = var - 2 * torch.einsum("n,ntp,np->t", weights, y, u) @ zbar / batch + w2 / (batch * (batch - 1))
    return {"bias": (mean - target).norm().item(), "var": var.item()}


def pair_moments(weights, a, y, z, target) -> dict:
    """The same at B = 2 by brute force over all ordered pairs (the check of `leave_one_out_moments`)."""
    first = a[:, None] - torch.einsum("itp,jt->ijp", y, z)  # [i, j]: i's gradient, its baseline from j
    pair = (first + first.transpose(0, 1)) / 2
    return moments((weights[:, None] * weights[None, :]).reshape(-1), pair.reshape(-1, pair.shape[-1]), target)


def variance_table(theta, ref, batches: tuple[int, ...]) -> dict:
    """Per estimator and placement/baseline: the bias and the variance of one completion's gradient
    (for a leave-one-out baseline, B·Var of the mean over a batch of B), and the relative MSE of the
    mean over each batch size."""
    target = torch.autograd.grad(sequence_kl(theta, ref), theta)[0].reshape(-1)
    scale = target.pow(2).sum().item()
    out = {}
    for label, name, shift in VARIANCE_ROWS:
        p = pieces(theta, ref, ESTIMATORS[name])
        w, a, c = p["weights"], p["grad"], p["score"]
        f = p["future"] + shift
        local = p["local"].sum(1)
        total = p["values"].sum(1, keepdim=True).expand_as(f)
        mean_f = w @ f  # E[F_t], the running mean's limit
        singles = {
            "token": (local, None),
            "none": (a, None),
            "mean": (a - torch.einsum("ntp,t->np", c, mean_f), None),
            "mean-seq": (a - c.sum(1) * mean_f.mean(), None),
            "loo": (a, f),
            "loo-seq": (a, f.mean(1, keepdim=True).expand_as(f)),
            "return-loo": (local + torch.einsum("ntp,nt->np", c, total), total),  # the return in place of F_t
        }
        rows = {}
        for key, (grads, baseline_from) in singles.items():
            row = {}
            for batch in batches:
                if baseline_from is None:
                    m = moments(w, grads, target)
                    m["var"] /= batch
                else:
                    m = leave_one_out_moments(w, grads, c, baseline_from, batch, target)
                    if batch == 2:
                        check = pair_moments(w, grads, c, baseline_from, target)
                        if abs(check["var"] - m["var"]) > 1e-9 * (1 + check["var"]):
                            raise RuntimeError(f"{name} {key}: the B = 2 moments disagree with brute force")
                row[f"mse{batch}"] = (m["var"] + m["bias"] ** 2) / scale
                row[f"var_per_completion{batch}"] = m["var"] * batch / scale
            row["rel_bias"] = m["bias"] / scale**0.5
            rows[key] = row
        out[label] = rows
    return {"grad_norm": scale**0.5, "kl": sequence_kl(theta, ref).item(), "estimators": out}


def perturbed(theta: torch.Tensor, delta: float, seed: int = 7) -> torch.Tensor:
    """π_old's logit table: π_θ's plus delta·N(0, 1) noise."""
    g = torch.Generator().manual_seed(seed)
    return theta.detach() + delta * torch.randn(theta.shape, generator=g, dtype=theta.dtype)


def off_policy_table(theta, ref, setup: Setup) -> list[dict]:
    """Sequences from π_old; the bias of E_old[g] against ∇KL(π_θ‖π_ref) for each weighting of the
    sequence gradient (token: the local part only, as a token-level loss)."""
    target = torch.autograd.grad(sequence_kl(theta, ref), theta)[0].reshape(-1)
    rows = []
    for delta in setup.deltas:
        old = perturbed(theta, delta)
        distance = sequence_kl(old, theta.detach()).item()  # KL(π_old(y)‖π_θ(y))
        for name in setup.off_policy_estimators:
            kwargs = ESTIMATORS[name]
            if kwargs["estimator"] in SCORE_FROM_OWN_POSITION:
                raise ValueError(f"{name}: the prefix weights below assume F_t from s > t")
            p = pieces(theta, ref, kwargs, old=old)
            w, c, f, r, v = p["weights"], p["score"], p["future"], p["ratio"], p["values"]
            log_r = r.log()
            before = (log_r.cumsum(-1) - log_r).exp()  # ρ_{t−1} = Π_{u<t} r_u
            through = log_r.cumsum(-1).exp()  # ρ_t
            eps = setup.ppo_epsilon
            # PPO's weight for an advantage −F_t: r_t, or 0 where the clip holds it (F_t<0, r>1+ε; F_t>0, r<1−ε)
            clipped = ((f < 0) & (r > 1 + eps)) | ((f > 0) & (r < 1 - eps))
            local_before = torch.einsum("ntp,nt->np", p["local"], before)
            grads = {
                "token": p["local"].sum(1),
                "token ratio": p["grad"],
                "ppo clip": p["local"].sum(1) + torch.einsum("ntp,nt->np", c, torch.where(clipped, 0.0, r) * f),
                "prefix on score": local_before + torch.einsum("ntp,nt->np", c, through * f),
                "prefix ratios": local_before
                + torch.einsum("ntp,nt->np", c, future_kl(before * v, torch.ones_like(v))),
            }
            row = {"delta": delta, "kl_old_theta": distance, "estimator": name, "max_ratio": r.max().item()}
            row["clipped_share"] = (w[:, None] * clipped.double()).sum().item() / T
            for key, g in grads.items():
                m = moments(w, g, target)
                row[key] = {
                    "rel_bias": m["bias"] / target.norm().item(),
                    "rel_var": m["var"] / target.pow(2).sum().item(),
                }
            rows.append(row)
    return rows


def loss_type_table(theta, ref) -> dict:
    """Completions end at their first EOS (token 0). Per exact estimator: the expected gradient under
    each aggregation against ∇KL of the ended sequences: its cosine and its error after the best
    rescaling (a pure rescaling is harmless: β absorbs it)."""
    mask = eos_mask()
    length = mask.sum(-1)
    target = torch.autograd.grad(sequence_kl(theta, ref, mask), theta)[0].reshape(-1)
    rows = {}
    for name in EXACT:
        p = pieces(theta, ref, ESTIMATORS[name], mask=mask)
        w, a = p["weights"], p["grad"]
        pair_tokens = length[:, None] + length[None, :]
        aggregated = {
            "sum (dr_grpo, luspo)": w @ a,
            "per completion 1/|y| (grpo, sapo)": w @ (a / length[:, None]),
            "per batch of 2, 1/Σ|y| (bnpo; dapo's 1/tokens in the generation batch)": (
                (w[:, None, None] * w[None, :, None] * (a[:, None] + a[None, :]) / pair_tokens[..., None]).sum((0, 1))
            ),
        }
        rows[name] = {}
        for key, g in aggregated.items():
            cosine = (g @ target / (g.norm() * target.norm())).item()
            best = (g @ target / target.pow(2).sum()) * target
            rows[name][key] = {"cosine": cosine, "rel_error_after_rescaling": ((g - best).norm() / g.norm()).item()}
    return {"mean_length": (probabilities(theta) @ length).item(), "estimators": rows}


def run(setup: Setup) -> dict:
    result = {"setup": asdict(setup), "tables": [], "torch": torch.__version__}
    for seed, near in setup.tables:
        theta, ref = tables(seed, near)
        entry = {"seed": seed, "near": near, **variance_table(theta, ref, setup.batches)}
        if (seed, near) == setup.tables[0]:
            entry["off_policy"] = off_policy_table(theta, ref, setup)
            entry["loss_types"] = loss_type_table(theta, ref)
        result["tables"].append(entry)
    result["best"] = best_baselines(result)
    return result


def best_baselines(result: dict) -> dict:
    """Per estimator, batch size and table, the sequence baseline with the lowest MSE."""
    best = {}
    for entry in result["tables"]:
        for name, rows in entry["estimators"].items():
            for batch in result["setup"]["batches"]:
                candidates = {k: v[f"mse{batch}"] for k, v in rows.items() if k != "token"}
                best.setdefault(name, {}).setdefault(str(batch), []).append(min(candidates, key=candidates.get))
    return best


def _label(entry: dict) -> str:
    if entry["near"] is None:
        return f"seed {entry['seed']}, independent reference"
    return f"seed {entry['seed']}, π_ref = π_θ + {entry['near']}·noise"


def markdown(result: dict) -> str:
    batches = result["setup"]["batches"]
    small, large = batches[0], batches[-1]
    columns = [(b, small) for b in BASELINES] + [(b, large) for b in ("none", "mean", "loo")]
    lines = ["Columns (placements and baselines of the KL gradient):", ""]
    lines += [f"- {key}: {text}" for key, text in BASELINE_NAMES.items()] + [""]
    for entry in result["tables"]:
        lines += [
            f"### Variance: {_label(entry)} (sequence KL {entry['kl']:.3f}, ‖∇KL‖ {entry['grad_norm']:.3f})",
            "",
            "E‖ḡ − ∇KL‖² / ‖∇KL‖² of the mean ḡ over a batch of B completions (bold: the lowest sequence-level "
            "one at that B); bias: ‖E[g] − ∇KL‖ / ‖∇KL‖ of the token-level gradient, of the sequence gradient "
            "(with or without a baseline) and of the return placement.",
            "",
            "| estimator | token bias | sequence bias | return bias | "
            + " | ".join(f"{b}, B={batch}" for b, batch in columns)
            + " |",
            "|---" * (4 + len(columns)) + "|",
        ]
        for name, rows in entry["estimators"].items():
            best = {
                batch: min((k for k in rows if k != "token"), key=lambda k: rows[k][f"mse{batch}"])
                for batch in batches
            }
            cells = []
            for b, batch in columns:
                cell = f"{rows[b][f'mse{batch}']:.3f}"
                cells.append(f"**{cell}**" if best[batch] == b else cell)
            bias = f"| {name} | {rows['token']['rel_bias']:.3f} | {rows['none']['rel_bias']:.2g} | "
            bias += f"{rows['return-loo']['rel_bias']:.2g} | "
            lines.append(bias + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### Lowest-MSE sequence baseline per estimator, table by table", ""]
    for name, by_batch in result["best"].items():
        lines.append(f"- {name}: " + "; ".join(f"B={batch}: {', '.join(picks)}" for batch, picks in by_batch.items()))
    first = result["tables"][0]
    lines += [
        "",
        f"### Off-policy bias ({_label(first)}): ‖E_old[g] − ∇KL(π_θ)‖ / ‖∇KL‖",
        "",
        "| δ | KL(π_old‖π_θ) | max r | estimator | " + " | ".join(OFF_POLICY) + " | PPO-clipped tokens |",
        "|---" * (5 + len(OFF_POLICY)) + "|",
    ]
    for row in first["off_policy"]:
        cells = " | ".join(f"{row[k]['rel_bias']:.3f}" for k in OFF_POLICY)
        lines.append(
            f"| {row['delta']} | {row['kl_old_theta']:.3f} | {row['max_ratio']:.2f} | {row['estimator']} | {cells} | "
            f"{100 * row['clipped_share']:.0f}% |"
        )
    lines += ["", "Variance of one completion's gradient / ‖∇KL‖², token ratio → prefix ratios: "]
    lines.append(
        "; ".join(
            f"δ {r['delta']} {r['estimator']} {r['token ratio']['rel_var']:.2f} → {r['prefix ratios']['rel_var']:.2f}"
            for r in first["off_policy"]
        )
    )
    loss = first["loss_types"]
    lines += [
        "",
        f"### Loss types ({_label(first)}, EOS = token 0, E|y| = {loss['mean_length']:.2f}): "
        "the expected gradient against ∇KL of the ended sequences",
        "",
        "| estimator | aggregation | cosine | error after the best rescaling |",
        "|---|---|---|---|",
    ]
    for name, rows in loss["estimators"].items():
        for key, row in rows.items():
            lines.append(f"| {name} | {key} | {row['cosine']:.6f} | {row['rel_error_after_rescaling']:.2e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="one table, one off-policy distance")
    add_run_arguments(parser, "sequence_gradient_variance")
    args = parser.parse_args(argv)
    result = run(SMOKE if args.smoke else Setup())
    write_run(Path(args.out_dir), args.run_name, result, markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
