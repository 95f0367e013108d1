"""Pydantic specs shared by the CLI, the flows and the Prefect UI forms.

Every run is described by one of these serializable specs; it is saved beside
the results (commit metadata, report manifest) and its parts feed the stage
cache keys.
"""

from __future__ import annotations

from datetime import date
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Pooling = Literal["mean", "flatten", "none", "cls", "token_mean", "tokens"]


def _similarity_metrics() -> tuple[str, ...]:
    """The similarity metric names, from their declaration (:mod:`zooaudit.analysis.metrics`)."""
    from .analysis.metrics import METRICS

    return METRICS


def _factorize_methods() -> tuple[str, ...]:
    """The factorization methods a spec may ask for: the declared refittable methods, then Eigen-CAM."""
    from .analysis.factor_methods import FACTOR_METHODS

    return (*FACTOR_METHODS, "eigencam")


def _default_zoo() -> list[str]:
    """The builtin demo zoo's model URIs (:mod:`zooaudit.zoo.catalog`: names only, no model code)."""
    from .zoo.catalog import default_zoo

    return default_zoo()


def _allowed_items(schema: dict, allowed: tuple[str, ...]) -> None:
    """JSON schema of a list of names: its items one of ``allowed`` (the UI form renders a choice).
    Called when the schema is built, so importing the specs imports no analysis code."""
    schema["items"] = {**schema.get("items", {}), "enum": list(allowed)}


class DatasetSpec(BaseModel):
    """An audit dataset. ``colored-digits`` follows the Colored-MNIST construction."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("digits", description="Dataset name: 'digits', 'colored-digits', 'scenes' "
                      "(generated shapes on backgrounds, with masks), or a file-backed one.")
    split: Literal["train", "test", "all"] = Field("test", description="Which split of the data to audit on.")
    color_flip: float = Field(
        0.5, ge=0.0, le=1.0,
        description="colored-digits only: probability that the colour disagrees with the label "
        "(0.5 = colour independent of label, a balanced test set; small = strong shortcut).",
    )
    label_noise: float = Field(0.25, ge=0.0, le=0.5, description="colored-digits only: label flip probability.")
    seed: int = Field(0, description="Seed of the dataset's random draws (noise, colours).")
    max_samples: int | None = Field(None, ge=1, description="Keep only the first N samples (for quick runs).")
    path: str | None = Field(None, description="File-backed datasets ('text'): the file to read "
                             "(default: the example shipped with zooaudit).")
    options: dict[str, str | int | float | bool | list[str]] = Field(
        default_factory=dict, description="Source-specific options of file-backed datasets (image-folder, "
        "arrays, hf-disk): e.g. image_size, on_error, inputs/labels keys, groups; each loader lists its own.")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from .data.registry import DATASETS

        if v not in DATASETS:
            raise ValueError(f"unknown dataset {v!r}; allowed: {', '.join(sorted(DATASETS))}")
        return v


class FactorizeSpec(BaseModel):
    """Factorization per layer; spatial maps (pooling 'none') use positions as samples (DFF)."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(8, ge=1, le=256, description="Number of components per layer (SAE: see sae_latents).")
    methods: list[str] = Field(
        ["pca", "nmf"], description="pca, nmf (non-negative layers), semi_nmf (signed layers), sae (TopK), "
        "eigencam (per-image maps of spatial layers only).",
        json_schema_extra=lambda schema: _allowed_items(schema, _factorize_methods()))
    on_negative: Literal["skip", "error", "shift", "semi_nmf"] = Field(
        "skip", description="NMF on a layer with negative values: skip it (reason recorded), fail, subtract the "
        "layer minimum, or run semi-NMF instead.")
    k_above_features: Literal["clip", "error"] = Field(
        "clip", description="A layer with fewer features than k: use k = features (recorded) or fail.")
    k_sweep: list[int] = Field([], description="Also fit these k and store the quality curve (empty = no sweep).")
    seeds: list[int] = Field([0, 1, 2], description="Refit with these seeds for seed stability (Hungarian-matched "
                             "cosine); fewer than 2 distinct seeds = off.")
    stability_rows: int = Field(20_000, ge=0, description="The seed-stability refits (and the k sweep's) use a fixed "
                                "random subset of at most this many rows — samples, or positions/tokens for maps — "
                                "drawn once from random_state and shared by every seed; the stored fit always uses "
                                "all rows. 0 = all rows. Stored as attrs stability_rows / stability_subset.")
    top_n: int = Field(8, ge=1, le=64, description="Top-activating samples stored per component.")
    max_iter: int = Field(400, ge=10, description="NMF / semi-NMF iteration budget.")
    sae_latents: int | None = Field(None, ge=1, description="SAE dictionary size (default 4·k).")
    sae_topk: int = Field(4, ge=1, description="Active SAE latents per sample.")
    sae_epochs: int = Field(10, ge=1, description="SAE training epochs.")
    random_state: int = 0

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        allowed = _factorize_methods()
        bad = [m for m in v if m not in allowed]
        if bad:
            raise ValueError(f"unknown factorization method(s) {bad}; allowed: {', '.join(allowed)}")
        return v

    @field_validator("k_sweep")
    @classmethod
    def _ks(cls, v: list[int]) -> list[int]:
        if any(k < 1 for k in v) or len(set(v)) != len(v):
            raise ValueError(f"k_sweep must list distinct positive integers; got {v}")
        return sorted(v)


class BiasSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_boot: int = Field(200, ge=0, description="Bootstrap resamples for confidence intervals (0 = none).")
    ci: float = Field(0.95, gt=0.0, lt=1.0, description="Confidence level of the intervals.")
    random_state: int = 0
    min_group_size: int = Field(20, ge=1, description="Cells smaller than this are reported but never flagged.")
    n_permutations: int = Field(1000, ge=0, description="Permutations for each disparity's p-value.")
    correction: Literal["bh", "holm"] = Field("bh", description="Multiple-testing correction across the run.")
    alpha: float = Field(0.05, gt=0.0, lt=1.0, description="Level at which corrected p-values flag a disparity.")
    probes: bool = Field(True, description="Probe leakage of each group attribute from each layer, with controls.")
    erasure: bool = Field(True, description="LEACE erasure diagnostic per layer (needs probes).")
    probe_cv: int = Field(5, ge=2, description="Cross-validation folds of the probes.")
    probe_max_samples: int = Field(5000, ge=20, description="Probes and erasure use at most this many samples.")
    weat_sets: str | None = Field(
        "example", description="Text encoders: word-set file (YAML/JSON) of WEAT/SEAT tests; 'example' = the set "
        "shipped with zooaudit; empty/None = no association tests. Ignored for other models.")
    weat_permutations: int = Field(10_000, ge=1, description="Monte Carlo partitions per WEAT/SEAT test when exact "
                                   "enumeration is too large.")
    measures: list[Literal["amplification", "contextual", "shortcut", "components"]] = Field(
        ["amplification", "contextual", "shortcut", "components"],
        description="Bias measures beyond group accuracy: bias amplification against the training data "
        "(Zhao 2017, Wang & Russakovsky 2021, Zhao et al. 2023), contextual bias pairs (Singh et al. 2020), "
        "shortcut reliance on counterfactual pairs (datasets that have them), and which factorization "
        "components carry the group attribute and the errors (the bias-features stage, after factorize).")
    train_split: Literal["auto", "model", "train", "test", "all"] | None = Field(
        "auto", description="Training side of amplification and of the contextual pairs: 'model' = the training "
        "data the model source records (builtin models), 'train'/'test'/'all' = that split of the audit dataset "
        "(with train_options), 'auto' = the model's when it records one on the same dataset, else 'train'. "
        "None: no training side (amplification and contextual bias are then not allowed in measures).")
    train_options: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="DatasetSpec fields replaced on the training side of a split "
        "(e.g. {'color_flip': 0.1}); the dataset's options go in 'options'.")
    max_order: int = Field(2, ge=1, le=4, description="Largest label set of the multi-attribute amplification.")
    contextual_top_k: int = Field(20, ge=1, description="Most biased (category, context) pairs kept.")
    multi_label: bool | None = Field(
        None, description="Task side of amplification and contextual bias: True = the dataset's multi-hot label "
        "sets (label_sets; an error when the audit or training side has none), False = the single labels, "
        "None = the label sets when the audit dataset has them. Multi-label predictions are the outputs whose "
        "sigmoid reaches multi_label_threshold.")
    multi_label_threshold: float = Field(
        0.5, gt=0.0, lt=1.0, description="Multi-label: a label is predicted when the sigmoid of its logit is at "
        "least this (0.5 = logit ≥ 0); the sigmoids are the scores of the contextual bias.")

    @model_validator(mode="after")
    def _training_side(self) -> BiasSpec:
        needs = [m for m in self.measures if m in ("amplification", "contextual")]
        if needs and self.train_split is None:
            raise ValueError(f"measures {needs} need a training side: set train_split ('auto', 'model', 'train', "
                             "'test' or 'all') or drop them from measures")
        if len(set(self.measures)) != len(self.measures):
            raise ValueError(f"bias measures listed twice: {sorted({m for m in self.measures if self.measures.count(m) > 1})}")
        return self


