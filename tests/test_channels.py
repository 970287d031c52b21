"""Structured pruning: channels really go (smaller tensors, coupled layers shrunk), the result
equals the masked model, and the artifact loads without pickle into the pruned shapes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_tensors

from autosqueeze.artifacts.artifact import load_artifact, save_artifact, stored_bytes
from autosqueeze.compression.recovery import Recovery
from autosqueeze.compression.techniques import Target, compress
from autosqueeze.examples import residual
from autosqueeze.examples.digits import example_input, loaders, pretrained_cnn
from autosqueeze.plans.plan import LayerPlan, Plan
from autosqueeze.searchspace.space import build_space

DEFAULT_SPACE = Path(__file__).parents[1] / "search_spaces" / "default.yaml"
TARGET = Target("cpu", example_input())


def test_pruned_channels_shrink_the_layer_and_the_next_one():
    plan = Plan({"features.2": LayerPlan(prune_channels=0.25)})
    pruned = compress(pretrained_cnn(), plan, TARGET).module
    assert pruned.features[2].weight.shape == (48, 32, 3, 3)
    assert pruned.features[2].bias.shape == (48,)
    assert pruned.features[5].weight.shape == (64, 48, 3, 3)  # its inputs went too


@pytest.mark.parametrize(
    "layers",
    [
        {"features.0": 0.5, "features.5": 0.25},  # neither's inputs are pruned
        {"features.2": 0.125, "classifier.1": 0.375},
    ],
)
def test_structured_pruning_equals_the_masked_model(layers):
    """Zeroing the removed channels (weights and bias; ReLU then gives 0) in the original must
    give exactly what the physically pruned model gives."""
    original = pretrained_cnn()
    plan = Plan({name: LayerPlan(prune_channels=r) for name, r in layers.items()})
    pruned = compress(original, plan, TARGET).module
    masked = copy.deepcopy(original)
    for name in plan.layers:
        before, after = original.get_submodule(name), pruned.get_submodule(name)
        kept = _kept_rows(before.weight, after.weight)
        assert len(kept) == after.weight.shape[0] < before.weight.shape[0]
        removed = [i for i in range(before.weight.shape[0]) if i not in kept]
        with torch.no_grad():
            masked.get_submodule(name).weight[removed] = 0
            masked.get_submodule(name).bias[removed] = 0
    x = loaders()[0][0]
    with torch.inference_mode():
        torch.testing.assert_close(pruned(x), masked(x), atol=1e-5, rtol=1e-5)


def test_the_output_layer_is_never_offered_channel_pruning():
    space = build_space(pretrained_cnn(), DEFAULT_SPACE, TARGET)
    offered = {name for name, k in space.layers.items() if "prune_channels" in k.searched}
    assert offered == {"features.0", "features.2", "features.5", "classifier.1"}
    without_input = build_space(pretrained_cnn(), DEFAULT_SPACE, Target("cpu"))
    assert not any("prune_channels" in k.searched for k in without_input.layers.values())


def test_residual_blocks_and_batchnorm_shrink_together(tmp_path):
    model = residual.pretrained()
    target = Target("cpu", residual.example_input())
    space = build_space(model, DEFAULT_SPACE, target)
    assert "head" not in {n for n, k in space.layers.items() if "prune_channels" in k.searched}
    plan = Plan(
        {
            "stem.0": LayerPlan(prune_channels=0.5),  # coupled to every residual add of stage 1
            "stage1.0.conv1.0": LayerPlan(prune_channels=0.25),  # inside a block
            "stage2.1.conv1.0": LayerPlan(prune_channels=0.5, bits=8, kernel="fp32"),
        }
    )
    compressed = compress(model, plan, target)
    pruned = compressed.module
    assert pruned.stem[1].num_features == pruned.stem[0].weight.shape[0] == 24
    assert pruned.stage1[1].conv2[0].weight.shape[0] == 24  # the residual partner shrank too
    assert pruned.stage1[0].conv1[1].running_mean.shape == (36,)
    assert pruned.stage2[1].conv1[0].weight.shape[0] == 48
    path = tmp_path / "resnet.safetensors"
    size = save_artifact(compressed, path)
    stored = load_tensors(stored_bytes(path))  # plain tensors: nothing to unpickle
    assert stored["stem.0.weight"].shape == (24, 1, 3, 3)
    loaded = load_artifact(path, residual.pretrained(), target)
    assert size < residual.WEIGHTS.stat().st_size
    x = loaders()[0][0]
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), pruned(x), atol=0.05, rtol=0.05)  # bits=8 layer


def test_recovery_wins_back_accuracy_lost_to_pruning():
    from autosqueeze.examples.digits import calibration
    from autosqueeze.usercode.metrics import accuracy

    plan = Plan({name: LayerPlan(prune_channels=0.5) for name in ("features.0", "features.5")})
    plan.layers["features.2"] = LayerPlan(prune_channels=0.375)
    plan.layers["classifier.1"] = LayerPlan(prune_channels=0.5)
    cpu = torch.device("cpu")
    plain = accuracy(compress(pretrained_cnn(), plan, TARGET).module, loaders(), cpu)
    recovered_model = compress(pretrained_cnn(), plan, TARGET, Recovery(calibration())).module
    recovered = accuracy(recovered_model, loaders(), cpu)
    assert recovered > plain + 0.02  # measured: 0.924 -> 0.978
    again = compress(pretrained_cnn(), plan, TARGET, Recovery(calibration())).module
    x = loaders()[0][0]
    with torch.inference_mode():
        torch.testing.assert_close(again(x), recovered_model(x), atol=0, rtol=0)  # seeded


def _kept_rows(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """Which of ``before``'s output rows survive in ``after``, matched on their values (the
    layers compared keep all their inputs)."""
    flat_before, flat_after = before.detach().flatten(1), after.detach().flatten(1)
    kept = []
    for row in flat_after:
        matches = (flat_before == row).all(dim=1).nonzero().flatten().tolist()
        assert len(matches) == 1
        kept.append(matches[0])
    return kept


def test_a_plan_gives_one_artifact_whatever_the_order_of_its_layers(tmp_path):
    """Coupled layers (the stem and the residual blocks it feeds) prune different channels
    depending on which goes first; a plan read back from JSON (sorted by name) must still
    rebuild the artifact the search measured."""
    from autosqueeze.examples.digits import calibration

    target = Target("cpu", residual.example_input())
    layers = {
        "stem.0": LayerPlan(prune_channels=0.5),
        "stage1.0.conv2.0": LayerPlan(prune_channels=0.25),
        "down.0": LayerPlan(prune_channels=0.25, bits=6),
    }
    recovery = Recovery(calibration(), steps=20)
    contents = []
    for order in (list(layers), sorted(layers), list(reversed(layers))):
        plan = Plan({name: layers[name] for name in order})
        path = tmp_path / f"{len(contents)}.safetensors"
        save_artifact(compress(residual.pretrained(), plan, target, recovery), path)
        contents.append(path.read_bytes())
    assert contents[1:] == contents[:1] * 2  # the same file, byte for byte


def test_compression_does_not_depend_on_the_callers_thread_count():
    """Ray evaluators run with one thread, the driver with all; the driver rebuilds front
    artifacts the evaluators measured, so recovery training (and SVD) must give the same
    weights whatever the thread count."""
    from autosqueeze.examples.digits import calibration

    plan = Plan(
        {
            "features.2": LayerPlan(prune_channels=0.5),
            "classifier.1": LayerPlan(rank=0.25, prune_channels=0.25),
        }
    )
    previous = torch.get_num_threads()
    states = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            compressed = compress(pretrained_cnn(), plan, TARGET, Recovery(calibration()))
            states.append(compressed.module.state_dict())
            assert torch.get_num_threads() == threads  # the caller's setting is restored
    finally:
        torch.set_num_threads(previous)
    for key, tensor in states[0].items():
        assert torch.equal(tensor, states[1][key]), key


def test_recovery_stops_once_the_loss_levels_off_and_stays_seeded():
    from autosqueeze.examples.digits import calibration

    plan = Plan({"features.2": LayerPlan(prune_channels=0.5)})
    steps = []
    models = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as compress runs it (measured: it stops after 175 steps)
    try:
        for _ in range(2):
            compressed = compress(pretrained_cnn(), plan, TARGET)
            recovery = Recovery(calibration(), steps=1000, lr=3e-3, min_gain=0.05)
            steps.append(recovery.run(compressed.module, pretrained_cnn()))
            models.append(compressed.module)
    finally:
        torch.set_num_threads(threads)
    assert steps[0] == steps[1] and steps[0] % 25 == 0 and 25 < steps[0] < 1000
    x = loaders()[0][0]
    with torch.inference_mode():
        torch.testing.assert_close(models[0](x), models[1](x), atol=0, rtol=0)


def test_recovery_never_leaves_a_plan_further_from_the_original_than_it_found_it():
    """A barely changed model and a learning rate far too large: training makes it worse,
    so recovery keeps the weights it started from (judged on held-out calibration batches,
    never trained on: a quarter of them, at most 4; one batch is both)."""
    from autosqueeze.compression.recovery import _split
    from autosqueeze.examples.digits import calibration

    inputs = calibration()
    held, trained = _split(len(inputs))
    assert held and trained and not set(held) & set(trained) and len(held) <= 4
    assert set(held) | set(trained) == set(range(len(inputs)))
    assert _split(1) == ([0], [0])
    original = pretrained_cnn()
    plan = Plan({"classifier.1": LayerPlan(rank=0.75)})

    def distance(model):
        with torch.inference_mode():
            return sum(
                float(torch.nn.functional.mse_loss(model(x), original(x)))
                for x in (inputs[i] for i in held)
            )

    start = compress(original, plan, TARGET).module
    before = distance(start)
    trained = compress(original, plan, TARGET).module
    Recovery(inputs, steps=50, lr=0.05).run(trained, original)
    assert distance(trained) <= before
    helped = compress(original, Plan({"features.2": LayerPlan(prune_channels=0.5)}), TARGET)
    far = distance(helped.module)
    Recovery(inputs, steps=50, lr=3e-3).run(helped.module, original)
    assert distance(helped.module) < far  # where training helps, it still does
