"""``file:`` models — TorchScript, ``torch.export`` programs and checkpoints — and
the safe reading of weights files that every source shares.

URIs (the location is a local path, ``file:///abs/path`` or ``s3://bucket/key``)::

    file:/models/net.ts?input_shape=3x32x32       TorchScript archive
    file:/models/net.pt2                          torch.export program (input shape from its example inputs)
    file:/models/ckpt.safetensors?arch=torchvision:resnet18&num_classes=10
    file:s3://bucket/ckpts/e5.pt                  a checkpoint naming its arch inside ({"arch": ..., "state_dict": ...})

Untrusted files are never unpickled with code execution: checkpoints are read
with safetensors or ``torch.load(weights_only=True)``, which refuses any pickle
that names a callable (the way a malicious pickle runs code). Such a file is
refused with a :class:`ZooauditError`, never executed. A full pickled
``nn.Module`` is refused for the same reason: save a ``state_dict``, a
TorchScript archive or a ``torch.export`` program instead.

Content hash: the weights (names, dtypes, shapes, bytes) plus, for programs,
the program text, so two programs with equal weights but different code differ.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import warnings
import zipfile
from urllib.parse import parse_qsl, urlparse

import torch

from ..errors import ZooauditError
from .types import LoadedModel, weights_hash

ALLOWED_QUERY = {"input_shape", "arch", "num_classes", "layers", "seed"}


# -- locations and bytes -------------------------------------------------------------

def split_uri(rest: str) -> tuple[str, dict[str, str]]:
    """``"path?a=1&b=2"`` → ``("path", {"a": "1", "b": "2"})``."""
    location, _, query = rest.partition("?")
    return location, dict(parse_qsl(query, keep_blank_values=True))


def _fs_and_path(location: str):
    import fsspec

    parsed = urlparse(location)
    if parsed.scheme == "s3":
        from ..store import _s3fs_options

        return fsspec.filesystem("s3", **_s3fs_options()), f"{parsed.netloc}/{parsed.path.lstrip('/')}"
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else location
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(path))
    raise ZooauditError(f"Unsupported location {location!r}: allowed are a local path, file:///abs/path "
                        "or s3://bucket/key.")


def read_bytes(location: str, what: str = "weights file") -> bytes:
    """Read a local / ``file://`` / ``s3://`` file; a missing file is a clear error (never a download)."""
    if not location:
        raise ZooauditError(f"No {what} given: expected a local path, file:///abs/path or s3://bucket/key.")
    fs, path = _fs_and_path(location)
    try:
        if not fs.exists(path):
            raise FileNotFoundError(path)
        with fs.open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise ZooauditError(f"The {what} {location!r} does not exist. zooaudit never downloads weights from "
                            "a hub: give a local or s3:// file.") from None


def _is_safetensors(data: bytes) -> bool:
    # 8-byte little-endian header length, then a JSON header starting with '{'.
    if len(data) < 9:
        return False
    n = int.from_bytes(data[:8], "little")
    return 0 < n <= len(data) - 8 and data[8:9] == b"{"


def load_checkpoint(data: bytes, location: str):
    """Deserialise a checkpoint without running code: safetensors, else
    ``torch.load(weights_only=True)``. Returns ``(object, safetensors metadata or {})``."""
    if _is_safetensors(data):
        import json

        from safetensors.torch import load as st_load

        try:
            tensors = st_load(data)
        except Exception as err:  # noqa: BLE001 — any parse failure is a bad file
            raise ZooauditError(f"{location!r} looks like safetensors but cannot be read: {err}") from None
        n = int.from_bytes(data[:8], "little")
        return tensors, json.loads(data[8:8 + n]).get("__metadata__") or {}
    if len(data) >= 9 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") > len(data) - 8:
        raise ZooauditError(f"{location!r} is a truncated safetensors file: its header says "
                            f"{int.from_bytes(data[:8], 'little')} header bytes, the file has {len(data)} bytes "
                            "in all. Copy or download it again.")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), {}
    except pickle.UnpicklingError as err:
        raise ZooauditError(
            f"Refused to load {location!r}: it is a pickle that asks to import or call Python objects, "
            f"which could run arbitrary code ({str(err).splitlines()[0][:200]}). Only tensors and plain "
            "containers are loaded (weights_only=True). Save a state_dict (torch.save(model.state_dict())), "
            "safetensors, a TorchScript archive or a torch.export program instead."
        ) from None
    except (RuntimeError, EOFError, ValueError) as err:
        raise ZooauditError(f"{location!r} is not a readable checkpoint (safetensors, torch.save state_dict, "
                            f"TorchScript or torch.export): {err}") from None


