"""The web GUI (`framepack serve`): a Gradio app over a job queue whose one worker owns the device.

`jobs` (the queue and its worker; `record`, one job's state), `form` (form <-> settings, sidecars),
`view` (what is shown) and `pictures` (thumbnails, readable previews) import no Gradio and are
tested on their own. `app` lays out and wires the Gradio page from its
parts: `inputs` (the form's components), `panel` (the watched job and the queue table),
`endpoints` (`/generate`, `/cancel`), `resume` (unfinished jobs to resume), `gallery` (finished
videos) and `load_settings` (loading a finished video's settings into the form). The library never
imports this package.
"""

from .jobs import CANCELLED, DONE, FAILED, QUEUED, RUNNING, JobQueue, QueuedJob

__all__ = ["CANCELLED", "DONE", "FAILED", "QUEUED", "RUNNING", "JobQueue", "QueuedJob"]
