"""Model-family adapters: where a family keeps its norms, linears, heads and rotary embedding.

The rest of the pipeline talks only to an adapter, never to HF attribute names. Llama, Qwen2 and
Mistral share HF's decoder layout (``model.layers[i].self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``), so their adapters
share ``DecoderAdapter`` whole: Qwen2's q/k/v biases are handled by the surgery itself (reader biases
do not change under a residual rotation; v's bias is rotated with R2), and Mistral's sliding window
lives inside attention, untouched. A family with another layout overrides the names and accessors.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..infra.errors import PipelineError


@dataclass(frozen=True)
class Dims:
    """Sizes the rotations need."""

    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_layers: int
    vocab: int


class DecoderAdapter:
    """Accessors for an HF decoder-only causal LM with the Llama layout."""

    architecture: str = ""

    # names of the linears and norms inside a decoder layer, relative to the layer
    ATTN_READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    ATTN_WRITER = "self_attn.o_proj"
    MLP_READERS = ("mlp.gate_proj", "mlp.up_proj")
    MLP_WRITER = "mlp.down_proj"
    V_PROJ = "self_attn.v_proj"
    ATTENTION = "self_attn"
    MLP = "mlp"
    ATTN_NORM = "input_layernorm"
    MLP_NORM = "post_attention_layernorm"
    FINAL_NORM = "model.norm"  # relative to the CausalLM

    def dims(self, model: nn.Module) -> Dims:
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return Dims(
            hidden=c.hidden_size,
            intermediate=c.intermediate_size,
            n_heads=c.num_attention_heads,
            n_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            head_dim=head_dim,
            n_layers=c.num_hidden_layers,
            vocab=c.vocab_size,
        )

    def embedding(self, model: nn.Module) -> nn.Embedding:
        return model.model.embed_tokens

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(model.model.layers)

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.ATTENTION)

    def lm_head(self, model: nn.Module) -> nn.Linear:
        return model.lm_head

    def layer_norm_sites(self, layer: nn.Module) -> list[tuple[nn.Module, str, list[nn.Linear]]]:
        """A decoder layer's two RMSNorms as ``(layer, attribute name, linears that read its output)``."""
        return [(layer, self.ATTN_NORM, [get_linear(layer, n) for n in self.ATTN_READERS]),
                (layer, self.MLP_NORM, [get_linear(layer, n) for n in self.mlp_readers(layer)])]

    def final_norm_site(self, model: nn.Module) -> tuple[nn.Module, str, list[nn.Linear]]:
        """The final RMSNorm and lm_head, which reads it."""
        parent, _, attr = self.FINAL_NORM.rpartition(".")
        return (model.get_submodule(parent), attr, [self.lm_head(model)])

    def norm_sites(self, model: nn.Module) -> list[tuple[nn.Module, str, list[nn.Linear]]]:
        """Every RMSNorm as ``(parent module, attribute name, linears that read its output)``."""
        sites = [site for layer in self.layers(model) for site in self.layer_norm_sites(layer)]
        return sites + [self.final_norm_site(model)]

    def rotary(self, model: nn.Module) -> nn.Module:
        """The rotary-embedding module (its buffers are not in the checkpoint: rebuilt from config)."""
        return model.model.rotary_emb

    def layer_prefix(self, i: int) -> str:
        """State-dict prefix of decoder layer ``i`` (``model.layers.<i>.``)."""
        return f"model.layers.{i}."

    def v_rows(self, layer: nn.Module) -> tuple[int, int] | None:
        """The rows of ``V_PROJ`` that hold v, where that linear also computes q and k (a fused qkv
        projection); None: all of them."""
        return None

    def mlp_readers(self, layer: nn.Module) -> tuple[str, ...]:
        """The linears that read the MLP norm's output (relative to the layer): a MoE layer's router and
        every expert's gate/up (the router is rotated and norm-folded like them, never quantized)."""
        return self.MLP_READERS

    def mlp_writers(self, layer: nn.Module) -> tuple[str, ...]:
        """The linears that write the MLP's output into the stream (every expert's down_proj in a MoE layer)."""
        return (self.MLP_WRITER,)

    def routers(self, layer: nn.Module) -> tuple[str, ...]:
        """The MoE routers among ``mlp_readers``: they stay 16-bit (a flipped expert choice costs more
        than their few weights save) and have no online ops."""
        return ()

    def quantized_mlp_readers(self, layer: nn.Module) -> tuple[str, ...]:
        """``mlp_readers`` without the routers: the MLP readers whose weights and inputs are quantized."""
        routers = self.routers(layer)
        return tuple(n for n in self.mlp_readers(layer) if n not in routers)

    def layer_linear_names(self, layer: nn.Module) -> tuple[str, ...]:
        """Every quantized linear of ``layer``, relative to it, in forward order."""
        return (*self.ATTN_READERS, self.ATTN_WRITER, *self.quantized_mlp_readers(layer), *self.mlp_writers(layer))