class SimilaritySpec(BaseModel):
    """Which similarity metrics to compute, and the control reported beside each."""

    model_config = ConfigDict(extra="forbid")

    metrics: list[str] = Field(["linear_cka"], description="Similarity metrics (e.g. linear_cka, "
                               "linear_cka_debiased, rbf_cka, svcca, pwcca, procrustes, rsa, mutual_knn, "
                               "minibatch_cka).",
                               json_schema_extra=lambda schema: _allowed_items(schema, _similarity_metrics()))
    control: Literal["shuffle", "random_init", "none"] = Field(
        "shuffle", description="Control beside every similarity: the same metric with the second representation's "
        "samples shuffled, or against a random-initialised copy of the model.")
    control_max_samples: int = Field(20_000, ge=10, description="Controls use at most this many samples.")
    pairwise_max_samples: int = Field(
        5000, ge=10, le=10_000, description="RBF CKA, RSA and mutual k-NN (n×n Grams, RDMs, neighbour search) use a "
        "fixed random subset of at most this many samples; the streamed metrics use all samples.")
    minibatch_kernel: Literal["linear", "rbf"] = Field(
        "linear", description="Kernel of minibatch_cka: linear estimates debiased linear CKA, rbf debiased RBF CKA "
        "(median-distance bandwidth) over every sample.")
    minibatch_size: int = Field(1024, ge=4, le=10_000, description="Samples per minibatch of minibatch_cka (each a "
                                "b×b Gram in memory).")
    random_state: int = 0

    @field_validator("metrics")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        METRICS = _similarity_metrics()
        bad = [m for m in v if m not in METRICS]
        if bad:
            raise ValueError(f"unknown similarity metric(s) {bad}; allowed: {', '.join(METRICS)}")
        if not v:
            raise ValueError(f"give at least one similarity metric; allowed: {', '.join(METRICS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"similarity metrics listed twice: {sorted({m for m in v if v.count(m) > 1})}")
        return v


def _attribution_methods() -> tuple[str, ...]:
    """The attribution methods (declared in :mod:`zooaudit.analysis.attribution`, no torch)."""
    from .analysis.attribution import METHODS

    return METHODS


class AttributionSpec(BaseModel):
    """Attribution maps (a model stage, zooaudit.stages.attribution): CAMs and pixel maps per
    model × dataset × layer, their faithfulness, localisation and background reliance."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Compute attribution maps where they apply (classifiers on image "
                          "datasets with a spatial layer).")
    only_masked: bool = Field(True, description="Only on datasets with foreground masks (scenes, or image-folder / "
                              "arrays given masks): there localisation and background reliance can be measured.")
    layers: list[str] | None = Field(None, description="Spatial layers the CAMs read (default: the last of the "
                                     "model's default layers whose output is (channel, y, x)).")
    methods: list[str] = Field(["gradcam", "gradcam++", "layercam", "scorecam", "eigencam", "grad_x_input",
                                "integrated_gradients"], description="Attribution methods.",
                               json_schema_extra=lambda schema: _allowed_items(schema, _attribution_methods()))
    target: str = Field("predicted", description="Class explained: 'predicted', 'true', a class index or a class "
                        "name of the dataset.")
    max_samples: int = Field(128, ge=2, description="Maps of at most this many samples (a fixed random subset).")
    batch_size: int = Field(32, ge=1, description="Samples per forward/backward (and masked or perturbed inputs "
                            "per Score-CAM, IG and curve forward).")
    ig_steps: int = Field(32, ge=1, description="Integrated Gradients midpoint steps (the completeness gap is "
                          "stored per sample as ig_gap).")
    ig_baseline: float = Field(0.0, description="Integrated Gradients baseline: a constant image of this value.")
    curve_samples: int = Field(32, ge=0, description="Deletion/insertion curves on the first N of the mapped "
                               "samples (0 = none).")
    curve_steps: int = Field(10, ge=2, description="Steps of the deletion/insertion curves.")
    curve_baseline: float = Field(0.0, description="Value that deleted pixels take (and insertion starts from).")
    road_samples: int = Field(0, ge=0, le=1024, description="ROAD MoRF/LeRF curves (noisy linear imputation, Rong et "
                              "al. 2022; zooaudit.road) on the first N of the mapped samples, at the curve_steps "
                              "fractions (0 = off; at 0 the cache key is the one it was before ROAD).")
    road_sigma: float = Field(0.01, ge=0.0, le=1.0, description="Standard deviation of the gaussian noise added to "
                              "the imputed pixels (input units; the reference implementation's 0.01).")
    smooth_samples: int = Field(8, ge=1, le=256, description="Smooth Grad-CAM++ (method 'smoothgradcam++', opt-in): "
                                "noisy copies per sample, each one forward and backward of the batch (at the "
                                "default the cache key is the one it was before Smooth Grad-CAM++).")
    smooth_sigma: float = Field(0.15, ge=0.0, le=1.0, description="Smooth Grad-CAM++ noise: the gaussian's standard "
                                "deviation as a fraction of each input's range (max − min; SmoothGrad's noise "
                                "level). "
                                "0 = no noise: the maps are Grad-CAM++'s.")
    iou_threshold: float = Field(0.5, gt=0.0, le=1.0, description="IoU: map ≥ this fraction of its max vs mask.")
    sanity_samples: int = Field(8, ge=0, description="Cascading-randomisation sanity check on the first N mapped "
                                "samples (0 = off): every parameterised layer re-initialised from the top.")
    sanity_threshold: float = Field(0.5, ge=-1.0, le=1.0, description="A method is flagged when its maps' mean "
                                    "Spearman with the trained model's stays ≥ this after randomising every layer.")
    sanity_ssim_threshold: float = Field(0.5, ge=-1.0, le=1.0, description="… or when their mean SSIM with the "
                                         "trained model's (maps min-max scaled to [0, 1]) stays ≥ this.")
    n_boot: int = Field(500, ge=0, description="Bootstrap resamples of the background-share CIs.")
    n_permutations: int = Field(1000, ge=0, description="Permutations of the group-difference p-values.")
    ci: float = Field(0.95, gt=0.0, lt=1.0)
    correction: Literal["bh", "holm"] = Field("bh", description="Multiple-testing correction over the methods × "
                                              "attributes of one run.")
    alpha: float = Field(0.05, gt=0.0, lt=1.0)
    random_state: int = 0
    text_reference: str | None = Field(
        None, min_length=1, description="Text encoders: token attributions (the text methods grad_x_input, "
        "integrated_gradients on the word embeddings) explain the cosine similarity of each text's sentence "
        "embedding to this reference sentence (zooaudit.stages.attribution_text). None = no token attributions.")
    regression_background_increase: float = Field(
        0.05, ge=0.0, le=1.0, description="Regression alert (\"the model began looking at the background\"): a "
        "method's mean background share at a layer up by more than this (absolute) since the previous attribution "
        "audit of the model on the dataset, with the bootstrap CI (at ci) of the rise above 0; paired by sample id "
        "when both audits mapped the same samples (zooaudit.stages.attribution_regression).")

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        allowed = _attribution_methods()
        bad = [m for m in v if m not in allowed]
        if bad or not v or len(set(v)) != len(v):
            raise ValueError(f"attribution methods must be distinct names from {', '.join(allowed)}; got {v}")
        return v
class StatisticsSpec(BaseModel):
    """Activation statistics per layer (:mod:`zooaudit.stages.statistics`): sparsity, dead and
    massive activations, the spectrum, and neural collapse on labelled datasets."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Compute the activation statistics stage.")
    eps: float = Field(0.0, ge=0.0, description="An activation is active when |a| > eps (0 = non-zero).")
    top_k: int = Field(16, ge=1, le=1024, description="Largest |a| kept per layer with their (sample, unit).")
    massive_abs_threshold: float = Field(100.0, gt=0.0, description="Massive activation (Sun et al. 2024): "
                                         "|a| above this …")
    massive_ratio_threshold: float = Field(1000.0, gt=0.0, description="… and above this many times the "
                                           "layer's median |a|.")
    max_spectrum_width: int = Field(4096, ge=0, description="Layers wider than this (flattened units) get no "
                                    "p×p covariance: their spectrum comes from the n×n Gram of the centred rows "
                                    "when n < p and the rows fit in memory, else none; the route is recorded. "
                                    "0 = no spectrum.")
    nc_layers: list[str] = Field(["penultimate"], description="Layers whose neural collapse (NC1–NC4) is computed "
                                 "on labelled datasets: names, 'penultimate' (the last per-sample layer before "
                                 "the output layer) or '*' (every per-sample layer); empty = none.")
    regression_dead_increase: float = Field(
        0.05, ge=0.0, le=1.0, description="Regression alert: a layer's dead-unit fraction up by more than this "
        "(absolute) since the previous statistics audit of the model on the dataset.")
    regression_relative_change: float = Field(
        0.25, gt=0.0, description="Regression alert: a layer's effective rank, or an NC layer's NC1, moved by more "
        "than this fraction of its previous value.")


