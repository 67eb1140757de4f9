"""The example workflows in ComfyUI's real frontend, in headless Chromium.

The session's ComfyUI server (comfy_server.py) serves the frontend from the
``comfyui-frontend-package`` it has installed; Chromium is driven over the DevTools protocol
(cdp.py). The test opens the template browser, checks LoRA Lab's section lists every example
workflow, opens each one from there, and checks that the frontend knows every node type
(no "missing node" dialog or error panel, no placeholder node) and kept every node and link.
A node outlined because it names a file this server lacks is listed, not failed. A workflow
with an unknown node type must be reported, so the check is known to work.

Screenshots go to $LORA_LAB_ARTIFACTS (default: <tmp>/lora_lab_test_artifacts/frontend).
Skipped with the reason when Chromium (Debian: ``apt-get install chromium``) or the frontend
is not available.
"""

import asyncio
import json
import os
import tempfile

import pytest

from cdp import Browser, Page, find_chromium
from comfy_server import PACK_DIR_NAME, REPO

WORKFLOW_DIR = os.path.join(REPO, "example_workflows")
WORKFLOWS = sorted(f[:-5] for f in os.listdir(WORKFLOW_DIR) if f.endswith(".json"))
ARTIFACTS = os.environ.get("LORA_LAB_ARTIFACTS") or os.path.join(
    tempfile.gettempdir(), "lora_lab_test_artifacts", "frontend")

APP_READY = "!!(window.app && window.app.graph && window.LiteGraph && window.app.extensionManager)"
CLICK_TEXT = """(text) => {
  const hits = [...document.querySelectorAll('body *')].filter(
      e => e.offsetParent !== null && e.textContent.trim() === text);
  const el = hits[hits.length - 1];
  if (!el) return false;
  el.scrollIntoView({block: 'center'});
  el.click();
  return true;
}"""
GRAPH_STATE = """JSON.stringify({
  nodes: app.graph.nodes.map(n => ({id: n.id, type: n.type,
      known: !!LiteGraph.registered_node_types[n.type], errors: !!n.has_errors,
      absent: (n.widgets || []).filter(w => w.type === 'combo' && Array.isArray(w.options?.values)
          && !w.options.values.includes(w.value)).map(w => w.name)})),
  links: app.graph.links instanceof Map ? app.graph.links.size : Object.keys(app.graph.links || {}).length,
  dialogs: [...document.querySelectorAll('[role=dialog]')].map(d => d.innerText),
  notices: document.body.innerText.match(/missing node[^\\n]*/gi) || [],
})"""
MISSING_SHOWN = ("[...document.querySelectorAll('[role=dialog]')].some(d => /missing/i.test(d.innerText))"
                 " || /missing node/i.test(document.body.innerText)")
CLOSE_DIALOGS = """(() => { for (const d of document.querySelectorAll('[role=dialog]')) {
  const b = d.querySelector('button[aria-label=Close], .p-dialog-close-button, .p-dialog-header-close');
  if (b) b.click(); } return true; })()"""


async def open_template_browser(page):
    """The template browser showing LoRA Lab's section (a fresh user gets it on first load)."""
    pack = json.dumps(PACK_DIR_NAME)
    for _ in range(3):
        if not await page.evaluate(f"document.body.innerText.includes({pack})"):
            await page.evaluate("app.extensionManager.command.execute('Comfy.BrowseTemplates')"
                                ".then(() => true)")
        try:
            await page.wait_for(f"document.body.innerText.includes({pack})", 10)
            break
        except TimeoutError:
            continue
    assert await page.evaluate(f"({CLICK_TEXT})({pack})"), "no LoRA Lab section in the templates"


async def close_dialogs(page):
    await page.evaluate(CLOSE_DIALOGS)
    await asyncio.sleep(1)


def missing_nodes(state):
    """Node types the frontend does not know, the frontend's own "missing node" notices
    (a dialog until frontend 1.2x, an error panel in 1.4x), and nodes it flags for any other
    reason than a file this server lacks.

    A node flagged because a combo names a file this server does not have (0.33's frontend
    outlines a UNETLoader whose checkpoint, or a Train LoRA whose ``existing_lora``, is not
    installed) is not missing: those are returned by :func:`nodes_without_their_file`."""
    missing = {n["type"] for n in state["nodes"]
               if not n["known"] or (n["errors"] and not n["absent"])}
    for text in state["dialogs"] + state["notices"]:
        if "missing" in text.lower():
            missing.add("notice: " + " ".join(text.split())[:300])
    return sorted(missing)


