"""A downstream application's Celery app, as a hospital's would be: its task
``myapp.tasks.study_ready`` appends its arguments as a JSON line to ``$HOOK_OUT``. Run by
:func:`tests.support.consumers.hook_consumer` as a real worker process."""

from __future__ import annotations

import json
import os
from typing import Any

from celery import Celery
from kombu import Queue

app = Celery("myapp", set_as_current=False)
app.conf.update(broker_url=os.environ["HOOK_BROKER_URL"],
                task_queues=(Queue(os.environ["HOOK_QUEUE"]),), result_backend=None,
                task_ignore_result=True, task_acks_late=True)


@app.task(name=os.environ.get("HOOK_TASK", "myapp.tasks.study_ready"))  # type: ignore[untyped-decorator]
def study_ready(manifest_key: str, event: dict[str, Any]) -> None:
    with open(os.environ["HOOK_OUT"], "a") as out:
        out.write(json.dumps([manifest_key, event]) + "\n")
