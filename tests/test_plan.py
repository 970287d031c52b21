import pytest

from autosqueeze.plan import LayerPlan, Plan


def test_plan_json_round_trip():
    plan = Plan(
        {
            "features.0": LayerPlan(bits=4, prune=0.35, rank=0.5, group_size=32),
            "classifier.3": LayerPlan(bits=16),
        }
    )
    assert Plan.from_json(plan.to_json()) == plan
    assert Plan.from_dict(plan.to_dict()) == plan


def test_a_plan_with_unknown_fields_or_format_is_rejected():
    with pytest.raises(ValueError, match="unknown plan fields"):
        Plan.from_dict({"format": 1, "layers": {"a": {"bits": 8, "colour": "red"}}})
    with pytest.raises(ValueError, match="unsupported plan format"):
        Plan.from_dict({"format": 99, "layers": {}})


def test_uniform_plan():
    plan = Plan.uniform(["a", "b"], bits=8)
    assert plan.layers == {"a": LayerPlan(bits=8), "b": LayerPlan(bits=8)}
