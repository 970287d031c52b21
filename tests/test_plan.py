import pytest

from autosqueeze.compression.techniques import check_plan
from autosqueeze.plans.plan import LayerPlan, Plan


def test_plan_json_round_trip():
    plan = Plan(
        {
            "features.0": LayerPlan(bits=4, prune=0.35, rank=0.5, group_size=32),
            "classifier.3": LayerPlan(bits=16),
        }
    )
    assert Plan.from_json(plan.to_json()) == plan
    assert Plan.from_dict(plan.to_dict()) == plan


def test_a_plan_with_unknown_knobs_is_read_but_never_applied():
    """A knob no registered technique has (a user's technique whose module this process has
    not imported, or a typo) is read, so a reader shows the study, and refused where used."""
    plan = Plan.from_dict({"format": 1, "layers": {"a": {"bits": 8, "colour": "red"}}})
    assert plan.layers["a"].extra == {"colour": "red"} and plan.layers["a"].bits == 8
    assert Plan.from_json(plan.to_json()) == plan
    with pytest.raises(ValueError, match="no technique has the knob 'colour'"):
        check_plan(plan)
    with pytest.raises(ValueError, match="unknown knob 'colour'"):
        LayerPlan.of(colour="red")


@pytest.mark.parametrize(
    ("values", "why"),
    [
        ({"bits": "8"}, "bits is '8', not a int"),
        ({"Bad Name": 1}, "is not a knob name"),
        ({"x" * 65: 1}, "is not a knob name"),
        ({"share": [1, 2]}, "share is \\[1, 2\\], not a float"),
        ({"share": None}, "share is None, not a float"),
        ({"share": True}, "share is True, not a float"),
    ],
)
def test_a_plan_field_of_the_wrong_type_or_name_is_rejected(values, why):
    with pytest.raises(ValueError, match=why):
        Plan.from_dict({"format": 1, "layers": {"a": values}})


def test_a_stored_plans_settings_are_checked_as_a_space_rules_are():
    """A setting is checked by its ``Setting`` wherever it comes from: a plan read from an
    artifact is refused with the criterion no technique has, not applied without it."""
    plan = Plan.from_dict({"format": 1, "layers": {"a": {"prune_by": "obs"}}})
    with pytest.raises(ValueError, match="layer 'a': prune_by is one of magnitude"):
        check_plan(plan)
    plan = Plan.from_dict({"format": 1, "layers": {"a": {"group_size": 0}}})
    with pytest.raises(ValueError, match="layer 'a': group_size 0 is not positive"):
        check_plan(plan)


def test_a_plan_of_another_format_is_rejected():
    with pytest.raises(ValueError, match="unsupported plan format"):
        Plan.from_dict({"format": 99, "layers": {}})


def test_uniform_plan():
    plan = Plan.uniform(["a", "b"], bits=8)
    assert plan.layers == {"a": LayerPlan(bits=8), "b": LayerPlan(bits=8)}
