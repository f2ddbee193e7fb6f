"""Tasks: problems with reference answers, a seeded train/test split and a reward.

>>> import random
>>> task = get_task("arithmetic", digits=2)
>>> problem = task.problems("train", 1)[0]
>>> task.reward(task.trace(problem, random.Random(0), "think"), problem)["accuracy"]
1.0
"""

from r1kit.tasks.base import (
    DEFAULT_WEIGHTS,
    SPLITS,
    TASKS,
    TRACE_STYLES,
    Problem,
    SyntheticTask,
    Task,
    get_task,
    register_task,
)
from r1kit.tasks.arithmetic import ArithmeticTask
from r1kit.tasks.countdown import CountdownTask, check_countdown, evaluate_expression
from r1kit.tasks.math_file import MathFileTask
from r1kit.tasks.word_problems import WordProblemTask

__all__ = [
    "ArithmeticTask",
    "CountdownTask",
    "DEFAULT_WEIGHTS",
    "MathFileTask",
    "Problem",
    "SPLITS",
    "SyntheticTask",
    "TASKS",
    "TRACE_STYLES",
    "Task",
    "WordProblemTask",
    "check_countdown",
    "evaluate_expression",
    "get_task",
    "register_task",
]
