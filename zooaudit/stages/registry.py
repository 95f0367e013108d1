"""The stages, declared once: which kind each is, the module to read, how to run it and its cache key.

Two kinds of stage (docs/architecture.md):

- **model stages** need the model and run on the extraction placement (GPU-resource
  workers when the device may be CUDA): ``activations`` (:mod:`.activations`) and the
  ``controls`` extracted beside them (:mod:`.controls`), run together by :mod:`.model`;
  their product is the :class:`~.refs.ActivationsRef`.
- **array stages** read committed arrays only: they take an ``ActivationsRef`` and their
  own typed spec (a field of :class:`zooaudit.specs.RunOptions`), and commit one result.
  Per model: :data:`ARRAY_STAGES`; across the models of one dataset: :data:`ZOO_STAGES`.

Adding an array stage is one module (``run(ref, spec, run_id) -> StageResult | None`` and
``key(ref, spec) -> str | None``, None = does not apply) plus one entry here; the flows,
the whole-model cache check and the Prefect task read this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import bias, bias_features, factorize, similarity, statistics, zoo

MODEL_STAGES = ("activations", "controls")


@dataclass(frozen=True)
class ArrayStage:
    """One per-model array stage.

    Attributes:
        name: the stage name in commits, results and task names.
        spec_field: the field of :class:`~zooaudit.specs.RunOptions` holding its spec.
        run: ``run(ref, spec, run_id=None) -> StageResult | None`` (None: nothing to do here).
        key: ``key(ref, spec) -> str | None``: its cache key (None: it does not apply to ``ref``).
        module: the module to read.
        after: array stages whose committed results it reads (the flow runs it once they finished).
        extra_specs: further :class:`~zooaudit.specs.RunOptions` fields it takes: its spec is then the
            tuple ``(spec_field's spec, *extra specs)`` (:meth:`spec_of`).
    """

    name: str
    spec_field: str
    run: Callable
    key: Callable
    module: str
    after: tuple[str, ...] = ()
    extra_specs: tuple[str, ...] = ()

    def spec_of(self, options):
        """The spec ``run`` and ``key`` take, from the run's options (an ``AuditModelSpec``/``RunOptions``)."""
        spec = getattr(options, self.spec_field)
        return (spec, *(getattr(options, f) for f in self.extra_specs)) if self.extra_specs else spec


@dataclass(frozen=True)
class ZooStage:
    """One array stage over every model audited on a dataset (commits to the zoo repository).
    ``run(refs, spec, **options, run_id=None)``; ``options`` name the zoo spec's fields it takes."""

    name: str
    spec_field: str
    run: Callable
    module: str
    options: tuple[str, ...] = ()


ARRAY_STAGES: tuple[ArrayStage, ...] = (
    ArrayStage("factorize", "factorize", factorize.run_factorize, factorize.factorize_key, factorize.__name__),
    ArrayStage("similarity", "similarity", similarity.run_similarity, similarity.similarity_key, similarity.__name__),
    ArrayStage("bias", "bias", bias.run_bias, bias.bias_key, bias.__name__),
    ArrayStage("bias-features", "bias", bias_features.run_bias_features, bias_features.bias_features_key,
               bias_features.__name__, after=("factorize",), extra_specs=("factorize",)),
    ArrayStage("statistics", "statistics", statistics.run_statistics, statistics.statistics_key,
               statistics.__name__),
)

ZOO_STAGES: tuple[ZooStage, ...] = (
    ZooStage("zoo-similarity", "similarity", zoo.run_zoo_similarity, zoo.__name__, options=("compare_layers",)),
    ZooStage("revision-similarity", "similarity", zoo.run_revision_similarity, zoo.__name__),
)


def array_stage(name: str) -> ArrayStage:
    """The declaration of the per-model array stage ``name`` (an error lists the known ones)."""
    from ..errors import ZooauditError

    for stage in ARRAY_STAGES:
        if stage.name == name:
            return stage
    raise ZooauditError(f"Unknown array stage {name!r}. Known: {', '.join(s.name for s in ARRAY_STAGES)}.")


def zoo_stage(name: str) -> ZooStage:
    from ..errors import ZooauditError

    for stage in ZOO_STAGES:
        if stage.name == name:
            return stage
    raise ZooauditError(f"Unknown zoo stage {name!r}. Known: {', '.join(s.name for s in ZOO_STAGES)}.")


def run_array_stage(name: str, ref, spec, run_id: str | None = None):
    """Run the per-model array stage ``name`` on ``ref`` with its spec."""
    return array_stage(name).run(ref, spec, run_id=run_id)


def run_zoo_stage(name: str, refs: list, spec, options: dict | None = None, run_id: str | None = None):
    """Run the zoo stage ``name`` over ``refs`` (every model on one dataset)."""
    stage = zoo_stage(name)
    return stage.run(refs, *(options or {}).values(), spec, run_id=run_id) if stage.options else \
        stage.run(refs, spec, run_id=run_id)
