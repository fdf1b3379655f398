"""A trained model's card (README.md, written by TRL with every checkpoint) cites TIKE and names the estimator
in its tags, and cites the Rao-Blackwellized and pitfalls papers where the configuration rests on them."""

from __future__ import annotations

import pytest
import yaml
from trainers import make_trainer

from tike_trl import model_card

TIKE_KEY = "@inproceedings{wang-etal-2026-efficient-kl,"
GRPO_KEY = "@article{shao2024deepseekmath,"
RB_KEY = "@inproceedings{amini2025better,"
PITFALLS_KEY = "@article{tang2025pitfalls,"


def card_of(output_dir) -> tuple[dict, str]:
    """The card's YAML header and its text."""
    text = (output_dir / "README.md").read_text()
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


def test_a_trained_models_card_cites_tike_and_tags_the_estimator(tiny_model_dir, tmp_path):
    trainer = make_trainer(
        tiny_model_dir, tmp_path, kl_estimator="tike", tike_top_k=4, max_steps=1, save_strategy="steps", save_steps=1
    )
    trainer.train()
    header, body = card_of(tmp_path / "out")  # TRL writes it with the checkpoint
    assert {"trl", "grpo", "tike", "kl-tike", "tike-k4", "tike-tail-sampled"} <= set(header["tags"])
    citations = body.split("## Citations", 1)[1]
    assert TIKE_KEY in citations and model_card.TIKE_URL in citations
    assert "Efficient {KL} Divergence Estimation via Truncated Top-K Integration" in citations
    assert GRPO_KEY in citations and PITFALLS_KEY in citations and RB_KEY not in citations
    assert f"TIKE ([Wang et al., ACL 2026]({model_card.TIKE_URL})), top-k = 4, tail `sampled`, beta = 0.05" in body


@pytest.mark.filterwarnings("ignore:beta=0.0 switches the KL term off")
@pytest.mark.parametrize(
    ("overrides", "tags", "cited", "not_cited"),
    [
        (dict(kl_estimator="rb"), {"kl-rb"}, {TIKE_KEY, GRPO_KEY, RB_KEY, PITFALLS_KEY}, set()),
        (dict(kl_estimator="k3"), {"kl-k3"}, {TIKE_KEY, GRPO_KEY, PITFALLS_KEY}, {RB_KEY}),
        (dict(kl_estimator="rb", beta=0.0), {"kl-off"}, {TIKE_KEY, GRPO_KEY}, {RB_KEY, PITFALLS_KEY}),
        (
            dict(kl_estimator="k3", kl_gradient="sequence"),
            {"kl-k3", "kl-gradient-sequence"},
            {TIKE_KEY, GRPO_KEY, RB_KEY, PITFALLS_KEY},
            set(),
        ),
    ],
    ids=["rb", "k3", "beta-0", "k3-sequence"],
)
def test_the_card_follows_the_estimator(tiny_model_dir, tmp_path, overrides, tags, cited, not_cited):
    trainer = make_trainer(tiny_model_dir, tmp_path, **overrides)
    trainer.create_model_card(model_name="tiny", tags="mine")
    header, body = card_of(tmp_path / "out")
    assert tags | {"mine", "tike"} <= set(header["tags"]) and not any(t.startswith("tike-k") for t in header["tags"])
    assert all(key in body for key in cited) and not any(key in body for key in not_cited)
    assert "This model was trained with GRPO ([DeepSeekMath]" in body
    assert ("its sequence-level gradient" in body) == (overrides.get("kl_gradient") == "sequence")
    # the class keeps TIKE as its paper; the estimator's papers join only this trainer's card
    assert type(trainer)._paper["citation"] == model_card.TIKE_CITATION