def unwrap_state_dict(obj, location: str) -> dict[str, torch.Tensor]:
    """A state dict from a checkpoint: the dict itself, or its ``state_dict`` /
    ``model`` / ``model_state_dict`` entry; a ``module.`` prefix (DataParallel) is dropped."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ZooauditError(f"{location!r} holds no state dict (a mapping of names to tensors, possibly under "
                            f"'state_dict' / 'model'); found {type(obj).__name__}.")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def read_state_dict(location: str) -> dict[str, torch.Tensor]:
    """The state dict in a local / s3 safetensors or torch.save file (never executes code)."""
    obj, _ = load_checkpoint(read_bytes(location), location)
    return unwrap_state_dict(obj, location)


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], location: str, arch: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the mismatched keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        def few(keys):
            return ", ".join(keys[:8]) + (f" … ({len(keys)} in all)" if len(keys) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        if wrong:
            parts.append("shape mismatches: " + few([f"{k} {tuple(state[k].shape)} vs model "
                                                     f"{tuple(own[k].shape)}" for k in wrong]))
        raise ZooauditError(f"The weights in {location!r} do not fit {arch}: " + "; ".join(parts) + ".")
    module.load_state_dict(state, strict=True)


def parse_shape(text: str | None, what: str = "input_shape") -> tuple[int, ...] | None:
    """``"3x32x32"`` → ``(3, 32, 32)``."""
    if text is None:
        return None
    try:
        shape = tuple(int(p) for p in text.lower().replace(",", "x").split("x"))
        if not shape or min(shape) < 1:
            raise ValueError
        return shape
    except ValueError:
        raise ZooauditError(f"Bad {what} {text!r}: expected positive integers joined by 'x', e.g. 3x32x32.") from None


def check_query(query: dict, allowed: set[str], uri: str) -> None:
    bad = sorted(set(query) - allowed)
    if bad:
        raise ZooauditError(f"Unknown option(s) {bad} in model URI {uri!r}. Allowed: {', '.join(sorted(allowed))}.")


# -- programs --------------------------------------------------------------------------

def _zip_names(data: bytes) -> list[str]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return zf.namelist()
    except zipfile.BadZipFile:
        return []


def _program_hash(state: dict[str, torch.Tensor], code: str) -> str:
    return hashlib.sha256((weights_hash(state) + "|" + hashlib.sha256(code.encode()).hexdigest()).encode()).hexdigest()


class _Slot(torch.nn.Module):
    """Stands for one submodule of a TorchScript program: called with that
    submodule's output so that forward hooks on it fire."""

    def forward(self, x):
        return x


def _scope(node) -> tuple[str, ...]:
    """Module path of an inlined TorchScript node, ``("layer1", "0")`` from either way torch writes it:
    ``SELF(ResNet).layer1(Sequential).0(BasicBlock)`` (the program's own ``SELF`` first), or
    ``layer1(Sequential).0(BasicBlock).SELF(BasicBlock)`` (torch ≥ 2.1x: the callee's ``SELF`` last)."""
    parts = [p.split("(")[0] for p in (node.getModuleHierarchy() or "").split(".")]
    return tuple(p for p in parts if p and p not in ("SELF", "UNKNOWN_INSTANCE"))