class RunOptions(BaseModel):
    """Options shared by model and zoo audits."""

    model_config = ConfigDict(extra="forbid")

    datasets: list[DatasetSpec] = Field(
        default_factory=lambda: [DatasetSpec(name="digits"), DatasetSpec(name="colored-digits")],
        description="Datasets to audit on; each model is audited on those that fit its input shape.",
    )
    layers: list[str] | None = Field(
        None, description="Layer module paths or glob patterns; default: the model's own default layers."
    )
    pooling: Pooling = Field("mean", description="How spatial maps are stored: spatial mean, flatten, or none; "
                             "token outputs: cls, token_mean (mask-aware; 'mean' is the same), or tokens (all "
                             "tokens, (token, unit) plus per-sample offsets).")
    dtype: Literal["float32", "float16"] = Field("float32", description="dtype of the stored activations.")
    batch_size: int = Field(256, ge=1)
    shard_size: int = Field(256, ge=1, description="Samples per extraction shard = Zarr chunk of the sample dim.")
    device: str = Field("cpu", description="'auto', 'cpu' or 'cuda[:n]'.")
    autocast: Literal["none", "bf16", "fp16"] = Field(
        "none", description="Mixed-precision forward (torch.autocast): bf16 or fp16 on a GPU (bf16 also on the "
        "CPU); 'none' runs float32. Activations are stored as float32 or float16 either way (see dtype).")
    factorize: FactorizeSpec = Field(default_factory=FactorizeSpec)
    bias: BiasSpec = Field(default_factory=BiasSpec)
    similarity: SimilaritySpec = Field(default_factory=SimilaritySpec)
    attribution: AttributionSpec = Field(default_factory=AttributionSpec)
    statistics: StatisticsSpec = Field(default_factory=StatisticsSpec)
    store: str | None = Field(None, description="Store root URL; default $ZOOAUDIT_STORE or ./zooaudit-store.")
    task_runner: Literal["dask", "threads"] = Field(
        "dask", description="Where tasks run: a Dask cluster (local processes unless dask_address is set) or threads.")
    dask_address: str | None = Field(None, description="Address of an existing Dask scheduler (tcp://host:port).")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"bad device {v!r}; allowed: 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return v


