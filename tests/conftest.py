"""Shared fixtures for the CI tests (no ComfyUI needed)."""

import pytest


@pytest.fixture(params=["unet", "unet_v", "dit"])
def task_and_latents(request):
    from tiny_tasks import make_task  # imported here so tests/comfyui needs no installed pack

    return make_task(request.param)
