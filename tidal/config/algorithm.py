"""The `algorithm` section: what one RL step computes, by registry name, and the plug-in sections.

Torch-free like the rest of the config. Every name here is an entry of a registry in the catalog
`tidal/registry.py` (the table in docs/algorithms.md): the rules below read what an entry needs
from its metadata, and `tidal.config.registry_check` checks the names (and, once torch is
importable, binds the plug-in parameters).

Plug-in sections: each one's `type` is a registry name and its other fields are that plug-in's
keyword parameters (`tidal.algorithms.plugins.bind` passes them), except fields a program reads
itself (named in the section's docstring). A `<p>_start` / `<p>_end` pair with `schedule_steps`
moves parameter `<p>` linearly from start to end over that many training steps.

`preference` is the one section that changes the program: set, the job trains offline on
preference pairs (tidal/controller/programs/preference.py) with the PREFERENCE_LOSSES entry its
`type` names, instead of RL. A parameter of another loss than the selected one is rejected with
the loss it belongs to.
"""

from __future__ import annotations

import typing
from collections.abc import Collection
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator

from tidal.config.base import StrictModel
from tidal.registry import ADVANTAGE_ESTIMATORS, EstimatorMeta, Registry


class KLControlConfig(StrictModel):
    type: Literal["fixed", "adaptive"] = "fixed"
    kl_coef: float = Field(0.001, ge=0)
    target_kl: float = Field(0.1, gt=0)
    horizon: int = Field(10000, ge=1)


class WeightedSumCombination(StrictModel):
    """reward = sum_k weights[k] * r_k over the reward functions in `components`."""

    type: Literal["weighted_sum"] = "weighted_sum"
    components: list[str] = Field(min_length=1, description="reward function names, one column each")
    weights: list[float] | None = Field(None, description="one per component; default: all 1")

    @model_validator(mode="after")
    def _one_weight_per_component(self) -> WeightedSumCombination:
        if self.weights is not None and len(self.weights) != len(self.components):
            raise ValueError(
                f"algorithm.reward_combination.weights has {len(self.weights)} entries for "
                f"{len(self.components)} components {self.components}; give one weight per component"
            )
        return self


class MinCombination(StrictModel):
    """reward = min_k r_k: worst case over an ensemble (Coste et al. 2023)."""

    type: Literal["min"] = "min"
    components: list[str] = Field(min_length=1, description="reward function names")


class UncertaintyWeightedCombination(StrictModel):
    """reward = mean_k r_k - uncertainty_coef * std_k r_k (Coste et al. 2023)."""

    type: Literal["uncertainty_weighted"] = "uncertainty_weighted"
    components: list[str] = Field(min_length=1, description="reward function names")
    uncertainty_coef: float = Field(1.0, ge=0)


RewardCombination = Annotated[
    WeightedSumCombination | MinCombination | UncertaintyWeightedCombination, Field(discriminator="type")
]


class OverlongShaping(StrictModel):
    """DAPO's soft overlong penalty: linear from 0 to -penalty_factor inside the last
    `buffer_length` tokens before the limit."""

    type: Literal["overlong"] = "overlong"
    buffer_length: int = Field(ge=1, description="the soft window before the length limit, in tokens")
    penalty_factor: float = Field(1.0, ge=0)
    max_response_length: int | None = Field(
        None, ge=1, description="default: rollout.sampling.max_new_tokens"
    )


class LengthPenaltyShaping(StrictModel):
    """GRPO-lambda: a length reward on correct samples of groups whose accuracy exceeds a threshold."""

    type: Literal["length_penalty"] = "length_penalty"
    coef: float = Field(1.0, ge=0)
    accuracy_threshold: float = Field(
        0.5, ge=0, le=1, description="fraction of correct samples a group needs"
    )
    correct_threshold: float = Field(1.0, description="a sample is correct when its reward is >= this")


class PARShaping(StrictModel):
    """Preference as reward: mean_m sigmoid(r - r_ref_m), r_ref_m the rewards of reference responses
    to the same prompt, which the program scores. `baseline` picks them:
    - "greedy": the current policy's greedy response (the program generates it each step); it
      equals the paper's reference, the SFT model's response, only at the start of training;
    - "data": the responses the dataset gives per prompt (data.reference_response_key), e.g.
      sampled from the SFT model beforehand as in the paper; nothing extra is generated."""

    type: Literal["par"] = "par"
    baseline: Literal["greedy", "data"] = Field(
        "greedy", description="greedy: the policy's greedy response; data: data.reference_response_key"
    )


