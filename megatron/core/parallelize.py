"""Apply a tensor / sequence-parallel layout to a single-device GPT, and initialise its weights
the same way whatever the layout.

    model = GPTModel(config, device="meta")
    parallelize_gpt(model, ps, sequence_parallel=True, rng=tracker)
    initialize_parameters(model, seed=1234, device=ps.device)

`parallelize_gpt` swaps every linear and embedding for its tensor-parallel version (always, even
at TP = 1, so that precision plans deal with one kind of layer). `initialize_parameters` draws
each *full* parameter from a generator seeded by the global seed and the parameter's global name
(Megatron's init: normal(0, std), output projections std / sqrt(2 * layers), norms one, biases
zero) and keeps this rank's shard, so one seed gives the same model on every layout.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import replace

import torch
import torch.nn as nn

from megatron.core.models.gpt import GPTModel, mask_columns_from
from megatron.core.parallel_state import ParallelState
from megatron.core.tensor_parallel import mappings
from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron.core.tensor_parallel.layout import ParamLayout, layouts_of

NORMS = (nn.LayerNorm, nn.RMSNorm)


class VocabParallelCrossEntropy(nn.Module):
    """`CrossEntropy` on logits sharded over the vocabulary: this rank holds columns
    [tp_rank * V / tp, (tp_rank + 1) * V / tp) of the padded V."""

    def __init__(self, ps: ParallelState, vocab_size: int):
        super().__init__()
        self.ps, self.vocab_size = ps, vocab_size

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return vocab_parallel_cross_entropy(wide, labels, self.ps, vocab_size=self.vocab_size)

    def mask_padding(self, logits: torch.Tensor) -> torch.Tensor:
        return mask_columns_from(logits, self.vocab_size - self.ps.tp_rank * logits.shape[-1])


def _column(linear: nn.Linear, ps, sp, parts: int = 1) -> ColumnParallelLinear:
    return ColumnParallelLinear(linear.in_features, linear.out_features, ps=ps, bias=linear.bias is not None,
                                sequence_parallel=sp, partition_parts=parts,
                                device=linear.weight.device, dtype=linear.weight.dtype)


def _row(linear: nn.Linear, ps, sp) -> RowParallelLinear:
    return RowParallelLinear(linear.in_features, linear.out_features, ps=ps, bias=linear.bias is not None,
                             sequence_parallel=sp, device=linear.weight.device, dtype=linear.weight.dtype)


def parallelize_gpt(model: GPTModel, ps: ParallelState, *, sequence_parallel: bool = False, rng=None) -> GPTModel:
    """Swap `model`'s layers for tensor-parallel ones in place (weights are not carried over:
    call `initialize_parameters` or load a checkpoint afterwards). `rng` is the tensor-parallel
    RNG tracker; dropout inside sharded regions forks its model-parallel state."""
    sp = sequence_parallel and ps.tp_size > 1
    if model.embedding is not None:
        emb = model.embedding.word_embeddings
        model.embedding.word_embeddings = VocabParallelEmbedding(
            emb.num_embeddings, emb.embedding_dim, ps=ps, device=emb.weight.device, dtype=emb.weight.dtype)
        if sp:
            model.embedding.register_forward_hook(
                lambda module, args, out: mappings.scatter_to_sequence_parallel_region(out, ps))
    for layer in model.decoder.layers:
        attn, mlp = layer.self_attention, layer.mlp
        attn.linear_qkv = _column(attn.linear_qkv, ps, sp)
        attn.linear_proj = _row(attn.linear_proj, ps, sp)
        mlp.linear_fc1 = _column(mlp.linear_fc1, ps, sp, parts=2 if model.config.swiglu else 1)
        mlp.linear_fc2 = _row(mlp.linear_fc2, ps, sp)
        if rng is not None and ps.tp_size > 1:
            attn.rng_context = lambda: rng.fork()
            if sp:
                layer.rng_context = lambda: rng.fork()
    if model.output_layer is not None:
        model.output_layer = _column(model.output_layer, ps, sp)
        if ps.tp_size > 1:
            model.cross_entropy = VocabParallelCrossEntropy(ps, model.config.unpadded_vocab_size)
    model.tie_output_weight()
    model.param_layouts = _gpt_layouts(model, sp)
    return model


# Output projections take Megatron's scaled init (std / sqrt(2 * layers)).
_SCALED_INIT = (".self_attention.linear_proj.weight", ".mlp.linear_fc2.weight")


def _gpt_layouts(model: GPTModel, sp: bool) -> dict[str, ParamLayout]:
    """Every parameter's layout by name: the parallel layers' own; norms inside the
    sequence-parallel region see only their rank's tokens, so their gradients are partial; a
    pipeline puts tied word embeddings on the first stage and the output weight on the last, as
    two parameters that must stay one: both are `tied_embedding` (gradients summed over the
    embedding group), the last stage's also `tied_duplicate` (norms and parameter counts skip it)."""
    layouts = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        own = (module.param_layouts() if isinstance(module, (ColumnParallelLinear, RowParallelLinear,
                                                             VocabParallelEmbedding)) else {})
        for param_name, _ in module.named_parameters(recurse=False):
            name = prefix + param_name
            layout = own.get(param_name, ParamLayout(sequence_parallel=sp and isinstance(module, NORMS)))
            if name.endswith(_SCALED_INIT):
                layout = replace(layout, scaled_init=True)
            layouts[name] = layout
    split_tie = model.shares_embeddings_and_output_weights and (model.embedding is None) != (model.output_layer is None)
    if split_tie:
        name = "embedding.word_embeddings.weight" if model.embedding is not None else "output_layer.weight"
        layouts[name] = replace(layouts[name], tied_embedding=True, tied_duplicate=model.embedding is None)
    return layouts


