"""The operator's settings, read once from its environment (``pretrainctl operator``)."""

from __future__ import annotations

import pytest
from pretrain_operator.kube.settings import OperatorSettings, SettingsError


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
    [("RESYNC_SECONDS", "-1"), ("STANDALONE", "sometimes"), ("GANG_SCHEDULER", "kube")],
)
def test_a_bad_setting_stops_the_operator_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=f"PRETRAIN_OPERATOR_{name}"):
        OperatorSettings.from_environ({f"PRETRAIN_OPERATOR_{name}": value})