RewardShaping = Annotated[OverlongShaping | LengthPenaltyShaping | PARShaping, Field(discriminator="type")]


class DynamicSampling(StrictModel):
    """DAPO dynamic sampling: drop groups whose rewards (before shaping) do not vary and generate
    again until trainer.prompts_per_step groups are in. `max_rounds` is read by the program."""

    type: Literal["zero_variance"] = "zero_variance"
    atol: float = Field(0.0, ge=0, description="a group is kept when max - min reward > atol")
    max_rounds: int = Field(10, ge=0, description="generation rounds per step before failing; 0 = unlimited")


class ZeroVarianceSelection(StrictModel):
    """Drop groups whose advantages are all equal (no refill): they carry no gradient."""

    type: Literal["zero_variance"] = "zero_variance"
    atol: float = Field(0.0, ge=0)


class D3SSampleSelection(StrictModel):
    """D3S sample level: per group keep the subset of ceil(keep_ratio * n) (>= 2) samples with the
    largest advantage variance; keep_ratio follows the schedule."""

    type: Literal["d3s"] = "d3s"
    keep_ratio_start: float = Field(gt=0, le=1, description="aggressive start, e.g. 0.5")
    keep_ratio_end: float = Field(1.0, gt=0, le=1, description="relaxed end")
    schedule_steps: int = Field(0, ge=0, description="steps from start to end; 0 = always the end value")


SampleSelection = Annotated[ZeroVarianceSelection | D3SSampleSelection, Field(discriminator="type")]


class HighEntropyTokens(StrictModel):
    """Beyond the 80/20 Rule (Wang et al. 2025): policy gradient only on the top `top_ratio` entropy tokens."""

    type: Literal["high_entropy"] = "high_entropy"
    top_ratio: float = Field(0.2, gt=0, le=1, description="rho, the fraction of tokens kept")


class D3STokenSelection(StrictModel):
    """D3S token level: keep the top keep_ratio tokens by |advantage| x entropy."""

    type: Literal["d3s"] = "d3s"
    keep_ratio_start: float = Field(gt=0, le=1)
    keep_ratio_end: float = Field(1.0, gt=0, le=1)
    schedule_steps: int = Field(0, ge=0)


TokenSelection = Annotated[HighEntropyTokens | D3STokenSelection, Field(discriminator="type")]


class TISCorrection(StrictModel):
    """Truncated importance sampling: weights min(pi_old / pi_rollout, threshold)."""

    type: Literal["tis"] = "tis"
    level: Literal["token", "sequence"] = "token"
    threshold: float = Field(2.0, gt=0)
    batch_normalize: bool = False


class MISCorrection(StrictModel):
    """Masked importance sampling: tokens (or sequences) whose ratio leaves [lower, upper] are dropped."""

    type: Literal["mis"] = "mis"
    level: Literal["token", "sequence", "geometric"] = "token"
    lower: float = Field(0.5, ge=0)
    upper: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> MISCorrection:
        if self.lower >= self.upper:
            raise ValueError(
                f"algorithm.off_policy.lower={self.lower} must be below algorithm.off_policy.upper={self.upper}"
            )
        return self


class DecoupledCorrection(StrictModel):
    """Decoupled PPO: the trainer's recomputed log-probs are the proximal policy; the loss is
    weighted by pi_prox / pi_behaviour (tokens above `cap` dropped)."""

    type: Literal["decoupled"] = "decoupled"
    cap: float | None = Field(None, gt=0, description="drop tokens whose weight exceeds this; None keeps all")


OffPolicyCorrection = Annotated[
    TISCorrection | MISCorrection | DecoupledCorrection, Field(discriminator="type")
]


class DPOPreference(StrictModel):
    """DPO: the reference role (the frozen initial policy) scores every pair too."""

    type: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0, description="inverse temperature of the implicit reward (TRL: 0.1)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="> 0: conservative DPO (label noise rate)")


class SimPOPreference(StrictModel):
    """SimPO: length-normalised log-likelihood as the reward; reference-free."""

    type: Literal["simpo"] = "simpo"
    beta: float = Field(2.0, gt=0)
    gamma: float = Field(0.5, ge=0, description="target reward margin")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)


