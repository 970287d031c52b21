"""autosqueeze: search per-layer compression plans for a PyTorch model under hardware budgets.

The flow runs one way: config -> space -> plan -> compressed model -> artifact ->
measurements -> study -> front -> reports.
"""

from autosqueeze.artifacts.artifact import load_artifact, read_plan, save_artifact
from autosqueeze.common.errors import TrialError, UserError
from autosqueeze.compression.kernels import KERNELS
from autosqueeze.compression.recovery import Recovery
from autosqueeze.compression.techniques import CompressedModel, Target, compress
from autosqueeze.measuring.evaluator import Evaluated, Evaluator, evaluate_file
from autosqueeze.measuring.measure import Measurements, measure_latency, measure_memory
from autosqueeze.plans.plan import LayerPlan, Plan
from autosqueeze.problem.task import Task, load_task
from autosqueeze.results.finetune import Finetuned, finetune
from autosqueeze.results.shipping import Exported, export_plan
from autosqueeze.searching.search import (
    SearchResult,
    SensitivityResult,
    run_search,
    run_sensitivity,
)
from autosqueeze.searching.validation import Validation, validate
from autosqueeze.searchspace.space import SearchSpace, build_space
from autosqueeze.settings.config import StudyConfig, load_config

__version__ = "0.1.0"

__all__ = [
    "KERNELS",
    "CompressedModel",
    "Evaluated",
    "Evaluator",
    "Exported",
    "Finetuned",
    "LayerPlan",
    "Measurements",
    "Plan",
    "Recovery",
    "SearchResult",
    "SearchSpace",
    "SensitivityResult",
    "StudyConfig",
    "Target",
    "Task",
    "TrialError",
    "UserError",
    "Validation",
    "build_space",
    "compress",
    "evaluate_file",
    "export_plan",
    "finetune",
    "load_artifact",
    "load_config",
    "load_task",
    "measure_latency",
    "measure_memory",
    "read_plan",
    "run_search",
    "run_sensitivity",
    "save_artifact",
    "validate",
]
