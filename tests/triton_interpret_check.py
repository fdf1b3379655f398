"""Run by tests/test_kernels_triton.py in a subprocess with TRITON_INTERPRET=1 (it must be set
before triton is imported): our heads once through the torch folds, once through TRL's Triton
kernels (interpreted on the CPU), values and gradients. Prints the largest differences as JSON."""

import json
import os

assert os.environ.get("TRITON_INTERPRET") == "1"

import torch  # noqa: E402

import tike_trl.kernels.trl_tiles as trl_tiles  # noqa: E402
from tike_trl.kernels import HeadSpec, RefHead, Tiling, policy_head, reference_logprobs  # noqa: E402

torch.manual_seed(0)
n, d, vocab, k = 19, 8, 150, 4
hidden, weight, bias = (torch.randn(*s).requires_grad_() for s in [(n, d), (vocab, d), (vocab,)])
ref_hidden, ref_weight = torch.randn(n, d), torch.randn(vocab, d)
targets = torch.randint(0, vocab, (n,))
spec = HeadSpec(temperature=0.7, softcap=5.0, logit_scale=1.3)
tiling = Tiling(tokens=8, vocab=64, block=8)


def outputs() -> dict[str, torch.Tensor]:
    exact = policy_head(hidden, weight, bias, targets, spec, k, RefHead(ref_hidden, ref_weight, None, spec), tiling)
    top = policy_head(hidden, weight, bias, targets, spec, k, None, tiling)
    grads_exact = torch.autograd.grad(
        exact.logprob.sum() + exact.entropy.sum() + exact.topk_logprobs.sum() + exact.exact_kl.sum(),
        (hidden, weight, bias),
    )
    grads_top = torch.autograd.grad(
        top.logprob.sum() + top.entropy.sum() + top.topk_logprobs.sum(), (hidden, weight, bias)
    )
    indices = torch.cat([top.topk_indices, targets[:, None]], 1)
    return {
        "exact.logprob": exact.logprob,
        "exact.entropy": exact.entropy,
        "exact.kl": exact.exact_kl,
        "top.logprob": top.logprob,
        "top.entropy": top.entropy,
        "top.topk_logprobs": top.topk_logprobs,
        "reference": reference_logprobs(ref_hidden, ref_weight, None, indices, spec, tiling),
        **{f"exact.grad{i}": g for i, g in enumerate(grads_exact)},
        **{f"top.grad{i}": g for i, g in enumerate(grads_top)},
    }


torch_path = outputs()
trl_tiles.use_triton = lambda device: True  # TRL's Triton kernels, interpreted on the CPU
triton_path = outputs()
print(json.dumps({name: (torch_path[name] - triton_path[name]).abs().max().item() for name in torch_path}))
