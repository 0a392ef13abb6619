"""The data side: task distributions and the Betty Env that couples support and query."""

from envs.episodes import Episodes, Task
from envs.few_shot_env import FewShotEnv
from envs.registry import TASKS, build_task_sources

__all__ = ["Episodes", "Task", "FewShotEnv", "TASKS", "build_task_sources"]
