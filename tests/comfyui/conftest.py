"""Fixtures for tests that run against a real ComfyUI checkout.

Environment:
  COMFYUI_DIR         path to a ComfyUI checkout (must contain nodes.py,
                      folder_paths.py and comfy/). If unset or invalid, every
                      test under tests/comfyui is skipped with a reason.
  COMFYUI_EXTRA_PATH  optional, colon-separated dirs prepended to sys.path
                      (e.g. a torchvision import stand-in directory).

Example:
  COMFYUI_DIR=/work/comfyui COMFYUI_EXTRA_PATH=/work/stubs \
      /work/venv-comfy/bin/python -m pytest tests/comfyui
"""
import os
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))


def _comfyui_dir():
    d = os.environ.get("COMFYUI_DIR", "").strip()
    if not d:
        return None, "COMFYUI_DIR is not set; set it to a ComfyUI checkout to run tests/comfyui"
    d = os.path.abspath(os.path.expanduser(d))
    for rel in ("nodes.py", "folder_paths.py", os.path.join("comfy", "model_management.py")):
        if not os.path.exists(os.path.join(d, rel)):
            return None, f"COMFYUI_DIR={d} is not a ComfyUI checkout (missing {rel})"
    return d, None


COMFYUI_DIR, _SKIP_REASON = _comfyui_dir()

if COMFYUI_DIR is not None:
    for _p in reversed([p for p in os.environ.get("COMFYUI_EXTRA_PATH", "").split(os.pathsep) if p]):
        _p = os.path.abspath(os.path.expanduser(_p))
        if _p not in sys.path:
            sys.path.insert(0, _p)
    if COMFYUI_DIR not in sys.path:
        sys.path.insert(0, COMFYUI_DIR)
    if _HERE not in sys.path:
        sys.path.insert(0, _HERE)

    import comfy.options  # noqa: E402  (does not parse sys.argv unless enabled)
    import comfy.cli_args  # noqa: E402

    # Must happen before comfy.model_management is first imported.
    if "comfy.model_management" in sys.modules:
        import warnings
        warnings.warn("comfy.model_management was imported before conftest could force --cpu")
    comfy.cli_args.args.cpu = True
    # main.py imports the top-level `utils` package before `nodes` (which puts
    # COMFYUI_DIR/comfy on sys.path, making `utils` resolve to comfy/utils.py).
    import utils.extra_config  # noqa: E402,F401


class _SkippedModule(pytest.Module):
    """Test module under tests/comfyui collected while ComfyUI is unavailable:
    skipped without importing it (so module-level `import comfy...` is safe)."""

    def collect(self):
        pytest.skip(_SKIP_REASON, allow_module_level=True)


def pytest_pycollect_makemodule(module_path, parent):
    if COMFYUI_DIR is None and os.path.abspath(str(module_path)).startswith(_HERE + os.sep):
        return _SkippedModule.from_parent(parent, path=module_path)
    return None


def pytest_collection_modifyitems(config, items):
    if COMFYUI_DIR is not None:
        return
    marker = pytest.mark.skip(reason=_SKIP_REASON)
    for item in items:
        if os.path.abspath(str(item.fspath)).startswith(_HERE + os.sep):
            item.add_marker(marker)


def _require_comfyui():
    if COMFYUI_DIR is None:
        pytest.skip(_SKIP_REASON)


@pytest.fixture(scope="session")
def comfyui_dir():
    _require_comfyui()
    return COMFYUI_DIR


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """Initialise ComfyUI's built-in nodes (no custom nodes); returns the `nodes` module."""
    _require_comfyui()
    import asyncio
    import folder_paths

    base = tmp_path_factory.mktemp("comfy_base")
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_temp_directory(str(base / "temp"))
    folder_paths.set_input_directory(str(base / "input"))
    import nodes

    init = nodes.init_extra_nodes
    if asyncio.iscoroutinefunction(init):
        asyncio.run(init(init_custom_nodes=False))
    else:
        init(init_custom_nodes=False)
    return nodes


@pytest.fixture(scope="session")
def tiny_models():
    _require_comfyui()
    import tiny_models as tm
    return tm


@pytest.fixture
def sd15_model(tiny_models):
    """Fresh tiny SD1.x ModelPatcher (seed 0); latent [B,4,8,8]."""
    return tiny_models.tiny_sd15(seed=0)


@pytest.fixture
def sd3_model(tiny_models):
    """Fresh tiny SD3 ModelPatcher (seed 0); latent [B,16,16,16]."""
    return tiny_models.tiny_sd3(seed=0)


@pytest.fixture(scope="session")
def pack(comfy):
    """The pack imported as ComfyUI imports a custom node: by its folder, as a package."""
    import importlib.util

    name = "lora_lab_under_test"
    if name in sys.modules:
        return sys.modules[name]
    repo = os.path.dirname(os.path.dirname(_HERE))
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(repo, "__init__.py"), submodule_search_locations=[repo])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def pack_nodes(pack):
    """The pack's node classes by node id, from its ``comfy_entrypoint``."""
    import asyncio

    extension = asyncio.run(pack.comfy_entrypoint())
    return {n.define_schema().node_id: n for n in asyncio.run(extension.get_node_list())}


@pytest.fixture(scope="session")
def options_node(pack_nodes):
    return pack_nodes["LoRALab_TrainingOptions"]


@pytest.fixture(scope="session")
def train_node(pack_nodes):
    return pack_nodes["LoRALab_TrainLoRA"]


@pytest.fixture
def loras_dir(comfy, tmp_path):
    """A fresh first loras folder (as a user's models/loras)."""
    import folder_paths

    folder = str(tmp_path / "loras")
    os.makedirs(folder)
    saved = folder_paths.folder_names_and_paths["loras"]
    folder_paths.folder_names_and_paths["loras"] = ([folder] + list(saved[0]), saved[1])
    folder_paths.get_filename_list("loras")  # warm the cache: the save must refresh it
    yield folder
    folder_paths.folder_names_and_paths["loras"] = saved
    folder_paths.filename_list_cache.pop("loras", None)


# The shared ComfyUI HTTP server fixture (``comfy_server``, session scope).
from comfy_server import comfy_server  # noqa: E402,F401