def nodes_without_their_file(state):
    return sorted(f"{n['type']}.{'/'.join(n['absent'])}" for n in state["nodes"]
                  if n["known"] and n["absent"])


@pytest.fixture(scope="module")
def chromium():
    binary = find_chromium()
    if binary is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium "
                    "chromium-driver; or set CHROMIUM=/path/to/binary)")
    return binary


@pytest.fixture(scope="module")
def frontend(comfy_server):
    status, body = comfy_server.request("/")
    if status != 200 or b"<html" not in body.lower():
        pytest.skip("this ComfyUI serves no frontend (pip install comfyui-frontend-package)")
    return comfy_server


async def _load_and_check(page, name, via_template_browser):
    """Open workflow ``name``; the graph state after loading."""
    if via_template_browser:
        await open_template_browser(page)
        await page.wait_for(f"document.body.innerText.includes({json.dumps(name)})", 30)
        assert await page.evaluate(f"({CLICK_TEXT})({json.dumps(name)})"), name
    else:
        with open(os.path.join(WORKFLOW_DIR, name + ".json"), encoding="utf-8") as f:
            data = f.read()
        await page.evaluate(f"app.loadGraphData({data}, true, true, {json.dumps(name)}).then(() => true)")
    await page.wait_for(f"document.title.includes({json.dumps(name)}) || {MISSING_SHOWN}", 30)
    await asyncio.sleep(1.5)  # let the canvas draw
    await page.screenshot(os.path.join(ARTIFACTS, f"{name}.png"))
    return json.loads(await page.evaluate(GRAPH_STATE))


async def _run(server_url):
    os.makedirs(ARTIFACTS, exist_ok=True)
    results = {}
    browser = Browser(find_chromium(), 2200, 1300, log_path=os.path.join(ARTIFACTS, "chromium.log"))
    try:
        async with Page(browser) as page:
            await page.navigate(server_url + "/")
            await page.wait_for(APP_READY, 120)
            await asyncio.sleep(2)
            await open_template_browser(page)
            for name in WORKFLOWS:
                await page.wait_for(f"document.body.innerText.includes({json.dumps(name)})", 30)
            await asyncio.sleep(1)
            await page.screenshot(os.path.join(ARTIFACTS, "template_browser.png"))
            await close_dialogs(page)

            for name in WORKFLOWS:
                results[name] = await _load_and_check(page, name, via_template_browser=True)
                await close_dialogs(page)

            # the check itself: an unknown node type is reported
            bogus = {"last_node_id": 1, "last_link_id": 0, "links": [], "groups": [], "config": {},
                     "extra": {}, "version": 0.4,
                     "nodes": [{"id": 1, "type": "LoRALab_NoSuchNode", "pos": [0, 0], "size": [200, 80],
                                "flags": {}, "order": 0, "mode": 0, "inputs": [], "outputs": [],
                                "properties": {}, "widgets_values": []}]}
            await page.evaluate(f"app.loadGraphData({json.dumps(bogus)}, true, true, 'bogus').then(() => true)")
            await page.wait_for(MISSING_SHOWN, 30)
            results["(control)"] = json.loads(await page.evaluate(GRAPH_STATE))
            await page.screenshot(os.path.join(ARTIFACTS, "control_missing_node.png"))
            errors = [text for level, text in page.console if level == "exception"]
    finally:
        browser.close()
    return results, errors


def test_example_workflows_open_without_missing_nodes(chromium, frontend):
    results, page_errors = asyncio.run(_run(frontend.url))
    control = missing_nodes(results.pop("(control)"))
    assert "LoRALab_NoSuchNode" in control and any(m.startswith("notice:") for m in control), \
        f"the missing-node check did not see a bogus node: {control}"
    flagged = {}
    for name in WORKFLOWS:
        state = results[name]
        with open(os.path.join(WORKFLOW_DIR, name + ".json"), encoding="utf-8") as f:
            workflow = json.load(f)
        assert missing_nodes(state) == [], f"{name}: {missing_nodes(state)} (screenshot in {ARTIFACTS})"
        flagged[name] = nodes_without_their_file(state)
        assert sorted(n["type"] for n in state["nodes"]) == sorted(n["type"] for n in workflow["nodes"]), name
        assert state["links"] == len(workflow["links"]), f"{name}: links lost while loading"
    print(f"screenshots: {ARTIFACTS}; nodes naming a file this server lacks: {flagged}; "
          f"page exceptions: {page_errors[:3]}")
