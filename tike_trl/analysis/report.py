"""The outputs of `tike-trl analyze`: results.json, report.md and three PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from ..extras import require

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COLORS = {
    "k1": "tab:blue",
    "k3": "tab:orange",
    "rb": "tab:purple",
    "tike-drop": "tab:red",
    "tike-sampled": "tab:pink",
    "tike-mc": "tab:brown",
}
TABLE_SIZES = (1, 5, 10)  # the Rao-Blackwellized paper's table reports M = 1, 5, 10
# the columns of the gradient tables, one per gradient kind
KIND_LABELS = {"token": "token", "seq": "sequence", "seq-loo": "sequence, LOO", "seq-mean": "sequence, pool mean"}
KIND_COLORS = {"token": "tab:gray", "seq": "tab:blue", "seq-loo": "tab:orange", "seq-mean": "tab:green"}
GRADIENT_METRICS = {
    "total_var": "E‖ḡ − Eḡ‖²",
    "norm_var": "Var ‖ḡ‖",
    "cos_to_exact": "cos(Eḡ, exact)",
}


def write_report(results: dict, out_dir: Path) -> list[Path]:
    """Write results.json, report.md and the plots into `out_dir`; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.json", out_dir / "report.md"]
    paths[0].write_text(json.dumps(results, indent=1, default=float))
    for name, plot in (
        ("coverage.png", plot_coverage),
        ("bias_variance.png", plot_bias_variance),
        ("token_profile.png", plot_profile),
        ("gradient_variance.png", plot_gradient_variance),
    ):
        if name == "gradient_variance.png" and not results["gradient"]:
            continue
        fig = plot(results)
        fig.savefig(out_dir / name, dpi=110, bbox_inches="tight")
        paths.append(out_dir / name)
    paths[1].write_text(render_markdown(results))
    return paths


