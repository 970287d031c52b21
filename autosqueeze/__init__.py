"""autosqueeze: search per-layer compression plans for a PyTorch model under hardware budgets.

The flow runs one way: config -> space -> plan -> compressed model -> artifact ->
measurements -> study -> front -> reports.
"""

from autosqueeze.artifact import load_artifact, read_plan, save_artifact
from autosqueeze.config import StudyConfig, load_config
from autosqueeze.errors import TrialError, UserError
from autosqueeze.evaluator import Evaluated, Evaluator, evaluate_file
from autosqueeze.finetune import Finetuned, finetune
from autosqueeze.kernels import KERNELS
from autosqueeze.measure import Measurements, measure_latency, measure_memory
from autosqueeze.plan import LayerPlan, Plan
from autosqueeze.recovery import Recovery
from autosqueeze.search import SearchResult, SensitivityResult, run_search, run_sensitivity
from autosqueeze.shipping import Exported, export_plan
from autosqueeze.space import SearchSpace, build_space
from autosqueeze.task import Task, load_task
from autosqueeze.techniques import CompressedModel, Target, compress
from autosqueeze.validation import Validation, validate

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
