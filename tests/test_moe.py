"""MoE blocks split into one linear per expert (``pipeline.model.moe``) compute what HF's fused experts
compute: float64, tiny random Qwen3-MoE, OLMoE and Mixtral models, the whole model's logits."""
from __future__ import annotations

import pytest
import torch

from pipeline.model.moe import ExpertLinears, is_fused_experts, sparse_blocks, split_experts

COMMON = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, num_experts_per_tok=2)


def tiny_moe(family: str) -> torch.nn.Module:
    """A random-init float64 model of ``family`` with 6 experts of intermediate size 32, top-2 routing."""
    import transformers as tf

    if family == "qwen3_moe":  # layer 0 dense (mlp_only_layers), layer 1 sparse
        config = tf.Qwen3MoeConfig(**COMMON, head_dim=16, num_experts=6, moe_intermediate_size=32,
                                   intermediate_size=96, mlp_only_layers=[0], norm_topk_prob=True)
        cls = tf.Qwen3MoeForCausalLM
    elif family == "olmoe":
        config = tf.OlmoeConfig(**COMMON, num_experts=6, intermediate_size=32)
        cls = tf.OlmoeForCausalLM
    else:
        config = tf.MixtralConfig(**COMMON, num_local_experts=6, intermediate_size=32)
        cls = tf.MixtralForCausalLM
    torch.manual_seed(0)
    model = cls(config).to(torch.float64).eval()
    model.config._experts_implementation = "eager"  # HF's reference loop (its grouped_mm takes no float64)
    for block in (b for layer in model.model.layers for b in sparse_blocks(layer)):
        with torch.no_grad():  # HF inits the router to zeros: random, so tokens spread over the experts
            block.gate.weight.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "mixtral"])
def test_split_experts_equal_fused(family):
    model = tiny_moe(family)
    ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    n_sparse = 1 if family == "qwen3_moe" else 2
    assert split_experts(model) == n_sparse
    assert not any(is_fused_experts(m) for m in model.modules())
    blocks = [b for layer in model.model.layers for b in sparse_blocks(layer)]
    assert len(blocks) == n_sparse and all(isinstance(b.experts, ExpertLinears) for b in blocks)
    expert = blocks[0].experts[3]
    first = 1 if family == "qwen3_moe" else 0
    assert dict(model.named_parameters())[f"model.layers.{first}.mlp.experts.3.gate_proj.weight"] is expert.gate_proj.weight
    assert expert.gate_proj.weight.shape == (32, 64) and expert.down_proj.weight.shape == (64, 32)
    with torch.no_grad():
        got = model(ids).logits
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()


def test_split_experts_match_hf_default_grouped_mm_in_float32():
    """Against HF's default experts implementation (a grouped matmul), float32: equal to float rounding."""
    model = tiny_moe("mixtral").float()
    model.config._experts_implementation = "grouped_mm"
    ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).logits
        split_experts(model)
        got = model(ids).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_an_unused_expert_is_skipped():
    """Tokens routed away from an expert: it contributes nothing and is not run."""
    model = tiny_moe("mixtral")
    split_experts(model)
    block = sparse_blocks(model.model.layers[0])[0]
    calls = []
    block.experts[5].register_forward_hook(lambda m, a, o: calls.append(1))
    x = torch.randn(7, 64, dtype=torch.float64)
    index = torch.tensor([[0, 1]] * 7)
    weights = torch.full((7, 2), 0.5, dtype=torch.float64)
    with torch.no_grad():
        y = block.experts(x, index, weights)
        e0, e1 = block.experts[0], block.experts[1]
        assert torch.allclose(y, 0.5 * e0(x) + 0.5 * e1(x), rtol=0, atol=1e-12)
    assert not calls


def test_olmoe_with_clip_qkv_is_refused_in_one_line():
    from conftest import model_cfg

    from pipeline.infra.errors import PipelineError
    from pipeline.model.load import load_model

    cfg = model_cfg("tiny_olmoe")
    cfg.config.clip_qkv = 8.0
    with pytest.raises(PipelineError, match="clip_qkv=8.0 cannot be rotated: clamping v elementwise"):
        load_model(cfg)


