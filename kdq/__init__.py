"""The kdq client: a Python SDK (`kdq.Client`) and the ``kdq`` command, over HTTP only.

Importing it needs only httpx, pydantic and rich: never torch, FastAPI or the service's code, so
a pipeline installs it without the engine. ::

    from kdq import Client

    kdq = Client()                                   # KDQ_URL, KDQ_API_KEY
    job = kdq.submit(teacher=kdq.upload("teacher.zip", kind="model"),
                     dataset=kdq.upload("data.npz"), name="nightly")
    job.wait(progress=True)
    job.artifacts.download("out/")
"""

from __future__ import annotations

from .client import Client
from .errors import JobFailed, KdqError, Refused, Unreachable, UploadInvalid
from .models import Artifact, Delivery, Job, Problem, Progress, Upload

__all__ = [
    "Artifact",
    "Client",
    "Delivery",
    "Job",
    "JobFailed",
    "KdqError",
    "Problem",
    "Progress",
    "Refused",
    "Unreachable",
    "Upload",
    "UploadInvalid",
]
__version__ = "0.1.0"
