"""The infra checks run against real local sandboxes: reuse the sandbox tests' session fixtures."""

from tests.sandbox.conftest import debian_image, local_env

__all__ = ["debian_image", "local_env"]
