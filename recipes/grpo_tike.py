"""GRPO with the TIKE KL estimator: a TRL-style training script.

TrlParser reads three dataclasses from a YAML file (`--config`) and the command line:
TaskArguments (dataset, columns, reward functions), TIKEConfig (TRL's GRPOConfig plus
`kl_estimator`, `tike_top_k`, `tike_tail`, `tike_importance_weight`) and TRL's ModelConfig
(model, dtype, attention, LoRA). The run writes the model, `metrics.jsonl` and `training.png` to
`output_dir`.

    # the embedded default (SmolLM2-135M-Instruct, arithmetic), CPU is enough
    python recipes/grpo_tike.py --config recipes/configs/smollm2_arithmetic.yaml

    # the paper's Qwen2.5-1.5B-Instruct setup on 4 GPUs, DeepSpeed ZeRO-2
    accelerate launch --config_file recipes/accelerate/zero2.yaml --num_processes 4 \\
        recipes/grpo_tike.py --config recipes/configs/qwen2.5-1.5b_dapo.yaml

    # any field can be overridden on the command line
    accelerate launch --config_file recipes/accelerate/zero3.yaml --num_processes 8 \\
        recipes/grpo_tike.py --config recipes/configs/qwen2.5-7b_dapo.yaml --kl_estimator rb

`tike-trl train --config FILE` runs the same function on the same files.
"""

from trl import ModelConfig, TrlParser

from tike_trl import TIKEConfig
from tike_trl.scripts.grpo import TaskArguments, finish, train


def main(task: TaskArguments, training_args: TIKEConfig, model_args: ModelConfig) -> None:
    trainer = train(task, training_args, model_args)
    trainer.accelerator.print(f"Model, metrics.jsonl and training.png saved to {training_args.output_dir}.")
    finish(trainer)


if __name__ == "__main__":
    parser = TrlParser((TaskArguments, TIKEConfig, ModelConfig))
    main(*parser.parse_args_and_config())