class AuditModelSpec(RunOptions):
    """Audit one model: extract, factorize, similarity, bias."""

    model: str = Field("builtin:mlp-w64-s0", description="Model URI, e.g. 'builtin:cnn-w16-s0' or 'builtin:mlp-w64-s0@5'.")


class AuditZooSpec(RunOptions):
    """Audit every model of a zoo, then compare them on shared datasets."""

    models: list[str] = Field(
        default_factory=_default_zoo,
        description="Model URIs of the zoo.",
    )
    compare_layers: list[str] | None = Field(
        None, description="Layers compared across models (model × model matrices). Default: 'embed' when a "
        "model audits it (the builtin zoo), else the deepest layer every zoo model audits.")
    tag: str | None = Field(
        None, description="Tag this version of every audited repository after the run; '{date}' becomes the "
        "run's scheduled date (YYYY-MM-DD). Runs of the nightly deployment are tagged 'nightly-{date}' "
        "by default. Letters, digits, '.', '_' and '-' only.")

    @field_validator("tag")
    @classmethod
    def _tag(cls, v: str | None) -> str | None:
        if v is not None:
            from .versions import validate_tag

            try:
                validate_tag(v.replace("{date}", "2000-01-01"))
            except Exception as err:  # noqa: BLE001 — re-raised as the form's validation message
                raise ValueError(str(err)) from None
        return v
    cka_drop_threshold: float = Field(
        0.1, ge=0.0, le=1.0, description="Nightly regression alert: a layer whose linear CKA to the previous "
        "night's activations of the same model falls below 1 − this value raises a regression event.")

    manifest: str | None = Field(
        None, description="A zoo manifest (YAML; local path, file:// or s3://): listed models and/or globs over "
        "checkpoint folders, with per-family layer selections. Replaces `models` (zooaudit.zoo.manifest).")
    model_layers: dict[str, list[str]] = Field(
        default_factory=dict, description="Per-model layer selections (filled from the manifest); "
        "models not listed use `layers`.")

    @model_validator(mode="after")
    def _manifest(self) -> AuditZooSpec:
        if self.manifest is not None:
            from .zoo.manifest import load_manifest

            entries = load_manifest(self.manifest)
            # A re-validated dump carries both; they must agree (a user giving both gets an error).
            if "models" in self.model_fields_set and self.models and self.models != [e.uri for e in entries]:
                raise ValueError("give either `models` or `manifest`, not both")
            self.models = [e.uri for e in entries]
            self.model_layers = {e.uri: list(e.layers) for e in entries if e.layers}
        return self

    def model_spec(self, model: str) -> AuditModelSpec:
        fields = self.model_dump(exclude={"models", "compare_layers", "manifest", "model_layers", "cka_drop_threshold", "tag"})
        fields["layers"] = self.model_layers.get(model, fields["layers"])
        return AuditModelSpec(model=model, **fields)