def _capture_program(program, paths: list[str]):
    """Compile a variant of ``program.forward`` that also returns the outputs of the
    submodules at ``paths``: ``fn(program._c, x) -> (output, *captured)``.

    TorchScript modules accept no Python hooks, so the forward graph is inlined,
    and the output of a submodule is the last tensor computed inside its scope
    that is used outside it. Returns ``(fn, found paths in graph order)``.
    """
    g = program.forward.graph.copy()
    torch._C._jit_pass_inline(g)
    nodes = list(g.nodes())
    pos = {n: i for i, n in enumerate(nodes)}
    scopes = [_scope(n) for n in nodes]
    found = []
    for path in paths:
        key = tuple(path.split("."))
        inside = {i for i, sc in enumerate(scopes) if sc[:len(key)] == key}
        best = None
        for i in sorted(inside):
            for out in nodes[i].outputs():
                if out.type().isSubtypeOf(torch._C.TensorType.get()) and any(
                        pos.get(u.user, -1) not in inside for u in out.uses()):
                    best = (i, out)
        if best is not None:
            found.append((best[0], path, best[1]))
    found.sort(key=lambda t: t[0])
    values = [next(iter(g.outputs())), *(v for _, _, v in found)]
    tup = g.create("prim::TupleConstruct", values)
    tup.insertBefore(g.return_node())
    tup.output().setType(torch._C.TupleType([v.type() for v in values]))
    g.eraseOutput(0)
    g.registerOutput(tup.output())
    return torch._C._create_function_from_graph("zooaudit_capture", g), [p for _, p, _ in found]


class TorchScriptModel(torch.nn.Module):
    """A TorchScript program whose submodules can be hooked like an eager model's.

    The module tree holds one :class:`_Slot` per submodule path of the program.
    A forward runs a compiled variant of the program that also returns the
    outputs of every hooked slot, then calls those slots with them so their
    hooks see exactly what the program's submodules computed. The whole
    program always runs (it cannot stop early).
    """

    def __init__(self, program):
        super().__init__()
        object.__setattr__(self, "program", program.eval())   # kept out of the module tree
        object.__setattr__(self, "_compiled", {})
        object.__setattr__(self, "_lock", __import__("threading").Lock())
        slot_types: dict[str, type] = {}
        for name, sub in program.named_modules():
            if name:
                parent, _, leaf = name.rpartition(".")
                # a Slot subclass named like the scripted class, so layer listings show "Conv2d"
                kind = getattr(sub, "original_name", "Slot")
                cls = slot_types.setdefault(kind, type(kind, (_Slot,), {}))
                (self.get_submodule(parent) if parent else self).add_module(leaf, cls())

    def _apply(self, fn, recurse=True):
        self.program._apply(fn)
        return super()._apply(fn, recurse)

    def forward(self, x):
        hooked = tuple(n for n, m in self.named_modules() if n and (m._forward_hooks or m._forward_pre_hooks))
        if not hooked:
            return self.program(x)
        with self._lock:
            if hooked not in self._compiled:
                self._compiled[hooked] = _capture_program(self.program, list(hooked))
            fn, names = self._compiled[hooked]
        out = fn(self.program._c, x)
        for name, value in zip(names, out[1:]):
            self.get_submodule(name)(value)
        return out[0]


def _load_torchscript(data: bytes, location: str, query: dict, uri: str) -> LoadedModel:
    import json

    extra = {"zooaudit.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # "torch.jit.load is deprecated": still the way to read one
        program = torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra)
    meta = json.loads(extra["zooaudit.json"]) if extra["zooaudit.json"] else {}
    shape = parse_shape(query.get("input_shape")) or (tuple(meta["input_shape"]) if "input_shape" in meta else None)
    if shape is None:
        raise ZooauditError(f"The TorchScript file {location!r} does not say its input shape: add "
                            "'?input_shape=CxHxW' to the URI (or save it with _extra_files={'zooaudit.json': "
                            "'{\"input_shape\": [...]}'}).")
    state = dict(program.state_dict())
    code = "\n".join(f"{name}:{m.code}" for name, m in program.named_modules() if hasattr(m, "code"))
    module = TorchScriptModel(program)
    return LoadedModel(uri=uri, module=module, content_hash=_program_hash(state, code), input_shape=shape,
                       default_layers=_top_level(module),
                       info={"source": "file", "format": "torchscript", "location": location})


