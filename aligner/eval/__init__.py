"""Task accuracy: COCO metrics (pycocotools or faster-coco-eval), detection adapters, MVRE.

pycocotools and faster-coco-eval are imported only when an evaluation runs (``coco`` extra).
"""

from aligner.eval.adapters import ADAPTERS, Detections, boxes_scores_labels_adapter, detr_adapter, nms, output_mvre, yolo_adapter
from aligner.eval.coco import STAT_NAMES, CocoStats, evaluate_coco, load_ground_truth, stats_delta

__all__ = ["ADAPTERS", "CocoStats", "Detections", "STAT_NAMES", "boxes_scores_labels_adapter", "detr_adapter", "evaluate_coco",
           "load_ground_truth", "nms", "output_mvre", "stats_delta", "yolo_adapter"]
