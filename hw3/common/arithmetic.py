"""A fingerprint of this machine's CPU float arithmetic, as PyTorch computes it here.

PyTorch's CPU kernels are picked by the processor's vector instructions: MKL's matrix products and vectorised math
(exp, tanh) take an AVX-512, AVX2 or SSE path on Intel and another on AMD, oneDNN's convolutions likewise, and each
path rounds differently in the last bits. Training amplifies those bits, so the toy world's tiny models, and every
toy number after them, come out different on another CPU kind (docs/reproducibility.md). Two processes with equal
fingerprints ran the same kernels on these probes; different fingerprints explain different numbers from the same
inputs. `MKL_ENABLE_INSTRUCTIONS=AVX2` (or `SSE4_2`) before the first matrix product makes one machine compute as
an older one would.
"""
import hashlib

import torch

TOY_THREADS = (1, 2)  # a toy cross-entropy run's threads, and the toy world's and the self-critical stage's


def arithmetic_fingerprint() -> str:
    """16 hex digits of the sha256 of a few fixed float32 results computed here on the CPU at 1 and 2 threads (the
    counts the toy runs use, whatever the machine's core count): a matrix product, exp, tanh and GELU, a convolution
    and a sum."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(257, 333, generator=generator), torch.randn(333, 129, generator=generator)
    x = torch.randn(4096, generator=generator)
    images, kernels = torch.randn(2, 3, 32, 32, generator=generator), torch.randn(8, 3, 4, 4, generator=generator)
    digest = hashlib.sha256()
    threads = torch.get_num_threads()
    try:
        for count in TOY_THREADS:
            torch.set_num_threads(count)
            for result in (a @ b, torch.exp(x), torch.tanh(x), torch.nn.functional.gelu(x),
                           torch.nn.functional.conv2d(images, kernels, stride=4), (a @ b).sum(dim=0)):
                digest.update(result.contiguous().numpy().tobytes())
    finally:
        torch.set_num_threads(threads)
    return digest.hexdigest()[:16]
