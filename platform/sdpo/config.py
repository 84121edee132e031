"""The job config: YAML -> validated pydantic models.

A job file is the whole schema of a run. Every model forbids unknown keys, so a typo is an error that
names the key, never a silently ignored setting. `--set a.b=value` overrides are applied to the raw
mapping *before* validation, so they get the same checks as the file itself.
"""

from __future__ import annotations

import copy
import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A job config that cannot be used; the message names the key and what would fix it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1)]


# --------------------------------------------------------------------------------------------------
# Model, data, partitioning
# --------------------------------------------------------------------------------------------------
class ModelConfig(_Strict):
    path: str = Field(description="Local directory or hub id of the SFT model (M_0), or builtin:quickstart/model.")
    tokenizer: str | None = Field(None, description="Tokenizer path or hub id; defaults to `path`.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    trust_remote_code: bool = False

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.path


class SourceConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Names the source in plans, reports and errors.")
    path: str | list[str] = Field(description="File, glob or list of them; local or any fsspec URL (s3://...).")
    format: Literal["auto", "jsonl", "json", "parquet"] = "auto"
    max_rows: int | None = Field(None, gt=0, description="Read only the first N rows (quick experiments).")
    columns: dict[str, str] = Field(
        default_factory=dict, description="Our field -> the file's column, e.g. {prompt: question}; `system` names "
        "a column that becomes the conversation's system message (Intel/orca_dpo_pairs).",
    )
    implicit_prompt: bool = Field(
        False, description="chosen/rejected are whole conversations beginning with the prompt (TRL's implicit "
        "prompt); the prompt is their shared leading messages, a prompt column is ignored.",
    )

    @field_validator("columns")
    @classmethod
    def _known_fields(cls, columns: dict[str, str]) -> dict[str, str]:
        allowed = ("prompt", "chosen", "rejected", "responses", "rewards", "score_chosen", "score_rejected", "system")
        unknown = sorted(set(columns) - set(allowed))
        if unknown:
            raise ValueError(f"columns maps our fields to the file's columns; unknown field(s) {unknown}, "
                             f"choose from {list(allowed)}")
        return columns

    @property
    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)

    @property
    def mapping(self):
        from sdpo.rows import RowMapping

        return RowMapping(tuple(sorted(self.columns.items())), self.implicit_prompt)


class EvalConfig(_Strict):
    fraction: Fraction = Field(0.05, description="Share of each source held out for evaluation.")
    max_pairs_per_source: int | None = Field(256, gt=0, description="Cap on held-out pairs per source.")
    seed: int = 0


class DataConfig(_Strict):
    sources: list[SourceConfig] = Field(min_length=1)
    eval: EvalConfig = EvalConfig()
    max_length: int = Field(512, gt=1, description="Tokens of prompt + completion, per sequence.")
    max_prompt_length: int = Field(256, gt=0, description="Prompt tokens kept (truncated from the left).")
    max_rejected_fraction: Fraction = Field(
        0.05, description="Stop before training if more than this share of rows is quarantined."
    )

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        names = [s.name for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {dupes}")
        return sources

    @model_validator(mode="after")
    def _prompt_fits(self) -> DataConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length "
                f"({self.max_length}) so that completions keep at least one token"
            )
        return self


class SplitStrategy(str, Enum):
    natural = "natural"  # one partition per source, in the listed order (the paper's split)
    random = "random"  # pool all sources, shuffle with the seed, cut into k parts
    stratified = "stratified"  # cut each source into k parts, so every part has the same source mix
    easy_to_hard = "easy_to_hard"  # k parts by the base model's margin gamma, highest (easiest) first
    hard_to_easy = "hard_to_easy"  # the same, lowest gamma first
    score_column = "score_column"  # k parts by a numeric field of each row (the user's own score)

    @property
    def by_score(self) -> bool:
        return self in (SplitStrategy.easy_to_hard, SplitStrategy.hard_to_easy, SplitStrategy.score_column)


