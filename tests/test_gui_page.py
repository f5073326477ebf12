"""The page's pure parts, without a server: the prompt's timeline, presets, the form check before
queueing, settings that cannot be loaded, and what the Queue tab's buttons say."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from framepack.gui.endpoints import form_problem
from framepack.gui.form import FormValues, form_from_settings
from framepack.gui.presets import delete_preset, list_presets, load_preset, save_preset
from framepack.gui.queue_tab import queue_action, run_order_html
from framepack.gui.timeline import section_prompts, timeline_html

MANIFEST = SimpleNamespace(
    window=9, fps=30, steps=25, distilled_guidance=10.0, cfg=1.0, order="inverted", resolution=640
)


def test_timeline_gives_each_section_the_prompt_at_its_start():
    sections = section_prompts("[0s: a cat sits] [2s: the cat walks away]", 4.8, 9, 30)
    assert [(s.start, s.end, s.index) for s in sections] == [
        (0.0, 1.2, 0),
        (1.2, 2.4, 0),
        (2.4, 3.6, 1),
        (3.6, 4.8, 1),
    ]
    assert section_prompts("a cat", 1.2, 9, 30)[0].text == "a cat"
    page = timeline_html("[0s: <b>a cat</b>]", 1.2, 9, 30)
    assert "&lt;b&gt;" in page and "<b>a cat" not in page  # the prompt is escaped
    error = timeline_html("[1s-0.5s: a cat]", 1.2, 9, 30)
    assert 'data-state="error"' in error and "not after its start at 1 s." in error
    assert 'data-state="empty"' in timeline_html("  ", 5, 9, 30)


def test_presets_round_trip_and_refuse_names_that_are_not_plain(tmp_path):
    save_preset(tmp_path, "slow walk", {"prompt": "a cat", "steps": 7, "image": np.zeros(3), "gif": "yes"})
    assert list_presets(tmp_path) == ["slow walk"]
    assert load_preset(tmp_path, "slow walk") == {"prompt": "a cat", "steps": 7}  # no upload, no bad type
    for bad in ("../up", "a/b", ".hidden", "", "a\x00b"):
        with pytest.raises(ValueError, match="not a plain file name"):
            save_preset(tmp_path, bad, {"prompt": "x"})
    (tmp_path / "presets" / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="cannot be read as JSON"):
        load_preset(tmp_path, "broken")
    with pytest.raises(ValueError, match="no preset named"):
        load_preset(tmp_path, "missing")
    assert delete_preset(tmp_path, "slow walk") and not delete_preset(tmp_path, "slow walk")


def test_the_form_check_says_why_a_form_cannot_be_queued(tmp_path):
    image = np.zeros((64, 96, 3), np.uint8)
    assert form_problem(FormValues(image, None, "  "), tmp_path, MANIFEST, None).startswith(
        "The prompt is empty"
    )
    problem = form_problem(FormValues(image, None, "[1s-0.5s: a cat]", seconds=1.2), tmp_path, MANIFEST, None)
    assert problem.endswith("ends at 0.5 s, not after its start at 1 s."), problem
    assert "seed" in form_problem(FormValues(image, None, "a cat", seed="x"), tmp_path, MANIFEST, None)
    assert form_problem(FormValues(image, None, "a cat", seconds=1.2), tmp_path, MANIFEST, None) is None


@pytest.mark.parametrize(
    "settings, needle",
    [
        ({"prompt": "x", "loras": ["path"]}, "loras are not a list of [path, scale] pairs"),
        ({"prompt": "x", "keyframes": "1.5"}, "keyframes are not a list"),
        ({"prompt": "x", "steps": "many"}, "values of the wrong kind"),
    ],
)
def test_settings_of_the_wrong_shape_are_one_sentence(tmp_path, settings, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        form_from_settings(json.loads(json.dumps(settings)), tmp_path, MANIFEST)


def test_the_queue_buttons_say_what_they_did(tmp_path):
    """On a real queue whose worker is not started, so its jobs stay queued."""
    from framepack.gui.jobs import JobQueue
    from framepack.pipeline.settings import GenerationSettings
    from framepack.testing import tiny_bundle

    q = JobQueue(tiny_bundle(), tmp_path, start=False)
    try:
        for prompt in ("one", "two", "three"):  # jobs 1-3, queued in this order
            q.submit(GenerationSettings(prompt=prompt, sections=1, steps=1))
        q.reject("four", "a bad form.")  # job 4, failed
        assert queue_action(q, "up", 2) == ("ok", "Moved job #2 up.")
        assert queue_action(q, "up", 2) == ("error", "Job #2 is already next in line.")
        assert queue_action(q, "down", 3) == ("error", "Job #3 is already last in line.")
        assert queue_action(q, "down", 4) == ("error", "Job #4 is failed; only queued jobs can be moved.")
        assert queue_action(q, "cancel", 4) == ("error", "Job #4 is failed; there is nothing to cancel.")
        assert queue_action(q, "cancel", None) == ("error", "Pick a job first.")
        assert queue_action(q, "remove", 9) == ("error", "Job #9 is no longer listed.")
        assert queue_action(q, "clear", None) == ("ok", "Cleared 1 finished job.")
        assert queue_action(q, "remove", 1) == ("ok", "Removed job #1.")
        assert [j.id for j in q.jobs()] == [2, 3]
    finally:
        q.close()


def test_the_run_order_lists_the_running_job_then_the_queue_in_order():
    from framepack.gui.jobs import QueuedJob

    jobs = [
        QueuedJob(id=i, prompt=f"job {i}", settings=None, state=s)
        for i, s in [(1, "done"), (3, "running"), (4, "queued"), (2, "queued")]  # as JobQueue.jobs lists them
    ]
    order = run_order_html(jobs)
    assert [order.index(f'data-job="{i}"') for i in (3, 4, 2)] == sorted(
        order.index(f'data-job="{i}"') for i in (3, 4, 2)
    )
    assert 'data-job="1"' not in order
