"""The package's public surface: what `import ecapa_accel` promises."""

import ecapa_accel as ea


def test_ea_train_stays_the_function_after_importing_the_entry_module():
    import ecapa_accel.train  # noqa: F401  (what `accelerate launch -m ecapa_accel.train` imports)

    assert callable(ea.train) and not isinstance(ea.train, type(ea))
    assert ea.train.__module__ == "ecapa_accel.trainer"
