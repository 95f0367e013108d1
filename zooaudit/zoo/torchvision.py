"""``torchvision:<arch>`` and ``timm:<arch>`` models, from a weights file or a seeded random init.

URIs::

    torchvision:resnet18?weights=/path/r18.safetensors        weights from a local file
    torchvision:resnet18?weights=s3://bucket/r18.pt&num_classes=10
    torchvision:resnet18?seed=3&input_shape=3x64x64          random init, seed recorded
    timm:resnet10t?weights=file:///w/r10t.safetensors

Options: ``weights`` (safetensors or a torch.save state dict; read without
executing code, see :mod:`zooaudit.zoo.file`), ``seed`` (random init; default 0),
``num_classes``, ``input_shape`` (``CxHxW``; default the architecture's own,
224×224 for torchvision), and for timm vision transformers ``img_size`` and
``patch_size`` (create_model kwargs: ``timm:vit_tiny_patch16_224?img_size=64&patch_size=8``
takes 64×64 inputs as an 8×8 patch grid; ``img_size`` sets the default input shape).
The architecture is always built with ``weights=None`` / ``pretrained=False``:
nothing is downloaded, and a missing weights file is an error. Default layers:
timm's ``feature_info`` modules, else the model's direct children except the last
(the classifier head).
"""

from __future__ import annotations

import functools

import torch

from ..errors import ZooauditError, unknown
from .types import LoadedModel, weights_hash
from .file import check_query, load_into, parse_shape, read_state_dict, split_uri

ALLOWED_QUERY = {"weights", "seed", "num_classes", "input_shape"}
# create_model kwargs of timm's vision transformers (a ViT's position embedding is built for one
# input size: img_size=64 makes it take 64×64 inputs); timm: URIs only
TIMM_ONLY = ("img_size", "patch_size")
# Seed of the untrained control copy = the model's seed + this (as for builtin models).
RANDOM_INIT_SEED_OFFSET = 1_000_003


def _parse_int(query: dict, key: str, uri: str) -> int | None:
    if key not in query:
        return None
    try:
        return int(query[key])
    except ValueError:
        raise ZooauditError(f"Option {key}={query[key]!r} in {uri!r} must be an integer.") from None


@functools.lru_cache(maxsize=1)
def _torchvision_archs() -> tuple[str, ...]:
    import torchvision.models as tvm

    return tuple(sorted(tvm.list_models()))


def _close(name: str, names) -> str:
    import difflib

    near = difflib.get_close_matches(name, list(names), n=5, cutoff=0.6)
    return f"Closest: {', '.join(near)}." if near else ""


def _build_torchvision(arch: str, kwargs: dict) -> torch.nn.Module:
    import torchvision.models as tvm

    if arch not in _torchvision_archs():
        raise unknown("torchvision architecture", arch, _torchvision_archs(), hint=_close(arch, _torchvision_archs()))
    return tvm.get_model(arch, weights=None, **kwargs)


def _build_timm(arch: str, kwargs: dict) -> torch.nn.Module:
    import timm

    if not timm.is_model(arch):
        raise unknown("timm architecture", arch, timm.list_models(),
                      hint=_close(arch, timm.list_models()) + " (timm.list_models() lists them all).")
    return timm.create_model(arch, pretrained=False, **kwargs)


def _default_layers(module: torch.nn.Module) -> list[str]:
    info = getattr(module, "feature_info", None)
    if info is not None:
        names = [f["module"] for f in (info.get_dicts() if hasattr(info, "get_dicts") else info)]
        if names:
            return names
    children = [n for n, _ in module.named_children()]
    return children[:-1] or children


def _input_shape(library: str, module: torch.nn.Module, given: tuple[int, ...] | None) -> tuple[int, ...]:
    if given is not None:
        return given
    if library == "timm":
        cfg = getattr(module, "pretrained_cfg", None) or {}
        if cfg.get("input_size"):
            return tuple(cfg["input_size"])
    return (3, 224, 224)


def _load(library: str, name: str, *, store=None, uri: str) -> LoadedModel:
    arch, query = split_uri(name)
    check_query(query, ALLOWED_QUERY | (set(TIMM_ONLY) if library == "timm" else set()), uri)
    if not arch:
        raise ZooauditError(f"Model URI {uri!r} names no architecture: expected '{library}:<arch>', "
                            f"e.g. '{library}:resnet18'.")
    build = _build_torchvision if library == "torchvision" else _build_timm
    kwargs = {}
    if (num_classes := _parse_int(query, "num_classes", uri)) is not None:
        kwargs["num_classes"] = num_classes
    for key in TIMM_ONLY:
        if (value := _parse_int(query, key, uri)) is not None:
            kwargs[key] = value
    seed = _parse_int(query, "seed", uri)
    weights = query.get("weights")
    if weights is not None and seed is not None:
        raise ZooauditError(f"{uri!r} gives both weights= and seed=: a seed only applies to random "
                            "initialisation; give one of them.")
    seed = 0 if seed is None else seed

    def make(init_seed: int) -> torch.nn.Module:
        # Seeded init in a forked RNG so building a model never disturbs the caller's stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            try:
                return build(arch, kwargs).eval()
            except TypeError as err:   # e.g. img_size= given to a timm CNN
                if not any(k in kwargs for k in TIMM_ONLY):
                    raise
                raise ZooauditError(f"timm architecture {arch!r} does not take "
                                    f"{', '.join(f'{k}=' for k in TIMM_ONLY if k in kwargs)} ({err}); those are "
                                    "vision transformer options.") from None

    module = make(seed)
    info = {"source": library, "arch": arch, **kwargs}
    if weights is not None:
        load_into(module, read_state_dict(weights), weights, f"{library}:{arch}")
        info["weights"] = weights
    else:
        info["random_init_seed"] = seed
    given = parse_shape(query.get("input_shape"))
    if given is None and "img_size" in kwargs:   # timm keeps its pretrained_cfg's size: the model's own is this
        given = (_input_shape(library, module, None)[0], kwargs["img_size"], kwargs["img_size"])
    shape = _input_shape(library, module, given)
    return LoadedModel(
        uri=uri, module=module, content_hash=weights_hash(module.state_dict()), input_shape=shape,
        default_layers=_default_layers(module), info=info,
        random_init=lambda: make(seed + RANDOM_INIT_SEED_OFFSET), random_init_seed=seed + RANDOM_INIT_SEED_OFFSET,
    )


def load_torchvision(name: str, *, store=None, uri: str) -> LoadedModel:
    return _load("torchvision", name, store=store, uri=uri)


def load_timm(name: str, *, store=None, uri: str) -> LoadedModel:
    return _load("timm", name, store=store, uri=uri)
