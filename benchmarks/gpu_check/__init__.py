"""The prepared GPU check (`make gpu-check`; docs/benchmarks.md, "The GPU check"): on one GPU, in
stages that each add their results to one report as they finish,

1. `cuda-tests`: the CUDA-only tests (`pytest -m gpu`: our heads through TRL's Triton kernels,
   fp32 and bf16, against the dense formulas);
2. `loss-step`: `benchmarks.loss_step`'s comparison at 8 × 2048 and 32 × 2048 tokens for TRL's
   k3, tike at k = 16 and 1024, and rb, with the ratios to k3 against the targets;
3. `train`, `train-zero3`: 3 bf16 training steps each of tike, rb and TRL's k3 on a random-weight
   Qwen2.5-1.5B-geometry model, plain, LoRA and ZeRO-3 on one process, with |r − 1| on-policy.

`--smoke` runs every stage at a tiny size on the CPU (a test in the default suite does).
`run.py` is the command, `settings.py` the sizes, targets and time estimates, one module per
stage, `report.py` the report, `wheels.py` the wheels the GPU machine lacks.
"""
