"""Evaluator selection (``build_evaluator``) and the COCO mask-AP evaluator for sparse thing ids."""

from .build import EVALUATORS, build_evaluator  # noqa: F401
from .instance_evaluation import InstanceSegEvaluator  # noqa: F401
from .superpixel import SuperpixelEvaluator  # noqa: F401
