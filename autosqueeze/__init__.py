"""autosqueeze: search per-layer compression plans for a PyTorch model under hardware budgets.

The flow runs one way: config -> space -> plan -> compressed model -> artifact ->
measurements -> study -> front -> reports.
"""

from autosqueeze.artifact import load_artifact, read_plan, save_artifact
from autosqueeze.config import StudyConfig, load_config
from autosqueeze.errors import TrialError, UserError
from autosqueeze.measure import Evaluator, Measurements, measure_latency
from autosqueeze.plan import LayerPlan, Plan
from autosqueeze.search import SearchResult, run_search
from autosqueeze.space import SearchSpace, build_space
from autosqueeze.task import Task, load_task
from autosqueeze.techniques import CompressedModel, compress

__version__ = "0.1.0"

__all__ = [
    "CompressedModel",
    "Evaluator",
    "LayerPlan",
    "Measurements",
    "Plan",
    "SearchResult",
    "SearchSpace",
    "StudyConfig",
    "Task",
    "TrialError",
    "UserError",
    "build_space",
    "compress",
    "load_artifact",
    "load_config",
    "load_task",
    "measure_latency",
    "read_plan",
    "run_search",
    "save_artifact",
]