class ProbeConfig(_Strict):
    """The probe stage of learnability: the base model briefly trained with DPO on all training pairs."""

    epochs: int = Field(1, gt=0, description="Passes over the training pairs.")
    fraction: Annotated[float, Field(gt=0, le=1)] = Field(
        1.0, description="Share of the training pairs the probe trains on (seeded by content); all are scored.")
    learning_rate: PositiveFloat | None = Field(None, description="Default: training.learning_rate.")
    beta: PositiveFloat | None = Field(None, description="Default: loss.beta. Also the beta of the dpo learnability.")


class SelectionConfig(_Strict):
    """Which training pairs are kept before partitioning (`all`, or LoBaSS's learnability_top)."""

    strategy: Literal["all", "learnability_top"] = "all"
    top_fraction: Annotated[float, Field(gt=0, le=1)] = Field(
        0.5, description="learnability_top: share of the training pairs kept (the most learnable).")
    loss: Literal["margin", "dpo", "nll"] = Field(
        "margin", description="The per-pair loss of learnability (see sdpo.ranking): margin = -log sigmoid(beta "
        "gamma) of the model's own margin (already-learnt pairs score ~0); dpo = the DPO loss against the base "
        "model (L_init = ln 2 for every pair); nll = the chosen response's per-token NLL.")
    probe: ProbeConfig = ProbeConfig()

    @model_validator(mode="after")
    def _only_when_selecting(self) -> SelectionConfig:
        defaults = type(self).model_fields
        given = {k for k in self.model_fields_set - {"strategy"} if getattr(self, k) != defaults[k].default}
        if self.strategy == "all" and given:
            raise ValueError(f"{sorted(given)} apply to strategy learnability_top, not all")
        return self


class PartitioningConfig(_Strict):
    strategy: SplitStrategy = SplitStrategy.natural
    order: list[str] | None = Field(None, description="natural: source names in stage order (default: as listed).")
    num_parts: int | None = Field(None, gt=0, description="random/stratified/score strategies: number of "
                                  "partitions (= stages).")
    proportions: list[PositiveFloat] | Literal["natural"] | None = Field(
        None,
        description="random/stratified/score strategies: relative partition sizes (normalised), or 'natural' "
        "for the sizes the natural split would give (the paper's sDPO Strat.). Default: equal parts.",
    )
    seed: int = 0
    difficulty: Literal["margin", "margin_per_token"] = Field(
        "margin", description="easy_to_hard/hard_to_easy: gamma from summed log-probs, or per-token means.")
    within_source: bool = Field(
        False, description="Score strategies: order and cut each source separately (every stage gets the "
        "same share of each source) instead of the pooled pairs.")
    score_field: str | None = Field(
        None, description="score_column: the numeric field of each row to order by (rows without it are "
        "quarantined).")
    score_order: Literal["descending", "ascending"] = Field(
        "descending", description="score_column: stage 1 gets the highest (descending) or lowest scores.")
    selection: SelectionConfig = SelectionConfig()

    @model_validator(mode="after")
    def _consistent(self) -> PartitioningConfig:
        defaults = type(self).model_fields
        score_keys = {k for k in ("difficulty", "within_source", "score_field", "score_order")
                      if getattr(self, k) != defaults[k].default}
        if not self.strategy.by_score and score_keys:
            raise ValueError(f"{sorted(score_keys)} apply to the score strategies (easy_to_hard, hard_to_easy, "
                             f"score_column), not {self.strategy.value}")
        if self.strategy is SplitStrategy.score_column and not self.score_field:
            raise ValueError("strategy score_column needs score_field: the name of the rows' numeric score field")
        if self.strategy is not SplitStrategy.score_column and {"score_field", "score_order"} & score_keys:
            raise ValueError("score_field and score_order apply to strategy score_column only")
        if self.strategy is SplitStrategy.natural:
            if self.num_parts is not None or self.proportions is not None:
                raise ValueError("num_parts and proportions apply to random/stratified, not natural")
            return self
        if self.order is not None:
            raise ValueError("order applies to the natural strategy only")
        if isinstance(self.proportions, list) and self.num_parts not in (None, len(self.proportions)):
            raise ValueError(
                f"num_parts ({self.num_parts}) disagrees with proportions ({len(self.proportions)} values)"
            )
        return self


