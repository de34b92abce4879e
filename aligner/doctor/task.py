"""The task metric ``aligner doctor`` can check: a detector's COCO AP on a dataset, read and scored
as ``aligner eval coco`` reads and scores it. With one, doctor feeds the first batch of images to
compare, bisect, build and bench, searches the plan with a COCO AP acceptance (at most ``max_drop``
below FP32) and adds the eval step: AP of FP32, the pure low precision and the plan, side by side.
The demo is doctor with the built-in example's (:func:`example_coco`)."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from aligner.eval.adapters import Adapter
from aligner.eval.dataset import CocoDataset, Preprocess
from aligner.graph.model import ModelGraph


@dataclass(frozen=True)
class CocoEval:
    """A detector's COCO evaluation: the dataset, how images become the input (``preprocess``), how
    outputs become detections (``adapter``), the model label -> category id map (None: contiguous),
    images per run, and the precision search's acceptance (AP, 0-1, at most ``max_drop`` below the
    reference: 0.005 = half an AP point). ``words`` are the ``aligner eval coco`` options that give
    the same dataset, adapter and preprocessing, for the commands that re-run a step alone."""

    dataset: CocoDataset
    adapter: Adapter
    preprocess: Preprocess
    max_drop: float = 0.005
    label_map: Mapping[int, int] | None = None
    batch: int = 16
    words: tuple[str, ...] = ()

    def feeds(self, graph: ModelGraph) -> dict[str, np.ndarray]:
        """The model inputs of the first batch of images."""
        from aligner.eval.run import image_input, model_batch, model_feeds

        x, entries, backs = next(self.dataset.batches(self.preprocess, model_batch(graph, self.batch)))
        return model_feeds(image_input(graph.input_names, self.preprocess), x, entries, backs, self.preprocess)

    def source(self) -> str:
        """Where the inputs come from, for the run records."""
        return str(self.dataset.images)

    def acceptance(self, graph: ModelGraph):
        """The precision search's check: COCO AP at most ``max_drop`` below the reference's (outputs finite)."""
        from aligner.backends import reference_runner
        from aligner.eval.run import coco_acceptance, model_batch

        return coco_acceptance(self.dataset, self.adapter, self.preprocess, reference_runner(graph), self.max_drop, self.label_map,
                               model_batch(graph, self.batch))

    def evaluate(self, graph: ModelGraph, targets: list[str], plan=None):
        """COCO metrics per target (the first is the reference of the deltas): an ``EvalResult``."""
        from aligner.eval.run import evaluate_detector

        return evaluate_detector(graph, self.dataset, self.adapter, self.preprocess, targets, plan, self.label_map, self.batch)

    def flags(self) -> list[str]:
        """The command-line flags that give this dataset, adapter, preprocessing and batch (quoted)."""
        return [*map(shlex.quote, self.words), "--batch", str(self.batch)]

    def command(self, model: str, *words: str) -> str:
        """``aligner eval coco MODEL`` with this dataset, adapter and preprocessing, then ``words``."""
        return " ".join(["aligner", "eval", "coco", model, *self.flags(), *words])


def example_coco(max_drop: float = 0.005, batch: int = 50) -> CocoEval:
    """The built-in example's evaluation (what ``aligner demo`` checks): the shipped 200-image val
    split of the shapes detector, its YOLO-style adapter and raw 0-255 pixels."""
    from aligner.examples import shapes_adapter, shapes_preprocess, shapes_val

    return CocoEval(CocoDataset(*shapes_val()), shapes_adapter(), shapes_preprocess(), max_drop, None, batch, ("--example-data",))


__all__ = ["CocoEval", "example_coco"]