class LlamaAdapter(DecoderAdapter):
    """Llama-2/3/3.2 and SmolLM2 (``LlamaForCausalLM``)."""

    architecture = "LlamaForCausalLM"


class Qwen2Adapter(DecoderAdapter):
    """Qwen2/2.5 (``Qwen2ForCausalLM``): q/k/v carry biases."""

    architecture = "Qwen2ForCausalLM"


class MistralAdapter(DecoderAdapter):
    """Mistral (``MistralForCausalLM``): Llama layout, optional sliding-window attention."""

    architecture = "MistralForCausalLM"


class Qwen3Adapter(DecoderAdapter):
    """Qwen3 (``Qwen3ForCausalLM``): ``q_norm`` / ``k_norm`` (RMSNorm over head_dim) act on q and k
    after their projections and before RoPE. They are not residual norms: nothing reads the residual
    stream through them, so they are never folded, and R1 (on q/k_proj's input), R2 (v/o only) and R3
    (after RoPE) all commute with them. Optional q/k/v/o biases as Qwen2's."""

    architecture = "Qwen3ForCausalLM"


class Phi3Adapter(DecoderAdapter):
    """Phi-3 (``Phi3ForCausalLM``): q, k and v come from one fused ``qkv_proj`` (rows q | k | v) and gate
    and up from one ``gate_up_proj``. R1 acts on their inputs whole; R2 only on qkv_proj's v rows
    (``v_rows``); each fused linear is one linear for GPTQ and activation quantization (one input)."""

    architecture = "Phi3ForCausalLM"
    ATTN_READERS = ("self_attn.qkv_proj",)
    MLP_READERS = ("mlp.gate_up_proj",)
    V_PROJ = "self_attn.qkv_proj"

    def v_rows(self, layer: nn.Module) -> tuple[int, int]:
        attn = layer.get_submodule(self.ATTENTION)
        q, kv = attn.config.num_attention_heads * attn.head_dim, attn.num_key_value_heads * attn.head_dim
        return q + kv, q + 2 * kv


class MoEAdapter(DecoderAdapter):
    """A family whose decoder layers may hold a sparse MoE block ``mlp`` (router ``mlp.gate``, a plain
    ``(E, D)`` weight; experts ``mlp.experts``) in place of the dense MLP. The pipeline works on its
    experts split into one linear each (``moe.split_experts``, done by ``load_model`` and the checkpoint
    loader): expert e is ``mlp.experts.<e>.{gate,up,down}_proj``. The router reads the MLP norm's output,
    so R1 and the norm fold act on it as on the experts' gate/up; R4 acts on every expert's down_proj.
    ``dims().intermediate`` is the config's ``intermediate_size`` (Qwen3-MoE: its dense layers'; each
    expert's own size comes from its weights wherever a size is needed)."""

    ROUTER = "mlp.gate"
    EXPERTS = "mlp.experts"

    def _n_experts(self, layer: nn.Module) -> int:
        """The layer's number of experts; 0 for a dense layer."""
        from .moe import ExpertLinears, is_fused_experts

        experts = getattr(layer.get_submodule(self.MLP), "experts", None)
        if experts is None:
            return 0
        if is_fused_experts(experts):
            raise PipelineError(f"{type(experts).__name__}: fused experts; the pipeline needs them split into one "
                                "linear each (pipeline.model.moe.split_experts, which load_model runs)")
        return len(experts) if isinstance(experts, ExpertLinears) else 0

    def mlp_readers(self, layer: nn.Module) -> tuple[str, ...]:
        n = self._n_experts(layer)
        if not n:
            return self.MLP_READERS
        return (self.ROUTER, *(f"{self.EXPERTS}.{e}.{p}" for e in range(n) for p in ("gate_proj", "up_proj")))

    def mlp_writers(self, layer: nn.Module) -> tuple[str, ...]:
        n = self._n_experts(layer)
        return tuple(f"{self.EXPERTS}.{e}.down_proj" for e in range(n)) if n else (self.MLP_WRITER,)

    def routers(self, layer: nn.Module) -> tuple[str, ...]:
        return (self.ROUTER,) if self._n_experts(layer) else ()


