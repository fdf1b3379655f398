"""The accelerate recipes (tike_trl/recipes/accelerate/*.yaml) launch TIKEGRPOTrainer on 2 processes.

Each launch runs 2 steps on a tiny model with a deterministic rollout and must (a) really run 2
processes (a CPU launch can silently run one, or two independent ones), (b) use the recipe's
backend, and (c) log the same loss, grad norm and KL as one process over the same global batch.
Under ZeRO-3 the LM heads of the policy and of the reference are sharded, so (c) also proves that
the tike/rb heads gathered them: a head missing its weights would crash or give another KL.
"""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from launch import RECIPES, launch, train_in_process

PER_DEVICE = 4  # 2 processes x 4 completions = the one-process batch of 8

RECIPE_BACKENDS = {"ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp2": "FSDP"}


def test_recipes_are_accelerate_configs():
    from accelerate.commands.config.config_args import load_config_from_file

    assert sorted(p.stem for p in RECIPES.glob("*.yaml")) == sorted(RECIPE_BACKENDS)
    for name, backend in RECIPE_BACKENDS.items():
        config = load_config_from_file(str(RECIPES / f"{name}.yaml"))
        assert str(config.distributed_type).split(".")[-1] == backend
        assert (config.num_processes, config.mixed_precision, config.use_cpu) == (8, "bf16", False)
    zero3 = yaml.safe_load((RECIPES / "zero3.yaml").read_text())["deepspeed_config"]
    assert zero3["zero_stage"] == 3 and zero3["zero3_init_flag"]


# The sequence-level runs use no baseline: "loo" and "running_mean" average over the completions
# each process holds, so 2 processes and 1 differ in the baseline (each unbiased), not in the math.
# Their beta and learning rate are higher, so that after step 1 the KL is large enough for the
# future-KL term to move step 2's gradient norm far more than the tolerance (rb 2%, tike 0.07%); the
# larger first step also carries ZeRO-3's rounding further (step 2's grad norm 1.7e-5 off), hence its
# tolerance.
SEQUENCE = "sequence"
SETTINGS = {"token": dict(beta=0.05, learning_rate=5e-2), SEQUENCE: dict(beta=1.0, learning_rate=0.3)}
TOLERANCE = {"token": 1e-5, SEQUENCE: 5e-5}


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory):
    """Per estimator, kl_gradient and settings: the 1-process run over the same global batch (8
    completions per step)."""
    cache: dict[tuple[str, str, str], dict] = {}

    def get(estimator: str, kl_gradient: str = "token", settings: str = "token") -> dict:
        if (estimator, kl_gradient, settings) not in cache:
            cache[estimator, kl_gradient, settings] = train_in_process(
                tiny_model_dir,
                tmp_path_factory.mktemp(f"single-{estimator}-{kl_gradient}-{settings}"),
                kl_estimator=estimator,
                per_device_batch=2 * PER_DEVICE,
                rollout="deterministic",
                kl_gradient=kl_gradient,
                kl_sequence_baseline="none",
                **SETTINGS[settings],
            )
        return cache[estimator, kl_gradient, settings]

    return get


def _launch_and_check(
    recipe, estimator, tiny_model_dir, tmp_path, one_process, distributed_type, cpu=True, kl_gradient="token"
):
    result = launch(
        recipe,
        [
            "--model-dir",
            str(tiny_model_dir),
            "--kl-estimator",
            estimator,
            "--per-device-batch",
            str(PER_DEVICE),
            "--rollout",
            "deterministic",
            "--beta",
            str(SETTINGS[kl_gradient]["beta"]),
            "--learning-rate",
            str(SETTINGS[kl_gradient]["learning_rate"]),
            "--kl-gradient",
            kl_gradient,
            "--kl-sequence-baseline",
            "none",
        ],
        tmp_path,
        cpu=cpu,
    )
    assert result["world_size"] == 2 and result["ranks"] == [0, 1]
    assert result["distributed_type"] == f"DistributedType.{distributed_type}"
    steps = result["steps"]
    assert [s["step"] for s in steps] == [1, 2]
    assert all(math.isfinite(s["kl"]) for s in steps) and steps[1]["kl"] > 1e-4  # step 1 is on-policy: kl = 0
    if not cpu:  # GPU kernels differ from the CPU reference in the last bits
        return result
    for ours, single in zip(steps, one_process(estimator, kl_gradient, kl_gradient)["steps"]):
        for key in ("loss", "grad_norm", "kl"):
            assert ours[key] == pytest.approx(single[key], rel=TOLERANCE[kl_gradient], abs=1e-7), (key, ours, single)
    if kl_gradient == SEQUENCE:  # the future-KL term ran: step 2's gradient is not the token-level one
        token = one_process(estimator, "token", SEQUENCE)["steps"][1]
        assert steps[1]["loss"] == pytest.approx(token["loss"], rel=1e-5)
        assert steps[1]["grad_norm"] != pytest.approx(token["grad_norm"], rel=2e-4)
    return result


@pytest.mark.slow
@pytest.mark.parametrize(("estimator", "kl_gradient"), [("tike", "token"), ("rb", "token"), ("rb", SEQUENCE)])
def test_ddp_two_cpu_processes(tiny_model_dir, tmp_path, one_process, estimator, kl_gradient):
    _launch_and_check("ddp", estimator, tiny_model_dir, tmp_path, one_process, "MULTI_CPU", kl_gradient=kl_gradient)


@pytest.mark.slow
def test_zero2_two_cpu_processes(tiny_model_dir, tmp_path, one_process):
    pytest.importorskip("deepspeed")
    _launch_and_check("zero2", "tike", tiny_model_dir, tmp_path, one_process, "DEEPSPEED")


@pytest.mark.slow
@pytest.mark.parametrize(("estimator", "kl_gradient"), [("tike", "token"), ("rb", "token"), ("tike", SEQUENCE)])
def test_zero3_gathers_the_sharded_heads(tiny_model_dir, tmp_path, one_process, estimator, kl_gradient):
    pytest.importorskip("deepspeed")
    result = _launch_and_check(
        "zero3", estimator, tiny_model_dir, tmp_path, one_process, "DEEPSPEED", kl_gradient=kl_gradient
    )
    assert result["head_sharded"] == {"policy": True, "reference": True}


@pytest.mark.gpu
@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="FSDP2 needs 2 GPUs: accelerate has no FSDP on CPU processes"
)
def test_fsdp2_two_gpus(tiny_model_dir, tmp_path, one_process):
    _launch_and_check("fsdp2", "tike", tiny_model_dir, tmp_path, one_process, "FSDP", cpu=False)
