"""Micro-batching for classifiers: texts of concurrent requests run through the model together.

Why: a small BERT on one text spends most of its time in per-operator overhead, so a batch of 8
costs little more than one. The batcher adds no waiting time of its own: one thread takes every
text queued so far (up to `max_batch`) whenever the model is free, so batches grow exactly when
requests arrive faster than one-at-a-time could serve them.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

import numpy as np

from smallmighty.engine.classifier import TextClassifier


class ClassifyBatcher:
    """Runs `classifier` on the texts of queued jobs, many jobs per batch; see the module docstring."""

    def __init__(self, classifier: TextClassifier, max_batch: int = 64) -> None:
        self.classifier, self.max_batch = classifier, max_batch
        self._jobs: list[tuple[list[str], Future]] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="slm-classify", daemon=True)
        self._thread.start()

    def submit(self, texts: list[str]) -> Future:
        """A future of one result dict per text: `label`, `score` and every label's probability."""
        future: Future = Future()
        with self._cond:
            self._jobs.append((texts, future))
            self._cond.notify()
        return future

    def queue_depth(self) -> int:
        with self._cond:
            return len(self._jobs)

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def _take(self) -> list[tuple[list[str], Future]] | None:
        """Jobs for the next batch: whole jobs, at least one, until `max_batch` texts are reached."""
        with self._cond:
            while not self._jobs and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            taken, count = [], 0
            while self._jobs and (not taken or count + len(self._jobs[0][0]) <= self.max_batch):
                job = self._jobs.pop(0)
                taken.append(job)
                count += len(job[0])
            return taken

    def _loop(self) -> None:
        while (jobs := self._take()) is not None:
            jobs = [job for job in jobs if job[1].set_running_or_notify_cancel()]
            texts = [text for job_texts, _ in jobs for text in job_texts]
            try:
                results = self._classify(texts)
            except Exception as err:  # noqa: BLE001 - the requests fail, the server goes on
                for _, future in jobs:
                    future.set_exception(err)
                continue
            start = 0
            for job_texts, future in jobs:
                future.set_result(results[start:start + len(job_texts)])
                start += len(job_texts)

    def _classify(self, texts: list[str]) -> list[dict[str, Any]]:
        if not texts:
            return []
        logits = self.classifier.predict_logits(texts).astype(np.float64)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        names = self.classifier.label_names
        return [{"label": names[int(row.argmax())], "score": float(row.max()),
                 "scores": {name: float(p) for name, p in zip(names, row)}} for row in probs]
