"""Typed run configuration: dataclass defaults < YAML preset < command-line flags.

One ``RunConfig`` is built and validated once (``imaml.app.arguments``, ``imaml.app.cli``) and passed
down; no globals. Each field carries its help and choices (``option``): the CLI is built from them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from imaml.choices import (ACTIVATIONS, ADAPTS, HEAD_INITS, JITTERS, QUERY_ASSIGNMENTS, ALGOS, BN_MODES, DIST_BACKENDS, EPISODES, EXECUTIONS, HYPERGRADS, INNER_OPTIMIZERS,
                           LR_SCHEDULES, META_OPTIMIZERS, OMNIGLOT_BACKGROUNDS, OMNIGLOT_TASKS, OMNIGLOT_VALS,
                           ON_DIVERGENCE, WANDB_MODES)
from imaml.errors import UsageError
from imaml.plugins import is_import_path, split_import_path

__all__ = ["RunConfig", "option", "flag", "field_type", "FIELDS", "ALGOS", "HYPERGRADS", "CONFIG_DIR", "MAX_SEED",
           "WANDB_ID"]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
WANDB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # W&B run ids also name a folder: runs/<id>
MAX_SEED = 2**32 - 1  # numpy's and torch's generators all take [0, 2³² − 1]; negative seeds are refused


def option(default: Any, help: str, choices: Optional[tuple] = None):
    """A ``RunConfig`` field with its ``--help`` text and, if it takes one of a list, its choices
    (argparse offers them; ``validate`` checks them for values from YAML and Python too)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class RunConfig:
    """Everything a run needs. Field names are the CLI flags with ``-`` for ``_``."""

    algo: str = option("imaml", 'imaml (implicit gradients), maml (second-order unrolled), fomaml (first order) '
                                'or pretrain (the baseline: one classifier trained on all meta-training classes, '
                                'fine-tuned per task from a prototype head; docs/benchmarks.md) or protonet '
                                '(Prototypical Networks: prototypes of the encoder\'s features, no inner loop)',
                   choices=ALGOS)
    task: str = option("glyphs", 'glyphs (embedded, generated), sinusoid, or a benchmark read from --data-root: '
                                 "omniglot, omniglot-lake (Lake's 20 one-shot runs), mini-imagenet, "
                                 'tiered-imagenet, cifarfs, fc100 (files: docs/benchmarks.md)')
    # episodes: N ways, K shots (support examples per class), Q query examples per class
    ways: Optional[int] = option(5, 'classes per task (N)')
    test_ways: Optional[int] = option(None, 'classes per task at meta-validation and meta-test; none: --ways (a '
                                            'different value needs a Lower problem that adapts any number of '
                                            'ways, e.g. the zero-init head)')
    shots: int = option(1, 'support examples per class (K); points per task for sinusoid')
    query_shots: int = option(5, 'query examples per class; points per task for sinusoid')
    data_root: str = option("data", 'where datasets are (the embedded glyphs are generated and cached here)')
    download: bool = option(False, 'let learn2learn download a missing benchmark into --data-root')
    augment: bool = option(False, 'augment meta-training images: random crop + horizontal flip (mini-imagenet, '
                                  'tiered-imagenet, cifarfs, fc100), small affine jitter (omniglot, omniglot-lake)')
    jitter: str = option("small", "Omniglot: the affine jitter of --augment and --test-augment: small (rotation "
                                  "±10°, scale 0.9–1.1, shift ±10%) or koch (Koch et al. 2015: rotation ±10°, "
                                  "shear ±0.3, scale 0.8–1.2 on each axis, shift ±2 of 105 px)", choices=JITTERS)
    stroke_jitter: float = option(0.0, "Omniglot: with --augment or --test-augment, each jittered image's strokes "
                                       "are thickened or thinned by a random fraction up to this of one 3×3 "
                                       "dilation or erosion; 0: off")
    # Omniglot: Lake's protocol (--task omniglot-lake) trains on one background set, validates on
    # held-out alphabets or characters of it, and meta-tests on the 20 official one-shot runs
    omniglot_background: str = option("full", 'omniglot-lake: the background set meta-training and '
                                              'meta-validation use: full (30 alphabets), small1 or small2 (5 '
                                              'alphabets, the minimal setting)', choices=OMNIGLOT_BACKGROUNDS)
    omniglot_val: str = option("auto", 'omniglot-lake: meta-validate on background alphabets or characters held '
                                       'out of meta-training; auto: alphabets for the full set, characters for '
                                       'small1/small2', choices=OMNIGLOT_VALS)
    episodes: str = option("any", 'Omniglot training tasks: any (classes from anywhere) or within-alphabet (all '
                                  "ways from one alphabet, like Lake's runs)", choices=EPISODES)
    class_rotations: Optional[bool] = option(None, 'Omniglot: each character turned by 90°, 180°, 270° is a new '
                                                   'training class; none: on')
    # meta-training
    meta_batch_size: int = option(16, 'tasks per meta-batch')
    meta_steps: int = option(1000, 'meta-training steps (meta-updates of θ)')
    meta_lr: float = option(1e-3, 'learning rate of the meta-optimizer')
    meta_optimizer: str = option("adam", 'adam, adamw or sgd (with --meta-momentum)', choices=META_OPTIMIZERS)
    meta_momentum: float = option(0.9, 'momentum of --meta-optimizer sgd')
    meta_weight_decay: float = option(0.0, 'weight decay of the meta-optimizer')
    time_budget: Optional[float] = option(None, 'seconds of meta-training (the meta-steps alone, not validation): '
                                                'meta-training stops after the meta-step that crosses them, then '
                                                'validates, checkpoints and meta-tests as at --meta-steps; a resumed '
                                                'run continues the budget; none: --meta-steps alone')
    test_also_at: Optional[float] = option(None, 'seconds of meta-training after which θ is meta-tested too, on the '
                                                 'same tasks (e.g. half of --time-budget): results.json\'s test_also_at; '
                                                 'none: at the end only')
    lr_schedule: str = option("none", 'meta learning-rate schedule over --meta-steps: none, cosine, or step (× '
                                      '--lr-gamma every --lr-step-every meta-steps)', choices=LR_SCHEDULES)
    lr_step_every: int = option(10000, 'step schedule: multiply by --lr-gamma every this many meta-steps')
    lr_gamma: float = option(0.5, 'step schedule: the factor every --lr-step-every meta-steps')
    # inner loop (task adaptation), shared by meta-training, meta-validation and meta-test
    inner_steps: int = option(5, 'inner steps (task adaptation) in meta-training')
    test_inner_steps: int = option(10, 'inner steps at meta-validation and meta-test')
    inner_lr: float = option(0.1, 'learning rate of the inner loop')
    inner_momentum: float = option(0.0, 'momentum of the inner-loop SGD (reset for every task)')
    inner_weight_decay: float = option(0.0, 'weight decay of the inner-loop SGD')
    inner_optimizer: str = option("sgd", "iMAML's inner optimizer on the proximal objective g: sgd (fixed "
                                         '--inner-lr), armijo (steepest descent with a backtracking line search, '
                                         'steps up to --inner-lr) or hessian-free (truncated-Newton: '
                                         "--inner-cg-steps of CG, then the line search; the iMAML paper's); see "
                                         'docs/meta-gradients.md', choices=INNER_OPTIMIZERS)
    inner_tol: float = option(1e-2, "iMAML: a task's inner loop stops once ‖∇g(φ)‖ ≤ tol·‖∇g(θ)‖ (its "
                                    'stationarity, logged as train/inner_stationarity); 0: always --inner-steps')
    inner_cg_steps: int = option(5, 'iMAML hessian-free: conjugate-gradient steps per Newton direction')
    lam: float = option(1.0, 'iMAML proximal strength λ: inner objective L_support(φ) + λ/2·‖φ − θ‖²')
    test_lam: Optional[float] = option(None, 'iMAML: λ at meta-validation and meta-test; none: --lam (the paper). '
                                             '0 adapts without the proximal term there, as the official code does')
    head_lam: Optional[float] = option(None, 'iMAML with --adapt all: λ on the output layer alone (a weak '
                                             "proximal term on the head, a strong one on the body); none: --lam")
    warmup_fraction: float = option(0.0, 'iMAML with --adapt all: the first fraction of --meta-steps adapt the '
                                          'head alone (--adapt head, λ = --head-lam or --lam), the rest the whole '
                                          'network from the θ they reached: a curriculum that starts the '
                                          'whole-network inner problem where it converges (docs/meta-gradients.md); '
                                          'the warm-up run is in <output-dir>/warmup. 0: none')
    test_augment: int = option(0, 'meta-validation and meta-test: K jittered copies of each support image join '
                                  "the support set and each query's log-probabilities are averaged over K "
                                  'jittered copies (Omniglot tasks; docs/benchmarks.md); 0: off')
    query_assignment: str = option("independent", "how a task's queries are classified: independent (each its "
                                                  "own argmax) or balanced (transductive: the assignment with "
                                                  'the same number of queries per class, e.g. Lake\'s runs)',
                                   choices=QUERY_ASSIGNMENTS)
    hypergrad: str = option("cg", 'iMAML hypergradient solver: cg, neumann, darts, exact (dense; tiny models), '
                                  'minres (symmetric indefinite systems), normal-cg (CG on A²x = Av, two products '
                                  'per step), cg-damped (CG on A + --cg-damping·I); these three take --cg-steps '
                                  'and --cg-tol (docs/meta-gradients.md); or an import path module:function to a '
                                  'linear solver (docs/extending.md)')
    cg_steps: int = option(5, 'maximum conjugate-gradient steps per task')
    cg_tol: float = option(1e-5, 'CG stops when ‖residual‖ ≤ tol·‖∇φ L_query‖')
    cg_trust_region: bool = option(True, 'truncate CG (Steihaug) at ‖x‖ = ‖v‖/λ and on negative curvature: the '
                                         'hypergradient is never longer than ∇φ L_query')
    neumann_terms: int = option(20, 'hypergrad neumann: terms of the series Σ (I − αA)^k (one Hessian-vector product '
                                    'each)')
    neumann_alpha: Optional[float] = option(None, 'Neumann step size; none: 1/λ_max estimated by power iteration')
    darts_radius: float = option(0.01, 'hypergrad darts: the finite-difference step, relative to the parameters\' norm')
    cg_damping: float = option(0.0, "cg-damped: μ ≥ 0 added to the system's diagonal, as the official iMAML code "
                                    'does; a bias toward a scaled first-order gradient, shown by '
                                    'train/solver_residual (against the undamped system); 0: the plain operator')
    # how a meta-batch runs: one task at a time, or all tasks at once (same meta-gradient)
    execution: str = option("auto", 'per-task (one inner loop per task), vectorized (the whole meta-batch as one '
                                    'batched computation; same meta-gradient) or auto (vectorized where it is '
                                    'faster and supported)', choices=EXECUTIONS)
    grad_checkpoint: bool = option(False, "MAML: keep only each inner step's input and recompute the step in the "
                                          "backward pass, so memory stays near one step's")
    # what the inner loop adapts and where a task's head starts: settings of every --algo
    adapt: str = option("all", "what the inner loop adapts: all (the whole network, from θ) or head (the output "
                               "layer alone, on θ's features computed once per task; ANIL with maml/fomaml)",
                        choices=ADAPTS)
    head_init: str = option("theta", "where each task's head starts: theta (θ's head) or zero (zeros, one row per "
                                     "class, so --test-ways may differ from --ways)", choices=HEAD_INITS)
    # model
    model: Optional[str] = option(None, 'conv4 (max-pool; mini-ImageNet), conv4-strided (stride-2, '
                                        "average-pooled; MAML's Omniglot), resnet12, or mlp; or an import path "
                                        'module:Class to an nn.Module built as Class(input_shape, num_outputs, '
                                        "config); none: the task's default")
    channels: int = option(64, 'filters per convolution (hidden units per layer for mlp)')
    bn_mode: str = option("transductive", 'BatchNorm statistics: transductive (batch statistics at meta-train and '
                                          'meta-test, the MAML paper), inductive (running statistics from '
                                          'meta-training used at meta-test), episodic (support-set statistics '
                                          'applied to the queries)', choices=BN_MODES)
    activation: str = option("relu", "the conv4 / conv4-strided / mlp nonlinearity: relu (the papers' networks) or silu "
                                     "(smooth: iMAML's inner loop and solve converge on it; ReLU's kinks stall them)",
                             choices=ACTIVATIONS)
    # extensions: import paths (module.sub:ClassName) replacing a built-in class; docs/extending.md
    lower_problem: Optional[str] = option(None, 'import path module:Class to a Lower problem replacing the '
                                                'built-in one (subclass of ImplicitLower for imaml, UnrolledLower '
                                                'for maml/fomaml)')
    upper_problem: Optional[str] = option(None, 'import path module:Class to an Upper problem (subclass of MetaInit)')
    env: Optional[str] = option(None, 'import path module:Class to an Env (subclass of envs.FewShotEnv)')
    # evaluation
    val_every: int = option(100, 'meta-validate (and checkpoint) every this many meta-steps, and at the end')
    val_tasks: int = option(100, 'tasks per meta-validation')
    test_tasks: int = option(600, 'tasks in the final meta-test (mean and 95%% CI over them)')
    test_query_shots: Optional[int] = option(None, 'query examples per class at meta-validation and meta-test; '
                                                   'none: --query-shots')
    # run
    seed: int = option(0, 'seed of every random choice (tasks, θ₀, jitter), in [0, 2³² − 1]')
    device: str = option("cpu", 'cpu, cuda or cuda:N')
    dist_backend: str = option("auto", 'torch.distributed backend when launched with torchrun: auto (nccl on '
                                       'GPUs, gloo on CPU), nccl or gloo; see docs/distributed.md', choices=DIST_BACKENDS)
    processes: int = option(0, 'on CPU, single-thread processes sharing each meta-batch (a local torchrun-style '
                               'job); 0: one per core, at most one per task; 1: just this process')
    keep_freed_memory: bool = option(True, 'on CPU, malloc keeps freed memory for the next inner step instead of '
                                           'returning it to the system (faster; memory stays at its peak until '
                                           'exit)')
    output_dir: Optional[str] = option(None, "the run's folder (results.json, logs, plots, checkpoints), used as "
                                             'given; one that holds a run is refused unless --resume or --overwrite. '
                                             'none: a new folder runs/<date>_<time> (runs/<W&B id> with W&B on), '
                                             'with runs/latest pointing at the newest')
    overwrite: bool = option(False, 'replace the run held in --output-dir (its files are removed once the new run '
                                    'has passed every check)')
    log_every: int = option(10, 'print and record a line every this many meta-steps')
    # robustness: what a diverging meta-batch does, and optional meta-gradient clipping
    on_divergence: str = option("stop", 'when a meta-batch diverges: stop (save a checkpoint, exit 3) or skip it', choices=ON_DIVERGENCE)
    divergence_factor: float = option(1000.0, 'adapted weights with ‖φ‖ > factor·‖θ‖ count as diverged')
    meta_grad_clip: float = option(0.0, 'clip the meta-gradient to this norm; 0: off')
    # Weights & Biases (disabled unless asked for; local logs and plots are always written)
    wandb_mode: str = option("disabled", 'Weights & Biases: online, offline (sync later) or disabled', choices=WANDB_MODES)
    wandb_project: Optional[str] = option(None, "W&B project; none: W&B's default (uncategorized)")
    wandb_entity: Optional[str] = option(None, "W&B user or team; none: the logged-in user's default")
    wandb_name: Optional[str] = option(None, "W&B run's display name; none: W&B's generated name")
    wandb_group: Optional[str] = option(None, 'W&B group, e.g. one per comparison, to see its runs together')
    wandb_tags: Optional[str] = option(None, 'W&B tags, comma-separated')
    wandb_id: Optional[str] = option(None, 'W&B run id; with W&B on and no --output-dir the run writes to '
                                           'runs/<id>; none: $WANDB_RUN_ID (as a sweep agent sets it) or a new id')
    wandb_log_checkpoints: bool = option(False, 'upload checkpoints/latest.pt and best.pt to W&B as a model '
                                                'artifact at the end')
    # checkpoints: <output-dir>/checkpoints/{latest,best}.pt at every validation and at the end
    resume: Optional[str] = option(None, 'continue the run saved in this output directory (its '
                                         'checkpoints/latest.pt); flags given now override its settings, e.g. a '
                                         'larger --meta-steps')
    eval_only: bool = option(False, 'only meta-test the --checkpoint and write results.json')
    checkpoint: Optional[str] = option(None, 'a checkpoint file, for --eval-only')
    config: Optional[str] = option(None, 'YAML preset: a file, or a shipped preset by name (e.g. omniglot-imaml-hf; '
                                         'list them with --list-presets); none: the task\'s preset for the method '
                                         'the flags name, configs/<task>-<method>.yaml, if there is one')

    def validate(self) -> "RunConfig":
        """Check every value once, before any work; raise UsageError naming the fix."""
        for f in dataclasses.fields(self):  # every option with a list of values
            if f.metadata.get("choices"):
                _one_of(f.name, getattr(self, f.name), f.metadata["choices"])
        if self.hypergrad not in HYPERGRADS and not is_import_path(self.hypergrad):
            raise UsageError(f"--hypergrad {self.hypergrad}: unknown solver; choose one of "
                             f"{', '.join(HYPERGRADS)}, or an import path module:function")
        for name in ("lower_problem", "upper_problem", "env", "model", "hypergrad"):
            # these three are always import paths; model and hypergrad also take built-in names
            _import_path_syntax(name, getattr(self, name), always=name in ("lower_problem", "upper_problem", "env"))
        for name in ("meta_momentum", "inner_momentum"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise UsageError(f"{flag(name)} {value}: must be in [0, 1)")
        for name in ("meta_weight_decay", "inner_weight_decay", "cg_damping"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise UsageError(f"{flag(name)} {getattr(self, name)}: must be >= 0")
        if not 0 < self.lr_gamma <= 1:
            raise UsageError(f"--lr-gamma {self.lr_gamma}: must be in (0, 1]")
        self._validate_omniglot()
        self._validate_inner_loop()
        self._validate_adaptation()
        if self.grad_checkpoint and self.algo != "maml":
            raise UsageError(f"--grad-checkpoint applies to --algo maml (memory through the unrolled inner loop); "
                             f"{self.algo}'s memory does not grow with inner steps: drop the flag")
        _positive("divergence_factor", self.divergence_factor)
        if self.meta_grad_clip < 0:
            raise UsageError(f"--meta-grad-clip {self.meta_grad_clip}: must be >= 0 (0 turns clipping off)")
        for name in ("shots", "query_shots", "meta_batch_size", "meta_steps", "inner_steps",
                     "test_inner_steps", "cg_steps", "neumann_terms", "channels", "val_every",
                     "val_tasks", "log_every", "lr_step_every"):
            _at_least(name, getattr(self, name), 1)
        if self.ways is not None:
            _at_least("ways", self.ways, 2)
        _at_least("processes", self.processes, 0)
        if self.test_ways is not None:
            if self.ways is None:
                raise UsageError(f"--test-ways {self.test_ways}: only for classification tasks (with --ways N)")
            _at_least("test_ways", self.test_ways, 2)
        _at_least("test_tasks", self.test_tasks, 2)  # a 95% CI needs two tasks
        if self.test_query_shots is not None:
            _at_least("test_query_shots", self.test_query_shots, 1)
        for name in ("meta_lr", "inner_lr", "lam", "cg_tol", "darts_radius"):
            _positive(name, getattr(self, name))
        if self.neumann_alpha is not None:
            _positive("neumann_alpha", self.neumann_alpha)
        if self.eval_only and not self.checkpoint:
            raise UsageError("--eval-only needs --checkpoint PATH (e.g. runs/latest/checkpoints/best.pt)")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise UsageError(f"--device {self.device}: unknown device; use cpu, cuda or cuda:N")
        if not 0 <= self.seed <= MAX_SEED:
            raise UsageError(f"--seed {self.seed}: must be an integer in [0, {MAX_SEED}]")
        self._validate_run()
        if self.wandb_id is not None and not WANDB_ID.fullmatch(self.wandb_id):
            raise UsageError(f"--wandb-id {self.wandb_id!r}: use 1 to 64 letters, digits, '-' or '_'")
        return self

    def _validate_run(self) -> None:
        if self.time_budget is not None:
            _positive("time_budget", self.time_budget)
        if self.test_also_at is not None:
            _positive("test_also_at", self.test_also_at)
        if self.output_dir == "":
            raise UsageError("--output-dir: may not be empty (leave it out for a new folder under runs/)")
        if self.overwrite and self.resume:
            raise UsageError("--overwrite with --resume: --resume continues the run in its folder, --overwrite "
                             "replaces it; drop one")

    @property
    def warmup_steps(self) -> int:
        """The meta-steps of ``--warmup-fraction``'s head warm-up."""
        return round(self.warmup_fraction * self.meta_steps)

    def _validate_adaptation(self) -> None:
        if self.test_augment < 0:
            raise UsageError(f"--test-augment {self.test_augment}: must be >= 0 (0: no test-time augmentation)")
        if self.test_augment and self.task not in OMNIGLOT_TASKS:
            raise UsageError(f"--test-augment {self.test_augment}: the test-time jitter is defined for Omniglot images "
                             f"({', '.join(OMNIGLOT_TASKS)}); use --test-augment 0 with --task {self.task}")
        jitter_flags = [f for f, given in (("--jitter", self.jitter != "small"), ("--stroke-jitter", self.stroke_jitter))
                        if given]
        if jitter_flags and (self.task not in OMNIGLOT_TASKS or not (self.augment or self.test_augment)):
            raise UsageError(f"{' and '.join(jitter_flags)}: for the jitter of Omniglot's --augment and --test-augment; "
                             f"give it with --task omniglot or omniglot-lake and one of those on")
        if not 0 <= self.stroke_jitter <= 1:
            raise UsageError(f"--stroke-jitter {self.stroke_jitter}: must be in [0, 1] (a fraction of one dilation "
                             f"or erosion; 0: off)")
        if self.query_assignment == "balanced" and self.task == "sinusoid":
            raise UsageError("--query-assignment balanced: the sinusoid task is regression; use independent")
        if self.test_lam is not None and not (self.test_lam >= 0 and math.isfinite(self.test_lam)):
            raise UsageError(f"--test-lam {self.test_lam}: must be >= 0 (0: no proximal term at meta-test)")
        if self.head_lam is not None:
            if not (self.head_lam > 0 and math.isfinite(self.head_lam)):
                raise UsageError(f"--head-lam {self.head_lam}: must be > 0")
            if self.algo != "imaml" or self.adapt != "all":
                raise UsageError(f"--head-lam {self.head_lam}: a second λ for the output layer of a whole network "
                                 f"adapted by iMAML (--algo imaml --adapt all); with --adapt head, --lam is the head's")
        if self.warmup_fraction:
            if self.algo != "imaml" or self.adapt != "all" or self.lower_problem:
                raise UsageError(f"--warmup-fraction {self.warmup_fraction}: a head warm-up before whole-network "
                                 f"iMAML (--algo imaml --adapt all, no --lower-problem); use --warmup-fraction 0")
            if not 0 < self.warmup_steps < self.meta_steps:
                raise UsageError(f"--warmup-fraction {self.warmup_fraction}: {self.warmup_steps} of {self.meta_steps} "
                                 f"meta-steps; give a fraction in (0, 1) that leaves both phases at least one step")
        if self.lower_problem and self.adapt != "all":
            raise UsageError(f"--adapt {self.adapt} with --lower-problem {self.lower_problem}: the Lower problem "
                             f"decides what adapts; drop one of the two")
        if self.algo in ("pretrain", "protonet") and (self.adapt, self.head_init) != ("all", "theta"):
            raise UsageError(f"--adapt/--head-init: --algo {self.algo} fits its own prototype head; drop them")
        if self.algo == "protonet" and self.task == "sinusoid":
            raise UsageError("--algo protonet classifies by class prototypes; --task sinusoid is regression: use "
                             "--algo maml, fomaml or imaml")

    def _validate_inner_loop(self) -> None:
        if self.algo != "imaml":
            for name in ("inner_optimizer", "inner_tol", "inner_cg_steps"):
                if getattr(self, name) != getattr(RunConfig, name):
                    raise UsageError(f"{flag(name)} {getattr(self, name)}: only for --algo imaml ({self.algo}'s "
                                     f"meta-gradient differentiates its plain SGD steps); drop the flag")
        if self.inner_optimizer != "sgd" and self.inner_momentum:
            raise UsageError(f"--inner-momentum {self.inner_momentum}: only with --inner-optimizer sgd "
                             f"({self.inner_optimizer} chooses its own steps)")
        if not (0 <= self.inner_tol < 1):
            raise UsageError(f"--inner-tol {self.inner_tol}: must be in [0, 1) (0: always run --inner-steps)")
        _at_least("inner_cg_steps", self.inner_cg_steps, 1)

    def _validate_omniglot(self) -> None:
        for name, value, default in (("episodes", self.episodes, "any"), ("class_rotations", self.class_rotations, None)):
            if value != default and self.task not in OMNIGLOT_TASKS:
                raise UsageError(f"{flag(name)} {value}: only for the Omniglot tasks ({', '.join(OMNIGLOT_TASKS)})")
        for name in ("omniglot_background", "omniglot_val"):
            if getattr(self, name) != getattr(RunConfig, name) and self.task != "omniglot-lake":
                raise UsageError(f"{flag(name)} {getattr(self, name)}: only for --task omniglot-lake "
                                 f"(--task omniglot is the MAML paper's split of both full sets)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def flag(name: str) -> str:
    """The command-line flag of field ``name``."""
    return "--" + name.replace("_", "-")


def _one_of(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise UsageError(f"{flag(name)} {value}: unknown value; choose one of {', '.join(choices)}")


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise UsageError(f"{flag(name)} {value}: must be an integer >= {low}")


def _import_path_syntax(name: str, value: Optional[str], always: bool) -> None:
    """Only the form here; whether it imports is checked when the run is built."""
    if value is not None and (always or is_import_path(value)):
        try:
            split_import_path(value)
        except ValueError as err:
            raise UsageError(f"{flag(name)} {err}") from None


def _positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise UsageError(f"{flag(name)} {value}: must be a positive number")


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
_TYPES = {"bool": bool, "int": int, "float": float, "str": str}


def field_type(name: str) -> type:
    """The scalar type of a field (``Optional[int]`` -> int)."""
    text = str(FIELDS[name].type)
    for key, typ in _TYPES.items():
        if key in text:
            return typ
    raise TypeError(text)
