"""Smoke test of an installed llada_kernels wheel, run by .ci/wheel_check.sh in a clean venv
from outside the source tree (python -I: neither the working directory nor this script's
folder is on sys.path). Exits non-zero on the first failure."""

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

import llada_kernels as lk
from llada_kernels import _backend

venv = Path(sys.prefix).resolve()
where = Path(lk.__file__).resolve()
assert venv in where.parents, f"llada_kernels imported from {where}, not from the venv {venv}"
assert _backend._C_ERROR is None, f"llada_kernels._C did not load: {_backend._C_ERROR}"
from llada_kernels import _build_info  # noqa: E402  (written by the wheel's build)
assert _build_info.TORCH_VERSION == torch.__version__, (_build_info.TORCH_VERSION, torch.__version__)

# Metadata: summary, README as the description, the license and its file, classifiers.
meta = metadata.metadata("llada_kernels")
assert meta["Summary"].startswith("Fused kernels"), meta["Summary"]
assert meta["Description-Content-Type"] == "text/markdown"
assert "# llada-kernels" in meta.get_payload(), "the README is not the long description"
license = meta["License-Expression"] or meta["License"]  # setup.py's license= writes License
assert license == "Apache-2.0", license
assert any(f.name == "LICENSE" for f in metadata.files("llada_kernels")), "LICENSE not shipped"
assert "Programming Language :: Python :: 3" in meta.get_all("Classifier")
wheel_tags = [line for line in metadata.distribution("llada_kernels").read_text("WHEEL").splitlines()
              if line.startswith("Tag:")]
assert wheel_tags and all("manylinux" in t and "abi3" in t for t in wheel_tags), wheel_tags

# Every op on the C++ CPU backend against the reference, forward and backward.
g = torch.Generator().manual_seed(0)
logits = torch.randn(2, 9, 40, generator=g)
x = torch.full((2, 9), 39)
for backend in ("cpu", "reference"):
    out = lk.remask_step(logits, x, 3, mask_id=39, backend=backend)
    if backend == "cpu":
        first = out
assert all(torch.equal(a, b) for a, b in zip(first, out))
targets = torch.randint(0, 40, (2, 9), generator=g)
masked = torch.rand(2, 9, generator=g) < 0.5
p = torch.rand(2, generator=g) * 0.9 + 0.1
values = [lk.masked_diffusion_loss(logits, targets, masked, p, backend=b) for b in ("cpu", "reference")]
torch.testing.assert_close(values[0], values[1])
h = torch.randn(2, 9, 16, generator=g, requires_grad=True)
w = torch.randn(40, 16, generator=g, requires_grad=True)
grads = []
for b in ("cpu", "reference"):
    loss = lk.fused_linear_masked_diffusion_loss(h, w, targets, masked, p, backend=b)
    grads.append((loss.detach(), *torch.autograd.grad(loss, (h, w))))
for a, b in zip(*grads):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
q, k, v = (torch.randn(1, 4, 11, 32, generator=g, requires_grad=True) for _ in range(3))
keep = torch.ones(1, 11, dtype=torch.bool)
keep[0, -3:] = False
att = [lk.bidirectional_attention(q, k, v, keep, backend=b) for b in ("cpu", "reference")]
torch.testing.assert_close(att[0], att[1], rtol=1e-4, atol=1e-5)
att[0].sum().backward()
assert "cpu" in lk.available_backends("bidirectional_attention", "cpu")

# The console script.
cli = Path(sys.executable).with_name("llada-kernels")
help_text = subprocess.run([str(cli), "generate", "--help"], capture_output=True, text=True, check=True).stdout
assert "--tokenizer" in help_text and "--prefix-cache" in help_text
print(f"wheel smoke test passed: {where.parent} (torch {torch.__version__}, "
      f"{wheel_tags[0].split()[-1]})")
