"""The values each named option takes, torch-free: the CLI checks them before any heavy import,
and the modules that act on them (models, solvers, inner optimizers) name the same tuples."""

__all__ = ["ALGOS", "HYPERGRADS", "WANDB_MODES", "BN_MODES", "ACTIVATIONS", "META_OPTIMIZERS", "LR_SCHEDULES", "DIST_BACKENDS",
           "EXECUTIONS", "INNER_OPTIMIZERS", "OMNIGLOT_BACKGROUNDS", "OMNIGLOT_VALS", "EPISODES", "OMNIGLOT_TASKS",
           "ON_DIVERGENCE", "MODELS", "ADAPTS", "HEAD_INITS", "QUERY_ASSIGNMENTS", "JITTERS"]

ALGOS = ("imaml", "maml", "fomaml", "pretrain", "protonet")
HYPERGRADS = ("cg", "neumann", "darts", "exact", "minres", "normal-cg", "cg-damped")
WANDB_MODES = ("online", "offline", "disabled")
BN_MODES = ("transductive", "inductive", "episodic")
ACTIVATIONS = ("relu", "silu")  # imaml.models.ACTIVATIONS maps them to layers
META_OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("none", "cosine", "step")
DIST_BACKENDS = ("auto", "nccl", "gloo")
EXECUTIONS = ("auto", "per-task", "vectorized")
ADAPTS = ("all", "head")
HEAD_INITS = ("theta", "zero")
QUERY_ASSIGNMENTS = ("independent", "balanced")
INNER_OPTIMIZERS = ("sgd", "armijo", "hessian-free")
OMNIGLOT_BACKGROUNDS = ("full", "small1", "small2")
OMNIGLOT_VALS = ("auto", "alphabets", "characters")
EPISODES = ("any", "within-alphabet")
JITTERS = ("small", "koch")  # envs.registry.JITTER_RANGES holds their ranges
OMNIGLOT_TASKS = ("omniglot", "omniglot-lake")
ON_DIVERGENCE = ("stop", "skip")
MODELS = ("conv4", "conv4-strided", "resnet12", "mlp")