class REDIPreference(StrictModel):
    """REDI: `sft_steps` steps of SFT on the chosen responses (stage 1, read by the program), then
    the REDI loss on both (stage 2); reference-free."""

    type: Literal["redi"] = "redi"
    alpha: float = Field(0.8, ge=0, le=1, description="weight of the negative (rejected) term")
    sft_steps: int = Field(0, ge=0, description="stage 1: training steps of SFT on chosen before REDI")


PreferenceLoss = Annotated[DPOPreference | SimPOPreference | REDIPreference, Field(discriminator="type")]

# Fields of a preference section that the program reads itself; the rest are loss parameters.
PREFERENCE_PROGRAM_FIELDS = ("sft_steps",)


def _preference_params() -> dict[str, set[str]]:
    members = typing.get_args(typing.get_args(PreferenceLoss)[0])
    return {m.model_fields["type"].default: set(m.model_fields) - {"type"} for m in members}


def option_read_by_others(
    registry: Registry[Any], chosen: str, section: BaseModel
) -> tuple[str, tuple[str, ...]] | None:
    """The first field set in `section` that entries of `registry` read (their metadata `reads`)
    but `chosen` does not, with the names that read it; None when every set field is `chosen`'s."""
    own = registry.meta(chosen, missing_ok=True).reads
    for field in type(section).model_fields:
        if field in section.model_fields_set and field not in own:
            readers = _readers(registry, field)
            if readers:
                return field, readers
    return None


def _readers(registry: Registry[Any], field: str) -> tuple[str, ...]:
    return tuple(name for name in registry.names() if field in registry.meta(name).reads)


def _names(names: Collection[str]) -> str:
    return ", ".join(sorted(names))


