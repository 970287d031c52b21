import torch
from torch import nn

from autosqueeze.compression.techniques.base import CompressedModel, Target
from autosqueeze.compression.techniques.calibration import over_calibration
from autosqueeze.plans.plan import Plan


def test_a_statistic_is_summed_over_the_batches_or_joined_as_asked():
    model = nn.Sequential(nn.Linear(3, 2))
    batches = [torch.tensor([[1.0, -4.0, 0.0]]), torch.tensor([[-2.0, 1.0, 0.5]])]
    compressed = CompressedModel(model, Plan(), Target(calibration=batches))

    def largest(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x.abs().amax(0)

    summed = over_calibration(compressed, {"0"}, largest, "a test")["0"]
    assert torch.equal(summed, torch.tensor([3.0, 5.0, 0.5]))
    ranges = over_calibration(compressed, {"0"}, largest, "a test", torch.maximum)["0"]
    assert torch.equal(ranges, torch.tensor([2.0, 4.0, 0.5]))
