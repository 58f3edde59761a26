"""controller.profile exposes a short, sorted public surface; callers never reach into its helpers."""

from __future__ import annotations

import controller.compiler
import controller.profile


def test_profile_surface() -> None:
    assert controller.profile.__all__ == sorted(controller.profile.__all__)
    assert {"load_profile", "validate", "SandboxProfile", "ProfileError", "ProfileResolver"} <= set(controller.profile.__all__)
    for name in controller.profile.__all__:
        assert hasattr(controller.profile, name)


def test_compiler_surface() -> None:
    assert controller.compiler.__all__ == sorted(controller.compiler.__all__)
    for name in controller.compiler.__all__:
        assert hasattr(controller.compiler, name)
