"""Stage tlm in LlamaBoard, in a real browser: choose the stage, preview its command, start a tiny run, see it finish.

Starts ``llamafactory-cli webui`` on 127.0.0.1 (a free port) in a folder of its own, with a dataset folder the train
tab lists and the tiny test model remembered as the "Custom" model (LlamaBoard's own user config), drives headless
Chromium through the form, and checks what the run left in its output folder. The UI process (and the training run
it started) is stopped at the end, whatever happened.

Needs Chromium, chromedriver and Selenium (``make test-ui`` installs them); skipped otherwise. Set
``TLM_UI_SCREENSHOT=path.png`` to keep the screenshot (``docs/webui-tlm.png`` was made so).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from tlm_testing import CANARY, QUESTIONS, VENV_BIN, cli_env, read_jsonl, write_dataset

from tlm_plugin.train import outputs
from tlm_plugin.webui import STAGE_LABEL


try:
    from selenium import webdriver
    from selenium.common.exceptions import (
        ElementNotInteractableException,
        NoSuchElementException,
        StaleElementReferenceException,
    )
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    webdriver = None

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
CHROMEDRIVER = shutil.which("chromedriver")
if webdriver is None or CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip(
        "the LlamaBoard browser test needs Chromium, chromedriver and Selenium: run `make test-ui`",
        allow_module_level=True,
    )

pytestmark = pytest.mark.slow
START_TIMEOUT = 240  # seconds for the UI to answer
RUN_TIMEOUT = 600  # seconds for the tiny run to finish
SHOT_WIDTH = 1000  # pixels of the kept screenshot


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def board(tiny_model, tmp_path):
    """(url, working folder) of a running ``llamafactory-cli webui``; stopped at the end."""
    work = tmp_path / "board"
    rows = [{"instruction": q, "input": "", "output": f"{a} {CANARY}"} for q, a in QUESTIONS]
    write_dataset(work / "data", rows)
    (work / "llamaboard_cache").mkdir()
    user_config = {"lang": "en", "hub_name": "huggingface", "last_model": "Custom", "cache_dir": None}
    user_config["path_dict"] = {"Custom": str(tiny_model)}
    (work / "llamaboard_cache" / "user_config.yaml").write_text(yaml.safe_dump(user_config), encoding="utf-8")
    port = _free_port()
    env = {k: v for k, v in cli_env().items() if k != "LLAMAFACTORY_VERBOSITY"}  # LlamaBoard's own log level
    env.update(GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), GRADIO_ANALYTICS_ENABLED="False")
    env["BROWSER"] = "true"  # launch(inbrowser=True) opens nothing
    log = open(tmp_path / "webui.log", "w", encoding="utf-8")
    proc = subprocess.Popen(
        [str(VENV_BIN / "llamafactory-cli"), "webui"],
        cwd=work,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the training run it starts is stopped with it
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert proc.poll() is None, (tmp_path / "webui.log").read_text(encoding="utf-8")[-3000:]
            assert time.monotonic() < deadline, "the web UI did not answer in time"
            try:
                with urllib.request.urlopen(url, timeout=5):
                    break
            except OSError:
                time.sleep(1)
        yield url, work
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


@pytest.fixture()
def browser():
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,3200"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


# ------------------------------------------------------------------------------------------ driving the form
def _wait(driver, condition, timeout=60, message=""):
    """Poll ``condition`` until it returns something true; an element Gradio re-rendered meanwhile is looked up again."""
    transient = (StaleElementReferenceException, NoSuchElementException, ElementNotInteractableException)
    wait = WebDriverWait(driver, timeout, poll_frequency=0.25, ignored_exceptions=transient)
    return wait.until(condition, message)


def _shown(elements):
    return next((e for e in elements if e.is_displayed()), None)


def _field(label: str, inner: str) -> str:
    """The XPath of the ``inner`` element (``input``, ``textarea``) of the component labelled ``label``."""
    block = "ancestor::div[contains(concat(' ', normalize-space(@class), ' '), ' block ')][1]"
    return f"//span[@data-testid='block-info'][normalize-space()='{label}']/{block}//{inner}"


def _act(driver, by, selector: str, act, message: str = ""):
    """Find the shown element, then ``act(element)``, retried until both succeed."""

    def attempt(d):
        element = _shown(d.find_elements(by, selector))
        if element is None:
            return False
        act(element)
        return element

    return _wait(driver, attempt, message=message or selector)


def _click(driver, by, selector: str, message: str = ""):
    return _act(driver, by, selector, lambda e: e.click(), message)


def _type(driver, by, selector: str, text: str) -> None:
    def type_in(element):
        element.send_keys(Keys.CONTROL, "a")
        element.send_keys(text, Keys.TAB)

    _act(driver, by, selector, type_in)


def _choose(driver, label: str, option: str) -> None:
    """Pick ``option`` in the dropdown labelled ``label``."""
    _click(driver, By.XPATH, _field(label, "input"), label)
    _click(driver, By.CSS_SELECTOR, f"[role='option'][aria-label='{option}']", f"{label}: {option}")
    options_open = "return [...document.querySelectorAll('[role=option]')].some(e => e.offsetParent !== null)"
    if driver.execute_script(options_open):  # a multiselect stays open
        driver.switch_to.active_element.send_keys(Keys.ESCAPE)


def _click_text(driver, text: str) -> None:
    button = f"//button[normalize-space()='{text}']"
    accordion = f"//*[contains(@class,'label-wrap')][.//span[normalize-space()='{text}']]"
    _click(driver, By.XPATH, f"{button} | {accordion}", text)


def _page(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


def _save_screenshot(driver, path: Path) -> None:
    """The train tab from its stage row down to the run's summary, beside the loss curve, scaled to SHOT_WIDTH."""
    from PIL import Image

    driver.execute_script("window.scrollTo(0, 0)")
    full = path.with_suffix(".full.png")
    driver.save_screenshot(str(full))
    top, bottom = driver.execute_script(
        "const tab = [...document.querySelectorAll('button[role=tab]')].find(b => b.textContent.trim() === 'Train');"
        "const end = [...document.querySelectorAll('pre')].find(p => p.textContent.includes('stage tlm:'));"
        "return [tab.getBoundingClientRect().top, end.getBoundingClientRect().bottom];"
    )
    image = Image.open(full)
    shot = image.crop((0, max(0, int(top) - 10), image.width, min(image.height, int(bottom) + 10))).convert("RGB")
    shot = shot.resize((SHOT_WIDTH, round(shot.height * SHOT_WIDTH / shot.width)), Image.LANCZOS)
    shot.quantize(colors=64).save(path, optimize=True)
    full.unlink()