class BackfillSpec(BaseModel):
    """Backfill audits over a zoo's history: every checkpoint of some models, or a range of past nights.

    Each item becomes a run of a deployment (``audit-model/on-demand`` per checkpoint,
    ``audit-zoo/nightly`` per night) with an idempotency key, so rerunning the same
    backfill creates no duplicate runs; items already audited are skipped.
    """

    model_config = ConfigDict(extra="forbid")

    mode: Literal["checkpoints", "nights"] = Field(
        "checkpoints", description="'checkpoints': audit every checkpoint matched by `models`; "
        "'nights': rerun the nightly zoo audit for each date from `start` to `end`.")
    models: list[str] = Field(
        ["builtin:mlp-w32-s0@*"], description="checkpoints mode: model URIs or checkpoint globs "
        "('builtin:mlp-w32-s0@*' = every checkpoint of that model, 'builtin:cnn-*@*' = of several).")
    start: date | None = Field(None, description="nights mode: first night (YYYY-MM-DD).")
    end: date | None = Field(None, description="nights mode: last night, inclusive (YYYY-MM-DD).")
    manifest: str | None = Field(
        None, description="checkpoints mode: a zoo manifest (YAML) whose models, globs included, are the "
        "checkpoints to audit (with its per-family layers); replaces `models`.")
    audit: RunOptions = Field(default_factory=RunOptions, description="Audit options used for every checkpoint.")
    zoo: AuditZooSpec | None = Field(None, description="nights mode: the zoo spec of each night "
                                     "(default: the nightly deployment's own parameters).")
    concurrency: int = Field(2, ge=1, le=64, description="At most this many item runs at once.")
    timeout_s: float = Field(3600.0, gt=0, description="Give up waiting for one item run after this many seconds.")

    @model_validator(mode="after")
    def _range(self) -> BackfillSpec:
        if self.mode == "nights":
            if self.start is None or self.end is None:
                raise ValueError("nights mode needs both `start` and `end` dates (YYYY-MM-DD)")
            if self.end < self.start:
                raise ValueError(f"`end` ({self.end}) is before `start` ({self.start})")
            if (self.end - self.start).days > 366:
                raise ValueError("a nights backfill covers at most 367 nights; split the range")
        elif not self.models and not self.manifest:
            raise ValueError("checkpoints mode needs a `manifest` or at least one model URI or checkpoint glob "
                             "in `models`")
        return self
