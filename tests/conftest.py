"""Shared fixtures for the CI tests (no ComfyUI needed)."""

import pytest

from tiny_tasks import make_task


@pytest.fixture(params=["unet", "unet_v", "dit"])
def task_and_latents(request):
    return make_task(request.param)
