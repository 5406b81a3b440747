"""The operator's settings, read once from its environment (``pretrainctl operator``)."""

from __future__ import annotations

import pytest
from pretrain_operator.kube.settings import OperatorSettings, SettingsError
from pretrain_operator.telemetry.metrics import OperatorMetrics
from pretrain_operator.telemetry.recovery import DEFAULT_BUDGETS, PHASES


def test_settings_come_from_prefixed_variables_with_lists_and_switches_parsed() -> None:
    settings = OperatorSettings.from_environ(
        {
            "PRETRAIN_OPERATOR_NAMESPACES": " ml, research ,",
            "PRETRAIN_OPERATOR_STANDALONE": "true",
            "PRETRAIN_OPERATOR_WATCH_NODES": "0",
            "PRETRAIN_OPERATOR_RESYNC_SECONDS": "12.5",
            "PRETRAIN_OPERATOR_STANDBY_PRIORITY_CLASS": "",  # empty: the default
            "UNRELATED": "x",
        }
    )
    assert settings.namespaces == ("ml", "research")
    assert (settings.standalone, settings.watch_nodes) == (True, False)
    assert settings.resync_seconds == 12.5
    assert settings.standby_priority_class is None
    assert OperatorSettings.from_environ({}) == OperatorSettings()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RESYNC_SECONDS", "-1"),
        ("STANDALONE", "sometimes"),
        ("GANG_SCHEDULER", "kube"),
        ("RECOVERY_BUDGETS", "nap=30"),
        ("RECOVERY_BUDGETS", "restore=-1"),
        ("RECOVERY_BUDGETS", "restore"),
    ],
)
def test_a_bad_setting_stops_the_operator_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=f"PRETRAIN_OPERATOR_{name}"):
        OperatorSettings.from_environ({f"PRETRAIN_OPERATOR_{name}": value})


def test_recovery_budgets_come_as_pairs_and_are_exported_over_the_defaults() -> None:
    settings = OperatorSettings.from_environ(
        {"PRETRAIN_OPERATOR_RECOVERY_BUDGETS": "detect=30, restore=90.5"}
    )
    assert settings.recovery_budgets == {"detect": 30.0, "restore": 90.5}
    metrics = OperatorMetrics(budgets=settings.recovery_budgets)
    exported = {
        sample.labels["phase"]: sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == "pretrainjob_recovery_phase_budget_seconds"
    }
    assert exported == {**DEFAULT_BUDGETS, "detect": 30.0, "restore": 90.5}
    assert set(exported) == set(PHASES)
