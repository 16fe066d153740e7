"""Linear4bit and ``load_quantized(..., backend="kernel")`` against the fake-quant model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline import load_quantized
from pipeline.export.checkpoint import save_quantized
from pipeline.infra.errors import PipelineError
from pipeline.rotation.hadamard import online_hadamard
from pipeline.export.linear4bit import Linear4bit
from pipeline.quant.quantizers import QuantSpec, quantize_asym
from helpers import QUAROT, prepared_model

FP16_EPS = 2.0 ** -10


def _grid_linear(n: int, k: int, seed: int, bias: bool = True) -> tuple[nn.Linear, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 1, generator=gen) * 0.05 + 0.01
    linear = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randint(-8, 8, (n, k), generator=gen).float() * scale)
    return linear, scale


@pytest.mark.parametrize("n,k,rotate", [(33, 64, False), (17, 512, True), (65, 320, True), (7, 192, False)])
def test_linear4bit_equals_fake_quant_linear(n, k, rotate):
    linear, scale = _grid_linear(n, k, seed=n + k)
    x = torch.randn(3, 5, k, generator=torch.Generator().manual_seed(k)) * 3
    fake_in = online_hadamard(x) if rotate else x
    fake = linear(quantize_asym(fake_in, 4, 0.9))
    kernel = Linear4bit.from_float(linear, scale, clip_ratio=0.9, rotate_input=rotate)
    out = kernel(x)
    assert out.shape == (3, 5, n) and out.dtype == x.dtype
    torch.testing.assert_close(out, fake, rtol=1e-5, atol=1e-5 * fake.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_from_float_reads_the_codes_of_a_16_bit_weight(dtype):
    """A bf16/fp16 weight is ``codes * scale`` rounded to its dtype (as a bf16 fuse stores it): the codes
    come back exactly; a weight off the grid by a quarter step is still refused."""
    linear, scale = _grid_linear(40, 64, seed=5, bias=False)
    codes = torch.round(linear.weight / scale)
    scale16 = scale.to(dtype)
    half = nn.Linear(64, 40, bias=False).to(dtype)
    with torch.no_grad():
        half.weight.copy_(codes.to(dtype) * scale16)
    kernel = Linear4bit.from_float(half, scale16)
    assert torch.equal(kernel.qweight, Linear4bit.from_float(linear, scale).qweight)
    with torch.no_grad():
        half.weight[0, 0] += 0.25 * scale16[0, 0]
    with pytest.raises(PipelineError, match="not on the 4-bit grid"):
        Linear4bit.from_float(half, scale16)


def test_whole_model_matches_fake_quant_within_fp16_rounding(tmp_path, tokens):
    quant = QuantSpec(w_bits=4, a_bits=4, kv_bits=4)
    model, tok, fingerprint = prepared_model("tiny_llama", QUAROT, quant)
    save_quantized(tmp_path / "ckpt", model, tok, QUAROT, quant, fingerprint)
    fake, kernel = load_quantized(tmp_path / "ckpt"), load_quantized(tmp_path / "ckpt", backend="kernel")
    n_kernel = sum(isinstance(m, Linear4bit) for m in kernel.modules())
    assert n_kernel == 2 * 7  # q, k, v, o, gate, up, down per layer
    with torch.no_grad():
        a, b = fake(tokens).logits, kernel(tokens).logits
    rel = (a - b).abs().max() / a.abs().max()
    assert rel < FP16_EPS, f"relative max difference {rel:.2e}"
    print(f"kernel vs fake: relative max logit difference {rel:.2e}")


def test_kernel_backend_refusals(tmp_path):
    with pytest.raises(PipelineError, match="backend='gpu': choose one of fake, kernel"):
        load_quantized(tmp_path, backend="gpu")
    quant = QuantSpec(w_bits=4, a_bits=8, kv_bits=4)
    model, tok, fingerprint = prepared_model("tiny_llama", QUAROT, quant)
    save_quantized(tmp_path / "w4a8", model, tok, QUAROT, quant, fingerprint)
    with pytest.raises(PipelineError, match="backend=kernel runs W4A4 with per-channel weight scales; .* is W4A8"):
        load_quantized(tmp_path / "w4a8", backend="kernel")
    linear, scale = _grid_linear(8, 64, seed=0)
    with pytest.raises(PipelineError, match="only per-output-channel scales"):
        Linear4bit.from_float(linear, torch.ones(8, 2))
    with pytest.raises(PipelineError, match="not on the 4-bit grid"):
        Linear4bit.from_float(linear, scale * 0.37)
    with pytest.raises(PipelineError, match="K=48 must be a positive multiple of 32"):
        Linear4bit.from_float(nn.Linear(48, 8), torch.ones(8))


def test_eval_stage_kernel_backend_equals_fake(tmp_path):
    """eval.backend=kernel: the eval stage's perplexity equals the fake-quant path's to float rounding,
    and says which backend ran; the kernel backend refuses a setting it cannot run, in one line."""
    import json

    from helpers import one_line_error, run_stage

    common = ["+model=tiny_llama", "method=quarot", "quant=w4a4kv4", "calib.n_windows=2", "calib.seqlen=32",
              "calib.stats_windows=1", "eval.tasks=[]", "eval.seqlen=64", "eval.max_windows=3"]
    for script in ("calibrate.py", "train_rotation.py", "fuse.py"):
        proc = run_stage(tmp_path, script, *common)
        assert proc.returncode == 0, proc.stderr[-2000:]
    ppl = {}
    for backend in ("fake", "kernel"):
        proc = run_stage(tmp_path, "eval.py", *common, f"eval.backend={backend}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        (path,) = (tmp_path / "m" / "eval").glob("quarot_w4a4kv4-*.json")
        result = json.loads(path.read_text())
        assert result["backend"] == backend
        ppl[backend] = result["wikitext2_ppl"]
    assert abs(ppl["kernel"] / ppl["fake"] - 1) < 1e-4, ppl
    one_line_error(run_stage(tmp_path, "eval.py", *common, "eval.backend=gpu"),
                   "eval.backend='gpu': choose one of fake, kernel")
    one_line_error(run_stage(tmp_path, "eval.py", *common, "eval.backend=kernel", "eval.stream=true"),
                   "eval.backend=kernel needs the whole model in memory")
