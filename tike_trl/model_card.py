"""What a trained model's card says about its training: the estimator's tags, the papers to cite and one
sentence naming them. `TIKEGRPOTrainer.create_model_card` passes these to TRL's card (`_tag_names`, `_name`,
`_paper`), which renders the citations as one BibTeX block.

Which papers, by the configuration:
- TIKE (Wang et al., ACL 2026) always: it is this trainer's method, and its `_paper`;
- DeepSeekMath always: GRPO itself, as TRL's `GRPOTrainer` cites it;
- the Rao-Blackwellized paper (Amini et al., NeurIPS 2025) when `kl_estimator="rb"` (its estimator) or
  `kl_gradient="sequence"` (its sequence-level gradient: the later positions' KL as a score-function term);
- the pitfalls paper (Tang and Munos, 2025) whenever the KL term is on (`beta != 0`), whatever the estimator:
  it is the analysis behind every estimator's gradient here (k1's zero expected gradient and k3's reverse-KL
  gradient without TRL's ratio, its §3; and, for all five, the token-level loss holding the history fixed, its
  §4), which the README's estimator table states and tests/test_estimators_*.py check.
"""

from __future__ import annotations

import re
from pathlib import Path

TIKE_TITLE = "Efficient KL Divergence Estimation via Truncated Top-K Integration for Large Language Models"
TIKE_URL = "https://aclanthology.org/2026.acl-long.405/"

TIKE_CITATION = """\
@inproceedings{wang-etal-2026-efficient-kl,
    title     = "Efficient {KL} Divergence Estimation via Truncated Top-K Integration for Large Language Models",
    author    = "Wang, Xinyuan and Jin, Luozhijie and Wang, Bo and Li, Yuan and Yin, Zhangyue and Qiu, Xipeng",
    booktitle = "Proceedings of the 64th Annual Meeting of the {A}ssociation for {C}omputational {L}inguistics (Volume 1: Long Papers)",
    month     = jul,
    year      = "2026",
    address   = "San Diego, California, United States",
    publisher = "Association for Computational Linguistics",
    url       = "https://aclanthology.org/2026.acl-long.405/",
    pages     = "8973--8985",
    ISBN      = "979-8-89176-390-6",
}"""  # noqa: E501 (BibTeX as the ACL Anthology gives it)

# as trl.GRPOTrainer._paper cites it
GRPO_CITATION = """\
@article{shao2024deepseekmath,
    title        = {{DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models}},
    author       = {Zhihong Shao and Peiyi Wang and Qihao Zhu and Runxin Xu and Junxiao Song and Mingchuan Zhang and Y. K. Li and Y. Wu and Daya Guo},
    year         = 2024,
    eprint       = {arXiv:2402.03300},
}"""  # noqa: E501

RB_CITATION = """\
@inproceedings{amini2025better,
    title     = {{Better Estimation of the Kullback--Leibler Divergence Between Language Models}},
    author    = {Afra Amini and Tim Vieira and Ryan Cotterell},
    booktitle = {Advances in Neural Information Processing Systems},
    year      = 2025,
    eprint    = {arXiv:2504.10637},
}"""

PITFALLS_CITATION = """\
@article{tang2025pitfalls,
    title  = {{On a few pitfalls in KL divergence gradient estimation for RL}},
    author = {Yunhao Tang and R{\\'e}mi Munos},
    year   = 2025,
    eprint = {arXiv:2506.09477},
}"""

# TRL's `_paper`: no "id", since TRL links an id to huggingface.co/papers (arXiv ids) and TIKE has none
PAPER = {"title": TIKE_TITLE, "citation": TIKE_CITATION}

RB_URL = "https://huggingface.co/papers/2504.10637"
ESTIMATOR_NAMES = {
    "k1": "the k1 estimator (the sampled token's log-ratio)",
    "k2": "the k2 estimator (half the squared log-ratio)",
    "k3": "the k3 estimator (TRL's default)",
    "rb": f"the exact, Rao-Blackwellized KL ([Amini et al., 2025]({RB_URL}))",
}


def kl_on(args) -> bool:
    return args.beta != 0.0


def tags(args) -> list[str]:
    """The estimator (`kl-tike`, `kl-k3`, ...; `kl-off` at beta 0), for TIKE k and the tail, and
    `kl-gradient-sequence` when the KL's gradient is the sequence-level one."""
    if not kl_on(args):
        return ["kl-off"]
    found = [f"kl-{args.kl_estimator}"]
    if args.kl_estimator == "tike":
        found += [f"tike-k{args.tike_top_k}", f"tike-tail-{args.tike_tail}"]
    if args.kl_gradient == "sequence":
        found.append("kl-gradient-sequence")
    return found


def citation(args) -> str:
    """The BibTeX entries for the card's citation block (TRL renders one block), as the module docstring says."""
    entries = [TIKE_CITATION, GRPO_CITATION]
    if kl_on(args) and (args.kl_estimator == "rb" or args.kl_gradient == "sequence"):
        entries.append(RB_CITATION)
    if kl_on(args):
        entries.append(PITFALLS_CITATION)
    return "\n\n".join(entries)


def description(args) -> str:
    """One sentence: GRPO, and how the KL to the reference was estimated, with links to the papers."""
    grpo = "GRPO ([DeepSeekMath](https://huggingface.co/papers/2402.03300))"
    if not kl_on(args):
        kl = "no KL term (beta = 0)"
    elif args.kl_estimator == "tike":
        kl = (
            f"the KL to the reference estimated by TIKE ([Wang et al., ACL 2026]({TIKE_URL})), "
            f"top-k = {args.tike_top_k}, tail `{args.tike_tail}`, beta = {args.beta:g}"
        )
    else:
        kl = f"the KL to the reference estimated by {ESTIMATOR_NAMES[args.kl_estimator]}, beta = {args.beta:g}"
    if kl_on(args) and args.kl_gradient == "sequence":
        kl += f", and its sequence-level gradient ([Amini et al., 2025]({RB_URL}))"
    return f"{grpo} with {kl}, through tike-trl's `TIKEGRPOTrainer`"


def describe(card_path: Path, trainer_name: str, args) -> None:
    """Put `description` into the card TRL wrote, in place of its bare "trained with <trainer>." sentence."""
    card_path = Path(card_path)
    if not card_path.is_file():
        return
    text = card_path.read_text()
    sentence = re.compile(rf"This model was trained with {re.escape(trainer_name)}\.")
    card_path.write_text(sentence.sub(lambda _: f"This model was trained with {description(args)}.", text, count=1))