def global_name(model: GPTModel, name: str) -> str:
    """The parameter's name in the whole model (layer numbers are global under pipelining; a last
    stage's tied output weight is the word embedding's copy and takes its name, hence its init)."""
    if name == "output_layer.weight" and model.embedding is None and model.shares_embeddings_and_output_weights:
        return "embedding.word_embeddings.weight"
    prefix = "decoder.layers."
    if not name.startswith(prefix):
        return name
    local, rest = name[len(prefix):].split(".", 1)
    return f"{prefix}{model.decoder.first_layer + int(local)}.{rest}"


def _seed_for(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _init_rule(module: nn.Module, param_name: str, layout: ParamLayout, config) -> tuple[str, float]:
    if isinstance(module, NORMS):
        return ("ones", 0.0) if param_name == "weight" else ("zeros", 0.0)
    if param_name == "bias":
        return "zeros", 0.0
    std = config.init_method_std
    if layout.scaled_init:
        std = std / math.sqrt(2.0 * config.num_layers)
    return "normal", std


def materialize(model: nn.Module, device: torch.device) -> None:
    """Give meta (or other-device) parameters and buffers real, uninitialised storage on
    `device`, keeping their `requires_grad` and any sharing between modules (tied weights).
    Layouts are recorded by name, so they hold for the new parameter objects."""
    replaced: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for slots in (module._parameters, module._buffers):
            for name, tensor in list(slots.items()):
                if tensor is None or (tensor.device == device and not tensor.is_meta):
                    continue
                if id(tensor) not in replaced:
                    new = torch.empty_like(tensor, device=device)
                    if isinstance(tensor, nn.Parameter):
                        new = nn.Parameter(new, requires_grad=tensor.requires_grad)
                    replaced[id(tensor)] = new
                slots[name] = replaced[id(tensor)]


@torch.no_grad()
def initialize_parameters(model: GPTModel, ps: ParallelState, seed: int, device=None) -> None:
    """Materialise (from meta) and initialise every parameter as described in the module doc.
    Full tensors are drawn one at a time, so peak extra memory is the largest single parameter."""
    device = torch.device(device) if device is not None else ps.device
    materialize(model, device)
    layouts = layouts_of(model)
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    seen = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            name = global_name(model, f"{module_name}.{param_name}" if module_name else param_name)
            layout = layouts[param]
            rule, std = _init_rule(module, param_name, layout, model.config)
            full = torch.empty(layout.full_shape(param.shape, ps.tp_size), device=gen_device, dtype=torch.float32)
            if rule == "normal":
                full.normal_(0.0, std, generator=torch.Generator(device=gen_device).manual_seed(_seed_for(seed, name)))
            else:
                full.fill_(1.0 if rule == "ones" else 0.0)
            param.copy_(layout.shard(full, ps.tp_rank, ps.tp_size))
