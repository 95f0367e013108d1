"""The Prefect UI, in a real headless Chromium, on the real local stack: fill the
audit-model/on-demand form, see a bad value refused, start a run, wait for the stack's runner
to complete it, and read its results back from the stack's S3 store."""

import json
import os
import shutil
import time
import urllib.request

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("ZOOAUDIT_CHROMIUM", "/usr/bin/chromium")
MODEL = "builtin:mlp-w32-s0"
N = 60


def _post(api, path, body):
    req = urllib.request.Request(api + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _get(api, path):
    with urllib.request.urlopen(api + path, timeout=10) as resp:
        return json.loads(resp.read())


def _prop(page, label, nth=0):
    """The schema-form property whose own label is ``label`` (the nth one, for array items)."""
    return page.locator(
        f"xpath=//span[contains(concat(' ', normalize-space(@class), ' '), ' schema-form-property__label ') "
        f"and normalize-space()='{label}']"
        "/ancestor::div[contains(concat(' ', normalize-space(@class), ' '), ' schema-form-property ')][1]").nth(nth)


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM):
        pytest.fail(f"Chromium not found at {CHROMIUM}: run `make bootstrap-ui` (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield b
        b.close()


def test_audit_model_form_run_from_the_ui_lands_in_s3(local_stack, browser):
    from playwright.sync_api import expect

    from zooaudit import layout
    from zooaudit.data import load_dataset
    from zooaudit.keys import slug_key
    from zooaudit.store import Store, open_group

    api = local_stack.env["PREFECT_API_URL"]
    flows = {f["id"]: f["name"] for f in _post(api, "/flows/filter", {})}
    (dep,) = [d for d in _post(api, "/deployments/filter", {})
              if flows[d["flow_id"]] == "audit-model" and d["name"] == "on-demand"]
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{local_stack.config.ui_url}/deployments/deployment/{dep['id']}/run", wait_until="networkidle")
    page.get_by_text("Parameters", exact=True).wait_for()
    # The form is the pydantic spec: its descriptions are shown beside the fields.
    assert page.get_by_text("Model URI, e.g. 'builtin:cnn-w16-s0'").count() == 1

    _prop(page, "Model (Optional)").locator("textarea").fill(MODEL)
    max_samples = _prop(page, "Max Samples (Optional)", 0)          # the first dataset: digits
    max_samples.get_by_role("button", name="int", exact=True).click()
    max_samples.locator("input").fill(str(N))
    _prop(page, "Batch Size (Optional)").locator("input").fill("0")

    # A bad value: the server refuses the run and the UI says which field and why.
    page.get_by_role("button", name="Submit").click()
    page.get_by_text("Validation failed for field 'spec.batch_size'").first.wait_for(timeout=30_000)
    assert "less than the minimum of 1" in page.get_by_text("Error creating flow run").first.inner_text()
    runs_of = {"flow_runs": {"deployment_id": {"any_": [dep["id"]]}}}
    assert not [r for r in _post(api, "/flow_runs/filter", runs_of) if r["parameters"]["spec"].get("batch_size") == 0]

    # Let the error toasts go first: they sit over the Submit button at the page's bottom-right,
    # and hovering one pauses its 5 s timer, so a click aimed at Submit could wait on it forever.
    page.mouse.move(5, 5)
    expect(page.locator(".p-toast-container__toast")).to_have_count(0, timeout=30_000)
    _prop(page, "Batch Size (Optional)").locator("input").fill("32")
    with page.expect_response(lambda r: r.url.endswith("/create_flow_run") and r.request.method == "POST") as resp:
        page.get_by_role("button", name="Submit").click()
    run = resp.value.json()
    assert resp.value.status == 201 and run["parameters"]["spec"]["model"] == MODEL
    assert run["parameters"]["spec"]["store"] is None          # the stack's store: $ZOOAUDIT_STORE (S3)

    deadline = time.monotonic() + 300
    while (state := _get(api, f"/flow_runs/{run['id']}")["state"])["type"] not in (
            "COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
        assert time.monotonic() < deadline, f"run {run['id']} still {state['type']}"
        time.sleep(2)
    assert state["type"] == "COMPLETED", state
    page.goto(f"{local_stack.config.ui_url}/runs/flow-run/{run['id']}", wait_until="networkidle")
    page.get_by_text("Completed").first.wait_for(timeout=30_000)
    page.close()

    # Results are in the stack's S3 bucket, committed by this run.
    store = Store.open(local_stack.config.store_url)
    assert store.url.startswith("s3://")
    repo = store.model_repo(slug_key(MODEL))
    commits = [i for i in repo.ancestry(branch="main") if (i.metadata or {}).get("flow_run_id") == run["id"]]
    assert {c.metadata["stage"] for c in commits} >= {"activations", "factorize", "similarity"}
    acts = next(c for c in commits if c.metadata["stage"] == "activations")
    ds_key = load_dataset(run["parameters"]["spec"]["datasets"][0]).key
    arr = open_group(repo, layout.acts_group(ds_key, "embed"), snapshot=acts.id)["activations"]
    assert arr.dims[0] == "sample" and arr.shape == (N, 32)
