"""ResidentMerger: turn each search candidate into a live model, in place, without disk.

Built once per worker: the live ``transformers`` model is loaded from the base
directory and the pool's models are laid out in blocks (``materialize.pool``)
where the memory plan puts them (``materialize.placement``: on the worker's
device by default; pinned host memory or the model files when they do not
fit). ``materialize(recipe)`` then takes one of two routes.

Parameter-space candidates (every recipe but a layer path) are planned against
the pool, computed with export's arithmetic (so the result equals `evomerge
merge` bit for bit, DARE included for the same seed) and copied into the live
model's parameters in place: no model construction, no allocation of a second
model, no file I/O per candidate unless the pool is placed on disk. The
task-vector family (task_arithmetic, ties, dare_ties, dare_linear) over models
sharing one tensor layout runs blockwise (``materialize.blockwise``: whole
blocks of tensors per operation, TIES cuts from magnitude indexes built on
first use per (base, source) pair); other methods run export's per-tensor jobs.

Data-flow candidates (``passthrough`` + ``slices``; see
``evomerge.materialize.layer_path``) are built from references, not weights.
Each pool model's decoder layers are instantiated once, lazily, on the meta
device and given the resident pool tensors themselves as parameters
(``load_state_dict(assign=True)``: no copy). The live model's layer list is
swapped for a new ``ModuleList`` of ``ScaledLayer`` wrappers around those
shared modules, ``h ↦ α·L(h/α)``, and ``config`` gets the path's layer count
(and per-layer lists such as ``layer_types``) exactly as export writes it.

Why the wrapper: export folds α into the layer's residual-writing projections
(``L^α``, see ``layer_path``), and ``L^α(h) = α·L(h/α)`` whenever the norms are
scale-invariant; with ``eps`` they differ only in that ``L`` normalizes ``h/α``
where ``L^α`` normalizes ``h`` (``eps`` vs ``eps·α²`` relative to the mean
square). The wrapper hands every layer exactly Sakana's input ``s_k·x_{k-1}``,
so it equals Sakana's scaled forward except for the final norm, which sees
``α_n·x_n``. Attention modules record their KV-cache slot in ``layer_idx``; a
wrapper sets it to its path position before each call, so a layer that appears
twice keeps two cache entries. Embeddings come from the first slice's model,
final norm and LM head from the last slice's: those few global tensors are
written in place into the live model by the same plan jobs export runs. The
live model's own layer modules are set aside untouched; the next
parameter-space candidate puts them and the config back and rewrites every
tensor, so it stays bit-exact.

Limits of layer paths: a path runs at the pool's precision (the recipe's
``dtype``/``out_dtype`` rounding of the folded weights is not reproduced) and
each layer with its own model's config (export uses the first model's config
for all: the same when the models share hyperparameters, as merge families do);
per-layer lists such as attention types (sliding-window hybrids) follow each
path position's source layer, in the live config as in export's; ``output_hidden_states``
and ``output_attentions`` are not supported (transformers installs its capture
hooks once, on whichever layers are in place then).

The memory plan is chosen from the sizes and free memory unless forced and is
reported in ``memory``. With the pool in host memory or on disk, layer-path
layers are copied to the device the first time a path uses them.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
from pathlib import Path

import torch

from evomerge.errors import EvomergeError
from evomerge.io.model_dir import ModelDir
from evomerge.materialize.blockwise import BLOCKWISE, magnitude_index, merge_block
from evomerge.materialize.export import all_finite, job_seed, run_jobs
from evomerge.materialize.placement import plan_memory
from evomerge.materialize.plan import MergePlan, plan_merge
from evomerge.materialize.pool import PoolModel, default_block_numel, layout, model_bytes
from evomerge.methods.magnitude_index import MagnitudeIndex
from evomerge.recipe import Recipe

log = logging.getLogger(__name__)

#: Base model size from which a CPU merger fuses task-vector tails by default (~1 s saved per
#: candidate on a 257M-parameter model; the small zoo's candidates would not repay the compile).
FUSED_MIN_BYTES = 1 << 27


class MaterializeError(EvomergeError):
    """A candidate could not be materialized (bad recipe for this pool, non-finite weights).

    The merger stays usable for the next candidate.
    """


class ScaledLayer(torch.nn.Module):
    """Position ``position`` of a layer path: ``h ↦ alpha · layer(h / alpha)``, ``layer`` shared, not copied.

    Before each call it sets ``layer_idx`` of the wrapped layer's attention
    modules to ``position``, the KV-cache slot of this path position. Other
    attributes (e.g. ``attention_type``) are read through from the wrapped layer.
    """

    def __init__(self, layer: torch.nn.Module, alpha: float, position: int) -> None:
        super().__init__()
        self.layer = layer
        self.alpha = float(alpha)
        self.position = position
        self._indexed = [m for m in layer.modules() if hasattr(m, "layer_idx")]

    def forward(self, hidden_states, *args, **kwargs):
        for module in self._indexed:
            module.layer_idx = self.position
        if self.alpha == 1.0:
            return self.layer(hidden_states, *args, **kwargs)
        out = self.layer(hidden_states / self.alpha, *args, **kwargs)
        if isinstance(out, tuple):
            return (out[0] * self.alpha, *out[1:])
        return out * self.alpha

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if not modules or "layer" not in modules or name.startswith("__"):
                raise
            return getattr(modules["layer"], name)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, position={self.position}"


class ResidentMerger:
    """One live model plus a resident pool of source weights; see the module doc.

    ``placement`` forces a memory plan (``auto``: chosen); ``sharing`` is the number of workers that
    start on this machine together and split its memory (``materialize.placement``).
    """

    def __init__(self, base: str | Path, sources: list[str | Path], *, device: str | None = None,
                 threads: int = 2, allow_pickle: bool = False, placement: str = "auto",
                 block_numel: int | None = None, fused: bool | None = None, sharing: int = 1) -> None:
        from evomerge.io.live import checkpoint_names, load_model
        from evomerge.perf import keep_freed_memory

        keep_freed_memory()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # CPU: per-tensor jobs run in parallel, one intra-op thread each; CUDA: one stream, in order.
        self.threads = max(1, threads) if self.device == "cpu" else 1
        block_numel = block_numel or default_block_numel(self.device)
        names = [str(base)] + [str(s) for s in sources if str(s) != str(base)]
        dirs = {name: ModelDir(name, allow_pickle=allow_pickle) for name in names}
        blocks = {name: layout(d, block_numel) for name, d in dirs.items()}
        widest = max((b.numel for bs in blocks.values() for b in bs), default=0)
        #: whether task-vector merges run compiled (``materialize.fused``, CPU only): by default for
        #: models large enough that the saved passes outweigh a compile of a few seconds
        self.fused = self.device == "cpu" and (
            fused if fused is not None else model_bytes(dirs[str(base)]) >= FUSED_MIN_BYTES)
        # the fused route's TIES cuts look magnitudes up in exact tables, held next to the workspace
        source_entries = sum(b.numel for name in names[1:] for b in blocks[name])
        tables = MagnitudeIndex.table_bound(source_entries) if self.fused else 0
        #: where the pool lives and why (see ``evomerge.materialize.placement``)
        self.memory = plan_memory(
            pool_bytes=sum(model_bytes(d) for d in dirs.values()), live_bytes=model_bytes(dirs[str(base)]),
            workspace_bytes=(len(names) + 2) * widest * 4 + tables, device=self.device, requested=placement,
            sharing=sharing,
        )
        log.info("resident merger: %s", self.memory.describe())
        self.pool = {name: PoolModel(d, placement=self.memory.placement, device=self.device, block_numel=block_numel)
                     for name, d in dirs.items()}
        self._indexes: dict[tuple[str, str, int], MagnitudeIndex] = {}
        self.base = str(base)
        self.model = load_model(base, self.device)
        # Detached views of the parameters, by checkpoint name (what merge plans use): in-place
        # writes from worker threads need no autograd state.
        names = checkpoint_names(self.model)
        self._live_blocks = self._share_blocks(names)
        live = self.model.state_dict()
        self._targets = {name: live[own] for name, own in names.items()}
        container = _live_layer_container(self.pool[self.base].arch, names)
        self._layers_owner, _, self._layers_attr = container.rpartition(".")
        self._own_layers = self.model.get_submodule(container)
        self._own_config: dict | None = None  # config values a layer path replaced, to put back
        self._live_layers: dict[str, list] = {}  # pool model -> its decoder layers over the pool tensors

    def materialize(self, recipe: Recipe, *, seed: int | None = None):
        """Materialize ``recipe`` in the live model and return it.

        A ``passthrough`` recipe with ``slices`` is a layer path, built from
        references to the pool's layers; any other recipe is written in place.
        """
        unknown = [m for m in recipe.referenced_models() if m not in self.pool]
        if unknown:
            raise MaterializeError(f"recipe model {unknown[0]!r} is not in the resident pool ({', '.join(self.pool)})")
        if recipe.merge_method == "passthrough" and recipe.slices is not None:
            return self._materialize_path(recipe, seed)
        plan = plan_merge(recipe, self.pool)
        if plan.num_layers != self.pool[self.base].num_layers:
            raise MaterializeError(
                f"recipe has {plan.num_layers} layers, the live model {self.pool[self.base].num_layers}; "
                "only parameter-space recipes and passthrough layer paths can be materialized"
            )
        missing = [job.out_name for job in plan.jobs if job.out_name not in self._targets]
        if missing:
            raise MaterializeError(f"the live model has no tensor {missing[0]!r}")
        self._restore_layers()
        if not self._write_blockwise(plan, recipe, seed):
            self._write(plan, recipe, seed)
        return self.model

    # -- parameter space -----------------------------------------------------------
    def _write(self, plan: MergePlan, recipe: Recipe, seed: int | None) -> None:
        """Run ``plan``'s jobs and copy each result into the live model's tensor of that name."""

        def write(job, out) -> None:
            if not all_finite(out):
                raise MaterializeError(f"candidate tensor {job.out_name} has NaN or Inf values")
            self._targets[job.out_name].copy_(out)

        seed = seed if seed is not None else (recipe.random_seed or 0)
        intra = torch.get_num_threads()
        if self.threads > 1:
            torch.set_num_threads(1)
        try:
            run_jobs(plan, write, device=self.device, seed=seed, threads=self.threads)
        finally:
            torch.set_num_threads(intra)

    def _write_blockwise(self, plan: MergePlan, recipe: Recipe, seed: int | None) -> bool:
        """Write a task-vector candidate block by block; False when the plan does not fit that route.

        It fits when every job merges the same sources onto the same base,
        tensor for tensor by name, the models share one layout and no
        ``dtype`` conversion precedes the arithmetic.
        """
        if plan.method.name not in BLOCKWISE or not plan.jobs or plan.jobs[0].base is None:
            return False
        base_name = plan.jobs[0].base[0]
        sources = [m for m, _ in plan.jobs[0].sources]
        base = self.pool[base_name]
        if any(self.pool[m].blocks != base.blocks for m in sources):
            return False
        jobs = {job.out_name: job for job in plan.jobs}
        if len(jobs) != len(base.names) or any(
            job.base != (base_name, name) or job.sources != tuple((m, name) for m in sources)
            for name, job in jobs.items()
        ):
            return False
        if recipe.dtype and any(block.dtype != recipe.dtype for block in base.blocks):
            return False
        seed = seed if seed is not None else (recipe.random_seed or 0)
        sparsifier = BLOCKWISE[plan.method.name][0]
        own_layout = base_name == self.base
        sums = []
        for b, block in enumerate(base.blocks):
            base_t = base.block(b)
            source_t = [self.pool[m].block(b) for m in sources]
            indexes = generators = None
            if sparsifier == "magnitude":
                indexes = [self._index(base_name, m, b, base_t, t) for m, t in zip(sources, source_t)]
            elif sparsifier == "random":
                generators = [torch.Generator(device=self.device).manual_seed(job_seed(seed, name))
                              for name in block.names]
            # export's casts: the kernel returns the base's dtype, the job casts to its own
            cast = getattr(torch, jobs[block.names[0]].dtype)
            live = self._live_blocks[b] if own_layout else None
            direct = live is not None and base_t.dtype == cast == live.dtype  # merged straight into the model
            out, total = merge_block(block, base_t, source_t, [jobs[name].kwargs for name in block.names],
                                     method=plan.method.name, generators=generators, indexes=indexes,
                                     fused=self.fused, out=live if direct else None)
            if not direct:
                out = out.to(cast)
                for name, shape, a, n in zip(block.names, block.shapes, block.offsets, block.sizes):
                    self._targets[name].copy_(out[a:a + n].view(shape))
                total = out.sum(dtype=torch.float32)  # float16 sums of finite entries could overflow
            sums.append(total)
        # one finiteness check per candidate (a host sync per block would idle a GPU); a candidate
        # that fails it has been written, and the next one rewrites every tensor
        if not all_finite(torch.stack(sums)):
            for block in base.blocks:
                bad = next((name for name in block.names if not all_finite(self._targets[name])), None)
                if bad is not None:
                    raise MaterializeError(f"candidate tensor {bad} has NaN or Inf values")
        return True

    def _share_blocks(self, names: dict[str, str]) -> list:
        """Per base block, a flat buffer the live parameters of its tensors are views of (``None``
        where they cannot be: buffers, tied or mixed-dtype tensors)."""
        from evomerge.io.live import share_flat_storage

        params = dict(self.model.named_parameters(remove_duplicate=False))
        uses = collections.Counter(id(params[live]) for live in names.values() if live in params)
        blocks = []
        for block in self.pool[self.base].blocks:
            own = [params.get(names.get(name, "")) for name in block.names]
            free = all(p is not None and tuple(p.shape) == shape and uses[id(p)] == 1
                       for p, shape in zip(own, block.shapes))
            blocks.append(share_flat_storage(own) if free else None)
        return blocks

    def _index(self, base: str, source: str, b: int, base_t: torch.Tensor, source_t: torch.Tensor) -> MagnitudeIndex:
        """The magnitude index of ``source - base`` over block ``b``, built on first use."""
        key = (base, source, b)
        if key not in self._indexes:
            self._indexes[key] = magnitude_index(self.pool[base].blocks[b], base_t, source_t, exact=self.fused)
        return self._indexes[key]

    def _restore_layers(self) -> None:
        """Put the live model's own layers and config back after a layer path."""
        if self._own_config is None:
            return
        self._set_layers(self._own_layers)
        for key, value in self._own_config.items():
            setattr(self.model.config, key, value)
        self._own_config = None

    def _set_layers(self, layers) -> None:
        owner = self.model.get_submodule(self._layers_owner) if self._layers_owner else self.model
        setattr(owner, self._layers_attr, layers)

    # -- layer paths -------------------------------------------------------------
    def _materialize_path(self, recipe: Recipe, seed: int | None):
        from evomerge.materialize.layer_path import read_path

        path = read_path(recipe, self.pool)
        plan = plan_merge(recipe, self.pool)
        arch = self.pool[self.base].arch
        self._check_layers(path)
        layers = [self._layers_of(step.model)[step.layer] for step in path]  # builds any missing, before any change
        globals_ = [job for job in plan.jobs if arch.layer_of(job.out_name) is None]
        missing = [job.out_name for job in globals_ if job.out_name not in self._targets]
        if missing:
            raise MaterializeError(f"the live model has no tensor {missing[0]!r}")
        self._write(dataclasses.replace(plan, jobs=globals_), recipe, seed)
        self._set_config(plan, arch)
        self._set_layers(torch.nn.ModuleList(
            ScaledLayer(layer, step.alpha, position) for position, (layer, step) in enumerate(zip(layers, path))
        ))
        return self.model

    def _set_config(self, plan: MergePlan, arch) -> None:
        """The path's layer count and per-layer lists (``layer_types``...) as export writes them."""
        config = self.model.config
        if self._own_config is None:
            # the live config's own values (the plan's lists already have the path's length)
            own = {k: getattr(config, k, None) for k in {*vars(config), *plan.config}}
            lists = set(arch.per_layer_keys(own))
            self._own_config = {k: getattr(config, k) for k in {arch.num_layers_key} | lists if hasattr(config, k)}
        own = self._own_config
        # Lists the stored config.json lacks (computed by the config class) are cut or extended like export's.
        derived = arch.with_num_layers(own, plan.num_layers)
        for key in own:
            setattr(config, key, plan.config[key] if key in plan.config else derived[key])

    def _check_layers(self, path) -> None:
        """Every path layer has the live model's layer tensors: same names, shapes and dtypes."""
        base = self.pool[self.base]
        want = {base.arch.split(n)[1]: (base.info(n).shape, base.info(n).dtype)
                for n in base.names if base.arch.layer_of(n) == 0}
        live = {str(p.dtype).removeprefix("torch.") for p in self._own_layers[0].parameters()}
        stored = {dtype for _, dtype in want.values()}
        if live != stored:
            raise MaterializeError(
                f"the pool's layers are {', '.join(sorted(stored))} but the live model runs in "
                f"{', '.join(sorted(live))}; a layer path uses the pool tensors as they are"
            )
        for k, step in enumerate(path):
            model = self.pool[step.model]
            have = {model.arch.split(n)[1]: (model.info(n).shape, model.info(n).dtype)
                    for n in model.names if model.arch.layer_of(n) == step.layer}
            if have != want:
                diff = min(set(have.items()) ^ set(want.items()))
                raise MaterializeError(
                    f"path step {k}: layer {step.layer} of {step.model} does not match the live model's layers "
                    f"(tensor {diff[0]!r}: {have.get(diff[0])} vs {want.get(diff[0])})"
                )

    def _layers_of(self, name: str) -> list:
        """Decoder layer modules of pool model ``name`` whose parameters are the pool tensors (built once)."""
        if name in self._live_layers:
            return self._live_layers[name]
        model = self.pool[name]
        own = self._own_layers
        if model.config.get("model_type") != self.model.config.model_type:
            raise MaterializeError(
                f"{name}: model_type {model.config.get('model_type')!r} differs from the live model's "
                f"{self.model.config.model_type!r}; its layers cannot be stacked into it"
            )
        config = type(self.model.config).from_dict(dict(model.config))
        config._attn_implementation = self.model.config._attn_implementation
        cls = type(own[0])
        by_layer: dict[int, dict[str, torch.Tensor]] = {}
        for tensor_name in model.names:
            parts = model.arch.split(tensor_name)
            if parts is not None:
                # a view of the resident pool (no copy) unless the pool is streamed from host or disk
                by_layer.setdefault(parts[0], {})[parts[1]] = model.tensor(tensor_name).to(self.device)
        layers = []
        for i in range(model.num_layers):
            with torch.device("meta"):
                try:
                    layer = cls(config, layer_idx=i)
                except TypeError:
                    layer = cls(config)
            try:
                layer.load_state_dict(by_layer.get(i, {}), strict=True, assign=True)
            except RuntimeError as exc:
                message = f"{name}: layer {i}: its tensors do not fit the live layer class: {exc}"
                raise MaterializeError(message) from None
            # Non-persistent buffers are not stored; they are structural, so the live model's own serve.
            for buf_name, buf in list(layer.named_buffers()):
                if buf.is_meta:
                    owner_name, _, attr = buf_name.rpartition(".")
                    owner = layer.get_submodule(owner_name) if owner_name else layer
                    src = own[min(i, len(own) - 1)].get_buffer(buf_name)
                    owner._buffers[attr] = src.clone()
            layer.requires_grad_(False)
            layer.eval()
            layers.append(layer)
        self._live_layers[name] = layers
        return layers


def _live_layer_container(arch, names: dict[str, str]) -> str:
    """Module path of the live model's layer list (``model.layers``; ``vit.layers`` for a renamed ViT)."""
    for name, own in names.items():
        parts = arch.split(name)
        if parts is not None:
            match = re.match(rf"^(.*)\.{parts[0]}\.", own)
            if match:
                return match.group(1)
    return arch.layer_prefix.rstrip(".")