def _load_export(data: bytes, location: str, query: dict, uri: str) -> LoadedModel:
    ep = torch.export.load(io.BytesIO(data))
    user_inputs = set(ep.graph_signature.user_inputs)
    for node in ep.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" and node.name in user_inputs else None
        if isinstance(val, torch.Tensor) and val.ndim and isinstance(val.shape[0], int):
            raise ZooauditError(
                f"The torch.export program {location!r} was exported with a fixed batch size {val.shape[0]} "
                f"(input {node.name!r}); extraction batches vary. Re-export with a dynamic batch dimension: "
                f"torch.export.export(model, (x,), dynamic_shapes=({{0: torch.export.Dim.DYNAMIC}},)).")
    # unflatten restores the module hierarchy, so layers keep their module paths.
    module = torch.export.unflatten(ep)
    shape = parse_shape(query.get("input_shape"))
    if shape is None:
        args = ep.example_inputs[0] if ep.example_inputs else ()
        if not args or not isinstance(args[0], torch.Tensor):
            raise ZooauditError(f"The torch.export program {location!r} has no example input tensor: add "
                                "'?input_shape=CxHxW' to the URI.")
        shape = tuple(args[0].shape[1:])
    state = {**ep.state_dict, **{f"const:{k}": v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)}}
    return LoadedModel(uri=uri, module=module, content_hash=_program_hash(state, str(ep.graph)), input_shape=shape,
                       default_layers=_top_level(module),
                       info={"source": "file", "format": "torch.export", "location": location})


def _top_level(module: torch.nn.Module) -> list[str]:
    """Default layers: the direct children except the last (usually the classifier head)."""
    names = [n for n, _ in module.named_children()]
    return names[:-1] or names


def _load_checkpoint_model(data: bytes, location: str, query: dict, uri: str, store, resolve) -> LoadedModel:
    obj, meta = load_checkpoint(data, location)
    arch = query.get("arch") or meta.get("zooaudit.arch") or (obj.get("arch") if isinstance(obj, dict) else None)
    if not isinstance(arch, str) or not arch:
        raise ZooauditError(
            f"The checkpoint {location!r} holds weights but no architecture: add '?arch=torchvision:<name>' "
            "(or timm:<name>, builtin:<name>) to the URI, or save it as {'arch': ..., 'state_dict': ...}.")
    if arch.startswith("file:"):
        raise ZooauditError(f"arch={arch!r} for {location!r}: the architecture must come from torchvision:, "
                            "timm: or builtin:, not another file.")
    extra = {k: v for k, v in query.items() if k in ("num_classes", "input_shape")}
    arch_uri = arch + ("?" + "&".join(f"{k}={v}" for k, v in extra.items()) if extra and "?" not in arch else "")
    skeleton = resolve(arch_uri, store)
    state = unwrap_state_dict(obj, location)
    load_into(skeleton.module, state, location, arch)
    module = skeleton.module.eval()
    return LoadedModel(uri=uri, module=module, content_hash=weights_hash(module.state_dict()),
                       input_shape=skeleton.input_shape, default_layers=skeleton.default_layers,
                       info={**skeleton.info, "source": "file", "format": "checkpoint", "arch": arch,
                             "location": location,
                             **({"epoch": obj["epoch"]} if isinstance(obj, dict) and "epoch" in obj else {})},
                       random_init=skeleton.random_init, random_init_seed=skeleton.random_init_seed)


def load(name: str, *, store=None, uri: str, resolve) -> LoadedModel:
    """Load ``file:<location>[?options]`` (see the module docstring).

    ``resolve(uri, store) -> LoadedModel`` builds a checkpoint's architecture from its URI
    (:func:`zooaudit.zoo.resolve_model` hands itself in, so this module does not import it).
    """
    location, query = split_uri(name)
    check_query(query, ALLOWED_QUERY, uri)
    data = read_bytes(location, "model file")
    names = _zip_names(data)
    # Archive layouts (torch 2.x): torch.export writes <root>/archive_format and
    # <root>/models/*.json; TorchScript <root>/code/... and <root>/constants.pkl.
    if any(n.endswith(("/archive_format", "/models/model.json")) for n in names):
        return _load_export(data, location, query, uri)
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return _load_torchscript(data, location, query, uri)
    return _load_checkpoint_model(data, location, query, uri, store, resolve)
