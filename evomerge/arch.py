"""Architecture maps: which tensors belong to which decoder layer, and how to renumber them.

A frankenmerge stacks layers from several models, so the engine must know that
``model.layers.7.mlp.up_proj.weight`` is layer 7's MLP and that everything
without a layer index (embeddings, final norm, LM head) is global. One map per
naming family, chosen from ``config.json``; unknown families are inferred from
the tensor names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from evomerge.errors import EvomergeError


@dataclass(frozen=True)
class ArchMap:
    """Naming rules of one model family."""

    family: str
    layer_prefix: str  # e.g. "model.layers." -> "model.layers.{i}.<suffix>"
    num_layers_key: str  # config.json key holding the layer count
    #: Substrings naming a layer's residual-writing output projections (weights and biases), for
    #: pre-norm families whose layers see their input only through scale-invariant norms; scaling
    #: exactly these tensors by a factor scales the layer's contribution to the residual stream
    #: (see evomerge.materialize.layer_path). Empty where no such folding holds (post-norm or
    #: sandwich-norm layers such as BERT, Gemma 2/3, OLMo 2) or the names are not mapped (MoE).
    residual_out: tuple[str, ...] = ()
    #: (tensor, the tensor it is tied to): a model that ties its LM head to its embeddings stores only
    #: the latter, which then stands in for the head in a merge (mergekit's ``tied_names``)
    tied: tuple[tuple[str, str], ...] = ()
    #: config flags that, when true, make a layer compute differently at another index (fixed when the
    #: model is built): a layer path, which runs layers by reference away from their index, cannot be
    #: scored as its export computes
    positional: tuple[str, ...] = ()

    @property
    def _pattern(self) -> re.Pattern:
        return re.compile(rf"^{re.escape(self.layer_prefix)}(\d+)\.(.+)$")

    def split(self, name: str) -> tuple[int, str] | None:
        """``(layer index, suffix)`` of a per-layer tensor, ``None`` for a global one."""
        m = self._pattern.match(name)
        return (int(m.group(1)), m.group(2)) if m else None

    def is_pre(self, name: str) -> bool:
        """Whether a global tensor comes before the layers (embeddings) rather than after (norm, head)."""
        return any(marker in name for marker in ("embed", "wte", "wpe", "patch_embeddings", "position_embeddings"))

    def tied_to(self, name: str) -> str | None:
        """The tensor ``name`` is tied to (the embeddings for the LM head), if any."""
        return next((other for tensor, other in self.tied if tensor == name), None)

    def layer_of(self, name: str) -> int | None:
        """Layer index of ``name`` or ``None`` if it is global."""
        parts = self.split(name)
        return parts[0] if parts else None

    def layer_name(self, index: int, suffix: str) -> str:
        """Full tensor name of ``suffix`` in layer ``index``."""
        return f"{self.layer_prefix}{index}.{suffix}"

    def num_layers(self, config: dict) -> int:
        """Layer count recorded in ``config``."""
        try:
            value = config[self.num_layers_key]
        except KeyError:
            raise EvomergeError(f"config.json has no {self.num_layers_key!r} (family {self.family})") from None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise EvomergeError(f"config.json: {self.num_layers_key} is {value!r}, not a layer count")
        return value

    def per_layer_keys(self, config: dict) -> list[str]:
        """Keys of ``config`` holding one value per layer: ``layer_types`` (Qwen2/3, Gemma 2/3),
        ``no_rope_layers`` (SmolLM3)... -- any list as long as the layer count (with one layer, only
        keys that say so)."""
        n = self.num_layers(config)
        return [k for k, v in config.items() if isinstance(v, list) and v and len(v) == n
                and k != "architectures" and (n > 1 or "layer" in k)]

    def with_num_layers(self, config: dict, n: int) -> dict:
        """A copy of ``config`` describing ``n`` layers (per-layer lists are cut or repeated cyclically)."""
        out = dict(config)
        for key in self.per_layer_keys(config):
            value = config[key]
            out[key] = (value * (n // len(value) + 1))[:n]
        out[self.num_layers_key] = n
        return out

    def with_layers(self, config: dict, layers: list[tuple[dict, int]]) -> dict:
        """A copy of ``config`` for a stack whose layer k is layer ``i`` of the model configured by
        ``c``, ``(c, i) = layers[k]``: each per-layer list takes its value from that source layer
        (a sliding-window layer stays one), cyclically only where a source lacks the list."""
        out = self.with_num_layers(config, len(layers))
        for key in self.per_layer_keys(config):
            own = [source.get(key) for source, _ in layers]
            if all(isinstance(v, list) and len(v) == self.num_layers(source) for v, (source, _) in zip(own, layers)):
                out[key] = [v[i] for v, (_, i) in zip(own, layers)]
        return out


_LLAMA_TIED = (("lm_head.weight", "model.embed_tokens.weight"),)
_LLAMA = ArchMap("llama", "model.layers.", "num_hidden_layers", ("self_attn.o_proj", "mlp.down_proj"), _LLAMA_TIED)
#: Llama naming, but the residual-writing projections are not foldable (post/sandwich norms, MoE experts).
_LLAMA_NAMES = ArchMap("llama-names", "model.layers.", "num_hidden_layers", tied=_LLAMA_TIED)
_GPT2 = ArchMap("gpt2", "transformer.h.", "n_layer", ("attn.c_proj", "mlp.c_proj"),
                (("lm_head.weight", "transformer.wte.weight"),), positional=("scale_attn_by_inverse_layer_idx",))

#: model_type -> map. Llama-style naming covers Mistral, Qwen2/3, Gemma, Phi-3 and most decoder LMs.
FAMILIES: dict[str, ArchMap] = {
    **{t: _LLAMA for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo", "granite")},
    **{t: _LLAMA_NAMES for t in ("mixtral", "gemma2", "gemma3_text", "olmo2")},
    "gpt2": _GPT2,
    "vit": ArchMap("vit", "vit.encoder.layer.", "num_hidden_layers"),
    "bert": ArchMap("bert", "bert.encoder.layer.", "num_hidden_layers"),
}

_GUESS = re.compile(r"^(.*?\b(?:layers|h|layer|blocks))\.(\d+)\.")


def arch_for(config: dict, tensor_names: list[str] | None = None) -> ArchMap:
    """The ArchMap for a model, from ``config['model_type']`` or inferred from tensor names."""
    model_type = config.get("model_type")
    if model_type in FAMILIES:
        known = FAMILIES[model_type]
        if tensor_names is None or any(n.startswith(known.layer_prefix) for n in tensor_names):
            return known
    for name in tensor_names or ():
        m = _GUESS.match(name)
        if m:
            key = next((k for k in ("num_hidden_layers", "n_layer", "num_layers") if k in config), "num_hidden_layers")
            return ArchMap(model_type or "unknown", m.group(1) + ".", key)
    raise EvomergeError(
        f"cannot tell which tensors are per-layer for model_type {model_type!r}; "
        f"known families: {', '.join(sorted(FAMILIES))}"
    )