# --------------------------------------------------------------------------------------------------
# Loss, optimisation, stages
# --------------------------------------------------------------------------------------------------
class LossConfig(BaseModel):
    """`{type, beta, ...options}`: the options are the loss's own (see `sdpo.losses.LOSSES`), checked by name
    and range against the registry, so an option the loss does not take is an error."""

    model_config = ConfigDict(extra="allow", frozen=True)
    type: str = Field("sigmoid", description="Preference loss (see README's loss table).")
    beta: PositiveFloat = 0.1

    @model_validator(mode="after")
    def _known(self) -> LossConfig:
        from sdpo.losses import LOSSES, resolve_options

        if self.type not in LOSSES:
            raise ValueError(f"unknown loss type {self.type!r}; choose one of {sorted(LOSSES)}")
        try:
            resolve_options(self.type, dict(self.model_extra or {}))
        except ValueError as err:
            raise ValueError(f"{err} (every loss also takes type and beta)") from None
        return self

    @property
    def options(self) -> dict[str, float]:
        """The loss's options, defaults filled in."""
        from sdpo.losses import resolve_options

        return resolve_options(self.type, dict(self.model_extra or {}))

    @property
    def spec(self):
        from sdpo.losses import get_loss

        return get_loss(self.type)


class TrainingConfig(_Strict):
    learning_rate: PositiveFloat = 5e-7
    epochs: int = Field(1, gt=0)
    batch_size: int = Field(8, gt=0, description="Pairs per worker per micro-step.")
    gradient_accumulation_steps: int = Field(1, gt=0)
    optimizer: Literal["adamw"] = "adamw"
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_epsilon: PositiveFloat = 1e-8
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.1
    max_grad_norm: Annotated[float, Field(ge=0)] = 1.0
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on GPUs that support it, fp32 on CPU."
    )
    shuffle: bool = True
    logging_steps: int = Field(1, gt=0)
    shared_prompt: bool = Field(
        True, description="One row per pair, the prompt computed once for chosen and rejected, logits only at "
        "completion positions (exact; sdpa/eager attention, pairwise losses). false: two rows per pair.",
    )
    prefix_cache: bool = Field(
        True, description="With shared_prompt: compute the prompt through the model's KV cache (the prompts, "
        "then chosen and rejected over their keys/values) instead of one row under a 4D mask: ~40% less "
        "attention work and less activation memory, a little more padding (exact; on CPU 5-11% faster in "
        "fp32 and up to 24% in bf16 on a SmolLM2-135M-shaped Llama; slower on toy models and very short pairs). "
        "Falls back to the mask under gradient checkpointing. false: the 4D-mask row.",
    )
    length_splits: int = Field(
        4, gt=0, description="With shared_prompt: the most chunks a micro-batch (sorted by length) is cut into "
        "to trim padding; each chunk is a forward/backward of its own (exact: gradients are summed).",
    )
    max_logits_mb: PositiveFloat | None = Field(
        1024, description="The most fp32 MiB one forward's completion logits may take. Above it the lm_head and "
        "log-softmax run over slices of rows and the backward recomputes each slice's logits (exact; a third more "
        "lm_head FLOPs in that forward, none in reference/held-out passes). Bounds the largest tensor of a step "
        "on large vocabularies (8 pairs of 500-token completions under Llama 3's 128k tokens: 4 GB). Lower it to "
        "trade a few % of speed for memory (256 halved a 128k-vocabulary step's peak on a CPU); null: never "
        "slice. Models whose forward rescales the logits (Gemma 2, Cohere, Granite) always take the full logits.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, ~1/3 more compute.",
    )
    disable_dropout: bool = Field(
        True, description="Train the policy with its dropout off, as the reference and held-out passes score "
        "(eval mode): the log-ratio is then exactly 0 at the first step, and no dropout noise enters it (TRL's "
        "default too). false: the model's own dropout rates while training.",
    )
    parallelism: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: every worker holds the whole model and optimiser state. fsdp: weights, "
        "gradients and AdamW state sharded over the workers, layer by layer (FSDP2; ~16/W bytes a parameter "
        "instead of ~16): for models whose training state does not fit one GPU. Same numerics as ddp in fp32; "
        "with bf16 the gathered weights are bf16 and gradients are reduced in fp32. Mid-stage checkpoints are "
        "written sharded (each worker its own share); the stage's model is saved whole.",
    )