def test_router_stays_16bit_and_an_expert_without_tokens_gets_rtn(tmp_path, caplog):
    """GPTQ on a MoE model whose expert 3 no calibration token reaches: that expert is quantized by RTN
    (no Hessian) instead of failing; the routers are rotated but neither wrapped nor quantized; the
    kernel backend runs every expert on Linear4bit and agrees with the fake-quant model."""
    from helpers import QUAROT

    from pipeline.export.checkpoint import load_quantized, save_quantized
    from pipeline.export.linear4bit import Linear4bit
    from pipeline.methods import make_rotations, prepare_model
    from pipeline.model.adapters import adapter_for
    from pipeline.model.load import load_model, model_fingerprint
    from pipeline.quant.quantizers import QuantSpec
    from pipeline.surgery.online import QuantLinear
    from conftest import model_cfg

    model, tok = load_model(model_cfg("tiny_mixtral"))
    fingerprint = model_fingerprint(model)
    adapter = adapter_for(model)

    def avoid_three(module, args, out):  # a token's pick of expert 3 goes to another expert
        logits, scores, index = out
        other = index.flip(-1)
        return logits, scores, torch.where(index == 3, torch.where(other == 0, 1, 0), index)

    hooks = [sparse_blocks(layer)[0].gate.register_forward_hook(avoid_three) for layer in adapter.layers(model)]
    reached = []
    probes = [sparse_blocks(layer)[0].experts[3].register_forward_pre_hook(lambda m, a: reached.append(1))
              for layer in adapter.layers(model)]
    quant = QuantSpec(w_bits=4, a_bits=4, kv_bits=4, weight_method="gptq")
    calib = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(1))
    with caplog.at_level("WARNING", logger="pipeline.quant.gptq"):
        prepare_model(model, QUAROT, make_rotations(QUAROT, model), quant, None, calib)
    assert not reached
    assert "mlp.experts.3.gate_proj saw no calibration token" in caplog.text
    for h in hooks + probes:
        h.remove()
    for layer in adapter.layers(model):
        block = sparse_blocks(layer)[0]
        assert not isinstance(block.gate, QuantLinear) and block.gate.weight.dtype == torch.float32
        assert block.gate.weight[0].unique().numel() == block.gate.weight.shape[1]  # not on a 4-bit grid
        for e in range(4):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                qlin = getattr(block.experts[e], proj)
                assert isinstance(qlin, QuantLinear) and qlin.weight_scale is not None
                codes = qlin.linear.weight / qlin.weight_scale
                assert (codes - codes.round()).abs().max() < 1e-3
        assert block.experts[0].down_proj.rotate_input  # R4 on every expert's down_proj
    save_quantized(tmp_path / "ckpt", model, tok, QUAROT, quant, fingerprint)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    fake, kernel = load_quantized(tmp_path / "ckpt"), load_quantized(tmp_path / "ckpt", backend="kernel")
    assert sum(isinstance(m, Linear4bit) for m in kernel.modules()) == 2 * (4 + 4 * 3)
    with torch.no_grad():
        a, b = fake(tokens).logits, kernel(tokens).logits
    assert (a - b).abs().max() / a.abs().max() < 1e-3


def test_streamed_sources_in_mixtral_hub_names_and_the_fused_layout():
    """A layer materialized from a source that stores the experts as Mixtral's hub checkpoints do
    (``block_sparse_moe.experts.<e>.w1/w3/w2``) or fused (transformers 5's ``gate_up_proj``) gets the
    same weights as from the split names; a missing tensor is still refused in one line."""
    from pipeline.infra.errors import PipelineError
    from pipeline.model.streaming import StateDictSource, empty_model, materialize

    model = tiny_moe("mixtral").float()
    fused_state = {k: v.clone() for k, v in model.state_dict().items()}
    split_experts(model)
    split_state = model.state_dict()
    hub = {}
    for k, v in split_state.items():
        k = k.replace(".mlp.gate.", ".block_sparse_moe.gate.").replace(".mlp.experts.", ".block_sparse_moe.experts.")
        hub[k.replace("gate_proj", "w1").replace("up_proj", "w3").replace("down_proj", "w2")] = v
    prefix = "model.layers.1."
    for state in (hub, fused_state):
        skeleton = empty_model(model.config, torch.float32)
        layer = skeleton.model.layers[1]
        materialize(layer, prefix, StateDictSource(state), torch.float32, torch.device("cpu"))
        for name, t in layer.state_dict().items():
            assert torch.equal(t, split_state[prefix + name]), name
    del hub[f"{prefix}block_sparse_moe.experts.2.w3.weight"]
    with pytest.raises(PipelineError, match=f"the model's weights lack {prefix}mlp.experts.2.up_proj.weight"):
        materialize(empty_model(model.config, torch.float32).model.layers[1], prefix, StateDictSource(hub),
                    torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("name", ["tiny_qwen3_moe", "tiny_olmoe", "tiny_mixtral"])
def test_routing_is_invariant_under_every_rotation(name):
    """Float64: the rotated model's routers pick exactly the original's experts with the same weights
    (the router reads the norm's output through R1 / the per-layer basis, folded into its weight)."""
    from helpers import LAYERWISE, QUAROT, f64_model, random_per_layer_set

    from pipeline.methods import make_rotations, prepare_model
    from pipeline.model.adapters import adapter_for
    from pipeline.quant.quantizers import QuantSpec

    tokens = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(5))

    def routes(model):
        got = []
        hooks = [b.gate.register_forward_hook(lambda m, a, o: got.append((o[1], o[2])))
                 for layer in adapter_for(model).layers(model) for b in sparse_blocks(layer)]
        with torch.no_grad():
            model(tokens)
        for h in hooks:
            h.remove()
        return got

    want = routes(f64_model(name))
    for method in (QUAROT, LAYERWISE):
        model = f64_model(name)
        rotations = random_per_layer_set(f64_model(name), seed=3) if method.per_layer else make_rotations(method, model)
        prepare_model(model, method, rotations, QuantSpec())
        got = routes(model)
        assert len(got) == len(want) > 0
        for (w_scores, w_index), (g_scores, g_index) in zip(want, got):
            assert torch.equal(g_index, w_index)
            assert (g_scores - w_scores).abs().max() < 2e-6  # HF takes the router's softmax in float32
