"""What stages hand each other: small, immutable, picklable references — never arrays.

- :class:`ActivationsRef` is what every array stage takes: one model's committed
  activations on one dataset (repository, dataset key, snapshot, layers with their
  shapes and pooling, sample count, cache key) and the controls extracted beside them.
- :class:`ControlRef` is one control product (a seeded random-initialised copy's
  activations, the input token embeddings, the word-set embeddings of WEAT/SEAT): its
  own group, cache key and snapshot in the same repository.
- :class:`StageResult` is what a stage did: its cache key, the snapshot holding its
  result, whether it was a cache hit, and the headline summary stored with the commit.

The extraction plan (:class:`zooaudit.stages.activations.ExtractionPlan`: shards,
batch size, autocast…) stays inside the model stages.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..specs import DatasetSpec
from ..store import Repository
from ..tokens import is_token_shape


@dataclass(frozen=True)
class ControlRef:
    """One control extracted beside the activations (``<dataset>/controls/<kind>/...``).

    Attributes:
        kind: ``random_init`` | ``input_embeddings`` | ``wordsets``.
        group: the layout root of its arrays (``<ds>/controls/random_init``: ``acts/<layer>``
            below it, as for the activations themselves).
        cache_key: its own cache key (the random-init copy's seed, layers and pooling…).
        snapshot: the commit holding it.
        layers: the layers stored.
        provenance: what identifies the control (``random_init_seed``, word-set digest…).
    """

    kind: str
    group: str
    cache_key: str
    snapshot: str
    layers: tuple[str, ...]
    provenance: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ActivationsRef:
    """One model's committed activations on one dataset: what array stages read.

    ``shapes``: ``{layer: per-sample shape}`` (``(-1, unit)`` for all-tokens layers);
    ``device``: where array stages may compute (the run's device: ``auto``/``cpu``/
    ``cuda[:n]``) — not part of the activations' identity.
    """

    store: str
    model_uri: str
    model_key: str
    model_hash: str
    dataset: DatasetSpec
    ds_key: str
    ds_hash: str
    snapshot: str
    cache_key: str
    layers: list[str]
    shapes: dict
    pooling: str
    n_samples: int
    n_outputs: int | None
    has_groups: bool
    model_info: dict = field(default_factory=dict)
    device: str = "cpu"
    has_group_sets: bool = False                   # set-valued (multi-hot) attributes in the samples table
    controls: dict = field(default_factory=dict)   # {kind: ControlRef}

    @property
    def repository(self) -> Repository:
        """The model's repository (where the activations, controls and results live)."""
        return Repository.model(self.store, self.model_key)

    @property
    def sample_layers(self) -> list[str]:
        """Layers stored per sample ``(sample, ...)``; all-tokens layers ``(token, unit)`` are left
        out (the analyses that need one row per sample skip them)."""
        return [name for name in self.layers if not is_token_shape(self.shapes[name])]

    @property
    def family(self) -> str:
        """The model without its revision: ``builtin:mlp-w64-s0@5`` → ``builtin:mlp-w64-s0``."""
        return self.model_uri.split("@", 1)[0]

    @property
    def revision(self):
        """Sortable revision of the model within its family (the checkpoint epoch when known)."""
        return self.model_info.get("epoch", self.model_uri.partition("@")[2] or "")

    @property
    def dataset_meta(self) -> dict:
        """The dataset spec as stored in commit metadata."""
        return self.dataset.model_dump()

    def provenance(self) -> dict:
        """Commit-metadata fields that say which model and data a result comes from."""
        return {"model": self.model_uri, "model_hash": self.model_hash, "dataset": self.dataset_meta,
                "dataset_hash": self.ds_hash}


@dataclass
class StageResult:
    """What a stage did: its cache key, the snapshot holding its result, whether it was skipped.

    The activations stage also returns the :class:`ActivationsRef` the array stages take.
    """

    stage: str
    model: str
    dataset: str
    cache_key: str
    snapshot: str | None
    skipped: bool
    summary: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)