class StageOverride(_Strict):
    beta: PositiveFloat | None = None
    learning_rate: PositiveFloat | None = None
    epochs: int | None = Field(None, gt=0)
    loss: dict[str, Any] | None = Field(
        None, description="The stage's loss: keys over the job's `loss`; a different `type` starts from that "
        "loss's defaults (beta still inherited)."
    )

    @model_validator(mode="after")
    def _one_beta(self) -> StageOverride:
        if self.beta is not None and self.loss and "beta" in self.loss:
            raise ValueError("give the stage's beta once: either beta or loss.beta")
        return self


class ReferenceConfig(_Strict):
    """How the reference log-probs (and the held-out evaluation) are computed."""

    mode: Literal["precompute", "online"] = Field(
        "precompute",
        description="precompute: a cached Ray Data inference pass before each stage, so training workers hold "
        "only the policy; online: the reference runs inside every training step (kept for comparison).",
    )
    batch_size: int = Field(32, gt=0, description="Pairs per model call in the inference passes.")
    num_actors: int | None = Field(None, gt=0, description="Inference actors; default one per GPU, or one on CPU.")
    num_gpus_per_actor: float | None = Field(None, ge=0, description="Default: 1 when scaling.use_gpu, else 0.")
    num_cpus_per_actor: PositiveFloat | None = Field(
        None, description="Default: 1 with GPUs; on CPU the CPUs not kept for Ray Data."
    )
    precision: Literal["auto", "fp32", "bf16", "autocast"] = Field(
        "auto", description="Numerics of the inference passes. auto: as training computes (training.precision: "
        "bf16 autocast on fp32 weights on GPUs, fp32 on CPU), so a stage's first loss is exactly ln 2; "
        "autocast: fp32 weights under bf16 autocast; bf16: bf16 weights (half the memory, but the reference's "
        "log-probs are then not the policy's at step 0); fp32.",
    )
    gamma: bool = Field(
        True, description="The gamma diagnostic: also score each partition under the base model (cached)."
    )
    cache_dir: str | None = Field(
        None, description="Where inference passes are cached (default <output_dir>/cache); share it across runs."
    )


class CheckpointingConfig(_Strict):
    """Mid-stage checkpoints and worker-failure recovery (see README, "Fault tolerance")."""

    every_steps: int | None = Field(
        200, gt=0, description="A checkpoint every N optimiser steps (model, optimiser, scheduler, RNG, data "
        "position): a restarted worker group or a resumed driver continues from the latest. null: only each "
        "stage's final model.",
    )
    max_failures: int = Field(
        0, ge=-1, description="Worker-group restarts per stage after a worker dies (Ray Train FailureConfig); "
        "-1: unlimited. Set it for spot or preemptible nodes.",
    )
    num_to_keep: int = Field(2, gt=0, description="Checkpoints kept per stage in Ray Train's storage (latest first).")


class ScalingConfig(_Strict):
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    resources_per_worker: dict[str, PositiveFloat] | None = Field(
        None, description="Ray resources per training worker; default derived from the cluster."
    )
    data_cpus: Annotated[float, Field(ge=0)] = Field(
        1.0, description="CPUs left free for Ray Data while stages train (avoids the ingest deadlock)."
    )
    shared_filesystem: bool = Field(
        False, description="Local paths (output, cache, data) are on storage every node mounts (NFS, Lustre); "
        "without it a multi-node cluster needs them on object storage (s3://).",
    )
    autoscale: bool = Field(
        False, description="The cluster adds nodes on demand (Ray autoscaler, KubeRay): plan for the resources the "
        "job asks for, not the nodes up at submission; stages wait while nodes start. Implies multi-node path rules.",
    )


