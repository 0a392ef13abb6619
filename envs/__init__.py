"""The data side: task distributions and the Betty Env that couples support and query."""

from envs.meta_batch import MetaBatch, Task
from envs.few_shot_env import FewShotEnv
from envs.registry import TASKS, build_task_sources

__all__ = ["MetaBatch", "Task", "FewShotEnv", "TASKS", "build_task_sources"]
