"""The example workflows in ComfyUI's template browser, listed in their numbered order.

ComfyUI lists a pack's ``example_workflows/*.json`` at ``/api/workflow_templates`` in
``glob.glob`` order (``app/custom_node_manager.py``), which is the file system's directory
order, not sorted; the frontend shows them in that order (0.3.x's 1.2x frontend and 0.33's
1.4x frontend alike, unless a user picks another sort) and titles each with its file name.
So the files are named by their title with a number ("1. LoRA from an image folder"), and
this aiohttp middleware sorts LoRA Lab's list in that response; other packs' lists are left
as they are.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys

log = logging.getLogger(__name__)

PACK_DIR_NAME = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEMPLATE_PATHS = ("/workflow_templates", "/api/workflow_templates")


def template_order(name: str):
    """Natural sort key: "2. ..." before "10. ..."."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def sort_pack_templates(listing: dict, pack: str = PACK_DIR_NAME) -> dict:
    """``listing`` (pack folder name -> workflow names) with ``pack``'s names sorted."""
    names = listing.get(pack)
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        listing = {**listing, pack: sorted(names, key=template_order)}
    return listing


def install_template_order() -> bool:
    """Add the middleware to ComfyUI's server app; False (and no change) where it can't."""
    server = sys.modules.get("server")  # ComfyUI's server.py, imported before custom nodes load
    PromptServer = getattr(server, "PromptServer", None)
    app = getattr(getattr(PromptServer, "instance", None), "app", None)
    try:
        from aiohttp import web
    except ImportError:
        return False
    if app is None or app.frozen:
        return False
    if any(getattr(m, "__name__", "") == "lora_lab_template_order" for m in app.middlewares):
        return True

    @web.middleware
    async def lora_lab_template_order(request, handler):
        response = await handler(request)
        if (request.method != "GET" or request.path.rstrip("/") not in TEMPLATE_PATHS
                or not isinstance(response, web.Response) or response.status != 200
                or response.content_type != "application/json"
                or not isinstance(response.body, (bytes, bytearray))):
            return response
        try:
            listing = json.loads(response.body)
        except ValueError:
            return response
        if not isinstance(listing, dict) or PACK_DIR_NAME not in listing:
            return response
        return web.json_response(sort_pack_templates(listing), status=response.status)

    try:
        app.middlewares.append(lora_lab_template_order)
    except RuntimeError:  # frozen in the meantime
        return False
    return True