class JobConfig(_Strict):
    name: str = Field("sdpo", pattern=r"^[A-Za-z0-9_.-]+$")
    model: ModelConfig
    data: DataConfig
    partitioning: PartitioningConfig = PartitioningConfig()
    stages: list[StageOverride] | None = Field(None, description="Per-stage overrides, one entry per stage.")
    init: Literal["previous", "base"] = Field(
        "previous", description="Stage t starts from M_{t-1} (sDPO) or from the base model (ablation)."
    )
    loss: LossConfig = Field(default_factory=LossConfig)  # validating it imports torch (the loss registry)
    reference: ReferenceConfig = ReferenceConfig()
    training: TrainingConfig = TrainingConfig()
    scaling: ScalingConfig = ScalingConfig()
    checkpointing: CheckpointingConfig = CheckpointingConfig()
    output_dir: str = "runs/sdpo"
    seed: int = 0

    @model_validator(mode="after")
    def _partition_names(self) -> JobConfig:
        p = self.partitioning
        names = [s.name for s in self.data.sources]
        if p.strategy is SplitStrategy.natural and p.order is not None:
            unknown = [n for n in p.order if n not in names]
            if unknown or len(set(p.order)) != len(p.order):
                raise ValueError(
                    f"partitioning.order must list distinct source names from {names}; got {p.order}"
                )
        if p.proportions == "natural" and p.num_parts not in (None, len(names)):
            raise ValueError("proportions: natural gives one part per source; drop num_parts")
        return self

    @model_validator(mode="after")
    def _stage_losses(self) -> JobConfig:
        for i in range(len(self.stages or [])):
            self.stage_loss(i)
        return self

    def stage_loss(self, i: int) -> LossConfig:
        """The loss of stage i+1: the job's loss with the stage's overrides."""
        o = (self.stages or [])[i] if i < len(self.stages or []) else None
        if o is None or (o.loss is None and o.beta is None):
            return self.loss
        raw = self.loss.model_dump()
        if o.loss and o.loss.get("type", self.loss.type) != self.loss.type:
            raw = {"type": o.loss["type"], "beta": self.loss.beta}  # another loss: the job's options don't apply
        raw |= dict(o.loss or {})
        if o.beta is not None:
            raw["beta"] = o.beta
        try:
            return LossConfig.model_validate(raw)
        except ValidationError as err:
            msg = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
            raise ValueError(f"stages[{i}].loss: {msg}") from None

    def num_partitions(self) -> int:
        p = self.partitioning
        if p.strategy is SplitStrategy.natural:
            return len(p.order or self.data.sources)
        if isinstance(p.proportions, list):
            return len(p.proportions)
        if p.proportions == "natural":
            return len(self.data.sources)
        return p.num_parts or 2


# --------------------------------------------------------------------------------------------------
# Loading and overrides
# --------------------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """YAML as written by people: `1e-2` and `5e-7` are numbers, as in YAML 1.2 (PyYAML's YAML 1.1
    reads a float without a dot as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """Parse YAML text (a job, a search space or a --set value)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides; values are parsed as YAML (`0.1`, `true`, `[a, b]`)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        value = load_yaml(text) if text else ""
        node: Any = out
        parts = key.split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} has no item {part}")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} is a value, not a mapping")
    return out


def _format_error(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid job config"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `sdpo run --help` links the config reference)"
        elif "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], dict | list):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def parse_job(raw: Any, origin: str = "job") -> JobConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: a job config is a YAML mapping, got {type(raw).__name__}")
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, origin)) from None


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"job file {path} does not exist")
    try:
        raw = load_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    job = parse_job(apply_overrides(raw or {}, overrides or []), origin=str(path))
    # here, not in JobConfig: a search space's base job may give fewer entries, fitted to each trial
    if job.stages and len(job.stages) != job.num_partitions():
        raise ConfigError(f"{path}: stages: {len(job.stages)} override entries for {job.num_partitions()} "
                          "partitions; give one entry per stage (use {} for no change)")
    return job


def dump_job(job: JobConfig) -> str:
    return yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False)
