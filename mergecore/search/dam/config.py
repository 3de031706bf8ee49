"""A DAM search as written in YAML (`DAMConfig`), the settings of its loop, and its recipe.

Search YAML (paths relative to the YAML file; `~` is expanded)::

    base_model: families/fmnist-vit/base     # every tensor without coefficients comes from it
    models:                                  # the merge inputs, each paired with its data D_i
      - families/fmnist-vit/expert_fmnist_tops
      - {model: families/fmnist-vit/expert_digits, task: digits}   # explicit pairing by task name
    train_tasks: families/fmnist-vit/tasks-val.yml   # D_i: a tasks file or an inline task list
                                             # (labels are never used); paired in order by default
    eval_tasks: families/fmnist-vit/tasks-val.yml    # the validation split (default: train_tasks): scored
                                             # every eval_every steps; the result is chosen on all of it
    eval_subset: 0.25                        # periodic evaluations on this part (ratio or count)
    patience: 4                              # stop after this many evaluations without a better score
    final_tasks: families/fmnist-vit/tasks.yml       # optional: scored once on the result, never used
    granularity: column                      # column: one coefficient per input column (DAM)
                                             # layer: one per model and tensor (layer-wise AdaMerging)
    form: sum                                # sum: W = Σ c_i W_i | task_vectors: W = W0 + Σ c_i (W_i − W0)
    transform: none                          # none | tanh (written into the recipe)
    init: null                               # effective start value; default: the best uniform merge on
                                             # eval_tasks (weight averaging, task arithmetic λ 0.3 / 1)
    include_base: false                      # also merge the base as an input (form sum)
    merge_embeddings: false                  # default: embeddings and norms stay the base's (the paper's best)
    merge_norms: false
    lm_head: true                            # an untied lm_head gets coefficients (a tied one never)
    exclude: []                              # tensor-name substrings / regexes left to the base
    loss:
      kind: kl                               # kl | mse | entropy (entropy needs no teachers)
      direction: forward                     # forward: KL(model_i ‖ merged) | reverse: KL(merged ‖ model_i)
      temperature: 2.0
      lambda_cos: 0.0                        # λ_cos Σ_l Σ_{i<j} cos(c_i^l, c_j^l)
      lambda_l1: 0.0
      lambda_l2: 0.0
    optimizer: {lr: 2.0e-3, weight_decay: 0.0, betas: [0.9, 0.999], max_grad_norm: 1.0,
                schedule: constant, warmup_steps: 0, clamp: null}
    teachers: auto                           # auto | cache | on_the_fly (auto: cache if it fits the budget)
    teacher_cache_budget: 2GB
    full_logits_max_vocab: 4096              # larger vocabularies cache only the top-k logits
    teacher_top_k: 128
    steps: 200
    batch_size: 32                           # examples per task per step
    max_tokens_per_backward: 4096            # the most tokens whose activations are held at once (padded
                                             # length x examples; an image counts one): a larger batch
                                             # runs in chunks, gradients accumulated (the same step);
                                             # it also bounds each forward that caches teacher outputs
    examples_per_task: 1000                  # a seeded sample of each task's data (null: all)
    max_length: 512                          # tokens per LM example
    eval_every: 50
    checkpoint_every: 50
    seed: 0
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mergecore.search.dam.search import DAMSettings, LossSettings

COEF_FILE = "dam_coefficients.safetensors"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    model: str
    task: Optional[str] = None  # name of its task in train_tasks (default: the task at its position)


class LossSpec(_Strict):
    kind: Literal["kl", "mse", "entropy"] = "kl"
    direction: Literal["forward", "reverse"] = "forward"
    temperature: float = Field(default=2.0, gt=0)
    entropy_temperature: float = Field(default=1.0, gt=0)
    lambda_cos: float = Field(default=0.0, ge=0)
    lambda_l1: float = Field(default=0.0, ge=0)
    lambda_l2: float = Field(default=0.0, ge=0)


class OptimizerSpec(_Strict):
    name: Literal["adamw"] = "adamw"
    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)  # stated explicitly: decay pulls coefficients to 0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)
    max_grad_norm: Optional[float] = Field(default=1.0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    clamp: Optional[tuple[float, float]] = None

    @field_validator("clamp")
    @classmethod
    def _clamp(cls, v):
        if v is not None and not v[0] < v[1]:
            raise ValueError("clamp must be [low, high] with low < high")
        return v


TaskList = Union[str, list[dict[str, Any]]]


class DAMConfig(_Strict):
    """A DAM search, as written in YAML."""

    base_model: Optional[str] = None
    models: list[Union[str, ModelSpec]]
    train_tasks: TaskList
    eval_tasks: Optional[TaskList] = None
    eval_subset: Optional[Union[int, float]] = None
    # older configs set this; the result is now always chosen on all of eval_tasks, so it changes nothing
    final_eval_full: bool = True
    final_tasks: Optional[TaskList] = None
    granularity: Literal["column", "layer"] = "column"
    form: Literal["sum", "task_vectors"] = "sum"
    transform: Literal["none", "tanh"] = "none"
    init: Optional[float] = None
    include_base: bool = False
    merge_embeddings: bool = False
    merge_norms: bool = False
    lm_head: bool = True
    exclude: list[str] = Field(default_factory=list)
    loss: LossSpec = Field(default_factory=LossSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    teachers: Literal["auto", "cache", "on_the_fly"] = "auto"
    teacher_cache_budget: str = "2GB"
    full_logits_max_vocab: int = Field(default=4096, ge=1)
    teacher_top_k: int = Field(default=128, ge=1)
    steps: int = Field(default=200, ge=1)
    batch_size: int = Field(default=32, ge=1)
    max_tokens_per_backward: int = Field(default=4096, ge=1)
    examples_per_task: Optional[int] = Field(default=1000, ge=1)
    max_length: Optional[int] = Field(default=512, ge=2)
    eval_every: int = Field(default=50, ge=0)
    eval_at_start: bool = True
    patience: int = Field(default=4, ge=0)  # evaluations in a row without a better score before stopping (0: never)
    checkpoint_every: int = Field(default=50, ge=0)
    eval_batch_size: int = Field(default=256, ge=1)
    seed: int = 0
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # of the replayed checkpoint

    @field_validator("models")
    @classmethod
    def _models(cls, v):
        if not v:
            raise ValueError("models must list at least one model")
        return v

    @field_validator("eval_subset")
    @classmethod
    def _subset(cls, v):
        if v is None:
            return v
        if isinstance(v, float) and not 0 < v <= 1:
            raise ValueError("eval_subset must be a ratio in (0, 1] or a count >= 1")
        if isinstance(v, int) and v < 1:
            raise ValueError("eval_subset must be a ratio in (0, 1] or a count >= 1")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "DAMConfig":
        if self.form == "task_vectors":
            if self.base_model is None:
                raise ValueError("form 'task_vectors' needs a base_model")
            if self.include_base:
                raise ValueError("form 'task_vectors' cannot include the base as a merge input")
        if self.transform == "tanh" and self.init is not None and not -1 < self.init < 1:
            raise ValueError("with transform tanh, init must be in (-1, 1)")
        return self

    def model_refs(self) -> list[str]:
        return [m if isinstance(m, str) else m.model for m in self.models]

    def settings(self) -> DAMSettings:
        """The training loop's settings."""
        o, loss = self.optimizer, self.loss
        return DAMSettings(
            steps=self.steps, batch_size=self.batch_size, max_tokens_per_backward=self.max_tokens_per_backward,
            lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps,
            max_grad_norm=o.max_grad_norm or None, schedule=o.schedule, warmup_steps=o.warmup_steps,
            clamp=tuple(o.clamp) if o.clamp else None, seed=self.seed,
            eval_every=self.eval_every, eval_at_start=self.eval_at_start, patience=self.patience,
            checkpoint_every=self.checkpoint_every,
            loss=LossSettings(**loss.model_dump()))

    def identity(self, base: str, refs: list[str], include_base: bool) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed (the coefficients' meaning and the data order)."""
        return {"base": base, "models": refs, "granularity": self.granularity, "form": self.form,
                "transform": self.transform, "include_base": include_base, "merge_embeddings": self.merge_embeddings,
                "merge_norms": self.merge_norms, "lm_head": self.lm_head, "exclude": list(self.exclude),
                "seed": self.seed, "batch_size": self.batch_size, "examples_per_task": self.examples_per_task}



def dam_recipe(base_ref: str, refs: list[str], cfg: DAMConfig, include_base: bool, name: str = "dam"):
    """The replayable recipe: method `dam` reading the coefficients file next to it."""
    from mergecore.recipe import recipe_from_dict

    return recipe_from_dict({
        "merge_method": "dam",
        "base_model": base_ref,
        "models": [{"model": r} for r in refs],
        "parameters": {"transform": cfg.transform, "form": cfg.form, "include_base": include_base,
                       "coefficients": "coefficients"},
        "artifacts": {"coefficients": COEF_FILE},
        "dtype": cfg.dtype,
        "name": name,
    }, where="dam recipe")