class AlgorithmConfig(StrictModel):
    """What the RL step computes; every name is a registry entry of tidal.algorithms (docs/algorithms.md)."""

    advantage_estimator: str = Field("grpo", description="name in ADVANTAGE_ESTIMATORS")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(1.0, ge=0, le=1)
    norm_adv_by_std_in_grpo: bool = Field(True, description="false: Dr. GRPO (no std division)")
    norm_adv_epsilon: float = Field(
        1e-6, gt=0, description="added to the std before dividing (grpo, grpo_batch_std, grpo_passk); verl "
        "1e-6, TRL 1e-4"
    )
    gpg_f_norm: float = Field(1.0, gt=0, description="gpg: advantages are divided by this (verl's f_norm)")
    rloo_normalize_advantages: bool = Field(
        False,
        description="rloo: then standardise the advantages over the batch, (A - mean) / (std + 1e-4), as TRL's "
        "RLOO normalize_advantages (samples alone in their group get 0, as in TRL)",
    )
    use_kl_in_reward: bool = False
    kl_penalty: str = Field("kl", description="name in KL_ESTIMATORS for the in-reward penalty")
    kl_ctrl: KLControlConfig = KLControlConfig()
    reward_combination: RewardCombination | None = Field(
        None, description="several reward functions -> one reward (replaces reward.function)"
    )
    reward_shaping: list[RewardShaping] = Field([], description="applied in order, before advantages")
    dynamic_sampling: DynamicSampling | None = None
    sample_selection: SampleSelection | None = Field(None, description="drop samples after advantages")
    token_selection: TokenSelection | None = Field(None, description="tokens that carry the policy gradient")
    off_policy: OffPolicyCorrection | None = Field(
        None, description="correct for the rollout policy differing from the trainer's"
    )

    preference: PreferenceLoss | None = Field(
        None,
        description="offline preference training on (prompt, chosen, rejected) pairs instead of RL: "
        "the loss (name in PREFERENCE_LOSSES) and its parameters",
    )

    @model_validator(mode="before")
    @classmethod
    def _preference_params_match_the_loss(cls, data: Any) -> Any:
        """A parameter of another preference loss gets a message that names that loss (pydantic
        alone would report an unknown key and suggest a spelling mistake)."""
        section = data.get("preference") if isinstance(data, dict) else None
        if not isinstance(section, dict) or "type" not in section:
            return data
        params = _preference_params()
        own = params.get(section["type"])
        if own is None:
            return data  # an unknown type: the discriminated union names the known ones
        for key, value in section.items():
            owners = sorted(name for name, fields in params.items() if key in fields)
            if key != "type" and key not in own and owners:
                raise ValueError(
                    f"algorithm.preference.{key}={value!r} is a parameter of {' and '.join(owners)}, but "
                    f"algorithm.preference.type={section['type']!r} takes {sorted(own)}; set "
                    f"algorithm.preference.type={owners[0]} or remove algorithm.preference.{key}"
                )
        return data

    @model_validator(mode="after")
    def _estimator_options_match_the_estimator(self) -> AlgorithmConfig:
        stray = option_read_by_others(ADVANTAGE_ESTIMATORS, self.advantage_estimator, self)
        if stray:
            field, readers = stray
            raise ValueError(
                f"algorithm.{field} is set but algorithm.advantage_estimator={self.advantage_estimator!r} "
                f"does not read it (only {_names(readers)}); remove algorithm.{field}"
            )
        return self

    @model_validator(mode="after")
    def _one_source_of_reward_baselines(self) -> AlgorithmConfig:
        """An estimator that needs reward baselines (ReMax) and every PAR section share one
        `reward_baselines` column, so they must agree on where it comes from: a column of greedy
        rewards cannot also hold the data references'."""
        baselines = sorted({s.baseline for s in self.reward_shaping if s.type == "par"})
        if len(baselines) > 1:
            raise ValueError(
                f"algorithm.reward_shaping has par sections with baseline={baselines}; they share one "
                "column of reference rewards, so give them the same baseline (or keep one par section)"
            )
        name = self.advantage_estimator
        if self.estimator_meta.needs_reward_baselines and baselines == ["data"]:
            raise ValueError(
                f"algorithm.advantage_estimator={name} with algorithm.reward_shaping par baseline=data: both "
                f"would write the reward_baselines column ({name} needs the greedy response's reward, PAR "
                f"data the references'); use par baseline=greedy with {name}, or another estimator (grpo)"
            )
        return self

    @model_validator(mode="after")
    def _reward_components_are_given(self) -> AlgorithmConfig:
        """An estimator that reads reward components (GDPO) normalises each on its own, so it needs
        the components (a weighted sum combination gives them and their weights) and would silently
        skip reward changes made after the combination (shaping, KL in the reward): those are
        refused instead."""
        if not self.estimator_meta.needs_reward_components:
            return self
        name = self.advantage_estimator
        combination = self.reward_combination
        if combination is None or combination.type != "weighted_sum":
            got = "not set" if combination is None else f"type={combination.type}"
            raise ValueError(
                f"algorithm.advantage_estimator={name} normalises each reward component separately, but "
                f"algorithm.reward_combination is {got}; set algorithm.reward_combination="
                "{type: weighted_sum, components: [...], weights: [...]} (the weights combine the "
                "normalised components)"
            )
        stray = "algorithm.reward_shaping" if self.reward_shaping else None
        stray = "algorithm.use_kl_in_reward" if self.use_kl_in_reward else stray
        if stray:
            raise ValueError(
                f"{stray} changes the combined reward, but algorithm.advantage_estimator={name} reads the "
                f"raw reward components and would ignore it; remove {stray} or use another estimator"
            )
        return self

    @property
    def estimator_meta(self) -> EstimatorMeta:
        """What the advantage estimator needs (its registry metadata; defaults for a name the
        registry lacks, which `tidal.config.registry_check` reports)."""
        return ADVANTAGE_ESTIMATORS.meta(self.advantage_estimator, missing_ok=True)

    @property
    def needs_group(self) -> bool:
        """The estimator compares the samples of one prompt (GRPO and kin): rollout.sampling.n >= 2."""
        return self.estimator_meta.needs_group

    @property
    def needs_sum_pi_squared(self) -> bool:
        """The optimal-token-baseline estimators need sum_pi_squared next to the old log-probs."""
        return self.estimator_meta.needs_sum_pi_squared

    @property
    def keeps_reward_components(self) -> bool:
        """GDPO reads each reward component: the reward stage keeps them as `reward_components`."""
        return self.estimator_meta.needs_reward_components

    @property
    def par_baseline(self) -> Literal["greedy", "data"] | None:
        """The `baseline` of the par shaping sections (they agree), None without one."""
        return next((s.baseline for s in self.reward_shaping if s.type == "par"), None)

    @property
    def needs_reward_baselines(self) -> bool:
        """ReMax compares each sample's reward with a greedy response's; PAR with a greedy response's
        or with the data's reference responses' (`par_baseline`)."""
        return self.estimator_meta.needs_reward_baselines or self.par_baseline is not None

    @property
    def needs_trainer_log_probs(self) -> bool:
        """Token selection reads the trainer's entropy; off-policy corrections its log-probs; the
        optimal token baselines its log-probs and sum_pi_squared."""
        return self.token_selection is not None or self.off_policy is not None or self.needs_sum_pi_squared