def _num(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.2e}" if x != 0 and abs(x) < 1e-2 else f"{x:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def coverage_markdown(results: dict) -> tuple[str, str]:
    """The coverage tables: by k (TIKE Table 7) and by regime (Table 2)."""
    cov = results["coverage"]
    rows = [
        [
            str(k),
            _num(t["all"]["mean_mass"]),
            _num(t["all"]["mean_abs_tail"]),
            _num(t["all"]["p95_abs_tail"]),
            _num(t["all"]["sampled_in_topk"]),
        ]
        for k, t in cov["table"].items()
    ]
    by_k = _table(["k", "mean m_k", "mean abs ξ_tail", "p95 abs ξ_tail", "o ∈ S_k"], rows)
    rows = []
    for k, t in cov["table"].items():
        for regime, r in t.items():
            if regime != "all":
                rows.append(
                    [
                        str(k),
                        f"m_{k} {regime[1:]}",
                        _num(r["fraction"]),
                        _num(r["mean_mass"]),
                        _num(r["mean_entropy"]),
                        _num(r["mean_abs_tail"]),
                        _num(r["p95_abs_tail"]),
                    ]
                )
    by_regime = _table(["k", "regime", "frac.", "mean m_k", "mean H(π_θ)", "mean abs ξ_tail", "p95 abs ξ_tail"], rows)
    return by_k, by_regime


def bias_variance_markdown(results: dict) -> str:
    bv = results["bias_variance"]
    sizes = bv["sizes"]
    cols = [m for m in TABLE_SIZES if m in sizes] or sizes[:1]
    rows = []
    for name, e in bv["summary"]["estimators"].items():
        cells = [f"{_num(e['mean'][sizes.index(m)])} ± {_num(e['std'][sizes.index(m)])}" for m in cols]
        rows.append([name, "yes" if name in bv["unbiased"] else "no", _num(e["bias"][-1]), *cells])
    return _table(["estimator", "unbiased", f"bias (M={sizes[-1]})", *(f"M={m}: mean ± std" for m in cols)], rows)


def _gradient_name(estimator: str, kind: str) -> str:
    return estimator if kind == "token" else f"{estimator}-{kind}"


def gradient_metric_markdown(results: dict, metric: str) -> str:
    """One metric of the gradient section: a row per estimator, a column per gradient kind."""
    grad = results["gradient"]
    summary, kinds = grad["summary"], grad["kinds"]
    rows = [
        [name, "yes" if name in grad["unbiased_sequence"] else "no"]
        + [_num(summary[_gradient_name(name, kind)][metric]) for kind in kinds]
        for name in grad["estimators"]
    ]
    rows.append(["mc (k1-seq − k1)", "yes", "—", _num(summary["mc-seq"][metric]), "—", "—"])
    return _table(["estimator", "sequence-level unbiased", *(KIND_LABELS[kind] for kind in kinds)], rows)


def gradient_all_rows_markdown(results: dict) -> str:
    """Every row of the gradient section with every statistic."""
    rows = [
        [
            name,
            _num(g["norm_mean"]),
            _num(g["norm_var"]),
            _num(g["total_var"]),
            _num(g["cos_to_exact"]),
            _num(g["cos_to_sequence"]),
        ]
        for name, g in results["gradient"]["summary"].items()
    ]
    return _table(["row", "mean ‖ḡ‖", "Var ‖ḡ‖", "E‖ḡ − Eḡ‖²", "cos(Eḡ, exact)", "cos(Eḡ, rb-seq)"], rows)


def baseline_markdown(results: dict) -> str:
    """Which baseline lowers the sequence-level gradient's variance, per estimator."""
    grad = results["gradient"]
    n = len(grad["prompts"])
    lines = []
    for name in grad["estimators"]:
        effect = grad["baselines"][name]
        parts = [
            f"{KIND_LABELS[kind].split(', ')[1]} ×{_num(effect['relative'][kind]['total_var'])} "
            f"(Var ‖ḡ‖ ×{_num(effect['relative'][kind]['norm_var'])}; lower on {effect['wins'][kind]}/{n} prompts)"
            for kind in ("seq-loo", "seq-mean")
        ]
        lowest = effect["lowest_total_var"]
        verdict = "no baseline is lowest" if lowest == "seq" else f"lowest: {KIND_LABELS[lowest].split(', ')[1]}"
        lines.append(f"- {name}: {'; '.join(parts)}; {verdict}.")
    return "\n".join(lines)


def gradient_markdown(results: dict) -> str:
    """The gradient section's tables: total variance, norm variance and cosine, token vs sequence,
    with and without a baseline; then which baseline helps where."""
    parts = []
    for metric, label in GRADIENT_METRICS.items():
        parts += [f"**{label}**", gradient_metric_markdown(results, metric)]
    parts += [
        "**Baselines**: each sequence-level row's total variance relative to no baseline (averaged over prompts), "
        "and on how many prompts it is lower:",
        baseline_markdown(results),
    ]
    return "\n\n".join(parts)


def render_markdown(results: dict) -> str:
    s, cov, bv = results["setup"], results["coverage"], results["bias_variance"]
    by_k, by_regime = coverage_markdown(results)
    parts = [
        "# tike-trl analyze report",
        f"- policy: {s['policy_name']}\n- reference: {s['ref']}\n"
        f"- {len(bv['prompts'])} prompts × {s['pool']} sampled completions of at most {s['completion_len']} tokens "
        f"(temperature {s['temperature']}); {s['positions']} scored positions, vocabulary {s['vocab_size']}\n"
        f"- {s['bootstrap']} bootstrap resamples; seed {s['seed']}; took {results['timing']['total_s']:.0f} s "
        f"(sampling {results['timing']['sampling_s']:.0f} s, scoring {results['timing']['scoring_s']:.0f} s)",
        "## Top-k coverage and truncation residual (TIKE Table 7, Table 2)",
        f"Over all {s['positions']} positions; m_k is the policy's top-k mass, ξ_tail = exact KL − truncated "
        f"KL (Eq. 11, summed over the tail), o ∈ S_k the share of sampled tokens inside the top-k. Mean exact "
        f"per-token KL: {_num(cov['mean_exact_kl'])} nats. Eq. 12 (exact = truncated + ξ_tail, each side summed "
        f"separately) holds to {cov['identity_max_abs_error']:.1e}.",
        by_k,
        "By regime:",
        by_regime,
        "![coverage](coverage.png)",
        "## Bias and variance of sequence-level KL estimates (TIKE Figure 4, Rao-Blackwellized paper table)",
        f"Per prompt, M sequences are drawn with replacement from the pool and each estimator's per-token values are "
        f"summed over a sequence and averaged over the M sequences; mean ± std over the resamples, then averaged over "
        f"prompts. Ground truth: the exact (rb) estimate over the whole pool, {_num(bv['summary']['truth'])} nats per "
        f"sequence on average. TIKE uses k = {cov['tike_k']}.",
        bias_variance_markdown(results),
        "![bias and variance](bias_variance.png)",
    ]
    if results["gradient"]:
        g = s["gradient_parameters"]
        parts += [
            "## Gradient variance: token vs sequence level, with and without a baseline",
            f"Gradient of the batch's KL term with respect to `{g['name']}` ({g['numel']} parameters: the final norm, "
            f"so that per-sequence gradients come from cached backbone states), over {s['bootstrap']} resampled "
            f"batches of {results['gradient']['batch']} sequences of one prompt (the same batches for every row), "
            f"averaged over prompts. *token*: the gradient of Σ_t v_t with the history fixed (k3 with TRL's ratio "
            f'factor), what a token-level KL loss applies. *sequence* (`kl_gradient="sequence"`): each position '
            f"adds ∇log π(o_t)·(F_t − b_t), F_t = Σ_{{s>t}} v_s (k1: s ≥ t), so that the gradient is the estimator's "
            f"sequence-level one, unbiased for ∇KL(π_θ(y)‖π_ref(y)) for k1, k3, rb and tike-mc; b_t = 0, the "
            f"leave-one-out mean of F_t over the other sequences of the batch (*LOO*), or the pool's mean F_t per "
            f"position (*pool mean*, the limit of a running mean). mc is k1's sequence gradient without k1's own "
            f"zero-mean term ∇log π(o_t). cos compares the expected batch gradient with the exact one: rb's pool "
            f"mean (token level, history fixed) or rb-seq's (sequence level); a LOO row's expectation equals the "
            f"pool-mean row's.",
            gradient_markdown(results),
            "![gradient variance](gradient_variance.png)",
            "All rows (cos(Eḡ, rb-seq): every row against the sequence KL's gradient):",
            gradient_all_rows_markdown(results),
        ]
    parts += [
        "## Token-level probability profile (TIKE Figure 2)",
        f"Along the longest sampled completion of the prompt {results['profile']['prompt']!r}.",
        "![token profile](token_profile.png)",
    ]
    return "\n\n".join(parts) + "\n"


def _figure(**kwargs) -> Figure:
    """A matplotlib Figure, not registered with pyplot (the plot extra: `pip install 'tike-trl[plot]'`)."""
    return require("matplotlib.figure", "the analysis plots").Figure(**kwargs)


def plot_coverage(results: dict) -> Figure:
    cov = results["coverage"]
    ks = [int(k) for k in cov["table"]]
    rows = list(cov["table"].values())
    fig = _figure(figsize=(10, 3.6))
    left, right = fig.subplots(1, 2)
    left.plot(ks, [r["all"]["mean_mass"] for r in rows], "o-", color="tab:red", label="mean top-k mass m_k")
    high = next(key for key in rows[0] if key.startswith("m>="))
    left.plot(ks, [r[high]["fraction"] for r in rows], "s--", color="tab:green", label=f"fraction of positions {high}")
    left.set(xscale="log", xlabel="k", ylim=(0, 1.02), title="Top-k coverage")
    left.set_xticks(ks, [str(k) for k in ks])
    left.legend(loc="lower right")
    right.plot(ks, [r["all"]["mean_abs_tail"] for r in rows], "o-", label="mean |ξ_tail|")
    right.plot(ks, [r["all"]["p95_abs_tail"] for r in rows], "s--", label="p95 |ξ_tail|")
    right.set(xscale="log", yscale="log", xlabel="k", ylabel="nats", title="Truncation residual (exact − top-k KL)")
    right.set_xticks(ks, [str(k) for k in ks])
    right.legend()
    return fig


def _short(prompt: str, width: int = 32) -> str:
    """The prompt's first sentence, cut to `width` characters, for a plot title."""
    first = prompt.split("?")[0] + "?" if "?" in prompt else prompt
    return first if len(first) <= width else first[: width - 1] + "…"


def plot_bias_variance(results: dict) -> Figure:
    bv = results["bias_variance"]
    sizes = bv["sizes"]
    panels = [
        (f"prompt {i + 1}: {_short(p['prompt'])}", p["estimators"], p["truth"])
        for i, p in enumerate(bv["prompts"][:3])
    ]
    panels.append((f"mean over {len(bv['prompts'])} prompts", bv["summary"]["estimators"], bv["summary"]["truth"]))
    fig = _figure(figsize=(4.2 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, estimators, truth) in zip(axes, panels):
        for name, e in estimators.items():
            lo = [m - s for m, s in zip(e["mean"], e["std"])]
            hi = [m + s for m, s in zip(e["mean"], e["std"])]
            exact = name == "rb"
            ax.plot(
                sizes,
                e["mean"],
                color=COLORS.get(name),
                label=name,
                lw=2.5 if exact else 1.5,
                zorder=3 if exact else 2,
            )
            ax.fill_between(sizes, lo, hi, color=COLORS.get(name), alpha=0.12)
        ax.axhline(truth, color="black", ls=":", lw=1, label="rb over the whole pool")
        ax.set(xscale="log", xlabel="sample count M", title=title)
        ax.title.set_fontsize(9)
    axes[0].set_ylabel("sequence KL estimate (nats), mean ± std")
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return fig


def plot_profile(results: dict) -> Figure:
    prof = results["profile"]
    n = len(prof["tokens"])
    fig = _figure(figsize=(max(6.0, 0.28 * n), 3.6))
    ax = fig.subplots()
    x = list(range(n))
    ax.plot(x, prof["topk_mass"], "o-", color="tab:red", label=f"top-{prof['k']} mass")
    ax.plot(x, prof["top1"], "o-", color="tab:green", label="top-1 probability")
    ax.plot(x, prof["p_sampled"], "x", color="tab:gray", label="probability of the sampled token")
    ax.set(ylim=(0, 1.05), ylabel="probability under π_θ", title="Token-level probability profile")
    ax.set_xticks(x, [t.replace("Ġ", "␣").replace("Ċ", "⏎") for t in prof["tokens"]], rotation=90, fontsize=7)
    ax.legend(loc="lower left", fontsize=8)
    return fig


def plot_gradient_variance(results: dict) -> Figure:
    """Per estimator, a bar per gradient kind: total variance and norm variance (log scale) and the
    cosine with the exact gradient."""
    grad = results["gradient"]
    summary, kinds, names = grad["summary"], grad["kinds"], grad["estimators"]
    fig = _figure(figsize=(15, 3.8))
    axes = fig.subplots(1, len(GRADIENT_METRICS))
    width = 0.8 / len(kinds)
    for ax, (metric, label) in zip(axes, GRADIENT_METRICS.items()):
        for j, kind in enumerate(kinds):
            values = [summary[_gradient_name(name, kind)][metric] for name in names]
            positions = [i + (j - (len(kinds) - 1) / 2) * width for i in range(len(names))]
            ax.bar(positions, values, width, color=KIND_COLORS[kind], label=KIND_LABELS[kind])
        if metric != "cos_to_exact":
            ax.set_yscale("log")
        else:
            ax.axhline(1.0, color="black", lw=0.8, ls=":")
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        ax.set_title(label)
    axes[0].set_ylabel(f"batches of {grad['batch']}, mean over prompts")
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return fig
