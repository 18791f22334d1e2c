"""Device mesh and parameter partitioning, driven by config data.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel whose params and optimizer state are sharded),
`tensor` (tensor parallel: attention heads, MLP hidden, vocab). The batch is split over (`data`, `fsdp`).

Partition rules are data: `(regex on the param path, spec)` pairs, first match wins. A spec has one entry per
dimension (a mesh axis name, a tuple of axis names, or None); a spec shorter than the parameter is padded with
None on the left, so one rule covers `layers/q` [L, D, H*E] and `layers/q_bias` [L, H*E] alike. User rules
(`mesh.rules`) are tried before the defaults and must each match some parameter; the defaults may match
nothing (a tied model has no `lm_head`). After the rule, `fsdp` goes on the largest dimension the rule left
free that the fsdp size divides (never the stacked-layer axis, which `lax.scan` slices), so FSDP needs no
rule of its own.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from ropd_jax import model as model_lib

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Tensor parallelism for our param layout (see ropd_jax/model.py). fsdp is added automatically.
DEFAULT_RULES: tuple[tuple[str, tuple], ...] = (
    (r"^embed$", ("tensor", None)),                     # [V, D]: vocab over tensor
    (r"^lm_head$", (None, "tensor")),                   # [D, V]
    (r"^layers/(q|k|v)(_bias)?$", ("tensor",)),         # [L, D, H*E] / [L, H*E]: heads over tensor
    (r"^layers/o$", (None, "tensor", None)),            # [L, H*E, D]
    (r"^layers/(gate|up)$", (None, None, "tensor")),    # [L, D, F]: MLP hidden over tensor
    (r"^layers/down$", (None, "tensor", None)),         # [L, F, D]
    # The sampler's KV cache, one [rows, kv_heads, slots, head_dim] buffer per layer (`kv_cache_spec`).
    (r"^kv_cache/(k|v)$", (BATCH_AXES, "tensor", None, None)),
    (r".*", ()),                                        # norms, o_bias: replicated (fsdp may still apply)
)

# Paths the rules resolve besides the params: the sampler's per-layer KV cache.
CACHE_PATHS = ("kv_cache/k", "kv_cache/v")

# Params under this prefix carry the stacked-layer axis first; scanning over a sharded axis would gather it.
_STACKED_PREFIX = "layers/"


class ShardingError(ValueError):
  """A mesh or partition rule that does not fit the devices or the parameters."""


# -- mesh ------------------------------------------------------------------------------------------------
def mesh_shape(mesh_cfg: Mapping[str, Any], num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes; one of them may be -1 = the devices left over."""
  sizes = [int(mesh_cfg.get(axis, 1)) for axis in MESH_AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ShardingError(f"mesh: only one axis may be -1, got {dict(zip(MESH_AXES, sizes))}.")
  if any(s == 0 or s < -1 for s in sizes):
    raise ShardingError(f"mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}.")
  known = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % known:
      raise ShardingError(f"mesh: {num_devices} devices are not divisible by the fixed axes "
                          f"{dict(zip(MESH_AXES, sizes))} (product {known}).")
    sizes[free[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ShardingError(f"mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
                        f"{num_devices} are available; set one axis to -1 to take the rest.")
  return tuple(sizes)


def dcn_shape(mesh_cfg: Mapping[str, Any]) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes across slices (DCN); (1, 1, 1) on one slice."""
  sizes = tuple(int(mesh_cfg.get(f"dcn_{axis}", 1) or 1) for axis in MESH_AXES)
  if any(s < 1 for s in sizes):
    raise ShardingError(f"mesh: dcn_* sizes must be >= 1, got {dict(zip(MESH_AXES, sizes))}.")
  if sizes[2] > 1:
    raise ShardingError(f"mesh.dcn_tensor={sizes[2]}: tensor parallelism across slices would put every "
                        "layer's collectives on the slow data-center network; split data or fsdp over "
                        "slices (mesh.dcn_data / mesh.dcn_fsdp) and keep tensor inside a slice.")
  return sizes


def make_mesh(mesh_cfg: Mapping[str, Any], devices: Sequence[Any] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh in Auto (GSPMD) mode over `devices` (default: all, or the first
  `mesh.num_devices` of them when that is set).

  Multislice: `mesh.dcn_data` / `mesh.dcn_fsdp` > 1 split those axes over slices (TPU multislice, or one
  granule per process on GPU / CPU clusters). Each axis is then dcn x ici long, ordered so that the
  collectives of the inner (ici) part stay on a slice's fast interconnect; `data`, `fsdp`, `tensor` give the
  per-slice (ici) sizes.
  """
  devices = list(jax.devices() if devices is None else devices)
  wanted = int(mesh_cfg.get("num_devices", 0) or 0)
  if wanted:
    if wanted > len(devices):
      raise ShardingError(f"mesh.num_devices={wanted} but only {len(devices)} devices are available.")
    devices = devices[:wanted]
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  dcn = dcn_shape(mesh_cfg)
  if math.prod(dcn) == 1:
    return jax.make_mesh(mesh_shape(mesh_cfg, len(devices)), MESH_AXES, axis_types=axis_types, devices=devices)
  # TPU multislice devices carry their slice; elsewhere (GPU / CPU clusters) each process is a granule.
  by_slice = len({getattr(d, "slice_index", 0) for d in devices}) > 1
  granules = len({d.slice_index if by_slice else d.process_index for d in devices})
  if granules != math.prod(dcn):
    raise ShardingError(f"mesh: dcn sizes {dict(zip(MESH_AXES, dcn))} need {math.prod(dcn)} "
                        f"{'slices' if by_slice else 'processes'}, but the devices form {granules}; set "
                        "mesh.dcn_data x mesh.dcn_fsdp to the number of slices.")
  ici = mesh_shape(mesh_cfg, len(devices) // granules)
  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=not by_slice)
  return Mesh(grid, MESH_AXES, axis_types=axis_types)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dimension split over (data, fsdp); the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The batch axes (`data`, `fsdp`) this mesh has (a sampler mesh may lack some)."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_shards(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


# -- partition rules -------------------------------------------------------------------------------------
def _axes_of(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _normalize_rules(rules: Iterable) -> list[tuple[str, tuple]]:
  out = []
  for i, rule in enumerate(rules):
    if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
      raise ShardingError(f"mesh.rules[{i}] = {rule!r} is not a (regex, spec) pair, e.g. "
                          "('layers/q$', (None, 'fsdp', 'tensor')).")
    pattern, spec = rule
    try:
      re.compile(pattern)
    except re.error as e:
      raise ShardingError(f"mesh.rules[{i}]: bad regex {pattern!r} ({e}).") from e
    spec = tuple(spec) if isinstance(spec, (tuple, list)) else (spec,)
    out.append((pattern, spec))
  return out


def spec_for(path: str, shape: Sequence[int], spec: Sequence, mesh_sizes: Mapping[str, int],
             auto_fsdp: bool = True, auto_fsdp_min_size: int = 0) -> P:
  """Resolve one parameter's PartitionSpec: pad the rule's spec, check divisibility, add fsdp."""
  ndim = len(shape)
  if len(spec) > ndim:
    raise ShardingError(f"parameter {path!r} has shape {tuple(shape)} but its rule spec {tuple(spec)} has "
                        f"{len(spec)} entries; give at most {ndim}.")
  full = [None] * (ndim - len(spec)) + list(spec)
  used = []
  for dim, entry in enumerate(full):
    axes = _axes_of(entry)
    for axis in axes:
      if axis not in mesh_sizes:
        raise ShardingError(f"parameter {path!r}: spec {tuple(full)} names mesh axis {axis!r}; the mesh axes "
                            f"are {tuple(mesh_sizes)}.")
      if axis in used:
        raise ShardingError(f"parameter {path!r}: spec {tuple(full)} uses mesh axis {axis!r} twice.")
      used.append(axis)
    size = math.prod(mesh_sizes[a] for a in axes)
    if shape[dim] % size:
      raise ShardingError(f"parameter {path!r} dimension {dim} has size {shape[dim]}, not divisible by mesh "
                          f"axes {axes} of size {size} (spec {tuple(full)}); change the rule or the mesh.")
  fsdp = mesh_sizes.get("fsdp", 1)
  if (auto_fsdp and fsdp > 1 and "fsdp" not in used and math.prod(shape) >= auto_fsdp_min_size):
    first = 1 if path.startswith(_STACKED_PREFIX) else 0
    free = [d for d in range(first, ndim) if full[d] is None and shape[d] % fsdp == 0]
    if free:
      dim = max(free, key=lambda d: (shape[d], -d))  # largest; ties: the earlier dim
      full[dim] = "fsdp"
  return P(*full)


def partition_specs(params: Any, mesh_sizes: Mapping[str, int], rules: Iterable = (),
                    auto_fsdp: bool = True, auto_fsdp_min_size: int = 0) -> Any:
  """A PartitionSpec per parameter (same tree as `params`, whose leaves need only `.shape`)."""
  user = _normalize_rules(rules)
  defaults = _normalize_rules(DEFAULT_RULES)
  flat = model_lib.flatten_params(params)
  hits = [0] * len(user)
  specs = {}
  for path, leaf in flat.items():
    shape = tuple(np.shape(leaf)) if not hasattr(leaf, "shape") else tuple(leaf.shape)
    spec = None
    for i, (pattern, rule_spec) in enumerate(user):
      if re.search(pattern, path):
        hits[i] += 1
        spec = rule_spec
        break
    if spec is None:
      spec = next((s for pattern, s in defaults if re.search(pattern, path)), None)
    if spec is None:  # unreachable with the catch-all default, kept for edited defaults
      raise ShardingError(f"parameter {path!r} matches no partition rule; add one to mesh.rules.")
    specs[path] = spec_for(path, shape, spec, mesh_sizes, auto_fsdp, auto_fsdp_min_size)
  for (pattern, _), n in zip(user, hits):
    if n == 0 and not any(re.search(pattern, path) for path in CACHE_PATHS):
      raise ShardingError(f"mesh.rules pattern {pattern!r} matches no parameter; parameters are: "
                          f"{', '.join(sorted(flat))} (and {', '.join(CACHE_PATHS)}).")
  return model_lib.unflatten_params(specs)


def kv_cache_spec(mesh: Mesh, num_kv_heads: int, rules: Iterable = ()) -> tuple:
  """PartitionSpec entries of the sampler's per-layer KV cache `[rows, kv_heads, slots, head_dim]`: the
  first rule (user rules first) matching `kv_cache/k`, e.g. `('kv_cache', (('data', 'fsdp'), None, 'tensor',
  None))` splits the slots instead of the heads (long rollouts, few kv heads). Rows must stay on the batch
  axes (each host holds its own rows). By default kv heads go over `tensor` when it divides them."""
  user = _normalize_rules(rules)
  pattern, spec = next(r for r in user + _normalize_rules(DEFAULT_RULES) if re.search(r[0], CACHE_PATHS[0]))
  from_user = any(pattern == p for p, _ in user)
  if len(spec) > 4:
    raise ShardingError(f"mesh.rules {pattern!r}: kv_cache spec {spec} has more than 4 entries "
                        "([rows, kv_heads, slots, head_dim]).")
  full = [None] * (4 - len(spec)) + list(spec)
  present = lambda entry: tuple(a for a in _axes_of(entry) if a in mesh.axis_names)  # noqa: E731
  for entry in full:
    unknown = [a for a in _axes_of(entry) if a not in MESH_AXES]
    if unknown:
      raise ShardingError(f"mesh.rules {pattern!r}: kv_cache spec {tuple(full)} names mesh axis {unknown[0]!r}; "
                          f"the mesh axes are {MESH_AXES}.")
  batch = batch_axes(mesh)
  if present(full[0]) != batch:
    raise ShardingError(f"mesh.rules {pattern!r}: kv_cache spec {tuple(full)} must split its rows (first entry) "
                        f"over the batch axes {batch}, like the rollouts; put other axes on kv_heads or slots.")
  used = [a for entry in full for a in present(entry)]
  if len(used) != len(set(used)):
    raise ShardingError(f"mesh.rules {pattern!r}: kv_cache spec {tuple(full)} uses a mesh axis twice.")
  heads = math.prod(mesh.shape[a] for a in present(full[1]))
  if num_kv_heads % heads:
    if from_user:
      raise ShardingError(f"mesh.rules {pattern!r}: kv_cache kv_heads={num_kv_heads} is not divisible by mesh "
                          f"axes {present(full[1])} of size {heads}; split the slots instead, e.g. "
                          f"(('data', 'fsdp'), None, {present(full[1])[0]!r}, None).")
    full[1] = None   # the default: heads stay whole when tensor does not divide them

  def entry(e):
    axes = present(e)
    return None if not axes else axes[0] if len(axes) == 1 else axes

  return (batch,) + tuple(entry(e) for e in full[1:])


def param_shardings(params: Any, mesh: Mesh, rules: Iterable = (), auto_fsdp: bool = True,
                    auto_fsdp_min_size: int = 0) -> Any:
  """NamedShardings for `params` (arrays or ShapeDtypeStructs) on `mesh`."""
  sizes = dict(mesh.shape)
  specs = partition_specs(params, sizes, rules, auto_fsdp, auto_fsdp_min_size)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def param_shardings_from_config(params: Any, mesh: Mesh, mesh_cfg: Mapping[str, Any]) -> Any:
  return param_shardings(params, mesh, rules=mesh_cfg.get("rules", ()) or (),
                         auto_fsdp=bool(mesh_cfg.get("auto_fsdp", True)),
                         auto_fsdp_min_size=int(mesh_cfg.get("auto_fsdp_min_size", 0)))


def shard_params(params: Any, shardings: Any) -> Any:
  """Place a host (or single-device) params pytree onto the mesh."""
  return jax.tree.map(jax.device_put, params, shardings)
