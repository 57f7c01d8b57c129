"""Import paths from before the layout of folders still work, for users' code and for pickles
(a Ray Tune experiment started before the move names its trial function by module)."""

from __future__ import annotations

import importlib
import pickle

import pytest

from ray_lips.moved import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_is_the_module_at_its_new_path(old: str) -> None:
    assert importlib.import_module(old) is importlib.import_module(MOVED[old])


def test_the_documented_driver_loop_keeps_its_old_import() -> None:
    from ray_lips.engine.experiment import FederatedRun as old

    from ray_lips.core.run import FederatedRun

    assert old is FederatedRun


def test_a_pickle_naming_an_old_module_loads() -> None:
    from ray_lips.cluster.tune_trial import trial_name

    # what pickle wrote for trial_name when it lived in ray_lips.tune_trial (protocol 0 names
    # it as text, so the name can be replaced)
    saved = pickle.dumps(trial_name, protocol=0).replace(b"ray_lips.cluster.tune_trial",
                                            b"ray_lips.tune_trial")
    assert b"ray_lips.tune_trial" in saved
    assert pickle.loads(saved) is trial_name
