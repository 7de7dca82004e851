"""The MoP search (Algorithm 1 of the paper): at every iteration build a depth candidate (one layer removed)
and a width candidate (the same number of parameters removed uniformly by AMP — or, with speed targets, the same
predicted latency), let the path criterion pick one, and repeat until every target (a compression, or a
predicted speedup) is reached; a checkpoint is written at each target."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch.nn as nn
from tqdm.auto import tqdm

from mop import data
from mop.pruning.compensation import (METHODS as COMPENSATIONS, NO_REPAIR, CompensationSettings, Repair,
                                     compensation_record, cut, recorded_width_moments, repair_for)
from mop.pruning.criteria import (LAYER_CRITERIA, PATH_CRITERIA, WIDTH_CRITERIA, WIDTH_CRITERIA_READING_MOMENTS,
                                  PathReference, build_reference, coin)
from mop.errors import MopError
from mop.provenance import command, versions
from mop.models import (LoadedModel, count_all_params, count_params, embedding_params, layer_params,
                        release_freed_memory, save_checkpoint)
from mop.latency.model import ENGINES, LatencyModel, ModelShape, model_shape
from mop.models.adapters import LayerShape
from mop.pruning.state import RunState, target_name  # noqa: F401 (where callers find it)
from mop.pruning.surgery import masked_width, remove_layer, structural_copy
from mop.pruning.targets import (Goals, Target, every_target, latency_identity, layers_shape, run_latency_model,
                                 validate_targets)
from mop.training import LoraSettings, lora_attached, train
from mop.pruning.width import (Alignment, StepCosts, UnitCosts, WidthPlan, WidthUnits, lowest_units, narrowest,
                               plan_width, width_floor)

log = logging.getLogger(__name__)
MODES = ("mop", "depth", "width")
# What a target compression is measured over: every parameter (the paper's c = 1 − P/P0), or the non-embedding
# ones ("body": on small models the embeddings are a large share, see docs/design.md).
COMPRESSIONS = ("all", "body")
# The calibration prompts and the path texts are one fixed draw, whatever the run's seed: the seed decides the
# random path and the tuning subsets only, so the spread across seeds is the spread of the path (docs/design.md).
DATA_SEED = 0


@dataclass
class SearchConfig:
    targets: list[float]  # compression ratios
    speedups: list[float] = field(default_factory=list)  # predicted speedups over the dense model
    latency_model: str | None = None  # a latency model record (JSON); None: measured on the run's device, cached
    latency_engine: str = "transformers"  # what the measured latency model times: one of ENGINES
    method: str = "mop"  # a name in mop.pruning.methods.PRUNING_METHODS; the fields below are its settings
    mode: str = "mop"
    layer_criterion: str = "third_to_last"
    width_criterion: str = "amp"
    path_criterion: str = "random"
    seed: int = 0
    compression_of: str = "all"  # one of COMPRESSIONS
    calib: str = "alpaca"  # AMP and block-influence prompts
    calib_samples: int = 128
    calib_max_length: int = 512
    calib_packed: bool = False  # windows of exactly calib_max_length tokens of the joined texts, not one text each
    batch_size: int = 4  # prompts per scoring forward pass (AMP, block influence, path references)
    path_data: str = "wikitext2"  # cosine / kl texts and ppl text
    path_samples: int = 128
    path_max_length: int = 512
    ppl_segment_length: int = 2048
    ppl_segments: int | None = None  # None: the whole split
    tune_data: str = "alpaca"
    tune_steps_per_iteration: int = 10  # iteration t tunes each candidate for this × t steps
    tensor_parallel: int = 1  # width steps leave head counts that shard over this many devices (`Alignment`)
    mlp_multiple: int = 1  # ... and MLP widths that are multiples of tensor_parallel × this many neurons
    compensation: str = "none"  # one of COMPENSATIONS: repair every cut in closed form (mop.pruning.compensation)
    compensation_ridge: float = CompensationSettings.ridge  # of width re-fits
    compensation_depth_ridge: float = CompensationSettings.depth_ridge  # of depth re-fits
    lora: LoraSettings = field(default_factory=LoraSettings)

    def validate(self) -> None:
        validate_targets(self.targets, self.speedups)
        if self.latency_model is not None and not self.speedups:
            raise MopError("--latency-model predicts speed targets: give --target-speedup too")
        if self.latency_model is not None and not Path(self.latency_model).is_file():
            raise MopError(f"--latency-model {self.latency_model}: no such file")
        if self.latency_engine not in ENGINES:
            raise MopError(f"unknown latency engine {self.latency_engine}; choose one of {', '.join(ENGINES)}")
        if self.latency_engine != "transformers" and (self.latency_model is not None or not self.speedups):
            raise MopError("--latency-engine measures the latency model of speed targets: give --target-speedup, "
                           "and not --latency-model (whose record already names its engine)")
        for name, value, registry in (("mode", self.mode, MODES), ("layer criterion", self.layer_criterion, LAYER_CRITERIA),
                                      ("width criterion", self.width_criterion, WIDTH_CRITERIA),
                                      ("path criterion", self.path_criterion, PATH_CRITERIA),
                                      ("compression", self.compression_of, COMPRESSIONS),
                                      ("compensation", self.compensation, COMPENSATIONS)):
            if value not in registry:
                raise MopError(f"unknown {name} {value}; choose one of {', '.join(registry)}")
        for kind, criterion in (("layer", self.layer_criterion), ("width", self.width_criterion)):
            if criterion == "repair_error" and self.compensation == "none":
                raise MopError(f"{kind} criterion repair_error ranks by what the repair leaves: give --compensation lstsq")
        if self.tensor_parallel < 1 or self.mlp_multiple < 1:
            raise MopError("tensor_parallel and mlp_multiple are counts of at least 1")
        if not (self.compensation_ridge > 0 and self.compensation_depth_ridge > 0):
            raise MopError(f"compensation ridges {self.compensation_ridge}, {self.compensation_depth_ridge} must be > 0")
        self.lora.validate()

    @property
    def every_target(self) -> list[Target]:
        """The compression targets, then the speed targets, each ascending."""
        return every_target(self.targets, self.speedups)

    @property
    def alignment(self) -> Alignment:
        return Alignment(self.tensor_parallel, self.mlp_multiple)

    @property
    def compensation_settings(self) -> CompensationSettings:
        return CompensationSettings(self.compensation, self.compensation_ridge, self.compensation_depth_ridge)

    def identity(self) -> dict:
        """Everything that decides the path; the targets only decide where it stops, except that speed targets
        match the width steps in latency (`step_matching`; the latency model itself is in the run's identity).
        An alignment of 1 (none), unpacked calibration and no compensation are left out: such runs are the runs
        made before the options existed, and stay theirs; so is a depth ridge equal to the width ridge (one ridge for both, as before the
        depth ridge was an option)."""
        unset = {"tensor_parallel": 1, "mlp_multiple": 1, "compensation_depth_ridge": self.compensation_ridge,
                 "calib_packed": False}
        if self.compensation == "none":
            unset.update(compensation="none", compensation_ridge=self.compensation_ridge,
                         compensation_depth_ridge=self.compensation_depth_ridge)
        targets = ("targets", "speedups", "latency_model", "latency_engine")
        matching = {"step_matching": "latency"} if self.speedups else {}
        return {k: v for k, v in asdict(self).items() if k not in targets and not (k in unset and unset[k] == v)} \
            | matching | {"lora": self.lora.identity()}


MEASURES = {"all": "of all parameters", "body": "of non-embedding parameters"}  # what --compression-of targets


def check_reachable(loaded: LoadedModel, config: SearchConfig, latency: LatencyModel | None) -> None:
    """Refuse targets that `config.mode` cannot reach on this model (see `fewest_params` and `smallest_shape`);
    no work is done."""
    model, adapter = loaded.model, loaded.adapter
    shape, layers = adapter.shape(model), adapter.layers(model)
    goals = Goals(loaded, config.compression_of, latency)
    original, uncounted = goals.original_params, goals.uncounted
    units = config.alignment.units(shape, adapter.kv_head_counts(model))
    step = None if latency is None else lambda n: latency_step(latency, goals.dense, n)  # width matched in latency
    floor = fewest_params(config.mode, shape, len(layers), layer_params(layers[0]), original, units, step)
    for target in config.targets:
        if floor > goals.goal(target):
            raise MopError(f"target {target} cannot be reached in mode {config.mode}: at most "
                           f"{1 - (floor - uncounted) / (original - uncounted):.4f} "
                           f"({MEASURES[config.compression_of]})")
    if latency is not None:
        smallest = smallest_shape(config.mode, goals.dense, shape, step, units)
        goals.check_speedups(config.speedups, smallest, f"mode {config.mode}")


class Search:
    """One MoP run on one loaded model. `run()` resumes from `out/run.json` when it exists."""

    def __init__(self, loaded: LoadedModel, config: SearchConfig, out: Path):
        config.validate()
        self.loaded, self.config, self.out = loaded, config, out
        self.adapter = loaded.adapter
        self.path = PATH_CRITERIA[config.path_criterion]
        self.original_params = count_params(self.model)
        self.embedding_params = embedding_params(self.model)  # no step changes them
        shape = self.adapter.shape(self.model)
        config.alignment.check(shape, loaded.name)
        self.units = config.alignment.units(shape, self.adapter.kv_head_counts(self.model))  # what a width step leaves
        # None: no speed target
        self.latency = run_latency_model(loaded, config.speedups, config.latency_model, out, config.latency_engine)
        self.goals = Goals(loaded, config.compression_of, self.latency)
        self.identity = {"model_sha256": loaded.weights_sha256, "dtype": str(self.model.dtype), **config.identity(),
                         **latency_identity(self.latency)}
        check_reachable(loaded, config, self.latency)
        RunState.check(out, self.identity)  # fail before any long work if --out holds another run
        self.calibration = self._calibration()
        self.tune_rows = self._tune_rows() if self._scores_candidates else []
        self.reference = self._reference() if self._scores_candidates else PathReference()
        self.carry = 0.0  # attention accumulator, groups per layer (see mop.pruning.width)
        self.neuron_carry = 0.0  # MLP accumulator, neurons per layer (with neuron blocks only)

    @property
    def model(self) -> nn.Module:
        """F^(t), the current model: `loaded.model`, pruned in place by every step."""
        return self.loaded.model

    # ------------------------------------------------------------ inputs

    @property
    def _scores_candidates(self) -> bool:
        return self.config.mode == "mop" and self.path.score is not None

    def _texts_or_samples(self, spec: str, n: int, length: int) -> list[str]:
        return texts_or_samples(self.loaded, spec, n, length)

    def _calibration(self) -> list[data.Batch]:
        return calibration_batches(self.loaded, self.config)

    def _tune_rows(self) -> list:
        c = self.config
        try:
            examples = data.load_examples(c.tune_data)
        except data.DataUnavailable as error:
            log.warning("%s", error)
            texts = data.sample_texts_from_model(self.model, self.loaded.tokenizer, 64, c.lora.max_length, DATA_SEED)
            examples = [data.Example("", text) for text in texts]
        rows = data.sft_rows(self.loaded.tokenizer, examples, c.lora.max_length)
        if not rows:
            raise MopError(f"{c.tune_data}: no row keeps a response token within {c.lora.max_length} tokens")
        return rows

    def _reference(self) -> PathReference:
        """F's outputs on the path data, computed once per run."""
        c, tokenizer = self.config, self.loaded.tokenizer
        if self.path.needs == "segments":  # the perplexity protocol of `mop eval` (mop.evaluation.perplexity)
            try:
                text = data.perplexity_text(c.path_data)
            except data.DataUnavailable as error:
                log.warning("%s", error)
                text = "\n\n".join(data.sample_texts_from_model(self.model, tokenizer, c.path_samples,
                                                                  c.ppl_segment_length, DATA_SEED))
            return PathReference(segments=data.text_segments(tokenizer, text, c.ppl_segment_length, c.ppl_segments))
        texts = data.sample(self._texts_or_samples(c.path_data, c.path_samples, c.path_max_length), c.path_samples,
                            DATA_SEED)
        batches = data.text_batches(tokenizer, texts, c.path_max_length, c.batch_size)
        return build_reference(self.model, self.adapter, batches, [])

    # ------------------------------------------------------------ compression

    def compression(self, params: int) -> float:
        """The compression targets are measured in: 1 − P/P0, over all or over non-embedding parameters."""
        uncounted = self.goals.uncounted
        return 1 - (params - uncounted) / (self.original_params - uncounted)

    def goal(self, target: float) -> float:
        """The parameter count at or below which a compression `target` is reached."""
        return self.goals.goal(target)

    def reached(self, target: Target) -> bool:
        """Whether the current model reaches `target`."""
        return self.goals.reached(target, count_params(self.model), model_shape(self.model, self.adapter))

    def plan(self, shape: LayerShape, n_layers: int, p_layer: int) -> WidthPlan:
        """The width candidate's plan on `n_layers` layers of `shape`, from the accumulators: p_layer parameters
        (the paper's matching) or, with speed targets, the depth candidate's predicted latency saving (a layer,
        its fixed cost included), in units that cost their predicted seconds."""
        budget, costs = (p_layer, None) if self.latency is None else \
            latency_step(self.latency, self.goals.dense, n_layers)(shape)
        return plan_width(shape, n_layers, budget, self.carry, self.units, self.neuron_carry, costs)

    # ------------------------------------------------------------ one iteration

    def _width_candidate(self, model: nn.Module, plan: WidthPlan) -> tuple[dict, Repair | None]:
        """The KV groups and neurons (indices per layer) the width step removes, the lowest scores of the width
        criterion, and their repair when compensation is on, from the Grams recorded during the scoring pass."""
        settings, name = self.config.compensation_settings, self.config.width_criterion
        reads = name in WIDTH_CRITERIA_READING_MOMENTS
        with recorded_width_moments(model, self.adapter, settings.enabled or reads) as moments:
            shared = {"moments": moments} if reads else {}
            scores = WIDTH_CRITERIA[name](model, self.adapter, self.calibration, **shared)
        groups, neurons = lowest_units(scores, plan)
        removed = {"groups": groups, "neurons": neurons}
        return removed, repair_for(model, self.adapter, self.calibration, settings, width=removed, moments=moments)

    def _repair(self, model: nn.Module, layer: int) -> Repair | None:
        """The closed-form repair of cutting `layer` from `model` (None: compensation off)."""
        return repair_for(model, self.adapter, self.calibration, self.config.compensation_settings, layer=layer)

    def _cut(self, model: nn.Module, width: dict | None = None, layer: int | None = None,
             repair: Repair | None = None) -> list[dict] | None:
        """Cut `width` units or `layer` from `model` in place, repaired first when compensation is on."""
        return cut(model, self.adapter, self.calibration, self.config.compensation_settings, width, layer,
                   repair=repair)

    def _score(self, model: nn.Module, iteration: int, width: dict | None = None, layer: int | None = None,
               repair: Repair | None = None) -> float:
        """Path score of one candidate of F^(t-1) = `model`: the width candidate (`width` units masked) or the
        depth candidate (`layer` removed from a structural copy), repaired by `repair` when compensation is on.
        Either shares every weight with `model` but the repaired ones; it is tuned with LoRA
        (tune_steps_per_iteration × t steps on this iteration's subset), then scored."""
        c = self.config
        steps = c.tune_steps_per_iteration * iteration
        seed = hash_seed(c.seed, iteration)
        rows = data.sample(self.tune_rows, steps * c.lora.batch_size, seed) if steps else []
        candidate = structural_copy(model)
        if repair is not None:
            repair.apply(candidate, self.adapter)
        if layer is not None:
            remove_layer(candidate, self.adapter, layer)
        branch = "depth" if layer is not None else "width"
        with lora_attached(candidate, c.lora, seed) as peft_model, \
                masked_width(candidate, self.adapter, **width) if width else nullcontext():
            train(peft_model, rows or self.tune_rows, c.lora, steps, seed, self.loaded.tokenizer.pad_token_id,
                  desc=f"tune {branch} (t={iteration})")
            return self.path.score(candidate, self.adapter, self.reference)

    def step(self, model: nn.Module, iteration: int) -> dict:
        """One iteration of Algorithm 1: prunes `model` from F^(t-1) to F^(t) in place; returns the record."""
        started = time.perf_counter()
        c, adapter = self.config, self.adapter
        layers = adapter.layers(model)
        params_before = count_params(model)
        layer = LAYER_CRITERIA[c.layer_criterion](model, adapter, self.calibration)  # ℓ*
        p_layer = layer_params(layers[layer])  # p_ℓ; c_t = p_ℓ / P(F^(t-1))
        plan = self.plan(adapter.shape(model), len(layers), p_layer)
        options = [b for b, ok in (("W", c.mode != "depth" and plan.achieved > 0),
                                   ("D", c.mode != "width" and len(layers) > 2)) if ok]
        if not options:
            raise MopError(f"iteration {iteration}: neither a width nor a depth step can remove parameters")
        if len(options) == 2 and not 0.9 <= plan.achieved / plan.planned <= 1.1:  # `plan_width` came as near as it could
            log.warning("iteration %d: the width candidate removes %.2f× the depth candidate's %s (KV groups too "
                        "coarse for what the MLP cannot take): the path compares unequal candidates", iteration,
                        plan.achieved / plan.planned, f"{p_layer} parameters" if self.latency is None else
                        f"{plan.planned:.3g} s of predicted latency")
        scores, removed, repairs = None, None, {}
        if len(options) == 1:  # the mode allows one branch, or the other one can remove nothing
            choice, decided_by = options[0], (c.mode if c.mode != "mop" else "forced")
        elif not self._scores_candidates:
            choice, decided_by = coin(c.seed, iteration), c.path_criterion
        else:
            removed, repairs["W"] = self._width_candidate(model, plan)
            repairs["D"] = self._repair(model, layer=layer)
            scores = {"W": self._score(model, iteration, width=removed, repair=repairs["W"]),
                      "D": self._score(model, iteration, layer=layer, repair=repairs["D"])}
            choice, decided_by = ("W" if scores["W"] <= scores["D"] else "D"), c.path_criterion
        if choice == "W":  # the winner is built from F^(t-1)'s own, untuned weights
            if removed is None:
                removed, repairs["W"] = self._width_candidate(model, plan)
            compensation = self._cut(model, width=removed, repair=repairs.get("W"))
            self.carry, self.neuron_carry = plan.carry_out, plan.neuron_carry_out
        else:
            compensation = self._cut(model, layer=layer, repair=repairs.get("D"))
        params = count_params(model)
        record = {
            "iteration": iteration, "choice": choice, "decided_by": decided_by, "layer": layer,
            "layer_params": p_layer, "step_ratio": p_layer / params_before, "width_plan": plan.record(),
            "scores": scores, "params_before": params_before, "params": params,
            "compression": 1 - params / self.original_params, "seconds": round(time.perf_counter() - started, 3),
            "removed": removed if choice == "W" else {"layer": layer},
            **self.goals.record(model_shape(model, adapter)),
        }
        if compensation is not None:
            record["compensation"] = compensation
        return record

    def replay(self, record: dict, repaired: bool = True) -> None:
        """Apply a logged iteration again (resume): the same indices give bitwise the same weights. Not
        `repaired`: the cut alone, which gives the shapes only (the weights come from the resume point)."""
        removed, repair = record["removed"], None if repaired else NO_REPAIR
        if record["choice"] == "W":
            self._cut(self.model, width=removed, repair=repair)
            self.carry = record["width_plan"]["carry_out"]
            self.neuron_carry = record["width_plan"].get("neuron_carry_out", 0.0)  # absent from older runs: 0
        else:
            self._cut(self.model, layer=removed["layer"], repair=repair)
        if count_params(self.model) != record["params"]:
            raise MopError(f"{self.out}/run.json does not replay on this model (iteration {record['iteration']})")

    # ------------------------------------------------------------ the loop

    def run(self) -> RunState:
        header = {"source": {"name": self.loaded.name, "sha256": self.loaded.weights_sha256,
                             "architecture": type(self.model).__name__},
                  "original_params": self.original_params,
                  "original_embedding_params": self.embedding_params, "versions": versions(),
                  **({} if self.latency is None else {"latency_model": self.latency.record()})}
        state = RunState.open(self.out, self.identity, header)
        bare = self._bare_replays(state)
        for iteration, record in enumerate(state.iterations, 1):
            self.replay(record, repaired=iteration not in bare)
            if bare and iteration == bare[-1]:
                state.load_resume_point(self.model)
            self._save_reached(state, iteration)  # a target added since, or one a kill left unwritten
        targets = self.config.every_target
        bar = tqdm(total=round(100 * max(self.config.targets, default=0), 1) or None,
                   desc=f"MoP search (% compression {MEASURES[self.config.compression_of]})",
                   unit="%")
        bar.update(round(100 * self.compression(count_params(self.model)), 1))
        while not all(self.reached(target) for target in targets):
            iteration = len(state.iterations) + 1
            record = self.step(self.model, iteration)
            release_freed_memory()  # the iteration's temporaries: the next one starts from the model alone
            state.iterations.append(record)
            state.save()  # the iteration before its checkpoints: a kill from here on replays it, then writes them
            self._save_reached(state, iteration)
            if self.config.compensation_settings.enabled:  # its replay would repeat every repair's calibration pass
                state.save_resume_point(self.model, iteration)
            done = round(100 * self.compression(record["params"]), 1)
            bar.update(min(done, bar.total or done) - bar.n)
            bar.set_postfix(path="".join(r["choice"] for r in state.iterations),
                            **({"speedup": f"{record['predicted_speedup']:.2f}x"} if self.latency else {}))
        bar.close()
        return state

    def _bare_replays(self, state: RunState) -> range:
        """The logged iterations a resume replays as bare cuts, without their repairs, before it loads the weights
        saved after the last of them (`resume.safetensors`); empty: every iteration replays with its repair. They
        start after the last iteration at which a checkpoint is still to be written (a target added since, or one
        a kill left unwritten), which needs that iteration's weights."""
        resume = state.resume_point()
        unwritten = [t for t in self.config.every_target if t.name not in state.targets]
        writes = [next((i for i, record in enumerate(state.iterations[:resume], 1)
                        if self.goals.may_have_reached(target, record)), 0) for target in unwritten]
        return range(max(writes, default=0) + 1, resume + 1)

    def _save_reached(self, state: RunState, iteration: int) -> None:
        """Write a checkpoint for each target that the current model, F^(iteration), reaches and that has none
        yet. Called after every iteration in order, replayed ones included, so each target is taken at the
        first iteration that reaches it, whenever it was added; `run.json` lists it once it is complete."""
        params = count_params(self.model)
        for target in self.config.every_target:
            if target.name in state.targets or not self.reached(target):
                continue
            save_checkpoint(self.loaded, self.model, self.out / target.name, self.provenance(state, target, iteration))
            state.targets[target.name] = {**target.record(), "iteration": iteration, "params": params,
                                          "compression": 1 - params / self.original_params,
                                          "non_embedding_compression": self._non_embedding_compression(params),
                                          "whole_model": self._whole_model(params),
                                          **self.goals.record(model_shape(self.model, self.adapter))}
            state.save()

    def _whole_model(self, params: int) -> dict:
        """The whole model's counts beside the language model's `params` (`count_params`): a vision-language
        model's vision tower and projector are never pruned, so they add the same count before and after."""
        other = count_all_params(self.model) - count_params(self.model)
        return {"params": params + other, "original_params": self.original_params + other,
                "compression": 1 - (params + other) / (self.original_params + other)}

    def _non_embedding_compression(self, params: int) -> float:
        return 1 - (params - self.embedding_params) / (self.original_params - self.embedding_params)

    def provenance(self, state: RunState, target: Target, iteration: int) -> dict:
        """mop.json of the checkpoint of `target`, reached by the current model at `iteration`."""
        params = count_params(self.model)
        iterations = state.iterations[:iteration]
        return {
            # the libraries of the session that writes this checkpoint, beside those of the one that began the run
            **state.header, "versions": versions(), "run_versions": state.header["versions"],
            **target.record(), "compression_of": self.config.compression_of,
            "reached_at_iteration": iteration, "mode": self.config.mode,
            "criteria": {"layer": self.config.layer_criterion, "width": self.config.width_criterion,
                         "path": self.config.path_criterion},
            "seed": self.config.seed, "path": "".join(r["choice"] for r in iterations),
            "params": params, "compression": 1 - params / self.original_params,
            "non_embedding_compression": self._non_embedding_compression(params),
            "whole_model": self._whole_model(params),
            **self.goals.record(model_shape(self.model, self.adapter)),
            "config": self.config.identity(),
            "iterations": [{k: v for k, v in r.items() if k not in ("removed", "compensation")} for r in iterations],
            "command": command(),
            **compensation_record(self.config.compensation_settings,
                                  [{"iteration": r["iteration"], **repair} for r in iterations
                                   for repair in r.get("compensation", [])]),
        }


def fewest_params(mode: str, shape: LayerShape, n_layers: int, layer: int, total: int,
                  units: WidthUnits = WidthUnits(), step: Callable[[int], StepCosts] | None = None) -> int:
    """The smallest parameter count a search in `mode` reaches from a model of `total` parameters with
    `n_layers` layers of `shape` and `layer` parameters each (shape arithmetic, no weights). Depth keeps two
    layers. Width shrinks every layer as far as the planner goes (`width_floor`: on coarse GQA shapes, where one
    group out of every layer costs more than a layer, attention is never pruned; with `step`, a run with speed
    targets, as far as width steps of `step(n_layers)`, matched in latency, go). The mixture takes depth steps
    down to two layers (a width step that can remove nothing forces one), then width steps on those two."""
    rest = total - n_layers * layer
    fixed = layer - shape.attention_params - shape.mlp_params  # norms, o_proj / down_proj biases

    def thinnest(n: int) -> int:  # the parameters of a layer as narrow as width steps on n layers leave it
        if step is None:
            return width_floor(shape, n, fixed, units)
        narrow = narrowest(shape, n, step(n), units)
        return fixed + narrow.attention_params + narrow.mlp_params

    kept = n_layers if mode == "width" else min(2, n_layers)
    return rest + kept * (layer if mode == "depth" else thinnest(kept))


def latency_step(latency: LatencyModel, dense: ModelShape, n_layers: int) -> StepCosts:
    """A width step matched in latency on `n_layers` layers: its budget is the depth step's predicted saving (one
    layer of the current widths, its fixed cost included), its units cost their predicted seconds."""
    def step(shape: LayerShape) -> tuple[float, UnitCosts]:
        unit = latency.unit_latency(layers_shape(dense, shape, n_layers))
        return unit.layer, UnitCosts.of_latency(unit, shape, n_layers)

    return step


def smallest_shape(mode: str, dense: ModelShape, shape: LayerShape, step: Callable[[int], StepCosts],
                   units: WidthUnits = WidthUnits()) -> ModelShape:
    """The smallest model a search in `mode` reaches from `dense` (layers of `shape`), as `fewest_params` counts
    it: two layers (depth), every layer as narrow as width steps of `step(n_layers)` leave it (width), or two
    layers that narrow (the mixture)."""
    kept = min(2, dense.layers)
    if mode == "depth":
        return layers_shape(dense, shape, kept)
    n_layers = dense.layers if mode == "width" else kept
    return layers_shape(dense, narrowest(shape, n_layers, step(n_layers), units), n_layers)


def texts_or_samples(loaded: LoadedModel, spec: str, n: int, length: int) -> list[str]:
    """The texts of `spec` (Alpaca rows as prompts), or, when no data can be read, `n` texts of `length` tokens
    sampled from the model itself (with a warning), the same whatever the run's seed."""
    try:
        return data.load_calibration(spec)
    except data.DataUnavailable as error:
        log.warning("%s", error)
        return data.sample_texts_from_model(loaded.model, loaded.tokenizer, n, length, DATA_SEED)


def calibration_batches(loaded: LoadedModel, config: SearchConfig) -> list[data.Batch]:
    """The run's calibration prompts, for every method: `config.calib_samples` of `config.calib`'s texts drawn
    with the fixed DATA_SEED (whatever the run's seed), truncated to `config.calib_max_length` tokens, or with
    `config.calib_packed` as many windows of exactly that many tokens of the joined texts (`data.packed_windows`);
    `config.batch_size` a batch."""
    texts = texts_or_samples(loaded, config.calib, config.calib_samples, config.calib_max_length)
    if config.calib_packed:
        windows = data.packed_windows(loaded.tokenizer, texts, config.calib_samples, config.calib_max_length, DATA_SEED)
        return [data.collate(windows[i : i + config.batch_size], loaded.tokenizer.pad_token_id)
                for i in range(0, len(windows), config.batch_size)]
    texts = data.sample(texts, config.calib_samples, DATA_SEED)
    return data.text_batches(loaded.tokenizer, texts, config.calib_max_length, config.batch_size)


def hash_seed(seed: int, iteration: int) -> int:
    """A per-iteration seed: the tuning subset, LoRA init and dropout of iteration t depend on (seed, t) only."""
    return (seed * 1_000_003 + iteration * 7919) % (2**31)