def test_a_tlm_run_started_from_llamaboard(board, browser, tmp_path):
    url, work = board
    driver = browser
    driver.get(url)
    model_path = _field("Model path", "textarea")
    _wait(driver, lambda d: d.find_element(By.XPATH, model_path).get_attribute("value"), message="the model path")

    _choose(driver, "Chat template", "chatml")
    _choose(driver, "Stage", STAGE_LABEL)
    _wait(driver, lambda d: d.find_element(By.ID, "tlm_tab").is_displayed(), message="the TLM accordion")
    _choose(driver, "Dataset", "tiny")
    _choose(driver, "Compute type", "fp32")
    _type(driver, By.XPATH, _field("Epochs", "textarea"), "1.0")
    for label in ("Batch size", "Gradient accumulation"):
        _type(driver, By.CSS_SELECTOR, f"input[aria-label='number input for {label}']", "1")
    _click_text(driver, "Extra configurations")
    extra = {"optim": "adamw_torch", "preprocessing_num_workers": None, "logging_steps": 1, "do_sample": False}
    _type(driver, By.XPATH, _field("Extra arguments", "textarea"), json.dumps(extra))
    _click_text(driver, "Extra configurations")  # closed again: the value stays

    # the accordion follows the mode: the chunk size only matters online
    def chunk_shown(d):  # a hidden Gradio component is not in the page at all
        return _shown(d.find_elements(By.ID, "tlm_chunk_size")) is not None

    assert not chunk_shown(driver)
    _choose(driver, "tlm_mode", "online")
    _wait(driver, chunk_shown, message="tlm_chunk_size shown for online")
    _choose(driver, "tlm_mode", "offline")
    _wait(driver, lambda d: not chunk_shown(d), message="tlm_chunk_size hidden for offline")
    _click(driver, By.CSS_SELECTOR, "#tlm_eval_answers input[type='checkbox']")
    _type(driver, By.CSS_SELECTOR, "#tlm_max_new_tokens input[type='number']", "8")

    _click_text(driver, "Preview command")
    _wait(driver, lambda d: "--stage tlm" in _page(d), message="the previewed command")
    command = _page(driver)
    for flag in ("--tlm_mode offline", "--tlm_selector perplexity", "--tlm_lambda 0.1", "--tlm_log_p0 3.0"):
        assert flag in command, flag
    assert "--tlm_eval_answers True" in command and "--do_predict True" in command
    assert "--max_new_tokens 8" in command and "--tlm_chunk_size" not in command

    started = time.monotonic()
    _click_text(driver, "Start")
    _wait(
        driver,
        lambda d: "stage tlm: offline / perplexity" in _page(d) or "Failed." in _page(d),
        timeout=RUN_TIMEOUT,
        message="the run's end",
    )
    assert "Failed." not in _page(driver), _page(driver)[-4000:]
    print(f"run started from the UI finished in {time.monotonic() - started:.0f}s")

    (out,) = (work / "saves" / "Custom" / "lora").glob("train_*")
    recipe = yaml.safe_load((out / "training_args.yaml").read_text(encoding="utf-8"))
    assert recipe["stage"] == "tlm" and recipe["tlm_eval_answers"] is True and recipe["do_predict"] is True
    summary = json.loads((out / outputs.SUMMARY_FILE).read_text(encoding="utf-8"))
    assert summary["mode"] == "offline" and summary["n_prompts"] == len(QUESTIONS)
    scores = read_jsonl(out / outputs.SCORES_FILE)
    assert len(scores) == len(QUESTIONS) and all(r.get("answer_bpb") is not None for r in scores)
    assert len(read_jsonl(out / outputs.PREDICTIONS_FILE)) == len(QUESTIONS)
    assert any("loss" in row for row in read_jsonl(out / "trainer_log.jsonl"))  # LlamaBoard's loss curve reads it
    assert (out / "running_log.txt").is_file()

    shot = Path(os.environ.get("TLM_UI_SCREENSHOT", tmp_path / "webui-tlm.png"))
    _save_screenshot(driver, shot)
    assert shot.stat().st_size > 0
