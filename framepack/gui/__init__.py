"""The web GUI (`framepack serve`): a Gradio app over a job queue whose one worker owns the device.

`jobs` (the queue and its worker), `form` (form <-> settings, sidecars) and `view` (what is shown)
import no Gradio and are tested on their own; `app` is the Gradio layout, `resume` its section of
unfinished jobs to resume. The library never
imports this package.
"""

from .jobs import CANCELLED, DONE, FAILED, QUEUED, RUNNING, Job, JobQueue

__all__ = ["CANCELLED", "DONE", "FAILED", "QUEUED", "RUNNING", "Job", "JobQueue"]