class Qwen3MoeAdapter(MoEAdapter):
    """Qwen3-MoE (``Qwen3MoeForCausalLM``): Qwen3's attention (q/k norms over head_dim, see Qwen3Adapter);
    sparse blocks every ``decoder_sparse_step`` layers except ``mlp_only_layers`` (those keep a dense MLP);
    top-k of the router's softmax, renormalised when ``norm_topk_prob``."""

    architecture = "Qwen3MoeForCausalLM"


class OlmoeAdapter(MoEAdapter):
    """OLMoE (``OlmoeForCausalLM``): q/k norms over the whole q and k projections (before the head split),
    not residual norms, so R1 (on their input), R2 (v/o) and R3 (after RoPE) commute with them. A set
    ``clip_qkv`` (clamping q, k, v elementwise) does not commute with R2 and is refused."""

    architecture = "OlmoeForCausalLM"


class MixtralAdapter(MoEAdapter):
    """Mixtral (``MixtralForCausalLM``): Mistral's attention, a sparse block in every layer, top-k of the
    router's softmax renormalised."""

    architecture = "MixtralForCausalLM"


ADAPTERS: dict[str, DecoderAdapter] = {
    a.architecture: a for a in (LlamaAdapter(), Qwen2Adapter(), MistralAdapter(), Qwen3Adapter(), Phi3Adapter(),
                                Qwen3MoeAdapter(), OlmoeAdapter(), MixtralAdapter())
}


MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
               "olmoe": "OlmoeForCausalLM", "mixtral": "MixtralForCausalLM"}

_BLOCK_OUTPUT_NORM = ("normalises each block's output before the residual add (post-attention and "
                      "post-feedforward norms): the residual stream's rotation would have to pass through a "
                      "norm of the block's own output, which no weight can absorb")
_LAYER_NORM = ("uses LayerNorm, which subtracts the mean: the mean of a rotated residual stream is not the "
               "rotated mean, so a rotation cannot be fused through it (QuaRot/SliceGPT first turn LayerNorm "
               "into RMSNorm by folding the mean subtraction into the weights; this pipeline does not)")
# families whose layout cannot hold a fused trained rotation: refused, saying why, before any work
REFUSED = {"gemma2": _BLOCK_OUTPUT_NORM, "gemma3": _BLOCK_OUTPUT_NORM, "gemma3_text": _BLOCK_OUTPUT_NORM,
           "olmo2": _BLOCK_OUTPUT_NORM, "gpt_neox": _LAYER_NORM, "gpt2": _LAYER_NORM, "gptj": _LAYER_NORM,
           "opt": _LAYER_NORM, "phi": _LAYER_NORM, "falcon": _LAYER_NORM, "bloom": _LAYER_NORM,
           "stablelm": _LAYER_NORM}


def check_config(hf_config) -> None:
    """Refuse, before any weight is read, a model config (``config.json``'s ``model_type``) whose
    family has no adapter: one line, not the family's own failure deep inside transformers. A family
    whose layout cannot hold a fused rotation (``REFUSED``) is told why."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type == "olmoe" and getattr(hf_config, "clip_qkv", None) is not None:
        raise PipelineError(f"model_type='olmoe' with clip_qkv={hf_config.clip_qkv} cannot be rotated: clamping v "
                            "elementwise does not commute with the head rotation R2")
    if model_type in REFUSED:
        raise PipelineError(f"model family model_type={model_type!r} cannot be rotated: it {REFUSED[model_type]}")
    if MODEL_TYPES.get(model_type) not in ADAPTERS:
        raise PipelineError(f"unsupported model family model_type={model_type!r}; supported: "
                            f"{', '.join(f'{k} ({v})' for k, v in sorted(MODEL_TYPES.items()))}")


def adapter_for(model: nn.Module) -> DecoderAdapter:
    """The adapter of ``model``'s architecture, chosen by its class (never by its name or path)."""
    arch = type(model).__name__
    if arch not in ADAPTERS:
        raise PipelineError(
            f"unsupported architecture {arch}; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[arch]


def get_linear(root: nn.Module, path: str) -> nn.Linear:
    """The ``nn.Linear`` at dotted ``path`` under ``root``, looking through quantization wrappers."""
    module = root.get_submodule(path)
    return getattr(module, "linear", module)


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` under ``root``."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)
